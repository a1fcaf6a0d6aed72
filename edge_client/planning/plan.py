"""The training plan: from a device's capabilities and the round's budget, choose how to train this round.

``make_plan`` is a pure function (no torch, no clock): cost models predict a configuration's peak memory,
step time and upload size, and a search picks the best-quality configuration that fits the device's memory
cap with a margin and the round's deadline with a margin. Quality is given up in a fixed order, the least
harmful first: base-weight precision -> gradient checkpointing -> micro-batch/accumulation -> sequence
length -> trainable layers -> LoRA rank -> local steps. When nothing fits, the plan is flagged infeasible
with the reason, and the client declines the round instead of running out of memory or time.

``replan`` corrects the step count once the first steps have been timed; ``Replanner`` does that from the
training loop's per-step callback and stops the loop when the corrected step count is reached.

The cost models (`fedge.edge_client.planning.costs`) and their constants (``HOST``) are calibrated on the real model on
the reference machine (2 vCPU x86 AVX-512 + AMX): see ``benchmarks/plan_calibration.py`` and benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fedge.common.wire import TrainingPlan
from fedge.edge_client.planning.costs import (
    ALL_TARGETS,
    GIB,
    HOST,
    LADDER,
    SMOLLM2_135M,
    HostCalibration,
    Knobs,
    ModelShape,
    RoundBudget,
    activation_bytes,
    compute_dtype,
    lora_params,
    loss_chunk_for,
    step_flops,
    train_gflops_from_matmul,
    weight_bytes,
)

__all__ = [
    "ALL_TARGETS",
    "GIB",
    "HOST",
    "LADDER",
    "SMOLLM2_135M",
    "DeviceCaps",
    "Estimate",
    "HostCalibration",
    "Knobs",
    "ModelShape",
    "Replanner",
    "RoundBudget",
    "TrainingPlan",
    "activation_bytes",
    "candidates",
    "estimate",
    "lora_params",
    "make_plan",
    "replan",
    "step_cap",
    "step_flops",
    "weight_bytes",
]


# --- inputs: the device and the round --------------------------------------------------------------------


@dataclass
class DeviceCaps:
    """What a device can do. ``memory_bytes`` is what training may use (total RAM minus the OS and apps).

    ``train_gflops`` maps each base precision the device runs to its effective training GFLOP/s (see
    `HostCalibration`); ``bf16_native`` says whether quantized weights compute in bf16 (else fp32).
    ``overhead_s`` is the fixed cost of a round before training (model load, startup), in seconds.
    ``train_watts`` is the device's power while it trains (measured by `fedge profile`, or its rated power): with
    it, a round's energy budget (`RoundBudget.energy_budget_j`) limits the plan. ``watts_source`` says where it
    comes from.
    """

    name: str
    threads: int
    memory_bytes: int
    train_gflops: dict[str, float]
    bf16_native: bool = False
    uplink_bytes_per_s: float = 1e6
    downlink_bytes_per_s: float = 4e6
    latency_s: float = 0.05
    overhead_s: float = 0.0
    source: str = "given"  # where the throughput figures come from; the plan's reasons name it
    train_watts: float | None = None
    watts_source: str = "given"

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("memory_bytes", "uplink_bytes_per_s", "downlink_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.train_watts is not None and not (math.isfinite(self.train_watts) and self.train_watts > 0):
            raise ValueError(f"train_watts must be a finite number > 0, got {self.train_watts}")
        bad = {p: g for p, g in self.train_gflops.items() if not g > 0}
        if not self.train_gflops or bad:
            raise ValueError(f"train_gflops needs a positive GFLOP/s per precision, got {self.train_gflops}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The planner's precisions this device runs, best quality first."""
        return tuple(p for p in LADDER if p in self.train_gflops)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeviceCaps:
        """From `to_dict` output, or from a profiler report.

        A profiler report has ``matmul_gflops`` ({"fp32": .., "bf16": ..}, peak matmul GFLOP/s) instead of
        ``train_gflops``: training throughput is then the matmul peak times the reference machine's
        measured ratio of training to matmul throughput for that precision. Unknown keys are ignored
        (a profile carries more than the planner needs); a missing required key is named.
        """
        data = dict(data)
        if "train_gflops" not in data and "matmul_gflops" in data:
            data["train_gflops"] = train_gflops_from_matmul(data["matmul_gflops"], bool(data.get("bf16_native")))
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"device caps miss field(s) {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})


# --- the plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A configuration's predicted cost: seconds per optimizer step, peak resident bytes, upload bytes."""

    step_s: float
    peak_bytes: float
    upload_bytes: float
    fixed_s: float  # overhead + download + upload, paid once per round
    upload_s: float  # the part of fixed_s still due after training
    step_j: float = 0.0  # joules per optimizer step (0: the device's power is unknown)
    fixed_j: float = 0.0  # joules of the round's fixed work (model load, startup)


