"""Federated quality: FedAvg against centralized LoRA and local-only training, same total training steps.

Four clients hold one built-in demo domain each (healthcare, finance, education, iot). With a budget of
T optimizer steps in total (fedge's batch of 2, LoRA r=16 on every projection, the same learning rate everywhere):

- **centralized** (the upper baseline): one adapter, T steps on the union of the four domains;
- **federated**: R rounds of FedAvg; each round every client trains S = T / (4R) steps from the global
  adapter, and the server averages the four adapters weighted by examples. Client training and the
  average are fedge's own code (``fedge.edge_client.federation.clientapp`` helpers, ``fedge.server.aggregate``); only
  the transport is skipped, which does not change a number here;
- **local-only** (the lower baseline): each client trains T / 4 steps on its own domain alone.

Every model is scored on the same held-out set: ``--eval-per-domain`` test examples of each domain (exact
match of greedy answers, and held-out loss). Local-only models are scored on all domains and averaged.

    python benchmarks/federated_quality.py [--total-steps 960] [--rounds 6] [--eval-per-domain 50] [--score-rounds]

Writes benchmarks/results/federated_quality.json and the table in benchmarks/README.md. Exploration runs
(``--federated-only``, ``--centralized-only``, ``--local-only``, each with ``--tag``; or a whole run with
``--tag``) write ``federated_quality{TAG}.json`` to ``--out`` (default: a folder in the system's temp dir; never
benchmarks/results/, which holds the current file only: the runs kept are in benchmarks/results/archive/, one line
each in its README.md) and leave the table alone: client lr and batch, server lr and optimizer (``--server-opt``),
the merge rule (``--merge ties:KEEP``), clients that keep their AdamW moments, iterate averaging
(``--tail-averages``) and ``--seed`` for the spread. Session 21-22 runs used batch 4 and 480 steps (``--batch 4
--total-steps 480``), runs before session 21 batch 8 and 240 steps (``--batch 8 --total-steps 240``): 1,920
examples in every case; ``--batch 8 --federated-only --total-steps 960 --rounds 24`` (and ``--local-only``) was the
step-equal reading then: each client trained as many steps as the 240-step centralized run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, add_out_argument, update_readme_section, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--total-steps", type=int, default=960, help="optimizer steps in all (960 of 2: 1,920 examples)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0, help="seeds the adapter's init and every data order")
    p.add_argument("--batch", type=int, default=2, help="examples per optimizer step, for every model (fedge's: 2)")
    p.add_argument("--eval-per-domain", type=int, default=50)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--server-lrs", default="2", help="FedAvg variants to run: server learning rates (e.g. 1,2,4)")
    p.add_argument("--server-lr", type=float, default=2.0, help="the variant reported as 'federated' (fedge's default)")
    p.add_argument(
        "--reuse-baselines",
        action="store_true",
        help="take base, centralized and local-only from the last results file if its setup matches",
    )
    p.add_argument("--server-opt", default="sgd", choices=["sgd", "momentum", "adam"], help="FedOpt server optimizer")
    p.add_argument("--server-tau", type=float, default=1e-3, help="FedAdam's adaptivity floor")
    p.add_argument(
        "--merge",
        default="mean",
        help="how the server merges the clients' changes: 'mean' (FedAvg) or 'ties[:KEEP]' (sign election, "
        "each client's change trimmed to its KEEP fraction of largest entries; default 1)",
    )
    p.add_argument(
        "--keep-client-optimizer",
        action="store_true",
        help="each client keeps its AdamW moments across rounds (default: a fresh optimizer every round)",
    )
    p.add_argument(
        "--tail-averages",
        default="",
        help="also score the mean of the last K global adapters for each K listed (e.g. 2,3): iterate averaging",
    )
    p.add_argument("--train-a", action="store_true", help="train LoRA A too (default: A frozen, FFA-LoRA)")
    p.add_argument(
        "--score-rounds",
        action="store_true",
        help="score the global adapter after every round too (the curve, and the rounds, examples and client "
        "seconds to reach 50%% and 80%% exact match)",
    )
    only = p.add_mutually_exclusive_group()  # exploration runs: each needs --tag, the full run owns the table
    only.add_argument("--federated-only", action="store_true", help="skip the baselines (for trying FedAvg settings)")
    only.add_argument("--centralized-only", action="store_true", help="only the centralized baseline (e.g. other lr)")
    only.add_argument(
        "--local-only", action="store_true", help="only the local-only baseline (each client --total-steps / 4 steps)"
    )
    p.add_argument(
        "--round-lr-min",
        type=float,
        default=None,
        help="client lr follows a cosine over rounds from --lr down to this (FlowerTune-style); default: constant",
    )
    p.add_argument(
        "--server-lr-min",
        type=float,
        default=None,
        help="the server lr follows a cosine over rounds from its --server-lrs value down to this; default: constant",
    )
    p.add_argument("--tag", default="", help="results file suffix of an exploration run (written to --out, no table)")
    add_out_argument(p, "tagged runs' federated_quality{TAG}.json")
    args = p.parse_args()
    if (args.federated_only or args.centralized_only or args.local_only) and not args.tag:
        raise SystemExit("--federated-only, --centralized-only and --local-only need a --tag (their own results file)")
    merge_keep = _merge_keep(args.merge)
    try:
        tail_averages = [int(k) for k in args.tail_averages.split(",") if k.strip()]
    except ValueError:
        raise SystemExit(f"--tail-averages must be integers separated by commas, got {args.tail_averages!r}") from None
    if any(not 2 <= k <= args.rounds for k in tail_averages):
        raise SystemExit(f"--tail-averages must each be in 2..--rounds ({args.rounds}), got {args.tail_averages!r}")
    if args.round_lr_min is not None and not 0 < args.round_lr_min <= args.lr:
        raise SystemExit(f"--round-lr-min must be in (0, --lr], got {args.round_lr_min}")
    if args.server_lr_min is not None and not args.server_lr_min > 0:
        raise SystemExit(f"--server-lr-min must be > 0, got {args.server_lr_min}")

    import numpy as np
    import torch

    from benchmarks.aggregators import server_optimizer_step, sign_merge, weighted_average
    from fedge.common import wire
    from fedge.common.modeling import ModelHolder, get_adapter, set_adapter
    from fedge.common.models import default_cache_dir
    from fedge.edge_client.federation.local_work import open_adapter, train_config
    from fedge.edge_client.training.data import load_examples
    from fedge.edge_client.training.demo_data import DOMAINS
    from fedge.edge_client.training.evaluate import evaluate
    from fedge.edge_client.training.session import epoch_maker, eval_batches
    from fedge.edge_client.training.train import train
    from fedge.server.report import cost_to_target

    torch.set_num_threads(torch.get_num_threads())
    n_clients = len(DOMAINS)
    if args.total_steps % (n_clients * args.rounds) and not (args.centralized_only or args.local_only):
        raise SystemExit(f"--total-steps must be a multiple of clients x rounds = {n_clients * args.rounds}")
    steps_per_round = args.total_steps // (n_clients * args.rounds)
    cache = args.cache_dir or default_cache_dir()
    settings = wire.RoundSettings(
        model=args.model,
        lr=args.lr,
        steps=max(1, steps_per_round),
        batch=args.batch,
        lora_freeze_a=not args.train_a,
        seed=args.seed,
    )
    session, model = open_adapter(ModelHolder(cache), settings)
    train_sets = {d: load_examples(f"demo:{d}") for d in DOMAINS}
    test_sets = {d: _spread(load_examples(f"demo:{d}:test"), args.eval_per_domain) for d in DOMAINS}
    initial = get_adapter(model)
    timings: dict[str, float] = {}

    def run_train(
        arrays, examples, steps: int, seed: int, lr: float | None = None, optimizer_state: dict | None = None
    ) -> tuple[dict, float]:
        set_adapter(model, arrays)
        cfg = train_config(dataclasses.replace(settings, lr=args.lr if lr is None else lr, steps=steps), seed)
        cfg.checkpoint_every = 0
        make_epoch = epoch_maker(session.tokenizer, examples, cfg)
        result = train(model, make_epoch, cfg, session.device, optimizer_state=optimizer_state)
        return get_adapter(model), result.final_loss

    def score(arrays, domains=DOMAINS) -> dict:
        set_adapter(model, arrays)
        per = {}
        for d in domains:
            ex = test_sets[d]
            r = evaluate(model, session.tokenizer, eval_batches(session.tokenizer, ex, 256), ex, session.device)
            per[d] = {"exact_match": r.exact_match, "heldout_loss": r.loss}
        return {
            "exact_match": float(np.mean([v["exact_match"] for v in per.values()])),
            "heldout_loss": float(np.mean([v["heldout_loss"] for v in per.values()])),
            "per_domain": per,
        }

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {out['exact_match']:.1%} exact match ({timings[name]:.0f} s)", flush=True)
        return out

    def centralized() -> dict:
        union = [e for d in DOMAINS for e in train_sets[d]]
        arrays, loss = run_train(initial, union, args.total_steps, seed=0)
        return {**score(arrays), "train_loss": loss}

    def federated(server_lr: float) -> dict:
        global_arrays, moments, history, curve, client_s = initial, {}, [], [], 0.0
        client_optimizers: dict[str, dict | None] = {d: {} if args.keep_client_optimizer else None for d in DOMAINS}
        for rnd in range(1, args.rounds + 1):
            lr = round_lr(args.lr, args.round_lr_min, rnd, args.rounds)
            t0 = time.perf_counter()
            updates = [
                run_train(global_arrays, train_sets[d], steps_per_round, rnd * 100 + i, lr, client_optimizers[d])[0]
                for i, d in enumerate(DOMAINS)
            ]
            client_s += time.perf_counter() - t0
            weights = [len(train_sets[d]) for d in DOMAINS]
            if merge_keep is None:
                average = weighted_average(updates, weights)
            else:
                average = sign_merge(global_arrays, updates, weights, merge_keep)
            step = round_lr(server_lr, args.server_lr_min, rnd, args.rounds)
            global_arrays, moments = server_optimizer_step(
                global_arrays, average, args.server_opt, step, moments, tau=args.server_tau
            )
            history.append(global_arrays)
            if args.score_rounds and rnd < args.rounds:
                curve.append(
                    _curve_point(rnd, score(global_arrays), client_s, rnd * n_clients * steps_per_round, args.batch)
                )
        tails = {f"last_{k}": score(weighted_average(history[-k:], [1] * len(history[-k:]))) for k in tail_averages}
        for name, t in tails.items():
            print(f"  mean of the {name.replace('_', ' ')} global adapters: {t['exact_match']:.1%}", flush=True)
        final = score(global_arrays)
        extra = {"tail_averages": tails} if tails else {}
        if args.score_rounds:
            curve.append(
                _curve_point(args.rounds, final, client_s, args.rounds * n_clients * steps_per_round, args.batch)
            )
            extra |= {"curve": curve, "to_target": cost_to_target(curve)}
            for target, hit in extra["to_target"].items():
                print(f"  {target}: {hit or 'not reached'}", flush=True)
        return {**final, **extra}

    def local_only() -> dict:
        per_client = {}
        for i, d in enumerate(DOMAINS):
            arrays, loss = run_train(initial, train_sets[d], args.total_steps // n_clients, seed=i)
            per_client[d] = {**score(arrays), "train_loss": loss}
        return {
            "exact_match": float(np.mean([v["exact_match"] for v in per_client.values()])),
            "heldout_loss": float(np.mean([v["heldout_loss"] for v in per_client.values()])),
            "per_client": per_client,
        }

    setup = {
        "model": args.model,
        "precision": session.precision,
        "total_steps": args.total_steps,
        "rounds": args.rounds,
        "clients": n_clients,
        "steps_per_client_round": steps_per_round,
        "batch": settings.batch,
        "seed": args.seed,
        "lr": args.lr,
        "lora_r": settings.lora_r,
        "lora_targets": settings.lora_targets,
        "lora_freeze_a": settings.lora_freeze_a,
        "server_opt": args.server_opt,
        "round_lr_min": args.round_lr_min,
        "server_lr_min": args.server_lr_min,
        "merge": args.merge,
        "keep_client_optimizer": args.keep_client_optimizer,
        "eval_per_domain": args.eval_per_domain,
        "tail_averages": tail_averages,
    }
    server_lrs = [float(x) for x in args.server_lrs.split(",")]
    if args.server_lr not in server_lrs:
        raise SystemExit(f"--server-lr {args.server_lr} must be one of --server-lrs {server_lrs}")
    name, folder = f"federated_quality{args.tag}", args.out if args.tag else RESULTS
    if args.centralized_only or args.local_only:
        part = ("centralized", centralized) if args.centralized_only else ("local_only_mean", local_only)
        print(f"wrote {write_results(name, {part[0]: timed(*part), 'setup': setup}, folder)}")
        return
    results = _reusable(setup, folder / f"{name}.json") if args.reuse_baselines else {}
    if "base" not in results and not args.federated_only:  # the base model generates to the limit: slow
        results["base"] = timed("base", lambda: score(initial))
    variants = results.setdefault("federated_variants", {})
    for slr in server_lrs:
        if f"server_lr={slr:g}" in variants:
            continue  # reused: same setup, same seeds, same numbers
        variants[f"server_lr={slr:g}"] = {
            **timed(f"federated server_lr={slr:g}", lambda slr=slr: federated(slr)),
            "server_lr": slr,
        }
    results["federated"] = variants[f"server_lr={args.server_lr:g}"]
    if args.federated_only:
        print(f"wrote {write_results(name, {**results, 'setup': setup}, folder)}")
        return
    if "centralized" not in results:
        results["centralized"] = timed("centralized", centralized)
    if "local_only_mean" not in results:
        results["local_only_mean"] = timed("local_only_mean", local_only)

    base_em = results["base"]["exact_match"]
    gain = results["centralized"]["exact_match"] - base_em
    results["federated_share_of_centralized_gain"] = (
        (results["federated"]["exact_match"] - base_em) / gain if gain else None
    )
    results["setup"] = {**setup, "threads": torch.get_num_threads(), "seconds": timings}
    path = write_results(name, results, folder)
    if args.tag:  # an exploration run: the table is the current file's
        print(_table(results))
    else:
        update_readme_section("federated_quality", _table(results))
    print(f"wrote {path}")


def _curve_point(rnd: int, scored: dict, client_s: float, steps: int, batch: int) -> dict:
    """A round's global adapter: its score, and the client steps, examples and training seconds spent to reach it
    (all clients, one after another on this machine)."""
    print(f"  round {rnd}: {scored['exact_match']:.1%} exact match", flush=True)
    return {"round": rnd, "exact_match": scored["exact_match"], "heldout_loss": scored["heldout_loss"],
            "client_steps": steps, "examples": steps * batch, "client_seconds": round(client_s, 1)}  # fmt: skip


def round_lr(peak: float, floor: float | None, rnd: int, rounds: int) -> float:
    """The client learning rate for round ``rnd`` of ``rounds``: ``peak``, or a cosine from ``peak`` to ``floor``."""
    if floor is None or rounds < 2:
        return peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (rnd - 1) / (rounds - 1)))


def _merge_keep(merge: str) -> float | None:
    """None for 'mean'; the kept fraction for 'ties[:KEEP]'. SystemExit naming --merge otherwise."""
    if merge == "mean":
        return None
    kind, _, keep = merge.partition(":")
    try:
        value = float(keep) if keep else 1.0
    except ValueError:
        value = -1.0
    if kind != "ties" or not 0 < value <= 1:
        raise SystemExit(f"--merge must be 'mean' or 'ties[:KEEP]' with KEEP in (0, 1], got {merge!r}")
    return value


def _reusable(setup: dict, path: Path) -> dict:
    """Baselines (base, centralized, local-only) of an earlier run with the same setup; {} if there is none."""
    import json

    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if {k: old.get("setup", {}).get(k) for k in setup} != setup:
        print(f"{path}: different setup, baselines are recomputed", flush=True)
        return {}
    print(f"reusing base, centralized and local-only from {path}", flush=True)
    return {k: old[k] for k in ("base", "centralized", "local_only_mean", "federated_variants") if k in old}


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
    labelled = [(r["base"], "base model"), (r["centralized"], "centralized LoRA")]
    for v in r["federated_variants"].values():
        default = " (fedge's default)" if v["server_lr"] == r["federated"]["server_lr"] else ""
        labelled.append((v, f"FedAvg, server lr {v['server_lr']:g}{default}"))
    for v, label in labelled:
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
        f"FedAvg at fedge's default server lr ({r['federated']['server_lr']:g}) reaches **{share:.0%}** of the "
        "centralized exact-match gain over the base model "
        f"(target >= 90%) and beats the mean local-only model by "
        f"**{100 * (r['federated']['exact_match'] - lo['exact_match']):.1f} points**.",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
