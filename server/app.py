"""The Flower ServerApp: resume or start the federation's state, run the rounds, write the final adapter.

Its settings arrive as the run config that ``fedge server start`` writes into the Flower app it submits
(`run_config`). The ``server`` package imports without torch; only building the first adapter
and writing the final one load the model, lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.common import wire
from fedge.common.settings import from_config, to_config
from fedge.server.settings import ServerSettings
from fedge.server.state import ServerState
from fedge.server.strategy import FedgeAvg

app = ServerApp()
log = logging.getLogger("fedge.server")
FINAL_ADAPTER = "final-adapter"


CACHE_DIR = "cache-dir"  # run-config key of the server's model cache; the other keys: RoundSettings', ServerSettings'


def run_config(round_settings: wire.RoundSettings, server: ServerSettings, cache_dir: Path) -> dict:
    """The run config of a federation: the round's settings, the server's, and the model cache."""
    return {**round_settings.to_config(), **to_config(server), CACHE_DIR: str(cache_dir)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context.run_config)


def simulation_app(run_config: dict) -> ServerApp:
    """A ServerApp with its run config given here (Flower's ``run_simulation`` takes none)."""
    sim = ServerApp()
    sim.main()(lambda grid, context: run_federation(grid, {**context.run_config, **run_config}))
    return sim


def run_federation(grid: Grid, cfg) -> None:
    """Resume or start the state in the server's ``state`` directory, run the remaining rounds, write the final
    adapter. ``cfg``: a `run_config`."""
    settings = wire.RoundSettings.from_config(cfg)
    server = from_config(ServerSettings, cfg)
    state_dir = server.state
    state = ServerState.load(state_dir)
    if state is None:
        state = ServerState(settings.defining(), arrays=_initial_adapter(settings, cfg))
        state.save(state_dir)
    else:
        state.check_resumable(settings.defining(), state_dir)
        log.warning("resuming from %s after round %d", state_dir, state.round)
    round_config = settings.to_config()
    strategy = FedgeAvg(server, server.stage_deadline_s(settings.deadline_s))
    strategy.run(grid, state, server.rounds, round_config, round_config, save=lambda s: s.save(state_dir))
    _write_final_adapter(state, settings, cfg, state_dir / FINAL_ADAPTER)


def _initial_adapter(settings: wire.RoundSettings, cfg) -> dict:
    from fedge.common.modeling import ModelHolder

    holder = ModelHolder(Path(str(cfg[CACHE_DIR])), precision="fp32")
    return holder.initial_adapter(settings.model, settings.lora(), settings.seed)


def _write_final_adapter(state: ServerState, settings: wire.RoundSettings, cfg, out: Path) -> None:
    """The global adapter as a PEFT directory (loadable by ``fedge eval --adapter``), with its round records."""
    from fedge.common import adapters
    from fedge.common.modeling import ModelHolder, set_adapter

    holder = ModelHolder(Path(str(cfg[CACHE_DIR])), precision="fp32")
    session, model = holder.adapter(settings.model, settings.lora(), settings.seed)
    set_adapter(model, state.arrays)
    meta = {
        "model": session.describe(),
        "federation": {
            "rounds": state.round,
            "settings": settings.to_config(),
            "records": [r.to_dict() for r in state.records],
        },
        "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha, "target_modules": settings.lora_targets},
    }
    adapters.save_adapter(model, out, meta)
