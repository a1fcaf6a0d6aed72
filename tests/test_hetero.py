"""Heterogeneous aggregation: mixed ranks, layer subsets, FedNova step normalization, truncation."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.common.lora import client_rank, for_client, lora_modules, lora_scale
from fedge.server.hetero import aggregate, fednova, fednova_coefficients

ALPHA = 16.0
OUT, IN = 12, 10  # (out, in) of every toy module
MODS = ["m.layers.0.q_proj", "m.layers.1.q_proj"]


def adapter(rank: int, seed: int, b_zero: bool = False, mods=MODS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for m in mods:
        out[m + ".lora_A.weight"] = rng.normal(size=(rank, IN)).astype(np.float32)  # (r, in)
        b = np.zeros((OUT, rank)) if b_zero else rng.normal(size=(OUT, rank))
        out[m + ".lora_B.weight"] = b.astype(np.float32)  # (out, r)
    return out


def product(arrays: dict, mod: str, rslora: bool = False) -> np.ndarray:
    """The module's weight change s(r) * B @ A, (out, in), float64."""
    a, b = arrays[mod + ".lora_A.weight"].astype(np.float64), arrays[mod + ".lora_B.weight"].astype(np.float64)
    return lora_scale(ALPHA, a.shape[0], rslora) * b @ a


def best_rank(dense: np.ndarray, r: int) -> np.ndarray:
    """Eckart-Young: the best rank-r approximation of a dense (out, in) matrix."""
    u, s, vt = np.linalg.svd(dense)
    return (u[:, :r] * s[:r]) @ vt[:r]


def train_b(start: dict, seed: int, mods=MODS) -> dict[str, np.ndarray]:
    """A client that trained B only (A frozen): sends its new B, not A."""
    rng = np.random.default_rng(seed)
    return {m + ".lora_B.weight": start[m + ".lora_B.weight"] + rng.normal(size=start[m + ".lora_B.weight"].shape)
            .astype(np.float32) for m in mods}  # fmt: skip


def train_ab(start: dict, seed: int, mods=MODS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()
            if any(k.startswith(m + ".") for m in mods)}  # fmt: skip


def test_keys_and_ranks() -> None:
    g = adapter(8, 0)
    assert lora_modules(g) == MODS
    assert client_rank(g) == 8
    with pytest.raises(ValueError, match=r"ranks \[4, 8\]"):
        client_rank({**g, MODS[0] + ".lora_A.weight": np.zeros((4, IN), np.float32)})


def test_fednova_two_clients_by_hand() -> None:
    """p = (0.25, 0.75), tau = (2, 8): per step (0.125, 0.09375), normalized to sum 1: (4/7, 3/7). FedNova's own
    tau_eff = 6.5 would make them (0.8125, 0.609375): 1.42x the change, which fedge does not allow."""
    assert fednova_coefficients([1, 3], [2, 8]) == pytest.approx([4 / 7, 3 / 7])
    assert sum(fednova_coefficients([1, 1], [1, 15])) == pytest.approx(1.0)  # a 1-step claim amplifies nothing
    d1, d2 = {"w": np.array([2.0, 0.0], np.float32)}, {"w": np.array([0.0, 8.0], np.float32)}
    got = fednova([d1, d2], [1, 3], [2, 8])["w"]
    assert got == pytest.approx([8 / 7, 24 / 7])  # 4/7 * [2, 0] + 3/7 * [0, 8]: per step, equal pulls
    # plain FedAvg would give [0.5, 6.0]: the 8-step client's 4x longer walk would dominate
    assert fednova_coefficients([1, 1], [5, 5]) == pytest.approx([0.5, 0.5])  # equal steps: FedAvg
    with pytest.raises(ValueError, match="step counts must be >= 1"):
        fednova_coefficients([1, 1], [0, 3])


@pytest.mark.parametrize("method", ["zero-pad", "svd"])
def test_mixed_ranks_frozen_a_round_one_is_the_exact_product_average(method: str) -> None:
    """Round 1 (B = 0), shared frozen A, ranks 2/4/8: both methods give the weighted average of B_i A_i products.

    zero-pad is exact for any ranks here; svd is exact because the average's rank (<= 8) fits r_max = 8.
    """
    g = adapter(8, 0, b_zero=True)
    ranks, weights = [2, 4, 8], [1.0, 2.0, 5.0]
    clients = [train_b(for_client(g, r, ALPHA, method), seed=10 + i) for i, r in enumerate(ranks)]
    new = aggregate(g, clients, weights, ALPHA, method=method)
    for m in MODS:
        want = sum(w * product({**for_client(g, r, ALPHA, method), **c}, m) for r, c, w in zip(ranks, clients, weights))
        assert np.allclose(product(new, m), want / sum(weights), atol=1e-4)
    assert new[MODS[0] + ".lora_B.weight"].shape == (OUT, 8) and new[MODS[0] + ".lora_A.weight"].shape == (8, IN)
    if method == "zero-pad":  # A is frozen and shared: it stays
        assert np.array_equal(new[MODS[0] + ".lora_A.weight"], g[MODS[0] + ".lora_A.weight"])