# --- prediction ------------------------------------------------------------------------------------------


def estimate(
    k: Knobs, caps: DeviceCaps, budget: RoundBudget, model: ModelShape, host: HostCalibration = HOST
) -> Estimate:
    """Predict a configuration's cost on a device."""
    compute = compute_dtype(k.precision, caps.bf16_native)
    n_lora = lora_params(k, budget, model)
    # LoRA A and B in fp32; B's (or both's) gradient and two AdamW moments: 12 bytes per trainable value.
    lora = n_lora * 4 + n_lora * 12
    labels = budget.label_fraction * k.micro_batch * k.seq_len
    logits = min(labels, loss_chunk_for(k)) * model.vocab * host.logit_bytes
    weights = weight_bytes(k.precision, compute, model)
    activations = activation_bytes(k, compute, model, host) + host.train_overhead_bytes
    activations += host.token_bytes * k.micro_batch * k.seq_len
    train_peak = host.runtime_bytes + weights + lora + activations + logits
    load_peak = host.runtime_bytes + weights + host.load_extra_bytes[k.precision]
    step_s = step_flops(k, budget, model) / (caps.train_gflops[k.precision] * 1e9) + host.step_overhead_s
    upload = n_lora * budget.bytes_per_value
    download = budget.r_max * model.layers * sum(i + o for i, o in map(model.module_dims, budget.targets)) * 4
    upload_s = caps.latency_s + upload / caps.uplink_bytes_per_s
    fixed = caps.overhead_s + caps.latency_s + download / caps.downlink_bytes_per_s + upload_s
    watts = caps.train_watts or 0.0  # the link's energy is left out: a radio's share is small next to training
    return Estimate(
        step_s, max(train_peak, load_peak), upload, fixed, upload_s, step_s * watts, caps.overhead_s * watts
    )


# --- search ----------------------------------------------------------------------------------------------


