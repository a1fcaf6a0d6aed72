"""What one device's domain can learn from the work its plan allows, with no other client in the federation.

Issue 28 asks every domain of ``benchmarks/heterogeneous.py`` to reach half of what it reaches uncapped. This
benchmark separates the two things that can hold a slow device's domain back: the work its plan allows (layers,
batch and steps in a round) and the other clients' changes merged into the same tensors. One client trains its
domain for ``--rounds`` rounds with each plan, pinned (``RoundSettings.plan``: no re-planning), on this host's real
speed; after each round its change enters the global adapter damped by ``--share`` (its share of a federation of
four x the server lr 2 = 0.5, as in the heterogeneous benchmark), and nothing else does. The baseline, in the same
run: the uncapped plan (all layers, 15 steps of 8), what every domain trains when no device holds it back.

    python benchmarks/domain_alone.py [--domain healthcare] [--plans 7x1x17,allx1x6,allx2x17] [--seeds 0,1,2]

A plan is LAYERSxBATCHxSTEPS (LAYERS: a number of top layers or ``all``). The default plans: the Pi 4's plan in the
heterogeneous benchmark's last adaptive round (7 top layers, batch 1, ~17 steps in 95-98 s of Pi 4 time), the same
time spent on every layer (6 steps), and the work of a device ~3x faster (all layers, 17 steps of 2).
The default run writes benchmarks/results/domain_alone.json and the table in benchmarks/README.md; a run with other
arguments writes to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, add_out_argument, update_readme_section, write_results  # noqa: E402

DEFAULTS = {"model": "smollm2-135m", "domain": "healthcare", "plans": "7x1x17,allx1x6,allx2x17", "seeds": "0,1,2",
            "rounds": 6, "share": 0.5, "eval_examples": 50}  # fmt: skip

BASELINE = "allx8x15"  # the uncapped plan: the heterogeneous benchmark's round settings, every layer


def parse_plan(text: str) -> tuple[int | None, int, int]:
    """'7x1x17' -> (7, 1, 17); 'allx8x15' -> (None, 8, 15). SystemExit naming the plan when it is not one."""
    parts = text.strip().split("x")
    try:
        layers, batch, steps = (None if parts[0] == "all" else int(parts[0])), int(parts[1]), int(parts[2])
    except (ValueError, IndexError):
        raise SystemExit(f"--plans: {text!r} is not LAYERSxBATCHxSTEPS (e.g. 7x1x17 or allx8x15)") from None
    if len(parts) != 3 or min(batch, steps, 1 if layers is None else layers) < 1:
        raise SystemExit(f"--plans: {text!r}: expected three parts, each >= 1")
    return layers, batch, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--domain", default=DEFAULTS["domain"])
    p.add_argument("--plans", default=DEFAULTS["plans"])
    p.add_argument("--seeds", default=DEFAULTS["seeds"])
    p.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    p.add_argument("--share", type=float, default=DEFAULTS["share"], help="how much of the change enters the global")
    p.add_argument("--eval-examples", type=int, default=DEFAULTS["eval_examples"])
    p.add_argument("--work", type=Path, default=Path("/tmp/fedge-domain-alone"))
    add_out_argument(p, "runs with other arguments than the defaults (the default run writes benchmarks/results/)")
    args = p.parse_args()
    default_run = all(getattr(args, k) == v for k, v in DEFAULTS.items())
    plans = [BASELINE] + [t.strip() for t in args.plans.split(",") if t.strip() and t.strip() != BASELINE]
    for text in plans:
        parse_plan(text)
    seeds = [int(s) for s in args.seeds.split(",")]

    from rich.progress import Progress

    from fedge.common.models import default_cache_dir, pull_model

    cache = default_cache_dir()
    pull_model(args.model, cache)
    runs = []
    with Progress() as bar:
        task = bar.add_task("domain alone", total=len(plans) * len(seeds))
        for text in plans:
            for seed in seeds:
                runs.append(run(args, cache, text, seed))
                bar.console.print(f"  {text} seed {seed}: {runs[-1]['exact_match']:.0%} exact match, "
                                  f"loss {runs[-1]['heldout_loss']:.3f} ({runs[-1]['seconds']:.0f} s)")  # fmt: skip
                bar.advance(task)
    summary = {}
    for text in plans:
        mine = [r for r in runs if r["plan"] == text]
        ems = [r["exact_match"] for r in mine]
        summary[text] = {"exact_match_median": statistics.median(ems), "exact_match_min": min(ems),
                         "exact_match_max": max(ems),
                         "heldout_loss_median": statistics.median(r["heldout_loss"] for r in mine)}  # fmt: skip
    base = summary[BASELINE]["exact_match_median"]
    for v in summary.values():
        v["share_of_baseline"] = round(v["exact_match_median"] / base, 3) if base else None
    results = {
        "setup": {
            "model": args.model,
            "domain": args.domain,
            "rounds": args.rounds,
            "share": args.share,
            "eval_examples": args.eval_examples,
            "seeds": seeds,
            "baseline": BASELINE,
            "seq_len": 80,
        },  # fmt: skip
        "runs": runs,
        "summary": summary,
    }
    path = write_results("domain_alone", results, RESULTS if default_run else args.out)
    if default_run:
        update_readme_section("domain_alone", _table(results))
    print(f"wrote {path}")


def run(args, cache: Path, text: str, seed: int) -> dict:
    """One client, ``args.rounds`` rounds of the pinned plan ``text``, its change damped by ``args.share``."""
    from fedge.common import wire
    from fedge.common.modeling import ModelHolder
    from fedge.edge_client.federation import local_work
    from fedge.edge_client.federation.settings import Device
    from fedge.edge_client.planning.costs import SMOLLM2_135M
    from fedge.edge_client.planning.plan import DeviceCaps, RoundBudget, make_plan
    from fedge.server import hetero

    layers, batch, steps = parse_plan(text)
    # any feasible plan for the model's tensors, then pinned to the knobs under test (the predictions are unused)
    caps = DeviceCaps("host", 2, 20 * 2**30, {"fp32": 50.0})
    budget = RoundBudget(deadline_s=1e9, steps=15, batch=8, seq_len=80, label_fraction=0.15)
    plan = dataclasses.replace(
        make_plan(caps, budget, SMOLLM2_135M), top_layers=layers, micro_batch=batch, grad_accum=1, steps=steps
    )
    settings = wire.RoundSettings(
        model=args.model, steps=15, batch=8, seed=seed, eval_examples=args.eval_examples, plan=plan.to_json()
    )
    state = args.work / f"{text}-seed{seed}"
    shutil.rmtree(state, ignore_errors=True)  # a kept work directory would reply with an earlier run's updates
    device = Device("alone", f"demo:{args.domain}", f"demo:{args.domain}:test", state, cache, "fp32")
    holder = ModelHolder(cache, "fp32")
    adapter = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    t0 = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        arrays, _ = local_work.do_train(holder, device, settings, adapter, rnd)
        trained, _ = hetero.from_reply(arrays, adapter, settings.lora_alpha)
        adapter = {k: v + args.share * (trained[k] - v) if k in trained else v for k, v in adapter.items()}
    scored = local_work.do_evaluate(holder, device, dataclasses.replace(settings, plan=""), adapter)
    return {
        "plan": text,
        "seed": seed,
        "exact_match": scored[wire.Metric.EXACT_MATCH],
        "heldout_loss": scored[wire.Metric.HELDOUT_LOSS],
        "seconds": round(time.monotonic() - t0, 1),
    }


def _table(r: dict) -> str:
    s = r["setup"]
    rows = [
        f"### One domain alone: {s['domain']}, {s['model']}, {s['rounds']} rounds, change damped x{s['share']:g}, "
        f"seeds {', '.join(map(str, s['seeds']))}",
        "",
        "Plans are top layers x batch x steps per round, pinned; the baseline is the uncapped plan "
        f"({s['baseline']}). Exact match on {s['eval_examples']} held-out examples: median (min-max).",
        "",
        "| plan | exact match | held-out loss (median) | of the baseline |",
        "|---|---|---|---|",
    ]
    for text, v in r["summary"].items():
        rows.append(
            f"| {text}{' (baseline)' if text == s['baseline'] else ''} | {v['exact_match_median']:.0%} "
            f"({v['exact_match_min']:.0%}-{v['exact_match_max']:.0%}) | {v['heldout_loss_median']:.3f} | "
            + (f"{v['share_of_baseline']:.0%}" if v["share_of_baseline"] is not None else "n/a")
            + " |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
