"""The round's limits on this device: the plan that fits its deadline, memory and energy, the device's clock, and
the per-step guards that hold training to them (re-planning, the energy budget, an emulated device's speed and
memory cap).

Used by a round's local work (`fedge.edge_client.federation.local_work`); `device` arguments are its
`fedge.edge_client.federation.settings.Device`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

from fedge.common import wire
from fedge.common.modeling import ModelHolder
from fedge.edge_client.agent import hold
from fedge.edge_client.federation.settings import Device

log = logging.getLogger(__name__)


class RoundDeclined(RuntimeError):
    """No training plan fits this device into the round's deadline and memory: it sits the round out."""


def emulated_profile(device: Device):
    """The emulated device, with no more threads than this client was given (several share one machine)."""
    if not device.profile:
        return None
    from fedge.edge_client.device.emulated import load_profile

    profile = load_profile(device.profile)
    if device.threads > 0 and device.threads < profile.threads:
        profile = dataclasses.replace(profile, threads=device.threads)
    return profile


def plan_round(device: Device, settings: wire.RoundSettings, profile, seq_len: int) -> tuple:
    """(plan, budget) for this round on this device, at most ``seq_len`` tokens a row; RoundDeclined if nothing
    fits."""
    from fedge.edge_client.planning.plan import make_plan

    budget = round_budget(settings, seq_len, device.energy_budget_j)
    caps = device_caps(device, profile, settings.model)
    caps = measured_speed(device, caps, settings.model).correct(caps)
    plan = make_plan(caps, budget, model_shape(device.cache_dir, settings.model))
    if not plan.feasible:
        raise RoundDeclined(f"{device.name}: no training plan fits this round ({plan.reasons.get('feasible', '')})")
    return plan, budget


def device_caps(device: Device, profile=None, model: str = ""):
    """The planner's view of this device: an emulated profile's, else this machine's, from its `fedge profile` of
    ``model`` where one is saved (else the reference calibration; the plan's reasons say which)."""
    if profile is not None:
        return profile.caps()
    from fedge.edge_client.device.emulated import saved_profile, this_machine

    return this_machine(device.name, measured=saved_profile(device.cache_dir, model) if model else None)


SPEED_FILE = "speed.json"  # in the client's state directory: `SpeedMemory`
SPEED_RANGE = (1 / 20, 20.0)  # a correction outside this is a broken clock, not a device
SPEED_MIN_STEPS = 5  # steps a round must time before its speed is remembered (the median of the last 4 or more)


@dataclasses.dataclass
class SpeedMemory:
    """How much slower (> 1) or faster (< 1) than the cost model this device's training steps ran in earlier rounds,
    per base precision: the re-planner's measured / predicted step time, carried over to the next round's plan.

    A profile's figures (`fedge profile`'s, an emulated device's, the reference machine's) can be off by 2x or more
    (the reference calibration is 2.3-4.6x pessimistic on a quieter host, and an emulated device is the host's
    speed x its slowdown): the re-planner corrects the step count within a round, but only the plan can spend the
    slack on a larger batch or more layers. The correction divides the plan's throughput (the per-step overhead is
    left as it is, so a correction settles over a few rounds rather than at once). Each round's figure is folded
    in geometrically (half the old, half the new): one busy round moves the next plan halfway, and the re-planner
    holds every round to its deadline either way. Kept per model, device and the device's uncorrected throughput
    figures, so a changed model, profile or `fedge profile` run starts over.
    """

    path: Path
    key: str
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)

    def correct(self, caps):
        """``caps`` with each precision's throughput divided by its correction (a precision not yet measured takes
        the median of the measured ones: the same cores ran them)."""
        if not self.ratios:
            return caps
        gflops = {p: g / self.ratio(p) for p, g in caps.train_gflops.items()}
        shown = ", ".join(f"{p} x{r:.2f}" for p, r in sorted(self.ratios.items()))
        source = f"{caps.source}, step time corrected by earlier rounds' measured steps ({shown})"
        return dataclasses.replace(caps, train_gflops=gflops, source=source)

    def ratio(self, precision: str) -> float:
        """The correction applied to ``precision`` (1.0 with nothing measured)."""
        import statistics

        return self.ratios.get(precision, statistics.median(self.ratios.values()) if self.ratios else 1.0)

    def record(self, precision: str, calibration: float) -> None:
        """Fold in a round whose steps at ``precision`` took ``calibration`` x the prediction (the prediction
        already corrected by this memory) and save it atomically. A correction that would leave `SPEED_RANGE` is
        ignored, and a file that cannot be written costs the memory, not the round (both with a log warning)."""
        old = self.ratio(precision)
        new = old * calibration
        if not (math.isfinite(new) and SPEED_RANGE[0] <= new <= SPEED_RANGE[1]):
            log.warning("speed memory: ignoring a measured/predicted step time of %s", calibration)
            return
        self.ratios[precision] = math.sqrt(old * new)
        saved = _read_speed_file(self.path)
        saved[self.key] = self.ratios
        from fedge.common.fsutil import atomic_write_text

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(saved, indent=1, sort_keys=True))
        except OSError as err:
            log.warning("speed memory %s not saved (%s): the next round plans from the profile alone", self.path, err)


def _read_speed_file(path: Path) -> dict:
    """The speed file's object ({} if it is missing or is not a JSON object; anything wrong with it is logged)."""
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except Exception as err:  # noqa: BLE001 (any damage, even JSON nested past the recursion limit, is no memory)
        log.warning("speed memory %s unreadable (%s): planning from the profile alone", path, type(err).__name__)
        return {}
    if not isinstance(saved, dict):
        log.warning("speed memory %s is not a JSON object: planning from the profile alone", path)
        return {}
    return saved


