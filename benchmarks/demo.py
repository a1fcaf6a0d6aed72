"""The main job end to end: ``fedge demo`` (default settings) over several seeds, and where each round's time goes.

Runs ``fedge demo --seed S --out DIR`` for each ``--seeds`` (or reads finished runs' ``report.json`` with
``--reports DIR ...``, e.g. the README's fresh-clone run) and reports, across the seeds, the final exact match,
the minutes to the end and to 50% / 80% exact match (from the command's start: model pull included when the cache
was empty), and per round of each run its cost breakdown: the slowest client's training, the median client's
scoring and fixed cost (ClientApp process start to handler, and getting the model ready), and the rest of the
round (Flower's message transport and polling, and the server's aggregation).

Baseline in the same run: ``fedge demo --no-launcher`` on ``--baseline-seeds`` (each message's ClientApp in a fresh
``flwr-clientapp`` process, as Flower starts it, where fedge's launcher forks it from a process that has done the
imports; ``--baseline-reports DIR ...`` reads finished ones).

    python benchmarks/demo.py --seeds 0,1,2 --baseline-seeds 0 [--cache-dir DIR] [-- extra fedge demo flags]
    python benchmarks/demo.py --reports /tmp/fresh-demo /tmp/seed1 /tmp/seed2 --baseline-reports /tmp/nolaunch0

Targets (issue "The main job, fast"): >= 80% exact match within 15 minutes including the model pull; fixed cost
< 3 s per client per round. Writes benchmarks/results/demo.json and its table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--reports", nargs="*", type=Path, default=None, help="finished demo directories to read instead")
    p.add_argument("--baseline-seeds", default="0", help="seeds to run with --no-launcher ('': none)")
    p.add_argument("--baseline-reports", nargs="*", type=Path, default=None, help="finished --no-launcher runs")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="more `fedge demo` flags (after --)")
    args = p.parse_args()
    dirs = args.reports if args.reports is not None else run_demos(args.seeds, args.cache_dir, args.extra)
    baseline_dirs = args.baseline_reports
    if baseline_dirs is None:  # with --reports, finished runs only: none unless --baseline-reports names them
        baseline_dirs = (
            []
            if args.reports is not None
            else run_demos(args.baseline_seeds, args.cache_dir, [*args.extra, "--no-launcher"])
        )
    runs = [summarize(json.loads((d / "report.json").read_text()), d) for d in dirs]
    baseline = [summarize(json.loads((d / "report.json").read_text()), d, launcher=False) for d in baseline_dirs]
    results = {"runs": runs, "across_seeds": across(runs), "baseline_no_launcher": baseline}
    write_results("demo", results)
    update_readme_section("demo", table(results))
    print(table(results))


def run_demos(seeds: str, cache_dir: Path | None, extra: list[str]) -> list[Path]:
    """``fedge demo`` once per seed in ``seeds`` ("0,1,2"; "": none); the output directories."""
    dirs = []
    for seed in [int(s) for s in seeds.split(",") if s.strip()]:
        out = Path(tempfile.mkdtemp(prefix=f"fedge-demo-seed{seed}-"))
        cache = ["--cache-dir", str(cache_dir)] if cache_dir else []
        subprocess.run([sys.executable, "-m", "fedge", *cache, "demo", "--seed", str(seed), "--out", str(out), *extra],
                       check=True)  # fmt: skip
        dirs.append(out)
    return dirs


def summarize(report: dict, where: Path, launcher: bool | None = None) -> dict:
    """One run: settings, totals, cost to target and the per-round breakdown. ``launcher``: whether its ClientApp
    processes were forked by fedge's launcher (None: as its report says; reports from before it: yes)."""
    total_s = report["seconds"] + report.get("pull_seconds", 0.0)
    rounds_s = report["costs"][-1]["wall_s"] if report.get("costs") else 0.0
    hits = {}
    for target, hit in (report.get("to_target") or {}).items():
        hits[target] = (
            None if hit is None else {**hit, "minutes": round((total_s - (rounds_s - hit["wall_s"])) / 60, 2)}
        )
    breakdown, all_fixed = [], []
    fused, records = report["server"].get("eval_in_train", False), report["rounds"]

    def scored(record: dict) -> float:  # the median client's seconds scoring that record's adapter
        return statistics.median([c.get("eval_seconds") or 0 for c in record["clients"]] or [0])

    for prev, r in zip(records, records[1:]):
        trained = [c for c in r["clients"] if c.get("steps")]
        if not trained:
            continue
        fixed = [(c.get("startup_seconds") or 0) + (c.get("load_seconds") or 0) for c in trained]
        if r["round"] > 1:  # round 1's is the warm workers still loading the model: once, not per round
            all_fixed += fixed
        # scored during this round: with eval_in_train the previous adapter (in the train message); its own
        # adapter in an evaluate stage (every round without eval_in_train, else the last)
        scoring = (scored(prev) if fused else 0.0) + (scored(r) if not fused or r is records[-1] else 0.0)
        busiest = max((c.get("startup_seconds") or 0) + (c.get("round_seconds") or 0) for c in trained)
        breakdown.append({
            "round": r["round"], "exact_match": r["exact_match"], "seconds": r["seconds"],
            "train_s_max": round(max(c.get("train_seconds") or 0 for c in trained), 1),
            "eval_s_median": round(scoring, 1),
            "fixed_s_median": round(statistics.median(fixed), 2), "fixed_s_max": round(max(fixed), 2),
            # what the slowest client's own work does not explain: transport, polling, aggregation
            "rest_s": round(r["seconds"] - busiest - scoring, 1),
        })  # fmt: skip
    s = report["settings"]
    return {
        "dir": str(where), "seed": s.get("seed"), "rounds": len(report["rounds"]) - 1, "steps": s.get("steps"),
        "batch": s.get("batch"), "final_exact_match": report["final_exact_match"],
        "minutes": round(total_s / 60, 2), "pull_seconds": report.get("pull_seconds", 0.0), "to_target": hits,
        "fixed_s_median": round(statistics.median(all_fixed), 2) if all_fixed else None,
        "fixed_s_max": round(max(all_fixed), 2) if all_fixed else None,
        "round_s_median": round(statistics.median(b["seconds"] for b in breakdown), 1) if breakdown else None,
        "launcher": report.get("launcher", True) if launcher is None else launcher,
        "rounds_detail": breakdown,
    }  # fmt: skip