def _halvings(top: int, floor: int) -> list[int]:
    values = [top]
    while values[-1] // 2 >= floor:
        values.append(values[-1] // 2)
    return values


def _batch_options(batch: int) -> list[tuple[int, int]]:
    """(micro_batch, grad_accum), best first: the requested batch in ever smaller micro-batches (same
    optimization, less memory), then smaller total batches (less time)."""
    keep = [(m, batch // m) for m in _halvings(batch, 1) if batch % m == 0]
    smaller = [(m, 1) for m in _halvings(batch, 1)[1:]]
    return keep + smaller


def candidates(caps: DeviceCaps, budget: RoundBudget, model: ModelShape) -> Iterator[Knobs]:
    """All configurations, best quality first: lexicographic in (rank, layers, seq_len, batch, checkpointing,
    precision), the knob given up first varying fastest."""
    ranks = _halvings(budget.r_max, 1)
    layers = _halvings(model.layers, 1)
    seqs = _halvings(budget.seq_len, min(64, budget.seq_len))
    for r, n, s, (m, a), ckpt, p in itertools.product(
        ranks, layers, seqs, _batch_options(budget.batch), (False, True), caps.precisions
    ):
        yield Knobs(p, ckpt, m, a, s, n, r)


def _violation(est: Estimate, steps: int, caps: DeviceCaps, budget: RoundBudget) -> str | None:
    """Why a configuration does not fit (None if it does): memory first, then upload, then time."""
    cap = min(caps.memory_bytes, budget.memory_cap_bytes or caps.memory_bytes)
    if est.peak_bytes > cap * (1 - budget.memory_margin):
        return f"memory: {est.peak_bytes / GIB:.2f} GiB > {cap * (1 - budget.memory_margin) / GIB:.2f} GiB usable"
    if budget.upload_budget_bytes is not None and est.upload_bytes > budget.upload_budget_bytes:
        return f"upload: {est.upload_bytes / 1e6:.1f} MB > budget {budget.upload_budget_bytes / 1e6:.1f} MB"
    allowed = budget.deadline_s * (1 - budget.time_margin)
    total = est.fixed_s + steps * est.step_s
    if total > allowed:
        return f"time: {total:.0f} s > {allowed:.0f} s usable"
    if budget.energy_budget_j is not None:
        if not caps.train_watts:
            return "energy: the device's power while training is unknown (run `fedge profile`)"
        joules, usable = est.fixed_j + steps * est.step_j, budget.energy_budget_j * (1 - budget.time_margin)
        if joules > usable:
            return f"energy: {joules:.0f} J > {usable:.0f} J usable of the round's budget"
    return None


def _max_steps(est: Estimate, budget: RoundBudget) -> int:
    """The most steps that fit the deadline (and the energy budget), at most the requested steps."""
    fits = [(budget.deadline_s * (1 - budget.time_margin) - est.fixed_s) / est.step_s]
    if budget.energy_budget_j is not None and est.step_j > 0:
        fits.append((budget.energy_budget_j * (1 - budget.time_margin) - est.fixed_j) / est.step_j)
    return max(0, min(budget.steps, math.floor(min(budget.steps, *fits))))


def make_plan(caps: DeviceCaps, budget: RoundBudget, model: ModelShape, host: HostCalibration = HOST) -> TrainingPlan:
    """The best-quality configuration that fits the device and the round (see the module docstring).

    ``model`` is the shape of the model being trained (`ModelShape.from_hf_config` of its config): its layers,
    widths and vocabulary set every memory and time prediction.

    First choice: the requested steps with the first candidate (in `candidates` order) that fits memory,
    upload and time. Failing that, the best-quality configuration that fits memory and upload and allows
    nearly the most steps (within one step, or 10% when that is more). Failing that, an infeasible plan for
    the cheapest configuration, whose ``reasons["feasible"]`` says what does not fit.
    """
    for name in budget.targets:
        model.module_dims(name)  # unknown target: a clear error, not a KeyError deep in a cost model
    if not caps.precisions:
        raise ValueError(f"device {caps.name!r} supports none of the planner's precisions {LADDER}")
    scored = []
    for k in candidates(caps, budget, model):
        est = estimate(k, caps, budget, model, host)
        if _violation(est, budget.steps, caps, budget) is None:
            return _plan(k, est, budget.steps, caps, budget, model, host, True, "fits with the requested steps")
        scored.append((k, est))
    fitting = [(k, e, _max_steps(e, budget)) for k, e in scored if _violation(e, 0, caps, budget) is None]
    most = max((t[2] for t in fitting), default=0)
    # The best quality within a step of the most steps (10% for long rounds): one step is not worth a rank.
    best = next((t for t in fitting if t[2] >= max(1, most - max(1, most // 10))), None)
    if best is not None and best[2] >= 1:
        k, est, steps = best
        limits = "the deadline" + (" and the energy budget" if budget.energy_budget_j is not None else "")
        why = f"the requested {budget.steps} steps do not fit {limits} in any configuration"
        return _plan(k, est, steps, caps, budget, model, host, True, why)
    k, est = min(scored, key=lambda t: (t[1].peak_bytes, t[1].step_s))
    why = _violation(est, 1, caps, budget) or "no configuration fits"
    return _plan(k, est, 0, caps, budget, model, host, False, f"nothing fits even the leanest configuration: {why}")


def _plan(k, est, steps, caps, budget, model, host, feasible: bool, why: str) -> TrainingPlan:
    return TrainingPlan(
        feasible=feasible,
        precision=k.precision,
        compute_dtype=compute_dtype(k.precision, caps.bf16_native),
        lora_r=k.rank,
        targets=budget.targets,
        top_layers=None if k.layers == model.layers else k.layers,
        seq_len=k.seq_len,
        micro_batch=k.micro_batch,
        grad_accum=k.grad_accum,
        gradient_checkpointing=k.checkpointing,
        loss_chunk=loss_chunk_for(k),
        steps=steps,
        requested_steps=budget.steps,
        predicted_step_s=est.step_s,
        predicted_s=est.fixed_s + steps * est.step_s,
        predicted_peak_bytes=round(est.peak_bytes),
        predicted_upload_bytes=round(est.upload_bytes),
        predicted_upload_s=est.upload_s,
        reasons={
            "feasible": why,
            "device": f"{caps.name}: speed from {caps.source}",
            **(_reasons(k, steps, caps, budget, model, host) if feasible else {}),
            **({"energy": _energy_reason(est, steps, caps, budget)} if budget.energy_budget_j is not None else {}),
        },
    )


def _energy_reason(est: Estimate, steps: int, caps: DeviceCaps, budget: RoundBudget) -> str:
    if not caps.train_watts:
        return "the device's power while training is unknown"
    joules = est.fixed_j + steps * est.step_j
    return (f"{joules:.0f} J predicted of the round's {budget.energy_budget_j:g} J budget at {caps.train_watts:.1f} W "
            f"({caps.watts_source})")  # fmt: skip


def _reasons(k: Knobs, steps: int, caps: DeviceCaps, budget: RoundBudget, model, host) -> dict[str, str]:
    """For each knob: kept at its best value, or what the one-notch-better value would have broken."""
    best = {
        "rank": budget.r_max,
        "layers": model.layers,
        "seq_len": budget.seq_len,
        "batch": (budget.batch, 1),
        "checkpointing": False,
        "precision": caps.precisions[0],
    }
    reasons = {}
    for name, top in best.items():
        if _value(k, name) == top:
            reasons[name] = f"{_show(k, name)}: best value kept"
            continue
        better = _one_notch_better(k, name, caps, budget, model)
        why = _violation(estimate(better, caps, budget, model, host), steps, caps, budget)
        reasons[name] = f"{_show(k, name)}: {_show(better, name)} would not fit ({why})" if why else _show(k, name)
    reasons["targets"] = "the federation's targets (they fix the adapter's tensors)"
    reasons["steps"] = f"{steps} of {budget.steps} requested"
    return reasons


def _value(k: Knobs, name: str) -> object:
    return (k.micro_batch, k.grad_accum) if name == "batch" else getattr(k, name)


def _show(k: Knobs, name: str) -> str:
    return f"micro-batch {k.micro_batch} x {k.grad_accum} accumulated" if name == "batch" else str(getattr(k, name))


def _one_notch_better(k: Knobs, name: str, caps: DeviceCaps, budget: RoundBudget, model) -> Knobs:
    if name == "precision":
        return dataclasses.replace(k, precision=caps.precisions[caps.precisions.index(k.precision) - 1])
    if name == "checkpointing":
        return dataclasses.replace(k, checkpointing=False)
    if name == "batch":
        options = _batch_options(budget.batch)
        m, a = options[max(0, options.index((k.micro_batch, k.grad_accum)) - 1)]
        return dataclasses.replace(k, micro_batch=m, grad_accum=a)
    cap = {"rank": budget.r_max, "layers": model.layers, "seq_len": budget.seq_len}[name]
    return dataclasses.replace(k, **{name: min(cap, getattr(k, name) * 2)})


# --- re-planning from measured steps ---------------------------------------------------------------------


def step_cap(plan: TrainingPlan, budget: RoundBudget) -> int:
    """The most steps a re-plan may give this plan: the requested examples (steps x batch) at the plan's batch.

    A device that had to shrink its batch may, when its measured steps leave time, train the round's examples in
    more, smaller steps; at the requested batch that is the requested steps. The server accepts step counts up to
    the round's steps x batch for this reason (`fedge.server.strategy`).
    """
    batch = plan.micro_batch * plan.grad_accum
    return max(plan.requested_steps, plan.requested_steps * budget.batch // max(1, batch))


def replan(plan: TrainingPlan, measured_step_s: list[float], elapsed_s: float, budget: RoundBudget) -> TrainingPlan:
    """Correct the plan's step count from the steps timed so far.

    ``measured_step_s``: seconds of each finished step (the first calibrate); ``elapsed_s``: seconds since
    the round started on the device (load included). The remaining steps are what fits in the deadline
    (with its margin) less the time still needed for the upload, at the median measured step time (the
    first step, which pays one-off warm-up, is left out once there is a second; until then the prediction
    stands, so a cold first step does not end the round). The new step count is never
    below the steps done, and never above `step_cap`: a fast device gets back steps the plan had cut, and one
    that shrank its batch may train up to the requested examples. Records ``calibration`` = measured / predicted
    step time.
    """
    if not measured_step_s:
        return plan
    done = len(measured_step_s)
    step_s = statistics.median(measured_step_s[1:]) if done >= 2 else plan.predicted_step_s
    left = budget.deadline_s * (1 - budget.time_margin) - elapsed_s - plan.predicted_upload_s
    cap = step_cap(plan, budget)
    steps = max(done, min(cap, done + max(0, math.floor(min(left / step_s, cap)))))
    return dataclasses.replace(
        plan,
        steps=steps,
        calibration=step_s / plan.predicted_step_s,
        reasons={**plan.reasons, "steps": f"{steps} of {plan.requested_steps} requested (at most {cap}): re-planned "
                 f"after {done} steps at {step_s:.2f} s/step (predicted {plan.predicted_step_s:.2f})"},
    )  # fmt: skip


class Replanner:
    """A training-loop ``on_step`` callback that re-plans after each step and says when to stop.

    Times steps by the wall clock between calls (so an emulated device's throttle sleeps count), starting
    at ``started`` (the round's start on the device, a ``clock()`` reading). Returns True (stop) once the
    re-planned step count is reached. ``plan`` holds the latest plan.
    """

    def __init__(
        self, plan: TrainingPlan, budget: RoundBudget, started: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.plan, self.budget, self.started, self.clock = plan, budget, started, clock
        self.step_s: list[float] = []
        self._last: float | None = None

    def start(self) -> None:
        """Mark the start of the first step (call right before training)."""
        self._last = self.clock()

    def __call__(self, step: int, loss: float, tokens: int, seconds: float) -> bool:
        now = self.clock()
        self.step_s.append(now - self._last if self._last is not None else seconds)
        self._last = now
        self.plan = replan(self.plan, self.step_s, now - self.started, self.budget)
        return step >= self.plan.steps
