"""Planner calibration: the training plan's predicted step time and peak RSS against measured ones.

Each configuration trains the real model (SmolLM2-135M, LoRA r=16 on all seven projections, A frozen: the
federation's default adapter) for a few steps on demo data packed into full rows, in a fresh process so its
peak RSS (VmHWM, model load included) is its own. The step time is the median of the steps after the first.

    python benchmarks/plan_calibration.py            # measure (~8 min on 2 cores), fit, write JSON + table
    python benchmarks/plan_calibration.py --table    # re-fit and re-render from the last JSON

The fit (printed, and stored in the JSON) gives `fedge.edge_client.planning.plan.HOST`'s constants; the table compares
the predictions of the constants in plan.py (the shipped model) with the measurements. Writes
benchmarks/results/plan_calibration.json and its table in benchmarks/README.md. Another ``--model`` than the default
(e.g. ``--model gemma3-270m``) is a check of the constants on a second shape: it writes
``plan_calibration_MODEL.json`` to ``--out`` (a folder in the system's temp dir unless told; benchmarks/results/
holds the current file only) and prints its tables, leaving benchmarks/README.md alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, add_out_argument, run_worker, update_readme_section, write_results  # noqa: E402

STEPS = 3  # the first is warm-up
DEFAULT = "smollm2-135m"  # HOST's constants are fitted on it
# The cores were shared with other benchmarks during calibration (load average 5-9 on 2 vCPUs), which slowed
# wall-clock steps 5-20x and unevenly, and inflated CPU seconds too (hyperthread siblings, spinning OpenMP threads).
# So every step is bracketed by a matmul probe (2048^3 fp32, same threads): the step's quiet time is its wall
# time x (probe GFLOP/s during it / the probe's GFLOP/s on the idle machine). QUIET_PROBE_GFLOPS is FACTS.md's
# fp32 matmul peak on this machine (2 threads); an assumption, as are all contention corrections.
QUIET_PROBE_GFLOPS = 306.0
# (name, precision, compute dtype, seq_len, micro_batch, checkpointing, trainable top layers)
CONFIGS = [
    ("fp32 128x4", "fp32", "fp32", 128, 4, False, 30),
    ("fp32 128x4 ckpt", "fp32", "fp32", 128, 4, True, 30),
    ("bf16 128x4", "bf16", "bf16", 128, 4, False, 30),
    ("bf16 256x8 ckpt", "bf16", "bf16", 256, 8, True, 30),
    ("bf16 256x4 top8", "bf16", "bf16", 256, 4, False, 8),
    ("int8 128x4", "int8", "bf16", 128, 4, False, 30),
    ("int4 256x4 ckpt", "int4", "bf16", 256, 4, True, 30),
    ("int4/fp32 128x4", "int4", "fp32", 128, 4, False, 30),
]


def probe_gflops() -> float:
    """fp32 GFLOP/s of two 2048x2048 matmuls right now (~0.1 s on an idle 2-core machine)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(2):
        a @ b
    return 2 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9


def quiet_step_s(run: dict) -> float:
    """The step time on an idle machine: each timed step's wall time scaled by the probes around it."""
    probes = run["probe_gflops"]  # one before training, one after each step
    scaled = [t * (probes[i] + probes[i + 1]) / 2 / QUIET_PROBE_GFLOPS for i, t in enumerate(run["step_times_s"])]
    return statistics.median(scaled[1:])


