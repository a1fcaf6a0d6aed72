"""A client's work for one round, independent of how the message arrived: train or evaluate the global adapter.

Used by the ClientApp in-process, by the warm worker (:mod:`fedge.edge_client.worker`) that keeps the model loaded
between rounds, by the simulation engine and by the benchmarks, so all of them train the same way.

Local work is never lost to a restart: training checkpoints every few steps into a work directory named by
the global adapter, the round settings, the data and the round, and the finished update is saved there
before the reply goes out. The same message after a restart resumes that work or replies from it at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.common import wire
from fedge.common.fsutil import atomic_write_bytes, atomic_write_text
from fedge.common.modeling import ModelHolder, get_adapter, set_adapter
from fedge.common.settings import from_config, setting, to_config
from fedge.edge_client import hold
from fedge.quantization import PRECISIONS

UPDATE_FILE, METRICS_FILE, RESIDUAL_FILE = "update.npz", "metrics.json", "residual.npz"
KEEP_WORK_DIRS = 3
log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


@dataclass
class Device:
    """This device's side of the federation: ``fedge client start``'s device flags, a config file's ``[device]``
    table, and the SuperNode's node config the ClientApp reads (`fedge.common.settings`)."""

    name: str = setting("", "how the server's records name this client (default: from --data)")
    data: str = setting("", "this device's training data: a JSONL/CSV/TXT file or demo:DOMAIN")
    eval_data: str | None = setting(None, "held-out data (default: 10%% of --data)")
    state_dir: Path | None = setting(
        None, "local work and checkpoints (default: ~/.fedge/clients/NAME)", flag="--state"
    )
    cache_dir: Path | None = setting(None, "the model cache (default: fedge's; `fedge --cache-dir`)")
    precision: str = setting("auto", "base weights", choices=PRECISIONS)
    threads: int = setting(0, "torch threads (0: all cores)")
    worker_port: int = setting(0, "the warm worker's loopback port (0: the ClientApp process does the work)")
    profile: str = setting(
        "", "run as an emulated device: pi4-2gb, pi5-8gb, jetson-orin-nano, laptop, a .json/.toml file, or key=value "
        "text such as base=pi5-8gb,slowdown=2 (its speed, memory cap and link; see edge_client/devices.py)",
        flag="--device-profile", metavar="SPEC",
    )  # fmt: skip
    # How an emulated device's extra time passes: "wall" sleeps it (a real federation sees the slow device);
    # "virtual" adds it to the device's clock without sleeping (benchmarks: the deadline still binds).
    emulated_time: str = setting(
        "wall", "with --device-profile: sleep the device's slowness and link time (wall), or count them on its "
        "clock without sleeping (virtual: several emulated devices on one machine)", choices=("wall", "virtual"),
    )  # fmt: skip
    energy_budget_j: float = setting(
        0.0, "joules this device may spend on a round's training (0: no limit): the plan fits it, and training stops "
        "before the step that would pass it", flag="--energy-budget-j", metavar="J",
    )  # fmt: skip
    turns: str = setting(
        "", "clients sharing this machine's cores take turns: at most N of the clients naming the directory DIR do a "
        "round's work at once (fedge demo: one per core)", metavar="DIR:N",
    )  # fmt: skip

    def __post_init__(self) -> None:
        from fedge.common.models import default_cache_dir

        self.name = self.name or Path(self.data).stem.replace("demo:", "") or "client"
        self.state_dir = Path(self.state_dir or Path.home() / ".fedge" / "clients" / self.name)
        self.cache_dir = Path(self.cache_dir or default_cache_dir())
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not (math.isfinite(self.energy_budget_j) and self.energy_budget_j >= 0):
            raise ValueError(f"energy_budget_j must be a finite number >= 0, got {self.energy_budget_j}")
        if not 0 <= self.worker_port < 65536:
            raise ValueError(f"worker_port must be in 0..65535, got {self.worker_port}")
        if self.emulated_time not in ("wall", "virtual"):
            raise ValueError(f"emulated_time must be wall or virtual, got {self.emulated_time!r}")
        if self.turns:
            from fedge.edge_client.turns import parse_turns

            parse_turns(self.turns)  # ValueError saying what is expected

    @classmethod
    def from_node_config(cls, config) -> Device:
        """From the SuperNode's node config (Flower adds keys of its own, which are left alone)."""
        device = from_config(cls, config)
        if not device.data:
            raise ValueError("the node config has no 'data': start the client with `fedge client start`")
        return device

    def to_node_config(self) -> dict:
        return to_config(self)


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
    from fedge.edge_client.train import TrainConfig

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
    from fedge.edge_client.data import load_examples
    from fedge.edge_client.session import split_heldout

    examples = load_examples(device.data)
    if device.eval_data:
        return examples, load_examples(device.eval_data)
    return split_heldout(examples, 0.1, seed)


