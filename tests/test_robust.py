"""Robust merging: share caps, norm clipping, trimmed mean, median and Multi-Krum, alone and inside the merge."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.server import robust
from fedge.server.hetero import aggregate

ALPHA = 8.0
R, OUT, IN = 4, 6, 5
A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _global() -> dict:
    rng = np.random.default_rng(0)
    return {A: rng.normal(size=(R, IN)).astype(np.float32), B: np.zeros((OUT, R), np.float32)}


def _clients(n_honest: int, poison: np.ndarray | None = None) -> list[dict]:
    """Honest clients move B by ~+0.1 each (noise 0.01); the poisoner, if any, sends B + ``poison`` (A frozen)."""
    rng = np.random.default_rng(1)
    honest = [{B: (0.1 + 0.01 * rng.normal(size=(OUT, R))).astype(np.float32)} for _ in range(n_honest)]
    return honest + ([{B: poison.astype(np.float32)}] if poison is not None else [])


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 1e7, allow_nan=False), min_size=1, max_size=12).filter(lambda w: sum(w) > 0),
    cap=st.floats(0.05, 1.0),
)
def test_capped_shares_sum_to_one_stay_under_the_cap_and_keep_the_order(weights, cap):
    shares = [w / sum(weights) for w in weights]
    capped = robust.cap_shares(shares, cap)
    assert sum(capped) == pytest.approx(1.0)
    assert max(capped) <= max(cap, 1 / len(weights)) + 1e-9
    for i in range(len(shares)):  # nobody overtakes anybody, and nobody under the cap loses share
        for j in range(len(shares)):
            if shares[i] < shares[j]:
                assert capped[i] <= capped[j] + 1e-12
        if shares[i] <= cap:
            assert capped[i] >= shares[i] - 1e-12


def test_cap_shares_by_hand():
    assert robust.cap_shares([0.97, 0.01, 0.02], 0.5) == pytest.approx([0.5, 0.5 / 3, 1 / 3])
    assert robust.cap_shares([0.9, 0.1], 0.2) == pytest.approx([0.5, 0.5])  # at least 1/n: equal


def test_clip_scales_absolute_and_relative():
    assert robust.clip_scales([0.01, 0.02, 0.5], max_rms=0.1, factor=0) == pytest.approx([1, 1, 0.2])
    # relative: 0.5 against the median of (0.01, 0.02) = 0.015 -> bound 4 * 0.015 = 0.06
    assert robust.clip_scales([0.01, 0.02, 0.5], max_rms=0, factor=4) == pytest.approx([1, 1, 0.12])
    # one peer: no relative bound (it cannot tell the honest one from the liar)
    assert robust.clip_scales([0.01, 0.5], max_rms=0, factor=4) == [1.0, 1.0]


def test_coordinate_wise_rules_by_hand():
    changes = [np.array([1.0, -1.0]), np.array([2.0, 0.0]), np.array([3.0, 1.0]), np.array([100.0, -50.0])]
    coef = [0.25] * 4
    assert robust.combine(changes, coef, "mean").tolist() == [26.5, -12.5]
    assert robust.combine(changes, coef, "median").tolist() == [2.5, -0.5]
    assert robust.combine(changes, coef, "trimmed-mean", trim=0.25).tolist() == [2.5, -0.5]  # drops 1 each end
    assert robust.combine(changes, coef, "trimmed-mean", trim=0.1).tolist() == [26.5, -12.5]  # int(0.4) = 0


def test_krum_keeps_the_clustered_changes():
    points = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [5.0, 5.0]])
    sq = ((points[:, None] - points[None]) ** 2).sum(-1)
    assert robust.krum_select(sq, f=1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="at least 5 clients"):
        robust.krum_select(sq[:4, :4], f=1)


@pytest.mark.parametrize("attack", ["sign flip", "scaled"])
@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "krum"])
def test_a_robust_rule_holds_where_the_mean_is_pulled_away(rule, attack):
    """Four honest clients move B by +0.1; the fifth sends -10x (sign flip) or +50x (scaled) of that."""
    poison = np.full((OUT, R), -1.0 if attack == "sign flip" else 5.0)
    clients, g = _clients(4, poison), _global()
    mean = aggregate(g, clients, [1] * 5, ALPHA)[B].mean()
    held = aggregate(g, clients, [1] * 5, ALPHA, rule=rule)[B].mean()
    assert abs(mean - 0.1) > 0.15  # the poisoner owns the plain mean
    assert abs(held - 0.1) < 0.02, (rule, held)


def test_with_honest_clients_only_every_rule_lands_near_the_mean():
    clients, g = _clients(5), _global()
    mean = aggregate(g, clients, [1] * 5, ALPHA)[B]
    for rule in ("trimmed-mean", "median", "krum"):
        assert np.abs(aggregate(g, clients, [1] * 5, ALPHA, rule=rule)[B] - mean).max() < 0.02, rule


def test_rules_need_the_zero_pad_merge_and_enough_clients():
    clients, g = _clients(5), _global()
    with pytest.raises(ValueError, match="zero-pad"):
        aggregate(g, clients, [1] * 5, ALPHA, method="svd", rule="median")
    with pytest.raises(ValueError, match="one of"):
        aggregate(g, clients, [1] * 5, ALPHA, rule="geomedian")


def test_krum_with_fewer_clients_than_2f_plus_3_tolerates_what_the_cohort_allows():
    clients, g = _clients(4), _global()  # 4 < 2 * 1 + 3: f = 0, every client kept: the mean
    got = aggregate(g, clients, [1] * 4, ALPHA, rule="krum", krum_f=1)
    assert np.allclose(got[B], aggregate(g, clients, [1] * 4, ALPHA)[B])
    poisoned = _clients(6, np.full((OUT, R), -1.0))  # 7 clients, f = 2 asked: both tolerated (7 >= 2 * 2 + 3)
    assert abs(aggregate(g, poisoned, [1] * 7, ALPHA, rule="krum", krum_f=2)[B].mean() - 0.1) < 0.02


def test_the_share_cap_bounds_one_heavy_client_in_the_merge():
    clients, g = _clients(3, np.full((OUT, R), 1.0)), _global()
    weights = [1, 1, 1, 1000]  # the poisoner claims 1000x the examples
    uncapped = aggregate(g, clients, weights, ALPHA)[B].mean()
    capped = aggregate(g, clients, weights, ALPHA, max_share=0.5)[B].mean()
    assert uncapped > 0.99 * 1.0 - 0.01
    assert capped == pytest.approx(0.5 * 1.0 + 0.5 * 0.1, abs=0.01)
