"""The Flower ServerApp: resume or start the federation's state, run the rounds, write the final adapter.

Its settings arrive as the run config that ``fedge server start`` writes into the Flower app it submits
(keys in :class:`RunKeys`). The ``server`` package imports without torch; only building the first adapter
and writing the final one load the model, lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.common import wire
from fedge.server.state import ServerState
from fedge.server.strategy import FedgeAvg, RoundPolicy

app = ServerApp()
log = logging.getLogger("fedge.server")
FINAL_ADAPTER = "final-adapter"


class RunKeys:
    """Run-config keys (beyond :class:`fedge.common.wire.RoundSettings`'s, which travel unchanged)."""

    ROUNDS = "num-server-rounds"
    STATE_DIR = "state-dir"
    CACHE_DIR = "cache-dir"
    MIN_CLIENTS = "min-clients"
    DEADLINE = "round-deadline-s"
    NORM_FACTOR = "norm-factor"
    SERVER_LR = "server-lr"


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context.run_config)


def simulation_app(run_config: dict) -> ServerApp:
    """A ServerApp with its run config given here (Flower's ``run_simulation`` takes none)."""
    sim = ServerApp()
    sim.main()(lambda grid, context: run_federation(grid, {**context.run_config, **run_config}))
    return sim


def run_federation(grid: Grid, cfg) -> None:
    """Resume or start the state in ``cfg[state-dir]``, run the remaining rounds, write the final adapter."""
    settings = wire.RoundSettings.from_config(cfg)
    state_dir = Path(str(cfg[RunKeys.STATE_DIR]))
    policy = RoundPolicy(
        int(cfg[RunKeys.MIN_CLIENTS]),
        float(cfg[RunKeys.DEADLINE]),
        float(cfg[RunKeys.NORM_FACTOR]),
        float(cfg.get(RunKeys.SERVER_LR, 1.0)),
    )
    state = ServerState.load(state_dir)
    if state is None:
        state = ServerState(settings.defining(), arrays=_initial_adapter(settings, cfg))
        state.save(state_dir)
    else:
        state.check_resumable(settings.defining(), state_dir)
        log.warning("resuming from %s after round %d", state_dir, state.round)
    rounds = int(cfg[RunKeys.ROUNDS])
    round_config = settings.to_config()
    FedgeAvg(policy).run(grid, state, rounds, round_config, round_config, save=lambda s: s.save(state_dir))
    _write_final_adapter(state, settings, cfg, state_dir / FINAL_ADAPTER)


def _initial_adapter(settings: wire.RoundSettings, cfg) -> dict:
    from fedge.common.modeling import ModelHolder

    holder = ModelHolder(Path(str(cfg[RunKeys.CACHE_DIR])), precision="fp32")
    return holder.initial_adapter(settings.model, settings.lora(), settings.seed)


def _write_final_adapter(state: ServerState, settings: wire.RoundSettings, cfg, out: Path) -> None:
    """The global adapter as a PEFT directory (loadable by ``fedge eval --adapter``), with its round records."""
    from fedge.common import adapters
    from fedge.common.modeling import ModelHolder, set_adapter

    holder = ModelHolder(Path(str(cfg[RunKeys.CACHE_DIR])), precision="fp32")
    session, model = holder.adapter(settings.model, settings.lora(), settings.seed)
    set_adapter(model, state.arrays)
    meta = {
        "model": session.describe(),
        "federation": {"rounds": state.round, "settings": settings.to_config(), "records": state.records},
        "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha, "target_modules": settings.lora_targets},
    }
    adapters.save_adapter(model, out, meta)
