"""Installing the agent as a service: a systemd unit on Linux (user or system), a launchd agent on macOS.

The service runs ``python -m fedge agent run --config FILE`` with this environment's interpreter, restarts it on
failure, starts it at boot (system) or login (user; with lingering, at boot too), and leaves its console output to
the journal (systemd) or a log file (launchd). Nothing here needs root except a system install.
"""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedge.common.errors import FedgeError
from fedge.common.fsutil import atomic_write_bytes, atomic_write_text


@dataclass
class Service:
    """Where a device's agent service lives and what it runs."""

    name: str  # the device's name: the unit is fedge-agent-NAME
    config: Path  # the agent's config file (absolute)
    scope: str = "user"  # user or system
    unit_dir: Path | None = None  # override (tests, packaging); default: where the service manager looks
    platform: str = sys.platform

    @property
    def unit_name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", self.name)[:64] or "device"
        return f"org.fedge.agent.{safe}.plist" if self.platform == "darwin" else f"fedge-agent-{safe}.service"

    @property
    def path(self) -> Path:
        if self.unit_dir is not None:
            return self.unit_dir / self.unit_name
        if self.platform == "darwin":
            base = Path("/Library/LaunchDaemons") if self.scope == "system" else Path.home() / "Library/LaunchAgents"
        else:
            base = Path("/etc/systemd/system") if self.scope == "system" else Path.home() / ".config/systemd/user"
        return base / self.unit_name

    def command(self) -> list[str]:
        return [sys.executable, "-m", "fedge", "agent", "run", "--config", str(self.config)]


def systemd_unit(service: Service, user: str | None = None) -> str:
    """The unit file's text. A system unit runs as ``user`` (the one who installed it, not root)."""
    exec_start = " ".join(_quote(a) for a in service.command())
    lines = [
        "[Unit]",
        f"Description=fedge federated fine-tuning agent ({service.name})",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=30",
        "Nice=10",
        "IOSchedulingClass=idle",
        "Environment=PYTHONUNBUFFERED=1",
        "TimeoutStopSec=60",
    ]
    if service.scope == "system" and user:
        lines.append(f"User={user}")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if service.scope == 'system' else 'default.target'}"]
    return "\n".join(lines) + "\n"


def launchd_plist(service: Service) -> bytes:
    log = service.config.parent / f"fedge-agent-{service.name}.log"
    return plistlib.dumps({
        "Label": service.unit_name.removesuffix(".plist"),
        "ProgramArguments": service.command(),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Background",
        "LowPriorityIO": True,
        "Nice": 10,
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
    })  # fmt: skip


def install(service: Service, start: bool = True, say=print) -> Path:
    """Write the unit (atomically; an existing one is replaced), then enable and start it unless ``start`` is
    False. FedgeError naming what to run by hand when the service manager is not there."""
    import getpass

    path = service.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if service.platform == "darwin":
            atomic_write_bytes(path, launchd_plist(service))
        else:
            atomic_write_text(path, systemd_unit(service, getpass.getuser()))
    except OSError as err:
        hint = " (a system install needs root: sudo, or --user)" if service.scope == "system" else ""
        raise FedgeError(f"{path}: cannot write ({err.strerror}){hint}") from None
    say(f"wrote {path}")
    if start:
        for cmd in _enable_commands(service):
            _run(cmd, say)
    return path


def uninstall(service: Service, stop: bool = True, say=print) -> None:
    path = service.path
    if not path.exists():
        raise FedgeError(f"{path}: no fedge agent service installed for {service.name}")
    if stop:
        for cmd in _disable_commands(service):
            _run(cmd, say, check=False)
    path.unlink()
    say(f"removed {path}")
    if stop and service.platform != "darwin":
        _run(_systemctl(service) + ["daemon-reload"], say, check=False)


def _systemctl(service: Service) -> list[str]:
    return ["systemctl"] + (["--user"] if service.scope == "user" else [])


def _enable_commands(service: Service) -> list[list[str]]:
    if service.platform == "darwin":
        return [["launchctl", "load", "-w", str(service.path)]]
    return [_systemctl(service) + ["daemon-reload"], _systemctl(service) + ["enable", "--now", service.unit_name]]


def _disable_commands(service: Service) -> list[list[str]]:
    if service.platform == "darwin":
        return [["launchctl", "unload", "-w", str(service.path)]]
    return [_systemctl(service) + ["disable", "--now", service.unit_name]]


def _run(cmd: list[str], say, check: bool = True) -> None:
    if shutil.which(cmd[0]) is None:
        if check:
            raise FedgeError(f"{cmd[0]} not found: the unit is written; start it with: {' '.join(cmd)}")
        return
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 and check:
        raise FedgeError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[:300]}")
    say(f"ran {' '.join(cmd)}")


def _quote(arg: str) -> str:
    """systemd's ExecStart quoting: double quotes around arguments with spaces, backslash and quote escaped."""
    if re.fullmatch(r"[A-Za-z0-9_./=:@+-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
