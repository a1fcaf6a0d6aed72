"""The server's checkpoint: atomic save/load, resume checks, records as JSON and CSV."""

from __future__ import annotations

import builtins
import csv
import dataclasses
import io
import itertools
import json
import os
import shutil
import signal
import tempfile
import traceback
from collections.abc import Callable

import numpy as np
import pytest

from fedge.server.records import ClientRound, RoundRecord
from fedge.server.report import build_report, round_line, write_report
from fedge.server.state import ServerState, StateError, read_records


def _state(rnd: int) -> ServerState:
    arrays = {"x.lora_A.weight": np.full((2, 4), rnd, np.float32)}
    records = [
        {
            "round": r,
            "exact_match": r / 10,
            "heldout_loss": 1.0 / (r + 1),
            "clients_accepted": 2,
            "clients_replied": 2,
            "bytes_up": 100,
            "bytes_down": 100,
            "seconds": 1.0,
            "clients": [],
        }
        for r in range(rnd + 1)
    ]
    records = [RoundRecord.from_dict(r) for r in records]
    return ServerState({"model": "m", "lora_r": 4}, rnd, arrays, records, {"accepted_norms": [1.0]})


def test_save_and_load_round_trip(tmp_path):
    _state(1).save(tmp_path)
    _state(2).save(tmp_path)
    loaded = ServerState.load(tmp_path)
    assert loaded.round == 2
    np.testing.assert_array_equal(loaded.arrays["x.lora_A.weight"], np.full((2, 4), 2, np.float32))
    assert [r.round for r in loaded.records] == [0, 1, 2] and loaded.records == _state(2).records
    assert loaded.strategy == {"accepted_norms": [1.0]}
    assert sorted(p.name for p in tmp_path.glob("global-*.npz")) == ["global-0002.npz"]  # the old one is gone
    rows = list(csv.DictReader((tmp_path / "rounds.csv").open()))
    assert [row["round"] for row in rows] == ["0", "1", "2"]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_records_written_before_a_crash_are_ignored(tmp_path):
    """A kill between writing the records and state.json: the extra record is not resumed."""
    _state(1).save(tmp_path)
    records = json.loads((tmp_path / "rounds.json").read_text())
    records.append({"round": 2})
    (tmp_path / "rounds.json").write_text(json.dumps(records))
    assert [r.round for r in ServerState.load(tmp_path).records] == [0, 1]


def test_no_state_and_corrupt_state(tmp_path):
    assert ServerState.load(tmp_path) is None
    _state(1).save(tmp_path)
    (tmp_path / "global-0001.npz").write_bytes(b"not a zip")
    with pytest.raises(StateError, match="cannot resume"):
        ServerState.load(tmp_path)


def test_resume_refuses_a_different_federation(tmp_path):
    state = _state(1)
    state.check_resumable({"model": "m", "lora_r": 4}, tmp_path)
    with pytest.raises(StateError, match=r"lora_r: 4 -> 8"):
        state.check_resumable({"model": "m", "lora_r": 8}, tmp_path)


