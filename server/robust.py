"""Byzantine-robust pieces of the server's merge: per-client share caps, norm clipping, and coordinate-wise
trimmed mean, median and Multi-Krum over clients' changes. Plain numpy, no Flower, no torch.

The default merge (`fedge.server.hetero.aggregate` with ``rule="mean"``) is FedAvg: it trusts every accepted
change in proportion to its weight, so one client's change can still pull the global as far as its capped share
allows. The other rules give up some of the honest clients' signal to bound what any minority can do:

- ``trimmed-mean`` (Yin et al. 2018): per coordinate, drop the ``trim`` fraction of highest and of lowest values
  over the clients, average the rest;
- ``median``: per coordinate, the median over the clients;
- ``krum`` (Multi-Krum, Blanchard et al. 2017): score each change by its summed squared distance to its
  ``n - f - 2`` nearest others, keep the ``n - f`` best scored, and average those by weight. It needs
  ``n >= 2f + 3``; a round with fewer accepted clients tolerates ``(n - 3) // 2`` (0: the plain mean).

Trimmed mean and median ignore the clients' weights (each client is one vote per coordinate), as in their papers.
They work on changes in the global adapter's coordinates, so with mixed ranks they need the zero-pad merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RULES = ("mean", "trimmed-mean", "median", "krum")


def check_rule(rule: str, trim: float, krum_f: int) -> None:
    """ValueError if ``rule`` or its parameters are not ones fedge knows."""
    if rule not in RULES:
        raise ValueError(f"aggregation rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    if krum_f < 0:
        raise ValueError(f"krum's f must be >= 0, got {krum_f}")


def cap_shares(shares: Sequence[float], max_share: float, clients: int | None = None) -> list[float]:
    """``shares`` (>= 0, summing to 1) with none above ``cap = max(max_share, 1 / clients)``, the excess handed to
    the others in proportion to their shares (water-filling).

    ``clients``: how many clients the round merges (default: ``len(shares)``). For a tensor only some of them sent
    (clients that trained a few layers), fewer than ``1 / cap`` senders each get the cap and the tensor moves by
    less than their average: a sole sender never owns a tensor. A client that claims a huge weight (examples, or
    few steps) then moves any part of the global at most as much as ``cap`` of its change.
    """
    p = np.asarray(shares, np.float64)
    if p.size == 0:
        return []
    cap = max(float(max_share), 1.0 / max(p.size, clients or p.size))
    capped = np.zeros(p.size, bool)
    while True:
        over = ~capped & (p > cap * (1 + 1e-12))
        if not over.any():
            return [float(x) for x in p]
        capped |= over
        p[capped] = cap
        free = ~capped
        if not free.any():
            return [float(x) for x in p]
        rest, room = float(p[free].sum()), 1.0 - cap * int(capped.sum())
        p[free] = p[free] / rest * room if rest > 0 else room / int(free.sum())


def clip_scales(rms: Sequence[float], max_rms: float, factor: float) -> list[float]:
    """Per client, the multiplier (<= 1) that brings its change's RMS under both bounds: ``max_rms`` (absolute;
    0: none) and ``factor`` times the median of the other clients' RMS (relative; 0: none, and not with fewer
    than two others, since one peer cannot be told from a liar)."""
    out = []
    for i, r in enumerate(rms):
        bound = max_rms if max_rms > 0 else np.inf
        others = [x for j, x in enumerate(rms) if j != i]
        if factor > 0 and len(others) >= 2:
            bound = min(bound, factor * float(np.median(others)))
        out.append(1.0 if r <= bound else float(bound / r))
    return out


def combine(changes: Sequence[np.ndarray], coef: Sequence[float], rule: str, trim: float = 0.2) -> np.ndarray:
    """The clients' changes of one tensor (same shape) combined by ``rule`` (float64).

    ``mean``: ``sum_i coef_i * change_i`` (``coef`` from the weights, summing to 1); ``trimmed-mean`` and
    ``median``: per coordinate, unweighted; ``krum`` is a selection (:func:`krum_select`) followed by ``mean``.
    """
    if rule in ("mean", "krum"):
        return sum(c * np.asarray(d, np.float64) for c, d in zip(coef, changes))
    stack = np.stack([np.asarray(d, np.float64) for d in changes])  # (clients, *shape)
    if rule == "median":
        return np.median(stack, axis=0)
    k = int(trim * len(changes))
    if k == 0:
        return stack.mean(axis=0)
    return np.sort(stack, axis=0)[k : len(changes) - k].mean(axis=0)


def krum_select(sq_distances: np.ndarray, f: int) -> list[int]:
    """Multi-Krum: the ``n - f`` clients whose changes are closest to their ``n - f - 2`` nearest others.

    ``sq_distances``: (n, n) squared L2 distances between the clients' whole changes. Returns sorted indices.
    """
    n = sq_distances.shape[0]
    if n < 2 * f + 3 and f > 0:
        raise ValueError(f"krum with f={f} needs at least {2 * f + 3} clients, got {n}")
    near = max(0, n - f - 2)
    scores = [float(np.sort(np.delete(sq_distances[i], i))[:near].sum()) for i in range(n)]
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[: n - f])
