"""``fedge demo --simulation N``: N virtual clients on Flower's simulation engine (Ray), in one machine.

The same ServerApp and ClientApp as a deployment; only the transport differs. Virtual client i holds demo
domain ``i mod 4`` and, with ``--devices``, runs as emulated device ``i mod len(devices)``. Each Ray worker
keeps its loaded model between rounds, so unlike the deployment (a ClientApp process per message) the
per-round fixed cost is paid once per worker.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from rich.console import Console

from fedge.common import wire
from fedge.common.errors import FedgeError
from fedge.edge_client.demo_data import DOMAINS


def node_config(pid: int, out: Path, cache: Path, threads: int, devices: list[str] | None = None) -> dict:
    """What ``fedge client start`` would put in virtual client ``pid``'s node config: domain, paths, device."""
    domain = DOMAINS[pid % len(DOMAINS)]
    name = f"{domain}-{pid}"
    config = {
        wire.Node.NAME: name,
        wire.Node.DATA: f"demo:{domain}",
        wire.Node.EVAL_DATA: f"demo:{domain}:test",
        wire.Node.STATE_DIR: str(out / "clients" / name),
        wire.Node.CACHE_DIR: str(cache),
        wire.Node.THREADS: threads,
    }
    if devices:
        config[wire.Node.PROFILE] = devices[pid % len(devices)]
        config[wire.Node.EMULATED_TIME] = "virtual"  # virtual clients share this machine: count slowness, not sleep
    return config


def client_app(out: Path, cache: Path, threads: int, devices: list[str] | None = None) -> ClientApp:
    """fedge's ClientApp behind a mod that gives each virtual node the node config ``fedge client start`` would."""
    from fedge.edge_client.flower_client import evaluate_round, train_round

    def with_node_config(msg: Message, context: Context, call_next) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        context.node_config.update(node_config(pid, out, cache, threads, devices))
        return call_next(msg, context)

    app = ClientApp(mods=[with_node_config])
    app.train()(train_round)
    app.evaluate()(evaluate_round)
    return app


def run_simulation(opts, out: Path, cache: Path, console: Console) -> Path:
    """Run the federation with ``opts.simulation`` virtual clients; returns the server's state directory."""
    try:
        import ray  # noqa: F401
        from flwr.simulation import run_simulation as flwr_run_simulation
    except ImportError:
        raise FedgeError("--simulation needs Flower's simulation engine: pip install 'fedge[simulation]'") from None
    from fedge.server.app import RunKeys, simulation_app
    from fedge.server.strategy import stage_deadline

    state_dir = out / "server"
    cores = os.cpu_count() or 1
    # One virtual client per core at a time (client_resources below): with more clients than cores a stage
    # runs in waves, each up to a client deadline long.
    waves, deadline_s = -(-opts.simulation // cores), opts.settings.deadline_s
    run_config = {
        **opts.settings.to_config(),
        RunKeys.ROUNDS: opts.rounds,
        RunKeys.STATE_DIR: str(state_dir),
        RunKeys.CACHE_DIR: str(cache),
        RunKeys.MIN_CLIENTS: opts.simulation,
        RunKeys.DEADLINE: stage_deadline(deadline_s, None if deadline_s else 3600.0, waves),
        RunKeys.NORM_FACTOR: 10.0,
        RunKeys.SERVER_LR: opts.server_lr,
    }
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": cores}}
    done = threading.Event()

    def watch() -> None:
        from fedge.server.report import watch_records

        watch_records(done.is_set, state_dir, opts.rounds, console)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        flwr_run_simulation(
            simulation_app(run_config),
            client_app(out, cache, threads=1, devices=opts.devices),
            opts.simulation,
            backend_config=backend,
        )
    finally:
        done.set()
        watcher.join(5)
    return state_dir
