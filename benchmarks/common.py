"""Helpers shared by the benchmark scripts: run a worker in a fresh process, write results and tables."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"  # one current file per benchmark, nothing else
EXPLORATION = Path(tempfile.gettempdir()) / "fedge-benchmarks"  # where exploration runs write unless told
README = Path(__file__).parent / "README.md"


def run_worker(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --worker ...`` in its own process (so its peak RSS is its own) and parse its JSON line."""
    done = subprocess.run(
        [sys.executable, str(script), "--worker", *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_out_argument(parser: argparse.ArgumentParser, runs: str) -> None:
    """``--out DIR``: the folder ``runs`` (exploration runs) write their results to, outside benchmarks/results/."""
    parser.add_argument(
        "--out",
        type=_exploration_dir,
        metavar="DIR",
        default=EXPLORATION,
        help=f"folder for {runs}, default {EXPLORATION}: benchmarks/results/ holds only each benchmark's current "
        "file; to keep such a run, pass --out benchmarks/results/archive and add its line to the README.md there",
    )


def _exploration_dir(value: str) -> Path:
    path = Path(value)
    if path.resolve() == RESULTS.resolve():
        raise argparse.ArgumentTypeError("benchmarks/results/ holds the current files only; keep others in archive/")
    return path


def write_results(name: str, data: dict, folder: Path = RESULTS) -> Path:
    """Write ``folder/name.json``; ``folder`` is benchmarks/results/ for a benchmark's current file."""
    from fedge.common.fsutil import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def update_readme_section(name: str, markdown: str) -> None:
    """Replace the section between ``<!-- name:start -->`` and ``<!-- name:end -->`` in benchmarks/README.md."""
    from fedge.common.fsutil import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(README, text)
