"""Energy of a piece of work: a session samples the device's meters (:mod:`fedge.edge_client.device.meters`) in a
background thread while the work runs, and keeps a timeline of power, CPU, memory and temperature.

Where no meter exists (or one fails mid-run) the energy is an estimate, labelled ``estimated``: this
process's CPU utilisation x a TDP (RAPL's power limit, a known board's, or an assumed 4 W per logical core;
``--tdp-watts`` declares it). An estimate is a model, not a reading: it leaves out idle power and other
processes, and counts CPU time spent spinning as work.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedge.edge_client.device.meters import Meter, board_model, probe_meters, rapl_power_limit_w, select_meters

WATTS_PER_CORE_ASSUMED = 4.0  # estimate's TDP when none is detected or given: a typical loaded core, 2020s CPUs
TIMELINE_KEYS = ("t_s", "power_w", "cpu_pct", "rss_mb", "temp_c")  # s, W, % of one core, MiB, °C (hottest sensor)
_BOARD_TDP_W = {"Raspberry Pi 5": 8.0, "Raspberry Pi 4": 6.0, "Raspberry Pi 3": 4.0, "Jetson Orin Nano": 15.0}


# --- the estimate ---------------------------------------------------------------------------------------------


def detect_tdp(root: Path = Path("/"), board_model: str | None = None) -> tuple[float, str]:
    """(watts, where it came from): RAPL's PL1, a known board, else WATTS_PER_CORE_ASSUMED x logical cores."""
    limit = rapl_power_limit_w(root)
    if limit:
        return limit, "RAPL long-term power limit"
    for name, watts in _BOARD_TDP_W.items():
        if board_model and name in board_model:
            return watts, f"typical loaded power of a {name}"
    cores = psutil.cpu_count() or 1
    return WATTS_PER_CORE_ASSUMED * cores, f"assumed {WATTS_PER_CORE_ASSUMED:g} W x {cores} logical cores"


class EstimateMeter(Meter):
    """Joules = TDP x this process's CPU seconds / logical cores: the work's share of a fully loaded CPU.

    Idle power and other processes are left out on purpose: it estimates what this work costs.
    """

    method, kind = "estimated", "energy"

    def __init__(self, tdp_w: float, source: str) -> None:
        if not tdp_w > 0:
            raise ValueError(f"TDP must be > 0 W, got {tdp_w}")
        self.tdp_w, self.cores = tdp_w, psutil.cpu_count() or 1
        self._proc = psutil.Process()
        self._start = self._cpu_s()
        self.description = f"process CPU utilisation x TDP {tdp_w:g} W ({source})"

    def _cpu_s(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def read(self) -> float:
        return self.tdp_w * (self._cpu_s() - self._start) / self.cores


@functools.cache
def default_meters() -> tuple[list[Meter], tuple[float, str]]:
    """(the meters selected on this device, (TDP watts, its source)); probed once per process."""
    return select_meters(probe_meters()), detect_tdp(board_model=board_model())


# --- the session ------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """A named part of a session: seconds and joules between its start and end."""

    name: str
    start_s: float
    end_s: float
    joules: float
    estimated_joules: float  # the CPU-time estimate over the same span, kept in case the meter fails later


@dataclass
class EnergyResult:
    """What a session measured. ``method`` is "rapl", "pmic+..." or "estimated"; ``note`` explains a fallback."""

    joules: float
    seconds: float
    method: str
    description: str
    note: str | None = None
    phases: dict[str, Phase] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)  # one dict of TIMELINE_KEYS per sample

    @property
    def estimated(self) -> bool:
        return self.method == "estimated"

    @property
    def mean_power_w(self) -> float | None:
        return self.joules / self.seconds if self.seconds > 0 else None


