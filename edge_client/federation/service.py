"""``fedge client start``: this device's SuperNode, running fedge's ClientApp on local data.

The SuperNode keeps a connection to the server's SuperLink and retries with backoff (forever by default)
when the server goes away; each message it receives runs the ClientApp (:mod:`fedge.edge_client.federation.clientapp`)
with this device's settings, passed as the SuperNode's node config. Flower's retry warnings say only that a try
failed; `ServerWatch` says on the console, once, when the server has been out of reach for a while, and why.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedge.common.errors import FedgeError
from fedge.common.fsutil import atomic_write_text
from fedge.common.models import DEFAULT_MODEL
from fedge.common.procs import flwr_env, free_port, parse_address
from fedge.common.settings import setting
from fedge.edge_client.federation.settings import Device

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
    launcher: bool = setting(
        True, "start each message's ClientApp process by forking one that has Flower and fedge imported (fedge's "
        "launcher) instead of a fresh flwr-clientapp process (Flower's subprocess isolation)",
    )  # fmt: skip
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

    cmd = [sys.executable, "-m", "fedge.edge_client.federation.worker", "--state", str(device.state_dir),
           "--port", str(port), "--cache-dir", str(device.cache_dir), "--precision", device.precision,
           "--threads", str(device.threads)]  # fmt: skip
    return cmd + (["--model", client.model] if client.model and client.model != "none" else [])


def prepare_device(device: Device) -> Device:
    """Check the device's data and profile now (FedgeError naming the bad part), and make its paths absolute and
    its state directory exist: the ClientApp and the warm worker read them from other working directories."""
    from fedge.edge_client.training.data import load_examples

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
        turns=_absolute_turns(device.turns),
    )


def _absolute_turns(spec: str) -> str:
    """``DIR:N`` with DIR absolute (clients started from other directories must lock the same files) and made now:
    a directory that cannot be is a FedgeError here, not a failed round later."""
    from fedge.edge_client.federation.turns import parse_turns

    if not spec:
        return spec
    directory, count = parse_turns(spec)
    directory = directory.resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--turns {directory}: cannot create ({err.strerror})") from None
    return f"{directory}:{count}"


def _absolute(source: str) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else source


def supernode_command(
    client: ClientSettings, device: Device, runtime_port: int | None = None, launcher: bool | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``flower-supernode`` command for a prepared ``device`` and its environment; the node config (the
    device's settings) goes in a TOML file in its state directory. ``runtime_port``: its Runtime API's, on
    loopback (None: a free one). With the launcher (``launcher``; None: `uses_launcher`) the node starts no
    ClientApp itself (``--isolation process``): `launcher_command` does, its tasks guarded by a secret only the two
    processes read."""
    import tomli_w

    parse_address(client.server, "--server")
    node_config = device.state_dir / "node-config.toml"
    atomic_write_text(node_config, tomli_w.dumps(device.to_node_config()))
    cmd = ["flower-supernode", "--superlink", client.server, "--port", str(runtime_port or free_port()),
           "--node-config", str(node_config)]  # fmt: skip
    if uses_launcher(client) if launcher is None else launcher:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(_launcher_secret(device))]
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


def uses_launcher(client: ClientSettings) -> bool:
    """Whether ClientApps start by fedge's launcher: asked for, and the platform can fork from a fork server
    (POSIX; elsewhere Flower's own subprocess isolation)."""
    import multiprocessing

    return client.launcher and "forkserver" in multiprocessing.get_all_start_methods()


def launcher_command(device: Device, runtime_port: int, node_pid: int) -> list[str]:
    """fedge's ClientApp launcher (:mod:`fedge.edge_client.federation.launcher`) for the SuperNode ``node_pid``
    whose Runtime API listens on ``runtime_port``; it exits with that node."""
    import sys

    # -P: not the working directory first on sys.path (a user's psutil.py there must not stand in for psutil)
    return [sys.executable, "-P", "-m", "fedge.edge_client.federation.launcher",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure", "--parent-pid", str(node_pid),
            "--superexec-auth-secret-file", str(_launcher_secret(device))]  # fmt: skip