def test_report_and_plots(tmp_path):
    records = _state(2).records
    records[1].clients = [ClientRound("a", exact_match=0.5, train_seconds=3.0, startup_seconds=2.0)]
    report = write_report(tmp_path, records, {"mode": "test"})
    assert report["base_exact_match"] == 0.0 and report["final_exact_match"] == 0.2
    assert json.loads((tmp_path / "report.json").read_text())["rounds"][1]["clients"][0]["name"] == "a"
    for png in ("rounds.png", "clients.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "20.0%" in round_line(records[2], 2)
    assert build_report([], {})["rounds"] == []


def test_read_records_tolerates_missing_files(tmp_path):
    assert read_records(tmp_path) == []


def test_records_written_before_they_were_typed_still_load(tmp_path):
    # A round record as fedge wrote it before RoundRecord: metric keys that are no longer fields are dropped.
    old = {"round": 1, "exact_match": 0.25, "heldout_loss": 1.5, "train_loss": 1.7, "clients_replied": 1,
           "clients_accepted": 1, "clients_rejected": 0, "clients_failed": 1, "bytes_up": 9, "bytes_down": 18,
           "seconds": 212.3, "clients": [{"node_id": 5, "name": "clinic", "data": "demo:healthcare", "device": "x86",
           "energy_method": "estimated", "num_examples": 480.0, "steps": 15.0, "train_seconds": 80.0, "warm": 1.0,
           "examples": 480.0, "bytes_down": 18, "bytes_up": 9, "delta_rms": 0.01, "reason": None, "accepted": True,
           "exact_match": 0.25, "eval_examples": 50.0, "eval_load_seconds": 0.5, "a_key_from_the_future": 1}],
           "failures": [{"node_id": 6, "name": None, "reason": "no reply before the deadline"}]}  # fmt: skip
    (tmp_path / "rounds.json").write_text(json.dumps([old]))
    (record,) = read_records(tmp_path)
    assert record.round == 1 and record.exact_match == 0.25 and record.failures[0].node_id == 6
    client = record.clients[0]
    assert client.name == "clinic" and client.examples == 480.0 and client.accepted and client.eval_examples == 50
    assert "1/1 (0r 1f)" in round_line(record, 3)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / "global-0001.npz").write_bytes((d / "global-0001.npz").read_bytes()[:100]), "global-0001.npz"),
        (lambda d: (d / "state.json").write_text("{"), "state.json"),
        (lambda d: (d / "state.json").write_text("[1, 2]"), "state.json"),
        (lambda d: (d / "state.json").write_text('{"round": "2", "arrays": "global-0001.npz"}'), "state.json"),
        (lambda d: (d / "rounds.json").write_text('[{"round": 1, "clients": 5}]'), "rounds.json"),
        (lambda d: (d / "global-0001.npz").unlink(), "global-0001.npz"),
    ],
)
def test_a_damaged_state_is_refused_naming_the_file(tmp_path, damage, named):
    _state(1).save(tmp_path)
    damage(tmp_path)
    with pytest.raises(StateError, match=named):
        ServerState.load(tmp_path)


# Kill -9 at each step of a save. A save runs in a forked child that SIGKILLs itself at its k-th filesystem step,
# for k = 0, 1, ... until one completes; after each kill the parent loads what is on disk, as a restart would.

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kill -9 of a forked child needs os.fork")


