"""Research aggregators measured against fedge's FedAvg path by benchmarks/federated_quality.py, not offered by the
server: TIES sign-election merging and server optimizers (FedAvgM, FedAdam). Measured there (benchmarks/README.md):
none beats example-weighted FedAvg at server lr 2, so they stay here, tested, for the next comparison.
Plain numpy on adapter arrays (``dict[str, np.ndarray]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")


def weighted_average(updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """Sum of ``weights[i] * updates[i]`` over i, weights normalized to 1; dtype of the first update."""
    if not updates:
        raise ValueError("no updates to average")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = {}
    for name, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for update, w in zip(updates, weights):
            acc += (w / total) * update[name]
        out[name] = acc.astype(first.dtype)
    return out


def sign_merge(current: Arrays, updates: Sequence[Arrays], weights: Sequence[float], keep: float = 1.0) -> Arrays:
    """Merge clients' changes by sign election (TIES-Merging, Yadav et al. 2023), not by plain averaging.

    Per tensor, each client's change ``update - current`` is trimmed to its ``keep`` fraction of largest
    magnitudes (entries tied with the smallest kept magnitude are kept too); each entry takes the sign of the
    weighted sum of the trimmed changes, and moves by the weighted mean of the changes of only the clients that
    pushed it that way. With non-IID clients and trimming, a weight that only one client's data moves is
    therefore not divided by the number of clients (as FedAvg divides it), while a change they all share is
    averaged as before. Returns absolute values like :func:`weighted_average` (apply a server learning rate
    with :func:`server_step`). Measured on the federated-quality benchmark: keep 0.3 matches FedAvg at server
    lr 2, keep 1 loses 14 points (benchmarks/README.md).
    """
    if not updates:
        raise ValueError("no updates to merge")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if min(weights) < 0 or not sum(weights) > 0:
        raise ValueError(f"weights must be >= 0 and sum to > 0, got {list(weights)}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    w = np.asarray(weights, dtype=np.float64)[:, None]  # (clients, 1)
    out = {}
    for name, ref in current.items():
        deltas = np.stack([u[name].astype(np.float64).ravel() - ref.ravel() for u in updates])  # (clients, n)
        if keep < 1:
            floor = np.quantile(np.abs(deltas), 1 - keep, axis=1, keepdims=True)  # per client
            deltas = np.where(np.abs(deltas) >= floor, deltas, 0.0)
        sign = np.sign((w * deltas).sum(axis=0))  # (n,) the elected direction
        agree = (np.sign(deltas) == sign) & (deltas != 0)  # (clients, n)
        mass = (w * agree).sum(axis=0)
        merged = np.divide((w * agree * deltas).sum(axis=0), mass, out=np.zeros_like(mass), where=mass > 0)
        out[name] = (ref.ravel() + merged).reshape(ref.shape).astype(ref.dtype)
    return out


def server_step(current: Arrays, average: Arrays, server_lr: float) -> Arrays:
    """``current + server_lr * (average - current)``: FedAvg at 1.0; above 1 it extrapolates the cohort's change.

    With non-IID clients each one's change reaches the average at 1/clients of its size; a server learning
    rate (FedOpt with SGD, Reddi et al. 2021) gives that back without more client work.
    """
    if server_lr == 1.0:
        return average
    return {k: (current[k] + server_lr * (average[k].astype(np.float64) - current[k])).astype(average[k].dtype)
            for k in average}  # fmt: skip


def server_optimizer_step(
    current: Arrays, average: Arrays, kind: str, lr: float, moments: Arrays, beta1: float = 0.9,
    beta2: float = 0.99, tau: float = 1e-3,
) -> tuple[Arrays, Arrays]:  # fmt: skip
    """One FedOpt step (Reddi et al. 2021) on the pseudo-gradient ``average - current``: (new global, new moments).

    ``sgd`` is :func:`server_step`; ``momentum`` (FedAvgM) keeps ``m = beta1 * m + delta`` and moves by
    ``lr * m``; ``adam`` (FedAdam, no bias correction as in the paper) moves each coordinate by
    ``lr * m / (sqrt(v) + tau)``, so coordinates only one client's data moves are not diluted by the others.
    ``moments`` holds ``m/<name>`` and ``v/<name>`` (empty before the first round); it is the server's state.
    """
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, got {kind!r}")
    if kind == "sgd":
        return server_step(current, average, lr), {}
    new, out = {}, {}
    for k in average:
        delta = average[k].astype(np.float64) - current[k]
        m = moments.get(f"m/{k}", np.zeros_like(delta))
        if kind == "momentum":
            m = beta1 * m + delta
            step = lr * m
        else:
            m = beta1 * m + (1 - beta1) * delta
            v = beta2 * moments.get(f"v/{k}", np.zeros_like(delta)) + (1 - beta2) * delta**2
            out[f"v/{k}"] = v.astype(np.float32)
            step = lr * m / (np.sqrt(v) + tau)
        out[f"m/{k}"] = m.astype(np.float32)
        new[k] = (current[k] + step).astype(average[k].dtype)
    return new, out
