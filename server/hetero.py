"""Heterogeneous aggregation: clients with different LoRA ranks, layer subsets and step counts. Plain numpy.

Adapters are ``dict[str, np.ndarray]`` keyed by PEFT names; a LoRA module ``M`` has ``M.lora_A.weight`` (r, in)
and ``M.lora_B.weight`` (out, r), and its weight change is ``s(r) * B @ A`` with ``s(r) = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA). The global adapter has rank ``r_max``; a client of rank ``r_i <= r_max`` starts
from `lora.for_client` and returns its trained adapter at rank ``r_i``, only for the modules it trained (and
without A if A was frozen). Two ways to combine them (``method``):

- ``"zero-pad"`` (HetLoRA, Cho et al. 2024): each client's *change* of A and B (in the global's scale) is
  zero-padded to ``r_max`` and averaged per tensor over the clients that sent it. With A frozen and shared
  (FFA-LoRA, fedge's default) the global product then moves by exactly the weighted average of the clients'
  product changes, whatever their ranks; with A trained it carries HetLoRA's cross terms.
- ``"svd"`` (FlexLoRA, Bai et al. 2024): per module, the clients' product changes ``s_i B_i A_i - start_i`` are
  averaged in weight space and the new global product is factored back to ``r_max`` by truncated SVD
  (``B = U sqrt(S)``, ``A = sqrt(S) V^T``, scale folded in). Exact up to the rank-``r_max`` truncation, never a
  dense SVD: products are kept as stacked factors and reduced by two QRs and a small SVD.

Clients that did different numbers of local steps are normalized as in FedNova (Wang et al. 2020) when
``steps`` is given: see :func:`fednova_coefficients`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedge.common.lora import A_SUFFIX as _A
from fedge.common.lora import B_SUFFIX as _B
from fedge.common.lora import check_method, client_rank, factor, for_client, lora_modules, lora_scale

Arrays = dict[str, np.ndarray]


def fednova_coefficients(weights: Sequence[float], steps: Sequence[int]) -> list[float]:
    """FedNova's multipliers ``c_i`` so that the aggregated change is ``sum_i c_i * delta_i``.

    ``c_i = p_i * tau_eff / tau_i`` with ``p_i = weights_i / sum(weights)`` and ``tau_eff = sum_i p_i tau_i``:
    each client's change is divided by its own step count (its per-step change) before averaging, then scaled
    back by the cohort's mean step count, so a device that ran 4x the steps does not pull 4x as hard.
    """
    if len(weights) != len(steps) or not weights:
        raise ValueError(f"need one step count per weight, got {len(weights)} weights and {len(steps)} steps")
    total = float(sum(weights))
    if not total > 0 or min(weights) < 0:
        raise ValueError(f"weights must be >= 0 and sum to > 0, got {list(weights)}")
    if min(steps) < 1:
        raise ValueError(f"step counts must be >= 1, got {list(steps)}")
    p = [w / total for w in weights]
    tau_eff = sum(pi * t for pi, t in zip(p, steps))
    return [pi * tau_eff / t for pi, t in zip(p, steps)]


def fednova(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], steps: Sequence[int]) -> Arrays:
    """``(sum_i p_i tau_i) * sum_i p_i delta_i / tau_i``: the FedNova aggregate of same-shaped deltas (float32)."""
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    coef = fednova_coefficients(weights, steps)
    return {
        k: sum(c * np.asarray(d[k], np.float64) for c, d in zip(coef, deltas)).astype(np.float32) for k in deltas[0]
    }


def aggregate(
    global_arrays: Mapping[str, np.ndarray],
    clients: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    alpha: float,
    method: str = "zero-pad",
    steps: Sequence[int] | None = None,
    server_lr: float = 1.0,
    rslora: bool = False,
) -> Arrays:
    """The new global adapter at r_max from clients' trained adapters of mixed ranks and layer subsets.

    ``clients[i]``: client i's adapter after training (absolute values, its own rank and scale, as it started
    from :func:`for_client` with the same ``method``), holding only the tensors it trained; a module sent without
    its A (frozen) uses the A it started from. Each tensor/module moves by ``server_lr * sum_i c_i * change_i``
    over the clients that sent it, ``c_i`` the weights normalized over those clients (FedNova-adjusted with
    ``steps``). Tensors nobody sent keep their global value. ValueError naming the client and tensor for unknown
    tensors, ranks above r_max and shape mismatches.
    """
    check_method(method)
    if len(clients) != len(weights) or (steps is not None and len(steps) != len(clients)):
        raise ValueError(f"{len(clients)} clients, {len(weights)} weights, {len(steps or clients)} step counts")
    ranks = [_validate(global_arrays, c, i) for i, c in enumerate(clients)]
    by_rank = {r: for_client(global_arrays, r, alpha, method, rslora) for r in set(ranks) if r}
    starts = [by_rank.get(r, {}) for r in ranks]
    out = {k: np.array(v, copy=True) for k, v in global_arrays.items()}
    for key in global_arrays:
        if key.endswith((_A, _B)):
            continue
        senders = [i for i, c in enumerate(clients) if key in c]
        coef = _coefficients(senders, weights, steps)
        change = sum(c * (np.asarray(clients[i][key], np.float64) - global_arrays[key]) for i, c in zip(senders, coef))
        if senders:
            out[key] = (global_arrays[key] + server_lr * change).astype(global_arrays[key].dtype)
    for mod in lora_modules(global_arrays):
        senders = [i for i, c in enumerate(clients) if mod + _A in c or mod + _B in c]
        if not senders:
            continue
        coef = _coefficients(senders, weights, steps)
        merge = _merge_zero_pad if method == "zero-pad" else _merge_svd
        a, b = merge(global_arrays, mod, [clients[i] for i in senders], [starts[i] for i in senders],
                     [ranks[i] for i in senders], coef, alpha, server_lr, rslora)  # fmt: skip
        out[mod + _A] = a.astype(global_arrays[mod + _A].dtype)
        out[mod + _B] = b.astype(global_arrays[mod + _B].dtype)
    return out


# --- internals ------------------------------------------------------------------------------------------------


def _coefficients(senders: list[int], weights: Sequence[float], steps: Sequence[int] | None) -> list[float]:
    if not senders:
        return []
    w = [float(weights[i]) for i in senders]
    if steps is None:
        total = sum(w)
        if not total > 0:
            raise ValueError(f"weights of clients {senders} sum to {total}: must be > 0")
        return [x / total for x in w]
    return fednova_coefficients(w, [int(steps[i]) for i in senders])


def _validate(global_arrays: Mapping[str, np.ndarray], client: Mapping[str, np.ndarray], i: int) -> int:
    """Client i's rank (0 if it sent no LoRA tensor); ValueError naming the client and tensor if it does not fit."""
    for key, a in client.items():
        if key not in global_arrays:
            raise ValueError(f"client {i}: tensor {key} is not in the global adapter")
        g = global_arrays[key]
        rank_axis = 0 if key.endswith(_A) else 1 if key.endswith(_B) else None
        same = [d for ax, d in enumerate(g.shape) if ax != rank_axis]
        if a.ndim != g.ndim or [d for ax, d in enumerate(a.shape) if ax != rank_axis] != same:
            raise ValueError(f"client {i}: tensor {key} has shape {a.shape}, expected {g.shape} up to the rank")
        if not np.isfinite(a).all():
            raise ValueError(f"client {i}: tensor {key} has non-finite values")
    if not lora_modules(client):
        return 0
    try:
        rank = client_rank(client)
    except ValueError as e:
        raise ValueError(f"client {i}: {e}") from None
    r_max = client_rank({k: v for k, v in global_arrays.items() if k.endswith((_A, _B))})
    if rank > r_max:
        raise ValueError(f"client {i}: rank {rank} above the global adapter's {r_max}")
    return rank