def do_train(
    holder: ModelHolder, device: Device, settings: wire.RoundSettings, global_arrays: Arrays, rnd: int,
    score_first: bool = False,
) -> tuple[Arrays, dict]:  # fmt: skip
    """Train the global adapter for the round on local data: (the reply's arrays, metrics).

    With ``device.turns`` the work waits for its turn on this machine first (`fedge.edge_client.turns`); the round's
    clock starts once it has it.
    """
    from fedge.edge_client.turns import turn

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

    With ``settings.deadline_s`` the device first plans the round (`fedge.edge_client.plan`) and re-plans from its
    measured steps; with ``settings.codec`` it replies with its encoded change instead of the whole adapter.
    An emulated device (``device.profile``) runs at its speed, under its memory cap, behind its link.
    Raises `fedge.edge_client.devices.EmulatedOutOfMemory` past an emulated memory cap, and `RoundDeclined` when
    no plan fits the round.
    """
    from fedge.edge_client.data import fingerprint
    from fedge.edge_client.energy import EnergySession
    from fedge.edge_client.session import epoch_maker
    from fedge.edge_client.train import train

    clock = _DeviceClock(virtual=device.emulated_time == "virtual")
    train_set, _ = local_data(device, settings.seed)
    data_id = fingerprint(train_set)
    key = f"{data_id}|{device.profile}|{rnd}|{int(score_first)}"
    work = device.state_dir / "work" / _work_key(global_arrays, settings, key)
    if (work / UPDATE_FILE).is_file():  # finished before a restart: reply with that work
        arrays, metrics = _load_update(work)
        _commit_residual(work, device, settings)  # in case the restart came before it was in place
        return arrays, {**metrics, wire.Metric.RESUMED: 1}
    started = clock()
    profile = _profile(device)
    if settings.plan:
        plan, budget = settings.pinned_plan(), None  # trained as pinned: no re-planning
    elif settings.deadline_s > 0 or device.energy_budget_j > 0:
        plan, budget = _plan(device, settings, profile, _data_seq_len(holder, settings, train_set, data_id))
    else:
        plan, budget = None, None
    # scored once the round is planned (a round declined costs no scoring), on the round's clock: the re-planner
    # sees the seconds it took against the deadline
    t0 = clock()
    prior = _score_received(holder, device, settings, global_arrays) if score_first else {}
    scoring_seconds = clock() - t0
    session, model = open_adapter(holder, settings, plan)
    start = _start_arrays(global_arrays, settings, get_adapter(model))
    set_adapter(model, start)
    load_seconds = clock() - started - scoring_seconds
    cfg = train_config(settings, rnd, plan)
    with EnergySession(interval_s=1.0) as meter, _emulated(profile, clock) as emulated_step:
        replanner = _replanner(plan, budget, started, clock)
        try:
            result = train(
                model,
                epoch_maker(session.tokenizer, train_set, cfg),
                cfg,
                session.device,
                state_dir=work,
                run_id=f"{session.model_dir}|{data_id}",
                on_step=_chain(
                    emulated_step,
                    replanner,
                    _energy_guard(device.energy_budget_j, profile, meter, clock, started),
                    _agent_step(device.state_dir, rnd, cfg.steps),
                ),
            )
        finally:
            hold.clear_progress(device.state_dir)
    _decline_if_interrupted(device, result.steps, cfg.steps)
    trained = get_adapter(model)
    arrays, codec, feedback = _reply_arrays(device, settings, trained, start, global_arrays, profile, clock() - started)
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
    _save_update(work, arrays, metrics, feedback.to_bytes() if feedback is not None else None)
    _commit_residual(work, device, settings)
    _prune_work(work.parent)
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
    """The training loop's side of the background agent (:mod:`fedge.edge_client.hold`): progress after each step,
    and a stop after the step during which the agent put a hold on the device (the round then sends what it
    trained: the steps are not lost)."""
    hold.write_progress(state_dir, "train", rnd, 0, steps)

    def on_step(step: int, loss: float, tokens: int, seconds: float) -> bool:
        hold.write_progress(state_dir, "train", rnd, step, steps)
        return hold.held(state_dir) is not None

    return on_step


def _decline_if_interrupted(device: Device, steps: int, planned: int) -> None:
    """A round the agent cut short declines when its owner chose so (`fedge.edge_client.hold.interrupted_policy`);
    by default it goes on and sends what it trained. Its checkpoint stays in the work directory either way."""
    reason = hold.held(device.state_dir)
    if reason is not None and steps < planned and hold.interrupted_policy(device.state_dir) == "decline":
        raise RoundDeclined(f"{device.name}: interrupted after {steps} of {planned} steps: {reason}")


def _ran(plan, steps: int) -> str:
    """The plan as it ran, JSON ("" without one): its steps are the steps trained (a re-plan may have allowed more
    than the loop had room for), so pinning it replays the round."""
    return dataclasses.replace(plan, steps=steps).to_json() if plan is not None else ""


class RoundDeclined(RuntimeError):
    """No training plan fits this device into the round's deadline and memory: it sits the round out."""


