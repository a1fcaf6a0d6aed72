"""Process memory readings: current and peak resident set size, in MiB."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak RSS since process start or the last :func:`reset_peak_rss` (Linux VmHWM; elsewhere ru_maxrss)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # not on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux: write 5 to /proc/self/clear_refs). False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
