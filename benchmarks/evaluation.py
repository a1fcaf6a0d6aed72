"""Exact match of a round's evaluation: batched greedy generation (the baseline) against one teacher-forced pass with
generation only for the examples it leaves undecided (`fedge.edge_client.evaluate.teacher_forced_matches`).

The real model with an adapter (default: a ``fedge demo`` output's), each domain's held-out examples as a client
evaluates them (``--per-domain`` each), both paths in the same run on the same examples, fp32 on the CPU. Reports
the seconds of each (median of ``--reps``), the speed-up, and whether every example's verdict is the same.

    python benchmarks/evaluation.py --adapter /tmp/demo-run/adapter [--per-domain 50] [--reps 3]

Target (issue "The main job, fast"): evaluation time cut by >= 5x with identical exact match. Writes
benchmarks/results/evaluation.json and its table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", type=Path, default=Path("/tmp/demo-run/adapter"))
    p.add_argument("--per-domain", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=None)
    args = p.parse_args()
    import torch

    from fedge.common.models import default_cache_dir
    from fedge.edge_client import demo_data
    from fedge.edge_client.data import load_examples
    from fedge.edge_client.evaluate import (
        answer_token_limit,
        generate_answers,
        normalize_answer,
        teacher_forced_matches,
    )
    from fedge.edge_client.runtimes import TorchRuntime

    runtime = TorchRuntime.load(args.adapter, "fp32", args.cache_dir or default_cache_dir())
    model, tok, cpu = runtime.model, runtime.tokenizer, torch.device("cpu")
    rows = {}
    for domain in demo_data.DOMAINS:
        examples = load_examples(f"demo:{domain}:test")[: args.per_domain]
        limit = answer_token_limit(tok, examples)
        slow, fast = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            replies = generate_answers(model, tok, examples, cpu, max_new_tokens=limit)
            truth = [normalize_answer(r) == normalize_answer(ex.answer) for r, ex in zip(replies, examples)]
            slow.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            check = teacher_forced_matches(model, tok, examples, cpu, limit)
            rest = [examples[i] for i in check.undecided]
            more = iter(generate_answers(model, tok, rest, cpu, max_new_tokens=limit) if rest else [])
            verdicts = [v if v is not None else normalize_answer(next(more)) == normalize_answer(ex.answer)
                        for v, ex in zip(check.verdicts, examples)]  # fmt: skip
            fast.append(time.perf_counter() - t0)
        rows[domain] = {
            "examples": len(examples),
            "exact_match_generation": round(100 * sum(truth) / len(truth), 1),
            "exact_match_teacher_forced": round(100 * sum(verdicts) / len(verdicts), 1),
            "same_verdicts": sum(a == b for a, b in zip(truth, verdicts)),
            "undecided": len(check.undecided),
            "generation_s": round(statistics.median(slow), 2),
            "teacher_forced_s": round(statistics.median(fast), 2),
            "speedup": round(statistics.median(slow) / statistics.median(fast), 2),
        }
        print(domain, rows[domain], flush=True)
    total = {k: round(sum(r[k] for r in rows.values()), 2) for k in ("generation_s", "teacher_forced_s")}
    total["speedup"] = round(total["generation_s"] / total["teacher_forced_s"], 2)
    results = {"domains": rows, "total": total,
               "setup": {"adapter": str(args.adapter), "per_domain": args.per_domain, "reps": args.reps,
                         "threads": torch.get_num_threads(), "cores": os.cpu_count()}}  # fmt: skip
    write_results("evaluation", results)
    update_readme_section("evaluation", _table(results))


def _table(r: dict) -> str:
    s = r["setup"]
    rows = [
        f"### Round evaluation: generation against the teacher-forced check ({s['cores']} cores)",
        "",
        f"The demo's adapter on SmolLM2-135M, fp32, {s['per_domain']} held-out examples per domain, median of "
        f"{s['reps']}. Baseline: batched greedy generation of every reply.",
        "",
        "| domain | exact match, generation % | teacher-forced % | same verdicts | left to generation | generation s | "
        "teacher-forced s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["domains"].items():
        rows.append(
            f"| {name} | {v['exact_match_generation']} | {v['exact_match_teacher_forced']} | "
            f"{v['same_verdicts']}/{v['examples']} | {v['undecided']} | {v['generation_s']} | "
            f"{v['teacher_forced_s']} | {v['speedup']}x |"
        )
    t = r["total"]
    rows.append(f"| all | | | | | {t['generation_s']} | {t['teacher_forced_s']} | {t['speedup']}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
