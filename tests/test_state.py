"""The server's checkpoint: atomic save/load, resume checks, records as JSON and CSV."""

from __future__ import annotations

import csv
import json

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
