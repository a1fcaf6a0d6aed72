"""``fedge demo``: a whole federation on this machine, then a report.

The server and each client run as their own processes (``fedge server start`` and ``fedge client start``)
talking over loopback through Flower's SuperLink and SuperNodes, exactly as on separate devices. Client i
holds demo domain i (healthcare, finance, education, iot), trains on its train split and evaluates the
global adapter on its test split. With ``devices`` client i runs as emulated device i (``fedge client start
--device-profile``) and the rounds are adaptive: each device plans its round to the deadline and sends its
change encoded for its link. Every setting reaches the processes whole, in the config files the demo writes
(``server.toml``, ``clients/NAME.toml``) and passes with ``--config``. Everything lands in ``--out``:
report.json, rounds.png, clients.png, the final adapter, the config files, the server's state and every
process's log.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console

from fedge.common.errors import FedgeError
from fedge.common.fsutil import atomic_write_text
from fedge.common.procs import free_port, parse_address, stop, tail, wait_for_port
from fedge.common.settings import setting, to_toml_table
from fedge.common.wire import RoundSettings
from fedge.edge_client.federation.service import ClientSettings
from fedge.edge_client.federation.settings import Device
from fedge.edge_client.training.demo_data import DOMAINS
from fedge.server.settings import ServerSettings
from fedge.simulate import demo_device

# `fedge demo --devices`' default round deadline, for the default model (SmolLM2-135M): set when rounds were 15
# steps of 8 x 256, long enough that every built-in profile planned all 15 steps at full rank, short enough that
# they had to choose differently to make it (Pi 4: int8 base, 64-token rows; Pi 5: fp32, 128; Jetson: bf16, batch
# 8; laptop: fp32, batch 4). Rounds of 40 steps of 2 (80 examples, not 120) should cost less: not re-measured
# since (benchmarks/heterogeneous.py pins its own round settings).
DEVICES_DEADLINE_S = 240.0
# ServerSettings fields the demo sets itself: one loopback server, its state in --out, every client needed.
DEMO_SETS = ("address", "state", "min_clients", "ssl_certfile", "ssl_keyfile", "ssl_ca_certfile", "auth_key")


@dataclass
class DemoSettings:
    """The demo's own settings (``fedge demo`` flags); the round's and the server's are theirs."""

    clients: int | None = setting(None, "client processes, one demo domain each (default: 4, or one per device)")
    devices: list[str] = setting(
        [], "one client per emulated device, e.g. pi4-2gb,pi5-8gb,jetson-orin-nano,laptop (repeat the option for "
        "key=value profiles: --devices base=laptop --devices base=pi5-8gb,slowdown=2); makes rounds adaptive: "
        f"--deadline {DEVICES_DEADLINE_S:g} and --codec auto unless given", metavar="LIST",
    )  # fmt: skip
    out: Path | None = setting(None, "report, plots, adapter, configs and logs (default: a new directory)")
    simulation: int | None = setting(
        None, "run N virtual clients on Flower's simulation engine instead of processes", metavar="N"
    )
    launcher: bool = setting(
        True, "clients start each message's ClientApp by forking a pre-imported process (fedge's launcher); "
        "--no-launcher: a fresh flwr-clientapp process per message, as Flower does (the baseline)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.devices = _device_list(self.devices)
        if self.devices and self.clients is not None and self.clients != len(self.devices):
            raise ValueError(f"clients {self.clients} but devices lists {len(self.devices)}: one client per device")
        self.clients = len(self.devices) if self.devices else (4 if self.clients is None else self.clients)
        if not 1 <= self.clients <= 16:
            raise ValueError(f"clients (or devices) must be 1..16, got {self.clients}")
        if self.simulation is not None and self.simulation < 1:
            raise ValueError(f"simulation must be >= 1 virtual clients, got {self.simulation}")


def adaptive_defaults(demo: DemoSettings, round_settings: RoundSettings, given: set[str]) -> RoundSettings:
    """With emulated devices, rounds are adaptive unless told otherwise: a deadline and ``--codec auto``."""
    if not demo.devices:
        return round_settings
    changes = {"deadline_s": DEVICES_DEADLINE_S, "codec": "auto"}
    return dataclasses.replace(round_settings, **{k: v for k, v in changes.items() if k not in given})


def run_demo(
    demo: DemoSettings, round_settings: RoundSettings, server: ServerSettings, cache: Path, console: Console
) -> int:
    from fedge.common.models import pull_model

    out = (demo.out or Path(f"fedge-demo-{datetime.now():%Y%m%d-%H%M%S}")).resolve()
    if out.exists() and any(out.iterdir()):
        raise FedgeError(f"--out {out}: exists and is not empty; pick a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedgeError(f"--out {out}: cannot create ({err.strerror})") from None
    r = round_settings
    console.print(
        f"fedge demo: {demo.clients} clients x {server.rounds} rounds x {r.steps} steps on {r.model}; "
        f"output in [bold]{out}[/]"
    )
    if demo.devices:
        console.print(
            f"emulated devices: {', '.join(demo.devices)}; each plans its round to a {r.deadline_s:g} s deadline"
            f"{', sends its change encoded (' + r.codec + ')' if r.codec else ''}",
            soft_wrap=True,
        )
    started = time.monotonic()
    with console.status(f"fetching {r.model} (once)"):
        pull_model(r.model, cache, lambda m: console.print(f"[dim]{m}[/]"))
    t0 = time.monotonic()
    if demo.simulation:
        from fedge.simulate import run_simulation

        server = run_simulation(demo.simulation, r, server, demo.devices, out, cache, console)
    else:
        server = _run_processes(demo, r, server, out, cache, console)
    return _finish(demo, r, server, out, time.monotonic() - t0, t0 - started, console)


def _fedge(cache: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fedge", "--cache-dir", str(cache), *args]


def write_config(path: Path, **tables: object) -> Path:
    """A config file for ``--config``: one TOML table per settings object (e.g. ``round=..., server=...``)."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tomli_w.dumps({name: to_toml_table(obj) for name, obj in tables.items()}))
    return path


def demo_processes(
    demo: DemoSettings, round_settings: RoundSettings, server: ServerSettings, out: Path, cache: Path, port: int
) -> tuple[ServerSettings, list[tuple[ClientSettings, Device]]]:
    """The server's settings and each client's (client, device) settings for a demo on loopback ``port``."""
    server = dataclasses.replace(server, address=f"127.0.0.1:{port}", state=out / "server", min_clients=demo.clients)
    cores = os.cpu_count() or 1
    threads, turns = max(1, cores // demo.clients), ""
    if demo.clients > cores:
        # one thread each, at most one client per core at work: as fast as all at once (47.6 s against 47.9 s for 4
        # clients' round on 2 cores; 2 threads each: over 120 s; benchmarks/thread_layout.py), and each client's
        # clock then times its own work on a core of its own, not a share of a crowded one
        turns = f"{out / 'turns'}:{cores}"
        if round_settings.deadline_s > 0:  # clients work in waves: the server waits for all of them
            waves = -(-demo.clients // cores)
            server = dataclasses.replace(
                server, stage_deadline=server.stage_deadline_s(round_settings.deadline_s, waves)
            )
    # the model is pulled already: the client only preloads it in its warm worker
    client = ClientSettings(server=server.address, model=round_settings.model, launcher=demo.launcher)
    clients = []
    for i in range(demo.clients):
        domain = DOMAINS[i % len(DOMAINS)]
        name = domain if i < len(DOMAINS) else f"{domain}-{i}"
        device = demo_device(i, name, out, cache, threads, demo.devices)
        clients.append((client, dataclasses.replace(device, turns=turns)))
    return server, clients


def _run_processes(
    demo: DemoSettings, round_settings: RoundSettings, server: ServerSettings, out: Path, cache: Path, console
) -> ServerSettings:
    """Run the demo's server and clients as processes; the server's settings as it ran."""
    from fedge.common.procs import spawn

    logs, env = out / "logs", dict(os.environ)
    server, clients = demo_processes(demo, round_settings, server, out, cache, free_port())
    config = write_config(out / "server.toml", round=round_settings, server=server)
    server_proc = spawn(_fedge(cache, "server", "start", "--config", str(config)), env, logs / "server.log")
    # Clients start once the SuperLink listens: each picks free ports of its own (SuperNode, worker), and one of
    # those picked while the SuperLink was still starting could be the port it was about to take (seen once).
    host, port = parse_address(server.address, "--address")
    try:
        wait_for_port(host, port, server_proc, logs / "server.log", timeout=300)
    except FedgeError as err:
        stop(server_proc)
        raise FedgeError(f"the server did not start: {err}") from None
    procs = []
    for client, device in clients:
        config = write_config(out / "clients" / f"{device.name}.toml", client=client, device=device)
        cmd = _fedge(cache, "client", "start", "--config", str(config))
        procs.append(spawn(cmd, env, logs / f"client-{device.name}.log"))
    try:
        from fedge.server.report import watch_records

        watch_records(lambda: server_proc.poll() is not None, server.state, server.rounds, console)
    finally:
        for proc in procs:
            stop(proc)
        stop(server_proc)
    if server_proc.returncode != 0:
        raise FedgeError(f"the server failed (code {server_proc.returncode}); its log:\n{tail(logs / 'server.log')}")
    return server


def _finish(
    demo: DemoSettings, round_settings: RoundSettings, server: ServerSettings, out: Path, seconds: float,
    pull_seconds: float, console: Console,
) -> int:  # fmt: skip
    from fedge.server.app import FINAL_ADAPTER
    from fedge.server.report import write_report
    from fedge.server.state import read_records

    state_dir = server.state
    records = read_records(state_dir)
    meta = {
        "settings": to_toml_table(round_settings),
        "server": to_toml_table(server),
        "clients": demo.clients,
        "devices": demo.devices,
        "launcher": demo.launcher and not demo.simulation,  # ClientApp processes forked by fedge's launcher
        "rounds_planned": server.rounds,
        "mode": f"simulation ({demo.simulation} virtual clients)" if demo.simulation else "processes on loopback",
        "seconds": round(seconds, 1),
        "pull_seconds": round(pull_seconds, 1),  # fetching the model (nothing to fetch once it is in the cache)
    }
    report = write_report(out, records, meta)
    if (state_dir / FINAL_ADAPTER).is_dir():
        shutil.copytree(state_dir / FINAL_ADAPTER, out / "adapter", dirs_exist_ok=True)
    base, final = report["base_exact_match"], report["final_exact_match"]
    console.print(
        f"[green]done in {seconds / 60:.1f} min:[/] exact match on the clients' held-out data "
        f"{_pct(base)} (base model) -> {_pct(final)} after {len(records) - 1} rounds"
        f"{f' (+ {pull_seconds:.0f} s fetching the model)' if pull_seconds >= 1 else ''}"
    )
    rounds_s = report["costs"][-1]["wall_s"] if report["costs"] else 0.0
    for target, hit in report["to_target"].items():
        if hit is None:
            console.print(f"{target} exact match: not reached")
            continue
        since_start = pull_seconds + seconds - (rounds_s - hit["wall_s"])  # the rounds after it had not run yet
        console.print(
            f"{target} exact match at round {hit['round']}: {since_start / 60:.1f} min after the command started; "
            f"{hit['client_s'] / 60:.1f} client-minutes of training and scoring, {hit['bytes'] / 2**20:.0f} MB "
            f"moved, {hit['energy_j'] / 1000:.1f} kJ of training",
            soft_wrap=True,
        )
    console.print(
        f"report: {out / 'report.json'}, plots: {out / 'rounds.png'}, {out / 'clients.png'}, adapter: {out / 'adapter'}"
    )
    return 0


def _device_list(values: list[str]) -> list[str]:
    """``--devices`` values -> one profile spec per client, each checked now (ValueError naming the field).

    A value without ``=`` is a comma-separated list of names or files; one with ``=`` is a single key=value
    profile (its commas separate fields).
    """
    from fedge.edge_client.device.emulated import load_profile

    specs = []
    for value in values:
        specs += [value] if "=" in value else [v.strip() for v in value.split(",") if v.strip()]
    for spec in specs:
        try:
            load_profile(spec)
        except FedgeError as err:
            raise ValueError(str(err)) from None
    return specs


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