def across(runs: list[dict]) -> dict:
    def spread(values):
        values = [v for v in values if v is not None]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None

    return {
        "final_exact_match": spread([r["final_exact_match"] for r in runs]),
        "minutes": spread([r["minutes"] for r in runs]),
        "minutes_to_80": spread([(r["to_target"].get("80%") or {}).get("minutes") for r in runs]),
        "minutes_to_50": spread([(r["to_target"].get("50%") or {}).get("minutes") for r in runs]),
        "fixed_s_median": spread([r["fixed_s_median"] for r in runs]),
        "reached_80": sum(1 for r in runs if r["to_target"].get("80%")),
    }


def table(results: dict) -> str:
    runs, a = results["runs"], results["across_seeds"]
    first = runs[0]
    rows = [
        f"### `fedge demo` (defaults: {first['rounds']} rounds x {first['steps']} steps of {first['batch']}), "
        f"{len(runs)} seed{'s' * (len(runs) != 1)}, 2 cores",
        "",
        "| seed | exact match | minutes (pull included) | 50% at round (min) | 80% at round (min) | model pull s | "
        "fixed cost / client / round after round 1, median s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cells = []
        for target in ("50%", "80%"):
            hit = r["to_target"].get(target)
            cells.append("not reached" if hit is None else f"{hit['round']} ({hit['minutes']:.1f})")
        rows.append(
            f"| {r['seed']} | {100 * r['final_exact_match']:.1f}% | {r['minutes']:.1f} | {cells[0]} | {cells[1]} | "
            f"{r['pull_seconds']:.0f} | {r['fixed_s_median']} |"
        )
    em, mins = a["final_exact_match"], a["minutes"]
    rows += [
        f"| median (min-max) | {100 * em['median']:.1f}% ({100 * em['min']:.1f}-{100 * em['max']:.1f}) | "
        f"{mins['median']:.1f} ({mins['min']:.1f}-{mins['max']:.1f}) | | {a['reached_80']} of {len(runs)} "
        "reached | | |",
        "",
        f"Per round, seed {first['seed']} ({first['dir']}): seconds of the slowest client's training, the median "
        "client's scoring of the adapter it received and fixed cost (ClientApp start to handler + model ready), and "
        "the rest (the other pair's turn, Flower's transport and polling, the server's aggregation).",
        "",
        "| round | exact match | round s | training s (slowest) | scoring s (median) | fixed s (median / max) | "
        "rest s |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in first["rounds_detail"]:
        em_cell = "-" if b["exact_match"] is None else f"{100 * b['exact_match']:.1f}%"
        rows.append(
            f"| {b['round']} | {em_cell} | {b['seconds']:.0f} | {b['train_s_max']} | {b['eval_s_median']} | "
            f"{b['fixed_s_median']} / {b['fixed_s_max']} | {b['rest_s']} |"
        )
    if results.get("baseline_no_launcher"):
        rows += [
            "",
            "Fixed cost per client and round (after round 1) against the baseline: each message's ClientApp in a "
            "fresh `flwr-clientapp` process as Flower starts it (`--no-launcher`).",
            "",
            "| seed | ClientApp processes | fixed cost / client / round, median (max) s | round s, median | "
            "exact match | demo minutes (pull left out) |",
            "|---|---|---|---|---|---|",
        ]
        for r in [*runs, *results["baseline_no_launcher"]]:
            how = "forked by fedge's launcher" if r["launcher"] else "fresh `flwr-clientapp` (baseline)"
            rows.append(
                f"| {r['seed']} | {how} | {r['fixed_s_median']} ({r['fixed_s_max']}) | {r['round_s_median']} | "
                f"{100 * r['final_exact_match']:.1f}% | {r['minutes'] - r['pull_seconds'] / 60:.1f} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
