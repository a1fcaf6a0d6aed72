"""The background agent: what it costs while it waits, and how fast it halts a round when a condition fails.

- **idle**: CPU and memory of a waiting ``fedge agent run`` (its SuperNode retrying an unreachable server, the
  model unloaded after ``unload_after``), against the baseline ``fedge client start`` in the same run (the same
  SuperNode plus the warm worker holding the model). Summed over each process tree, sampled for ``--idle-seconds``.
- **stop latency**: a real agent with its warm worker training the real model (a round's work handed to the worker
  as the ClientApp would); the run conditions (a readings file) flip to "on battery" mid-round, and the time until
  the worker is stopped is measured (``--stops`` times); then they flip back, and the round must finish with every
  step it was asked for (no lost steps).

    python benchmarks/agent.py [--model smollm2-135m] [--idle-seconds 60] [--stops 5] [--steps 40]

Writes benchmarks/results/agent.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--stops", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/fedge-agent-bench"))
    p.add_argument("--day-only", action="store_true", help="run only the day-in-the-life part, into the results")
    p.add_argument("--idle-only", action="store_true", help="run only the idle parts, into the results")
    p.add_argument("--day-rounds", type=int, default=8)
    p.add_argument("--day-steps", type=int, default=400, help="local steps a round (tiny model: ~15 s of training)")
    args = p.parse_args()
    if args.day_only:
        results = json.loads((ROOT / "benchmarks/results/agent.json").read_text())
        results["day"] = _day(args)
        write_results("agent", results)
        update_readme_section("agent", _table(results))
        print(json.dumps(results["day"], indent=1))
        return
    import shutil

    from fedge.common.models import default_cache_dir
    from fedge.common.procs import free_port

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cache = args.cache_dir or default_cache_dir()
    env = {**os.environ, "FEDGE_CACHE": str(cache), "XDG_RUNTIME_DIR": str(args.work / "run")}
    closed = f"127.0.0.1:{free_port()}"  # nothing listens: the SuperNode retries, as on a device far from its server

    print("baseline: fedge client start, model in its warm worker", flush=True)
    client = _spawn(["client", "start", "--server", closed, "--model", args.model, "--data", "demo:iot",
                     "--state", str(args.work / "client")], env, args.work / "client.log")  # fmt: skip
    try:
        _wait(lambda: "loaded in" in _read(args.work / "client" / "worker.log"), 300, "the client's worker to load")
        baseline = _tree_usage(client.pid, args.idle_seconds)
    finally:
        _stop(client)
    print(f"  {baseline}", flush=True)

    print("agent: waiting, model unloaded", flush=True)
    readings = args.work / "readings.json"
    _readings(readings, True)
    config = _config(args.work / "agent.toml", closed, args.model, args.work / "agent", readings, unload_after=5)
    agent = _spawn(["agent", "run", "--config", str(config)], env, args.work / "agent.log")
    try:
        _wait(lambda: _status(args.work / "agent").get("model") == "unloaded", 300, "the agent to unload the model")
        time.sleep(10)  # the worker's exit is not the waiting agent's cost
        idle = _tree_usage(agent.pid, args.idle_seconds)
    finally:
        _stop(agent)
    print(f"  {idle}", flush=True)

    print("agent: held back past sleep_after, its SuperNode out of the federation", flush=True)
    _readings(readings, False)
    config = _config(args.work / "asleep.toml", closed, args.model, args.work / "asleep", readings, unload_after=5,
                     sleep_after=5)  # fmt: skip
    agent = _spawn(["agent", "run", "--config", str(config)], env, args.work / "asleep.log")
    try:
        _wait(lambda: _status(args.work / "asleep").get("state") == "asleep", 120, "the agent to leave")
        time.sleep(5)
        asleep = _tree_usage(agent.pid, args.idle_seconds)
    finally:
        _stop(agent)
    print(f"  {asleep}", flush=True)
    if args.idle_only:
        results = json.loads((ROOT / "benchmarks/results/agent.json").read_text())
        results.update(idle=idle, idle_asleep=asleep, baseline_client_start=baseline)
        results["setup"]["idle_seconds"] = args.idle_seconds
        write_results("agent", results)
        update_readme_section("agent", _table(results))
        return

    print("stop latency: a round under way, conditions flipped", flush=True)
    stops = _stop_latency(args, env, closed, cache)
    results = {"idle": idle, "idle_asleep": asleep, "baseline_client_start": baseline, **stops, "day": _day(args),
               "setup": {"model": args.model, "idle_seconds": args.idle_seconds, "steps": args.steps,
                         "cores": os.cpu_count()}}  # fmt: skip
    path = write_results("agent", results)
    update_readme_section("agent", _table(results))
    print(f"wrote {path}")


def _stop_latency(args, env: dict, server: str, cache: Path) -> dict:
    import tomllib

    import psutil

    from fedge.common import wire
    from fedge.common.modeling import ModelHolder
    from fedge.edge_client.agent import hold
    from fedge.edge_client.federation.settings import Device
    from fedge.edge_client.federation.worker import call

    readings, state = args.work / "readings-stop.json", args.work / "agent-stop"
    _readings(readings, True)
    config = _config(args.work / "agent-stop.toml", server, args.model, state, readings, unload_after=0)
    agent = _spawn(["agent", "run", "--config", str(config)], env, args.work / "agent-stop.log")
    settings = wire.RoundSettings(model=args.model, steps=args.steps, seed=0, batch=8)
    initial = ModelHolder(cache).initial_adapter(args.model, settings.lora(), settings.seed)
    latencies, frozen_ok, done = [], [], {}
    try:
        _wait(lambda: "loaded in" in _read(state / "worker.log"), 300, "the agent's worker to load")
        device = Device.from_node_config(tomllib.loads((state / "node-config.toml").read_text()))
        work = threading.Thread(target=lambda: done.update(out=call(device, "train", settings.to_config(), initial, 1)))
        work.start()
        for trial in range(args.stops):
            at_step = 2 + trial * max(1, (args.steps - 4) // max(1, args.stops))
            _wait(lambda s=at_step: (hold.progress(state) or {}).get("step", 0) >= s, 600, f"step {at_step}")
            worker = psutil.Process(hold.progress(state)["pid"])
            time.sleep(random.uniform(0, 1))  # out of phase with the agent's half-second checks
            _readings(readings, False)
            t0 = time.monotonic()
            _wait(lambda w=worker: w.status() == psutil.STATUS_STOPPED, 60, "the worker to stop", poll=0.02)
            latencies.append(time.monotonic() - t0)
            step = hold.progress(state)["step"]
            time.sleep(3.0)
            frozen_ok.append(hold.progress(state)["step"] == step)  # no step while halted
            _readings(readings, True)
            _wait(lambda w=worker: w.status() != psutil.STATUS_STOPPED, 60, "the worker to resume", poll=0.05)
            print(f"  trial {trial + 1}: halted at step {step} in {latencies[-1]:.2f} s", flush=True)
        work.join(1800)
    finally:
        _stop(agent)
    steps = int(done["out"][1][wire.Metric.STEPS]) if done.get("out") else 0
    return {
        "stop_latency_s": round(statistics.median(latencies), 3),
        "stop_latencies_s": [round(x, 3) for x in latencies],
        "halted_rounds_kept_still": all(frozen_ok),
        "round_steps": steps,
        "lost_steps": args.steps - steps,
    }


# A day, compressed: seconds since the start -> which condition fails for which agent (the others hold).
SCHEDULE = {
    "laptop": [("power", 40, 100, "on battery at 31%")],
    "pi": [("heat", 20, 35, "hottest 83°C (cpu-thermal)"), ("heat", 120, 140, "hottest 81°C (cpu-thermal)")],
    "desk": [("window", 0, 60, "09:10 is outside 18:00-08:00")],
}


def _day(args) -> dict:
    """Three agents on a tiny model (the protocol's behaviour, not quality) through a scripted schedule of
    conditions: rounds joined, declined by reason, interrupted, and steps trained but never delivered."""
    from fedge.common.procs import free_port
    from tests.conftest import build_tiny_model_dir

    work = args.work / "day"
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model_dir(work / "tiny")
    port, steps = free_port(), args.day_steps
    env = {**os.environ, "FEDGE_CACHE": str(work / "cache"), "XDG_RUNTIME_DIR": str(work / "run")}
    server = _spawn(["server", "start", "--model", str(model), "--rounds", str(args.day_rounds), "--steps",
                     str(steps), "--min-clients", "1", "--eval-examples", "8", "--rank", "4", "--state",
                     str(work / "server"), "--address", f"127.0.0.1:{port}", "--stage-deadline", "120"],
                    env, work / "server.log")  # fmt: skip
    agents = {}
    for name, domain in zip(SCHEDULE, ("finance", "iot", "education")):
        _readings_at(work / f"{name}.json", name, 0.0)
        config = work / f"{name}.toml"
        config.write_text(
            f'[client]\nserver = "127.0.0.1:{port}"\nmodel = "{model}"\n\n[device]\nname = "{name}"\n'
            f'data = "demo:{domain}"\neval_data = "demo:{domain}:test"\nthreads = 1\nstate_dir = "{work / name}"\n\n'
            f'[conditions]\nsource = "{work / f"{name}.json"}"\n\n[agent]\ncheck_every = 1.0\nunload_after = 0.0\n'
        )
        agents[name] = _spawn(["agent", "run", "--config", str(config)], env, work / f"{name}.log")
    t0 = time.monotonic()
    try:
        while server.poll() is None and time.monotonic() - t0 < 1800:
            for name in SCHEDULE:
                _readings_at(work / f"{name}.json", name, time.monotonic() - t0)
            time.sleep(0.5)
        statuses = {name: _status(work / name) for name in SCHEDULE}
    finally:
        for proc in [*agents.values(), server]:
            _stop(proc)
    return _day_summary(work, statuses, steps)


def _readings_at(path: Path, name: str, t: float) -> None:
    failing = {cond: detail for cond, start, end, detail in SCHEDULE[name] if start <= t < end}
    readings = {cond: [cond not in failing, failing.get(cond, "fine")] for cond in ("power", "heat", "window")}
    text = json.dumps(readings)
    if _read(path) != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _day_summary(work: Path, statuses: dict, steps: int) -> dict:
    from fedge.server.state import read_records

    records = [r.to_dict() for r in read_records(work / "server")]
    out = {"rounds": len(records) - 1, "rounds_joined": 0, "declined": {}, "interrupted": 0, "lost_steps": 0,
           "per_agent": {}}  # fmt: skip
    for name in SCHEDULE:
        accepted = {
            r["round"]: c["steps"] for r in records for c in r["clients"] if c["name"] == name and c["accepted"]
        }
        declined = [f["reason"] for r in records for f in r["failures"] if f.get("declined")
                    and f["reason"].startswith(f"{name}: ")]  # fmt: skip
        halted = _read(work / name / "agent.log").count("round halted")
        trained = {r["round"]: r["step"] for r in statuses[name].get("rounds", []) if r.get("kind") == "train"}
        lost = sum(max(0, done - int(accepted.get(rnd) or 0)) for rnd, done in trained.items())
        reasons: dict[str, int] = {}
        for reason in declined:
            cond = reason.split("not eligible: ", 1)[-1].split(":", 1)[0]
            reasons[cond] = reasons.get(cond, 0) + 1
            out["declined"][cond] = out["declined"].get(cond, 0) + 1
        out["per_agent"][name] = {"joined": len(accepted), "declined": reasons, "interrupted": halted,
                                  "lost_steps": lost}  # fmt: skip
        out["rounds_joined"] += len(accepted)
        out["interrupted"] += halted
        out["lost_steps"] += lost
    return out


# --- helpers ----------------------------------------------------------------------------------------------------


def _config(
    path: Path, server: str, model: str, state: Path, readings: Path, unload_after: float, sleep_after: float = 0
) -> Path:
    path.write_text(
        f'[client]\nserver = "{server}"\nmodel = "{model}"\n\n'
        f'[device]\nname = "bench"\ndata = "demo:iot"\nstate_dir = "{state}"\n\n'
        f'[conditions]\nsource = "{readings}"\n\n[agent]\nunload_after = {unload_after}\nsleep_after = {sleep_after}\n'
    )
    return path


def _readings(path: Path, ok: bool) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"power": [ok, "on mains power" if ok else "on battery at 20%"]}))
    os.replace(tmp, path)


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedge", *args], env=env, stdout=open(log, "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    from fedge.common.procs import stop

    stop(proc, grace=20)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _status(state: Path) -> dict:
    try:
        return json.loads((state / "agent-status.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait(ok, timeout: float, what: str, poll: float = 0.5) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 (a process or file not there yet)
            pass
        time.sleep(poll)
    raise SystemExit(f"timed out waiting for {what}")


def _tree_usage(pid: int, seconds: float) -> dict:
    """CPU (% of one core) and memory (RSS, and USS: pages only these processes hold) of ``pid`` and its
    descendants over ``seconds``; the median of 1-second samples for memory."""
    import psutil

    def tree() -> list:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]

    def cpu(procs) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    procs = tree()
    c0, t0, rss, uss = {p.pid: cpu([p]) for p in procs}, time.monotonic(), {}, {}
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        for p in tree():
            with contextlib.suppress(psutil.Error):
                m = p.memory_full_info()
                rss.setdefault(p.pid, []).append(m.rss / 2**20)
                uss.setdefault(p.pid, []).append(m.uss / 2**20)
    wall = time.monotonic() - t0
    each = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            each[f"{p.name()} ({p.pid})"] = {
                "cpu_percent": round(100 * (cpu([p]) - c0.get(p.pid, 0.0)) / wall, 2),
                "rss_mb": round(statistics.median(rss.get(p.pid, [0.0])), 1),
                "uss_mb": round(statistics.median(uss.get(p.pid, [0.0])), 1),
            }
    return {
        "cpu_percent": round(sum(v["cpu_percent"] for v in each.values()), 2),
        "rss_mb": round(sum(v["rss_mb"] for v in each.values()), 1),
        "uss_mb": round(sum(v["uss_mb"] for v in each.values()), 1),
        "processes": len(each),
        "each": each,
    }


def _table(r: dict) -> str:
    i, b = r["idle"], r["baseline_client_start"]
    rows = [
        f"### The background agent ({r['setup']['model']}, {r['setup']['cores']} cores)",
        "",
        f"Idle: each process tree sampled for {r['setup']['idle_seconds']:g} s while its SuperNode retries an "
        "unreachable server. Targets: < 1% CPU, < 150 MB.",
        "",
        "| process tree | CPU (% of a core) | RSS MB | USS MB | processes |",
        "|---|---|---|---|---|",
        f"| fedge client start, model loaded (baseline) | {b['cpu_percent']} | {b['rss_mb']} | {b['uss_mb']} | "
        f"{b['processes']} |",
        f"| fedge agent run, waiting, model unloaded | {i['cpu_percent']} | {i['rss_mb']} | {i['uss_mb']} | "
        f"{i['processes']} |",
        *[f"| - {name} | {v['cpu_percent']} | {v['rss_mb']} | {v['uss_mb']} | |" for name, v in i["each"].items()],
        *(
            [
                f"| fedge agent run, held back past `sleep_after` (SuperNode out) | {a['cpu_percent']} | "
                f"{a['rss_mb']} | "
                f"{a['uss_mb']} | {a['processes']} |"
            ]
            if (a := r.get("idle_asleep"))
            else []
        ),
        "",
        f"Stop latency (a condition fails mid-round -> the worker halted), {len(r['stop_latencies_s'])} trials: "
        f"median {r['stop_latency_s']} s (all: {', '.join(map(str, r['stop_latencies_s']))}; target <= 5 s). "
        f"No step while halted: {r['halted_rounds_kept_still']}. The round finished {r['round_steps']} of "
        f"{r['round_steps'] + r['lost_steps']} steps ({r['lost_steps']} lost).",
    ]
    day = r.get("day")
    if day:
        head = "| agent | rounds joined | messages declined (by reason) | rounds halted mid-way | lost steps |"
        rows += [
            "",
            f"A day, compressed (`SCHEDULE`: three agents on a tiny model, {day['rounds']} rounds, "
            "conditions failing on a script):",
            "",
            head,
            "|---|---|---|---|---|",
        ]
        for name, a in day["per_agent"].items():
            why = ", ".join(f"{k}: {v}" for k, v in a["declined"].items()) or "-"
            rows.append(f"| {name} | {a['joined']} | {why} | {a['interrupted']} | {a['lost_steps']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
