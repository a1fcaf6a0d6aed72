"""A client's round in-process (fedge.edge_client.federation.local_work), tiny model, against the server's side."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from fedge.common import wire
from fedge.common.modeling import ModelHolder, get_adapter, set_adapter
from fedge.edge_client.federation import limits, local_work, reply
from fedge.edge_client.federation.settings import Device
from fedge.edge_client.training.data import fingerprint
from fedge.quantization.codecs import HEADER_KEY
from fedge.server import hetero


@pytest.fixture()
def holder(device) -> ModelHolder:
    return ModelHolder(device.cache_dir, device.precision)


@pytest.fixture()
def device(tmp_path) -> Device:
    return Device("client", "demo:iot", "demo:iot:test", tmp_path / "state", tmp_path / "cache", "fp32")


def _settings(model_dir, **kw) -> wire.RoundSettings:
    base = {"steps": 3, "batch": 2, "seq_len": 64, "lora_r": 8, "lora_alpha": 16}
    return wire.RoundSettings(model=str(model_dir), **{**base, **kw})


def test_whole_adapter_reply_when_a_trains_too(holder, device, tiny_model_dir):
    settings = _settings(tiny_model_dir, lora_freeze_a=False)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    arrays, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    assert set(arrays) == set(initial) and HEADER_KEY not in arrays
    assert metrics[wire.Metric.UPLOAD_BYTES] == sum(a.nbytes for a in initial.values())
    update, norm = hetero.from_reply(arrays, initial, settings.lora_alpha)
    assert norm > 0 and set(update) == set(initial)


def test_frozen_tensors_never_travel_up(holder, device, tiny_model_dir):
    # LoRA A frozen (the default): the reply is B's change alone, lossless, and the server rebuilds the adapter.
    from fedge.quantization.codecs import Encoded, decode

    settings = _settings(tiny_model_dir)
    assert settings.lora_freeze_a and not settings.codec
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    arrays, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    sent = decode(Encoded.from_arrays(arrays))
    assert sent and all("lora_B" in k for k in sent) and metrics[wire.Client.CODEC] == "none"
    b_bytes = sum(a.nbytes for k, a in initial.items() if "lora_B" in k)
    assert metrics[wire.Metric.UPLOAD_BYTES] <= b_bytes * 1.01 + 4096
    update, norm = hetero.from_reply(arrays, initial, settings.lora_alpha)
    assert norm > 0 and set(update) == {k for k in initial if "lora_B" in k}  # A: the global's, untouched


def test_encoded_change_with_error_feedback_decodes_to_the_trained_adapter(holder, device, tiny_model_dir):
    settings = _settings(tiny_model_dir, codec="int8")
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    arrays, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    assert HEADER_KEY in arrays and metrics[wire.Client.CODEC] == "int8"
    fp32 = sum(a.nbytes for k, a in initial.items() if "lora_B" in k)  # A is frozen: only B changes
    assert metrics[wire.Metric.UPLOAD_BYTES] < 0.3 * fp32
    update, _ = hetero.from_reply(arrays, initial, settings.lora_alpha)
    assert update and all("lora_B" in k for k in update)
    residual = reply.residual_path(device, settings)
    assert residual.is_file()  # what int8 dropped waits on the device for the next round
    # The server's view equals the client's trained B up to int8 rounding.
    trained = get_adapter(holder.model)
    for k, v in update.items():
        assert np.abs(v - trained[k]).max() <= 0.02 * np.abs(trained[k] - initial[k]).max() + 1e-8


# "": a partial plan still sends its change (as fp32); svd: the global is cut to the client's rank by SVD (FlexLoRA)
@pytest.mark.parametrize(("codec", "merge"), [("auto", "zero-pad"), ("", "zero-pad"), ("int8", "svd")])
def test_a_round_that_trains_part_of_the_adapter_is_merged_back(holder, device, tiny_model_dir, codec, merge):
    # A Pi 4 whose plan lowers the rank and trains the top layer only (as the planner does for a big model on a
    # small device; pinned here, since the tiny model fits anywhere): the server merges its part back.
    from fedge.edge_client.device.emulated import load_profile
    from fedge.edge_client.planning.plan import make_plan

    device.profile = "base=pi4-2gb,slowdown=1.5"
    base = _settings(tiny_model_dir, lora_r=16, deadline_s=60.0)
    shape = limits.model_shape(device.cache_dir, base.model)
    caps = limits.device_caps(device, load_profile(device.profile))
    partial = dataclasses.replace(make_plan(caps, limits.round_budget(base, 64), shape), lora_r=4, top_layers=1)
    settings = dataclasses.replace(base, codec=codec, lora_merge=merge, plan=partial.to_json())
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    rng = np.random.default_rng(0)  # a global that has trained: its low-rank cut is a real choice
    initial = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) if "lora_B" in k else v
               for k, v in initial.items()}  # fmt: skip
    arrays, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    plan = json.loads(metrics[wire.Client.PLAN])
    assert plan["lora_r"] == 4 and plan["top_layers"] == 1 and metrics[wire.Client.PROFILE] == "pi4-2gb"
    assert plan["steps"] == metrics[wire.Metric.STEPS]  # the plan as it ran: pinning it replays the round
    assert metrics[wire.Metric.UPLOAD_SECONDS] > 0  # the emulated link carried the update
    update, _ = hetero.from_reply(arrays, initial, settings.lora_alpha, merge)
    assert {v.shape[1] for k, v in update.items() if "lora_B" in k} == {plan["lora_r"]}
    merged = hetero.aggregate(initial, [update], [1.0], settings.lora_alpha, method=merge)
    assert all(merged[k].shape == initial[k].shape and np.isfinite(merged[k]).all() for k in initial)
    changed = {k for k in initial if not np.array_equal(merged[k], initial[k])}
    if merge == "zero-pad":  # A stays the shared seeded one; svd refactors both factors
        assert changed and changed <= {k for k in initial if "lora_B" in k}
    assert {k.split(".layers.")[1].split(".")[0] for k in changed} == {"1"}  # the bottom layer keeps its values


def test_a_resent_round_replies_with_the_saved_encoded_update(holder, device, tiny_model_dir):
    settings = _settings(tiny_model_dir, codec="int4")
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    first, _ = local_work.do_train(holder, device, settings, initial, rnd=1)
    residual = reply.residual_path(device, settings).read_bytes()
    again, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    assert metrics[wire.Metric.RESUMED] == 1
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert reply.residual_path(device, settings).read_bytes() == residual  # not encoded twice


def test_a_kill_between_the_update_and_its_residual_never_sends_the_old_residual_again(
    holder, device, tiny_model_dir, monkeypatch
):
    settings = _settings(tiny_model_dir, codec="int4")
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    local_work.do_train(holder, device, settings, initial, rnd=1)  # round 1 leaves a residual r1
    r1 = reply.residual_path(device, settings).read_bytes()

    def killed(*_args) -> None:  # the process dies right after the round-2 update is saved
        raise KeyboardInterrupt

    monkeypatch.setattr(reply, "commit_residual", killed)
    with pytest.raises(KeyboardInterrupt):
        local_work.do_train(holder, device, settings, initial, rnd=2)
    assert reply.residual_path(device, settings).read_bytes() == r1  # the live residual is still r1...
    monkeypatch.undo()
    _, metrics = local_work.do_train(holder, device, settings, initial, rnd=2)  # ...until the resumed reply
    assert metrics[wire.Metric.RESUMED] == 1
    assert reply.residual_path(device, settings).read_bytes() != r1  # r1 went out in round 2: it is gone


def test_auto_without_a_link_model_takes_int8_or_its_ceiling(holder, device, tiny_model_dir):
    for codec, expected in (("auto", "int8"), ("auto:int3", "int3"), ("auto:fp16", "int8")):
        settings = _settings(tiny_model_dir, codec=codec)
        initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
        _, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
        assert metrics[wire.Client.CODEC] == expected


def test_a_bad_codec_is_refused_with_its_name():
    with pytest.raises(ValueError, match="int5"):
        wire.RoundSettings(codec="int5")


def test_a_pinned_plan_is_trained_as_pinned_without_re_planning(holder, device, tiny_model_dir, tmp_path):
    # Replaying a recorded round with another codec: the same plan, steps included, whatever the clock says.
    device.profile = "base=pi4-2gb,slowdown=1.5"
    settings = _settings(tiny_model_dir, codec="int4", deadline_s=60.0, lora_r=16)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    _, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    recorded = json.loads(metrics[wire.Client.PLAN])
    pinned = {**recorded, "steps": 2, "lora_r": 2}  # not what the planner would choose
    replay = Device("replay", device.data, device.eval_data, tmp_path / "replay", device.cache_dir, "fp32", 0, 0,
                    device.profile)  # fmt: skip
    settings = _settings(tiny_model_dir, codec="none", deadline_s=60.0, lora_r=16, plan=json.dumps(pinned))
    arrays, metrics = local_work.do_train(holder, replay, settings, initial, rnd=1)
    assert json.loads(metrics[wire.Client.PLAN]) == pinned and metrics[wire.Metric.STEPS] == 2
    for bad, why in (({"steps": 0}, "steps >= 1"), ({"feasible": False}, "feasible"), ({"lora_r": 32}, "rank 32")):
        with pytest.raises(ValueError, match=why):
            _settings(tiny_model_dir, lora_r=16, plan=json.dumps({**pinned, **bad}))
    update, _ = hetero.from_reply(arrays, initial, settings.lora_alpha)
    assert {v.shape[1] for k, v in update.items() if "lora_B" in k} == {2}


def test_a_pinned_plan_that_is_not_a_plan_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="plan: expected a training plan"):
        wire.RoundSettings(plan='{"steps": 3}')
    with pytest.raises(ValueError, match="plan: expected a training plan"):
        wire.RoundSettings(plan="not json")


def test_rows_are_planned_at_the_data_s_length_not_the_round_s(holder, device, tiny_model_dir):
    # Batches pad to their longest example: a plan for 256-token rows would overprice short data and, on a slow
    # device, cut rows (and the answers at their end) to lengths the data never needed.
    from fedge.edge_client.training.session import encode_all

    settings = _settings(tiny_model_dir, seq_len=256)
    train_set, _ = local_work.local_data(device, settings.seed)
    data_id = fingerprint(train_set)
    need = limits.data_seq_len(holder, settings, train_set, data_id)
    tok = holder.tokenizer(settings.model)
    longest = max(len(e.input_ids) for e in encode_all(tok, train_set, 256))
    assert need % 8 == 0 and longest <= need < longest + 8 and need < 256
    assert limits.data_seq_len(holder, _settings(tiny_model_dir, seq_len=16), train_set, data_id) == 16
    device.profile = "base=pi4-2gb,slowdown=1.5"
    settings = _settings(tiny_model_dir, seq_len=256, deadline_s=60.0)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    _, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    assert json.loads(metrics[wire.Client.PLAN])["seq_len"] <= need


def test_the_initial_adapter_is_the_seeded_one_whatever_the_kept_model_holds(holder, device, tiny_model_dir):
    # A benchmark scores each federation's adapter on the model it keeps, then starts the next federation: that
    # one must start from the seeded adapter, not from the last one scored.
    settings = _settings(tiny_model_dir)
    first = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    assert all(not v.any() for k, v in first.items() if "lora_B" in k)
    local_work.do_train(holder, device, settings, first, rnd=1)  # trains the kept model's adapter
    set_adapter(holder.model, {k: v + 1.0 for k, v in first.items()})
    again = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    assert set(again) == set(first) and all(np.array_equal(again[k], first[k]) for k in first)


def test_a_planned_round_is_planned_for_the_model_it_trains(holder, device, tiny_model_dir):
    # The tiny model is ~1000x smaller than SmolLM2-135M: its plan must predict its own memory and step time.
    from fedge.edge_client.planning.costs import SMOLLM2_135M
    from fedge.edge_client.planning.plan import make_plan

    settings = _settings(tiny_model_dir, deadline_s=600.0)
    shape = limits.model_shape(device.cache_dir, settings.model)
    assert shape != SMOLLM2_135M and shape.layers == 2 and shape.hidden == 64
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    _, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    plan = json.loads(metrics[wire.Client.PLAN])
    caps = limits.device_caps(device)
    budget = limits.round_budget(settings, plan["seq_len"])
    as_smollm2 = make_plan(caps, budget, SMOLLM2_135M)
    assert plan["predicted_peak_bytes"] < as_smollm2.predicted_peak_bytes
    assert plan["predicted_step_s"] < as_smollm2.predicted_step_s / 10


def test_the_speed_memory_folds_in_measured_step_times_and_survives_a_damaged_file(device):
    from fedge.edge_client.device.emulated import PROFILES, load_profile

    profile = PROFILES["pi4-2gb"]
    caps = profile.caps()
    memory = limits.measured_speed(device, caps, "m")
    assert memory.ratios == {} and memory.correct(caps) == caps
    memory.record("fp32", 0.5)  # steps ran in half the predicted time: halfway there
    memory.record("fp32", 0.5**0.5)  # the next round, corrected by that, still fast: halfway again
    again = limits.measured_speed(device, caps, "m")
    assert again.ratios == pytest.approx({"fp32": 0.5**0.75})
    corrected = again.correct(caps)
    assert corrected.train_gflops["fp32"] == pytest.approx(caps.train_gflops["fp32"] / 0.5**0.75)
    assert corrected.train_gflops["int4"] == pytest.approx(caps.train_gflops["int4"] / 0.5**0.75)  # not measured
    assert "corrected by earlier rounds" in corrected.source
    assert limits.measured_speed(device, caps, "another model").ratios == {}
    # the same profile name with other figures (an override, a new `fedge profile`): a new device, nothing measured
    assert limits.measured_speed(device, load_profile("base=pi4-2gb,slowdown=8").caps(), "m").ratios == {}
    again.record("fp32", 1e6)  # a broken clock: ignored
    assert limits.measured_speed(device, caps, "m").ratios == pytest.approx({"fp32": 0.5**0.75})
    path = device.state_dir / limits.SPEED_FILE
    for damaged in ("{", "[1, 2]", "[" * 200_000, json.dumps({again.key: [1]}),
                    json.dumps({again.key: {"fp32": "fast", "int4": 1e9, "int8": True}})):  # fmt: skip
        path.write_text(damaged)
        assert limits.measured_speed(device, caps, "m").ratios == {}
    path.unlink()
    path.mkdir()  # a file that cannot be written: the memory is lost, the round is not
    limits.measured_speed(device, caps, "m").record("fp32", 0.5)


def test_a_device_measured_faster_than_its_profile_plans_more_work_the_next_round(device):
    # The Pi 4 profile on SmolLM2: at its profile's speed it trains a few layers at batch 1; measured 2x faster
    # than predicted, the next plan spends that on layers or batch, within the same deadline.
    from fedge.edge_client.device.emulated import PROFILES
    from fedge.edge_client.planning.costs import SMOLLM2_135M
    from fedge.edge_client.planning.plan import RoundBudget, make_plan

    profile = PROFILES["pi4-2gb"]
    budget = RoundBudget(deadline_s=120.0, steps=15, batch=8, seq_len=80, label_fraction=0.15)
    before = make_plan(profile.caps(), budget, SMOLLM2_135M)
    memory = limits.measured_speed(device, profile.caps(), "m")
    memory.record(before.precision, 0.5)
    memory.record(before.precision, 0.5**0.5)
    after = make_plan(memory.correct(profile.caps()), budget, SMOLLM2_135M)
    work = lambda p: (p.top_layers or SMOLLM2_135M.layers) * p.micro_batch * p.grad_accum * p.steps  # noqa: E731
    assert work(after) > 1.5 * work(before), (before, after)
    assert after.predicted_s <= 120.0 * (1 - budget.time_margin)


def test_a_planned_round_remembers_its_measured_speed_for_the_next(holder, device, tiny_model_dir):
    device.profile = "base=pi4-2gb,slowdown=1.5"
    settings = _settings(tiny_model_dir, deadline_s=600.0, steps=limits.SPEED_MIN_STEPS)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    _, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
    assert metrics[wire.Metric.STEPS] >= limits.SPEED_MIN_STEPS
    saved = json.loads((device.state_dir / limits.SPEED_FILE).read_text())
    (ratios,) = saved.values()
    assert set(ratios) == {json.loads(metrics[wire.Client.PLAN])["precision"]}
    _, metrics = local_work.do_train(holder, device, settings, initial, rnd=2)
    assert "corrected by earlier rounds" in json.loads(metrics[wire.Client.PLAN])["reasons"]["device"]


def test_the_energy_guard_stops_before_the_step_that_would_pass_the_budget():
    from fedge.edge_client.federation.limits import energy_guard

    class Meter:
        joules = 0.0

        def totals(self):
            return self.joules, "test"

    meter = Meter()
    guard = energy_guard(100.0, None, meter, time.monotonic, time.monotonic())
    stops = []
    for step in range(1, 20):
        meter.joules += 30.0  # each step costs 30 J
        stops.append(guard(step, 1.0, 10, 1.0))
    assert stops.index(True) == 2  # after 90 J: one more step would pass 100 J
    meter.joules = 60.0  # loading the model took 60 J before the first step: the budget has 40 J left, 8 steps
    guard = energy_guard(100.0, None, meter, time.monotonic, time.monotonic())
    stops = []
    for step in range(1, 20):
        meter.joules += 5.0
        stops.append(guard(step, 1.0, 10, 1.0))
    assert stops.index(True) == 7  # at 100 J; the first step is judged by its 5 J, not by the setup's 60
    assert energy_guard(0.0, None, meter, time.monotonic, 0.0) is None


def test_a_device_with_an_energy_budget_plans_and_trains_within_it(holder, device, tiny_model_dir):
    device.profile, device.emulated_time = "base=pi4-2gb,slowdown=40", "virtual"  # 6 W while training
    settings = _settings(tiny_model_dir, steps=200)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    _, free = local_work.do_train(holder, device, settings, initial, rnd=1)
    assert free[wire.Metric.STEPS] == 200 and not free[wire.Client.PLAN]  # no deadline, no budget: no plan
    spent_j = 6.0 * (free[wire.Metric.ROUND_SECONDS] - free[wire.Metric.UPLOAD_SECONDS])  # on the device's clock
    device.energy_budget_j = spent_j / 2
    _, limited = local_work.do_train(holder, device, settings, initial, rnd=2)
    plan = json.loads(limited[wire.Client.PLAN])
    assert "J predicted" in plan["reasons"]["energy"]
    # fewer steps than asked; how many fit depends on this host's speed in each run, the budget is what must hold
    assert 1 <= limited[wire.Metric.STEPS] < 200
    used_j = 6.0 * (limited[wire.Metric.ROUND_SECONDS] - limited[wire.Metric.UPLOAD_SECONDS])
    # A step is only judged once it has run: a first step (allocations, the first backward) that alone costs more
    # than the budget passes it, and is the only step (seen in CI: 149 J for the first step, ~2 J for the rest).
    assert used_j <= device.energy_budget_j * 1.1 or limited[wire.Metric.STEPS] == 1


@pytest.mark.parametrize("interrupted", ["send", "decline"])
def test_a_round_the_agent_cuts_short_sends_its_steps_or_declines_as_the_owner_chose(
    holder, device, tiny_model_dir, interrupted
):
    from fedge.edge_client.agent import hold

    settings = _settings(tiny_model_dir, steps=6)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    hold.set_hold(device.state_dir, "heat: 91 C >= 85 C", interrupted)  # this process stands in for the agent
    try:
        if interrupted == "decline":
            with pytest.raises(local_work.RoundDeclined, match=r"interrupted after 1 of 6 steps: heat: 91 C"):
                local_work.do_train(holder, device, settings, initial, rnd=1)
            assert list((device.state_dir / "work").glob("*/*")), "the trained step is kept on the device"
        else:
            _, metrics = local_work.do_train(holder, device, settings, initial, rnd=1)
            assert metrics[wire.Metric.STEPS] == 1
    finally:
        hold.clear_hold(device.state_dir)


def test_score_first_reports_the_received_adapters_evaluation_with_the_training(holder, device, tiny_model_dir):
    # A train message with Cfg.SCORE_FIRST: the reply carries, under Metric.PRIOR, exactly what an evaluate message
    # for the same adapter would have said; the trained update is the same as without it.
    settings = _settings(tiny_model_dir, eval_examples=6)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    received = {k: v + (0.05 if "lora_B" in k else 0.0) for k, v in initial.items()}  # an adapter that did train
    evaluated = local_work.do_evaluate(holder, device, settings, received)
    plain, plain_metrics = local_work.do_train(holder, device, settings, received, rnd=1)
    scored, metrics = local_work.do_train(holder, device, dataclasses.replace(settings, steps=2), received, 1, True)
    prior = {k[len(wire.Metric.PRIOR) :]: v for k, v in metrics.items() if k.startswith(wire.Metric.PRIOR)}
    for key in (wire.Metric.EXACT_MATCH, wire.Metric.HELDOUT_LOSS, wire.Metric.EVAL_EXAMPLES):
        assert prior[key] == pytest.approx(evaluated[key], abs=1e-6), key
    assert prior[wire.Metric.EVAL_EXAMPLES] == 6 and prior[wire.Metric.EVAL_SECONDS] > 0
    assert not any(k.startswith(wire.Metric.PRIOR) for k in plain_metrics)  # not asked: not scored
    assert metrics[wire.Metric.STEPS] == 2 and plain_metrics[wire.Metric.STEPS] == 3


def test_a_scoring_failure_does_not_cost_the_rounds_update(holder, device, tiny_model_dir, monkeypatch):
    settings = _settings(tiny_model_dir)
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)

    def broken(*args):
        raise OSError("held-out file vanished")

    monkeypatch.setattr(local_work, "_evaluate_turn", broken)
    arrays, metrics = local_work.do_train(holder, device, settings, initial, 1, score_first=True)
    assert arrays and metrics[wire.Metric.STEPS] == 3
    assert not any(k.startswith(wire.Metric.PRIOR) for k in metrics)  # the server records no evaluation from it
