"""The files through which the background agent and the processes doing a round's work talk: small, no imports
beyond the standard library, so the per-message ClientApp stays light.

In the device's state directory:

- ``hold.json``: present while the agent does not allow training: ``{"pid": the agent's pid, "reason": why,
  "interrupted": "send" or "decline"}``. A round that arrives is declined at once with the reason; a round under
  way ends after its current step and sends what it trained, or declines (its steps kept in the work directory),
  as the owner chose. A hold whose agent is gone (kill -9) counts for nothing.
- ``progress.json``: written by the training loop after each step (round, step, steps) and removed at the end:
  how the agent knows a round is under way (continue thresholds apply) and what `fedge agent status` shows.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HOLD_FILE = "hold.json"
PROGRESS_FILE = "progress.json"


INTERRUPTED = ("send", "decline")  # what a round cut short by a hold does: send what it trained, or decline


def set_hold(state_dir: Path, reason: str, interrupted: str = "send") -> None:
    write_json(state_dir / HOLD_FILE, {"pid": os.getpid(), "reason": reason, "interrupted": interrupted})


def clear_hold(state_dir: Path) -> None:
    (state_dir / HOLD_FILE).unlink(missing_ok=True)


def held(state_dir: Path) -> str | None:
    """Why the agent holds this device back, or None (no agent, no hold, or the agent that wrote it is gone)."""
    hold = _read(state_dir / HOLD_FILE)
    if not hold or not _alive(hold.get("pid")):
        return None
    return str(hold.get("reason") or "held by the agent")


def interrupted_policy(state_dir: Path) -> str:
    """What a round the agent cut short does: "send" what it trained (the default, also without an agent) or
    "decline" (its steps stay in the device's work directory, and a resent round goes on from them)."""
    hold = _read(state_dir / HOLD_FILE) or {}
    return hold.get("interrupted") if hold.get("interrupted") in INTERRUPTED else "send"


def write_progress(state_dir: Path, kind: str, rnd: int, step: int, steps: int) -> None:
    """Best effort: a state directory that cannot take it must not stop the training it describes."""
    try:
        write_json(state_dir / PROGRESS_FILE, {"kind": kind, "round": rnd, "step": step, "steps": steps,
                                           "pid": os.getpid(), "time": time.time()})  # fmt: skip
    except OSError:
        pass


def clear_progress(state_dir: Path) -> None:
    (state_dir / PROGRESS_FILE).unlink(missing_ok=True)


def progress(state_dir: Path) -> dict | None:
    """The round under way (its process still alive), or None."""
    p = _read(state_dir / PROGRESS_FILE)
    return p if p and _alive(p.get("pid")) else None


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically (rename; no fsync: it describes the present, and a crash makes it stale anyway)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
