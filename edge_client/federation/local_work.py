"""A client's work for one round, independent of how the message arrived: train or evaluate the global adapter.

Used by the ClientApp in-process, by the warm worker (:mod:`fedge.edge_client.federation.worker`) that keeps the model
loaded between rounds, by the simulation engine and by the benchmarks, so all of them train the same way.

Local work is never lost to a restart: training checkpoints every few steps into a work directory named by
the global adapter, the round settings, the data and the round, and the finished update is saved there
before the reply goes out. The same message after a restart resumes that work or replies from it at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from fedge.common import wire
from fedge.common.modeling import ModelHolder, get_adapter, set_adapter
from fedge.edge_client.agent import hold
from fedge.edge_client.federation import limits, reply
from fedge.edge_client.federation.limits import RoundDeclined
from fedge.edge_client.federation.settings import Device

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


def open_adapter(holder: ModelHolder, settings: wire.RoundSettings, plan=None) -> tuple:
    """(session, peft model) with a LoRA adapter of the round's shape (or the plan's), reusing what is loaded."""
    precision, compute = (plan.precision, plan.compute_dtype) if plan is not None else (None, None)
    return holder.adapter(settings.model, lora_settings(settings, plan), settings.seed, precision, compute)


def lora_settings(settings: wire.RoundSettings, plan=None):
    """The round's LoRA shape; a training plan may lower the rank and train fewer layers or targets.

    A lower-rank client keeps the federation's alpha, so its scale is ``alpha / r``: it starts from the global
    adapter cut to its rank in that scale (`fedge.common.lora.for_client`) and the server merges it back.
    """
    lora = settings.lora()
    return dataclasses.replace(lora, **plan.lora_overrides()) if plan is not None else lora


def train_config(settings: wire.RoundSettings, rnd: int, plan=None):
    """Local training for round ``rnd``: the data order is seeded per round, so rounds see different batches."""
    from fedge.edge_client.training.train import TrainConfig

    cfg = TrainConfig(
        steps=settings.steps,
        micro_batch=settings.batch,
        lr=settings.lr,
        seq_len=settings.seq_len,
        seed=settings.seed * 1000 + rnd,
        warmup_steps=min(10, settings.steps // 5),
        lr_schedule="constant",
        checkpoint_every=10,
        lora=lora_settings(settings, plan),
    )
    return cfg if plan is None else dataclasses.replace(cfg, **plan.train_overrides())


def local_data(device: Device, seed: int) -> tuple[list, list]:
    """(train, held-out): ``eval-data`` if the node has it, else 10% of ``data`` held out."""
    from fedge.edge_client.training.data import load_examples
    from fedge.edge_client.training.session import split_heldout

    examples = load_examples(device.data)
    if device.eval_data:
        return examples, load_examples(device.eval_data)
    return split_heldout(examples, 0.1, seed)


def do_train(
    holder: ModelHolder, device: Device, settings: wire.RoundSettings, global_arrays: Arrays, rnd: int,
    score_first: bool = False,
) -> tuple[Arrays, dict]:  # fmt: skip
    """Train the global adapter for the round on local data: (the reply's arrays, metrics).

    With ``device.turns`` the work waits for its turn on this machine first (`fedge.edge_client.federation.turns`); the
    round's clock starts once it has it.
    """
    from fedge.edge_client.federation.turns import turn

    with turn(device.turns):
        return _train_turn(holder, device, settings, global_arrays, rnd, score_first)


def _train_turn(
    holder: ModelHolder, device: Device, settings: wire.RoundSettings, global_arrays: Arrays, rnd: int,
    score_first: bool,
) -> tuple[Arrays, dict]:  # fmt: skip
    """`do_train`'s work, once it is this client's turn.

    With ``score_first`` the received adapter is scored on the held-out examples before training (`do_evaluate`),
    and the metrics carry that evaluation under the `wire.Metric.PRIOR` prefix: the server then needs no separate
    evaluate message for it.

    With ``settings.deadline_s`` the device first plans the round (`fedge.edge_client.planning.plan`) and re-plans from
    its measured steps; with ``settings.codec`` it replies with its encoded change instead of the whole adapter.
    An emulated device (``device.profile``) runs at its speed, under its memory cap, behind its link.
    Raises `fedge.edge_client.device.emulated.EmulatedOutOfMemory` past an emulated memory cap, and `RoundDeclined` when
    no plan fits the round.
    """
    from fedge.edge_client.device.energy import EnergySession
    from fedge.edge_client.training.data import fingerprint
    from fedge.edge_client.training.session import epoch_maker
    from fedge.edge_client.training.train import train

    clock = limits.DeviceClock(virtual=device.emulated_time == "virtual")
    train_set, _ = local_data(device, settings.seed)
    data_id = fingerprint(train_set)
    key = f"{data_id}|{device.profile}|{rnd}|{int(score_first)}"
    work = device.state_dir / "work" / reply.work_key(global_arrays, settings, key)
    if (work / reply.UPDATE_FILE).is_file():  # finished before a restart: reply with that work
        arrays, metrics = reply.load_update(work)
        reply.commit_residual(work, device, settings)  # in case the restart came before it was in place
        return arrays, {**metrics, wire.Metric.RESUMED: 1}
    started = clock()
    profile = limits.emulated_profile(device)
    if settings.plan:
        plan, budget = settings.pinned_plan(), None  # trained as pinned: no re-planning
    elif settings.deadline_s > 0 or device.energy_budget_j > 0:
        plan, budget = limits.plan_round(
            device, settings, profile, limits.data_seq_len(holder, settings, train_set, data_id)
        )
    else:
        plan, budget = None, None
    # scored once the round is planned (a round declined costs no scoring), on the round's clock: the re-planner
    # sees the seconds it took against the deadline
    t0 = clock()
    prior = _score_received(holder, device, settings, global_arrays) if score_first else {}
    scoring_seconds = clock() - t0
    session, model = open_adapter(holder, settings, plan)
    start = reply.start_arrays(global_arrays, settings, get_adapter(model))
    set_adapter(model, start)
    load_seconds = clock() - started - scoring_seconds
    cfg = train_config(settings, rnd, plan)
    planned_steps = cfg.steps
    # the loop's room, up to the round's examples: the re-planner stops it at the re-planned steps. Not with an energy
    # budget: the re-planner counts time, not joules, so the plan's energy margin would go to the guard's last step.
    if budget is not None and budget.energy_budget_j is None:
        from fedge.edge_client.planning.plan import step_cap

        cfg = dataclasses.replace(cfg, steps=step_cap(plan, budget))
    with EnergySession(interval_s=1.0) as meter, limits.emulated_steps(profile, clock) as emulated_step:
        replanner = limits.replanner(plan, budget, started, clock)
        try:
            result = train(
                model,
                epoch_maker(session.tokenizer, train_set, cfg),
                cfg,
                session.device,
                state_dir=work,
                run_id=f"{session.model_dir}|{data_id}",
                on_step=limits.chain_steps(
                    emulated_step,
                    replanner,
                    limits.energy_guard(device.energy_budget_j, profile, meter, clock, started),
                    _agent_step(device.state_dir, rnd, planned_steps),
                ),
            )
        finally:
            hold.clear_progress(device.state_dir)
    _decline_if_interrupted(device, result.steps, replanner.plan.steps if replanner is not None else cfg.steps)
    trained = get_adapter(model)
    arrays, codec, feedback = reply.reply_arrays(
        device, settings, trained, start, global_arrays, profile, clock() - started
    )
    upload_bytes = sum(a.nbytes for a in arrays.values())
    upload_seconds = profile.link.transfer(upload_bytes, "up", clock.sleep) if profile is not None else 0.0
    metrics = {
        wire.Metric.EXAMPLES: len(train_set),
        wire.Metric.STEPS: result.steps,
        wire.Metric.TOKENS: result.tokens,
        wire.Metric.TRAIN_LOSS: result.final_loss,
        wire.Metric.TRAIN_SECONDS: result.seconds,
        wire.Metric.LOAD_SECONDS: load_seconds,
        wire.Metric.PEAK_RSS_MB: result.peak_rss_mb,
        wire.Metric.ENERGY_J: meter.result.joules,
        wire.Metric.UPLOAD_BYTES: upload_bytes,
        wire.Metric.UPLOAD_SECONDS: upload_seconds,
        wire.Metric.ROUND_SECONDS: clock() - started,
        wire.Metric.DEADLINE_S: settings.deadline_s,
        # strings: the ClientApp moves them to the CLIENT record
        wire.Client.ENERGY_METHOD: meter.result.method,
        wire.Client.CODEC: codec,
        wire.Client.PLAN: _ran(replanner.plan if replanner is not None else plan, result.steps),
        wire.Client.PROFILE: profile.name if profile is not None else "",
        **prior,
    }
    # Before replying: a lost reply costs a resend, not the training. The new residual is saved with the update (it
    # belongs to it: what this update left out); it replaces the live one only once the update is complete, and a
    # resumed reply puts it in place again, so a kill between the two never sends the old residual a second time.
    reply.save_update(work, arrays, metrics, feedback.to_bytes() if feedback is not None else None)
    reply.commit_residual(work, device, settings)
    # once the update is saved: a round resumed after a kill re-plans as it first did, finds its checkpoint, and is
    # counted once
    limits.remember_speed(device, profile, settings.model, replanner)
    reply.prune_work(work.parent)
    return arrays, {**metrics, wire.Metric.RESUMED: 0}


def _score_received(holder: ModelHolder, device: Device, settings: wire.RoundSettings, arrays: Arrays) -> dict:
    """`do_evaluate` of the adapter a train message brought, as `wire.Metric.PRIOR` metrics; {} if scoring fails
    (the server then records no evaluation from this client; the update still goes)."""
    try:
        metrics = _evaluate_turn(holder, device, settings, arrays)  # in do_train's turn already
    except Exception:  # noqa: BLE001 (an evaluation problem must not cost the round's training)
        log.warning("%s: could not score the received adapter", device.name, exc_info=True)
        return {}
    return {wire.Metric.PRIOR + k: v for k, v in metrics.items() if v is not None}


def _agent_step(state_dir: Path, rnd: int, steps: int):
    """The training loop's side of the background agent (:mod:`fedge.edge_client.agent.hold`): progress after each step,
    and a stop after the step during which the agent put a hold on the device (the round then sends what it
    trained: the steps are not lost)."""
    hold.write_progress(state_dir, "train", rnd, 0, steps)

    def on_step(step: int, loss: float, tokens: int, seconds: float) -> bool:
        hold.write_progress(state_dir, "train", rnd, step, max(step, steps))  # a re-plan may add steps
        return hold.held(state_dir) is not None

    return on_step


def _decline_if_interrupted(device: Device, steps: int, planned: int) -> None:
    """A round the agent cut short declines when its owner chose so (`fedge.edge_client.agent.hold.interrupted_policy`);
    by default it goes on and sends what it trained. Its checkpoint stays in the work directory either way."""
    reason = hold.held(device.state_dir)
    if reason is not None and steps < planned and hold.interrupted_policy(device.state_dir) == "decline":
        raise RoundDeclined(f"{device.name}: interrupted after {steps} of {planned} steps: {reason}")


def _ran(plan, steps: int) -> str:
    """The plan as it ran, JSON ("" without one): its steps are the steps trained (the re-planned count, or fewer
    when a guard or the agent stopped the loop), so pinning it replays the round."""
    return dataclasses.replace(plan, steps=steps).to_json() if plan is not None else ""


def do_evaluate(holder: ModelHolder, device: Device, settings: wire.RoundSettings, global_arrays: Arrays) -> dict:
    """Held-out loss and exact match of the global adapter on this device's held-out examples (in its turn, as
    `do_train`)."""
    from fedge.edge_client.federation.turns import turn

    with turn(device.turns):
        return _evaluate_turn(holder, device, settings, global_arrays)


def _evaluate_turn(holder: ModelHolder, device: Device, settings: wire.RoundSettings, global_arrays: Arrays) -> dict:
    from fedge.edge_client.training.evaluate import evaluate

    _, heldout = local_data(device, settings.seed)
    heldout = heldout[:: max(1, len(heldout) // settings.eval_examples)][: settings.eval_examples]
    t0 = time.time()
    session, model = open_adapter(holder, settings)
    set_adapter(model, global_arrays)
    load_seconds = time.time() - t0
    hold.write_progress(device.state_dir, "evaluate", 0, 0, 0)
    try:
        # the held-out loss comes from the pass that decides exact match (loss batches None)
        result = evaluate(model, session.tokenizer, None, heldout, session.device, seq_len=settings.seq_len)
    finally:
        hold.clear_progress(device.state_dir)
    metrics = {
        wire.Metric.EVAL_EXAMPLES: len(heldout),
        wire.Metric.HELDOUT_LOSS: result.loss,
        wire.Metric.LOAD_SECONDS: load_seconds,
        wire.Metric.EVAL_SECONDS: time.time() - t0 - load_seconds,
    }
    if result.exact_match is not None:
        metrics[wire.Metric.EXACT_MATCH] = result.exact_match
    return metrics