def measured_speed(device: Device, caps, model: str) -> SpeedMemory:
    """This device's `SpeedMemory` for ``model`` on ``caps`` (its uncorrected `device_caps`): what earlier rounds
    measured, or nothing (a missing, unreadable or damaged file, or entries of the wrong type, count as nothing
    measured, with a warning in the log)."""
    path = Path(device.state_dir) / SPEED_FILE
    figures = ",".join(f"{p}={g:.4g}" for p, g in sorted(caps.train_gflops.items()))
    key = f"{model}|{caps.name}|{figures}"
    entry = _read_speed_file(path).get(key)
    ratios = {}
    if isinstance(entry, dict):
        ratios = {
            p: float(r)
            for p, r in entry.items()
            if isinstance(p, str) and type(r) in (int, float) and SPEED_RANGE[0] <= r <= SPEED_RANGE[1]
        }
        if len(ratios) < len(entry):
            log.warning("speed memory %s: %d value(s) of %r not a correction in range: ignored", path,
                        len(entry) - len(ratios), key)  # fmt: skip
    elif entry is not None:
        log.warning("speed memory %s: entry %r is not an object: ignored", path, key)
    return SpeedMemory(path, key, ratios)


def remember_speed(device: Device, profile, model: str, replanner) -> None:
    """After a round's training: fold the re-planner's measured / predicted step time into the speed memory, once
    it timed `SPEED_MIN_STEPS` steps (the first, warm-up, is left out of its median) and nothing held the device
    during them (a paused step's time is not the device's speed)."""
    if replanner is None or len(replanner.step_s) < SPEED_MIN_STEPS or hold.held(device.state_dir) is not None:
        return
    memory = measured_speed(device, device_caps(device, profile, model), model)
    memory.record(replanner.plan.precision, replanner.plan.calibration)


def round_budget(settings: wire.RoundSettings, seq_len: int, energy_budget_j: float = 0.0):
    """The round's `RoundBudget` as the server set it, with rows of ``seq_len`` (the data's length) and the
    device's own energy budget (0: none). A round without a deadline has no time limit."""
    from fedge.edge_client.planning.plan import RoundBudget

    deadline = settings.deadline_s if settings.deadline_s > 0 else math.inf
    budget = RoundBudget.from_round_settings(
        settings, deadline, label_fraction=0.15, energy_budget_j=energy_budget_j or None
    )
    return dataclasses.replace(budget, seq_len=seq_len)


def model_shape(cache_dir: Path, model: str):
    """The planner's `ModelShape` of ``model``, read from its config (no weights are loaded)."""
    from transformers import AutoConfig

    from fedge.common.models import pull_model
    from fedge.edge_client.planning.costs import ModelShape

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(pull_model(model, cache_dir)))


def data_seq_len(holder: ModelHolder, settings: wire.RoundSettings, examples, data_id: str) -> int:
    """The row length the round needs: the longest example in tokens (rounded up to 8), at most ``seq_len``.

    Batches are padded to their longest example, so rows of short data cost what they hold, not ``seq_len``:
    planning with the data's length keeps a slow device from cutting rows short (and answers off) to save
    time it would not spend. Worked out once per ``data_id`` (the data's fingerprint) and kept in the holder:
    tokenizing all the data every round would count against the round's deadline.
    """
    from fedge.edge_client.training.session import encode_all

    key = (settings.model, settings.seq_len, data_id)
    if key not in holder.seq_lens:
        tokenizer = holder.tokenizer(settings.model)
        longest = max((len(e.input_ids) for e in encode_all(tokenizer, examples, settings.seq_len)), default=1)
        holder.seq_lens[key] = min(settings.seq_len, -(-longest // 8) * 8)
    return holder.seq_lens[key]


class DeviceClock:
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


def replanner(plan, budget, started: float, clock: DeviceClock):
    if plan is None or budget is None:  # no plan, or a pinned one
        return None
    from fedge.edge_client.planning.plan import Replanner

    replanner = Replanner(plan, budget, started=started, clock=clock)
    replanner.start()
    return replanner


def energy_guard(budget_j: float, profile, meter, clock: DeviceClock, started: float):
    """An ``on_step`` that stops training before the step that would spend more than ``budget_j`` joules: the
    energy meter's reading on a real device, the profile's power x its clock on an emulated one (None without a
    budget). The plan keeps a round within the budget; this holds it there when the plan's power figure is low.
    On an emulated device the round's setup (planning, loading the model) counts against the budget from the
    round's start; a real device's meter starts with training. Either way the setup is not a step's cost: each step
    is judged by its own joules, known once it has run, so a first step that alone costs more than is left still
    runs (and is the only one)."""
    if not budget_j:
        return None

    def spent() -> float:
        if profile is not None:
            return profile.train_watts * (clock() - started)
        return meter.totals()[0]

    last = [spent()]

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


def chain_steps(*callbacks):
    """One ``on_step`` from the present callbacks (None if there are none); True from any one stops training."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    from fedge.edge_client.device.emulated import chain

    return chain(*present)


@contextlib.contextmanager
def emulated_steps(profile, clock: DeviceClock):
    """The emulated device's per-step hook (throttle + memory cap), or None on a real device."""
    if profile is None:
        yield None
        return
    from fedge.edge_client.device.emulated import emulate

    with emulate(profile, sleep=clock.sleep, rewind=clock.rewind if clock.virtual else None) as on_step:
        yield on_step