def worker(spec: list, cache_dir: Path, threads: int, model_name: str = "smollm2-135m") -> dict:
    from fedge.edge_client.training.memory import current_rss_mb, peak_rss_mb, reset_peak_rss

    name, precision, compute, seq_len, micro, ckpt, layers = spec
    import torch

    from fedge.common.modeling import LoraSettings, add_lora, open_model
    from fedge.edge_client.planning.plan import ALL_TARGETS, Knobs, loss_chunk_for
    from fedge.edge_client.training.data import encode_all, load_examples, packed_batches
    from fedge.edge_client.training.train import TrainConfig, train

    torch.set_num_threads(threads)
    runtime_mb = current_rss_mb()  # imports done, nothing loaded
    shape = _model(model_name, cache_dir)
    layers = min(layers, shape.layers)
    knobs = Knobs(precision, ckpt, micro, 1, seq_len, layers, 16)
    session = open_model(
        model_name,
        cache_dir,
        precision,
        "cpu",
        compute_dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[compute]),
    )
    lora = LoraSettings(
        r=16, alpha=32, target_modules=ALL_TARGETS, freeze_a=True, top_layers=layers if layers < shape.layers else None
    )
    model = add_lora(session.model, lora)
    load_peak_mb, loaded_mb = peak_rss_mb(), current_rss_mb()
    encoded = encode_all(session.tokenizer, load_examples("demo:all"), seq_len)
    batches = packed_batches(encoded, micro, seq_len, session.tokenizer.pad_token_id, seed=0)
    labels = [int((b.labels[:, 1:] != -100).sum()) for b in batches[:STEPS]]
    cfg = TrainConfig(
        steps=STEPS, micro_batch=micro, seq_len=seq_len, gradient_checkpointing=ckpt, loss_chunk=loss_chunk_for(knobs),
        warmup_steps=0, lr_schedule="constant", checkpoint_every=0, lora=lora,
    )  # fmt: skip
    reset_peak_rss()
    times, cpu, last, probes = [], [], [time.process_time()], [probe_gflops()]

    def on_step(step: int, loss: float, tokens: int, seconds: float) -> None:
        times.append(seconds)
        cpu.append(time.process_time() - last[0])
        probes.append(probe_gflops())  # after the step's timing: the probe is not part of it
        last[0] = time.process_time()

    train(model, lambda epoch: batches, cfg, torch.device("cpu"), on_step=on_step)
    return {
        "name": name,
        "runtime_mb": runtime_mb,
        "loaded_mb": loaded_mb,
        "load_peak_mb": load_peak_mb,
        "train_peak_mb": peak_rss_mb(),
        "step_times_s": times,
        "step_s": statistics.median(times[1:]),
        "step_cpu_s": cpu,
        "probe_gflops": probes,
        "load_avg_1min": __import__("os").getloadavg()[0],
        "label_fraction": sum(labels) / (len(labels) * micro * (seq_len - 1)),
    }


SAMPLE_ROUND = {"deadline_s": 120.0, "steps": 15, "r_max": 16}


def plan_worker(device: str, cache_dir: Path) -> dict:
    """Run the sample round's plan for an emulated device for 3 steps under its memory cap (no throttle sleeps:
    this checks memory, not time). Returns the peak RSS (load included) and whether the cap tripped."""
    import torch

    from fedge.common.modeling import LoraSettings, add_lora, open_model
    from fedge.edge_client.device.emulated import PROFILES, EmulatedOutOfMemory, emulate
    from fedge.edge_client.planning.plan import SMOLLM2_135M, RoundBudget, make_plan
    from fedge.edge_client.training.data import encode_all, load_examples, packed_batches
    from fedge.edge_client.training.memory import peak_rss_mb
    from fedge.edge_client.training.train import TrainConfig, train

    profile = PROFILES[device]
    plan = make_plan(profile.caps(), RoundBudget(**SAMPLE_ROUND), SMOLLM2_135M)
    oom = None
    with emulate(profile, sleep=lambda seconds: None) as on_step:
        try:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan.compute_dtype]
            session = open_model("smollm2-135m", cache_dir, plan.precision, "cpu", compute_dtype=dtype)
            lora = LoraSettings(alpha=2 * plan.lora_r, freeze_a=True, **plan.lora_overrides())
            model = add_lora(session.model, lora)
            encoded = encode_all(session.tokenizer, load_examples("demo:all"), plan.seq_len)
            batches = packed_batches(encoded, plan.micro_batch, plan.seq_len, session.tokenizer.pad_token_id, seed=0)
            overrides = {**plan.train_overrides(), "steps": 3}
            cfg = TrainConfig(**overrides, warmup_steps=0, lr_schedule="constant", checkpoint_every=0, lora=lora)
            train(model, lambda epoch: batches, cfg, torch.device("cpu"), on_step=on_step)
        except EmulatedOutOfMemory as err:
            oom = str(err)
    return {"device": device, "plan": plan.to_dict(), "peak_rss_mb": peak_rss_mb(), "oom": oom}