def _profile(device: Device):
    """The emulated device, with no more threads than this client was given (several share one machine)."""
    if not device.profile:
        return None
    from fedge.edge_client.devices import load_profile

    profile = load_profile(device.profile)
    if device.threads > 0 and device.threads < profile.threads:
        profile = dataclasses.replace(profile, threads=device.threads)
    return profile


def _plan(device: Device, settings: wire.RoundSettings, profile, seq_len: int) -> tuple:
    """(plan, budget) for this round on this device, at most ``seq_len`` tokens a row; RoundDeclined if nothing
    fits."""
    from fedge.edge_client.plan import make_plan

    budget = round_budget(settings, seq_len, device.energy_budget_j)
    caps = device_caps(device, profile, settings.model)
    plan = make_plan(caps, budget, model_shape(device.cache_dir, settings.model))
    if not plan.feasible:
        raise RoundDeclined(f"{device.name}: no training plan fits this round ({plan.reasons.get('feasible', '')})")
    return plan, budget


def device_caps(device: Device, profile=None, model: str = ""):
    """The planner's view of this device: an emulated profile's, else this machine's, from its `fedge profile` of
    ``model`` where one is saved (else the reference calibration; the plan's reasons say which)."""
    if profile is not None:
        return profile.caps()
    from fedge.edge_client.devices import saved_profile, this_machine

    return this_machine(device.name, measured=saved_profile(device.cache_dir, model) if model else None)


def round_budget(settings: wire.RoundSettings, seq_len: int, energy_budget_j: float = 0.0):
    """The round's `RoundBudget` as the server set it, with rows of ``seq_len`` (the data's length) and the
    device's own energy budget (0: none). A round without a deadline has no time limit."""
    from fedge.edge_client.plan import RoundBudget

    deadline = settings.deadline_s if settings.deadline_s > 0 else math.inf
    budget = RoundBudget.from_round_settings(
        settings, deadline, label_fraction=0.15, energy_budget_j=energy_budget_j or None
    )
    return dataclasses.replace(budget, seq_len=seq_len)


def model_shape(cache_dir: Path, model: str):
    """The planner's `ModelShape` of ``model``, read from its config (no weights are loaded)."""
    from transformers import AutoConfig

    from fedge.common.models import pull_model
    from fedge.edge_client.costs import ModelShape

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(pull_model(model, cache_dir)))


