"""``fedge demo --simulation N``: N virtual clients on Flower's simulation engine (Ray), in one machine.

The same ServerApp and ClientApp as a deployment; only the transport differs. Virtual client i holds demo
domain ``i mod 4`` and, with ``--devices``, runs as emulated device ``i mod len(devices)``. Each Ray worker
keeps its loaded model between rounds, so unlike the deployment (a ClientApp process per message) the
per-round fixed cost is paid once per worker.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.common.errors import FedgeError
from fedge.common.wire import RoundSettings
from fedge.edge_client.federation.settings import Device
from fedge.edge_client.training.demo_data import DOMAINS
from fedge.server.settings import ServerSettings

if TYPE_CHECKING:  # Flower is imported where it runs: `fedge --help` builds the demo's options without it
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from rich.console import Console


def demo_device(i: int, name: str, out: Path, cache: Path, threads: int, devices: list[str] | None = None) -> Device:
    """Demo client ``i``: demo domain ``i mod 4`` (its test split held out), its state under ``out/clients``, and with
    ``devices`` emulated device ``i mod len(devices)`` on virtual time (the demo's clients share this machine's
    cores: an emulated device's slowness is counted, not slept)."""
    domain = DOMAINS[i % len(DOMAINS)]
    device = Device(name, f"demo:{domain}", f"demo:{domain}:test", out / "clients" / name, cache, threads=threads)
    if devices:
        device = dataclasses.replace(device, profile=devices[i % len(devices)], emulated_time="virtual")
    return device


def node_config(pid: int, out: Path, cache: Path, threads: int, devices: list[str] | None = None) -> dict:
    """What ``fedge client start`` would put in virtual client ``pid``'s node config: domain, paths, device."""
    name = f"{DOMAINS[pid % len(DOMAINS)]}-{pid}"
    return demo_device(pid, name, out, cache, threads, devices).to_node_config()


def client_app(out: Path, cache: Path, threads: int, devices: list[str] | None = None) -> ClientApp:
    """fedge's ClientApp behind a mod that gives each virtual node the node config ``fedge client start`` would."""
    from flwr.clientapp import ClientApp

    from fedge.edge_client.federation.clientapp import evaluate_round, train_round

    def with_node_config(msg: Message, context: Context, call_next) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        context.node_config.update(node_config(pid, out, cache, threads, devices))
        return call_next(msg, context)

    app = ClientApp(mods=[with_node_config])
    app.train()(train_round)
    app.evaluate()(evaluate_round)
    return app


def run_simulation(
    clients: int, round_settings: RoundSettings, server: ServerSettings, devices: list[str], out: Path, cache: Path,
    console: Console,
) -> ServerSettings:  # fmt: skip
    """Run the federation with ``clients`` virtual clients; returns the server's settings as it ran."""
    try:
        server.check_merge(round_settings.lora_merge)
    except ValueError as err:
        raise FedgeError(str(err)) from None
    try:
        import ray  # noqa: F401
        from flwr.simulation import run_simulation as flwr_run_simulation
    except ImportError:
        raise FedgeError("--simulation needs Flower's simulation engine: pip install 'fedge[simulation]'") from None
    from fedge.server.app import run_config, simulation_app

    state_dir = out / "server"
    cores = os.cpu_count() or 1
    # One virtual client per core at a time (client_resources below): with more clients than cores a stage
    # runs in waves, each up to a client deadline long (without one: an hour per stage).
    waves, deadline_s = -(-clients // cores), round_settings.deadline_s
    stage_s = server.stage_deadline_s(deadline_s, waves) if deadline_s else (server.stage_deadline or 3600.0)
    server = dataclasses.replace(server, state=state_dir, min_clients=clients, stage_deadline=stage_s)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": cores}}
    done = threading.Event()

    def watch() -> None:
        from fedge.server.report import watch_records

        watch_records(done.is_set, state_dir, server.rounds, console)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        flwr_run_simulation(
            simulation_app(run_config(round_settings, server, cache)),
            client_app(out, cache, threads=1, devices=devices),
            clients,
            backend_config=backend,
        )
    finally:
        done.set()
        watcher.join(5)
    return server
