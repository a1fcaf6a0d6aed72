"""Starting Flower's processes (SuperLink, SuperNode, ``flwr run``) from fedge, and watching them.

Each child gets ``FLWR_HOME`` inside fedge's own state directory (so fedge never touches ``~/.flwr``), the
venv's ``bin`` first on PATH (Flower spawns its own helpers by name), and on Linux dies with its parent:
a ``kill -9`` of ``fedge server start`` takes its SuperLink down with it instead of leaving it bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedge.common.errors import FedgeError


def flwr_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for a Flower child process."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the child may outlive a killed parent


def spawn(
    cmd: Sequence[str], env: dict[str, str], log_path: Path | None, tie_to_parent: bool = True
) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr appended to ``log_path`` (None: this process's own)."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") if log_path is not None else contextlib.nullcontext() as log:
        try:
            return subprocess.Popen(
                list(cmd),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if tie_to_parent and sys.platform == "linux" else None,
            )
        except FileNotFoundError:
            raise FedgeError(
                f"{cmd[0]} not found: is Flower installed in this environment? (pip install 'flwr>=1.41')"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_address(address: str, what: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), with a clear error naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedgeError(f"{what} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def wait_for_port(host: str, port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    """Block until something accepts connections on host:port; fail early (with the log) if ``proc`` exits."""
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FedgeError(f"{proc.args[0]} exited with code {proc.returncode}:\n{tail(log_path)}")
        try:
            with socket.create_connection((connect_host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise FedgeError(f"{proc.args[0]} did not listen on {host}:{port} within {timeout:.0f} s:\n{tail(log_path)}")


def stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM ``proc`` and every process under it, then SIGKILL what is left after ``grace`` seconds.

    Flower's processes start their own (SuperExec, a ServerApp or ClientApp per run or message); stopping
    only the top one can leave those running.
    """
    import psutil

    if proc is None or proc.poll() is not None:
        return
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
