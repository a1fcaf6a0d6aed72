"""A round's evaluation: the held-out loss pass and batched greedy generation (the baseline) against fedge's one
teacher-forced pass that measures the loss and decides exact match together, generating only the replies it leaves
undecided (`fedge.edge_client.training.evaluate.evaluate` with no loss batches, as every client's round runs it).

The real model with an adapter (default: a ``fedge demo`` output's), each domain's held-out examples as a client
evaluates them (``--per-domain`` each), both paths in the same run on the same examples, at the precision a client
trains and scores in (``--precision``, default bf16). Reports the seconds of each (median of ``--reps``), the
speed-up, whether every example's verdict is the same, and both held-out losses.

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

SEQ_LEN = 256  # the round's row limit (RoundSettings.seq_len)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", type=Path, default=Path("/tmp/demo-run/adapter"))
    p.add_argument("--per-domain", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = p.parse_args()
    import torch

    from fedge.common.models import default_cache_dir
    from fedge.edge_client.export.runtimes import TorchRuntime
    from fedge.edge_client.training import demo_data
    from fedge.edge_client.training.data import load_examples
    from fedge.edge_client.training.evaluate import answer_token_limit, evaluate, generate_answers, heldout_loss
    from fedge.edge_client.training.evaluate import normalize_answer as norm
    from fedge.edge_client.training.session import eval_batches

    runtime = TorchRuntime.load(args.adapter, args.precision, args.cache_dir or default_cache_dir())
    model, tok, cpu = runtime.model, runtime.tokenizer, torch.device("cpu")
    rows = {}
    for domain in demo_data.DOMAINS:
        examples = load_examples(f"demo:{domain}:test")[: args.per_domain]
        limit = answer_token_limit(tok, examples)
        slow, fast = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            loss, _ = heldout_loss(model, eval_batches(tok, examples, SEQ_LEN), cpu)
            replies = generate_answers(model, tok, examples, cpu, max_new_tokens=limit)
            truth = [norm(r) == norm(ex.answer) for r, ex in zip(replies, examples)]
            slow.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = evaluate(model, tok, None, examples, cpu, max_new_tokens=limit, seq_len=SEQ_LEN)
            fast.append(time.perf_counter() - t0)
        rows[domain] = {
            "examples": len(examples),
            "exact_match_generation": round(100 * sum(truth) / len(truth), 1),
            "exact_match_teacher_forced": round(100 * result.exact_match, 1),
            "same_verdicts": sum(a == b for a, b in zip(truth, result.hits)),
            "undecided": result.n_decoded,
            "loss_own_pass": round(loss, 5),
            "loss_shared_pass": round(result.loss, 5),
            "generation_s": round(statistics.median(slow), 2),
            "teacher_forced_s": round(statistics.median(fast), 2),
            "speedup": round(statistics.median(slow) / statistics.median(fast), 2),
        }
        print(domain, rows[domain], flush=True)
    total = {k: round(sum(r[k] for r in rows.values()), 2) for k in ("generation_s", "teacher_forced_s")}
    total["speedup"] = round(total["generation_s"] / total["teacher_forced_s"], 2)
    results = {"domains": rows, "total": total,
               "setup": {"adapter": str(args.adapter), "per_domain": args.per_domain, "reps": args.reps,
                         "precision": args.precision,
                         "threads": torch.get_num_threads(), "cores": os.cpu_count()}}  # fmt: skip
    write_results("evaluation", results)
    update_readme_section("evaluation", _table(results))


def _table(r: dict) -> str:
    s = r["setup"]
    rows = [
        f"### Round evaluation: loss pass and generation against one shared teacher-forced pass ({s['cores']} cores)",
        "",
        f"The demo's adapter on SmolLM2-135M, {s.get('precision', 'fp32')}, {s['per_domain']} held-out examples per "
        f"domain, median of {s['reps']}. Baseline: the held-out loss pass, then batched greedy generation of every "
        "reply.",
        "",
        "| domain | exact match, generation % | teacher-forced % | same verdicts | left to generation | "
        "loss, own pass | loss, shared pass | baseline s | fedge s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["domains"].items():
        rows.append(
            f"| {name} | {v['exact_match_generation']} | {v['exact_match_teacher_forced']} | "
            f"{v['same_verdicts']}/{v['examples']} | {v['undecided']} | {v.get('loss_own_pass', '')} | "
            f"{v.get('loss_shared_pass', '')} | {v['generation_s']} | {v['teacher_forced_s']} | {v['speedup']}x |"
        )
    t = r["total"]
    rows.append(f"| all | | | | | | | {t['generation_s']} | {t['teacher_forced_s']} | {t['speedup']}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
