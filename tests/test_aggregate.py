"""Update checks and the weighted average, on small arrays (no Flower, no torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedge.server import aggregate


def _ref() -> dict[str, np.ndarray]:
    return {"a": np.zeros((2, 3), np.float32), "b": np.ones((3,), np.float32)}


def test_weighted_average_is_exact():
    u1 = {"a": np.full((2, 3), 1.0, np.float32), "b": np.array([1, 2, 3], np.float32)}
    u2 = {"a": np.full((2, 3), 4.0, np.float32), "b": np.array([4, 5, 6], np.float32)}
    avg = aggregate.weighted_average([u1, u2], [1, 2])  # weights normalize to 1/3, 2/3
    np.testing.assert_allclose(avg["a"], np.full((2, 3), 3.0))
    np.testing.assert_allclose(avg["b"], [3, 4, 5])
    assert avg["a"].dtype == np.float32


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError, match="sum to > 0"):
        aggregate.weighted_average([_ref()], [0])
    with pytest.raises(ValueError, match="no updates"):
        aggregate.weighted_average([], [])


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"a": np.zeros((2, 3), np.float32)}, "wrong keys: missing b"),
        ({**_ref(), "c": np.zeros(1, np.float32)}, "unexpected c"),
        ({**_ref(), "a": np.zeros((3, 2), np.float32)}, "wrong shape for a: (3, 2), expected (2, 3)"),
        ({**_ref(), "b": np.ones(3, np.float64)}, "wrong dtype for b: float64"),
        ({**_ref(), "b": np.array([1, np.nan, 1], np.float32)}, "non-finite"),
        ({**_ref(), "b": np.array([1, np.inf, 1], np.float32)}, "non-finite"),
    ],
)
def test_check_update_names_the_problem(update, reason):
    assert reason in aggregate.check_update(update, _ref())


def test_check_update_accepts_a_good_update():
    assert aggregate.check_update({k: v + 0.5 for k, v in _ref().items()}, _ref()) is None


def test_norm_outliers_judge_each_against_the_others():
    assert aggregate.norm_outliers([1.0, 1.2, 0.9, 500.0], [], factor=10) == [False, False, False, True]
    # two clients: the honest one is not rejected because of the huge one
    assert aggregate.norm_outliers([1.0, 1e6], [], factor=10) == [False, True]
    # alone in its round: judged against earlier rounds, or accepted when there is no history
    assert aggregate.norm_outliers([50.0], [1.0, 2.0], factor=10) == [True]
    assert aggregate.norm_outliers([50.0], [], factor=10) == [False]


def test_delta_norm():
    ref = _ref()
    upd = {"a": ref["a"] + 1.0, "b": ref["b"]}
    assert aggregate.delta_norm(upd, ref) == pytest.approx(np.sqrt(6))


def test_server_imports_without_torch():
    names = ("aggregate", "app", "deploy", "hetero", "report", "state", "strategy")
    modules = ", ".join(f"fedge.server.{m}" for m in names)
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_server_step_extrapolates_the_average_change():
    current = {"b": np.zeros(3, np.float32)}
    average = {"b": np.array([1.0, -2.0, 0.5], np.float32)}
    assert aggregate.server_step(current, average, 1.0) is average  # plain FedAvg
    np.testing.assert_allclose(aggregate.server_step(current, average, 4.0)["b"], [4.0, -8.0, 2.0])
    moved = {"b": np.ones(3, np.float32)}
    np.testing.assert_allclose(aggregate.server_step(moved, average, 2.0)["b"], [1.0, -5.0, 0.0])


def test_ffa_lora_average_of_b_is_the_average_of_weight_changes():
    """With A shared and frozen, mean(B_i) @ A == mean(B_i @ A); averaging both factors is not exact."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 16))
    bs = [rng.normal(size=(8, 4)) for _ in range(3)]
    exact = np.mean([b @ a for b in bs], axis=0)
    avg_b = aggregate.weighted_average([{"b": b} for b in bs], [1, 1, 1])["b"]
    np.testing.assert_allclose(avg_b @ a, exact, atol=1e-12)
    a_s = [rng.normal(size=(4, 16)) for _ in range(3)]
    both = aggregate.weighted_average([{"b": b, "a": x} for b, x in zip(bs, a_s)], [1, 1, 1])
    assert not np.allclose(both["b"] @ both["a"], np.mean([b @ x for b, x in zip(bs, a_s)], axis=0))


