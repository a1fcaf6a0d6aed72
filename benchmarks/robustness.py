"""Robustness: what each aggregation rule costs with honest clients only, and what it holds against a poisoner.

Five clients on the built-in demo domains (healthcare, finance, education, iot, and a second healthcare client that
is the attacker when there is one) train LoRA on the real model; their replies go through the server's real path,
`fedge.server.strategy.FedgeAvg._check_and_average` (every check, the share cap, clipping, the merge rule), without
the transport. Rules (ServerSettings variants; the baseline first):

- ``fedavg-undefended``: FedAvg with every server-side defence off (no norm checks, no share cap, any example count);
- ``fedge-default``: fedge's defaults (mean, norm checks, share cap 0.5, examples growth 2x);
- ``clip-3x``: the defaults plus norm clipping at 3x the others' median;
- ``trimmed-mean``, ``median``: coordinate-wise, with the default checks;
- ``krum``: Multi-Krum (f = 1), with the default checks.

Scenarios: ``honest`` (the fifth client trains honestly), ``sign-flip`` (it sends -4x its change), ``scaled``
(+8x its change: under the 10x norm bar), ``lying-metrics`` (its change flipped, claiming 10^6 examples and 1 step).
Every run is scored on the same held-out examples of the four domains at its last round (exact match of greedy
answers, held-out loss). Round 1 starts from the same adapter in every run, so identical client trainings (same
start, same data, same seed) are computed once.

It also times the server's validation of one reply (ms per MB of update) for the whole fp32 adapter and for an
int8-encoded change.

    python benchmarks/robustness.py [--rounds 3] [--steps 6] [--eval-per-domain 20] [--seed 0]
    python benchmarks/robustness.py --validation-only   # re-time the validation on a quiet machine

Writes benchmarks/results/robustness.json and the table in benchmarks/README.md; a run with ``--tag`` writes
``robustness{TAG}.json`` to ``--out`` instead (a folder in the system's temp dir unless told; benchmarks/results/
holds the current file only) and leaves the table alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, add_out_argument, update_readme_section, write_results  # noqa: E402

UNDEFENDED = dict(max_share=1.0, norm_factor=1e12, max_change_rms=1e12, examples_growth=1e12, norm_floor=0.0)
RULES = {
    "fedavg-undefended": UNDEFENDED,
    "fedge-default": {},
    "clip-3x": dict(clip_factor=3.0),
    "trimmed-mean": dict(aggregation="trimmed-mean"),
    "median": dict(aggregation="median"),
    "krum": dict(aggregation="krum", krum_f=1),
}
# scenario -> (multiplier of the attacker's own change, examples it claims (None: its own), steps it claims)
SCENARIOS = {
    "honest": (1.0, None, None),
    "sign-flip": (-4.0, None, None),
    "scaled": (8.0, None, None),
    "lying-metrics": (-1.0, 1_000_000, 1),
}
CLIENTS = ["healthcare", "finance", "education", "iot", "healthcare"]  # the last one is the attacker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="local steps per client per round")
    p.add_argument("--eval-per-domain", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of the rules")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of the scenarios")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument(
        "--validation-only", action="store_true", help="re-measure the validation cost into the existing results"
    )
    p.add_argument("--tag", default="", help="suffix of the results file; a tagged run writes to --out, no table")
    add_out_argument(p, "tagged runs' robustness{TAG}.json")
    args = p.parse_args()
    rules, scenarios = args.rules.split(","), args.scenarios.split(",")
    if not set(rules) <= set(RULES) or not set(scenarios) <= set(SCENARIOS):
        raise SystemExit(f"--rules from {', '.join(RULES)}; --scenarios from {', '.join(SCENARIOS)}")
    if args.rounds < 1 or args.steps < 1 or args.eval_per_domain < 1:
        raise SystemExit("--rounds, --steps and --eval-per-domain must be >= 1")

    folder = args.out if args.tag else RESULTS
    bench = Bench(args)
    validation = bench.validation_cost()
    print(f"validation: {validation}", flush=True)
    if args.validation_only:
        results = json.loads((folder / f"robustness{args.tag}.json").read_text())
        results["validation"] = validation
        write_results(f"robustness{args.tag}", results, folder)
        if not args.tag:
            update_readme_section("robustness", _table(results))
        return
    results = {"validation": validation, "runs": {}, "setup": bench.setup()}
    partial = folder / f"robustness{args.tag}.partial.json"
    if partial.is_file():  # an interrupted run with the same setup: keep its finished runs
        earlier = json.loads(partial.read_text())
        if earlier.get("setup") == results["setup"]:
            results["runs"] = earlier["runs"]
            print(f"{partial}: reusing {sum(map(len, results['runs'].values()))} finished runs", flush=True)
    for scenario in scenarios:
        for rule in rules:
            if rule in results["runs"].get(scenario, {}):
                continue
            t0 = time.perf_counter()
            run = bench.federate(rule, scenario)
            run["seconds"] = round(time.perf_counter() - t0, 1)
            results["runs"].setdefault(scenario, {})[rule] = run
            took = f"attacker accepted {run['attacker_accepted']}/{args.rounds}  ({run['seconds']:.0f} s)"
            score = f"{run['exact_match']:6.1%}  loss {run['heldout_loss']:.3f}"
            print(f"{scenario:14} {rule:18} {score}  {took}", flush=True)
            write_results(partial.stem, results, folder)
    path = write_results(f"robustness{args.tag}", results, folder)
    partial.unlink(missing_ok=True)
    if not args.tag:
        update_readme_section("robustness", _table(results))
    print(f"wrote {path}")


class Bench:
    """The model, the clients' data and a cache of client trainings keyed by (client, round, global adapter)."""

    def __init__(self, args) -> None:
        import torch

        from fedge.common import wire
        from fedge.common.modeling import ModelHolder, get_adapter
        from fedge.common.models import default_cache_dir
        from fedge.edge_client.federation.local_work import open_adapter
        from fedge.edge_client.training.data import load_examples

        torch.set_num_threads(torch.get_num_threads())
        self.args = args
        self.settings = wire.RoundSettings(model=args.model, steps=args.steps, seed=args.seed, batch=8)
        self.session, self.model = open_adapter(ModelHolder(args.cache_dir or default_cache_dir()), self.settings)
        self.initial = get_adapter(self.model)
        domains = sorted(set(CLIENTS))
        train = {d: load_examples(f"demo:{d}") for d in domains}
        self.data = [train[d] for d in CLIENTS]
        self.data[-1] = train[CLIENTS[-1]][::-1]  # the fifth client: same domain, its own order
        tests = {d: load_examples(f"demo:{d}:test") for d in domains}
        n = args.eval_per_domain
        self.tests = {d: ex[:: max(1, len(ex) // n)][:n] for d, ex in tests.items()}
        self.trained: dict[tuple, dict] = {}
        self.scores: dict[str, dict] = {}  # global adapter digest -> its score (runs that end alike score once)

    def federate(self, rule: str, scenario: str) -> dict:
        from fedge.server.settings import ServerSettings
        from fedge.server.state import ServerState
        from fedge.server.strategy import FedgeAvg

        strategy = FedgeAvg(ServerSettings(min_clients=1, **RULES[rule]), stage_deadline_s=1.0)
        state = ServerState({}, arrays=dict(self.initial))
        scale, examples, steps = SCENARIOS[scenario]
        accepted = 0
        for rnd in range(1, self.args.rounds + 1):
            replies = []
            for i in range(len(CLIENTS)):
                arrays = self.train(i, rnd, state.arrays)
                claims = (len(self.data[i]), self.args.steps)
                if i == len(CLIENTS) - 1 and scenario != "honest":
                    arrays = _scaled(state.arrays, arrays, scale)
                    claims = (examples or claims[0], steps or claims[1])
                replies.append(_reply(i, arrays, *claims))
            clients = strategy._check_and_average(state, replies, 0, self.settings)
            accepted += bool(clients[-1].accepted)
        return {**self.score(state.arrays), "attacker_accepted": accepted}

    def train(self, i: int, rnd: int, global_arrays: dict) -> dict:
        """Client i's adapter after its local round from ``global_arrays`` (cached: training is deterministic)."""
        from fedge.common.modeling import get_adapter, set_adapter
        from fedge.edge_client.federation.local_work import train_config
        from fedge.edge_client.training.session import epoch_maker
        from fedge.edge_client.training.train import train
        from fedge.server.aggregate import digest

        key = (i, rnd, digest(global_arrays))
        if key not in self.trained:
            set_adapter(self.model, global_arrays)
            cfg = train_config(self.settings, rnd)
            cfg.checkpoint_every = 0
            train(self.model, epoch_maker(self.session.tokenizer, self.data[i], cfg), cfg, self.session.device)
            if len(self.trained) > 40:  # ~20 MB each: keep the cache bounded
                self.trained.pop(next(iter(self.trained)))
            self.trained[key] = get_adapter(self.model)
        return self.trained[key]

    def score(self, arrays: dict) -> dict:
        from fedge.server.aggregate import digest

        key = digest(arrays)
        if key not in self.scores:
            self.scores[key] = self._score(arrays)
        return self.scores[key]

    def _score(self, arrays: dict) -> dict:
        from fedge.common.modeling import set_adapter
        from fedge.edge_client.training.evaluate import evaluate
        from fedge.edge_client.training.session import eval_batches

        set_adapter(self.model, arrays)
        per = {}
        for d, ex in self.tests.items():
            r = evaluate(self.model, self.session.tokenizer, eval_batches(self.session.tokenizer, ex, 256), ex,
                         self.session.device)  # fmt: skip
            per[d] = {"exact_match": r.exact_match, "heldout_loss": r.loss}
        return {
            "exact_match": statistics.fmean(v["exact_match"] for v in per.values()),
            "heldout_loss": statistics.fmean(v["heldout_loss"] for v in per.values()),
            "per_domain": per,
        }

    def validation_cost(self, repeats: int = 7) -> dict:
        """The server's check of one reply (records, claims, decode, shapes, finite values, norm), ms per MB."""
        from fedge.common import wire
        from fedge.quantization.codecs import encode
        from fedge.quantization.updates import make_delta
        from fedge.server.settings import ServerSettings
        from fedge.server.state import ServerState
        from fedge.server.strategy import FedgeAvg

        trained = self.train(0, 1, self.initial)
        strategy = FedgeAvg(ServerSettings(min_clients=1), stage_deadline_s=1.0)
        state = ServerState({}, arrays=dict(self.initial))
        delta = make_delta(trained, self.initial)
        out = {}
        for name, arrays in (("fp32 adapter", trained), ("int8 change", encode(delta, "int8").to_arrays())):
            reply = _reply(0, arrays, len(self.data[0]), self.args.steps)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                entry, _ = strategy._check_reply(reply, state, self.settings)
                times.append(time.perf_counter() - t0)
            assert entry.reason is None, entry.reason
            mb = wire.record_bytes(reply.content[wire.ADAPTER]) / 1e6
            ms = statistics.median(times) * 1e3
            out[name] = {"mb": round(mb, 2), "ms": round(ms, 1), "ms_per_mb": round(ms / mb, 2)}
        return out

    def setup(self) -> dict:
        import torch

        s = self.settings
        return {
            "model": s.model, "precision": self.session.precision, "clients": CLIENTS, "rounds": self.args.rounds,
            "steps": s.steps, "batch": s.batch, "lr": s.lr, "lora_r": s.lora_r, "seed": s.seed,
            "server_lr": 2.0, "eval_per_domain": self.args.eval_per_domain, "threads": torch.get_num_threads(),
            "rules": {k: v for k, v in RULES.items()}, "scenarios": {k: list(v) for k, v in SCENARIOS.items()},
        }  # fmt: skip


def _scaled(global_arrays: dict, trained: dict, scale: float) -> dict:
    """``global + scale * (trained - global)`` for every tensor."""
    return {k: (global_arrays[k] + scale * (v - global_arrays[k])).astype(v.dtype) for k, v in trained.items()}


def _reply(i: int, arrays: dict, examples: int, steps: int) -> SimpleNamespace:
    """A training reply as the strategy receives one from the network."""
    from flwr.app import ConfigRecord, MetricRecord

    from fedge.common import wire

    content = {
        wire.ADAPTER: wire.to_record(arrays),
        wire.METRICS: MetricRecord({wire.Metric.EXAMPLES: examples, wire.Metric.STEPS: steps}),
        wire.CLIENT: ConfigRecord({wire.Client.NAME: f"client-{i}"}),
    }
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=i + 1))


def _table(r: dict) -> str:
    s, runs = r["setup"], r["runs"]
    rules = list(next(iter(runs.values())))
    rows = [
        f"### Robustness: {s['model']} ({s['precision']}), 5 clients on the demo domains, {s['rounds']} rounds x "
        f"{s['steps']} local steps, seed {s['seed']}",
        "",
        f"Exact match on {4 * s['eval_per_domain']} held-out examples (held-out loss in brackets) after the last "
        "round; the fifth client is the attacker. 'accepted' counts the rounds its update passed the server's checks.",
        "",
        "| rule | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for rule in rules:
        cells = []
        for scenario in runs:
            v = runs[scenario].get(rule)
            if v is None:
                cells.append("")
                continue
            took = "" if scenario == "honest" else f", accepted {v['attacker_accepted']}/{s['rounds']}"
            cells.append(f"{v['exact_match']:.1%} ({v['heldout_loss']:.2f}{took})")
        rows.append(f"| {rule} | " + " | ".join(cells) + " |")
    rows += ["", "Validation of one reply by the server (median of 7):", "", "| reply | MB | ms | ms per MB |",
             "|---|---|---|---|"]  # fmt: skip
    for name, v in r["validation"].items():
        rows.append(f"| {name} | {v['mb']} | {v['ms']} | {v['ms_per_mb']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
