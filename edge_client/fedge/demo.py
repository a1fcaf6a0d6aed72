"""``fedge demo``: a whole federation on this machine, then a report.

The server and each client run as their own processes (``fedge server start`` and ``fedge client start``)
talking over loopback through Flower's SuperLink and SuperNodes, exactly as on separate devices. Client i
holds demo domain i (healthcare, finance, education, iot), trains on its train split and evaluates the
global adapter on its test split. With ``devices`` client i runs as emulated device i (``fedge client start
--device-profile``) and the rounds are adaptive: each device plans its round to the deadline and sends its
change encoded for its link. Everything lands in ``--out``: report.json, rounds.png, clients.png, the
final adapter, the server's state and every process's log.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rich.console import Console

from fedge.common import wire
from fedge.common.errors import FedgeError
from fedge.common.procs import free_port, stop, tail
from fedge.edge_client.demo_data import DOMAINS


@dataclass
class DemoOptions:
    settings: wire.RoundSettings = field(default_factory=wire.RoundSettings)
    rounds: int = 3
    clients: int = 4
    out: Path | None = None
    cache_dir: Path | None = None
    simulation: int | None = None
    server_lr: float = 1.0
    devices: list[str] = field(default_factory=list)  # device profile specs: client i runs as devices[i]


def run_demo(opts: DemoOptions, console: Console) -> int:
    from fedge.common.models import default_cache_dir, pull_model

    out = (opts.out or Path(f"fedge-demo-{datetime.now():%Y%m%d-%H%M%S}")).resolve()
    if out.exists() and any(out.iterdir()):
        raise FedgeError(f"--out {out}: exists and is not empty; pick a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--out {out}: cannot create ({err.strerror})") from None
    cache = opts.cache_dir or default_cache_dir()
    console.print(
        f"fedge demo: {opts.clients} clients x {opts.rounds} rounds x {opts.settings.steps} steps "
        f"on {opts.settings.model}; output in [bold]{out}[/]"
    )
    if opts.devices:
        s = opts.settings
        console.print(
            f"emulated devices: {', '.join(opts.devices)}; each plans its round to a {s.deadline_s:g} s deadline"
            f"{', sends its change encoded (' + s.codec + ')' if s.codec else ''}",
            soft_wrap=True,
        )
    with console.status(f"fetching {opts.settings.model} (once)"):
        pull_model(opts.settings.model, cache, lambda m: console.print(f"[dim]{m}[/]"))
    t0 = time.monotonic()
    if opts.simulation:
        from fedge.simulate import run_simulation

        state_dir = run_simulation(opts, out, cache, console)
    else:
        state_dir = _run_processes(opts, out, cache, console)
    return _finish(opts, out, state_dir, time.monotonic() - t0, console)


def _fedge(cache: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fedge", "--cache-dir", str(cache), *args]


def _round_args(s: wire.RoundSettings, rounds: int) -> list[str]:
    return [
        "--model",
        s.model,
        "--rounds",
        str(rounds),
        "--steps",
        str(s.steps),
        "--lr",
        str(s.lr),
        "--batch",
        str(s.batch),
        "--seq-len",
        str(s.seq_len),
        "--rank",
        str(s.lora_r),
        "--targets",
        s.lora_targets,
        "--eval-examples",
        str(s.eval_examples),
        "--seed",
        str(s.seed),
        "--deadline",
        str(s.deadline_s),
        "--codec",
        s.codec,
    ]


def _run_processes(opts: DemoOptions, out: Path, cache: Path, console: Console) -> Path:
    import os

    from fedge.common.procs import spawn

    port, logs, state_dir = free_port(), out / "logs", out / "server"
    env = dict(os.environ)
    server = spawn(
        _fedge(
            cache,
            "server",
            "start",
            *_round_args(opts.settings, opts.rounds),
            "--state",
            str(state_dir),
            "--address",
            f"127.0.0.1:{port}",
            "--min-clients",
            str(opts.clients),
            "--server-lr",
            str(opts.server_lr),
        ),
        env,
        logs / "server.log",
    )
    threads = max(1, (os.cpu_count() or 1) // opts.clients)
    clients = []
    for i in range(opts.clients):
        domain = DOMAINS[i % len(DOMAINS)]
        name = domain if i < len(DOMAINS) else f"{domain}-{i}"
        # Virtual time: the devices share this machine's cores, so their slowness is counted, not slept.
        profile = ["--device-profile", opts.devices[i], "--emulated-time", "virtual"] if opts.devices else []
        clients.append(
            spawn(
                _fedge(
                    cache,
                    "client",
                    "start",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--data",
                    f"demo:{domain}",
                    "--eval-data",
                    f"demo:{domain}:test",
                    "--name",
                    name,
                    "--state",
                    str(out / "clients" / name),
                    "--threads",
                    str(threads),
                    "--model",
                    opts.settings.model,  # already pulled: this only preloads it in the client's warm worker
                    *profile,
                ),
                env,
                logs / f"client-{name}.log",
            )
        )
    try:
        _watch(server, state_dir, opts.rounds, console)
    finally:
        for proc in clients:
            stop(proc)
        stop(server)
    if server.returncode != 0:
        raise FedgeError(f"the server failed (code {server.returncode}); its log:\n{tail(logs / 'server.log')}")
    return state_dir


def _watch(server, state_dir: Path, rounds: int, console: Console) -> None:
    """Print each round as it lands, while the server runs."""
    from fedge.server.report import watch_records

    watch_records(lambda: server.poll() is not None, state_dir, rounds, console)


def _finish(opts: DemoOptions, out: Path, state_dir: Path, seconds: float, console: Console) -> int:
    from fedge.server.app import FINAL_ADAPTER
    from fedge.server.report import write_report
    from fedge.server.state import read_records

    records = read_records(state_dir)
    meta = {
        "settings": opts.settings.to_config(),
        "clients": opts.clients,
        "devices": opts.devices,
        "rounds_planned": opts.rounds,
        "mode": f"simulation ({opts.simulation} virtual clients)" if opts.simulation else "processes on loopback",
        "seconds": round(seconds, 1),
    }
    report = write_report(out, records, meta)
    if (state_dir / FINAL_ADAPTER).is_dir():
        shutil.copytree(state_dir / FINAL_ADAPTER, out / "adapter", dirs_exist_ok=True)
    base, final = report["base_exact_match"], report["final_exact_match"]
    console.print(
        f"[green]done in {seconds / 60:.1f} min:[/] exact match on the clients' held-out data "
        f"{_pct(base)} (base model) -> {_pct(final)} after {len(records) - 1} rounds"
    )
    console.print(
        f"report: {out / 'report.json'}, plots: {out / 'rounds.png'}, {out / 'clients.png'}, adapter: {out / 'adapter'}"
    )
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
