"""Round records: what happened in each round, per client and overall. Written by the strategy, read by the state
file, the CSV, the live table, the report and its plots; stored as ``rounds.json`` (a list of `RoundRecord.to_dict`).

Files written before these classes existed load too: unknown keys are dropped, missing ones take their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fedge.common import wire

log = logging.getLogger("fedge.server")

# How a failure of the evaluation a train reply carries (`ClientRound.prior_evaluation`) begins its reason.
PRIOR_FAILURE = "bad evaluation in the train reply"
# A training reply's MetricRecord key -> the ClientRound field it fills (the rest map by name, hyphens to
# underscores).
_METRIC_FIELDS = {wire.Metric.EXAMPLES: "examples"}
# An evaluation reply's metric -> the field it fills (its own load and start-up costs are kept apart from training's).
_EVAL_FIELDS = {
    wire.Metric.EXACT_MATCH: "exact_match",
    wire.Metric.HELDOUT_LOSS: "heldout_loss",
    wire.Metric.EVAL_EXAMPLES: "eval_examples",
    wire.Metric.STARTUP_SECONDS: "eval_startup_seconds",
    wire.Metric.LOAD_SECONDS: "eval_load_seconds",
    wire.Metric.EVAL_SECONDS: "eval_seconds",
}


# The fields a training reply's metrics may fill: what the client reports about its own work. The others (its
# name, node, acceptance, share, norm, evaluation) are the server's to fill; a metric named like one goes to extra.
_REPORTED = frozenset({
    "examples", "steps", "tokens", "train_loss", "train_seconds", "startup_seconds", "load_seconds", "peak_rss_mb",
    "resumed", "warm", "energy_j", "upload_bytes", "upload_seconds", "round_seconds", "deadline_s",
})  # fmt: skip


@dataclass
class ClientRound:
    """One client's part of a round: who it is, what it reported, and what the server made of its update.

    Seconds, bytes, joules and MiB. A client that only evaluated has no training fields; ``accepted`` is None then.
    """

    name: str
    node_id: int | None = None
    data: str | None = None
    device: str | None = None
    device_profile: str | None = None  # the emulated device, if any
    energy_method: str | None = None
    codec: str | None = None  # how its update travelled ("" or None: the whole fp32 adapter)
    plan: dict | None = None  # the training plan of an adaptive round (fedge.common.wire.TrainingPlan as a dict)
    # what its training reply reported
    examples: float = 0.0
    examples_counted: float | None = None  # what the server weighted it by (a claim grown too fast is capped)
    steps: float | None = None
    tokens: float | None = None
    train_loss: float | None = None
    train_seconds: float | None = None
    startup_seconds: float | None = None
    load_seconds: float | None = None
    peak_rss_mb: float | None = None
    resumed: float | None = None
    warm: float | None = None
    energy_j: float | None = None
    upload_bytes: float | None = None
    upload_seconds: float | None = None
    round_seconds: float | None = None
    deadline_s: float | None = None
    # what the server made of it
    bytes_up: int | None = None
    bytes_down: int | None = None
    delta_rms: float | None = None
    accepted: bool | None = None
    reason: str | None = None
    share: float | None = None  # its weight in the aggregate (after the share cap), if accepted
    clip_scale: float | None = None  # the factor norm clipping scaled its change by, if clipped
    flags: list[str] = field(default_factory=list)  # reported figures that are implausible (kept, not trusted)
    # its evaluation of the new global adapter
    exact_match: float | None = None
    heldout_loss: float | None = None
    eval_examples: float | None = None
    eval_startup_seconds: float | None = None
    eval_load_seconds: float | None = None
    eval_seconds: float | None = None
    extra: dict = field(default_factory=dict)  # metrics a reply sent that fedge has no field for (e.g. your mods')

    @classmethod
    def from_reply(cls, node_id: int, info: dict, metrics: dict, evaluation: bool = False) -> ClientRound:
        """From a reply's CLIENT record (``info``) and METRICS record; an evaluation reply fills the eval fields.

        Both come from the network: ValueError naming the field for a value of the wrong type, a non-finite or
        absurdly large number, an over-long string or a plan that is not one. Nothing here trusts a value's range
        beyond that; what a number may claim (examples, steps) is the strategy's to bound.
        """
        entry = cls(
            name=_text(info, wire.Client.NAME, str(node_id), limit=128),
            node_id=node_id,
            data=_text(info, wire.Client.DATA),
            device=_text(info, wire.Client.DEVICE),
            device_profile=_text(info, wire.Client.PROFILE) or None,
            energy_method=_text(info, wire.Client.ENERGY_METHOD),
            codec=_text(info, wire.Client.CODEC) or None,
        )
        plan = _text(info, wire.Client.PLAN, limit=MAX_PLAN_CHARS)
        if plan:  # an adaptive round: what the device chose
            try:
                entry.plan = wire.TrainingPlan.from_dict(json.loads(plan)).to_dict()
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as err:
                raise ValueError(f"client record {wire.Client.PLAN!r}: not a training plan ({str(err)[:80]})") from None
        if len(metrics) > MAX_METRICS:
            raise ValueError(f"metrics: {len(metrics)} entries, at most {MAX_METRICS}")
        if not evaluation:  # the evaluation a train reply carries is `prior_evaluation`'s
            metrics = {k: v for k, v in metrics.items() if not k.startswith(wire.Metric.PRIOR)}
        for key, value in metrics.items():
            value = _number(key, value)
            name = (_EVAL_FIELDS if evaluation else _METRIC_FIELDS).get(key, key.replace("-", "_"))
            if name in (_EVAL_FIELDS.values() if evaluation else _REPORTED):
                setattr(entry, name, value)
            else:  # a metric fedge has no field for, or one naming a field the server fills (kept aside, never used)
                entry.extra[key] = value
        entry.examples = float(entry.examples or 0)
        return entry

    @classmethod
    def prior_evaluation(cls, node_id: int, info: dict, metrics: dict) -> ClientRound | None:
        """The evaluation of the received adapter a train reply carries (`wire.Cfg.SCORE_FIRST`), as an evaluate
        reply's entry; None if it carries none. ValueError as `from_reply`."""
        n = len(wire.Metric.PRIOR)
        prior = {k[n:]: v for k, v in metrics.items() if isinstance(k, str) and k.startswith(wire.Metric.PRIOR)}
        return cls.from_reply(node_id, info, prior, evaluation=True) if prior else None

    def add_evaluation(self, evaluated: ClientRound) -> None:
        """Fold this client's evaluation of the new global adapter (from `from_reply(..., evaluation=True)`) in."""
        for name in _EVAL_FIELDS.values():
            if getattr(evaluated, name) is not None:
                setattr(self, name, getattr(evaluated, name))
        self.extra.update({f"eval-{k}": v for k, v in evaluated.extra.items()})

    @classmethod
    def from_dict(cls, data: dict) -> ClientRound:
        return _from_dict(cls, data)


