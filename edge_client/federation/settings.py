"""This device's side of the federation: ``fedge client start``'s device flags, a config file's ``[device]`` table,
and the SuperNode's node config the ClientApp reads. Defined once (`fedge.common.settings`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fedge.common.settings import from_config, setting, to_config
from fedge.quantization import PRECISIONS


@dataclass
class Device:
    """This device's side of the federation: ``fedge client start``'s device flags, a config file's ``[device]``
    table, and the SuperNode's node config the ClientApp reads (`fedge.common.settings`)."""

    name: str = setting("", "how the server's records name this client (default: from --data)")
    data: str = setting("", "this device's training data: a JSONL/CSV/TXT file or demo:DOMAIN")
    eval_data: str | None = setting(None, "held-out data (default: 10%% of --data)")
    state_dir: Path | None = setting(
        None, "local work and checkpoints (default: ~/.fedge/clients/NAME)", flag="--state"
    )
    cache_dir: Path | None = setting(None, "the model cache (default: fedge's; `fedge --cache-dir`)")
    precision: str = setting("auto", "base weights", choices=PRECISIONS)
    threads: int = setting(0, "torch threads (0: all cores)")
    worker_port: int = setting(0, "the warm worker's loopback port (0: the ClientApp process does the work)")
    profile: str = setting(
        "", "run as an emulated device: pi4-2gb, pi5-8gb, jetson-orin-nano, laptop, a .json/.toml file, or key=value "
        "text such as base=pi5-8gb,slowdown=2 (its speed, memory cap and link; see edge_client/device/emulated.py)",
        flag="--device-profile", metavar="SPEC",
    )  # fmt: skip
    # How an emulated device's extra time passes: "wall" sleeps it (a real federation sees the slow device);
    # "virtual" adds it to the device's clock without sleeping (benchmarks: the deadline still binds).
    emulated_time: str = setting(
        "wall", "with --device-profile: sleep the device's slowness and link time (wall), or count them on its "
        "clock without sleeping (virtual: several emulated devices on one machine)", choices=("wall", "virtual"),
    )  # fmt: skip
    energy_budget_j: float = setting(
        0.0, "joules this device may spend on a round's training (0: no limit): the plan fits it, and training stops "
        "before the step that would pass it", flag="--energy-budget-j", metavar="J",
    )  # fmt: skip
    turns: str = setting(
        "", "clients sharing this machine's cores take turns: at most N of the clients naming the directory DIR do a "
        "round's work at once (fedge demo: one per core)", metavar="DIR:N",
    )  # fmt: skip

    def __post_init__(self) -> None:
        from fedge.common.models import default_cache_dir

        self.name = self.name or Path(self.data).stem.replace("demo:", "") or "client"
        self.state_dir = Path(self.state_dir or Path.home() / ".fedge" / "clients" / self.name)
        self.cache_dir = Path(self.cache_dir or default_cache_dir())
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not (math.isfinite(self.energy_budget_j) and self.energy_budget_j >= 0):
            raise ValueError(f"energy_budget_j must be a finite number >= 0, got {self.energy_budget_j}")
        if not 0 <= self.worker_port < 65536:
            raise ValueError(f"worker_port must be in 0..65535, got {self.worker_port}")
        if self.emulated_time not in ("wall", "virtual"):
            raise ValueError(f"emulated_time must be wall or virtual, got {self.emulated_time!r}")
        if self.turns:
            from fedge.edge_client.federation.turns import parse_turns

            parse_turns(self.turns)  # ValueError saying what is expected

    @classmethod
    def from_node_config(cls, config) -> Device:
        """From the SuperNode's node config (Flower adds keys of its own, which are left alone)."""
        device = from_config(cls, config)
        if not device.data:
            raise ValueError("the node config has no 'data': start the client with `fedge client start`")
        return device

    def to_node_config(self) -> dict:
        return to_config(self)
