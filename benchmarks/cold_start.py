"""Cold-start benchmark: how long the ``fedge`` command takes to answer ``--help`` and ``--version``.

A device owner's first contact with fedge, and what every service restart pays before it does anything. Each
command runs in a fresh process, ``--repeats`` times, in one run; medians with min and max. Baselines in the
same run: the interpreter alone (``python -c pass``: the floor) and ``python -c "import torch"`` (what every
``fedge`` command paid when the CLI imported torch to build its options).

    python benchmarks/cold_start.py [--repeats 7]

Writes benchmarks/results/cold_start.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import update_readme_section, write_results  # noqa: E402

PY = [sys.executable]
COMMANDS = {
    "python -c pass (floor)": [*PY, "-c", "pass"],
    'python -c "import torch" (baseline)': [*PY, "-c", "import torch"],
    "fedge --version": [*PY, "-m", "fedge", "--version"],
    "fedge --help": [*PY, "-m", "fedge", "--help"],
    "fedge client start --help": [*PY, "-m", "fedge", "client", "start", "--help"],
    "fedge server start --help": [*PY, "-m", "fedge", "server", "start", "--help"],
}
TARGET_S = 1.0


def time_command(cmd: list[str], repeats: int) -> dict:
    """Wall seconds of ``cmd`` in a fresh process, ``repeats`` times after one untimed warm-up (file cache)."""
    subprocess.run(cmd, capture_output=True, check=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    results = {name: time_command(cmd, args.repeats) for name, cmd in COMMANDS.items()}
    baseline = results['python -c "import torch" (baseline)']["median_s"]
    lines = [
        f"Cold start, {args.repeats} runs each in fresh processes after a warm-up (`python benchmarks/cold_start.py`); "
        f"target: under {TARGET_S:g} s.",
        "",
        "| command | median s | min - max s | of the torch-import baseline |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| `{name}` | {r['median_s']:.2f} | {r['min_s']:.2f} - {r['max_s']:.2f} | {r['median_s'] / baseline:.0%} |"
        )
    path = write_results("cold_start", {"target_s": TARGET_S, "commands": results})
    update_readme_section("cold_start", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