def test_zero_pad_equal_ranks_trained_a_is_fedavg() -> None:
    """Equal ranks, A and B trained: zero-padding is plain FedAvg of each tensor."""
    g = adapter(4, 0)
    clients = [train_ab(g, 1), train_ab(g, 2)]
    new = aggregate(g, clients, [1, 3], ALPHA, method="zero-pad")
    for k in g:
        assert np.allclose(new[k], 0.25 * clients[0][k] + 0.75 * clients[1][k], atol=1e-6)


def test_svd_matches_the_best_rank_r_of_the_dense_average() -> None:
    """Trained A and B, ranks 4 and 8 (average of rank up to 12 > r_max = 8): Eckart-Young truncation of the dense
    average, from a non-zero global (change form: global + sum c_i (P_i - P_start_i))."""
    g = adapter(8, 0)
    ranks, weights = [4, 8], [2.0, 1.0]
    starts = [for_client(g, r, ALPHA, "svd") for r in ranks]
    clients = [train_ab(s, 20 + i) for i, s in enumerate(starts)]
    new = aggregate(g, clients, weights, ALPHA, method="svd")
    for m in MODS:
        dense = product(g, m) + sum(
            w / 3 * (product(c, m) - product(s, m)) for c, s, w in zip(clients, starts, weights)
        )
        assert np.allclose(product(new, m), best_rank(dense, 8), atol=1e-3)


def test_svd_with_full_rank_average_is_exact() -> None:
    """Ranks 2 and 3 from a zero-B global: the average has rank <= 5 <= r_max, so nothing is truncated."""
    g = adapter(8, 0, b_zero=True)
    clients = [train_ab(for_client(g, 2, ALPHA, "svd"), 1), train_ab(for_client(g, 3, ALPHA, "svd"), 2)]
    new = aggregate(g, clients, [1, 1], ALPHA, method="svd")
    starts = [for_client(g, r, ALPHA, "svd") for r in (2, 3)]
    for m in MODS:
        want = product(g, m) + sum(0.5 * (product(c, m) - product(s, m)) for c, s in zip(clients, starts))
        assert np.allclose(product(new, m), want, atol=1e-4)
    # spare rank slots keep live A rows (B columns zero), so a frozen-A client can still learn there
    assert np.all(np.linalg.norm(new[MODS[0] + ".lora_A.weight"], axis=1) > 0)


def test_layer_subsets_average_only_over_contributors() -> None:
    g = adapter(4, 0)
    c0 = train_ab(g, 1, mods=MODS)  # both layers
    c1 = train_ab(g, 2, mods=MODS[:1])  # layer 0 only
    for method in ("zero-pad", "svd"):
        new = aggregate(g, [c0, c1], [1, 1], ALPHA, method=method)
        # layer 1: only client 0 trained it, so it is client 0's layer 1, not half of it
        assert np.allclose(product(new, MODS[1]), product(c0, MODS[1]), atol=1e-4)
        want0 = 0.5 * (product(c0, MODS[0]) + product(c1, MODS[0]))
        if method == "svd":  # a trained A: svd averages the products (rank 8), then truncates to r_max = 4
            assert np.allclose(product(new, MODS[0]), best_rank(want0, 4), atol=1e-4)
        else:
            k = MODS[0] + ".lora_B.weight"
            assert np.allclose(new[k], 0.5 * (c0[k] + c1[k]), atol=1e-6)
    untouched = aggregate(g, [train_b(g, 3, mods=MODS[:1])], [1], ALPHA)
    assert all(
        np.array_equal(untouched[m + s], g[m + s]) for m in MODS[1:] for s in (".lora_A.weight", ".lora_B.weight")
    )


def test_fednova_steps_in_aggregate() -> None:
    g = adapter(4, 0, b_zero=True)
    c0, c1 = train_b(g, 1), train_b(g, 2)
    new = aggregate(g, [c0, c1], [1, 3], ALPHA, steps=[2, 8])
    k = MODS[0] + ".lora_B.weight"
    assert np.allclose(new[k], 4 / 7 * c0[k] + 3 / 7 * c1[k], atol=1e-5)


def test_server_lr_scales_the_change() -> None:
    g = adapter(4, 0)
    c = train_b(g, 1)
    new = aggregate(g, [c], [1], ALPHA, server_lr=2.0)
    k = MODS[0] + ".lora_B.weight"
    assert np.allclose(new[k], g[k] + 2 * (c[k] - g[k]), atol=1e-5)