def knobs_of(spec: list, model):
    from fedge.edge_client.planning.plan import Knobs

    _, precision, compute, seq_len, micro, ckpt, layers = spec
    return Knobs(precision, ckpt, micro, 1, seq_len, min(layers, model.layers), 16)


def predict(spec: list, label_fraction: float, model, host=None) -> tuple[float, float]:
    """(step seconds, peak bytes) the planner predicts for a calibration config on the reference machine."""
    from fedge.edge_client.planning.plan import HOST, RoundBudget, estimate

    host = host or HOST
    caps = predict_caps(spec, host)
    budget = RoundBudget(deadline_s=1e9, label_fraction=label_fraction, r_max=16)
    est = estimate(knobs_of(spec, model), caps, budget, model, host)
    return est.step_s, est.peak_bytes


def _model(name: str, cache_dir: Path):
    """The planner's shape of ``name``, read from its config as a device reads it (`local_work.model_shape`)."""
    from fedge.edge_client.federation.local_work import model_shape

    return model_shape(cache_dir, name)


def fit(rows: list[dict], model) -> dict:
    """Fit HOST's constants to the measurements.

    Throughput per path: the median model GFLOP/s over its configs (after the fixed per-step overhead).
    Memory: peak - (runtime + weights + LoRA state + logits) = train_overhead + act_scale x modelled activations
    + token_bytes x tokens per micro-batch (one scale for both dtypes: the model already counts bytes per dtype),
    by least squares; then the overhead is raised to the largest residual, so the model bounds every measured
    peak from above: the planner must not under-predict (an OOM costs the round). Load: load peak - runtime -
    weights, per precision.
    """
    import numpy as np

    from fedge.edge_client.planning.plan import HOST, RoundBudget, activation_bytes, estimate, step_flops, weight_bytes

    by_path: dict[str, list[float]] = {}
    load_extra: dict[str, list[float]] = {}
    units, tokens, target = [], [], []
    runtime = statistics.median(r["runtime_mb"] for r in rows) * 2**20
    unit_host = _unit_host(runtime)
    for spec, r in zip(CONFIGS, rows):
        k = knobs_of(spec, model)
        budget = RoundBudget(deadline_s=1e9, label_fraction=r["label_fraction"], r_max=16)
        key = spec[1] if spec[2] == "bf16" or spec[1] == "fp32" else f"{spec[1]}-fp32"
        seconds = quiet_step_s(r) - HOST.step_overhead_s
        by_path.setdefault(key, []).append(step_flops(k, budget, model) / seconds / 1e9)
        weights = weight_bytes(spec[1], spec[2], model)
        unit = activation_bytes(k, spec[2], model, host=unit_host)
        # Everything the model predicts except activations and the training overhead (both zero in unit_host).
        caps_spec = predict_caps(spec, unit_host)
        rest = estimate(k, caps_spec, budget, model, unit_host)
        fixed = rest.peak_bytes - unit - runtime  # weights + LoRA state + logits (load peak ignored: extra 0)
        units.append(unit)
        tokens.append(k.micro_batch * k.seq_len)
        target.append(r["train_peak_mb"] * 2**20 - runtime - fixed)
        load_extra.setdefault(spec[1], []).append(r["load_peak_mb"] * 2**20 - runtime - weights)
    design = np.array([[1.0, u, n] for u, n in zip(units, tokens)])
    (_, scale, per_token), *_ = np.linalg.lstsq(design, np.array(target), rcond=None)
    scale, per_token = max(0.0, float(scale)), max(0.0, float(per_token))
    overhead = max(t - scale * u - per_token * n for t, u, n in zip(target, units, tokens))
    return {
        "train_gflops": {k: round(statistics.median(v), 1) for k, v in by_path.items()},
        "runtime_bytes": round(runtime, -6),
        "train_overhead_bytes": round(overhead + 0.5e6, -6),
        "act_scale": {"fp32": round(scale, 2), "bf16": round(scale, 2)},
        "token_bytes": round(per_token, -3),
        "load_extra_bytes": {k: round(max(0.0, statistics.median(v)), -6) for k, v in load_extra.items()},
    }


