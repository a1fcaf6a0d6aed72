"""The background device agent: the SuperNode and the warm worker (`Supervisor`), and the policy around them.

``fedge agent run --config device.toml`` is what the installed service runs. Every few seconds the agent reads the
run conditions (:mod:`fedge.edge_client.agent.conditions`): with the start thresholds while the device is idle, the
continue thresholds while a round is under way. When they fail, or the owner pauses it, it puts a hold on the
device (:mod:`fedge.edge_client.agent.hold`):

- a round that arrives is declined at once with the reason (the server records it and does not wait);
- a round under way is halted where it is (SIGSTOP of the worker: no CPU, its progress kept in memory) and goes on
  when the conditions return; held longer than ``max_pause`` it is let run one more step, sees the hold, and sends
  what it trained (no step lost).

It is a good citizen: lower CPU and IO priority for itself and everything it starts, rotated logs, and the model
unloaded (the worker stopped) after ``unload_after`` seconds without a round, loaded again when the device is
eligible. The owner talks to it over a Unix socket only their user can open: ``fedge agent status|pause|resume|
stop|logs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import socketserver
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from fedge.common.errors import FedgeError
from fedge.common.settings import setting
from fedge.edge_client.agent import conditions, hold

log = logging.getLogger("fedge.agent")
STATUS_FILE = "agent-status.json"
LOGS = ("agent.log", "supernode.log", "worker.log")  # in the state directory; agent.log rotates itself


@dataclass
class AgentSettings:
    """How the agent behaves on the device: ``[agent]`` in its config file."""

    check_every: float = setting(5.0, "seconds between checks of the run conditions while idle (1 s during a round)")
    max_pause: float = setting(
        300.0, "seconds a halted round waits for the conditions to return before it ends and sends what it trained"
    )
    unload_after: float = setting(600.0, "seconds without a round after which the model is unloaded (0: never)")
    sleep_after: float = setting(
        1800.0, "seconds held back (conditions failing or paused) after which the SuperNode leaves the federation "
        "too, until the conditions return: the agent alone waits, in ~70 MB (0: never)",
    )  # fmt: skip
    nice: int = setting(10, "CPU niceness of the agent and everything it starts (0-19; IO priority: idle class)")
    log_mb: float = setting(10.0, "size in MB at which each log is rotated (one old copy kept)")
    interrupted: str = setting(
        "send", "a round cut short by a failing condition: send the steps it trained (a partial update the server "
        "weighs by its steps) or decline it (the steps stay on the device)", choices=hold.INTERRUPTED,
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("check_every", "max_pause", "log_mb"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("unload_after", "sleep_after"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.interrupted not in hold.INTERRUPTED:
            raise ValueError(f"interrupted must be one of {', '.join(hold.INTERRUPTED)}, got {self.interrupted!r}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in 0..19, got {self.nice}")


# What `fedge agent status` shows of a finished round: its key there -> the `wire.Metric` its training saved.
COST_KEYS = {"steps": "steps", "train_seconds": "train-seconds", "energy_j": "energy-j",
             "upload_bytes": "upload-bytes", "peak_rss_mb": "peak-rss-mb"}  # fmt: skip


def round_cost(state_dir: Path, since: float) -> dict:
    """What the round that ended cost the device, from the metrics its training saved with its update (the newest
    work directory's, written after ``since``); {} for an evaluation or a round that sent nothing."""
    newest = None
    for path in (Path(state_dir) / "work").glob("*/metrics.json"):
        with contextlib.suppress(OSError):
            mtime = path.stat().st_mtime
            if mtime >= since - 1 and (newest is None or mtime > newest[0]):
                newest = (mtime, path)
    if newest is None:
        return {}
    try:
        metrics = json.loads(newest[1].read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(metrics, dict):
        return {}
    return {key: metrics[name] for key, name in COST_KEYS.items() if isinstance(metrics.get(name), (int, float))}


def socket_path(state_dir: Path) -> Path:
    """The agent's control socket: in the user's runtime directory (owner-only), named after the state directory
    (a socket path must stay under ~100 bytes, which a state directory's own may not)."""
    runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fedge-{os.getuid()}")
    key = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return runtime / f"fedge-agent-{key}.sock"


class Agent:
    """One device's agent. `run` blocks until `stop` (SIGTERM, SIGINT or ``fedge agent stop``)."""

    def __init__(self, supervisor, run_conditions: conditions.RunConditions, settings: AgentSettings) -> None:
        self.supervisor, self.conditions, self.settings = supervisor, run_conditions, settings
        self.state_dir: Path = supervisor.device.state_dir
        self.sources = conditions.Sources(state_dir=self.state_dir)
        self.load = conditions.LoadHistory()
        self.paused = False
        self.state, self.readings, self.reason = "starting", [], None
        self.held_since: float | None = None  # when a round under way was halted
        self.held_from: float | None = None  # when the device was last held back (idle or not)
        self.unloaded_for: str | None = None  # why the model is unloaded: "idle" or "held"
        self.last_work = time.monotonic()
        self.current: dict | None = None  # the round under way (hold.progress)
        self.rounds: deque = deque(maxlen=50)  # the last rounds it worked on
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._lock = threading.Lock()

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        be_nice(self.settings.nice)
        hold.clear_hold(self.state_dir)
        server = ControlServer(socket_path(self.state_dir), self)
        threading.Thread(target=server.serve_forever, name="fedge-agent-control", daemon=True).start()
        try:
            self.check(time.monotonic())  # a hold before the SuperNode can receive a round
            self.supervisor.start()
            next_check = 0.0
            while not self.stopping.is_set():
                self.wake.wait(0.5)
                self.wake.clear()
                now = time.monotonic()
                self.supervisor.tick(now)
                # a round under way is checked every half second (a progress file read: cheap), so a failing
                # condition halts it within about that
                if now >= next_check or self.current is not None or hold.progress(self.state_dir) is not None:
                    self.check(now)
                    next_check = now + self.settings.check_every
        finally:
            server.close()
            self.supervisor.stop()
            hold.clear_hold(self.state_dir)
            hold.clear_progress(self.state_dir)
        return 0

    def check(self, now: float) -> None:
        """Read the conditions, hold or release the device, halt or resume a round, unload or load the model."""
        with self._lock:
            self._track_rounds(now)
            self.load.sample(now, *conditions.cpu_seconds())
            training = self.current is not None and self.current.get("kind") == "train"
            self.readings = conditions.check(self.conditions, self.sources, self.load, starting=self.current is None)
            failing = conditions.failing(self.readings, self.conditions.unknown_ok)
            if self.paused:
                self.reason = "paused by the owner"
            else:
                self.reason = "; ".join(f"{r.name}: {r.detail}" for r in failing) or None
            if self.reason is None:
                self._release()
                self.held_from = None
            else:
                self._hold(now, training)
                self.held_from = now if self.held_from is None else self.held_from
            self._manage_model(now)
            self._manage_node(now)
            self._write_status()

    def _hold(self, now: float, training: bool) -> None:
        hold.set_hold(self.state_dir, self.reason, self.settings.interrupted)
        if not training:
            self.state = "paused" if self.paused else "waiting"
            return
        if self.held_since is None:
            self.held_since = now
            self.supervisor.suspend()  # halted at once: no CPU until the conditions return
            log.info("round halted: %s", self.reason)
        elif now - self.held_since > self.settings.max_pause and self.supervisor.suspended:
            self.supervisor.resume()  # it sees the hold after this step and sends what it trained
            log.info("round held for %.0f s: it ends now and sends what it trained", now - self.held_since)
        self.state = "halted"

    def _release(self) -> None:
        if self.held_since is not None:
            log.info("conditions back: the round goes on")
        hold.clear_hold(self.state_dir)
        self.supervisor.resume()
        self.held_since = None
        self.state = {"train": "training", "evaluate": "evaluating"}.get((self.current or {}).get("kind"), "ready")

    def _track_rounds(self, now: float) -> None:
        current = hold.progress(self.state_dir)
        if self.current is not None and (current is None or current.get("round") != self.current.get("round")):
            ended = time.time()
            started = self.current.get("started", ended)
            self.rounds.append({**self.current, "ended": ended, "seconds": round(ended - started, 1),
                                **round_cost(self.state_dir, started)})  # fmt: skip
        if current is not None:
            self.last_work = now
            same = self.current is not None and current.get("round") == self.current.get("round")
            current["started"] = self.current.get("started", time.time()) if same else time.time()
        self.current = current

    def _manage_model(self, now: float) -> None:
        """Unload the model (stop the warm worker) after ``unload_after`` seconds without a round or held back; load
        it again when the device turns eligible after a hold, or when a round arrives (that round runs in the
        ClientApp, the next ones in the worker again)."""
        sup, limit = self.supervisor, self.settings.unload_after
        if not sup.device.worker_port:
            return
        if sup.worker_wanted and limit and self.current is None:
            idle = now - self.last_work > limit
            held = self.held_from is not None and now - self.held_from > limit
            if idle or held:
                log.info("unloading the model: %s for %.0f s", "held back" if held else "no round", limit)
                sup.unload_worker()
                self.unloaded_for = "held" if held else "idle"
        elif not sup.worker_wanted:
            back = self.unloaded_for == "held" and self.reason is None
            if back or self.current is not None:
                log.info("loading the model: %s", "a round arrived" if self.current else "eligible again")
                sup.load_worker()
                self.last_work, self.unloaded_for = now, None

    def _manage_node(self, now: float) -> None:
        """Stop the SuperNode after ``sleep_after`` seconds held back with no round under way (the server sees the
        node leave, as if the device were off); start it again when the conditions return."""
        sup, limit = self.supervisor, self.settings.sleep_after
        if sup.node_wanted and limit and self.current is None and self.held_from is not None:
            if now - self.held_from > limit:
                log.info("leaving the federation until the conditions return: held back for %.0f s", limit)
                sup.sleep_node()
        elif not sup.node_wanted and self.reason is None:
            log.info("conditions back: rejoining the federation")
            sup.wake_node(now)
        if not sup.node_wanted:
            self.state = "asleep"

    # --- what the owner sees and does ---------------------------------------------------------------------------

    def status(self) -> dict:
        sup = self.supervisor
        return {
            "state": self.state,
            "reason": self.reason,
            "device": sup.device.name,
            "server": sup.client.server,
            "readings": [dataclasses.asdict(r) for r in self.readings],
            "round": self.current,
            "model": "loaded" if sup.worker_wanted else "unloaded",
            "node": "joined" if sup.node_wanted else "left until the conditions return",
            "rounds": list(self.rounds),
            "pid": os.getpid(),
            "logs": {name: str(self.state_dir / name) for name in LOGS},
        }

    def command(self, cmd: str) -> dict:
        if cmd == "status":
            return self.status()
        if cmd in ("pause", "resume"):
            self.paused = cmd == "pause"
            self.check(time.monotonic())
            return self.status()
        if cmd == "stop":
            self.stopping.set()
            self.wake.set()
            return {"state": "stopping"}
        raise ValueError(f"unknown command {cmd!r}: expected status, pause, resume or stop")

    def _write_status(self) -> None:
        """Replaced by rename, without fsync: it is rewritten every half second during a round (an SD card's
        wear), and it describes the present, which a crash makes stale anyway."""
        with contextlib.suppress(OSError):
            hold.write_json(self.state_dir / STATUS_FILE, self.status())
        rotate_logs(self.state_dir, self.settings.log_mb)


# --- the control socket -----------------------------------------------------------------------------------------


class ControlServer(socketserver.ThreadingUnixStreamServer):
    """JSON-line requests ``{"cmd": ...}`` on a Unix socket in an owner-only directory, from this user only."""

    daemon_threads = True

    def __init__(self, path: Path, agent: Agent) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.parent.stat().st_uid != os.getuid() or path.parent.stat().st_mode & 0o077:
            raise FedgeError(f"{path.parent}: must be a directory only this user can open (chmod 700)")
        if path.exists():
            if _answers(path):
                raise FedgeError(f"an agent is already running for this device ({path})")
            path.unlink()
        self.agent, self.path = agent, path
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        if _peer_uid(self.request) not in (None, os.getuid()):
            return  # another user's process: no answer
        try:
            request = json.loads(self.rfile.readline(4096) or b"{}")
            reply = self.server.agent.command(str(request.get("cmd", "")))
        except (ValueError, AttributeError) as err:
            reply = {"error": str(err)}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


def _peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's uid (Linux SO_PEERCRED), None where the platform does not say."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _answers(path: Path) -> bool:
    try:
        request(path, "status", timeout=2.0)
        return True
    except (OSError, ValueError):
        return False


def request(path: Path, cmd: str, timeout: float = 10.0) -> dict:
    """Send one command to the agent listening on ``path``; OSError if none does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


# --- a good citizen ---------------------------------------------------------------------------------------------


def be_nice(niceness: int) -> None:
    """Lower this process's CPU priority to ``niceness`` and its IO priority to the idle class (Linux); its
    children inherit both."""
    import psutil

    with contextlib.suppress(OSError, psutil.Error):
        current = os.nice(0)
        if niceness > current:
            os.nice(niceness - current)
    with contextlib.suppress(OSError, psutil.Error, AttributeError):
        psutil.Process().ionice(psutil.IOPRIO_CLASS_IDLE)


def rotate_logs(state_dir: Path, max_mb: float) -> None:
    """Copy each log past ``max_mb`` to ``NAME.1`` and truncate it in place: its writers append (O_APPEND), so they
    go on at the new end (logrotate's copytruncate)."""
    for name in LOGS[1:]:
        path = state_dir / name
        try:
            if path.stat().st_size <= max_mb * 2**20:
                continue
            with open(path, "rb") as src, open(path.with_name(name + ".1"), "wb") as dst:
                dst.write(src.read())
            os.truncate(path, 0)
        except OSError:
            continue


def setup_logging(state_dir: Path, max_mb: float) -> None:
    """The agent's own log: ``STATE/agent.log``, rotated by size (one old copy); its console output stays short."""
    from logging.handlers import RotatingFileHandler

    state_dir.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(state_dir / "agent.log", maxBytes=int(max_mb * 2**20), backupCount=1)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("fedge")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