def _launcher_secret(device: Device) -> Path:
    """The secret the SuperNode and its launcher share, made once per state directory: without it another local
    process could take the node's tasks from its Runtime API. Readable by this user only (mkstemp's 0600)."""
    import secrets

    from fedge.common.fsutil import atomic_write_bytes

    path = device.state_dir / "launcher.secret"
    if not path.is_file() or path.stat().st_size == 0 or path.stat().st_mode & 0o077:
        # none yet, or one others could have read (a state directory copied with looser permissions): a new one,
        # before the SuperNode that reads it starts
        atomic_write_bytes(path, secrets.token_hex(32).encode())
    return path


def _profile_spec(spec: str) -> str:
    """Check a ``--device-profile`` now (FedgeError naming the bad field); a file's path made absolute.

    The ClientApp and the warm worker load it again each round, from other working directories.
    """
    if not spec:
        return ""
    from fedge.edge_client.device.emulated import load_profile

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


# flower-supernode's longest wait between its tries to reach the server (Flower's MAX_RETRY_DELAY, checked against
# it in tests/test_service.py): a copy, because importing it imports all of Flower (50 MB RSS) into the agent.
SUPERNODE_RETRY_S = 20


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


def start_client(client: ClientSettings, device: Device, say, log_path: Path | None = None) -> int:
    """Pull the model once, then run the SuperNode and the warm worker until SIGINT or SIGTERM (`Supervisor`).

    A ``kill -9`` takes the SuperNode down with it (Linux). A server out of reach for ``client.unreachable_after``
    seconds is said on the console (`ServerWatch`), and the SuperNode keeps retrying.
    """
    import signal
    import time

    supervisor = Supervisor(client, device, say, log_path)
    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supervisor.start()
    try:
        while not stopping:
            time.sleep(0.5)
            supervisor.tick(time.monotonic())
    finally:
        supervisor.stop()
    return 0


