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
from fedge.server import robust

Arrays = dict[str, np.ndarray]


def fednova_coefficients(weights: Sequence[float], steps: Sequence[int]) -> list[float]:
    """FedNova's per-step weighting, normalized: ``c_i = (p_i / tau_i) / sum_j (p_j / tau_j)``.

    ``p_i = weights_i / sum(weights)``. Each client's change is taken per local step before averaging, so a
    device that ran 4x the steps does not pull 4x as hard. FedNova (Wang et al. 2020) then scales the average by
    ``tau_eff = sum_i p_i tau_i``; that factor amplifies every change whenever the step counts differ (a client
    that claims 1 step against its peers' 15 makes it 8) and a server cannot check step counts, so fedge keeps
    the coefficients summing to 1: the global moves like a client of the harmonic mean step count, never more
    than the largest honest change.
    """
    if len(weights) != len(steps) or not weights:
        raise ValueError(f"need one step count per weight, got {len(weights)} weights and {len(steps)} steps")
    total = float(sum(weights))
    if not total > 0 or min(weights) < 0:
        raise ValueError(f"weights must be >= 0 and sum to > 0, got {list(weights)}")
    if min(steps) < 1:
        raise ValueError(f"step counts must be >= 1, got {list(steps)}")
    per_step = [w / total / t for w, t in zip(weights, steps)]
    norm = sum(per_step)
    return [x / norm for x in per_step]


