"""The training planner: fits memory, deadline and upload on every emulated device, degrades in the documented
order, declines with a reason when nothing fits, and re-plans from measured step times."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedge.edge_client.device.emulated import PROFILES
from fedge.edge_client.planning.plan import (
    GIB,
    HOST,
    LADDER,
    SMOLLM2_135M,
    DeviceCaps,
    Knobs,
    ModelShape,
    Replanner,
    RoundBudget,
    TrainingPlan,
    _max_steps,
    estimate,
    make_plan,
    replan,
    step_cap,
)

FAST = {"fp32": 1e6, "bf16": 1e6, "int8": 1e6, "int4": 1e6}  # GFLOP/s: time never binds


def _caps(memory=64 * GIB, gflops=None, **kw) -> DeviceCaps:
    return DeviceCaps("test", 2, int(memory), dict(gflops or FAST), bf16_native=True, **kw)


def _fits(plan: TrainingPlan, caps: DeviceCaps, budget: RoundBudget) -> None:
    cap = min(caps.memory_bytes, budget.memory_cap_bytes or caps.memory_bytes)
    assert plan.predicted_peak_bytes <= cap * (1 - budget.memory_margin)
    assert plan.predicted_s <= budget.deadline_s * (1 - budget.time_margin)
    if budget.upload_budget_bytes is not None:
        assert plan.predicted_upload_bytes <= budget.upload_budget_bytes


def _level(plan: TrainingPlan, caps: DeviceCaps, budget: RoundBudget) -> tuple:
    """How far a plan gave up quality, most important knob first (steps ... precision)."""
    layers = plan.top_layers or SMOLLM2_135M.layers
    return (
        budget.steps - plan.steps,
        -plan.lora_r,
        -layers,
        -plan.seq_len,
        -plan.micro_batch * plan.grad_accum,
        plan.grad_accum,
        plan.gradient_checkpointing,
        caps.precisions.index(plan.precision),
    )


@pytest.mark.parametrize("device", sorted(PROFILES))
@pytest.mark.parametrize("deadline", [60, 120, 600])
@pytest.mark.parametrize("memory_cap", [None, int(1.5 * GIB)])
def test_plan_respects_memory_cap_and_deadline_on_every_emulated_device(device, deadline, memory_cap):
    caps = PROFILES[device].caps()
    budget = RoundBudget(deadline_s=deadline, steps=15, r_max=16, memory_cap_bytes=memory_cap)
    plan = make_plan(caps, budget, SMOLLM2_135M)
    assert plan.feasible, plan.reasons
    _fits(plan, caps, budget)
    assert 1 <= plan.steps <= 15 and plan.lora_r <= 16
    assert plan.precision in PROFILES[device].precisions


def test_unconstrained_device_keeps_every_requested_setting():
    budget = RoundBudget(deadline_s=1e6, steps=15, batch=8, seq_len=256, r_max=16)
    plan = make_plan(_caps(), budget, SMOLLM2_135M)
    assert (plan.precision, plan.lora_r, plan.top_layers, plan.seq_len) == ("fp32", 16, None, 256)
    assert (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing, plan.steps) == (8, 1, False, 15)
    assert plan.reasons["feasible"] == "fits with the requested steps"


# Constants of a made-up machine, so the ordering tests do not move when the real calibration does.
TEST_HOST = dataclasses.replace(
    HOST,
    runtime_bytes=100e6,
    train_overhead_bytes=0.0,
    token_bytes=0.0,
    load_extra_bytes={p: 0.0 for p in LADDER},
    act_scale={"fp32": 1.0, "bf16": 1.0},
)


def test_memory_pressure_gives_up_precision_then_checkpointing_then_micro_batch():
    budget = RoundBudget(deadline_s=1e6, memory_margin=0.0)
    top = make_plan(_caps(), budget, SMOLLM2_135M, host=TEST_HOST)
    fractions = [1 - i / 40 for i in range(1, 38)]
    plans = [
        make_plan(_caps(memory=top.predicted_peak_bytes * f), budget, SMOLLM2_135M, host=TEST_HOST) for f in fractions
    ]
    plans = [p for p in plans if p.feasible and p.seq_len == 256]
    assert plans[0].precision == "bf16" and not plans[0].gradient_checkpointing  # precision goes first
    assert plans[0].reasons["precision"].startswith("bf16: fp32 would not fit (memory")
    levels = [_level(p, _caps(), budget) for p in plans]
    assert levels == sorted(levels)
    first_ckpt = next(i for i, p in enumerate(plans) if p.gradient_checkpointing)
    first_micro = next(i for i, p in enumerate(plans) if p.micro_batch < 8)
    assert first_ckpt < first_micro and plans[first_ckpt - 1].precision == "int4"  # all precisions tried first
    assert plans[first_micro].micro_batch * plans[first_micro].grad_accum == 8  # the requested batch is kept
    assert plans[first_micro].gradient_checkpointing
    for p in plans:
        assert (p.lora_r, p.top_layers, p.steps) == (16, None, 15)


def test_tighter_deadlines_never_give_up_a_more_important_knob_first():
    caps = dataclasses.replace(PROFILES["pi5-8gb"].caps(), memory_bytes=64 * GIB)  # time binds, not memory
    levels = []
    for deadline in (20000, 5000, 2000, 800, 300, 120, 60, 30):
        budget = RoundBudget(deadline_s=deadline)
        levels.append(_level(make_plan(caps, budget, SMOLLM2_135M), caps, budget))
    assert levels == sorted(levels)  # lexicographically: steps ... precision, the last given up first
    assert levels[0] == (0, -16, -30, -256, -8, 1, False, 0)


def test_steps_are_cut_only_when_nothing_else_fits_and_no_knob_is_given_up_for_one_step():
    caps = _caps(gflops={p: 0.05 for p in LADDER})  # very slow
    budget = RoundBudget(deadline_s=3000, steps=15)
    plan = make_plan(caps, budget, SMOLLM2_135M)
    assert plan.feasible and 1 <= plan.steps < 15
    assert plan.reasons["feasible"].startswith("the requested 15 steps do not fit")
    _fits(plan, caps, budget)
    # The leanest configuration (one layer, shortest rows, micro-batch 1) would allow at most one more step:
    # the plan keeps more layers rather than win that step.
    leanest = Knobs(plan.precision, False, 1, 1, 64, 1, 16)
    most = _max_steps(estimate(leanest, caps, budget, SMOLLM2_135M, HOST), budget)
    assert most - 1 <= plan.steps <= most
    assert plan.lora_r == 16 and plan.top_layers > 1
    assert dataclasses.replace(plan, steps=plan.steps + 1).steps * plan.predicted_step_s > 3000 * 0.85 - (
        plan.predicted_s - plan.steps * plan.predicted_step_s
    )  # one more step would miss the deadline


def test_infeasible_when_memory_is_too_small_with_reason():
    plan = make_plan(_caps(memory=300e6), RoundBudget(deadline_s=600), SMOLLM2_135M)
    assert not plan.feasible and plan.steps == 0
    assert "memory" in plan.reasons["feasible"]


def test_infeasible_when_one_step_misses_the_deadline_with_reason():
    plan = make_plan(_caps(gflops={p: 1e-3 for p in LADDER}), RoundBudget(deadline_s=60), SMOLLM2_135M)
    assert not plan.feasible and "time" in plan.reasons["feasible"]


def test_upload_budget_shrinks_the_adapter():
    budget = RoundBudget(deadline_s=1e6, upload_budget_bytes=2_000_000)
    plan = make_plan(_caps(), budget, SMOLLM2_135M)
    assert plan.feasible and plan.predicted_upload_bytes <= 2_000_000
    assert plan.lora_r < 16 or plan.top_layers is not None


def test_slow_link_counts_in_the_deadline():
    fast, slow = _caps(uplink_bytes_per_s=100e6), _caps(uplink_bytes_per_s=50_000)
    budget = RoundBudget(deadline_s=300)
    assert make_plan(fast, budget, SMOLLM2_135M).predicted_upload_s < 1
    plan = make_plan(slow, budget, SMOLLM2_135M)
    assert plan.predicted_upload_s > 10 and plan.predicted_upload_bytes / 50_000 < 300 * 0.85


def test_device_without_bf16_computes_quantized_weights_in_fp32():
    caps = PROFILES["pi4-2gb"].caps()
    assert "bf16" not in caps.precisions
    plan = make_plan(caps, RoundBudget(deadline_s=120, memory_cap_bytes=int(0.5 * GIB)), SMOLLM2_135M, host=TEST_HOST)
    assert plan.feasible and plan.precision in ("int8", "int4") and plan.compute_dtype == "fp32"


def test_plan_is_json_and_sets_a_valid_train_config():
    from fedge.edge_client.training.train import TrainConfig

    plan = make_plan(PROFILES["pi4-2gb"].caps(), RoundBudget(deadline_s=120), SMOLLM2_135M)
    back = TrainingPlan.from_dict(json.loads(plan.to_json()))
    assert back == plan
    base = TrainConfig()
    cfg = dataclasses.replace(
        base, **plan.train_overrides(), lora=dataclasses.replace(base.lora, **plan.lora_overrides())
    )
    assert cfg.steps == plan.steps and cfg.lora.r == plan.lora_r and cfg.lora.top_layers == plan.top_layers


def test_unknown_target_and_bad_budget_are_named():
    with pytest.raises(ValueError, match="lm_head"):
        make_plan(_caps(), RoundBudget(deadline_s=60, targets=("q_proj", "lm_head")), SMOLLM2_135M)
    with pytest.raises(ValueError, match="deadline_s"):
        RoundBudget(deadline_s=0)
    with pytest.raises(ValueError, match="bogus"):
        RoundBudget.from_dict({"deadline_s": 60, "bogus": 1})


def test_budget_from_the_federations_round_settings():
    from fedge.common.wire import RoundSettings

    settings = RoundSettings(steps=10, batch=4, seq_len=128, lora_r=8, lora_targets="q_proj, v_proj")
    budget = RoundBudget.from_round_settings(settings, 90.0, memory_cap_bytes=GIB)
    assert (budget.steps, budget.batch, budget.seq_len, budget.r_max) == (10, 4, 128, 8)
    assert budget.targets == ("q_proj", "v_proj") and budget.memory_cap_bytes == GIB


def test_caps_from_a_profiler_report():
    report = {"name": "box", "threads": 4, "memory_bytes": 8 * GIB, "bf16_native": False}
    report |= {"matmul_gflops": {"fp32": 153.0, "bf16": 20.0}, "peak_rss_mb": 900, "train_tokens_per_s": 50}
    caps = DeviceCaps.from_dict(report)
    assert "bf16" not in caps.train_gflops  # bf16 without a native path is not offered
    assert caps.train_gflops["fp32"] == pytest.approx(PROFILES["laptop"].caps().train_gflops["fp32"] / 2, rel=1e-6)
    assert DeviceCaps.from_dict(caps.to_dict()) == caps
    with pytest.raises(ValueError, match="memory_bytes"):
        DeviceCaps.from_dict({"name": "x", "threads": 1, "train_gflops": {"fp32": 1.0}})


# --- re-planning --------------------------------------------------------------------------------------------


def _plan_for(steps=15, deadline=100.0):
    caps = _caps(gflops={p: 1.0 for p in LADDER}, uplink_bytes_per_s=1e9, latency_s=0.0)
    budget = RoundBudget(deadline_s=deadline, steps=steps, time_margin=0.0)
    return dataclasses.replace(
        make_plan(caps, budget, SMOLLM2_135M), steps=10, predicted_step_s=5.0, predicted_upload_s=0.0
    ), budget


def test_replan_cuts_steps_when_the_first_steps_are_slow():
    plan, budget = _plan_for()
    new = replan(plan, [10.0, 10.0], elapsed_s=25.0, budget=budget)  # twice as slow as predicted
    assert new.calibration == pytest.approx(2.0)
    assert new.steps == 2 + 7  # (100 - 25) // 10 more steps
    assert "re-planned after 2 steps" in new.reasons["steps"]


def test_replan_gives_back_cut_steps_when_fast_but_never_exceeds_the_requested_examples_or_undoes_work():
    plan, budget = _plan_for(steps=15)
    full = dataclasses.replace(plan, micro_batch=4, grad_accum=2)  # the requested batch of 8: the requested steps
    assert replan(full, [1.0, 1.0, 1.0], elapsed_s=3.0, budget=budget).steps == 15
    # At batch 2 the requested 15 x 8 examples are 60 steps; at batch 1, 120, of which 97 fit the time left.
    assert replan(dataclasses.replace(plan, micro_batch=2, grad_accum=1), [1.0] * 3, 3.0, budget).steps == 60
    small = replan(dataclasses.replace(plan, micro_batch=1, grad_accum=1), [1.0] * 3, 3.0, budget)
    assert small.steps == 3 + 97 and "at most 120" in small.reasons["steps"]
    assert replan(plan, [50.0, 50.0], elapsed_s=100.0, budget=budget).steps == 2  # out of time: stop now
    assert replan(plan, [], elapsed_s=0.0, budget=budget) is plan


def test_replan_leaves_out_the_warm_up_step_and_a_cold_first_step_does_not_end_the_round():
    plan, budget = _plan_for()
    assert replan(plan, [40.0, 5.0, 5.0], elapsed_s=50.0, budget=budget).calibration == pytest.approx(1.0)
    assert replan(plan, [40.0, 5.0], elapsed_s=45.0, budget=budget).calibration == pytest.approx(1.0)
    # One cold step (8x the prediction): the prediction stands until a warm step is timed.
    first = replan(plan, [40.0], elapsed_s=40.0, budget=budget)
    assert first.steps > 1 and first.calibration == pytest.approx(1.0)


def test_replanner_stops_the_loop_at_the_replanned_step():
    plan, budget = _plan_for()
    now = [0.0]
    replanner = Replanner(plan, budget, started=0.0, clock=lambda: now[0])
    replanner.start()
    stops = []
    for step in range(1, 11):
        now[0] += 20.0  # 4x slower than the 5 s predicted
        stops.append(replanner(step, 1.0, 100, 5.0))
        if stops[-1]:
            break
    assert replanner.step_s[:2] == [20.0, 20.0]
    assert stops[-1] is True and len(stops) == replanner.plan.steps == 5  # 100 s / 20 s


def test_a_plan_runs_end_to_end_on_the_tiny_model_and_the_replanner_cuts_it_short(fresh_session):
    """Plan -> TrainConfig -> train() with an emulated device's callback and a Replanner that stops early."""
    import torch

    from fedge.common.modeling import LoraSettings, add_lora
    from fedge.edge_client.device.emulated import chain, emulate, load_profile
    from fedge.edge_client.training.data import load_examples
    from fedge.edge_client.training.session import epoch_maker
    from fedge.edge_client.training.train import TrainConfig, train

    budget = RoundBudget(deadline_s=100, steps=6, batch=4, seq_len=64, r_max=4, targets=("q_proj", "v_proj"))
    caps = _caps(gflops={p: 1e4 for p in LADDER}, uplink_bytes_per_s=1e9, latency_s=0.0)
    plan = make_plan(
        caps, budget, model=ModelShape(layers=2, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=2)
    )
    assert plan.feasible and plan.steps == 6
    base = TrainConfig(warmup_steps=1, checkpoint_every=0)
    cfg = dataclasses.replace(base, **plan.train_overrides(), lora=LoraSettings(**plan.lora_overrides()))
    model = add_lora(fresh_session.model, cfg.lora)
    make = epoch_maker(fresh_session.tokenizer, load_examples("demo:iot")[:40], cfg)
    now = [0.0]
    replanner = Replanner(plan, budget, started=0.0, clock=lambda: now[0])

    def fake_sleep(seconds):
        slept.append(seconds)
        now[0] += 30.0  # the emulated device's clock: every step takes 30 s, whatever this machine did

    slept = []
    profile = load_profile("base=laptop,slowdown=30,memory_bytes=64e9")
    with emulate(profile, sleep=fake_sleep) as device_step:
        replanner.start()
        result = train(model, make, cfg, torch.device("cpu"), on_step=chain(device_step, replanner))
    assert result.steps == replanner.plan.steps == 2  # 100 s x 0.85 allows 2 steps of 30 s
    assert len(slept) == 2 and replanner.plan.calibration > 1


