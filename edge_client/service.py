"""``fedge client start``: this device's SuperNode, running fedge's ClientApp on local data.

The SuperNode keeps a connection to the server's SuperLink and retries with backoff (forever by default)
when the server goes away; each message it receives runs the ClientApp (:mod:`fedge.edge_client.flower_client`)
with this device's settings, passed as the SuperNode's node config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedge.common import wire
from fedge.common.errors import FedgeError
from fedge.common.procs import flwr_env, free_port, parse_address


@dataclass
class ClientOptions:
    server: str
    data: str
    eval_data: str | None = None
    name: str | None = None
    state_dir: Path | None = None
    cache_dir: Path | None = None
    model: str | None = "smollm2-135m"  # pulled before joining so the first round does not pay for it
    precision: str = "auto"
    threads: int = 0
    root_certificates: Path | None = None  # the server's CA: TLS on; without it the link is plaintext
    auth_key: Path | None = None  # this SuperNode's private key (OpenSSH ECDSA) when the server authenticates nodes
    max_retries: int | None = None  # None: retry forever
    warm_worker: bool = True  # keep the model loaded between rounds in a worker process (see fedge.edge_client.worker)
    profile: str = ""  # an emulated device (fedge.edge_client.devices.load_profile spec); "": this machine as it is
    # How an emulated device's slowness and link time pass: "wall" (slept) or "virtual" (counted on the device's
    # clock, not slept; a busy host does not slow the device either). For one-machine demos and benchmarks.
    emulated_time: str = "wall"


def worker_command(opts: ClientOptions, state_dir: Path, port: int) -> list[str]:
    import sys

    from fedge.common.models import default_cache_dir

    cmd = [sys.executable, "-m", "fedge.edge_client.worker", "--state", str(state_dir), "--port", str(port),
           "--cache-dir", str((opts.cache_dir or default_cache_dir()).resolve()), "--precision", opts.precision,
           "--threads", str(opts.threads)]  # fmt: skip
    return cmd + (["--model", opts.model] if opts.model else [])


def supernode_command(opts: ClientOptions, worker_port: int = 0) -> tuple[list[str], dict[str, str]]:
    """Check the options and the data, and build the ``flower-supernode`` command and its environment."""
    from fedge.common.models import default_cache_dir
    from fedge.edge_client.data import load_examples

    parse_address(opts.server, "--server")
    load_examples(opts.data)  # a bad data file fails here, with its line, not in round 1
    if opts.eval_data:
        load_examples(opts.eval_data)
    profile = _profile_spec(opts.profile)
    name = opts.name or Path(opts.data).stem.replace("demo:", "")
    state_dir = (opts.state_dir or Path.home() / ".fedge" / "clients" / name).resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--state {state_dir}: cannot create ({err.strerror})") from None
    node_config = {
        wire.Node.NAME: name,
        wire.Node.DATA: str(Path(opts.data).resolve()) if Path(opts.data).exists() else opts.data,
        wire.Node.STATE_DIR: str(state_dir),
        wire.Node.CACHE_DIR: str((opts.cache_dir or default_cache_dir()).resolve()),
        wire.Node.PRECISION: opts.precision,
        wire.Node.THREADS: opts.threads,
        wire.Node.WORKER_PORT: worker_port,
    }
    if profile:  # the ClientApp hands it to the warm worker with each round's work (fedge.edge_client.worker)
        node_config[wire.Node.PROFILE] = profile
        node_config[wire.Node.EMULATED_TIME] = opts.emulated_time
    if opts.eval_data:
        ev = opts.eval_data
        node_config[wire.Node.EVAL_DATA] = str(Path(ev).resolve()) if Path(ev).exists() else ev
    cmd = [
        "flower-supernode",
        "--superlink",
        opts.server,
        "--port",
        str(free_port()),
        "--node-config",
        " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items()),
    ]
    if opts.root_certificates:
        if not opts.root_certificates.is_file():
            raise FedgeError(f"--root-certificates {opts.root_certificates}: no such file")
        cmd += ["--root-certificates", str(opts.root_certificates)]
    else:
        cmd += ["--insecure"]
    if opts.auth_key:
        if not opts.auth_key.is_file():
            raise FedgeError(f"--auth-key {opts.auth_key}: no such file")
        if not opts.root_certificates:
            raise FedgeError("--auth-key needs --root-certificates: SuperNode authentication runs over TLS only")
        cmd += ["--auth-supernode-private-key", str(opts.auth_key)]
    if opts.max_retries is not None:
        cmd += ["--max-retries", str(opts.max_retries)]
    return cmd, flwr_env(state_dir / "flwr")


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


def start_client(opts: ClientOptions, say, log_path: Path | None = None) -> int:
    """Pull the model once, then run the SuperNode, restarting it with backoff whenever it exits.

    A SuperNode retries a lost connection by itself, but exits when a restarted SuperLink no longer knows
    it (its node id died with the old server's memory); a fresh SuperNode registers again. SIGINT or SIGTERM
    stops the client; a ``kill -9`` takes the SuperNode down with it (Linux).
    """
    import signal
    import time

    from fedge.common.models import default_cache_dir, pull_model
    from fedge.common.procs import spawn, stop

    worker_port = free_port() if opts.warm_worker else 0
    cmd, env = supernode_command(opts, worker_port)
    state_dir = Path(env["FLWR_HOME"]).parent
    if opts.model:
        pull_model(opts.model, opts.cache_dir or default_cache_dir(), say)
    say(f"joining {opts.server} as {cmd[cmd.index('--node-config') + 1]}")
    worker = spawn(worker_command(opts, state_dir, worker_port), env, state_dir / "worker.log") if worker_port else None
    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backoff, restarts = 1.0, 0
    while True:
        started = time.monotonic()
        node = spawn(cmd, env, log_path)
        while node.poll() is None and not stopping:
            time.sleep(0.5)
            if worker is not None and worker.poll() is not None:  # rounds fall back to in-process work meanwhile
                say(f"warm worker exited (code {worker.returncode}); restarting it")
                worker = spawn(worker_command(opts, state_dir, worker_port), env, state_dir / "worker.log")
        if stopping:
            stop(node)
            stop(worker)
            return 0
        if opts.max_retries is not None and restarts >= opts.max_retries:
            raise FedgeError(f"the SuperNode exited with code {node.returncode} {restarts + 1} times; giving up")
        if time.monotonic() - started > 300:
            backoff = 1.0  # it ran for a while: this is a new outage
        say(f"SuperNode exited (code {node.returncode}); rejoining in {backoff:.0f} s")
        time.sleep(backoff)
        backoff, restarts = min(60.0, backoff * 2), restarts + 1
