"""``fedge server start``: a SuperLink plus one federation run on it, resumable from its state directory.

fedge writes a small Flower app (a ``pyproject.toml`` whose components point at the installed
``fedge.server.app`` and ``fedge.edge_client.flower_client``, and whose run config holds this federation's settings)
into ``STATE/flwr/fedge-app``, starts ``flower-superlink`` and submits the app with ``flwr run``. Flower
does the rest: the ServerApp runs under the SuperLink, and each SuperNode runs the ClientApp per message.
Started again on the same ``--state`` after a crash, it resumes after the last completed round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fedge.common import wire
from fedge.common.errors import FedgeError
from fedge.common.procs import flwr_env, parse_address, spawn, stop, tail, wait_for_port
from fedge.server.app import FINAL_ADAPTER, RunKeys
from fedge.server.state import ServerState, StateError
from fedge.server.strategy import stage_deadline

APP_NAME = "fedge-federation"
CONNECTION = "fedge"


@dataclass
class Tls:
    """Server-side TLS (PEM paths). With ``auth_keys``, only SuperNodes whose public keys are listed may join."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path

    def check(self) -> None:
        for name in ("certfile", "keyfile", "ca_certfile"):
            if not getattr(self, name).is_file():
                raise FedgeError(f"--ssl-{name.replace('_', '-')} {getattr(self, name)}: no such file")


@dataclass
class ServerOptions:
    state_dir: Path
    address: str = "0.0.0.0:9092"
    rounds: int = 3
    min_clients: int = 2
    stage_deadline_s: float | None = None  # None: the round deadline plus Flower's overhead (fedge.server.strategy)
    norm_factor: float = 10.0
    server_lr: float = 1.0
    cache_dir: Path | None = None
    settings: wire.RoundSettings = field(default_factory=wire.RoundSettings)
    tls: Tls | None = None
    auth_keys: list[Path] = field(default_factory=list)  # SuperNode public keys (OpenSSH format)
    clientapp: str = (
        "fedge.edge_client.flower_client:app"  # MODULE:ATTR, e.g. fedge's ClientApp wrapped in your own mods
    )


def start_server(opts: ServerOptions, console: Console) -> int:
    """Run the federation to its last round; 0 when it completed."""
    host, port = parse_address(opts.address, "--address")
    state_dir = opts.state_dir.resolve()
    _check_state(state_dir, opts)
    home = state_dir / "flwr"
    app_dir = _write_app(home, state_dir, opts)
    _write_connection(home, port, opts.tls)
    env = flwr_env(home)
    cmd = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if opts.tls:
        opts.tls.check()
        cmd += [
            "--ssl-certfile",
            str(opts.tls.certfile),
            "--ssl-keyfile",
            str(opts.tls.keyfile),
            "--ssl-ca-certfile",
            str(opts.tls.ca_certfile),
        ]
    else:
        cmd += ["--insecure"]
    if opts.auth_keys:
        cmd += ["--enable-supernode-auth"]
    logs = state_dir / "logs"
    superlink = spawn(cmd, env, logs / "superlink.log")
    runner = None
    try:
        wait_for_port(host, port, superlink, logs / "superlink.log")
        for key in opts.auth_keys:
            _register_node_key(key, env, logs / "superlink.log")
        console.print(f"SuperLink listening on {host}:{port}; state in {state_dir}")
        runner = spawn(["flwr", "run", str(app_dir), CONNECTION, "--stream"], env, logs / "run.log")
        _follow(runner, superlink, state_dir, opts.rounds, console, logs)
    finally:
        stop(runner)
        stop(superlink)
    state = ServerState.load(state_dir)
    if state is None or state.round < opts.rounds:
        raise FedgeError(
            f"the run stopped after round {state.round if state else 0} of {opts.rounds}; "
            f"see {logs / 'run.log'}:\n{tail(logs / 'run.log')}"
        )
    console.print(f"[green]federation complete:[/] {state.round} rounds; adapter in {state_dir / FINAL_ADAPTER}")
    return 0


def _check_state(state_dir: Path, opts: ServerOptions) -> None:
    try:
        state = ServerState.load(state_dir)
        if state is not None:
            state.check_resumable(opts.settings.defining(), state_dir)
    except StateError as err:
        raise FedgeError(str(err)) from None
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--state {state_dir}: cannot create ({err.strerror})") from None


def _write_app(home: Path, state_dir: Path, opts: ServerOptions) -> Path:
    """The Flower app directory submitted by ``flwr run``; its run config carries every setting."""
    import tomli_w

    from fedge.common.fsutil import atomic_write_text
    from fedge.common.models import default_cache_dir

    run_config = {
        **opts.settings.to_config(),
        RunKeys.ROUNDS: opts.rounds,
        RunKeys.STATE_DIR: str(state_dir),
        RunKeys.CACHE_DIR: str(opts.cache_dir or default_cache_dir()),
        RunKeys.MIN_CLIENTS: opts.min_clients,
        RunKeys.DEADLINE: float(stage_deadline(opts.settings.deadline_s, opts.stage_deadline_s)),
        RunKeys.NORM_FACTOR: float(opts.norm_factor),
        RunKeys.SERVER_LR: float(opts.server_lr),
    }
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0", "dependencies": []},  # fedge must be installed
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "fedge",
                    "components": {"serverapp": "fedge.server.app:app", "clientapp": opts.clientapp},
                    "config": run_config,
                }
            },
        },
    }
    app_dir = home / "fedge-app"
    app_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app_dir / "pyproject.toml", tomli_w.dumps(project))
    return app_dir


def _write_connection(home: Path, port: int, tls: Tls | None) -> None:
    """FLWR_HOME/config.toml: how ``flwr run`` reaches this SuperLink's Control API (same port, loopback)."""
    import tomli_w

    from fedge.common.fsutil import atomic_write_text

    conn: dict = {"address": f"127.0.0.1:{port}"}
    if tls:
        conn["root-certificates"] = str(tls.ca_certfile.resolve())
    else:
        conn["insecure"] = True
    atomic_write_text(home / "config.toml", tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def _register_node_key(key: Path, env: dict, log_path: Path) -> None:
    import subprocess

    if not key.is_file():
        raise FedgeError(f"--auth-key {key}: no such file")
    done = subprocess.run(
        ["flwr", "supernode", "register", str(key.resolve()), CONNECTION], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise FedgeError(f"could not register SuperNode key {key}: {done.stdout[-500:]} {done.stderr[-500:]}")


def _follow(runner, superlink, state_dir: Path, rounds: int, console: Console, logs: Path) -> None:
    """Print each round as its record lands, until the run process ends."""
    from fedge.server.report import new_records, round_header, round_line

    shown: set[int] = set()
    if done := new_records(state_dir, shown):
        console.print(f"resuming: rounds {[r['round'] for r in done]} already done")
    console.print(round_header(), highlight=False, soft_wrap=True)
    while True:
        finished = runner.poll() is not None
        if not finished and superlink.poll() is not None:
            raise FedgeError(f"the SuperLink exited with code {superlink.returncode}:\n{tail(logs / 'superlink.log')}")
        for record in new_records(state_dir, shown):
            console.print(round_line(record, rounds), highlight=False, soft_wrap=True)
        if finished:
            return
        time.sleep(1.0)