def test_a_device_with_room_for_one_step_gets_a_one_step_plan():
    caps = _caps(gflops={p: 0.05 for p in LADDER})
    for deadline in (3000, 1500, 800, 400):
        plan = make_plan(caps, RoundBudget(deadline_s=deadline, steps=15), SMOLLM2_135M)
        if plan.feasible and plan.steps == 1:
            break
    assert plan.feasible and plan.steps == 1, plan.reasons["feasible"]


def test_the_plan_follows_the_shape_of_the_model_it_trains():
    # The planner reads the model's config: a SmolLM2-like Llama, a Qwen2-style model (wider, 151k vocabulary)
    # and a Gemma-3-style one (head_dim 256 != hidden / heads, 262k vocabulary) cost differently on one device.
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    configs = {
        "llama": LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
        "qwen2": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "gemma3": Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=256, vocab_size=262144),
    }  # fmt: skip
    shapes = {name: ModelShape.from_hf_config(c) for name, c in configs.items()}
    assert shapes["llama"] == SMOLLM2_135M
    assert shapes["gemma3"].module_dims("q_proj") == (640, 1024) and shapes["gemma3"].module_dims("o_proj") == (
        1024,
        640,
    )
    caps, budget = _caps(memory=16 * GIB), RoundBudget(deadline_s=3600, steps=15)
    plans = {name: make_plan(caps, budget, shape) for name, shape in shapes.items()}
    memory = {name: p.predicted_peak_bytes for name, p in plans.items()}
    step_s = {name: p.predicted_step_s for name, p in plans.items()}
    assert memory["llama"] < memory["gemma3"] < memory["qwen2"], memory
    assert step_s["llama"] < step_s["qwen2"] and len(set(step_s.values())) == 3, step_s
    untied = ModelShape.from_hf_config(Qwen2Config(tie_word_embeddings=False))
    assert untied.embed_params == 2 * untied.vocab * untied.hidden


