"""``fedge profile``: what this device can do and what training and generation cost it (time, memory, energy).

Reads top to bottom as setup (inventory, meters), run (matmuls per dtype, then a model's LoRA training steps
and greedy generation, all under one energy session), report (rich table, JSON, PNG timeline). Every figure
is a median over repetitions after warm-up, with its min and max; a figure that cannot be had here is
``null`` in the JSON with its reason under ``unavailable`` (``"training.energy_j": "..."``).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.common.errors import FedgeError
from fedge.common.models import DEFAULT_MODEL
from fedge.edge_client.device import energy, inventory
from fedge.edge_client.device.inventory import Missing

if TYPE_CHECKING:
    import torch  # imported where it is used: `fedge --help` builds this module's options without torch

Say = Callable[[str], None]


@dataclass
class ProfilePlan:
    """What to measure. Training uses the federated rounds' LoRA shape on packed demo rows of ``seq_len``."""

    model: str | None = DEFAULT_MODEL  # None: device and matmuls only
    precision: str = "auto"
    device: str = "auto"
    steps: int = 8  # timed training steps, after ``warmup`` untimed ones
    warmup: int = 1
    batch: int = 4
    seq_len: int = 128
    gen_tokens: int = 32  # new tokens per generation, batch 1
    gen_reps: int = 3
    lora_r: int = 16
    threads: int = 0  # torch threads; 0: torch's default (all cores). 1 can be several times faster on a busy CPU
    tdp_w: float | None = None  # the estimate's TDP; None: detected (energy.detect_tdp)
    interval_s: float = 0.25  # energy/timeline sampling period
    budget_s: float | None = 90.0  # target wall time: fewer timed steps/repetitions (never < 2 steps) to fit it

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        for name in ("steps", "batch", "gen_tokens", "gen_reps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.seq_len < 16:
            raise ValueError(f"seq_len must be >= 16, got {self.seq_len}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0 s, got {self.budget_s}")
        if self.tdp_w is not None and not self.tdp_w > 0:
            raise ValueError(f"tdp_w must be > 0 W, got {self.tdp_w}")


def spread(values: list[float]) -> dict:
    """{median, min, max, n} of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --- measurements ---------------------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, budget_s: float = 1.0, max_n: int = 2048) -> dict | Missing:
    """Square matmul throughput in GFLOP/s (2n^3 per matmul): {median, min, max, n, size}.

    A 512 probe sizes the matrix so one matmul takes about budget/20 (at most ``max_n``); then repetitions
    run until ``budget_s`` is spent. A dtype the CPU cannot multiply is a Missing with torch's error.
    """
    import torch

    try:
        a, b = torch.randn(512, 512).to(dtype), torch.randn(512, 512).to(dtype)
        torch.mm(a, b)  # the first call starts thread pools and picks kernels: not timed
        t0 = time.perf_counter()
        torch.mm(a, b)
        probe = max(time.perf_counter() - t0, 1e-6)
    except RuntimeError as err:
        return Missing(f"torch cannot multiply {dtype} matrices here ({err})")
    rate = 2 * 512**3 / probe
    n = int(min(max_n, max(256, (rate * budget_s / 20 / 2) ** (1 / 3))) // 256 * 256)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: first-call allocation and kernel selection
    rates: list[float] = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(rates) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
        if len(rates) >= 200:
            break
    return {**spread(rates), "size": n}


def _train_config(plan: ProfilePlan, steps: int):
    """The rounds' training setup (LoRA shape, learning rate) on packed rows; no checkpoints."""
    from fedge.common.modeling import LoraSettings
    from fedge.common.wire import RoundSettings
    from fedge.edge_client.training.train import TrainConfig

    rounds = RoundSettings()
    return TrainConfig(
        steps=steps,
        micro_batch=plan.batch,
        seq_len=plan.seq_len,
        pack=True,
        lr=rounds.lr,
        warmup_steps=0,
        lr_schedule="constant",
        checkpoint_every=0,
        lora=LoraSettings(
            r=plan.lora_r,
            alpha=2 * plan.lora_r,
            target_modules=rounds.targets,
            freeze_a=rounds.lora_freeze_a,
        ),
    )


def fit_reps(wanted: int, each_s: float, budget_s: float | None, least: int) -> int:
    """How many repetitions of ``each_s`` seconds fit ``budget_s``: between ``least`` and ``wanted``."""
    if budget_s is None or each_s <= 0:
        return wanted
    return max(least, min(wanted, int(budget_s / each_s)))


def profile_training(
    session, plan: ProfilePlan, meter: energy.EnergySession, budget_s: float | None = None
) -> tuple[object, dict]:
    """LoRA training on packed demo rows: (the LoRA model, figures). Energy covers the timed steps only.

    Warm-up steps run first; the last one's time sizes the timed steps to what is left of ``budget_s``
    (at least one).
    """
    from fedge.common.modeling import add_lora
    from fedge.edge_client.training.data import load_examples
    from fedge.edge_client.training.memory import peak_rss_mb, reset_peak_rss
    from fedge.edge_client.training.session import epoch_maker
    from fedge.edge_client.training.train import train

    cfg = _train_config(plan, plan.steps)
    make_epoch = epoch_maker(session.tokenizer, load_examples("demo:all"), cfg)
    model = add_lora(session.model, cfg.lora, seed=0)
    times: list[float] = []
    tokens: list[int] = []

    def record(step: int, loss: float, n: int, dt: float) -> None:
        times.append(dt)
        tokens.append(n)

    reset_peak_rss()
    steps, t0 = plan.steps, time.monotonic()
    if plan.warmup:
        with meter.phase("train-warmup"):
            train(model, make_epoch, _train_config(plan, plan.warmup), session.device, on_step=record)
        left = budget_s and budget_s - (time.monotonic() - t0)
        steps = fit_reps(plan.steps, times[-1], left, least=1)
        times.clear()
        tokens.clear()
    with meter.phase("train"):
        train(model, make_epoch, _train_config(plan, steps), session.device, on_step=record)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, {
        "plan": {
            "steps_timed": steps,
            "warmup_steps": plan.warmup,
            "batch": plan.batch,
            "seq_len": plan.seq_len,
            "lora_r": plan.lora_r,
            "lora_targets": ",".join(cfg.lora.target_modules),
            "trainable_params": trained,
        },
        "step_s": spread(times),
        "tokens_per_step": statistics.median(tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **_energy_figures(meter.phases["train"], sum(tokens)),
    }


def profile_generation(
    model,
    tokenizer,
    device: torch.device,
    plan: ProfilePlan,
    meter: energy.EnergySession,
    budget_s: float | None = None,
) -> dict:
    """Greedy generation, batch 1, a fixed number of new tokens per repetition (EOS ignored).

    A 4-token warm-up sizes the run to ``budget_s``: fewer repetitions, then fewer tokens (at least 8).
    """
    from fedge.edge_client.training.data import load_examples, prompt_text
    from fedge.edge_client.training.memory import peak_rss_mb, reset_peak_rss

    example = next(ex for ex in load_examples("demo:all:test") if ex.messages)
    enc = tokenizer(prompt_text(tokenizer, example.prompt), return_tensors="pt", add_special_tokens=False).to(device)
    model.eval()

    def generate(new: int) -> float:
        t0 = time.perf_counter()
        model.generate(
            **enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        return time.perf_counter() - t0

    reset_peak_rss()
    with meter.phase("generate-warmup"):
        per_token = generate(4) / 4  # warm-up, and a (pessimistic: prompt included) time per token
        budget = budget_s and budget_s / 2  # half for the first-token runs, half for the timed ones
        new = plan.gen_tokens if budget is None else max(8, min(plan.gen_tokens, int(budget / per_token)))
        reps = fit_reps(plan.gen_reps, per_token * new, budget, least=1)
        first = [generate(1) for _ in range(reps)]  # prompt processing + one token
    with meter.phase("generate"):
        times = [generate(new) for _ in range(reps)]
    return {
        "batch": 1,
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "new_tokens": new,
        "first_token_ms": {k: v * 1000 if k != "n" else v for k, v in spread(first).items()},
        "tokens_per_s": spread([new / t for t in times]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **_energy_figures(meter.phases["generate"], new * reps),
    }


def _energy_figures(phase: energy.Phase, tokens: int) -> dict:
    seconds = phase.end_s - phase.start_s
    return {
        "energy_j": round(phase.joules, 3),
        "j_per_token": phase.joules / tokens if tokens else Missing("no tokens"),
        "mean_power_w": phase.joules / seconds if seconds > 0 else Missing("zero-length phase"),
    }


# --- the command --------------------------------------------------------------------------------------------------


def resolve_model(requested: str | None, cache_dir: Path) -> tuple[str | None, str | None]:
    """(model to profile, or None and why not). Without ``--model``: the default model if it is cached."""
    from fedge.common.models import DEFAULT_MODEL, list_models

    if requested == "none":
        return None, "skipped (--model none)"
    if requested:
        return requested, None
    cached = {m.name for m in list_models(cache_dir) if m.path}
    if DEFAULT_MODEL in cached:
        return DEFAULT_MODEL, None
    return (
        None,
        f"no --model and {DEFAULT_MODEL} is not in the cache ({cache_dir}): run `fedge model pull {DEFAULT_MODEL}`",
    )


def check_plot_path(path: Path | None) -> None:
    """Fail before measuring if the PNG cannot be written."""
    if path is None:
        return
    if path.suffix.lower() != ".png":
        raise FedgeError(f"--plot {path}: expected a .png file name")
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        what = "is a directory" if path.is_dir() else f"directory {parent} does not exist or is not writable"
        raise FedgeError(f"--plot {path}: cannot write there ({what})")


def run_profile(plan: ProfilePlan, cache_dir: Path, say: Say, plot: Path | None = None) -> dict:
    """Measure everything in ``plan``; returns the report tree (with Missing values; see split_missing).

    Input mistakes (a model that does not exist, a plot path that cannot be written) raise FedgeError
    before anything is measured.
    """
    import torch

    from fedge.common.models import pull_model

    check_plot_path(plot)
    model_name, no_model = resolve_model(plan.model, cache_dir)
    if model_name is not None:
        pull_model(model_name, cache_dir, say)  # a bad name or path fails here, in a second
    if plan.threads:
        torch.set_num_threads(plan.threads)
    deadline = time.monotonic() + plan.budget_s if plan.budget_s else None
    t_start = time.monotonic()
    say("inventory: CPU, memory, sensors, backends, energy meters")
    report: dict = {"schema": "fedge-profile/1", "device": inventory.collect()}
    tdp = (plan.tdp_w, "declared with --tdp-watts") if plan.tdp_w else None
    with energy.EnergySession(None, tdp, plan.interval_s, inventory.max_temperature) as meter:
        say("matmul throughput: fp32, bf16, fp16")
        with meter.phase("matmul"):
            dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
            report["matmul_gflops"] = {name: matmul_gflops(dtype) for name, dtype in dtypes.items()}
        if model_name is None:
            report["model"] = report["training"] = report["generation"] = Missing(no_model or "no model")
        else:
            report.update(_profile_model(model_name, plan, cache_dir, meter, say, deadline))
    assert meter.result is not None
    report.update(_energy_report(meter.result))
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    report["plot"] = str(plot) if plot else Missing("no --plot FILE given")
    if plot:
        plot_timeline(meter.result, plot)
    return report


def _profile_model(
    name: str, plan: ProfilePlan, cache_dir: Path, meter: energy.EnergySession, say: Say, deadline: float | None
) -> dict:
    """Load the model, then training and generation; what is left of the budget goes 2/3 to training."""
    from fedge.common.modeling import open_model

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    with meter.phase("load"):
        t0 = time.monotonic()
        session = open_model(name, cache_dir, plan.precision, plan.device, say=say)
        load_s = time.monotonic() - t0
    say(f"training: {plan.warmup} warm-up + up to {plan.steps} timed steps of {plan.batch} x {plan.seq_len}")
    budget = left()
    model, training = profile_training(session, plan, meter, budget and budget * 0.65)
    say(f"generation: up to {plan.gen_reps} x {plan.gen_tokens} new tokens, batch 1")
    generation = profile_generation(model, session.tokenizer, session.device, plan, meter, left())
    described = {
        "name": name,
        "precision": session.precision,
        "device": str(session.device),
        "params_m": round(sum(p.numel() for p in session.model.parameters()) / 1e6, 1),
        "load_s": round(load_s, 2),
    }
    return {"model": described, "training": training, "generation": generation}


def save_for_planner(report: dict, cache_dir: Path) -> Path | None:
    """Keep a model's profile (``split_missing``'s report) where this device's planner looks for it
    (`fedge.edge_client.device.emulated.saved_profile`); None when no model was profiled. Atomic."""
    import json
    import platform

    from fedge.common.fsutil import atomic_write_text
    from fedge.edge_client.device.emulated import profile_path

    model = report.get("model")
    if not isinstance(model, dict) or not model.get("name"):
        return None
    path = profile_path(cache_dir, model["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"machine": platform.node(), "created": time.strftime("%Y-%m-%d %H:%M"), **report}
    atomic_write_text(path, json.dumps(saved))
    return path


def _energy_report(result: energy.EnergyResult) -> dict:
    """The session's totals, phases and timeline (columns of energy.TIMELINE_KEYS)."""
    timeline: dict[str, object] = {key: [row[key] for row in result.timeline] for key in energy.TIMELINE_KEYS}
    if all(row["temp_c"] is None for row in result.timeline):
        timeline["temp_c"] = Missing("no temperature sensor on this device")
    return {
        "energy": {
            "method": result.method,
            "description": result.description,
            "estimated": result.estimated,
            "note": result.note or Missing("no meter failed during the run: nothing to note"),
            "total_j": round(result.joules, 2),
            "mean_power_w": result.mean_power_w,
            "phases": {name: asdict(p) for name, p in result.phases.items()},
        },
        "timeline": timeline,
    }


def plot_timeline(result: energy.EnergyResult, path: Path) -> None:
    """PNG: power, CPU %, RSS and temperature over the run, phases shaded. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedge.common.fsutil import atomic_write_bytes

    rows = result.timeline
    t = [r["t_s"] for r in rows]
    panels = (
        ("power_w", f"power W ({result.method})"),
        ("cpu_pct", "process CPU %"),
        ("rss_mb", "RSS MB"),
        ("temp_c", "temperature °C"),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 8), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        values = [r[key] for r in rows]
        if any(v is not None for v in values):
            ax.plot(t, [float("nan") if v is None else v for v in values], lw=1.2)
        else:
            ax.text(0.5, 0.5, "no sensor on this device", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        for i, phase in enumerate(result.phases.values()):
            ax.axvspan(phase.start_s, phase.end_s, color=f"C{i + 1}", alpha=0.12)
    for i, phase in enumerate(result.phases.values()):  # labels at two heights so short phases do not overlap
        middle = (phase.start_s + phase.end_s) / 2
        axes[0].text(middle, 1.02 + 0.1 * (i % 2), phase.name, transform=axes[0].get_xaxis_transform(),
                     ha="center", fontsize=8, color=f"C{i + 1}")  # fmt: skip
    axes[-1].set_xlabel("s")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as err:
        raise FedgeError(f"--plot {path}: cannot write ({err.strerror})") from None


def render_table(report: dict, unavailable: dict[str, str]):
    """The human view of a split report (see split_missing): one row per figure, '-' where the JSON has null."""
    from rich.table import Table

    def f(value, spec: str = ".1f", unit: str = "") -> str:
        return "-" if value is None else f"{format(value, spec)}{unit}"

    dev, table = report["device"], Table("", "figure", "value", title="fedge profile", title_justify="left")
    cpu = dev["cpu"]
    table.add_row("device", "CPU", f"{cpu['model']} ({cpu['arch']}, {cpu['cores_logical']} threads)")
    table.add_row("", "ISA", " ".join(cpu["isa"] or []) or "-")
    if cpu["load_avg_1m"] > cpu["cores_logical"]:
        busy = f"{cpu['load_avg_1m']:.1f} on {cpu['cores_logical']} cores: figures are a share of a busy CPU"
        hint = " (try --threads 1)" if dev["torch_threads"] > 1 else ""
        table.add_row("", "load average", f"[yellow]{busy}{hint}[/]")
    table.add_row("", "torch threads", str(dev["torch_threads"]))
    table.add_row("", "board / power", f"{dev['board']['model'] or '-'} / {dev['power']['source'] or '-'}")
    table.add_row("", "RAM (MB)", f"{dev['memory']['ram_total_mb']} ({dev['memory']['ram_available_mb']} free)")
    q = dev["quantization"]
    table.add_row("", "precisions", " ".join(k for k, v in q.items() if v == "ok") + f" (auto: {q['auto']})")
    for name, m in report["matmul_gflops"].items():
        table.add_row(
            "matmul", f"{name} GFLOP/s", "-" if m is None else f"{m['median']:.0f} ({m['min']:.0f}-{m['max']:.0f})"
        )
    model, tr, gen = report["model"], report["training"], report["generation"]
    if model:
        table.add_row(
            "model", model["name"], f"{model['precision']} on {model['device']}, loaded in {model['load_s']} s"
        )
    if tr:
        s = tr["step_s"]
        table.add_row("training", "step s", f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}, n={s['n']})")
        table.add_row("", "tokens/s", f(tr["tokens_per_s"], ".0f"))
        table.add_row("", "peak RSS MB", f(tr["peak_rss_mb"], ".0f"))
        table.add_row("", "J/token", f(tr["j_per_token"], ".4f"))
    if gen:
        g = gen["tokens_per_s"]
        table.add_row("generation", "tokens/s (batch 1)", f"{g['median']:.1f} ({g['min']:.1f}-{g['max']:.1f})")
        table.add_row("", "first token ms", f(gen["first_token_ms"]["median"], ".0f"))
        table.add_row("", "J/token", f(gen["j_per_token"], ".4f"))
    for key in ("model", "training", "generation"):
        if key in unavailable:
            table.add_row(key, "skipped", unavailable[key])
    e = report["energy"]
    table.add_row("energy", "method", f"{e['method']}: {e['description']}")
    table.add_row("", "total J / mean W", f"{e['total_j']:.1f} / {f(e['mean_power_w'])}")
    table.add_row("", "wall s", f(report["wall_s"]))
    return table
