"""Heterogeneous devices: adaptive clients against one fixed configuration, under one round deadline.

Four emulated devices (``--devices``, default pi4-2gb, pi5-8gb, jetson-orin-nano, laptop; see
edge_client/device/emulated.py) hold one demo domain each. Each device is its own warm-worker process
(``fedge.edge_client.federation.worker``, as ``fedge client start`` runs it), so its memory cap is enforced on its own
RSS, and it trains with fedge's client code (``local_work.do_train``). Emulated slowness and link time run on the
device's virtual clock (``emulated-time = virtual``): they count against the deadline without being slept,
so the benchmark takes the host's compute time, not a Pi's. The server side is fedge's own: replies are
decoded and checked by ``fedge.server.hetero.from_reply`` and merged by ``fedge.server.hetero.aggregate`` (mixed ranks,
FedNova weighting, server lr 2).

Four federations, the same rounds and deadline:

- **fixed**: every device trains the round settings as sent (r=16 on all layers, 15 steps of 8 x 256) and
  sends its whole adapter as fp32; a device that runs out of memory or misses the deadline contributes
  nothing that round;
- **adaptive**: each device plans its round to the deadline and its memory (``fedge.edge_client.planning.plan``),
  re-plans from its measured steps, and sends its change with ``--codec`` (default ``auto:mix:0.9+int4:256``:
  the least lossy codec at or below that one, 0.124 of fp32, whose upload fits the deadline on its link), with
  error feedback;
- **adaptive_uncompressed**: the adaptive federation's plans replayed (each device, each round, pinned to the
  plan it ran, steps included: ``RoundSettings.plan``), changes sent as fp32. Only the codec differs, so
  the difference in the final metric is what compression costs.
- **uncapped**: the adaptive federation with no device emulated: each client plans for this host (24 GiB, its
  real speed, the same deadline and codec), so nothing holds a domain's device back. What each domain reaches
  here is the reference for its share (issue 28's target: each domain's adaptive exact match >= 50% of this).

The global adapter after the last round is scored on ``--eval-per-domain`` held-out examples of each domain.

    python benchmarks/heterogeneous.py [--rounds 6] [--deadline 120] [--eval-per-domain 50] [--seed 0]
    python benchmarks/heterogeneous.py --only adaptive,uncapped --seed 1 --out benchmarks/results/archive

Writes benchmarks/results/heterogeneous.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, add_out_argument, update_readme_section, write_results  # noqa: E402

DEVICES = "pi4-2gb,pi5-8gb,jetson-orin-nano,laptop"
FEDERATIONS = ("fixed", "adaptive", "adaptive_uncompressed", "uncapped")
# A domain's share of what it reaches uncapped: the target for every device's domain (issue 28).
TARGET_SHARE = 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--devices", default=DEVICES)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--deadline", type=float, default=120.0, help="seconds per round on every device")
    p.add_argument("--codec", default="auto:mix:0.9+int4:256", help="the adaptive clients' update codec")
    p.add_argument("--server-lr", type=float, default=2.0)
    p.add_argument("--eval-per-domain", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="the adapter's init and every client's data order")
    add_out_argument(p, "runs of some federations or another seed (a run of all four writes benchmarks/results/)")
    p.add_argument("--only", default=",".join(FEDERATIONS), help="federations to run (comma-separated)")
    p.add_argument("--work", type=Path, default=Path("/tmp/fedge-heterogeneous"))
    p.add_argument("--cache-dir", type=Path, default=None)
    args = p.parse_args()

    from fedge.common import wire
    from fedge.common.models import default_cache_dir, pull_model
    from fedge.edge_client.training.demo_data import DOMAINS

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    cache = args.cache_dir or default_cache_dir()
    pull_model(args.model, cache)
    fixed = wire.RoundSettings(
        model=args.model, steps=15, batch=8, seed=args.seed
    )  # the rounds this benchmark was measured on
    settings = {
        "fixed": fixed,
        "adaptive": dataclasses.replace(fixed, deadline_s=args.deadline, codec=args.codec),
        "adaptive_uncompressed": dataclasses.replace(fixed, deadline_s=args.deadline, codec="none"),
        "uncapped": dataclasses.replace(fixed, deadline_s=args.deadline, codec=args.codec),
    }
    scorer = Scorer(args.model, cache, DOMAINS[: len(devices)], args.eval_per_domain)
    results: dict = {}
    runs = [f for f in args.only.split(",") if f]
    if unknown := sorted(set(runs) - set(FEDERATIONS)):
        raise SystemExit(f"--only: unknown federation(s) {unknown}; expected some of {', '.join(FEDERATIONS)}")
    if "adaptive_uncompressed" in runs and "adaptive" not in runs:
        raise SystemExit("adaptive_uncompressed replays the adaptive federation's plans: run adaptive with it")
    pinned = None
    for name in sorted(runs, key=FEDERATIONS.index):
        t0 = time.monotonic()
        with Fleet(devices, DOMAINS, cache, args.work / name, args.model, emulate=name != "uncapped") as fleet:
            pins = pinned if name == "adaptive_uncompressed" else None
            results[name] = federate(fleet, settings[name], args.rounds, args.deadline, args.server_lr, name, pins)
        if name == "adaptive":
            pinned = results[name]["plans"]
        results[name].pop("plans")
        results[name].update(scorer.score(results[name].pop("global")))
        results[name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"{name}: {results[name]['exact_match']:.1%} exact match ({results[name]['seconds']:.0f} s)", flush=True)
    results["setup"] = {
        "model": args.model,
        "devices": devices,
        "domains": list(DOMAINS[: len(devices)]),
        "rounds": args.rounds,
        "deadline_s": args.deadline,
        "codec": args.codec,
        "server_lr": args.server_lr,
        "fixed_settings": fixed.to_config(),
        "eval_per_domain": args.eval_per_domain,
        "emulated_time": "virtual",
        "seed": args.seed,
    }
    if "adaptive" in results and "adaptive_uncompressed" in results:
        ref, got = results["adaptive_uncompressed"]["exact_match"], results["adaptive"]["exact_match"]
        results["compression_loss"] = {
            "points": round(100 * (ref - got), 2),  # exact match, percentage points
            "relative": round((ref - got) / ref, 4) if ref else None,  # the target: <= 0.02
        }
    if "uncapped" in results:
        results["domain_shares"] = _domain_shares(results)
    full = all(f in results for f in FEDERATIONS)
    path = write_results(
        "heterogeneous" if full else f"heterogeneous_seed{args.seed}", results, RESULTS if full else args.out
    )
    if full:
        update_readme_section("heterogeneous", _table(results))
    print(f"wrote {path}")


class Fleet:
    """One warm-worker process per emulated device, each with its own state directory, on loopback."""

    def __init__(self, devices: list[str], domains, cache: Path, work: Path, model: str, emulate: bool = True) -> None:
        from fedge.common.procs import free_port
        from fedge.edge_client.federation.settings import Device

        self.model = model
        self.devices = []
        for i, profile in enumerate(devices):
            state = work / f"{i}-{profile}"
            d = domains[i]
            self.devices.append(
                # fp32 unless a plan says otherwise: the one precision every device runs (no bf16 on a Pi)
                Device(
                    name=profile,
                    data=f"demo:{d}",
                    eval_data=f"demo:{d}:test",
                    state_dir=state,
                    cache_dir=cache,
                    precision="fp32",
                    worker_port=free_port(),
                    profile=profile if emulate else "",
                    emulated_time="virtual",
                )  # fmt: skip
            )
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Fleet:
        import os
        import shutil

        from fedge.common.procs import spawn, wait_for_port

        for dev in self.devices:
            shutil.rmtree(dev.state_dir, ignore_errors=True)
            dev.state_dir.mkdir(parents=True)
            cmd = [sys.executable, "-m", "fedge.edge_client.federation.worker", "--state", str(dev.state_dir)]
            cmd += ["--port", str(dev.worker_port), "--cache-dir", str(dev.cache_dir)]
            cmd += ["--model", self.model, "--precision", dev.precision]  # loaded up front, as the service does
            proc = spawn(cmd, dict(os.environ), dev.state_dir / "worker.log")
            self.procs.append(proc)
            wait_for_port("127.0.0.1", dev.worker_port, proc, dev.state_dir / "worker.log")
        return self

    def __exit__(self, *exc) -> None:
        from fedge.common.procs import stop

        for proc in self.procs:
            stop(proc)


def federate(
    fleet: Fleet, settings, rounds: int, deadline: float, server_lr: float, name: str, pinned: dict | None = None
) -> dict:
    """Run the rounds; every device trains in turn (one at a time: the host's cores are not the devices').

    ``pinned``: {(round, device index): plan JSON} to replay; the replay runs and merges exactly those (a device
    without one sits the round out). The result's ``plans`` holds the plans of the merged replies, in that form.
    """
    import dataclasses
    import json

    import numpy as np

    from fedge.common import wire
    from fedge.common.modeling import ModelHolder
    from fedge.edge_client.federation.worker import call
    from fedge.server import hetero

    global_arrays = ModelHolder(fleet.devices[0].cache_dir, "fp32").initial_adapter(
        settings.model, settings.lora(), settings.seed
    )
    per_round, plans = [], {}
    for rnd in range(1, rounds + 1):
        accepted, weights, steps, clients = [], [], [], []
        for i, dev in enumerate(fleet.devices):
            entry: dict = {"device": dev.name}
            if pinned is not None and (rnd, i) not in pinned:  # a replay: only what the adaptive run merged
                clients.append({**entry, "failure": "not replayed"})
                continue
            sent = dataclasses.replace(settings, plan=pinned[rnd, i]) if pinned is not None else settings
            try:
                done = call(dev, "train", sent.to_config(), global_arrays, rnd)
                if done is None:
                    raise RuntimeError(f"the worker of {dev.name} does not answer (see {dev.state_dir}/worker.log)")
                arrays, metrics = done
            except RuntimeError as err:
                entry["failure"] = "oom" if "EmulatedOutOfMemory" in str(err) else "error"
                entry["error"] = str(err).strip().splitlines()[-1][:300]
                clients.append(entry)
                print(f"  [{name} r{rnd}] {dev.name}: {entry['error']}", flush=True)
                continue
            update, _ = hetero.from_reply(arrays, global_arrays, settings.lora_alpha)
            entry |= {
                "round_seconds": round(metrics[wire.Metric.ROUND_SECONDS], 1),
                "steps": metrics[wire.Metric.STEPS],
                "bytes_up": int(sum(a.nbytes for a in arrays.values())),
                "bytes_up_fp32": int(sum(np.asarray(update[k], np.float32).nbytes for k in update)),
                "codec": metrics.get(wire.Client.CODEC, ""),
                "train_loss": metrics[wire.Metric.TRAIN_LOSS],
                "peak_rss_mb": metrics[wire.Metric.PEAK_RSS_MB],
            }
            if metrics.get(wire.Client.PLAN):
                plan = json.loads(metrics[wire.Client.PLAN])
                entry["plan"] = {k: plan[k] for k in ("precision", "lora_r", "top_layers", "seq_len", "micro_batch",
                                                      "grad_accum", "gradient_checkpointing", "steps")}  # fmt: skip
            entry["missed_deadline"] = entry["round_seconds"] > deadline
            clients.append(entry)
            print(f"  [{name} r{rnd}] {dev.name}: {_describe(entry)}", flush=True)
            if not entry["missed_deadline"] or pinned is not None:  # a replay merges what the original merged
                if metrics.get(wire.Client.PLAN):
                    plans[rnd, i] = metrics[wire.Client.PLAN]
                accepted.append(update)
                weights.append(float(metrics[wire.Metric.EXAMPLES]))
                steps.append(max(1, int(metrics[wire.Metric.STEPS])))
        if accepted:
            global_arrays = hetero.aggregate(
                global_arrays, accepted, weights, settings.lora_alpha, steps=steps, server_lr=server_lr
            )
        per_round.append({"round": rnd, "accepted": len(accepted), "clients": clients})
    replies = [c for r in per_round for c in r["clients"] if "bytes_up" in c]
    n = len(fleet.devices) * rounds
    return {
        "global": global_arrays,
        "deadline_misses": sum(1 for c in replies if c["missed_deadline"]),
        "oom_failures": sum(1 for r in per_round for c in r["clients"] if c.get("failure") == "oom"),
        "bytes_up_per_round": sum(c["bytes_up"] for c in replies) / n,  # per client per round, failures as 0
        "bytes_up_per_round_fp32": sum(c["bytes_up_fp32"] for c in replies) / n,
        "rounds": per_round,
        "plans": plans,
    }


def _domain_shares(results: dict) -> dict:
    """Each federation's exact match per domain as a share of the same domain's uncapped one, and whether every
    domain reaches TARGET_SHARE."""
    ref = {d: v["exact_match"] for d, v in results["uncapped"]["per_domain"].items()}
    shares = {}
    for name in FEDERATIONS[:-1]:
        if name in results:
            got = {d: results[name]["per_domain"][d]["exact_match"] for d in ref}
            per = {d: round(got[d] / ref[d], 3) if ref[d] else None for d in ref}
            shares[name] = {
                "per_domain": per,
                "target_met": all(v is not None and v >= TARGET_SHARE for v in per.values()),
            }
    return {"target": TARGET_SHARE, **shares}


def _describe(entry: dict) -> str:
    plan = entry.get("plan")
    shape = (
        f"{plan['precision']} r={plan['lora_r']} layers={plan['top_layers'] or 'all'} seq={plan['seq_len']} "
        f"{plan['micro_batch']}x{plan['grad_accum']} "
        if plan
        else ""
    )
    late = " MISSED" if entry["missed_deadline"] else ""
    return (
        f"{shape}{entry['steps']} steps, {entry['round_seconds']:.0f} s{late}, "
        f"{entry['bytes_up'] / 1e6:.2f} MB up ({entry['codec'] or 'fp32 adapter'}), loss {entry['train_loss']:.3f}"
    )


class Scorer:
    """Exact match and held-out loss of an adapter on each domain's held-out examples (the real model, bf16)."""

    def __init__(self, model: str, cache: Path, domains, per_domain: int) -> None:
        from fedge.common import wire
        from fedge.common.modeling import ModelHolder
        from fedge.edge_client.federation.local_work import open_adapter
        from fedge.edge_client.training.data import load_examples

        self.settings = wire.RoundSettings(model=model, steps=15, batch=8)
        self.session, self.model = open_adapter(ModelHolder(cache), self.settings)
        self.tests = {}
        for d in domains:
            examples = load_examples(f"demo:{d}:test")
            self.tests[d] = examples[:: max(1, len(examples) // per_domain)][:per_domain]

    def score(self, arrays: dict) -> dict:
        import numpy as np

        from fedge.common.modeling import set_adapter
        from fedge.edge_client.training.evaluate import evaluate
        from fedge.edge_client.training.session import eval_batches

        set_adapter(self.model, arrays)
        tok = self.session.tokenizer
        per = {}
        for d, ex in self.tests.items():
            r = evaluate(self.model, tok, eval_batches(tok, ex, 256), ex, self.session.device)
            per[d] = {"exact_match": r.exact_match, "heldout_loss": r.loss}
        return {
            "exact_match": float(np.mean([v["exact_match"] for v in per.values()])),
            "heldout_loss": float(np.mean([v["heldout_loss"] for v in per.values()])),
            "per_domain": per,
        }


def _table(r: dict) -> str:
    s = r["setup"]
    rows = [
        f"### Heterogeneous devices: {s['model']}, {', '.join(s['devices'])} (one demo domain each), "
        f"{s['rounds']} rounds, deadline {s['deadline_s']:g} s per round",
        "",
        f"Scored on {s['eval_per_domain']} held-out examples per domain. Emulated time is virtual: a device's "
        "slowdown and link time count against the deadline without being slept.",
        "",
        "| federation | exact match | held-out loss | deadline misses | out-of-memory | MB up per client-round | "
        "same as fp32 | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in FEDERATIONS:
        v = r[name]
        ratio = v["bytes_up_per_round"] / v["bytes_up_per_round_fp32"] if v["bytes_up_per_round_fp32"] else 0
        rows.append(
            f"| {name} | {v['exact_match']:.1%} | {v['heldout_loss']:.3f} | {v['deadline_misses']} | "
            f"{v['oom_failures']} | {v['bytes_up_per_round'] / 1e6:.2f} | {v['bytes_up_per_round_fp32'] / 1e6:.2f} | "
            f"{ratio:.3f} |"
        )
    loss = r.get("compression_loss")
    if loss:
        rows += [
            "",
            f"Compression ({s['codec']}) costs **{loss['points']:.1f} points** of exact match against the same plans "
            "sent uncompressed ("
            + (f"{loss['relative']:.1%}" if loss["relative"] is not None else "n/a")
            + " of the uncompressed result; target <= 2%).",
        ]
    if "domain_shares" in r:
        shares = r["domain_shares"]
        rows += ["", f"Per domain (exact match; the adaptive share of uncapped, target >= {shares['target']:.0%}):", ""]
        rows += ["| device | domain | fixed | adaptive | uncapped | adaptive / uncapped |", "|---" * 6 + "|"]
        for device, domain in zip(s["devices"], s["domains"], strict=True):
            share = shares["adaptive"]["per_domain"][domain]
            rows.append(
                f"| {device} | {domain} | {r['fixed']['per_domain'][domain]['exact_match']:.0%} | "
                f"{r['adaptive']['per_domain'][domain]['exact_match']:.0%} | "
                f"{r['uncapped']['per_domain'][domain]['exact_match']:.0%} | "
                + (f"{share:.0%}" if share is not None else "n/a")
                + " |"
            )
        rows += ["", f"Every domain at or above the target: **{'yes' if shares['adaptive']['target_met'] else 'no'}**."]
    rows += ["", "Plans in the last round of the adaptive federation:", ""]
    rows += ["| device | precision | rank | layers | seq | micro x accum | steps | seconds | codec |", "|---" * 9 + "|"]
    for c in r["adaptive"]["rounds"][-1]["clients"]:
        if "plan" in c:
            pl = c["plan"]
            rows.append(
                f"| {c['device']} | {pl['precision']} | {pl['lora_r']} | {pl['top_layers'] or 'all'} | {pl['seq_len']} "
                f"| {pl['micro_batch']} x {pl['grad_accum']} | {c['steps']} | {c['round_seconds']:.0f} | {c['codec']} |"
            )
        else:
            rows.append(f"| {c['device']} | failed: {c.get('error', '')} |" + " |" * 7)
    return "\n".join(rows)


if __name__ == "__main__":
    main()
