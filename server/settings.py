"""How the server runs a federation: ``fedge server start``'s flags, a config file's ``[server]`` table, and the
run config its ServerApp reads (with `fedge.common.wire.RoundSettings`, the ``[round]`` table). Defined once here
(`fedge.common.settings`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from fedge.common.settings import setting
from fedge.server.robust import RULES

DEFAULT_STAGE_DEADLINE_S = 1800.0
# What a stage costs on top of a client's own round: Flower starts a ClientApp process per message and
# moves the message both ways (measured 20-40 s per message on 2 busy cores), plus the warm worker's hand-off.
STAGE_SLACK_S = 60.0
CLIENTAPP = "fedge.edge_client.federation.clientapp:app"
OLD_CLIENTAPP = "fedge.edge_client.flower_client:app"
log = logging.getLogger("fedge.server")


@dataclass
class ServerSettings:
    """The federation's server: rounds, who must reply, how updates are merged, where it listens and keeps state."""

    rounds: int = setting(10, "federated rounds")
    min_clients: int = setting(2, "clients needed to start a round and to close it")
    address: str = setting("0.0.0.0:9092", "HOST:PORT the clients connect to")
    state: Path = setting(Path("fedge-server"), "checkpoints and round records (resumes from it after a crash)")
    stage_deadline: float | None = setting(
        None, "seconds a round stage (train, evaluate) waits for replies (default: the round deadline + "
        f"{STAGE_SLACK_S:g} s of Flower overhead, or {DEFAULT_STAGE_DEADLINE_S:g} without one)", metavar="SECONDS",
    )  # fmt: skip
    norm_factor: float = setting(10.0, "reject an update whose change is more than this x the other clients'")
    max_change_rms: float = setting(
        1.0, "reject an update whose change has an RMS per changed entry above this, whatever the others sent "
        "(a round's LoRA change measures ~0.01 here)",
    )  # fmt: skip
    norm_floor: float = setting(
        0.01, "an update is never an outlier against others whose changes are smaller than this RMS: a near-zero "
        "reply cannot get an honest one rejected",
    )  # fmt: skip
    max_share: float = setting(0.5, "no client's share of an aggregate exceeds this (at least 1 / clients)")
    examples_growth: float = setting(
        2.0, "a node's training examples count at most this x what it was counted for in earlier rounds"
    )
    aggregation: str = setting(
        "mean", "how accepted changes combine: mean (FedAvg), trimmed-mean, median (per coordinate) or krum "
        "(Multi-Krum selection, then mean); benchmarks/README.md measures each", choices=RULES,
    )  # fmt: skip
    trim: float = setting(0.2, "trimmed-mean: the fraction of highest and of lowest values dropped per coordinate")
    krum_f: int = setting(
        1, "krum: how many poisoning clients to tolerate (needs 2 f + 3 accepted clients; fewer tolerate fewer)"
    )
    clip_rms: float = setting(0.0, "scale down a change whose RMS per changed entry is above this (0: no clipping)")
    clip_factor: float = setting(
        0.0, "scale down a change whose RMS is above this x the median of the others' (0: no clipping)"
    )
    eval_every: int = setting(1, "score the global adapter every N rounds (and after the last): evaluation is the "
                              "costliest stage after training", metavar="N")  # fmt: skip
    eval_in_train: bool = setting(
        True, "clients score the global adapter they receive before training on it, in the train message: one "
        "message per round instead of a train and an evaluate message (the last round keeps its evaluate stage)",
    )  # fmt: skip
    retry_after: float = setting(
        0.0, "seconds before a client that declined is asked again (0: the next round); a decline then costs the "
        "server no message and the device no wake-up until its window", metavar="SECONDS",
    )  # fmt: skip
    server_lr: float = setting(2.0, "scales the averaged change (1: plain FedAvg; 2 measured best, benchmarks/README)")
    insecure: bool = setting(False, "allow plaintext (no TLS) on an address other than loopback")
    ssl_certfile: Path | None = setting(None, "server certificate (PEM): enables TLS")
    ssl_keyfile: Path | None = setting(None, "server private key (PEM)")
    ssl_ca_certfile: Path | None = setting(None, "CA certificate (PEM) the clients trust")
    auth_key: list[Path] = setting([], "a SuperNode public key allowed to join (repeatable; needs TLS)")
    clientapp: str = setting(CLIENTAPP, "the ClientApp the clients run, MODULE:ATTR (e.g. fedge's in your mods)")

    def __post_init__(self) -> None:
        self.state, self.auth_key = Path(self.state), [Path(k) for k in self.auth_key]
        if self.clientapp == OLD_CLIENTAPP:  # fedge 0.2's path, in config files written before the move
            log.warning("clientapp %s is now %s: update your config (the old path works)", OLD_CLIENTAPP, CLIENTAPP)
            self.clientapp = CLIENTAPP
        for name in ("rounds", "min_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.server_lr}")
        if not (math.isfinite(self.norm_factor) and self.norm_factor > 1):
            raise ValueError(f"norm_factor must be a finite number > 1, got {self.norm_factor}")
        if not (math.isfinite(self.max_change_rms) and self.max_change_rms > 0):
            raise ValueError(f"max_change_rms must be a finite number > 0, got {self.max_change_rms}")
        for name in ("norm_floor", "clip_rms", "clip_factor"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.max_share) and 0 < self.max_share <= 1):
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share}")
        if not (math.isfinite(self.examples_growth) and self.examples_growth >= 1):
            raise ValueError(f"examples_growth must be a finite number >= 1, got {self.examples_growth}")
        if self.aggregation not in RULES:
            raise ValueError(f"aggregation must be one of {', '.join(RULES)}, got {self.aggregation!r}")
        if self.krum_f < 0:
            raise ValueError(f"krum_f must be >= 0, got {self.krum_f}")
        if not (math.isfinite(self.trim) and 0 <= self.trim < 0.5):
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if not (math.isfinite(self.retry_after) and self.retry_after >= 0):
            raise ValueError(f"retry_after must be a finite number of seconds >= 0, got {self.retry_after}")
        if self.stage_deadline is not None and not (math.isfinite(self.stage_deadline) and self.stage_deadline > 0):
            raise ValueError(f"stage_deadline must be a finite number of seconds > 0, got {self.stage_deadline}")
        tls = (self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile)
        if any(tls) and not all(tls):
            raise ValueError("TLS needs all of ssl_certfile, ssl_keyfile and ssl_ca_certfile")
        if self.auth_key and not all(tls):
            raise ValueError("auth_key needs TLS (ssl_certfile, ssl_keyfile, ssl_ca_certfile)")

    def check_merge(self, lora_merge: str) -> None:
        """ValueError if the aggregation rule cannot run with the round's ``lora_merge``."""
        if self.aggregation != "mean" and lora_merge != "zero-pad":
            raise ValueError(
                f"aggregation {self.aggregation} combines changes coordinate by coordinate: it needs "
                f"lora_merge zero-pad, got {lora_merge}"
            )

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    def stage_deadline_s(self, client_deadline_s: float, waves: int = 1) -> float:
        """Seconds a stage waits for replies: ``stage_deadline`` if set, else ``waves`` client deadlines plus the
        slack, or the fixed default when rounds have no deadline.

        ``client_deadline_s`` is the round's `RoundSettings.deadline_s`; ``waves``: how many batches of clients run
        one after another (a simulation with fewer cores than clients).
        """
        if self.stage_deadline is not None:
            return self.stage_deadline
        if client_deadline_s > 0:
            return waves * client_deadline_s + STAGE_SLACK_S
        return DEFAULT_STAGE_DEADLINE_S