# --- the device's energy budget --------------------------------------------------------------------------------

SLOWISH = {"fp32": 50.0, "bf16": 50.0, "int8": 50.0, "int4": 50.0}  # GFLOP/s: a step takes seconds


def test_an_energy_budget_cuts_the_plan_to_what_it_allows_and_says_so():
    caps, budget = _caps(gflops=SLOWISH, train_watts=10.0), RoundBudget(deadline_s=1e6, steps=40)
    free = make_plan(caps, budget, SMOLLM2_135M)
    assert free.steps == 40 and "energy" not in free.reasons
    full_j = free.predicted_step_s * free.steps * 10.0  # no overhead here: training time x power
    limited = make_plan(caps, dataclasses.replace(budget, energy_budget_j=full_j / 3), SMOLLM2_135M)
    assert limited.feasible and limited.predicted_step_s * limited.steps * 10 <= full_j / 3  # cheaper knobs first
    assert _level(limited, caps, budget) > _level(free, caps, budget)
    assert "J predicted" in limited.reasons["energy"]
    starved = make_plan(caps, dataclasses.replace(budget, energy_budget_j=full_j / 300), SMOLLM2_135M)
    assert starved.feasible and 0 < starved.steps < 40 and "energy budget" in starved.reasons["feasible"]
    assert starved.predicted_step_s * starved.steps * 10.0 <= full_j / 300 * (1 - budget.time_margin)


