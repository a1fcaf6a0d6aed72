"""What a round sends back, and keeps until it is sent: the adapter a client starts from, the reply's arrays (the
whole adapter or its encoded change, with error feedback), and the work directory that keeps a finished reply
across a restart.

Crash-safe order in the work directory: metrics, then the residual, then the update last (`save_update`): its
presence means the work is complete. The live residual is replaced only once the update is complete
(`commit_residual`, repeated by a resumed reply).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from fedge.common import wire
from fedge.common.fsutil import atomic_write_bytes, atomic_write_text
from fedge.edge_client.federation.settings import Device

UPDATE_FILE, METRICS_FILE, RESIDUAL_FILE = "update.npz", "metrics.json", "residual.npz"
KEEP_WORK_DIRS = 3
Arrays = dict[str, np.ndarray]


def start_arrays(global_arrays: Arrays, settings: wire.RoundSettings, local: Arrays) -> Arrays:
    """The global adapter as this client trains it: cut to its rank and to the tensors its plan trains."""
    from fedge.common.lora import client_rank, for_client

    rank = client_rank(local)
    full = rank == client_rank(global_arrays)
    cut = global_arrays if full else for_client(global_arrays, rank, settings.lora_alpha, settings.lora_merge)
    missing = sorted(set(local) - set(cut))
    if missing:
        raise ValueError(f"the global adapter does not fit this model: it has no {missing[:3]}")
    return {k: cut[k] for k in local}


def reply_arrays(
    device: Device, settings: wire.RoundSettings, trained: Arrays, start: Arrays, global_arrays: Arrays, profile,
    elapsed: float,
) -> tuple[Arrays, str, object]:  # fmt: skip
    """What goes back: (arrays, codec spec, the error feedback to save once the update is saved).

    The whole adapter (``codec == ""``) or the encoded change, with error feedback. Frozen tensors never travel
    up: with LoRA A frozen (the default) an uncoded reply is the change of B alone, exact in fp32 (codec "none").

    ``"auto"`` picks the least lossy codec whose upload fits the deadline's remaining time on the device's
    link (an emulated profile's; on a real device without a link model, int8); ``"auto:C"`` starts the search
    at codec ``C`` of `fedge.quantization.codecs.LADDER`. The residual of lossy codecs stays on the device
    (``state_dir/residual-KEY.npz``, one per federation shape) and is added to the next round's change.
    """
    from fedge.quantization.codecs import LADDER
    from fedge.quantization.updates import ErrorFeedback, make_delta, pick_codec

    whole = not settings.codec and set(trained) == set(global_arrays) and _same_shapes(trained, global_arrays)
    if whole and not settings.lora_freeze_a:
        return trained, "", None
    # A plan that trains part of the adapter (lower rank, fewer layers) always sends its change: the whole
    # adapter would not have the global's shapes.
    delta = make_delta(trained, start)
    spec = settings.codec or "none"
    if spec.startswith("auto"):
        ladder = LADDER[LADDER.index(spec.partition(":")[2] or LADDER[0]) :]
        if profile is None or settings.deadline_s <= 0:  # no link model: int8, or the ceiling if it is lower
            spec = LADDER[max(LADDER.index("int8"), LADDER.index(ladder[0]))]
        else:
            fp32_bytes = sum(a.nbytes for a in delta.values())
            left = max(1.0, 0.9 * settings.deadline_s - elapsed)
            spec = pick_codec(fp32_bytes, profile.uplink_bytes_per_s, left, ladder)
    feedback = ErrorFeedback.load(residual_path(device, settings), spec)
    encoded = feedback.encode(delta)
    return encoded.to_arrays(), spec, feedback


def residual_path(device: Device, settings: wire.RoundSettings) -> Path:
    """Where the error-feedback residual waits between rounds: one per federation shape (model, LoRA, seed)."""
    key = hashlib.sha256(json.dumps(settings.defining(), sort_keys=True).encode()).hexdigest()[:12]
    return device.state_dir / f"residual-{key}.npz"


def _same_shapes(a: Arrays, b: Arrays) -> bool:
    return all(a[k].shape == b[k].shape for k in a)


def work_key(global_arrays: Arrays, settings: wire.RoundSettings, data_id: str) -> str:
    blob = f"{wire.fingerprint(global_arrays)}|{json.dumps(settings.to_config(), sort_keys=True)}|{data_id}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_update(work: Path, arrays: Arrays, metrics: dict, residual: bytes | None) -> None:

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_text(work / METRICS_FILE, json.dumps(metrics))
    if residual is not None:
        atomic_write_bytes(work / RESIDUAL_FILE, residual)
    atomic_write_bytes(work / UPDATE_FILE, buf.getvalue())  # last: its presence means the work is complete


def commit_residual(work: Path, device: Device, settings: wire.RoundSettings) -> None:
    """Make the residual saved with a finished update the live one (idempotent: a resumed reply repeats it)."""
    saved = work / RESIDUAL_FILE
    if saved.is_file():
        atomic_write_bytes(residual_path(device, settings), saved.read_bytes())


def load_update(work: Path) -> tuple[Arrays, dict]:
    with np.load(work / UPDATE_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads((work / METRICS_FILE).read_text())


def prune_work(root: Path) -> None:
    """Keep the newest few work directories: enough to resume after a restart, not a growing pile."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in dirs[KEEP_WORK_DIRS:]:
        shutil.rmtree(old, ignore_errors=True)