def predict_caps(spec: list, host):
    """A reference-machine DeviceCaps that runs exactly this config's path."""
    from fedge.edge_client.planning.plan import DeviceCaps

    key = spec[1] if spec[1] == spec[2] or spec[1] in ("fp32", "bf16") else f"{spec[1]}-fp32"
    return DeviceCaps("host", 2, 2**40, {spec[1]: host.train_gflops[key]}, bf16_native=spec[2] == "bf16")


def _unit_host(runtime_bytes: float):
    import dataclasses

    from fedge.edge_client.planning.plan import HOST

    zero_load = {p: 0.0 for p in HOST.load_extra_bytes}
    return dataclasses.replace(
        HOST,
        act_scale={"fp32": 1.0, "bf16": 1.0},
        train_overhead_bytes=0.0,
        token_bytes=0.0,
        load_extra_bytes=zero_load,
    )


def fitted_host(fit: dict):
    """HOST with the constants of a `fit` (what it did not measure stays HOST's)."""
    from fedge.edge_client.planning.plan import HOST

    merged = {
        "train_gflops": {**HOST.train_gflops, **fit["train_gflops"]},
        "load_extra_bytes": {**HOST.load_extra_bytes, **fit["load_extra_bytes"]},
    }
    rest = {k: v for k, v in fit.items() if k not in merged}
    return dataclasses.replace(HOST, **rest, **merged)