def _data_seq_len(holder: ModelHolder, settings: wire.RoundSettings, examples, data_id: str) -> int:
    """The row length the round needs: the longest example in tokens (rounded up to 8), at most ``seq_len``.

    Batches are padded to their longest example, so rows of short data cost what they hold, not ``seq_len``:
    planning with the data's length keeps a slow device from cutting rows short (and answers off) to save
    time it would not spend. Worked out once per ``data_id`` (the data's fingerprint) and kept in the holder:
    tokenizing all the data every round would count against the round's deadline.
    """
    from fedge.edge_client.session import encode_all

    key = (settings.model, settings.seq_len, data_id)
    if key not in holder.seq_lens:
        tokenizer = holder.tokenizer(settings.model)
        longest = max((len(e.input_ids) for e in encode_all(tokenizer, examples, settings.seq_len)), default=1)
        holder.seq_lens[key] = min(settings.seq_len, -(-longest // 8) * 8)
    return holder.seq_lens[key]


class _DeviceClock:
    """The device's clock: monotonic seconds, plus the emulated time that was not slept (``virtual``), less the
    time a training step waited for the host's cores (``virtual``: the emulated device has its own)."""

    def __init__(self, virtual: bool) -> None:
        self.virtual, self.skipped = virtual, 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def sleep(self, seconds: float) -> None:
        if self.virtual:
            self.skipped += max(0.0, seconds)
        else:
            time.sleep(seconds)

    def rewind(self, seconds: float) -> None:
        """Take ``seconds`` of host time (waiting for the host's cores) off a virtual clock."""
        self.skipped -= max(0.0, seconds)


def _replanner(plan, budget, started: float, clock: _DeviceClock):
    if plan is None or budget is None:  # no plan, or a pinned one
        return None
    from fedge.edge_client.plan import Replanner

    replanner = Replanner(plan, budget, started=started, clock=clock)
    replanner.start()
    return replanner


def _energy_guard(budget_j: float, profile, meter, clock: _DeviceClock, started: float):
    """An ``on_step`` that stops training before the step that would spend more than ``budget_j`` joules: the
    energy meter's reading on a real device, the profile's power x its clock on an emulated one (None without a
    budget). The plan keeps a round within the budget; this holds it there when the plan's power figure is low."""
    if not budget_j:
        return None
    last = [0.0]

    def spent() -> float:
        if profile is not None:
            return profile.train_watts * (clock() - started)
        return meter.totals()[0]

    def on_step(step: int, loss: float, tokens: int, seconds: float) -> bool:
        now = spent()
        step_j = now - last[0]
        last[0] = now
        if now + step_j > budget_j:
            log.info(
                "energy budget: %.0f J spent of %.0f J, a step costs %.0f J: training stops", now, budget_j, step_j
            )
            return True
        return False

    return on_step


def _chain(*callbacks):
    """One ``on_step`` from the present callbacks (None if there are none); True from any one stops training."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    from fedge.edge_client.devices import chain

    return chain(*present)


@contextlib.contextmanager
def _emulated(profile, clock: _DeviceClock):
    """The emulated device's per-step hook (throttle + memory cap), or None on a real device."""
    if profile is None:
        yield None
        return
    from fedge.edge_client.devices import emulate

    with emulate(profile, sleep=clock.sleep, rewind=clock.rewind if clock.virtual else None) as on_step:
        yield on_step


def _start_arrays(global_arrays: Arrays, settings: wire.RoundSettings, local: Arrays) -> Arrays:
    """The global adapter as this client trains it: cut to its rank and to the tensors its plan trains."""
    from fedge.common.lora import client_rank, for_client

    rank = client_rank(local)
    full = rank == client_rank(global_arrays)
    cut = global_arrays if full else for_client(global_arrays, rank, settings.lora_alpha, settings.lora_merge)
    missing = sorted(set(local) - set(cut))
    if missing:
        raise ValueError(f"the global adapter does not fit this model: it has no {missing[:3]}")
    return {k: cut[k] for k in local}


def _reply_arrays(
    device: Device, settings: wire.RoundSettings, trained: Arrays, start: Arrays, global_arrays: Arrays, profile,
    elapsed: float,
) -> tuple[Arrays, str, object]:  # fmt: skip
    """What goes back: (arrays, codec spec, the error feedback to save once the update is saved).

    The whole adapter (``codec == ""``) or the encoded change, with error feedback. Frozen tensors never travel
    up: with LoRA A frozen (the default) an uncoded reply is the change of B alone, exact in fp32 (codec "none").

    ``"auto"`` picks the least lossy codec whose upload fits the deadline's remaining time on the device's
    link (an emulated profile's; on a real device without a link model, int8); ``"auto:C"`` starts the search
    at codec ``C`` of `fedge.quantization.codecs.LADDER`. The residual of lossy codecs stays on the device
    (``state_dir/residual-KEY.npz``, one per federation shape) and is added to the next round's change.
    """
    from fedge.quantization.codecs import LADDER
    from fedge.quantization.updates import ErrorFeedback, make_delta, pick_codec

    whole = not settings.codec and set(trained) == set(global_arrays) and _same_shapes(trained, global_arrays)
    if whole and not settings.lora_freeze_a:
        return trained, "", None
    # A plan that trains part of the adapter (lower rank, fewer layers) always sends its change: the whole
    # adapter would not have the global's shapes.
    delta = make_delta(trained, start)
    spec = settings.codec or "none"
    if spec.startswith("auto"):
        ladder = LADDER[LADDER.index(spec.partition(":")[2] or LADDER[0]) :]
        if profile is None or settings.deadline_s <= 0:  # no link model: int8, or the ceiling if it is lower
            spec = LADDER[max(LADDER.index("int8"), LADDER.index(ladder[0]))]
        else:
            fp32_bytes = sum(a.nbytes for a in delta.values())
            left = max(1.0, 0.9 * settings.deadline_s - elapsed)
            spec = pick_codec(fp32_bytes, profile.uplink_bytes_per_s, left, ladder)
    feedback = ErrorFeedback.load(_residual_path(device, settings), spec)
    encoded = feedback.encode(delta)
    return encoded.to_arrays(), spec, feedback


def _residual_path(device: Device, settings: wire.RoundSettings) -> Path:
    """Where the error-feedback residual waits between rounds: one per federation shape (model, LoRA, seed)."""
    key = hashlib.sha256(json.dumps(settings.defining(), sort_keys=True).encode()).hexdigest()[:12]
    return device.state_dir / f"residual-{key}.npz"


def _same_shapes(a: Arrays, b: Arrays) -> bool:
    return all(a[k].shape == b[k].shape for k in a)


def do_evaluate(holder: ModelHolder, device: Device, settings: wire.RoundSettings, global_arrays: Arrays) -> dict:
    """Held-out loss and exact match of the global adapter on this device's held-out examples (in its turn, as
    `do_train`)."""
    from fedge.edge_client.turns import turn

    with turn(device.turns):
        return _evaluate_turn(holder, device, settings, global_arrays)


def _evaluate_turn(holder: ModelHolder, device: Device, settings: wire.RoundSettings, global_arrays: Arrays) -> dict:
    from fedge.edge_client.evaluate import evaluate

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


def _work_key(global_arrays: Arrays, settings: wire.RoundSettings, data_id: str) -> str:
    blob = f"{wire.fingerprint(global_arrays)}|{json.dumps(settings.to_config(), sort_keys=True)}|{data_id}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_update(work: Path, arrays: Arrays, metrics: dict, residual: bytes | None) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_text(work / METRICS_FILE, json.dumps(metrics))
    if residual is not None:
        atomic_write_bytes(work / RESIDUAL_FILE, residual)
    atomic_write_bytes(work / UPDATE_FILE, buf.getvalue())  # last: its presence means the work is complete


def _commit_residual(work: Path, device: Device, settings: wire.RoundSettings) -> None:
    """Make the residual saved with a finished update the live one (idempotent: a resumed reply repeats it)."""
    saved = work / RESIDUAL_FILE
    if saved.is_file():
        atomic_write_bytes(_residual_path(device, settings), saved.read_bytes())


def _load_update(work: Path) -> tuple[Arrays, dict]:
    with np.load(work / UPDATE_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads((work / METRICS_FILE).read_text())


def _prune_work(root: Path) -> None:
    """Keep the newest few work directories: enough to resume after a restart, not a growing pile."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in dirs[KEEP_WORK_DIRS:]:
        shutil.rmtree(old, ignore_errors=True)