@dataclass
class Failure:
    """A client that sent no usable reply in a stage: its node, its name once known, and why."""

    node_id: int | None
    name: str | None
    reason: str
    declined: bool = False  # the client sat the round out on purpose (its run conditions, its plan), with a reason
    retry_after_s: float | None = None  # a decline: the server asks the node again after this many seconds

    @classmethod
    def from_dict(cls, data: dict) -> Failure:
        return _from_dict(cls, {"node_id": None, "name": None, "reason": "", **data})

    @classmethod
    def from_error(cls, node_id: int | None, name: str | None, reason: str) -> Failure:
        """From a Flower error reply's reason; an exception the ClientApp raised reads
        ``<class 'MODULE.NAME'>:<'TEXT'>``: its text is the reason, and `RoundDeclined` makes it a decline."""
        raised = _RAISED.match(reason)
        if raised is None:
            return cls(node_id, name, one_line(reason))
        kind, text = raised.group(1).rsplit(".", 1)[-1], raised.group(2)
        if kind == "RoundDeclined":
            return cls(node_id, name, one_line(text), declined=True)
        return cls(node_id, name, one_line(f"{kind}: {text}"))


def one_line(reason: str, limit: int = 500) -> str:
    """A failure's reason as the records, the table and the report show it: one line. A traceback (a ClientApp
    that sent its own) becomes its last line, the exception and its message; the whole text goes to the log."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    if len(lines) > 1:
        log.info("a client's error in full:\n%s", reason[:20000])
    return (lines[-1] if lines else "")[:limit]


@dataclass
class RoundRecord:
    """One round: the global adapter's held-out figures (example-weighted over the evaluating clients), the
    clients' mean train loss, counts, bytes, seconds, and each client's part. Round 0 scores the initial adapter."""

    round: int
    exact_match: float | None = None
    exact_match_min: float | None = None  # the spread over the evaluating clients
    exact_match_max: float | None = None
    heldout_loss: float | None = None
    train_loss: float | None = None
    clients_replied: int = 0
    clients_accepted: int = 0
    clients_rejected: int = 0
    clients_failed: int = 0
    clients_declined: int = 0  # of the failed: sat the round out on purpose (see Failure.declined)
    clients_deferred: int = 0  # not asked this round: they declined an earlier one and their retry window is open
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    clients: list[ClientRound] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    CSV_COLUMNS = (
        "round", "exact_match", "heldout_loss", "train_loss", "clients_replied", "clients_accepted",
        "clients_rejected", "clients_failed", "bytes_up", "bytes_down", "seconds",
    )  # fmt: skip

    @classmethod
    def summarize(
        cls,
        rnd: int,
        clients: list[ClientRound],
        evals: list[ClientRound],
        failures: list[Failure],
        seconds: float,
        deferred: int = 0,
    ) -> RoundRecord:
        """The round's record from its trained clients, the clients' evaluations and the failures."""
        by_node = {(c.node_id, c.name): c for c in clients}  # a name is the client's word: the node keeps them apart
        for e in evals:
            by_node.setdefault((e.node_id, e.name), ClientRound(e.name, e.node_id, e.data)).add_evaluation(e)
        weights = [e.eval_examples or 0 for e in evals]
        accepted = [c for c in clients if c.accepted]
        scores = [e.exact_match for e, w in zip(evals, weights) if e.exact_match is not None and w > 0]
        return cls(
            round=rnd,
            exact_match=_weighted([e.exact_match for e in evals], weights),
            exact_match_min=min(scores, default=None),
            exact_match_max=max(scores, default=None),
            heldout_loss=_weighted([e.heldout_loss for e in evals], weights),
            train_loss=_weighted([c.train_loss for c in accepted], [c.examples for c in accepted]),
            clients_replied=len(clients),
            clients_accepted=len(accepted),
            clients_rejected=sum(1 for c in clients if c.accepted is False),
            clients_failed=len(failures),
            clients_declined=sum(1 for f in failures if f.declined),
            clients_deferred=deferred,
            bytes_up=int(sum(c.bytes_up or 0 for c in clients)),
            bytes_down=int(sum(c.bytes_down or 0 for c in clients)),
            seconds=round(seconds, 2),
            clients=sorted(by_node.values(), key=lambda c: (c.name, c.node_id or 0)),
            failures=failures,
        )

    def with_evaluations(self, evals: list[ClientRound], failures: list[Failure]) -> RoundRecord:
        """This record with its global adapter's evaluations, made after it was written (the next round's train
        replies carry them: `wire.Cfg.SCORE_FIRST`); the failures are those of the stage that carried them."""
        clients = [dataclasses.replace(c, extra=dict(c.extra)) for c in self.clients]
        kept = [f for f in self.failures if not f.reason.startswith(PRIOR_FAILURE)]  # scored again after a resume
        return RoundRecord.summarize(self.round, clients, evals, kept + failures, self.seconds, self.clients_deferred)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def csv_row(self) -> dict:
        return {k: getattr(self, k) for k in self.CSV_COLUMNS}

    @classmethod
    def from_dict(cls, data: dict) -> RoundRecord:
        record = _from_dict(cls, data)
        record.clients = [ClientRound.from_dict(c) for c in data.get("clients") or []]
        record.failures = [Failure.from_dict(f) for f in data.get("failures") or []]
        return record


def _from_dict(cls: type, data: dict) -> Any:
    """``cls`` from a dict of its fields; keys of older or newer versions that it does not have are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _weighted(values: list[float | None], weights: list[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


_RAISED = re.compile(r"<class '([\w.]+)'>:<'(.*)'>", re.S)  # Flower's reason for a ClientApp's exception
MAX_PLAN_CHARS = 64 * 1024
MAX_METRICS = 256
MAX_ABS_METRIC = 1e15  # bytes, joules, seconds, tokens: anything above is a lie or a bug


def _text(info: dict, key: str, default: str | None = None, limit: int = 1024) -> str | None:
    """A string field of a client record (None/``default`` if absent); ValueError if it is not a short string."""
    value = info.get(key)
    if value is None:
        return default
    if isinstance(value, str) and len(value) <= limit:
        return value
    what = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
    raise ValueError(f"client record {key!r}: expected a string of at most {limit} characters, got {what}")


def _number(key: str, value: object) -> float | int:
    """A metric: a finite int or float of at most MAX_ABS_METRIC in size; ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {key!r}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or abs(value) > MAX_ABS_METRIC:
        raise ValueError(f"metric {key!r}: {value} is not a finite number of at most {MAX_ABS_METRIC:g}")
    return value