def fednova(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], steps: Sequence[int]) -> Arrays:
    """``sum_i c_i delta_i`` with :func:`fednova_coefficients`: the step-normalized average of same-shaped deltas."""
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
    max_share: float = 1.0,
    rule: str = "mean",
    trim: float = 0.2,
    krum_f: int = 1,
) -> Arrays:
    """The new global adapter at r_max from clients' trained adapters of mixed ranks and layer subsets.

    ``clients[i]``: client i's adapter after training (absolute values, its own rank and scale, as it started
    from :func:`for_client` with the same ``method``), holding only the tensors it trained; a module sent without
    its A (frozen) uses the A it started from. Each tensor/module moves by ``server_lr`` times the clients' changes
    combined by ``rule`` (`fedge.server.robust`): ``mean`` weights them by ``c_i``, the weights normalized over the
    clients that sent the tensor (step-normalized with ``steps``), no share above ``max_share``. Tensors nobody
    sent keep their global value. ValueError naming the client and tensor for unknown tensors, ranks above r_max
    and shape mismatches, and for a robust rule with the svd merge.
    """
    check_method(method)
    robust.check_rule(rule, trim, krum_f)
    if rule != "mean" and method != "zero-pad":
        raise ValueError(f"the {rule} rule combines changes coordinate by coordinate: it needs the zero-pad merge")
    if len(clients) != len(weights) or (steps is not None and len(steps) != len(clients)):
        raise ValueError(f"{len(clients)} clients, {len(weights)} weights, {len(steps or clients)} step counts")
    ranks = [_validate(global_arrays, c, i) for i, c in enumerate(clients)]
    by_rank = {r: for_client(global_arrays, r, alpha, method, rslora) for r in set(ranks) if r}
    starts = [by_rank.get(r, {}) for r in ranks]
    if rule == "krum":  # with fewer clients than 2f + 3 (the checks rejected some), tolerate what the cohort allows
        f = min(krum_f, max(0, (len(clients) - 3) // 2))
        keep = robust.krum_select(_distances(global_arrays, clients, starts, ranks, alpha, rslora), f)
        return aggregate(
            global_arrays, [clients[i] for i in keep], [weights[i] for i in keep], alpha, method,
            None if steps is None else [steps[i] for i in keep], server_lr, rslora, max_share,
        )  # fmt: skip
    out = {k: np.array(v, copy=True) for k, v in global_arrays.items()}
    for key in global_arrays:
        if key.endswith((_A, _B)):
            continue
        senders = [i for i, c in enumerate(clients) if key in c]
        if senders:
            coef = _coefficients(senders, weights, steps, max_share)
            changes = [np.asarray(clients[i][key], np.float64) - global_arrays[key] for i in senders]
            change = robust.combine(changes, coef, rule, trim)
            out[key] = (global_arrays[key] + server_lr * change).astype(global_arrays[key].dtype)
    for mod in lora_modules(global_arrays):
        senders = [i for i, c in enumerate(clients) if mod + _A in c or mod + _B in c]
        if not senders:
            continue
        coef = _coefficients(senders, weights, steps, max_share)
        picked = [clients[i] for i in senders], [starts[i] for i in senders], [ranks[i] for i in senders]
        if method == "zero-pad":
            changes = _padded_changes(global_arrays, mod, *picked, alpha, rslora)
            a = global_arrays[mod + _A] + server_lr * robust.combine([da for da, _ in changes], coef, rule, trim)
            b = global_arrays[mod + _B] + server_lr * robust.combine([db for _, db in changes], coef, rule, trim)
        else:
            a, b = _merge_svd(global_arrays, mod, *picked, coef, alpha, server_lr, rslora)
        out[mod + _A] = a.astype(global_arrays[mod + _A].dtype)
        out[mod + _B] = b.astype(global_arrays[mod + _B].dtype)
    return out


# --- internals ------------------------------------------------------------------------------------------------


def _coefficients(
    senders: list[int], weights: Sequence[float], steps: Sequence[int] | None, max_share: float
) -> list[float]:
    """The senders' shares of one tensor's change: their weights normalized over them (step-normalized with
    ``steps``), none above ``max_share`` of the round's clients (`robust.cap_shares`)."""
    if not senders:
        return []
    w = [float(weights[i]) for i in senders]
    if steps is None:
        total = sum(w)
        if not total > 0:
            raise ValueError(f"weights of clients {senders} sum to {total}: must be > 0")
        shares = [x / total for x in w]
    else:
        shares = fednova_coefficients(w, [int(steps[i]) for i in senders])
    return robust.cap_shares(shares, max_share, clients=len(weights))


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


def _padded_changes(global_arrays, mod, clients, starts, ranks, alpha, rslora) -> list[tuple[np.ndarray, ...]]:
    """Each client's (change of A, change of B) in the global's shapes and scale: rows/columns >= its rank zero."""
    a_g, b_g = global_arrays[mod + _A].astype(np.float64), global_arrays[mod + _B].astype(np.float64)
    s_max = lora_scale(alpha, a_g.shape[0], rslora)
    out = []
    for client, start, r in zip(clients, starts, ranks):
        a, b = _client_factors(client, start, mod)
        da, db = np.zeros_like(a_g), np.zeros_like(b_g)
        da[:r] = a - a_g[:r]  # (r, in) of (r_max, in)
        db[:, :r] = b * (lora_scale(alpha, r, rslora) / s_max) - b_g[:, :r]  # (out, r) of (out, r_max)
        out.append((da, db))
    return out


def _distances(global_arrays, clients, starts, ranks, alpha, rslora) -> np.ndarray:
    """(n, n) squared L2 distances between the clients' whole changes in the global's coordinates (zero-pad)."""
    n = len(clients)
    flat = [[] for _ in range(n)]
    for key in global_arrays:
        if not key.endswith((_A, _B)):
            for i, c in enumerate(clients):
                flat[i].append((np.asarray(c[key], np.float64) - global_arrays[key]).ravel() if key in c else
                               np.zeros(global_arrays[key].size))  # fmt: skip
    for mod in lora_modules(global_arrays):
        sent = [i for i, c in enumerate(clients) if mod + _A in c or mod + _B in c]
        picked = [clients[i] for i in sent], [starts[i] for i in sent], [ranks[i] for i in sent]
        changes = dict(zip(sent, _padded_changes(global_arrays, mod, *picked, alpha, rslora)))
        size = global_arrays[mod + _A].size + global_arrays[mod + _B].size
        for i in range(n):
            flat[i].append(np.concatenate([d.ravel() for d in changes[i]]) if i in changes else np.zeros(size))
    vectors = np.stack([np.concatenate(f) for f in flat])  # (n, adapter entries)
    sq = np.sum(vectors**2, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * vectors @ vectors.T, 0.0)


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
    # The change as it lands in the global adapter: a rank-r client's B is scaled by s(r) / s(r_max) there, so
    # its RMS is judged at that size (a low rank must not carry a larger change past the norm bounds).
    rank = client_rank(delta) if lora_modules(delta) else 0
    r_max = client_rank({k: v for k, v in global_arrays.items() if k.endswith((_A, _B))}) if rank else 0
    to_global = lora_scale(alpha, rank) / lora_scale(alpha, r_max) if rank else 1.0
    landed = {k: d.astype(np.float64) * (to_global if k.endswith(_B) else 1.0) for k, d in delta.items()}
    norm = float(np.sqrt(sum(np.sum(d**2) for d in landed.values())))
    size = sum(int(np.count_nonzero(d)) for d in delta.values())
    return {k: (start[k] + d).astype(start[k].dtype) for k, d in delta.items()}, norm / math.sqrt(max(1, size))