class _TornWriter:
    """A file open for writing whose every write stops half-way for a step: a kill there leaves a torn file."""

    def __init__(self, fh, step: Callable[[], None]) -> None:
        self._fh, self._step = fh, step

    def write(self, data):
        half = len(data) // 2
        self._fh.write(data[:half])
        self._fh.flush()
        self._step()
        return half + self._fh.write(data[half:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _arm_kill(at: int) -> None:
    """From now on, SIGKILL this process at its ``at``-th filesystem step (0-based): creating a temp file, a write
    (half done), an fsync, a rename or an unlink. Only ever called in a forked child."""
    steps = itertools.count()

    def step() -> None:
        if next(steps) == at:
            os.kill(os.getpid(), signal.SIGKILL)

    def before(fn):
        def stepped(*args, **kwargs):
            step()
            return fn(*args, **kwargs)

        return stepped

    for name in ("fsync", "replace", "rename", "unlink", "remove"):  # Path.unlink and Path.replace call these
        setattr(os, name, before(getattr(os, name)))
    tempfile.mkstemp = before(tempfile.mkstemp)
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):  # os.fdopen and Path.write_* open through io.open too
        fh = real_open(file, mode, *args, **kwargs)
        return _TornWriter(fh, step) if set(mode) & set("wax+") else fh

    io.open = builtins.open = open_


def _killed_at(step: int, save: Callable[[], None]) -> bool:
    """Run ``save`` in a forked child killed at its ``step``-th filesystem step: True if the kill came, False if
    the save completed first. A save that raises fails the test."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            _arm_kill(step)
            save()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return True
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the save failed in the child ({status=})"
    return False


def _kill_at_each_step(reset: Callable[[], None], save: Callable[[], None], check: Callable[[int], None]) -> int:
    """For each step of ``save`` from the first: ``reset`` the files, kill ``save`` at that step, ``check`` what it
    left. Returns the number of steps (the first k at which the save completed)."""
    for step in itertools.count():
        reset()
        if not _killed_at(step, save):
            return step
        check(step)
    raise AssertionError("unreachable")


def _contents(state: ServerState | None):
    """Everything a resumed run takes from a state, comparable with ==."""
    if state is None:
        return None
    arrays = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in state.arrays.items()}
    return state.round, state.settings, state.strategy, [r.to_dict() for r in state.records], arrays


@needs_fork
@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, _state(0)),  # the first save of a federation
        (dataclasses.replace(_state(0), records=[]), _state(0)),  # the initial adapter, then its evaluation
        (_state(1), dataclasses.replace(_state(2), strategy={"accepted_norms": [1.0, 2.0]})),  # a round
    ],
    ids=["first", "round-0-evaluated", "next-round"],
)
def test_a_kill_at_any_step_of_a_save_leaves_the_previous_state_or_the_new_one(tmp_path, before, after):
    template, state_dir = tmp_path / "before", tmp_path / "state"
    template.mkdir()
    if before is not None:
        before.save(template)
    seen = []

    def reset() -> None:
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.copytree(template, state_dir)

    def check(step: int) -> None:
        try:
            loaded = _contents(ServerState.load(state_dir))
        except StateError as err:
            pytest.fail(f"killed at step {step}: {err}")
        assert loaded in (_contents(before), _contents(after)), f"killed at step {step}: a state of neither round"
        seen.append(loaded == _contents(after))

    steps = _kill_at_each_step(reset, lambda: after.save(state_dir), check)
    assert _contents(ServerState.load(state_dir)) == _contents(after)
    assert steps >= 20 and seen[0] is False and seen[-1] is True  # the kills spanned the save, old to new


def test_a_save_removes_the_temp_files_of_saves_killed_mid_write(tmp_path):
    leftovers = [".global-0001.npz-k2j3h4", ".state.json-abc123", ".rounds.json-x9", ".rounds.csv-q1"]
    for name in [*leftovers, ".mine", "notes.txt"]:
        (tmp_path / name).write_bytes(b"half a file")
    _state(1).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".mine"]
    assert (tmp_path / "notes.txt").exists() and ServerState.load(tmp_path).round == 1


@needs_fork
def test_a_kill_at_any_step_of_saving_a_reply_never_splits_it_from_its_residual(tmp_path):
    """The client's update and its error-feedback residual: after a kill the restart either replies with the saved
    update and makes its residual the live one, or trains again from the previous round's residual."""
    from fedge.common import wire
    from fedge.common.fsutil import atomic_write_bytes
    from fedge.edge_client.federation import reply
    from fedge.edge_client.federation.settings import Device

    device = Device(name="c", state_dir=tmp_path / "client")
    settings = wire.RoundSettings(codec="int8")
    live, work = reply.residual_path(device, settings), device.state_dir / "work" / "round-2"
    arrays, metrics = {"x.lora_A.weight": np.full((2, 4), 2, np.float32)}, {"steps": 3}
    old, new = b"residual after round 1", b"residual after round 2"  # opaque to the save
    seen = []

    def reset() -> None:
        shutil.rmtree(device.state_dir, ignore_errors=True)
        work.mkdir(parents=True)
        atomic_write_bytes(live, old)

    def save() -> None:  # what do_train does once training is done
        reply.save_update(work, arrays, metrics, new)
        reply.commit_residual(work, device, settings)

    def check(step: int) -> None:  # what do_train does when the round's message comes again after a restart
        if (work / reply.UPDATE_FILE).is_file():
            got, got_metrics = reply.load_update(work)
            reply.commit_residual(work, device, settings)
            assert got.keys() == arrays.keys() and np.array_equal(got["x.lora_A.weight"], arrays["x.lora_A.weight"])
            assert got_metrics == metrics and live.read_bytes() == new, f"killed at step {step}"
        else:
            assert live.read_bytes() == old, f"killed at step {step}: the round trains again from a wrong residual"
        seen.append((work / reply.UPDATE_FILE).is_file())

    steps = _kill_at_each_step(reset, save, check)
    assert live.read_bytes() == new
    assert steps >= 15 and seen[0] is False and seen[-1] is True