def test_for_client_zero_pad_slices_in_the_clients_scale() -> None:
    g = adapter(8, 0)
    c = for_client(g, 4, ALPHA, "zero-pad")
    m = MODS[0]
    assert c[m + ".lora_A.weight"].shape == (4, IN) and c[m + ".lora_B.weight"].shape == (OUT, 4)
    assert np.array_equal(c[m + ".lora_A.weight"], g[m + ".lora_A.weight"][:4])
    # the client's product equals the global's first 4 rank components, whatever the scale alpha / r
    a, b = g[m + ".lora_A.weight"].astype(np.float64), g[m + ".lora_B.weight"].astype(np.float64)
    assert np.allclose(product(c, m), lora_scale(ALPHA, 8) * b[:, :4] @ a[:4], atol=1e-4)
    assert for_client(g, 8, ALPHA)[m + ".lora_B.weight"] == pytest.approx(g[m + ".lora_B.weight"])


def test_for_client_svd_is_the_best_rank_r_approximation() -> None:
    g = adapter(8, 0)
    m = MODS[0]
    for rslora in (False, True):
        c = for_client(g, 3, ALPHA, "svd", rslora=rslora)
        assert np.allclose(product(c, m, rslora), best_rank(product(g, m, rslora), 3), atol=1e-4)
    zero = adapter(8, 0, b_zero=True)  # round 0: nothing to approximate, keep the shared A
    assert np.array_equal(for_client(zero, 3, ALPHA, "svd")[m + ".lora_A.weight"], zero[m + ".lora_A.weight"][:3])


def test_errors_name_the_client_and_tensor() -> None:
    g = adapter(4, 0)
    with pytest.raises(ValueError, match="client 1: tensor x.lora_B.weight is not in the global adapter"):
        aggregate(g, [train_b(g, 1), {"x.lora_B.weight": np.zeros((OUT, 4), np.float32)}], [1, 1], ALPHA)
    with pytest.raises(ValueError, match="client 0: rank 6 above the global adapter's 4"):
        aggregate(g, [adapter(6, 1)], [1], ALPHA)
    with pytest.raises(ValueError, match=r"client 0: tensor m.layers.0.q_proj.lora_B.weight has shape \(5, 4\)"):
        aggregate(g, [{MODS[0] + ".lora_B.weight": np.zeros((5, 4), np.float32)}], [1], ALPHA)
    with pytest.raises(ValueError, match="unknown heterogeneous aggregation method 'mean'"):
        aggregate(g, [g], [1], ALPHA, method="mean")
    with pytest.raises(ValueError, match="client rank 9 outside 1..4"):
        for_client(g, 9, ALPHA)


def test_svd_global_is_in_svd_form_so_clients_get_slices() -> None:
    """After an svd round the global's top-r slice is its best rank-r approximation (no recomputation needed)."""
    from fedge.common.lora import svd_form as _svd_form

    g = adapter(8, 0)
    new = aggregate(g, [train_ab(g, 1), train_ab(g, 2)], [1, 1], ALPHA, method="svd")
    m = MODS[0]
    assert _svd_form(new[m + ".lora_A.weight"], new[m + ".lora_B.weight"], tol=1e-4)
    assert not _svd_form(g[m + ".lora_A.weight"], g[m + ".lora_B.weight"])
    sliced = for_client(new, 3, ALPHA, "zero-pad")
    assert np.allclose(product(sliced, m), best_rank(product(new, m), 3), atol=1e-3)


def test_from_reply_takes_a_lower_rank_encoded_change_and_refuses_bad_headers():
    from fedge.quantization.codecs import Encoded, encode
    from fedge.server.hetero import from_reply

    global_arrays = adapter(rank=4, seed=0)
    start = for_client(global_arrays, 2, alpha=8.0)
    delta = {k: np.full_like(v, 0.01) for k, v in start.items() if k.endswith("lora_B.weight")}
    update, rms = from_reply(encode(delta, "fp16").to_arrays(), global_arrays, alpha=8.0)
    # its RMS as the change lands in the rank-4 global: B scaled by s(2) / s(4) = 2
    assert set(update) == set(delta) and rms == pytest.approx(0.02, rel=1e-3)
    for k, v in update.items():  # the client's tensors at its own rank: where it started plus its change
        np.testing.assert_allclose(v, start[k] + 0.01, atol=1e-4)

    encoded = encode(delta, "topk:0.5+int8")
    name = encoded.header["tensors"][0][0]
    encoded.header["tensors"][0][1] = [10**6, 10**6]  # a header that would make the server allocate 4 TB
    with pytest.raises(ValueError, match=f"wrong shape for {name}"):
        from_reply(Encoded(encoded.header, encoded.arrays).to_arrays(), global_arrays, alpha=8.0)
    encoded.header["tensors"][0][0] = "not.a.lora.weight"
    with pytest.raises(ValueError, match="unexpected not.a.lora.weight"):
        from_reply(Encoded(encoded.header, encoded.arrays).to_arrays(), global_arrays, alpha=8.0)