def _client_factors(client: Mapping, start: Mapping, mod: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) the client ended with: what it sent, else what it started from (frozen A)."""
    return np.asarray(client.get(mod + _A, start[mod + _A])), np.asarray(client.get(mod + _B, start[mod + _B]))


def _merge_zero_pad(global_arrays, mod, clients, starts, ranks, coef, alpha, server_lr, rslora):
    a_g, b_g = global_arrays[mod + _A].astype(np.float64), global_arrays[mod + _B].astype(np.float64)
    s_max = lora_scale(alpha, a_g.shape[0], rslora)
    new_a, new_b = a_g.copy(), b_g.copy()
    for client, start, r, c in zip(clients, starts, ranks, coef):
        a, b = _client_factors(client, start, mod)
        new_a[:r] += server_lr * c * (a - a_g[:r])  # zero-padded change: rows >= r untouched
        new_b[:, :r] += server_lr * c * (b * (lora_scale(alpha, r, rslora) / s_max) - b_g[:, :r])  # in global scale
    return new_a, new_b


def _merge_svd(global_arrays, mod, clients, starts, ranks, coef, alpha, server_lr, rslora):
    """New product = global + lr * sum_i c_i (s_i B_i A_i - s_i B0_i A0_i), refactored to r_max."""
    a_g, b_g = global_arrays[mod + _A], global_arrays[mod + _B]
    r_max = a_g.shape[0]
    lefts, rights = [b_g * lora_scale(alpha, r_max, rslora)], [a_g]  # the product as sum of L_k @ R_k
    for client, start, r, c in zip(clients, starts, ranks, coef):
        a, b = _client_factors(client, start, mod)
        s = server_lr * c * lora_scale(alpha, r, rslora)
        lefts += [s * b, -s * start[mod + _B]]
        rights += [a, start[mod + _A]]
    return factor(lefts, rights, r_max, lora_scale(alpha, r_max, rslora), fill=a_g)[::-1]


def from_reply(
    arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray], alpha: float, method: str = "zero-pad"
) -> tuple:
    """A client's reply -> (its trained tensors at its own rank, the RMS of its change); ValueError: why not.

    The RMS is over the entries the client changed, so clients that train a small part of the adapter (a low rank,
    a few layers) and clients that train all of it are comparable for the norm-outlier check.

    A reply is either the whole adapter at the global's shapes (fp32) or an encoded change
    (`fedge.quantization.codecs`) of the tensors the client trained, at its rank, relative to
    ``for_client(global, rank, alpha, method)``. Checks names, shapes and finite values.
    """
    from fedge.quantization.codecs import HEADER_KEY, Encoded, decode
    from fedge.server.aggregate import check_update, delta_norm

    if HEADER_KEY not in arrays:
        reason = check_update(dict(arrays), dict(global_arrays))
        if reason:
            raise ValueError(reason)
        changed = sum(int(np.count_nonzero(arrays[k] != global_arrays[k])) for k in global_arrays)
        return dict(arrays), delta_norm(dict(arrays), dict(global_arrays)) / math.sqrt(max(1, changed))
    encoded = Encoded.from_arrays(arrays)
    for name, shape, _ in encoded.tensors():  # before decoding: a header must not make the server allocate
        ref = global_arrays.get(name)
        if ref is None:
            raise ValueError(f"wrong keys: unexpected {name}")
        if len(shape) != ref.ndim or any(int(n) > r for n, r in zip(shape, ref.shape)):
            raise ValueError(f"wrong shape for {name}: {shape}, expected at most {tuple(ref.shape)}")
    delta = decode(encoded)
    if not delta:
        raise ValueError("the update changes no tensor")
    start = for_client(global_arrays, client_rank(delta), alpha, method)
    for name, d in delta.items():
        if name not in start:
            raise ValueError(f"wrong keys: unexpected {name}")
        if d.shape != start[name].shape:
            raise ValueError(f"wrong shape for {name}: {tuple(d.shape)}, expected {tuple(start[name].shape)}")
        if not np.isfinite(d).all():
            raise ValueError(f"non-finite values (NaN or Inf) in {name}")
    norm = float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in delta.values())))
    size = sum(int(np.count_nonzero(d)) for d in delta.values())
    return {k: (start[k] + d).astype(start[k].dtype) for k, d in delta.items()}, norm / math.sqrt(max(1, size))
