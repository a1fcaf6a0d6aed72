"""Round records for people: a per-round line for the console, ``report.json``, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.common.fsutil import atomic_write_text
from fedge.server.records import ClientRound, Failure, RoundRecord

if TYPE_CHECKING:
    from rich.console import Console

_COLUMNS = (
    ("round", 6),
    ("exact", 7),
    ("eval loss", 10),
    ("train loss", 11),
    ("clients", 13),
    ("up", 9),
    ("down", 9),
    ("s", 6),
)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mb(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.2f} MB" if n < 2**20 else f"{n / 2**20:.1f} MB"  # encoded updates are often < 1 MB


def round_header() -> str:
    return "".join(name.rjust(width) for name, width in _COLUMNS)


def round_line(record: RoundRecord, rounds: int) -> str:
    """One aligned row: round, exact match, losses, clients accepted/replied, bytes up/down, seconds.

    In an adaptive round (clients that planned, ran as emulated devices or sent encoded changes) a line per
    client follows (`client_line`), then one per failed client.
    """
    clients = f"{record.clients_accepted}/{record.clients_replied}" if record.round else "base"
    if record.clients_rejected or record.clients_failed or record.clients_deferred:
        declined = f" {record.clients_declined}d" if record.clients_declined else ""
        deferred = f" {record.clients_deferred}w" if record.clients_deferred else ""
        clients += f" ({record.clients_rejected}r {record.clients_failed}f{declined}{deferred})"
    cells = (
        f"{record.round}/{rounds}",
        _fmt(record.exact_match, ".1%"),
        _fmt(record.heldout_loss, ".4f"),
        _fmt(record.train_loss, ".4f"),
        clients,
        _mb(record.bytes_up),
        _mb(record.bytes_down),
        _fmt(record.seconds, ".0f"),
    )
    row = "".join(cell.rjust(width) for cell, (_, width) in zip(cells, _COLUMNS))
    trained = [c for c in record.clients if c.steps is not None]
    if not any(c.plan or c.codec or c.device_profile for c in trained):
        return row
    failed = [f"{'':8}{_who(f)}failed: {_last_line(f.reason)}" for f in record.failures]
    return "\n".join([row, *(client_line(c) for c in trained), *failed])


def client_line(c: ClientRound) -> str:
    """A client's round, indented under its round's row: device, plan, steps, codec, bytes up, seconds.

    ``fp32 r16 all 15/15 steps``: the plan's base precision, LoRA rank, trained layers ("top 12": the last 12
    only) and the steps trained of those the round asked for. "-" where the client had no plan.
    """
    plan = c.plan or {}
    requested = plan.get("requested_steps")
    layers = "-" if not plan else ("all" if plan.get("top_layers") is None else f"top {plan['top_layers']}")
    cells = (
        f"{'':8}{c.name:<13}",
        f"{c.device_profile or '-':<17}",
        f"{plan.get('precision', '-'):<5}",
        f"{'r' + str(plan['lora_r']) if 'lora_r' in plan else '-':>4}",
        f"{layers:>7}",
        f"{_fmt(c.steps, '.0f')}{'/' + str(requested) if requested else ''} steps".rjust(13),
        f"  {c.codec or 'fp32':<14}",
        f"{_mb(c.bytes_up)} up".rjust(11),
        f"{_fmt(c.round_seconds, '.0f')} s".rjust(7),
    )
    status = "" if c.accepted is not False else f"  rejected: {_last_line(c.reason)}"
    return "".join(cells) + status


def _who(failure: Failure) -> str:
    if failure.name:
        return f"{failure.name:<13}"
    return f"{'node ' + str(failure.node_id):<13}" if failure.node_id is not None else ""


def _last_line(text, width: int = 100) -> str:
    """The last non-empty line of a (possibly multi-line, traceback) reason, cut to ``width``."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    last = lines[-1] if lines else "-"
    return last if len(last) <= width else last[: width - 3] + "..."


def new_records(state_dir: Path, shown: set[int], done: bool = True) -> list[RoundRecord]:
    """Round records in ``state_dir`` whose round is not in ``shown`` yet; their rounds are added to it.

    Unless ``done``, the latest record waits while it has no evaluation: the next round's train replies may still
    bring it (`ServerSettings.eval_in_train`); it is shown with them, when the next record lands.
    """
    from fedge.server.state import read_records

    records = read_records(state_dir)
    latest = max((r.round for r in records), default=-1)

    def final(r: RoundRecord) -> bool:
        return done or r.round < latest or r.exact_match is not None or r.heldout_loss is not None

    fresh = [r for r in records if r.round not in shown and final(r)]
    shown.update(r.round for r in fresh)
    return fresh


def watch_records(finished, state_dir: Path, rounds: int, console: Console) -> None:
    """Print each round record as it lands, until ``finished()``."""
    import time

    shown: set[int] = set()
    console.print(round_header(), highlight=False, soft_wrap=True)
    with console.status("round 1: the clients score the base model and train") as status:
        while True:
            done = finished()
            for record in new_records(state_dir, shown, done):
                console.print(round_line(record, rounds), highlight=False, soft_wrap=True)
                status.update(f"round {record.round + 1} done; the clients train and score the next adapters")
            if done:
                return
            time.sleep(1.0)


TARGETS = (0.5, 0.8)  # exact match targets the cost to reach is reported for (EdgeFlowerTune's cost to target)