def table(results: dict, model, host=None, constants: str = "the shipped constants (`plan.HOST`)") -> str:
    s = results["setup"]
    lines = [
        f"### Planner calibration: {s['model']}, LoRA r=16 on all 7 projections (A frozen), {s['steps']} steps "
        f"(median of the last {s['steps'] - 1}), {s['threads']} threads; predicted with {constants}",
        "",
        "| config | wall step, contended (s) | probe-scaled step (s) | predicted step (s) | error "
        "| peak RSS (MB) | predicted peak (MB) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    t_err, m_err = [], []
    for spec, r in zip(CONFIGS, results["runs"]):
        step, peak = predict(spec, r["label_fraction"], model, host)
        quiet = quiet_step_s(r)
        peak_mb, measured_peak = peak / 2**20, max(r["load_peak_mb"], r["train_peak_mb"])
        te, me = step / quiet - 1, peak_mb / measured_peak - 1
        t_err.append(abs(te))
        m_err.append(abs(me))
        lines.append(
            f"| {r['name']} | {r['step_s']:.1f} | {quiet:.2f} | {step:.2f} | {te:+.0%} | {measured_peak:.0f} "
            f"| {peak_mb:.0f} | {me:+.0%} |"
        )
    lines += [
        "",
        f"Median absolute error: step time (against the probe-scaled step) {statistics.median(t_err):.0%} "
        f"(max {max(t_err):.0%}), "
        f"peak RSS {statistics.median(m_err):.0%} (max {max(m_err):.0%}).",
    ]
    return "\n".join(lines)


def plans_table(verified: dict | None = None) -> str:
    """The plan each emulated device gets for the sample round, with the shipped constants (and, if
    ``verified`` has them, the peak RSS measured running it under the device's memory cap)."""
    from fedge.edge_client.device.emulated import PROFILES
    from fedge.edge_client.planning.plan import GIB, SMOLLM2_135M, RoundBudget, make_plan

    budget, verified = RoundBudget(**SAMPLE_ROUND), verified or {}
    deadline_s, steps, r_max = budget.deadline_s, budget.steps, budget.r_max
    lines = [
        f"Plans for a sample round (deadline {deadline_s:.0f} s, {steps} steps of batch {budget.batch} x "
        f"{budget.seq_len} tokens requested, r_max {r_max}, all 7 projections, label fraction "
        f"{budget.label_fraction}; margins: {budget.time_margin:.0%} of the deadline, "
        f"{budget.memory_margin:.0%} of memory):",
        "",
        "| device | precision (compute) | rank | layers | seq | micro x accum | ckpt | steps | predicted s "
        "| predicted peak (GiB) / cap | measured peak, 3 steps (GiB) | upload (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, profile in PROFILES.items():
        p = make_plan(profile.caps(), budget, SMOLLM2_135M)
        lines.append(
            f"| {name} | {p.precision} ({p.compute_dtype}) | {p.lora_r} | {p.top_layers or 'all'} | {p.seq_len} "
            f"| {p.micro_batch} x {p.grad_accum} | {'on' if p.gradient_checkpointing else 'off'} | {p.steps} "
            f"| {p.predicted_s:.0f} | {p.predicted_peak_bytes / GIB:.2f} / {profile.memory_bytes / GIB:.1f} "
            f"| {_measured(verified.get(name), p)} | {p.predicted_upload_bytes / 1e6:.1f} |"
        )
    return "\n".join(lines)


def _measured(run: dict | None, plan) -> str:
    if run is None:
        return "not run"
    from fedge.edge_client.planning.plan import TrainingPlan

    if TrainingPlan.from_dict(run["plan"]) != plan:
        return "stale (plan changed)"
    return "OOM: " + run["oom"] if run["oom"] else f"{run['peak_rss_mb'] / 1024:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="re-fit and re-render from the last results")
    parser.add_argument("--resume", action="store_true", help="keep the configs a killed run already measured")
    parser.add_argument("--verify-plans", action="store_true", help="also run each device's sample plan (~5 min)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument(
        "--model", default=DEFAULT, help="the model measured; another than the default checks the shipped constants "
        "(fitted on the default) on a differently shaped model, e.g. gemma3-270m",
    )  # fmt: skip
    add_out_argument(parser, "another --model's plan_calibration_MODEL.json")
    args = parser.parse_args()
    from fedge.common.models import default_cache_dir, pull_model

    cache = args.cache_dir or default_cache_dir()
    name = "plan_calibration" if args.model == DEFAULT else f"plan_calibration_{args.model}"
    folder = RESULTS if args.model == DEFAULT else args.out
    if args.worker and args.worker.startswith("plan:"):
        print(json.dumps(plan_worker(args.worker.removeprefix("plan:"), cache)))
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), cache, args.threads, args.model)))
        return
    pull_model(args.model, cache)
    model = _model(args.model, cache)
    if args.table:
        results = json.loads((folder / f"{name}.json").read_text())
    else:
        t0, runs = time.time(), []
        partial = folder / f"{name}.partial.json"
        done = (
            {r["name"]: r for r in json.loads(partial.read_text())["runs"]} if args.resume and partial.exists() else {}
        )
        for spec in CONFIGS:
            argv = [json.dumps(spec), "--threads", str(args.threads), "--cache-dir", str(cache), "--model", args.model]
            runs.append(done.get(spec[0]) or run_worker(Path(__file__), argv))
            write_results(f"{name}.partial", {"runs": runs}, folder)  # a long run keeps what it measured
            r = runs[-1]
            print(f"{spec[0]}: {r['step_s']:.2f} s/step, peak {max(r['load_peak_mb'], r['train_peak_mb']):.0f} MB")
        setup = {"model": args.model, "steps": STEPS, "threads": args.threads, "seconds": round(time.time() - t0),
                 "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        results = {"setup": setup, "runs": runs}
    results["shape"] = dataclasses.asdict(model)
    results["fit"] = fit(results["runs"], model)
    if args.verify_plans:
        from fedge.edge_client.device.emulated import PROFILES

        results["plans"] = {}
        for device in PROFILES:
            run = run_worker(Path(__file__), [f"plan:{device}", "--cache-dir", str(cache)])
            results["plans"][device] = {k: v for k, v in run.items() if k != "device"}
            print(f"{device}: peak {run['peak_rss_mb']:.0f} MB, oom: {run['oom']}", flush=True)
    print("fitted constants:", json.dumps(results["fit"], indent=1))
    print(f"wrote {write_results(name, results, folder)}")
    if not args.table:
        partial.unlink(missing_ok=True)
    markdown = table(results, model)
    if args.model == DEFAULT:
        markdown += "\n\n" + plans_table(results.get("plans"))
    elif (RESULTS / "plan_calibration.json").exists():  # the cost model carried over from the default's shape
        default = json.loads((RESULTS / "plan_calibration.json").read_text())
        note = f"the constants fitted on {DEFAULT} in its last run ({default['setup'].get('date', 'same machine')})"
        markdown += "\n\n" + table(results, model, fitted_host(default["fit"]), note)
    if args.model == DEFAULT:
        update_readme_section(name, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