def test_server_adam_moves_each_coordinate_by_about_lr_whatever_its_scale():
    current = {"b": np.zeros(3, dtype=np.float32)}
    average = {"b": np.array([1.0, -1e-2, 0.0], dtype=np.float32)}  # a large, a small and no change
    new, moments = aggregate.server_optimizer_step(current, average, "adam", 0.1, {}, tau=1e-6)
    np.testing.assert_allclose(new["b"], [0.1, -0.1, 0.0], rtol=1e-3)  # first step: lr * sign(delta)
    assert set(moments) == {"m/b", "v/b"}
    again, _ = aggregate.server_optimizer_step(new, {"b": new["b"]}, "adam", 0.1, moments, tau=1e-6)
    assert again["b"][0] > new["b"][0]  # no change this round, but the first moment still carries it on


def test_server_momentum_accumulates_a_consistent_change():
    current = {"b": np.zeros(2, dtype=np.float32)}
    step1, m = aggregate.server_optimizer_step(current, {"b": np.array([1.0, 1.0])}, "momentum", 1.0, {}, beta1=0.5)
    np.testing.assert_allclose(step1["b"], [1.0, 1.0])
    step2, _ = aggregate.server_optimizer_step(step1, {"b": step1["b"] + [1.0, -1.0]}, "momentum", 1.0, m, beta1=0.5)
    np.testing.assert_allclose(step2["b"], [1.0 + 1.5, 1.0 - 0.5])  # m = 0.5 * m + delta


def test_server_sgd_is_server_step_and_unknown_optimizers_are_refused():
    current, average = {"b": np.zeros(2, dtype=np.float32)}, {"b": np.ones(2, dtype=np.float32)}
    new, moments = aggregate.server_optimizer_step(current, average, "sgd", 2.0, {})
    np.testing.assert_allclose(new["b"], [2.0, 2.0])
    assert moments == {}
    with pytest.raises(ValueError, match="server optimizer must be one of"):
        aggregate.server_optimizer_step(current, average, "yogi", 1.0, {})


def test_sign_merge_keeps_a_change_only_one_client_made_whole_and_averages_shared_ones():
    current = {"b": np.zeros(3, dtype=np.float32)}
    updates = [
        {"b": np.array([1.0, 0.5, 0.0], dtype=np.float32)},  # only client 0 moves entry 0
        {"b": np.array([0.0, 0.3, 0.2], dtype=np.float32)},
        {"b": np.array([0.0, 0.1, -0.6], dtype=np.float32)},  # entry 2: the weighted sum elects minus
    ]
    merged = aggregate.sign_merge(current, updates, [1, 1, 1])["b"]
    np.testing.assert_allclose(merged, [1.0, 0.3, -0.6], rtol=1e-6)  # FedAvg: [0.333, 0.3, -0.133]
    assert merged.dtype == np.float32


def test_sign_merge_trims_each_clients_small_entries_and_checks_its_arguments():
    current = {"b": np.ones((2, 2), dtype=np.float32)}
    update = {"b": np.array([[1.1, 3.0], [0.9, 1.0]], dtype=np.float32)}  # changes 0.1, 2, -0.1, 0
    merged = aggregate.sign_merge(current, [update], [1], keep=0.25)["b"]
    np.testing.assert_allclose(merged, [[1.0, 3.0], [1.0, 1.0]], rtol=1e-6)
    # Trimming is per client: a client with small changes keeps its largest, however large the other's are.
    big, small = np.array([[11.0, 6.0], [1.0, 1.0]]), np.array([[1.0, 1.0], [1.2, 1.1]])  # changes 10, 5 / 0.2, 0.1
    two = [{"b": big.astype(np.float32)}, {"b": small.astype(np.float32)}]
    merged = aggregate.sign_merge(current, two, [1, 1], keep=0.25)["b"]
    np.testing.assert_allclose(merged, [[11.0, 1.0], [1.2, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="keep must be in"):
        aggregate.sign_merge(current, [update], [1], keep=0)
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        aggregate.sign_merge(current, [update, update], [1])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        aggregate.sign_merge(current, [update, update], [1, -1])


def test_sign_merge_elects_the_sign_by_weight_and_averages_by_weight():
    current = {"b": np.zeros(2, dtype=np.float32)}
    updates = [{"b": np.array([v, v], dtype=np.float32)} for v in (1.0, 2.0, -1.0)]
    merged = aggregate.sign_merge(current, updates, [1, 1, 3])["b"]  # weighted sum 1 + 2 - 3 = 0: no move
    np.testing.assert_allclose(merged, [0.0, 0.0])
    merged = aggregate.sign_merge(current, updates, [1, 1, 4])["b"]  # minus wins; only the minus client counts
    np.testing.assert_allclose(merged, [-1.0, -1.0])
    merged = aggregate.sign_merge(current, updates, [3, 1, 4])["b"]  # plus wins: (3 * 1 + 1 * 2) / 4
    np.testing.assert_allclose(merged, [1.25, 1.25])
