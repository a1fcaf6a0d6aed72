"""Thread layout: how several clients sharing one machine should split its cores.

``--clients`` K processes each do one demo round's client work with fedge's own code (``local_work.do_train``
with the round's default settings: score the received adapter, then train; measured at 20 steps of 4): the work a
``fedge demo`` client does each round. Each process loads its model first (as the demo's warm workers do);
then the clock starts and the layout decides who works when:

- ``K x T``: all K at once, T torch threads each (the baseline: K x max(1, cores // K), every client at once with
  the cores split, as the demo ran before it took turns);
- ``C x T`` with C < K: at most C at once, in fedge's turns (``--turns DIR:C``, `fedge.edge_client.federation.turns`:
the
  next starts when one finishes). All K are let go at once; the turns decide the order.

The figure is the makespan (all K done), i.e. the round's client time, and the median over ``--repeats``
repetitions (each with fresh processes): the VM's noise moves one draw.

    python benchmarks/thread_layout.py [--clients 4] [--repeats 3]

Writes benchmarks/results/thread_layout.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402


def layouts(clients: int, cores: int) -> list[tuple[int, int]]:
    """(at once, threads each): every client at once with the cores split or all of them each, and turns."""
    split = max(1, cores // clients)
    candidates = [(clients, split), (clients, cores), (cores, 1), (1, cores)]
    if cores // 2 >= 1:
        candidates.append((max(1, cores // 2), 2))
    unique = []
    for at_once, threads in candidates:
        layout = (min(at_once, clients), threads)
        if layout not in unique:
            unique.append(layout)
    return unique


def _worker(index: int, threads: int, turns: str, cache: Path, out: Path) -> None:
    import dataclasses
    import resource

    from fedge.common import wire
    from fedge.common.modeling import ModelHolder
    from fedge.edge_client.device.emulated import apply_threads
    from fedge.edge_client.federation.local_work import do_train
    from fedge.simulate import demo_device

    apply_threads(threads)
    settings = wire.RoundSettings()
    holder = ModelHolder(cache, threads=threads)
    arrays = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    device = dataclasses.replace(demo_device(index, f"client-{index}", out, cache, threads), turns=turns)
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    _, metrics = do_train(holder, device, settings, arrays, rnd=1, score_first=True)  # waits for its turn inside
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    seconds = time.perf_counter() - t0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "tokens": metrics.get(wire.Metric.TOKENS, 0)}), flush=True)


def run_layout(clients: int, at_once: int, threads: int, cache: Path, limit_s: float) -> dict:
    """Start ``clients`` loaded workers, let them all go at once, and time until the last is done.

    Fewer than ``clients`` at once: each worker's device has turns (`fedge.edge_client.federation.turns`,
    ``DIR:at_once``), as `fedge demo` gives its clients. A layout still running after ``limit_s`` is stopped: its
    makespan is recorded as ``limit_s`` and ``stopped``.
    """
    with tempfile.TemporaryDirectory(prefix="fedge-layout-") as out:
        turns = f"{out}/turns:{at_once}" if at_once < clients else ""
        cmd = [sys.executable, __file__, "--threads", str(threads), "--cache-dir", str(cache), "--out", out]
        procs = [
            subprocess.Popen(
                [*cmd, "--worker", str(i), "--turns", turns],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )  # fmt: skip
            for i in range(clients)
        ]
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a worker failed to load (exit {p.wait()})")
        start = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        running, results = list(procs), []
        while running:
            ready, _, _ = select.select(
                [p.stdout for p in running], [], [], max(0.0, start + limit_s - time.perf_counter())
            )
            if not ready:  # past the limit: stop them all
                for p in procs:
                    p.kill()
                    p.wait()
                return {"makespan_s": limit_s, "stopped": True, "done": len(results)}
            for stream in ready:
                p = next(p for p in running if p.stdout is stream)
                running.remove(p)
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"a worker failed (exit {p.wait()})")
                results.append(json.loads(line))
        makespan = time.perf_counter() - start
        for p in procs:
            p.wait()
    return {
        "makespan_s": makespan,
        "client_seconds": [r["seconds"] for r in results],
        "cpu_s": sum(r["cpu_s"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "stopped": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--turns", default="", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--limit-s", type=float, default=120.0, help="stop a layout still running after this")
    args = parser.parse_args()
    from fedge.common.models import default_cache_dir

    cache = args.cache_dir or default_cache_dir()
    if args.worker is not None:
        _worker(args.worker, args.threads, args.turns, cache, args.out)
        return
    cores = os.cpu_count() or 1
    plan = layouts(args.clients, cores)
    runs = {f"{a} x {t}": [] for a, t in plan}
    for rep in range(args.repeats):  # layouts interleaved: a slow spell of the VM hits all of them
        for at_once, threads in plan:
            name = f"{at_once} x {threads}"
            print(f"repeat {rep + 1}: {name} ...", flush=True)
            runs[name].append(run_layout(args.clients, at_once, threads, cache, args.limit_s))
            print(
                f"  {runs[name][-1]['makespan_s']:.1f} s" + (" (stopped)" if runs[name][-1]["stopped"] else ""),
                flush=True,
            )
    results = {
        "setup": {
            "clients": args.clients,
            "cores": cores,
            "repeats": args.repeats,
            "limit_s": args.limit_s,
            "baseline": f"{args.clients} x {max(1, cores // args.clients)}",  # everyone at once, the cores split
        },
        "layouts": {
            name: {
                "at_once": int(name.split(" x ")[0]),
                "threads": int(name.split(" x ")[1]),
                "makespan_s_median": statistics.median(r["makespan_s"] for r in rs),
                "makespan_s": [r["makespan_s"] for r in rs],
                "stopped": sum(r["stopped"] for r in rs),
                "cpu_s_median": statistics.median(r["cpu_s"] for r in done)
                if (done := [r for r in rs if not r["stopped"]])
                else None,
                "runs": rs,
            }
            for name, rs in runs.items()
        },
    }
    write_results("thread_layout", results)
    update_readme_section("thread_layout", _table(results))
    print(_table(results))


def _table(results: dict) -> str:
    s = results["setup"]
    base = results["layouts"][s["baseline"]]["makespan_s_median"]
    lines = [
        f"### Thread layout: {s['clients']} clients' round work on {s['cores']} cores (median of {s['repeats']})",
        "",
        "| at once x threads each | makespan s, median (min-max) | x all at once | CPU s (all clients) |",
        "|---|---|---|---|",
    ]
    for name, r in sorted(results["layouts"].items(), key=lambda kv: kv[1]["makespan_s_median"]):
        tag = " (baseline: all at once)" if name == s["baseline"] else ""
        over = ">" if r["stopped"] * 2 > len(r["makespan_s"]) else ""  # the median is a stopped run's limit
        stopped = f", {r['stopped']} stopped at {s['limit_s']:.0f} s" if r["stopped"] else ""
        cpu = f"{r['cpu_s_median']:.0f}" if r["cpu_s_median"] is not None else "-"
        lines.append(
            f"| {name}{tag} | {over}{r['makespan_s_median']:.1f} ({min(r['makespan_s']):.1f}-{max(r['makespan_s']):.1f}"
            f"{stopped}) | {'<' if over else ''}{base / r['makespan_s_median']:.2f} | {cpu} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
