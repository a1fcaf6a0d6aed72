"""Update checks before merging, on small arrays (no Flower, no torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedge.server import aggregate


def _ref() -> dict[str, np.ndarray]:
    return {"a": np.zeros((2, 3), np.float32), "b": np.ones((3,), np.float32)}


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
    # two clients: the honest one is not rejected because of the huge one; the huge one is, against earlier rounds;
    # without them one peer cannot tell who lies (the absolute bound decides), and the floor is no reference alone
    assert aggregate.norm_outliers([1.0, 1e6], [1.0], factor=10) == [False, True]
    assert aggregate.norm_outliers([1.0, 1e6], [], factor=10) == [False, False]
    assert aggregate.norm_outliers([0.148, 0.14], [], factor=10, floor=0.01) == [False, False]
    assert aggregate.norm_outliers([0.148], [], factor=10, floor=0.01) == [False]  # a sole client in round 1
    # alone in its round: judged against earlier rounds, or accepted when there is no history
    assert aggregate.norm_outliers([50.0], [1.0, 2.0], factor=10) == [True]
    assert aggregate.norm_outliers([50.0], [], factor=10) == [False]


def test_near_zero_or_duplicated_replies_cannot_veto_an_honest_one():
    honest = 0.01
    # a near-zero peer: the floor (and history, once there is one) keeps the reference up
    assert aggregate.norm_outliers([honest, 1e-9, 2e-9], [], factor=10, floor=0.01) == [False, False, False]
    assert aggregate.norm_outliers([honest, 1e-9, 2e-9], [], factor=10) == [True, False, False]  # no floor: vetoed
    assert aggregate.norm_outliers([honest, 1e-9, 1e-9], [0.01], factor=10, floor=0.0) == [False, False, False]
    # two identical near-zero replies count once among the others: no median of two to drag down
    keys = ["h", "z", "z"]
    assert aggregate.norm_outliers([0.5, 1e-9, 1e-9], [], factor=10, keys=keys) == [False, False, False]
    # without the dedup the pair would outvote the honest reply
    assert aggregate.norm_outliers([0.5, 1e-9, 1e-9], [], factor=10) == [True, False, False]


def test_digest_tells_identical_updates_apart_from_different_ones():
    a = _ref()
    assert aggregate.digest(a) == aggregate.digest({k: v.copy() for k, v in a.items()})
    assert aggregate.digest(a) != aggregate.digest({**a, "a": a["a"] + 1e-7})


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
