"""Checks of a client's update before it is merged: names, shapes, dtypes, finite values, and its norm against the
cohort's. Plain numpy, no Flower, no torch.

The server's one path for a reply (`fedge.server.strategy.FedgeAvg`): `fedge.server.hetero.from_reply` decodes it
and checks it here (`check_update`), `norm_outliers` judges its size against the other clients', and
`fedge.server.hetero.aggregate` merges the accepted ones (example-weighted, FedNova-normalized for unequal steps,
mixed ranks by ``lora_merge``, then the server learning rate). Research merges measured against it (TIES sign
election, FedAvgM, FedAdam) live in benchmarks/aggregators.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def check_update(update: Arrays, reference: Arrays) -> str | None:
    """Why ``update`` cannot be aggregated with ``reference`` (the global adapter), or None if it can.

    Checks, in order: the same tensor names, then per tensor the same shape and dtype and finite values.
    """
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"wrong keys: missing {_few(missing)}, unexpected {_few(extra)}"
    for name, ref in reference.items():
        got = update[name]
        if got.shape != ref.shape:
            return f"wrong shape for {name}: {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"wrong dtype for {name}: {got.dtype}, expected {ref.dtype}"
        if not np.isfinite(got).all():
            return f"non-finite values (NaN or Inf) in {name}"
    return None


def delta_norm(update: Arrays, reference: Arrays) -> float:
    """L2 norm of ``update - reference`` over all tensors (float64 accumulation)."""
    return float(np.sqrt(sum(np.sum((update[k].astype(np.float64) - reference[k]) ** 2) for k in reference)))


def norm_outliers(
    norms: Sequence[float],
    history: Sequence[float],
    factor: float,
    floor: float = 0.0,
    keys: Sequence[Hashable] | None = None,
) -> list[bool]:
    """Which update norms are far above the cohort: ``norm > factor * reference``.

    Each norm is judged against the others in the round, so one huge update cannot raise its own bar: the
    reference is the largest of the median of the others' norms (with two others or more: one peer cannot be told
    from a liar), the median of ``history`` (accepted norms of earlier rounds) and ``floor``, which bounds the
    others from below but is never a reference alone. Updates with the same
    ``keys`` entry (identical updates) count once among the others. So near-zero or duplicated replies cannot get
    an honest one rejected: they lower a median that ``history`` and ``floor`` still bound from below. With no
    reference at all (round 1 with one or two clients) nothing is an outlier here; the absolute bound is the
    strategy's.
    """
    keys = list(keys) if keys is not None else list(range(len(norms)))
    flags = []
    for i, norm in enumerate(norms):
        others = list({keys[j]: n for j, n in enumerate(norms) if j != i and keys[j] != keys[i]}.values())
        refs = ([float(np.median(others))] if len(others) >= 2 else []) + (
            [float(np.median(history))] if len(history) else []
        )  # fmt: skip
        if not refs:  # nothing to compare with: the floor alone is no reference (it only bounds one from below)
            flags.append(False)
            continue
        flags.append(norm > factor * max([floor, *refs]))
    return flags


def digest(update: Arrays) -> str:
    """A fingerprint of an update's tensors (names, shapes, bytes): identical updates have the same one."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(update):
        a = np.ascontiguousarray(update[name])
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