class Supervisor:
    """One device's SuperNode and warm worker, kept running: `tick` restarts what exited.

    A SuperNode retries a lost connection by itself, but exits when a restarted SuperLink no longer knows it (its
    node id died with the old server's memory); a fresh SuperNode registers again, after a backoff that doubles up
    to a minute (FedgeError after ``client.max_retries`` restarts). The worker can be stopped on purpose
    (`unload_worker`: the model leaves memory) and suspended (`suspend`: SIGSTOP, training halts at once and keeps
    its progress in memory) by the background agent (:mod:`fedge.edge_client.agent.daemon`).
    """

    def __init__(self, client: ClientSettings, device: Device, say, log_path: Path | None = None) -> None:
        from fedge.common.models import pull_model

        self.client, self.say, self.log_path = client, say, log_path
        self.device = prepare_device(dataclasses.replace(device, worker_port=free_port() if client.worker else 0))
        self.runtime_port = free_port()
        self.launcher_on = uses_launcher(client)  # until the launcher says it does not fit this Flower
        self.cmd, self.env = supernode_command(client, self.device, self.runtime_port, self.launcher_on)
        if client.model and client.model != "none":
            pull_model(client.model, self.device.cache_dir, say)
        self.worker_cmd = worker_command(client, self.device, self.device.worker_port)
        self.watch = ServerWatch(client.server, client.unreachable_after, SUPERNODE_RETRY_S, say)
        self.node = self.worker = self.launcher = None
        self.launcher_started, self.launcher_backoff, self.launcher_restart_at = 0.0, 1.0, None
        self.worker_wanted = bool(self.device.worker_port)
        self.node_wanted = True  # False while the agent keeps the SuperNode stopped (`sleep_node`)
        self.suspended = False
        self.backoff, self.restarts, self.node_started, self.restart_at = 1.0, 0, 0.0, None

    def start(self) -> None:
        import time

        self.say(f"joining {self.client.server} as {self.device.name} "
                 f"(node config: {self.device.state_dir / 'node-config.toml'})")  # fmt: skip
        if self.worker_wanted:
            self.load_worker()
        self._start_node(time.monotonic())

    def tick(self, now: float) -> None:
        """Restart what exited (the SuperNode after its backoff), and watch the server's reachability."""
        from fedge.common.procs import spawn

        self.watch.check(now)
        if self.worker_wanted and self.worker is not None and self.worker.poll() is not None:
            self.say(f"warm worker exited (code {self.worker.returncode}); restarting it")
            self.worker, self.suspended = spawn(self.worker_cmd, self.env, self.device.state_dir / "worker.log"), False
        if self.node is not None and self.node.poll() is None and self.node.forgotten.is_set():
            from fedge.common.procs import stop

            self.say("the server no longer knows this SuperNode (it restarted): starting a new one")
            stop(self.node, grace=5.0)  # Flower's SuperNode can hang after its heartbeat is refused: not wait on it
        self._watch_launcher(now)
        if not self.node_wanted:
            return
        if self.node is not None and self.node.poll() is not None and self.restart_at is None:
            if self.client.max_retries is not None and self.restarts >= self.client.max_retries:
                raise FedgeError(f"the SuperNode exited with code {self.node.returncode} {self.restarts + 1} "
                                 "times; giving up")  # fmt: skip
            if now - self.node_started > 300:
                self.backoff = 1.0  # it ran for a while: this is a new outage
            self.say(f"SuperNode exited (code {self.node.returncode}); rejoining in {self.backoff:.0f} s")
            self.restart_at = now + self.backoff
            self.backoff, self.restarts = min(60.0, self.backoff * 2), self.restarts + 1
        if self.restart_at is not None and now >= self.restart_at:
            self._start_node(now)

    def _start_node(self, now: float) -> None:
        from fedge.common.procs import stop

        stop(self.launcher)  # the old node's, if it outlived it
        self.node, self.node_started, self.restart_at = _watched(self.cmd, self.env, self.log_path), now, None
        self.launcher, self.launcher_restart_at, self.launcher_backoff = None, None, 1.0
        if self.launcher_on:
            self._start_launcher(now)

    def _fall_back_to_flower(self, now: float) -> None:
        """The launcher exited because it does not fit the installed Flower (`MISFIT_EXIT`): say why in one line and
        run the node as Flower runs it, starting its own ClientApp processes (as with ``--no-launcher``)."""
        from fedge.common.procs import stop
        from fedge.edge_client.federation.launcher import misfit_here

        why = misfit_here(self.env) or "fedge's ClientApp launcher failed its check"
        self.say(f"{why}; ClientApps start as Flower starts them (as with --no-launcher)")
        self.launcher_on = False
        self.cmd, self.env = supernode_command(self.client, self.device, self.runtime_port, launcher=False)
        stop(self.node)
        self._start_node(now)

    def _start_launcher(self, now: float | None = None) -> None:
        """The node's ClientApp launcher (`launcher_command`), its output in the node's log."""
        import time

        from fedge.common.procs import spawn

        cmd = launcher_command(self.device, self.runtime_port, self.node.pid)
        self.launcher, self.launcher_started = spawn(cmd, self.env, self.log_path), now or time.monotonic()

    def _watch_launcher(self, now: float) -> None:
        """Reap an exited launcher at once (its ClientApps watch its pid, which a zombie keeps alive) and, while
        the node runs, start it again after a backoff that doubles to a minute if it keeps exiting."""
        if self.launcher is None or self.launcher.poll() is None:
            return
        from fedge.edge_client.federation.launcher import MISFIT_EXIT

        node_up = self.node is not None and self.node.poll() is None
        if not node_up:
            self.launcher = None  # it goes with its node; the node's restart starts a new one
            return
        if self.launcher.returncode == MISFIT_EXIT:
            self._fall_back_to_flower(now)
            return
        if self.launcher_restart_at is None:
            if now - self.launcher_started > 300:
                self.launcher_backoff = 1.0  # it ran for a while: this is a new failure
            self.say(f"ClientApp launcher exited (code {self.launcher.returncode}); restarting it in "
                     f"{self.launcher_backoff:.0f} s")  # fmt: skip
            self.launcher_restart_at = now + self.launcher_backoff
            self.launcher_backoff = min(60.0, self.launcher_backoff * 2)
        elif now >= self.launcher_restart_at:
            self.launcher_restart_at = None
            self._start_launcher(now)

    def sleep_node(self) -> None:
        """Stop the SuperNode (the server sees the node leave and sends it nothing) until `wake_node`: during a
        long hold the device then costs only the agent's own memory."""
        from fedge.common.procs import stop

        self.node_wanted = False
        stop(self.node)
        stop(self.launcher)
        self.node, self.launcher, self.restart_at = None, None, None

    def wake_node(self, now: float) -> None:
        """Start the SuperNode again after `sleep_node`: it registers with the server as it did at the start."""
        if not self.node_wanted:
            self.node_wanted, self.backoff = True, 1.0
            self._start_node(now)

    def load_worker(self) -> None:
        """Start the warm worker (it loads the model) if it is not running."""
        from fedge.common.procs import spawn

        self.worker_wanted = bool(self.device.worker_port)
        if self.worker_wanted and (self.worker is None or self.worker.poll() is not None):
            self.worker, self.suspended = spawn(self.worker_cmd, self.env, self.device.state_dir / "worker.log"), False

    def unload_worker(self) -> None:
        """Stop the warm worker: its model leaves memory; rounds meanwhile run in the ClientApp (slower)."""
        from fedge.common.procs import stop

        self.worker_wanted = False
        self.resume()
        stop(self.worker)
        self.worker = None

    def suspend(self) -> None:
        """Halt the worker where it is (SIGSTOP): no CPU, its training state kept in memory."""
        if self.worker is not None and self.worker.poll() is None and not self.suspended:
            self.worker.send_signal(signal.SIGSTOP)
            self.suspended = True

    def resume(self) -> None:
        if self.worker is not None and self.worker.poll() is None and self.suspended:
            self.worker.send_signal(signal.SIGCONT)
        self.suspended = False

    def stop(self) -> None:
        from fedge.common.procs import stop

        self.resume()
        stop(self.node)
        stop(self.launcher)
        stop(self.worker)


# What a SuperNode prints when a restarted SuperLink no longer knows its node id. Flower then means to exit, but its
# process can hang in shutdown with its heartbeat thread dead (seen in CI): the supervisor restarts it instead.
_FORGOTTEN = b"401 Unauthorized"


def _watched(cmd: list[str], env: dict[str, str], log_path: Path | None):
    """Start the SuperNode with its output copied to ``log_path`` (None: this process's stdout) by a thread that
    sets ``proc.forgotten`` when the server has forgotten the node."""
    import subprocess
    import sys
    import threading

    from fedge.common.procs import _die_with_parent

    out = open(log_path, "ab") if log_path is not None else sys.stdout.buffer  # noqa: SIM115 (closed by the thread)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
    except FileNotFoundError:
        raise FedgeError(
            f"{cmd[0]} not found: is Flower installed in this environment? (pip install 'flwr>=1.41')"
        ) from None
    proc.forgotten = threading.Event()

    def copy() -> None:
        for line in iter(proc.stdout.readline, b""):
            if _FORGOTTEN in line:
                proc.forgotten.set()
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):
                pass
        if out is not sys.stdout.buffer:
            out.close()

    threading.Thread(target=copy, name="fedge-supernode-output", daemon=True).start()
    return proc
