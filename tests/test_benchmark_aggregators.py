"""The research aggregators benchmarks/federated_quality.py measures against FedAvg (benchmarks/aggregators.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import aggregators


def _ref():
    return {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}


def test_weighted_average_is_exact():
    u1 = {"a": np.full((2, 3), 1.0, np.float32), "b": np.array([1, 2, 3], np.float32)}
    u2 = {"a": np.full((2, 3), 4.0, np.float32), "b": np.array([4, 5, 6], np.float32)}
    avg = aggregators.weighted_average([u1, u2], [1, 2])  # weights normalize to 1/3, 2/3
    np.testing.assert_allclose(avg["a"], np.full((2, 3), 3.0))
    np.testing.assert_allclose(avg["b"], [3, 4, 5])
    assert avg["a"].dtype == np.float32


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError, match="sum to > 0"):
        aggregators.weighted_average([_ref()], [0])
    with pytest.raises(ValueError, match="no updates"):
        aggregators.weighted_average([], [])


def test_server_step_extrapolates_the_average_change():
    current = {"b": np.zeros(3, np.float32)}
    average = {"b": np.array([1.0, -2.0, 0.5], np.float32)}
    assert aggregators.server_step(current, average, 1.0) is average  # plain FedAvg
    np.testing.assert_allclose(aggregators.server_step(current, average, 4.0)["b"], [4.0, -8.0, 2.0])
    moved = {"b": np.ones(3, np.float32)}
    np.testing.assert_allclose(aggregators.server_step(moved, average, 2.0)["b"], [1.0, -5.0, 0.0])


def test_ffa_lora_average_of_b_is_the_average_of_weight_changes():
    """With A shared and frozen, mean(B_i) @ A == mean(B_i @ A); averaging both factors is not exact."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 16))
    bs = [rng.normal(size=(8, 4)) for _ in range(3)]
    exact = np.mean([b @ a for b in bs], axis=0)
    avg_b = aggregators.weighted_average([{"b": b} for b in bs], [1, 1, 1])["b"]
    np.testing.assert_allclose(avg_b @ a, exact, atol=1e-12)
    a_s = [rng.normal(size=(4, 16)) for _ in range(3)]
    both = aggregators.weighted_average([{"b": b, "a": x} for b, x in zip(bs, a_s)], [1, 1, 1])
    assert not np.allclose(both["b"] @ both["a"], np.mean([b @ x for b, x in zip(bs, a_s)], axis=0))


def test_server_adam_moves_each_coordinate_by_about_lr_whatever_its_scale():
    current = {"b": np.zeros(3, dtype=np.float32)}
    average = {"b": np.array([1.0, -1e-2, 0.0], dtype=np.float32)}  # a large, a small and no change
    new, moments = aggregators.server_optimizer_step(current, average, "adam", 0.1, {}, tau=1e-6)
    np.testing.assert_allclose(new["b"], [0.1, -0.1, 0.0], rtol=1e-3)  # first step: lr * sign(delta)
    assert set(moments) == {"m/b", "v/b"}
    again, _ = aggregators.server_optimizer_step(new, {"b": new["b"]}, "adam", 0.1, moments, tau=1e-6)
    assert again["b"][0] > new["b"][0]  # no change this round, but the first moment still carries it on


def test_server_momentum_accumulates_a_consistent_change():
    current = {"b": np.zeros(2, dtype=np.float32)}
    step1, m = aggregators.server_optimizer_step(current, {"b": np.array([1.0, 1.0])}, "momentum", 1.0, {}, beta1=0.5)
    np.testing.assert_allclose(step1["b"], [1.0, 1.0])
    step2, _ = aggregators.server_optimizer_step(step1, {"b": step1["b"] + [1.0, -1.0]}, "momentum", 1.0, m, beta1=0.5)
    np.testing.assert_allclose(step2["b"], [1.0 + 1.5, 1.0 - 0.5])  # m = 0.5 * m + delta


def test_server_sgd_is_server_step_and_unknown_optimizers_are_refused():
    current, average = {"b": np.zeros(2, dtype=np.float32)}, {"b": np.ones(2, dtype=np.float32)}
    new, moments = aggregators.server_optimizer_step(current, average, "sgd", 2.0, {})
    np.testing.assert_allclose(new["b"], [2.0, 2.0])
    assert moments == {}
    with pytest.raises(ValueError, match="server optimizer must be one of"):
        aggregators.server_optimizer_step(current, average, "yogi", 1.0, {})


def test_sign_merge_keeps_a_change_only_one_client_made_whole_and_averages_shared_ones():
    current = {"b": np.zeros(3, dtype=np.float32)}
    updates = [
        {"b": np.array([1.0, 0.5, 0.0], dtype=np.float32)},  # only client 0 moves entry 0
        {"b": np.array([0.0, 0.3, 0.2], dtype=np.float32)},
        {"b": np.array([0.0, 0.1, -0.6], dtype=np.float32)},  # entry 2: the weighted sum elects minus
    ]
    merged = aggregators.sign_merge(current, updates, [1, 1, 1])["b"]
    np.testing.assert_allclose(merged, [1.0, 0.3, -0.6], rtol=1e-6)  # FedAvg: [0.333, 0.3, -0.133]
    assert merged.dtype == np.float32


def test_sign_merge_trims_each_clients_small_entries_and_checks_its_arguments():
    current = {"b": np.ones((2, 2), dtype=np.float32)}
    update = {"b": np.array([[1.1, 3.0], [0.9, 1.0]], dtype=np.float32)}  # changes 0.1, 2, -0.1, 0
    merged = aggregators.sign_merge(current, [update], [1], keep=0.25)["b"]
    np.testing.assert_allclose(merged, [[1.0, 3.0], [1.0, 1.0]], rtol=1e-6)
    # Trimming is per client: a client with small changes keeps its largest, however large the other's are.
    big, small = np.array([[11.0, 6.0], [1.0, 1.0]]), np.array([[1.0, 1.0], [1.2, 1.1]])  # changes 10, 5 / 0.2, 0.1
    two = [{"b": big.astype(np.float32)}, {"b": small.astype(np.float32)}]
    merged = aggregators.sign_merge(current, two, [1, 1], keep=0.25)["b"]
    np.testing.assert_allclose(merged, [[11.0, 1.0], [1.2, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="keep must be in"):
        aggregators.sign_merge(current, [update], [1], keep=0)
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        aggregators.sign_merge(current, [update, update], [1])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        aggregators.sign_merge(current, [update, update], [1, -1])


def test_sign_merge_elects_the_sign_by_weight_and_averages_by_weight():
    current = {"b": np.zeros(2, dtype=np.float32)}
    updates = [{"b": np.array([v, v], dtype=np.float32)} for v in (1.0, 2.0, -1.0)]
    merged = aggregators.sign_merge(current, updates, [1, 1, 3])["b"]  # weighted sum 1 + 2 - 3 = 0: no move
    np.testing.assert_allclose(merged, [0.0, 0.0])
    merged = aggregators.sign_merge(current, updates, [1, 1, 4])["b"]  # minus wins; only the minus client counts
    np.testing.assert_allclose(merged, [-1.0, -1.0])
    merged = aggregators.sign_merge(current, updates, [3, 1, 4])["b"]  # plus wins: (3 * 1 + 1 * 2) / 4
    np.testing.assert_allclose(merged, [1.25, 1.25])
