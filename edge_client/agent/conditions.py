"""Run conditions: whether this device may start a round now, and whether a round under way may go on.

A background client is a guest on someone's device. Like Google's production federated learning (train only when
idle, charging and on an unmetered network) and ChromeOS (separate "satisfied to start" and "satisfied to continue"
thresholds, unknown counted as no), each condition has a start threshold and a looser continue threshold, every
reading says where it came from, and a reading that cannot be had is *unknown*: not satisfied unless
``unknown_ok``.

Readers take a filesystem root and a command runner, so each one is tested on fixture sysfs trees and captured
command output (tests/test_conditions.py):

- power: ``/sys/class/power_supply`` (AC online, battery capacity and status); a Raspberry Pi's under-voltage
  flag (``vcgencmd get_throttled``); no supply at all is a mains-powered desktop, server or board;
- heat: the hottest thermal zone or hwmon sensor; a Pi's throttling and soft temperature limit flags;
- network: NetworkManager's metered property of the default route's interface (``nmcli``), else an allow-list of
  interfaces;
- load: other processes' share of the CPUs, kept under a threshold for ``idle_minutes`` (`LoadHistory`);
- time window, free memory, free disk.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fedge.common.settings import setting

Runner = Callable[[Sequence[str]], str]  # a command -> its stdout; OSError or CalledProcessError if it fails


def run_command(cmd: Sequence[str]) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=5, check=True).stdout


@dataclass
class RunConditions:
    """When the device may train: ``[conditions]`` in the agent's config file. Percentages 0-100, degrees C."""

    require_ac: bool = setting(False, "start only on mains power")
    min_battery: float = setting(50.0, "battery % a round may start at off mains power")
    min_battery_continue: float = setting(30.0, "battery % below which a round under way stops")
    max_temp: float = setting(75.0, "hottest sensor (°C) a round may start at")
    max_temp_continue: float = setting(85.0, "hottest sensor (°C) above which a round under way stops")
    allow_metered: bool = setting(False, "train and upload on a metered network (LTE, a phone's hotspot)")
    interfaces: list[str] = setting([], "without NetworkManager: the interfaces that are not metered (e.g. eth0)")
    max_load: float = setting(25.0, "other processes' CPU use (% of all cores) a round may start under")
    max_load_continue: float = setting(60.0, "other processes' CPU use (%) above which a round under way stops")
    idle_minutes: float = setting(5.0, "how long the load must have stayed under max_load before a round starts")
    window: str = setting("", "hours a round may run in, HH:MM-HH:MM local time, may wrap midnight ('': any)")
    min_free_memory_mb: float = setting(0.0, "free memory a round needs to start (0: no check)")
    min_free_disk_mb: float = setting(1024.0, "free disk in the state directory a round needs to start")
    unknown_ok: bool = setting(False, "treat a condition that cannot be read on this device as satisfied")
    source: Path | None = setting(
        None, "a JSON file of readings to use instead of this device's sensors, {name: [ok, detail]} with ok true, "
        "false or null (tests, demos)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("min_battery", "min_battery_continue", "max_load", "max_load_continue"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be a percentage in 0..100, got {getattr(self, name)}")
        if self.min_battery_continue > self.min_battery:
            raise ValueError("min_battery_continue must be <= min_battery (continuing is looser than starting)")
        if self.max_load_continue < self.max_load or self.max_temp_continue < self.max_temp:
            raise ValueError("the continue thresholds must be looser than the start ones (max_*_continue >= max_*)")
        for name in ("max_temp", "max_temp_continue", "idle_minutes", "min_free_memory_mb", "min_free_disk_mb"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.window:
            parse_window(self.window)


@dataclass
class Reading:
    """One condition now: satisfied (True/False) or unknown (None), what was read and from where."""

    name: str  # power, heat, network, load, window, memory, disk
    ok: bool | None
    detail: str
    source: str

    def satisfied(self, unknown_ok: bool) -> bool:
        return unknown_ok if self.ok is None else self.ok

    def __str__(self) -> str:
        state = {True: "ok", False: "no", None: "unknown"}[self.ok]
        return f"{self.name}: {state}, {self.detail} ({self.source})"


@dataclass
class Sources:
    """Where the readers look: a filesystem root, a command runner, a clock, free memory and the state directory."""

    root: Path = Path("/")
    run: Runner = run_command
    now: Callable[[], datetime] = datetime.now
    free_memory_mb: Callable[[], float] = lambda: _free_memory_mb()
    state_dir: Path = Path(".")


def check(conditions: RunConditions, device: Sources, load: LoadHistory, starting: bool) -> list[Reading]:
    """Every condition now, with the start thresholds (``starting``) or the continue ones."""
    c = conditions
    if c.source is not None:
        return from_file(c.source)
    readings = [
        power(device, c.require_ac and starting, c.min_battery if starting else c.min_battery_continue),
        heat(device, c.max_temp if starting else c.max_temp_continue),
        network(device, c.allow_metered, c.interfaces),
        load.reading(c.max_load if starting else c.max_load_continue, c.idle_minutes if starting else 0.0),
    ]
    if c.window:
        readings.append(in_window(c.window, device.now()))
    if starting:
        if c.min_free_memory_mb:
            free = device.free_memory_mb()
            readings.append(Reading("memory", free >= c.min_free_memory_mb, f"{free:.0f} MB free, "
                                    f"{c.min_free_memory_mb:.0f} needed", "MemAvailable"))  # fmt: skip
        readings.append(disk(device.state_dir, c.min_free_disk_mb))
    return readings


def from_file(path: Path) -> list[Reading]:
    """Readings from a JSON file ``{name: [ok, detail]}``; an unreadable file is one unknown reading."""
    import json

    try:
        data = json.loads(Path(path).read_text())
        return [Reading(str(name), None if ok is None else bool(ok), str(detail), str(path))
                for name, (ok, detail) in data.items()]  # fmt: skip
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return [Reading("source", None, f"unreadable ({err})", str(path))]


def failing(readings: Sequence[Reading], unknown_ok: bool) -> list[Reading]:
    """The readings that keep the device from training (an unknown one unless ``unknown_ok``)."""
    return [r for r in readings if not r.satisfied(unknown_ok)]


# --- power ----------------------------------------------------------------------------------------------------


def power(device: Sources, require_ac: bool, min_battery: float) -> Reading:
    from fedge.edge_client.device.meters import power_supplies

    supplies = power_supplies(device.root)
    source = "/sys/class/power_supply"
    undervolt = _pi_throttled(device)
    if undervolt is not None and undervolt & 0x1:
        return Reading("power", False, "under-voltage now: the power supply cannot keep up", "vcgencmd get_throttled")
    if not supplies:
        if undervolt is not None:
            return Reading("power", True, "mains-powered board, no under-voltage", "vcgencmd get_throttled")
        return Reading("power", True, "no battery or supply entries: a mains-powered machine", source)
    batteries = [s for s in supplies if s["type"] == "Battery"]
    on_ac = any(s.get("online") for s in supplies if s["type"] != "Battery")
    charging = any(b.get("status") in ("Charging", "Full") for b in batteries)
    if on_ac or (batteries and charging):
        return Reading("power", True, "on mains power", source)
    if not batteries:
        return Reading("power", None, "a supply that reports neither online nor a battery", source)
    capacity = min((b["capacity_pct"] for b in batteries if b.get("capacity_pct") is not None), default=None)
    if capacity is None:
        return Reading("power", None, "on battery, charge unknown", source)
    if require_ac:
        return Reading("power", False, f"on battery ({capacity:.0f}%), mains power required", source)
    ok = capacity >= min_battery
    return Reading("power", ok, f"on battery at {capacity:.0f}% ({'>=' if ok else '<'} {min_battery:.0f}%)", source)


def _pi_throttled(device: Sources) -> int | None:
    """A Raspberry Pi's ``vcgencmd get_throttled`` flags (bit 0 under-voltage, 1 frequency capped, 2 throttled,
    3 soft temperature limit; +16: since boot), or None elsewhere."""
    try:
        out = device.run(["vcgencmd", "get_throttled"])
    except (OSError, subprocess.SubprocessError):
        return None
    key, _, value = out.strip().partition("=")
    try:
        return int(value, 16) if key == "throttled" else None
    except ValueError:
        return None


# --- heat -----------------------------------------------------------------------------------------------------


def heat(device: Sources, max_temp: float) -> Reading:
    from fedge.edge_client.device.inventory import temperatures

    flags = _pi_throttled(device)
    if flags is not None and flags & 0b1110:
        now = [w for bit, w in ((1, "frequency capped"), (2, "throttled"), (3, "soft temperature limit")) if
               flags >> bit & 1]  # fmt: skip
        return Reading("heat", False, ", ".join(now) + " now", "vcgencmd get_throttled")
    temps = temperatures(device.root)
    if not temps:
        return Reading("heat", None, "no thermal zones or hwmon temperature sensors", "/sys/class/thermal, hwmon")
    sensor, hottest = max(temps.items(), key=lambda kv: kv[1])
    ok = hottest <= max_temp
    detail = f"hottest {hottest:.0f}°C ({sensor}) {'<=' if ok else '>'} {max_temp:.0f}°C"
    return Reading("heat", ok, detail, "/sys/class/thermal, hwmon")


# --- network --------------------------------------------------------------------------------------------------


def network(device: Sources, allow_metered: bool, interfaces: Sequence[str]) -> Reading:
    if allow_metered:
        return Reading("network", True, "metered networks allowed", "config")
    iface = default_interface(device.root)
    if iface is None:
        return Reading("network", None, "no default route", "/proc/net/route")
    try:
        metered = device.run(["nmcli", "-g", "GENERAL.METERED", "device", "show", iface]).strip().lower()
    except (OSError, subprocess.SubprocessError):
        metered = ""
    if metered.startswith(("yes", "no")):
        ok = metered.startswith("no")
        return Reading("network", ok, f"{iface} {'not ' if ok else ''}metered ({metered})", "NetworkManager")
    if interfaces:
        ok = iface in interfaces
        return Reading("network", ok, f"{iface} {'is' if ok else 'is not'} in the unmetered interfaces", "config")
    return Reading("network", None, f"{iface}: metered or not is unknown (no NetworkManager, no interfaces list)",
                   "nmcli")  # fmt: skip


def default_interface(root: Path) -> str | None:
    """The interface of the IPv4 default route (``/proc/net/route``: destination 00000000), or None."""
    try:
        lines = (root / "proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) > 2 and cols[1] == "00000000":
            return cols[0]
    return None


# --- load -----------------------------------------------------------------------------------------------------


@dataclass
class LoadHistory:
    """Other processes' CPU use over time: samples of (time s, busy % of all cores excluding this agent's tree).

    ``sample`` takes cumulative CPU seconds (all cores busy, all cores total, this agent's processes) and stores
    the share of the interval since the previous sample; `reading` judges the last ``minutes`` of them.
    """

    keep_s: float = 3600.0
    samples: deque = field(default_factory=deque)
    _last: tuple[float, float, float, float] | None = None

    def sample(self, t: float, busy_s: float, total_s: float, own_s: float) -> None:
        if self._last is not None:
            t0, busy0, total0, own0 = self._last
            span = total_s - total0
            if span > 0:
                other = max(0.0, (busy_s - busy0) - (own_s - own0))
                self.samples.append((t, min(100.0, 100.0 * other / span)))
        self._last = (t, busy_s, total_s, own_s)
        while self.samples and self.samples[0][0] < t - self.keep_s:
            self.samples.popleft()

    def reading(self, max_load: float, minutes: float) -> Reading:
        source = "/proc/stat"
        if not self.samples:
            return Reading("load", None, "not measured yet", source)
        t_end = self.samples[-1][0]
        recent = [v for t, v in self.samples if t >= t_end - max(minutes * 60, 0)]
        covered = t_end - self.samples[0][0] + _interval(self.samples)
        if minutes > 0 and covered < minutes * 60:
            return Reading("load", None, f"measuring: {covered / 60:.1f} of {minutes:g} minutes", source)
        peak = max(recent)
        ok = peak <= max_load
        over = f"over {minutes:g} min" if minutes > 0 else "now"
        return Reading("load", ok, f"others use {peak:.0f}% of the CPUs {over} ({'<=' if ok else '>'} "
                       f"{max_load:.0f}%)", source)  # fmt: skip


def _interval(samples: deque) -> float:
    return samples[1][0] - samples[0][0] if len(samples) > 1 else 0.0


def cpu_seconds(pids: Sequence[int] = ()) -> tuple[float, float, float]:
    """(all cores busy s, all cores total s, CPU s of this process, its children and ``pids``) now: a
    `LoadHistory.sample`'s inputs."""
    import psutil

    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    own = 0.0
    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True) + [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    for proc in {p.pid: p for p in procs}.values():
        try:
            c = proc.cpu_times()
            own += c.user + c.system
        except psutil.Error:
            continue
    return total - idle, total, own


# --- time, memory, disk ---------------------------------------------------------------------------------------


def parse_window(spec: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` -> (start, end) in minutes after midnight; ValueError naming the spec otherwise."""
    try:
        start, end = (datetime.strptime(part.strip(), "%H:%M") for part in spec.split("-"))
    except ValueError:
        raise ValueError(f"window {spec!r}: expected HH:MM-HH:MM, e.g. 22:00-07:00") from None
    return start.hour * 60 + start.minute, end.hour * 60 + end.minute


def in_window(spec: str, now: datetime) -> Reading:
    start, end = parse_window(spec)
    minute = now.hour * 60 + now.minute
    ok = start <= minute < end if start <= end else (minute >= start or minute < end)  # wraps midnight
    return Reading("window", ok, f"{now:%H:%M} is {'inside' if ok else 'outside'} {spec}", "clock")


def disk(path: Path, min_free_mb: float) -> Reading:
    where = next((p for p in (path, *path.resolve().parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free / 2**20
    ok = free >= min_free_mb
    return Reading("disk", ok, f"{free:.0f} MB free in {where} ({'>=' if ok else '<'} {min_free_mb:.0f})", "statvfs")


def _free_memory_mb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**20
