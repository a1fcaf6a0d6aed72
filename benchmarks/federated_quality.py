"""Federated quality: FedAvg against centralized LoRA and local-only training, same total training steps.

Four clients hold one built-in demo domain each (healthcare, finance, education, iot). With a budget of
T optimizer steps in total (batch 8, LoRA r=16 on every projection, the same learning rate everywhere):

- **centralized** (the upper baseline): one adapter, T steps on the union of the four domains;
- **federated**: R rounds of FedAvg; each round every client trains S = T / (4R) steps from the global
  adapter, and the server averages the four adapters weighted by examples. Client training and the
  average are fedge's own code (``edge_client.flower_client`` helpers, ``server.aggregate``); only the
  transport is skipped, which does not change a number here;
- **local-only** (the lower baseline): each client trains T / 4 steps on its own domain alone.

Every model is scored on the same held-out set: ``--eval-per-domain`` test examples of each domain (exact
match of greedy answers, and held-out loss). Local-only models are scored on all domains and averaged.

    python benchmarks/federated_quality.py [--total-steps 240] [--rounds 6] [--eval-per-domain 50]

Writes benchmarks/results/federated_quality.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--total-steps", type=int, default=240)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-per-domain", type=int, default=50)
    p.add_argument("--cache-dir", type=Path, default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    from edge_client import wire
    from edge_client.data import load_examples
    from edge_client.demo_data import DOMAINS
    from edge_client.evaluate import evaluate
    from edge_client.flower_client import Device, _get_adapter, _open, _set_adapter, _train_config
    from edge_client.models import default_cache_dir
    from edge_client.session import epoch_maker, eval_batches
    from edge_client.train import train
    from server.aggregate import weighted_average

    torch.set_num_threads(torch.get_num_threads())
    n_clients = len(DOMAINS)
    if args.total_steps % (n_clients * args.rounds):
        raise SystemExit(f"--total-steps must be a multiple of clients x rounds = {n_clients * args.rounds}")
    steps_per_round = args.total_steps // (n_clients * args.rounds)
    cache = args.cache_dir or default_cache_dir()
    settings = wire.RoundSettings(model=args.model, lr=args.lr, steps=steps_per_round)
    session, model = _open(Device("bench", "", None, Path("."), cache, "auto"), settings)
    train_sets = {d: load_examples(f"demo:{d}") for d in DOMAINS}
    test_sets = {d: _spread(load_examples(f"demo:{d}:test"), args.eval_per_domain) for d in DOMAINS}
    initial = _get_adapter(model)
    timings: dict[str, float] = {}

    def run_train(arrays, examples, steps: int, seed: int) -> tuple[dict, float]:
        _set_adapter(model, arrays)
        cfg = _train_config(wire.RoundSettings(model=args.model, lr=args.lr, steps=steps, seed=seed))
        cfg.checkpoint_every = 0
        result = train(model, epoch_maker(session.tokenizer, examples, cfg), cfg, session.device)
        return _get_adapter(model), result.final_loss

    def score(arrays, domains=DOMAINS) -> dict:
        _set_adapter(model, arrays)
        per = {}
        for d in domains:
            ex = test_sets[d]
            longest = max(len(session.tokenizer(e.answer)["input_ids"]) for e in ex)
            r = evaluate(
                model,
                session.tokenizer,
                eval_batches(session.tokenizer, ex, 256),
                ex,
                session.device,
                max_new_tokens=longest + 2,
            )
            per[d] = {"exact_match": r.exact_match, "heldout_loss": r.loss}
        return {
            "exact_match": float(np.mean([v["exact_match"] for v in per.values()])),
            "heldout_loss": float(np.mean([v["heldout_loss"] for v in per.values()])),
            "per_domain": per,
        }

    t0 = time.perf_counter()
    results = {"base": score(initial)}
    timings["base_eval"] = time.perf_counter() - t0
    print(f"base: {results['base']['exact_match']:.1%}", flush=True)

    t0 = time.perf_counter()
    union = [e for d in DOMAINS for e in train_sets[d]]
    central, loss = run_train(initial, union, args.total_steps, seed=0)
    results["centralized"] = {**score(central), "train_loss": loss}
    timings["centralized"] = time.perf_counter() - t0
    print(f"centralized: {results['centralized']['exact_match']:.1%}", flush=True)

    t0 = time.perf_counter()
    global_arrays, history = initial, []
    for rnd in range(1, args.rounds + 1):
        updates = [
            run_train(global_arrays, train_sets[d], steps_per_round, seed=rnd * 100 + i)[0]
            for i, d in enumerate(DOMAINS)
        ]
        global_arrays = weighted_average(updates, [len(train_sets[d]) for d in DOMAINS])
        history.append(rnd)
        print(f"federated round {rnd}/{args.rounds}", flush=True)
    results["federated"] = score(global_arrays)
    timings["federated"] = time.perf_counter() - t0
    print(f"federated: {results['federated']['exact_match']:.1%}", flush=True)

    t0 = time.perf_counter()
    locals_ = {}
    for i, d in enumerate(DOMAINS):
        arrays, loss = run_train(initial, train_sets[d], args.total_steps // n_clients, seed=i)
        locals_[d] = {**score(arrays), "train_loss": loss}
        print(f"local-only {d}: {locals_[d]['exact_match']:.1%}", flush=True)
    results["local_only_mean"] = {
        "exact_match": float(np.mean([v["exact_match"] for v in locals_.values()])),
        "heldout_loss": float(np.mean([v["heldout_loss"] for v in locals_.values()])),
        "per_client": locals_,
    }
    timings["local_only"] = time.perf_counter() - t0

    base_em = results["base"]["exact_match"]
    gain = results["centralized"]["exact_match"] - base_em
    results["federated_share_of_centralized_gain"] = (
        (results["federated"]["exact_match"] - base_em) / gain if gain else None
    )
    results["setup"] = {
        "model": args.model,
        "precision": session.precision,
        "total_steps": args.total_steps,
        "rounds": args.rounds,
        "clients": n_clients,
        "steps_per_client_round": steps_per_round,
        "batch": settings.batch,
        "lr": args.lr,
        "lora_r": settings.lora_r,
        "lora_targets": settings.lora_targets,
        "eval_per_domain": args.eval_per_domain,
        "threads": torch.get_num_threads(),
        "seconds": timings,
    }
    path = write_results("federated_quality", results)
    update_readme_section("federated_quality", _table(results))
    print(f"wrote {path}")


def _spread(examples: list, n: int) -> list:
    return examples[:: max(1, len(examples) // n)][:n]


def _table(r: dict) -> str:
    s = r["setup"]
    rows = [
        f"### Federated quality: {s['model']} ({s['precision']}), {s['clients']} clients (one demo domain each), "
        f"{s['total_steps']} steps in total, batch {s['batch']}, lr {s['lr']}, LoRA r={s['lora_r']}",
        "",
        f"Scored on {s['eval_per_domain']} held-out examples per domain ({4 * s['eval_per_domain']} in all). "
        f"FedAvg: {s['rounds']} rounds x {s['steps_per_client_round']} local steps per client.",
        "",
        "| model | exact match | held-out loss | " + " | ".join(r["base"]["per_domain"]) + " |",
        "|---|---|---|" + "---|" * len(r["base"]["per_domain"]),
    ]
    for key, label in (("base", "base model"), ("centralized", "centralized LoRA"), ("federated", "FedAvg (fedge)")):
        v = r[key]
        cells = " | ".join(f"{d['exact_match']:.0%}" for d in v["per_domain"].values())
        rows.append(f"| {label} | {v['exact_match']:.1%} | {v['heldout_loss']:.3f} | {cells} |")
    lo = r["local_only_mean"]
    rows.append(
        f"| local-only (mean of 4) | {lo['exact_match']:.1%} | {lo['heldout_loss']:.3f} | "
        + " | ".join(f"own: {c['per_domain'][d]['exact_match']:.0%}" for d, c in lo["per_client"].items())
        + " |"
    )
    share = r["federated_share_of_centralized_gain"]
    rows += [
        "",
        f"FedAvg reaches **{share:.0%}** of the centralized exact-match gain over the base model "
        f"(target >= 90%) and beats the mean local-only model by "
        f"**{100 * (r['federated']['exact_match'] - lo['exact_match']):.1f} points**.",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
