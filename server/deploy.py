"""``fedge server start``: a SuperLink plus one federation run on it, resumable from its state directory.

fedge writes a small Flower app (a ``pyproject.toml`` whose components point at the installed
``fedge.server.app`` and ``fedge.edge_client.federation.clientapp``, and whose run config holds this federation's
settings) into ``STATE/flwr/fedge-app``, starts ``flower-superlink`` and submits the app with ``flwr run``. Flower
does the rest: the ServerApp runs under the SuperLink, and each SuperNode runs the ClientApp per message.
Started again on the same ``--state`` after a crash, it resumes after the last completed round.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console

from fedge.common import wire
from fedge.common.errors import FedgeError
from fedge.common.procs import flwr_env, parse_address, spawn, stop, tail, wait_for_port
from fedge.server.app import FINAL_ADAPTER, run_config
from fedge.server.settings import ServerSettings
from fedge.server.state import ServerState, StateError

APP_NAME = "fedge-federation"
CONNECTION = "fedge"


def start_server(server: ServerSettings, round_settings: wire.RoundSettings, cache_dir: Path, console: Console) -> int:
    """Run the federation to its last round; 0 when it completed."""
    host, port = parse_address(server.address, "--address")
    if not server.tls and not server.insecure and not _is_loopback(host):
        raise FedgeError(
            f"--address {server.address}: clients would reach this server over plaintext; give it TLS "
            "(--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile) or accept plaintext with --insecure"
        )
    try:
        server.check_merge(round_settings.lora_merge)
    except ValueError as err:
        raise FedgeError(str(err)) from None
    _check_port_free(host, port)
    state_dir = server.state.resolve()
    server = dataclasses.replace(server, state=state_dir)
    _check_files(server)
    _check_state(state_dir, round_settings)
    home = state_dir / "flwr"
    app_dir = _write_app(home, run_config(round_settings, server, cache_dir), server.clientapp)
    _write_connection(home, port, server.ssl_ca_certfile)
    env = flwr_env(home)
    cmd = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if server.tls:
        cmd += ["--ssl-certfile", str(server.ssl_certfile), "--ssl-keyfile", str(server.ssl_keyfile),
                "--ssl-ca-certfile", str(server.ssl_ca_certfile)]  # fmt: skip
    else:
        cmd += ["--insecure"]
    if server.auth_key:
        cmd += ["--enable-supernode-auth"]
    logs = state_dir / "logs"
    superlink = spawn(cmd, env, logs / "superlink.log")
    runner = None
    try:
        wait_for_port(host, port, superlink, logs / "superlink.log")
        for key in server.auth_key:
            _register_node_key(key, env, logs / "superlink.log")
        console.print(f"SuperLink listening on {host}:{port}; state in {state_dir}")
        runner = spawn(["flwr", "run", str(app_dir), CONNECTION, "--stream"], env, logs / "run.log")
        _follow(runner, superlink, state_dir, server.rounds, console, logs)
    finally:
        stop(runner)
        stop(superlink)
    state = ServerState.load(state_dir)
    if state is None or state.round < server.rounds:
        raise FedgeError(
            f"the run stopped after round {state.round if state else 0} of {server.rounds}; "
            f"see {logs / 'run.log'}:\n{tail(logs / 'run.log')}"
        )
    console.print(f"[green]federation complete:[/] {state.round} rounds; adapter in {state_dir / FINAL_ADAPTER}")
    return 0


def _check_port_free(host: str, port: int, wait_s: float = 5.0) -> None:
    """FedgeError if something listens on host:port (it would be taken for this server's SuperLink). Waits up to
    ``wait_s`` for it to go: a server restarted right after a kill finds its old SuperLink still exiting."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    end = time.monotonic() + wait_s
    while True:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            try:
                probe.bind((host, port))
                return
            except OSError as err:
                if time.monotonic() > end:
                    raise FedgeError(f"--address {host}:{port}: cannot listen there ({err.strerror}); is another "
                                     "server running? Pick another port or stop it") from None  # fmt: skip
        time.sleep(0.5)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_files(server: ServerSettings) -> None:
    """The TLS files and node keys exist (FedgeError naming the flag otherwise)."""
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certfile"):
        path = getattr(server, name)
        if path is not None and not path.is_file():
            raise FedgeError(f"--{name.replace('_', '-')} {path}: no such file")
    for key in server.auth_key:
        if not key.is_file():
            raise FedgeError(f"--auth-key {key}: no such file")
    if server.ssl_certfile is not None:
        _check_names_loopback(server.ssl_certfile)


def _check_names_loopback(certfile: Path) -> None:
    """The server certificate names 127.0.0.1: `fedge server start` hands the federation to its own SuperLink there
    (`_write_connection`), and TLS refuses a certificate that does not name the address dialled."""
    import ipaddress

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(certfile.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as err:
        raise FedgeError(
            f"--ssl-certfile {certfile}: not a PEM certificate with subject alternative names ({err})"
        ) from None
    if ipaddress.ip_address("127.0.0.1") not in san.get_values_for_type(x509.IPAddress):
        raise FedgeError(
            f"--ssl-certfile {certfile}: the certificate does not name 127.0.0.1, where fedge server start hands the "
            "federation to its own SuperLink; add it to the certificate's names (fedge certs does)"
        )


def _check_state(state_dir: Path, round_settings: wire.RoundSettings) -> None:
    try:
        state = ServerState.load(state_dir)
        if state is not None:
            state.check_resumable(round_settings.defining(), state_dir)
    except StateError as err:
        raise FedgeError(str(err)) from None
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--state {state_dir}: cannot create ({err.strerror})") from None


def _write_app(home: Path, config: dict, clientapp: str) -> Path:
    """The Flower app directory submitted by ``flwr run``; its run config (``config``) carries every setting."""
    import tomli_w

    from fedge.common.fsutil import atomic_write_text

    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0", "dependencies": []},  # fedge must be installed
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "fedge",
                    "components": {"serverapp": "fedge.server.app:app", "clientapp": clientapp},
                    "config": config,
                }
            },
        },
    }
    app_dir = home / "fedge-app"
    app_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app_dir / "pyproject.toml", tomli_w.dumps(project))
    return app_dir


def _write_connection(home: Path, port: int, ca_certfile: Path | None) -> None:
    """FLWR_HOME/config.toml: how ``flwr run`` reaches this SuperLink's Control API (same port, loopback)."""
    import tomli_w

    from fedge.common.fsutil import atomic_write_text

    conn: dict = {"address": f"127.0.0.1:{port}"}
    if ca_certfile is not None:
        conn["root-certificates"] = str(ca_certfile.resolve())
    else:
        conn["insecure"] = True
    atomic_write_text(home / "config.toml", tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def _register_node_key(key: Path, env: dict, log_path: Path) -> None:
    import subprocess

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
        console.print(f"resuming: rounds {[r.round for r in done]} already done")
    console.print(round_header(), highlight=False, soft_wrap=True)
    while True:
        finished = runner.poll() is not None
        if not finished and superlink.poll() is not None:
            raise FedgeError(f"the SuperLink exited with code {superlink.returncode}:\n{tail(logs / 'superlink.log')}")
        for record in new_records(state_dir, shown, finished):
            console.print(round_line(record, rounds), highlight=False, soft_wrap=True)
        if finished:
            return
        time.sleep(1.0)
