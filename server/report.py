"""Round records for people: a per-round line for the console, ``report.json``, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from edge_client.fsutil import atomic_write_text

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
    return "-" if not n else f"{n / 2**20:.1f} MB"


def round_header() -> str:
    return "".join(name.rjust(width) for name, width in _COLUMNS)


def round_line(record: dict, rounds: int) -> str:
    """One aligned row: round, exact match, losses, clients accepted/replied, bytes up/down, seconds."""
    clients = f"{record['clients_accepted']}/{record['clients_replied']}" if record["round"] else "base"
    if record.get("clients_rejected") or record.get("clients_failed"):
        clients += f" ({record.get('clients_rejected', 0)}r {record.get('clients_failed', 0)}f)"
    cells = (
        f"{record['round']}/{rounds}",
        _fmt(record.get("exact_match"), ".1%"),
        _fmt(record.get("heldout_loss"), ".4f"),
        _fmt(record.get("train_loss"), ".4f"),
        clients,
        _mb(record.get("bytes_up")),
        _mb(record.get("bytes_down")),
        _fmt(record.get("seconds"), ".0f"),
    )
    return "".join(cell.rjust(width) for cell, (_, width) in zip(cells, _COLUMNS))


def new_records(state_dir: Path, shown: set[int]) -> list[dict]:
    """Round records in ``state_dir`` whose round is not in ``shown`` yet; their rounds are added to it."""
    from server.state import read_records

    fresh = [r for r in read_records(state_dir) if r["round"] not in shown]
    shown.update(r["round"] for r in fresh)
    return fresh


def build_report(records: list[dict], meta: dict) -> dict:
    """``report.json``: the run's settings and a ``rounds`` list (global metrics plus per-client entries)."""
    keep = (
        "round",
        "exact_match",
        "heldout_loss",
        "train_loss",
        "bytes_up",
        "bytes_down",
        "seconds",
        "clients_replied",
        "clients_accepted",
        "clients_rejected",
        "clients_failed",
        "clients",
        "failures",
    )
    rounds = [{k: r.get(k) for k in keep} for r in sorted(records, key=lambda r: r["round"])]
    base, last = (rounds[0], rounds[-1]) if rounds else ({}, {})
    return {
        **meta,
        "base_exact_match": base.get("exact_match"),
        "final_exact_match": last.get("exact_match"),
        "base_heldout_loss": base.get("heldout_loss"),
        "final_heldout_loss": last.get("heldout_loss"),
        "rounds": rounds,
    }


def write_report(out_dir: Path, records: list[dict], meta: dict) -> dict:
    """report.json plus rounds.png (global metrics per round) and clients.png (per-client costs per round)."""
    report = build_report(records, meta)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
    try:
        plot_rounds(report, out_dir / "rounds.png")
        plot_clients(report, out_dir / "clients.png")
    except ImportError:
        report["plots"] = "matplotlib is not installed: pip install matplotlib"
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(report: dict, path: Path) -> None:
    plt = _pyplot()
    rounds = report["rounds"]
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [_pct(r["exact_match"]) for r in rounds], "o-")
    axes[0].set(title="global adapter: exact match (held-out)", xlabel="round", ylabel="%", ylim=(0, 100))
    axes[1].plot(x, [r["heldout_loss"] for r in rounds], "o-", label="held-out")
    axes[1].plot(x, [r["train_loss"] for r in rounds], "s--", label="train (clients)")
    axes[1].set(title="loss", xlabel="round", yscale="log")
    axes[1].legend()
    axes[2].bar([i - 0.2 for i in x], [(r["bytes_up"] or 0) / 2**20 for r in rounds], 0.4, label="up")
    axes[2].bar([i + 0.2 for i in x], [(r["bytes_down"] or 0) / 2**20 for r in rounds], 0.4, label="down")
    axes[2].set(title="bytes per round (all clients)", xlabel="round", ylabel="MB")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_clients(report: dict, path: Path) -> None:
    plt = _pyplot()
    names = sorted({c["name"] for r in report["rounds"] for c in r.get("clients") or []})
    panels = (
        ("exact_match", "exact match on its held-out data (%)", _pct),
        ("train_seconds", "training s", None),
        ("startup_seconds", "fixed cost: process start s", None),
        ("peak_rss_mb", "peak RSS MB", None),
        ("energy_j", "training energy J (see energy_method)", None),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(20, 3.6))
    for ax, (key, title, fn) in zip(axes, panels):
        for name in names:
            pts = [
                (r["round"], c.get(key))
                for r in report["rounds"]
                for c in r.get("clients") or []
                if c["name"] == name and c.get(key) is not None
            ]
            if pts:
                ax.plot([p[0] for p in pts], [fn(p[1]) if fn else p[1] for p in pts], "o-", label=name)
        ax.set(title=title, xlabel="round")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v):
    return None if v is None else 100 * v