def test_an_energy_budget_without_a_power_figure_or_too_small_for_one_step_declines_with_the_reason():
    budget = RoundBudget(deadline_s=1e6, steps=10, energy_budget_j=50.0)
    unknown = make_plan(_caps(gflops=SLOWISH), budget, SMOLLM2_135M)
    assert not unknown.feasible and "power while training is unknown" in unknown.reasons["feasible"]
    tiny = make_plan(_caps(gflops=SLOWISH, train_watts=1e4), budget, SMOLLM2_135M)
    assert not tiny.feasible and "energy:" in tiny.reasons["feasible"]


def test_a_round_without_a_deadline_plans_for_the_energy_budget_alone():
    caps = _caps(gflops=SLOWISH, train_watts=10.0)
    plan = make_plan(caps, RoundBudget(deadline_s=float("inf"), steps=1000, energy_budget_j=2000.0), SMOLLM2_135M)
    assert plan.feasible and 0 < plan.steps < 1000
    assert plan.predicted_step_s * plan.steps * 10.0 <= 2000.0 * 0.85
    unlimited = RoundBudget(deadline_s=float("inf"), steps=1000)
    replanned = replan(plan, [1.0, 1.0], 2.0, unlimited)
    # no deadline: time never cuts it (the energy guard does, from the meter)
    assert replanned.steps == step_cap(plan, unlimited) >= 1000


def test_emulated_profiles_carry_their_power_and_files_may_leave_it_out(tmp_path):
    from fedge.edge_client.device.emulated import load_profile

    assert PROFILES["pi4-2gb"].caps().train_watts == 6.0
    path = tmp_path / "board.json"
    path.write_text(json.dumps({**dataclasses.asdict(PROFILES["pi5-8gb"]), "name": "board", "train_watts": 0}))
    assert load_profile(str(path)).caps().train_watts is None
    assert load_profile("base=pi5-8gb,train_watts=3.5").caps().train_watts == 3.5
    with pytest.raises(Exception, match="train_watts"):
        load_profile("base=pi5-8gb,train_watts=-1")
