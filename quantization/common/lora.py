"""LoRA factor math both sides need: scales, ranks, and the global adapter cut to a client's rank. Plain numpy.

Adapters are ``dict[str, np.ndarray]`` keyed by PEFT names; a LoRA module ``M`` has ``M.lora_A.weight`` (r, in)
and ``M.lora_B.weight`` (out, r), and its weight change is ``s(r) * B @ A`` with ``s(r) = alpha / r`` (or
``alpha / sqrt(r)`` with rsLoRA). A client of rank ``r_i <= r_max`` starts from :func:`for_client`; the server
merges what it sends back (`fedge.server.hetero`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = dict[str, np.ndarray]
METHODS = ("zero-pad", "svd")  # how mixed ranks are cut and merged: HetLoRA's zero-padding or FlexLoRA's SVD
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's scaling of ``B @ A``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_modules(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The LoRA module prefixes in ``arrays`` (a key ``M.lora_A.weight`` or ``M.lora_B.weight`` gives ``M``)."""
    mods = {k[: -len(A_SUFFIX)] for k in arrays if k.endswith(A_SUFFIX)} | {
        k[: -len(B_SUFFIX)] for k in arrays if k.endswith(B_SUFFIX)
    }
    return sorted(mods)


def client_rank(arrays: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of an adapter (A's rows, B's columns); ValueError if its modules disagree or it has none."""
    ranks = {a.shape[0] for k, a in arrays.items() if k.endswith(A_SUFFIX)}
    ranks |= {a.shape[1] for k, a in arrays.items() if k.endswith(B_SUFFIX)}
    if len(ranks) != 1:
        raise ValueError(f"adapter has LoRA ranks {sorted(ranks)}: expected exactly one")
    return ranks.pop()


def for_client(
    global_arrays: Mapping[str, np.ndarray], rank: int, alpha: float, method: str = "zero-pad", rslora: bool = False
) -> Arrays:
    """The global adapter (rank r_max) cut to a client's ``rank``, in the client's scale ``s(rank)``.

    ``"zero-pad"``: the first ``rank`` columns of B / rows of A. ``"svd"``: the best rank-``rank`` approximation of
    each module's product (Eckart-Young). That is a slice too when the module is already in the balanced SVD form
    that ``aggregate(method="svd")`` returns (checked on r x r Gram matrices), or when its product is zero (round 0:
    B = 0, so the client keeps the shared A of the seeded init); otherwise it costs two QRs per module.
    """
    check_method(method)
    out = {k: np.array(v, copy=True) for k, v in global_arrays.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}
    for mod in lora_modules(global_arrays):
        a, b = global_arrays[mod + A_SUFFIX], global_arrays[mod + B_SUFFIX]  # (r_max, in), (out, r_max)
        r_max = a.shape[0]
        if not 1 <= rank <= r_max:
            raise ValueError(f"{mod}: client rank {rank} outside 1..{r_max}")
        s_max, s_r = lora_scale(alpha, r_max, rslora), lora_scale(alpha, rank, rslora)
        if method == "svd" and rank < r_max and np.any(b) and not svd_form(a, b):
            b_r, a_r = factor([b * s_max], [a], rank, s_r, fill=a)
        else:
            b_r, a_r = b[:, :rank] * (s_max / s_r), a[:rank]
        out[mod + A_SUFFIX], out[mod + B_SUFFIX] = a_r.astype(a.dtype), b_r.astype(b.dtype)
    return out


# --- internals (the server's SVD merge uses them too) ---------------------------------------------------


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown heterogeneous aggregation method {method!r}; known: {', '.join(METHODS)}")


def svd_form(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> bool:
    """Whether ``B @ A`` is factored as ``U sqrt(S), sqrt(S) V^T`` (S descending): then slicing is SVD truncation."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    g_a, g_b = a @ a.T, b.T @ b  # (r, r): both diag(S) / scale in that form
    d = np.diag(g_b)
    scale = max(float(d.max(initial=0.0)), 1e-30)
    off = np.abs(g_b - np.diag(d)).max(initial=0.0) + np.abs(g_a - np.diag(np.diag(g_a))).max(initial=0.0)
    balanced = np.abs(np.diag(g_a) - d).max(initial=0.0)
    return bool(off <= tol * scale and balanced <= tol * scale and np.all(np.diff(d) <= tol * scale))


def factor(lefts: list, rights: list, r: int, scale: float, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B (out, r), A (r, in)) with ``scale * B @ A`` the best rank-r approximation of ``sum_k L_k @ R_k``.

    Two QRs and an SVD of a K x K matrix (K = total inner dimension), never the dense (out, in) product. If the
    product's rank is below r, the spare rows of A come from ``fill`` (their B columns are zero, so the product
    is unchanged, and a client training only B still has live directions).
    """
    left = np.hstack([np.asarray(x, np.float64) for x in lefts])  # (out, K)
    right = np.vstack([np.asarray(x, np.float64) for x in rights])  # (K, in)
    q_l, r_l = np.linalg.qr(left)  # (out, k1), (k1, K)
    q_r, r_r = np.linalg.qr(right.T)  # (in, k2), (k2, K)
    u, s, vt = np.linalg.svd(r_l @ r_r.T)  # (k1, k1), (min,), (k2, k2)
    keep = min(r, s.size)
    root = np.sqrt(s[:keep] / scale)
    b = np.zeros((left.shape[0], r))
    a = np.array(fill[:r], dtype=np.float64, copy=True)  # (r, in)
    b[:, :keep] = (q_l @ u[:, :keep]) * root  # (out, keep)
    a[:keep] = root[:, None] * (vt[:keep] @ q_r.T)  # (keep, in)
    live = int(np.count_nonzero(s[:keep] > (s[0] * 1e-10 if s.size else 0.0)))
    a[live:keep], b[:, live:keep] = fill[live:keep], 0.0  # numerically-zero directions: keep the old A rows
    return b, a