def cumulative_costs(records: list[RoundRecord]) -> list[dict]:
    """Per round, the global adapter's exact match and what the federation had spent by then: ``wall_s`` (the
    rounds' seconds), ``client_s`` (training and scoring, summed over the clients), ``bytes`` (up and down) and
    ``energy_j`` (the clients' training, each by its own energy method)."""
    curve, wall, client_s, nbytes, joules = [], 0.0, 0.0, 0, 0.0
    for r in sorted(records, key=lambda r: r.round):
        wall += r.seconds
        client_s += sum((c.train_seconds or 0) + (c.eval_seconds or 0) for c in r.clients)
        joules += sum(c.energy_j or 0 for c in r.clients)
        nbytes += r.bytes_up + r.bytes_down
        curve.append({"round": r.round, "exact_match": r.exact_match, "wall_s": round(wall, 1),
                      "client_s": round(client_s, 1), "bytes": nbytes, "energy_j": round(joules, 1)})  # fmt: skip
    return curve


def cost_to_target(curve: list[dict], targets: tuple[float, ...] = TARGETS) -> dict:
    """For each exact-match target ("50%": ...), the first point of ``curve`` that reaches it; None if none does."""
    reached = [p for p in curve if p.get("exact_match") is not None]
    return {f"{t:.0%}": next((p for p in reached if p["exact_match"] >= t), None) for t in targets}


def build_report(records: list[RoundRecord], meta: dict) -> dict:
    """``report.json``: the run's settings, the cost to reach each exact-match target (``to_target``), the
    cumulative costs per round (``costs``) and a ``rounds`` list (global metrics plus per-client entries)."""
    rounds = sorted(records, key=lambda r: r.round)
    base, last = (rounds[0], rounds[-1]) if rounds else (None, None)
    costs = cumulative_costs(rounds)
    return {
        **meta,
        "base_exact_match": base and base.exact_match,
        "final_exact_match": last and last.exact_match,
        "base_heldout_loss": base and base.heldout_loss,
        "final_heldout_loss": last and last.heldout_loss,
        "to_target": cost_to_target(costs),
        "costs": costs,
        "rounds": [r.to_dict() for r in rounds],
    }


def write_report(out_dir: Path, records: list[RoundRecord], meta: dict) -> dict:
    """report.json plus rounds.png (global metrics per round) and clients.png (per-client costs per round)."""
    report = build_report(records, meta)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
    try:
        plot_rounds(records, out_dir / "rounds.png")
        plot_clients(records, out_dir / "clients.png")
    except ImportError:
        report["plots"] = "matplotlib is not installed: pip install matplotlib"
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(records: list[RoundRecord], path: Path) -> None:
    plt = _pyplot()
    rounds = sorted(records, key=lambda r: r.round)
    x = [r.round for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [_pct(r.exact_match) for r in rounds], "o-")
    axes[0].set(title="global adapter: exact match (held-out)", xlabel="round", ylabel="%", ylim=(0, 100))
    axes[1].plot(x, [r.heldout_loss for r in rounds], "o-", label="held-out")
    axes[1].plot(x, [r.train_loss for r in rounds], "s--", label="train (clients)")
    axes[1].set(title="loss", xlabel="round", yscale="log")
    axes[1].legend()
    axes[2].bar([i - 0.2 for i in x], [r.bytes_up / 2**20 for r in rounds], 0.4, label="up")
    axes[2].bar([i + 0.2 for i in x], [r.bytes_down / 2**20 for r in rounds], 0.4, label="down")
    axes[2].set(title="bytes per round (all clients)", xlabel="round", ylabel="MB")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# clients.png: (title, the value a client's round entry gives, or None where it has none)
_CLIENT_PANELS = (
    ("exact match on its held-out data (%)", lambda c: _pct(c.exact_match)),
    ("training s", lambda c: c.train_seconds),
    ("fixed cost: process start s", lambda c: c.startup_seconds),
    ("peak RSS MB", lambda c: c.peak_rss_mb),
    ("training energy J (see energy_method)", lambda c: c.energy_j),
    ("planned LoRA rank (adaptive rounds)", lambda c: (c.plan or {}).get("lora_r")),
    ("local steps trained", lambda c: c.steps),
    ("bytes up: its update (MB)", lambda c: None if c.bytes_up is None else c.bytes_up / 2**20),
)


def plot_clients(records: list[RoundRecord], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    entries = [(r.round, c) for r in records for c in r.clients]
    labels = {}  # name -> legend label, with the emulated device when there is one
    for _, c in entries:
        if c.device_profile or c.name not in labels:
            labels[c.name] = f"{c.name} ({c.device_profile})" if c.device_profile else c.name
    colors = {name: f"C{i % 10}" for i, name in enumerate(sorted(labels))}  # a client keeps its color in every panel
    rounds = [r.round for r in records] or [0]
    fig, axes = plt.subplots(2, 4, figsize=(20, 7.2))
    for ax, (title, value) in zip(axes.flat, _CLIENT_PANELS):
        for name in sorted(labels):
            pts = [(rnd, value(c)) for rnd, c in entries if c.name == name and value(c) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[name], label=labels[name])
        if not ax.lines:
            ax.text(0.5, 0.5, "not in these records", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(title=title, xlabel="round", xlim=(min(rounds) - 0.5, max(rounds) + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = [ax for ax in axes.flat if ax.lines]
    if drawn:
        drawn[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v):
    return None if v is None else 100 * v
