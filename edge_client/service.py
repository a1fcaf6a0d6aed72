"""``fedge client start``: this device's SuperNode, running fedge's ClientApp on local data.

The SuperNode keeps a connection to the server's SuperLink and retries with backoff (forever by default)
when the server goes away; each message it receives runs the ClientApp (:mod:`fedge.edge_client.flower_client`)
with this device's settings, passed as the SuperNode's node config. Flower's retry warnings say only that a try
failed; `ServerWatch` says on the console, once, when the server has been out of reach for a while, and why.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedge.common.errors import FedgeError
from fedge.common.fsutil import atomic_write_text
from fedge.common.models import DEFAULT_MODEL
from fedge.common.procs import flwr_env, free_port, parse_address
from fedge.common.settings import setting
from fedge.edge_client.local_work import Device

UNREACHABLE_AFTER_S = 20.0  # how long a client waits on an unreachable server before saying so


@dataclass
class ClientSettings:
    """How this device joins a federation: ``fedge client start``'s flags and a config file's ``[client]`` table.
    What the device is and holds (data, name, state, precision, ...) is its `Device` (``[device]``)."""

    server: str = setting("", "the server's HOST:PORT")
    model: str = setting(DEFAULT_MODEL, "model to pull before joining, so round 1 does not pay for it (none: skip)")
    root_certificates: Path | None = setting(None, "the server's CA certificate: enables TLS")
    auth_key: Path | None = setting(None, "this device's private key for SuperNode authentication (needs TLS)")
    max_retries: int | None = setting(None, "give up after N reconnects (default: never)")
    worker: bool = setting(True, "keep the model loaded between rounds in a warm worker process")
    unreachable_after: float = setting(
        UNREACHABLE_AFTER_S, "say so on the console once the server has been unreachable this long (it keeps "
        "retrying)", metavar="SECONDS",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_retries is not None and self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not (math.isfinite(self.unreachable_after) and self.unreachable_after > 0):
            raise ValueError(f"unreachable_after must be a finite number > 0, got {self.unreachable_after}")
        if self.auth_key is not None and self.root_certificates is None:
            raise ValueError("auth_key needs root_certificates: SuperNode authentication runs over TLS only")


def worker_command(client: ClientSettings, device: Device, port: int) -> list[str]:
    import sys

    cmd = [sys.executable, "-m", "fedge.edge_client.worker", "--state", str(device.state_dir), "--port", str(port),
           "--cache-dir", str(device.cache_dir), "--precision", device.precision,
           "--threads", str(device.threads)]  # fmt: skip
    return cmd + (["--model", client.model] if client.model and client.model != "none" else [])


def prepare_device(device: Device) -> Device:
    """Check the device's data and profile now (FedgeError naming the bad part), and make its paths absolute and
    its state directory exist: the ClientApp and the warm worker read them from other working directories."""
    from fedge.edge_client.data import load_examples

    if not device.data:
        raise FedgeError("--data is required: a JSONL/CSV/TXT file or demo:DOMAIN")
    load_examples(device.data)  # a bad data file fails here, with its line, not in round 1
    if device.eval_data:
        load_examples(device.eval_data)
    profile = _profile_spec(device.profile)
    state_dir = device.state_dir.resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--state {state_dir}: cannot create ({err.strerror})") from None
    return dataclasses.replace(
        device,
        data=_absolute(device.data),
        eval_data=_absolute(device.eval_data) if device.eval_data else None,
        state_dir=state_dir,
        cache_dir=device.cache_dir.resolve(),
        profile=profile,
    )


def _absolute(source: str) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else source


def supernode_command(client: ClientSettings, device: Device) -> tuple[list[str], dict[str, str]]:
    """The ``flower-supernode`` command for a prepared ``device`` and its environment; the node config (the
    device's settings) goes in a TOML file in its state directory."""
    import tomli_w

    parse_address(client.server, "--server")
    node_config = device.state_dir / "node-config.toml"
    atomic_write_text(node_config, tomli_w.dumps(device.to_node_config()))
    cmd = ["flower-supernode", "--superlink", client.server, "--port", str(free_port()),
           "--node-config", str(node_config)]  # fmt: skip
    if client.root_certificates:
        if not client.root_certificates.is_file():
            raise FedgeError(f"--root-certificates {client.root_certificates}: no such file")
        cmd += ["--root-certificates", str(client.root_certificates)]
    else:
        cmd += ["--insecure"]
    if client.auth_key:
        if not client.auth_key.is_file():
            raise FedgeError(f"--auth-key {client.auth_key}: no such file")
        cmd += ["--auth-supernode-private-key", str(client.auth_key)]
    if client.max_retries is not None:
        cmd += ["--max-retries", str(client.max_retries)]
    return cmd, flwr_env(device.state_dir / "flwr")


def _profile_spec(spec: str) -> str:
    """Check a ``--device-profile`` now (FedgeError naming the bad field); a file's path made absolute.

    The ClientApp and the warm worker load it again each round, from other working directories.
    """
    if not spec:
        return ""
    from fedge.edge_client.devices import load_profile

    load_profile(spec)
    path = Path(spec)
    return str(path.resolve()) if path.suffix in (".json", ".toml") and path.is_file() else spec


def probe(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None if ``host:port`` takes a TCP connection, else why not, in a few words."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except socket.gaierror:
        return f"cannot resolve {host!r}"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return (err.strerror or str(err)).lower()


@dataclass
class ServerWatch:
    """Says on the console when the server's port has taken no TCP connection for ``grace_s`` seconds (once per
    outage, with the reason) and when it takes one again; call `check` every so often.

    A TCP probe of its own, not the SuperNode's log: the SuperNode retries by itself (every ``retry_s`` seconds at
    most) and only says *that* a try failed. Past the port (TLS, node keys) the SuperNode's own errors tell.
    """

    address: str  # HOST:PORT, as the user gave it
    grace_s: float
    retry_s: float
    say: Callable[[str], None]
    down_since: float | None = None  # monotonic time of the first failed probe of this outage
    told: str = ""  # "up" or "down": what the console was last told
    next_probe: float = 0.0

    UP_EVERY_S = 30.0  # a reachable server is probed rarely: each probe is a connection it accepts and drops
    DOWN_EVERY_S = 5.0

    def check(self, now: float) -> None:
        if now < self.next_probe:
            return
        reason = probe(*parse_address(self.address, "--server"))
        if reason is None:
            if self.told != "up":
                self.say(f"reached the server at {self.address}")
            self.told, self.down_since = "up", None
        else:
            self.down_since = now if self.down_since is None else self.down_since
            if self.told != "down" and now - self.down_since >= self.grace_s:
                self.say(f"cannot reach the server at {self.address} ({reason}); "
                         f"still retrying, every {self.retry_s:g} s at most")  # fmt: skip
                self.told = "down"
        self.next_probe = now + (self.UP_EVERY_S if reason is None else min(self.DOWN_EVERY_S, self.grace_s))


def start_client(
    client: ClientSettings,
    device: Device,
    say,
    log_path: Path | None = None,
) -> int:
    """Pull the model once, then run the SuperNode, restarting it with backoff whenever it exits.

    A SuperNode retries a lost connection by itself, but exits when a restarted SuperLink no longer knows
    it (its node id died with the old server's memory); a fresh SuperNode registers again. SIGINT or SIGTERM
    stops the client; a ``kill -9`` takes the SuperNode down with it (Linux). A server out of reach for
    ``client.unreachable_after`` seconds is said on the console (`ServerWatch`), and the SuperNode keeps retrying.
    """
    import signal
    import time

    from flwr.common.constant import MAX_RETRY_DELAY

    from fedge.common.models import pull_model
    from fedge.common.procs import spawn, stop

    device = prepare_device(dataclasses.replace(device, worker_port=free_port() if client.worker else 0))
    cmd, env = supernode_command(client, device)
    state_dir = device.state_dir
    if client.model and client.model != "none":
        pull_model(client.model, device.cache_dir, say)
    say(f"joining {client.server} as {device.name} (node config: {state_dir / 'node-config.toml'})")
    worker_cmd = worker_command(client, device, device.worker_port)
    worker = spawn(worker_cmd, env, state_dir / "worker.log") if device.worker_port else None
    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watch = ServerWatch(client.server, client.unreachable_after, MAX_RETRY_DELAY, say)
    backoff, restarts = 1.0, 0
    while True:
        started = time.monotonic()
        node = spawn(cmd, env, log_path)
        while node.poll() is None and not stopping:
            time.sleep(0.5)
            watch.check(time.monotonic())
            if worker is not None and worker.poll() is not None:  # rounds fall back to in-process work meanwhile
                say(f"warm worker exited (code {worker.returncode}); restarting it")
                worker = spawn(worker_cmd, env, state_dir / "worker.log")
        if stopping:
            stop(node)
            stop(worker)
            return 0
        if client.max_retries is not None and restarts >= client.max_retries:
            raise FedgeError(f"the SuperNode exited with code {node.returncode} {restarts + 1} times; giving up")
        if time.monotonic() - started > 300:
            backoff = 1.0  # it ran for a while: this is a new outage
        say(f"SuperNode exited (code {node.returncode}); rejoining in {backoff:.0f} s")
        time.sleep(backoff)
        backoff, restarts = min(60.0, backoff * 2), restarts + 1
