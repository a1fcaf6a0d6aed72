"""Checks of a client's update before it is merged: names, shapes, dtypes, finite values, and its norm against the
cohort's. Plain numpy, no Flower, no torch.

The server's one path for a reply (`fedge.server.strategy.FedgeAvg`): `fedge.server.hetero.from_reply` decodes it
and checks it here (`check_update`), `norm_outliers` judges its size against the other clients', and
`fedge.server.hetero.aggregate` merges the accepted ones (example-weighted, FedNova-normalized for unequal steps,
mixed ranks by ``lora_merge``, then the server learning rate). Research merges measured against it (TIES sign
election, FedAvgM, FedAdam) live in benchmarks/aggregators.py.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def norm_outliers(norms: Sequence[float], history: Sequence[float], factor: float) -> list[bool]:
    """Which update norms are far above the cohort: ``norm > factor * median(the other clients' norms)``.

    Each norm is judged against the others in the round, so one huge update cannot raise its own bar, and
    with two clients the honest one is never rejected for the other's sake. A client alone in its round is
    judged against ``history`` (accepted norms of earlier rounds) if there is any.
    """
    flags = []
    for i, norm in enumerate(norms):
        others = [n for j, n in enumerate(norms) if j != i] or list(history)
        flags.append(bool(others) and norm > factor * max(float(np.median(others)), 1e-12))
    return flags


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
