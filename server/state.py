"""The server's crash-safe state: global adapter, last completed round, round records, strategy state.

Layout of a state directory::

    state.json            round, run settings, strategy state, and which arrays file holds the global adapter
    global-0003.npz       the global adapter after round 3 (the previous one is removed once state.json moved on)
    rounds.json           the round records, also as rounds.csv

Every file is written to a temporary name, fsynced and renamed, arrays first and ``state.json`` last, so a
kill -9 at any point leaves the previous round's complete state.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedge.common.fsutil import atomic_write_bytes, atomic_write_text
from fedge.server.records import RoundRecord

STATE_FILE = "state.json"
RECORDS_JSON = "rounds.json"
RECORDS_CSV = "rounds.csv"


class StateError(Exception):
    """A state directory that cannot be resumed (corrupt, or from a different federation)."""


@dataclass
class ServerState:
    settings: dict  # what defines the federation; a restart with different settings must not resume it
    round: int = 0  # last completed round (0: none yet)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the global adapter
    records: list[RoundRecord] = field(default_factory=list)  # one per round, round 0 = the initial adapter
    strategy: dict = field(default_factory=dict)  # e.g. accepted update norms, for outlier checks

    def save(self, state_dir: Path) -> None:
        """Persist atomically: arrays file, records, then state.json; then drop superseded arrays files."""
        state_dir.mkdir(parents=True, exist_ok=True)
        arrays_name = f"global-{self.round:04d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        atomic_write_bytes(state_dir / arrays_name, buf.getvalue())
        write_records(state_dir, self.records)
        meta = {"round": self.round, "arrays": arrays_name, "settings": self.settings, "strategy": self.strategy}
        atomic_write_text(state_dir / STATE_FILE, json.dumps(meta, indent=1))
        for old in state_dir.glob("global-*.npz"):
            if old.name != arrays_name:
                old.unlink(missing_ok=True)
        for name in (STATE_FILE, RECORDS_JSON, RECORDS_CSV, "global-"):  # temp files of saves killed mid-write
            for tmp in state_dir.glob(f".{name}*-*"):
                tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, state_dir: Path) -> ServerState | None:
        """The saved state, or None if ``state_dir`` has none yet. Raises StateError if it is unreadable."""
        path = state_dir / STATE_FILE
        if not path.is_file():
            return None
        where = path
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict) or type(meta.get("round")) is not int or not isinstance(meta["arrays"], str):
                raise ValueError("expected an object with an integer 'round' and an 'arrays' file name")
            if not isinstance(meta.get("settings"), dict) or not isinstance(meta.get("strategy", {}), dict):
                raise ValueError("expected 'settings' and 'strategy' objects")
            where = state_dir / Path(meta["arrays"]).name  # never a path outside the state directory
            with np.load(where, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            where = state_dir / RECORDS_JSON
            raw = json.loads(where.read_text()) if where.exists() else []
            records = [RoundRecord.from_dict(r) for r in raw]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as err:
            raise StateError(f"{where}: cannot resume from this state ({type(err).__name__}: {err})") from None
        records = [r for r in records if r.round <= meta["round"]]  # records are written before state
        return cls(meta["settings"], meta["round"], arrays, records, meta.get("strategy", {}))

    def check_resumable(self, settings: dict, state_dir: Path) -> None:
        """Refuse to resume a federation whose defining settings changed (model, LoRA shape, seed)."""
        changed = sorted(k for k in self.settings if k in settings and settings[k] != self.settings[k])
        if changed:
            diffs = ", ".join(f"{k}: {self.settings[k]!r} -> {settings[k]!r}" for k in changed)
            raise StateError(f"{state_dir}: holds a different federation ({diffs}); use a new --state directory")


def write_records(state_dir: Path, records: list[RoundRecord]) -> None:
    """rounds.json (full records) and rounds.csv (one flat row per round), atomically."""
    atomic_write_text(state_dir / RECORDS_JSON, json.dumps([r.to_dict() for r in records], indent=1))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RoundRecord.CSV_COLUMNS)
    writer.writeheader()
    for record in records:
        writer.writerow(record.csv_row())
    atomic_write_text(state_dir / RECORDS_CSV, out.getvalue())


def read_records(state_dir: Path) -> list[RoundRecord]:
    """The round records written so far ([] if none, or if the file is being replaced right now)."""
    try:
        return [RoundRecord.from_dict(r) for r in json.loads((state_dir / RECORDS_JSON).read_text())]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
