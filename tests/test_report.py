"""Round lines, report.json and plots for adaptive rounds: per-client plans, codecs and bytes up."""

from __future__ import annotations

import json

from fedge.server.records import ClientRound, RoundRecord
from fedge.server.report import client_line, round_header, round_line, write_report


def _plan(precision: str, rank: int, top_layers: int | None, steps: int) -> dict:
    return {"feasible": True, "precision": precision, "lora_r": rank, "top_layers": top_layers, "steps": steps,
            "requested_steps": 15, "seq_len": 64, "micro_batch": 1}  # fmt: skip


def _records() -> list[RoundRecord]:
    pi4 = {"name": "healthcare", "device_profile": "pi4-2gb", "plan": _plan("int8", 8, 12, 9), "codec": "int4",
           "steps": 9, "bytes_up": 300_000, "round_seconds": 231.4, "accepted": True, "exact_match": 0.2}  # fmt: skip
    laptop = {"name": "finance", "device_profile": "laptop", "plan": _plan("fp32", 16, None, 15), "codec": "none",
              "steps": 15, "bytes_up": 5_000_000, "round_seconds": 88.0, "accepted": False,
              "reason": "update norm 9.1 is more than 10x the cohort's", "exact_match": 0.4}  # fmt: skip
    base = {"round": 0, "exact_match": 0.0, "heldout_loss": 6.0, "clients_accepted": 0, "clients_replied": 0,
            "bytes_up": 0, "bytes_down": 0, "seconds": 70.0,
            "clients": [{"name": "finance", "exact_match": 0.0}]}  # fmt: skip
    one = {"round": 1, "exact_match": 0.3, "heldout_loss": 2.0, "train_loss": 1.0, "clients_accepted": 1,
           "clients_replied": 2, "clients_rejected": 1, "clients_failed": 1, "bytes_up": 5_300_000,
           "bytes_down": 10_000_000, "seconds": 250.0, "clients": [laptop, pi4],
           "failures": [{"node_id": 7, "name": "iot",
                         "reason": "Traceback ...\nRoundDeclined: jetson: no training plan fits"},
                        {"node_id": 8, "reason": "no reply before the deadline"}]}  # fmt: skip
    return [RoundRecord.from_dict(base), RoundRecord.from_dict(one)]


def test_round_line_lists_each_clients_plan_codec_and_bytes_up():
    records = _records()
    assert "\n" not in round_line(records[0], 1)  # no adaptive clients: the one row as before
    lines = round_line(records[1], 1).splitlines()
    assert len(lines) == 5 and lines[0].startswith(" " * 3) and "1/1" in lines[0]
    laptop, pi4, failed, late = lines[1:]
    assert "finance" in laptop and "laptop" in laptop and "fp32" in laptop and "r16" in laptop and "all" in laptop
    assert "15/15 steps" in laptop and "4.8 MB up" in laptop and "rejected: update norm" in laptop
    assert "pi4-2gb" in pi4 and "int8" in pi4 and "r8" in pi4 and "top 12" in pi4 and "9/15 steps" in pi4
    assert "int4" in pi4 and "0.29 MB up" in pi4 and "231 s" in pi4 and "rejected" not in pi4
    assert failed.split() == ["iot", "failed:", "RoundDeclined:", "jetson:", "no", "training", "plan", "fits"]
    assert late.split() == ["node", "8", "failed:", "no", "reply", "before", "the", "deadline"]
    assert len(round_header()) == len(lines[0])


def test_client_line_without_a_plan():
    line = client_line(ClientRound("iot", device_profile="pi5-8gb", steps=15, bytes_up=2**21))
    assert "iot" in line and "pi5-8gb" in line and "15 steps" in line and "fp32" in line and "2.0 MB up" in line


def test_report_keeps_plans_and_plots_them(tmp_path):
    report = write_report(tmp_path, _records(), {"mode": "test", "devices": ["pi4-2gb", "laptop"]})
    assert "plots" not in report  # matplotlib present: both plots drawn
    saved = json.loads((tmp_path / "report.json").read_text())
    pi4 = next(c for c in saved["rounds"][1]["clients"] if c["name"] == "healthcare")
    assert pi4["plan"]["lora_r"] == 8 and pi4["codec"] == "int4" and pi4["bytes_up"] == 300_000
    assert saved["devices"] == ["pi4-2gb", "laptop"] and saved["rounds"][1]["failures"]
    for png in ("rounds.png", "clients.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_report_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, fedge.server.report, fedge.server.deploy; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_latest_record_waits_for_its_evaluation_from_the_next_rounds_replies(tmp_path):
    # eval_in_train: round r's record lands first without its score, which round r + 1's train replies bring.
    from fedge.server.report import new_records
    from fedge.server.state import write_records as save

    shown: set[int] = set()
    save(tmp_path, [RoundRecord(0)])
    assert new_records(tmp_path, shown, done=False) == []  # not scored yet: wait
    save(tmp_path, [RoundRecord(0, exact_match=0.0), RoundRecord(1)])
    assert [r.exact_match for r in new_records(tmp_path, shown, done=False)] == [0.0]
    save(tmp_path, [RoundRecord(0, exact_match=0.0), RoundRecord(1), RoundRecord(2)])  # 1: not scored
    assert [r.round for r in new_records(tmp_path, shown, done=False)] == [1]
    assert [r.round for r in new_records(tmp_path, shown, done=True)] == [2]  # the run ended: show what there is


def test_cost_to_target_is_the_first_round_at_each_target_with_what_was_spent_by_then(tmp_path):
    from fedge.server.report import cost_to_target, cumulative_costs

    def rnd(i, em, seconds, train_s, eval_s, joules, up):
        clients = [{"name": n, "train_seconds": train_s, "eval_seconds": eval_s, "energy_j": joules} for n in "ab"]
        return RoundRecord.from_dict({"round": i, "exact_match": em, "seconds": seconds, "bytes_up": up,
                                      "bytes_down": 2 * up, "clients": clients})  # fmt: skip

    records = [rnd(0, 0.0, 10, None, 1.0, None, 0), rnd(1, 0.6, 100, 40.0, 2.0, 50.0, 10), rnd(2, None, 100, 40.0,
               None, 50.0, 10), rnd(3, 0.85, 100, 40.0, 2.0, 50.0, 10)]  # fmt: skip
    curve = cumulative_costs(records[::-1])  # in round order whatever order they come in
    assert [p["wall_s"] for p in curve] == [10, 110, 210, 310] and [p["bytes"] for p in curve] == [0, 30, 60, 90]
    assert [p["client_s"] for p in curve] == [2.0, 86.0, 166.0, 250.0] and curve[-1]["energy_j"] == 300.0
    hit = cost_to_target(curve)
    assert hit["50%"]["round"] == 1 and hit["80%"]["round"] == 3 and hit["80%"]["wall_s"] == 310
    assert cost_to_target(curve[:3])["80%"] is None  # not reached: said so, not left out
    report = write_report(tmp_path, records, {})
    assert report["to_target"] == hit and json.loads((tmp_path / "report.json").read_text())["costs"] == curve