class EnergySession:
    """Samples meters in a background thread while work runs (``with EnergySession() as s: ...; s.result``).

    The CPU-time estimate always runs alongside: if a meter fails mid-run (unplugged, file gone), the result
    falls back to the estimate for the whole session and says so in ``note``. ``phase(name)`` marks a part.
    """

    def __init__(
        self,
        meters: list[Meter] | None = None,
        tdp: tuple[float, str] | None = None,
        interval_s: float = 0.5,
        temperature: Callable[[], float | None] | None = None,
        note: str | None = None,
    ) -> None:
        if meters is None or tdp is None:
            found, detected = default_meters()
            meters = found if meters is None else meters
            tdp = tdp or detected
        self.meters, self.interval_s, self.temperature = meters, interval_s, temperature
        self.tdp = tdp
        self.note, self._failed = note, False
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._proc = psutil.Process()
        self._joules = [0.0] * len(meters)
        self._est = 0.0
        self._row_joules = (0.0, 0.0)  # (meters, estimate) at the last timeline row
        self._prev: list[float] = []
        self.phases: dict[str, Phase] = {}
        self._open: dict[str, tuple[float, float, str, float]] = {}
        self.timeline: list[dict] = []
        self.result: EnergyResult | None = None

    def __enter__(self) -> EnergySession:
        self.estimate = EstimateMeter(*self.tdp)  # counts CPU time from here
        self._t0 = self._last_t = self._row_t = time.monotonic()
        self._prev = [self._safe_first(m) for m in self.meters]
        self._proc.cpu_percent(None)
        self._thread = threading.Thread(target=self._loop, name="fedge-energy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        joules, method = self.totals()
        description = (
            self.estimate.description if method == "estimated" else " + ".join(m.description for m in self.meters)
        )
        seconds = time.monotonic() - self._t0
        if method == "estimated":
            for p in self.phases.values():
                p.joules = p.estimated_joules
        self.result = EnergyResult(joules, seconds, method, description, self.note, self.phases, self.timeline)

    def _safe_first(self, meter: Meter) -> float:
        try:
            return meter.read()
        except Exception as err:  # any meter failure (NVMLError, a file gone): fall back, never crash
            self._fail(meter, err)
            return 0.0

    def _fail(self, meter: Meter, err: Exception) -> None:
        if not self._failed:
            self._failed = True
            t = time.monotonic() - getattr(self, "_t0", time.monotonic())
            self.note = f"the {meter.method} meter stopped working after {t:.1f} s ({err}); energy is estimated"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self, row: bool = True) -> None:
        """Read every meter now (thread-safe); with ``row``, add a timeline row averaging since the last row."""
        with self._lock:
            now = time.monotonic()
            dt = now - self._last_t
            if not self._failed:
                for i, meter in enumerate(self.meters):
                    try:
                        value = meter.read()
                    except Exception as err:  # see _safe_first
                        self._fail(meter, err)
                        break
                    if meter.kind == "energy":  # counters may be shared by sessions: add the change only
                        self._joules[i] += value - self._prev[i]
                    else:  # trapezoid between this and the previous power reading
                        self._joules[i] += (value + self._prev[i]) / 2 * dt
                    self._prev[i] = value
            self._est, self._last_t = self.estimate.read(), now
            if row:
                self._add_row(now)

    def _add_row(self, now: float) -> None:
        joules = (sum(self._joules), self._est)
        used = 1 if self._failed or not self.meters else 0  # the estimate once a meter failed
        watts = (joules[used] - self._row_joules[used]) / max(now - self._row_t, 1e-9)
        self._row_t, self._row_joules = now, joules
        self.timeline.append(
            {
                "t_s": round(now - self._t0, 3),
                "power_w": round(watts, 3),
                "cpu_pct": self._proc.cpu_percent(None),
                "rss_mb": round(self._proc.memory_info().rss / 2**20, 1),
                "temp_c": self._temperature(),
            }
        )

    def _temperature(self) -> float | None:
        try:
            return self.temperature() if self.temperature else None
        except Exception:  # a sensor that fails mid-run leaves a gap in the plot, nothing more
            return None

    def totals(self) -> tuple[float, str]:
        """(joules so far, method) as of the last sample: the meters' sum, or the estimate."""
        if self._failed or not self.meters:
            return self._est, "estimated"
        return sum(self._joules), "+".join(m.method for m in self.meters)

    def begin(self, name: str) -> None:
        """Start the phase ``name`` (see :meth:`end`); :meth:`phase` wraps both around a block."""
        self.sample(row=False)
        self._open[name] = (time.monotonic(), *self.totals(), self._est)

    def end(self, name: str) -> Phase:
        """End the phase ``name``: its seconds and joules (the estimate's if the meter failed inside it)."""
        self.sample(row=False)
        t0, j0, m0, e0 = self._open.pop(name)
        joules, method = self.totals()
        est = self._est - e0
        phase = Phase(name, t0 - self._t0, time.monotonic() - self._t0, joules - j0 if method == m0 else est, est)
        self.phases[name] = phase
        return phase

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record seconds and joules of the enclosed work under ``name``."""
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)
