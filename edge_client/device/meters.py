"""Energy meters: each reads one kind of hardware counter or sensor and reports joules or watts.

Methods, best first (``select_meters`` takes the first whole-device meter, else sums the component ones):
  ina3221    NVIDIA Jetson on-board rail monitors (hwmon): the board's input rail when labelled (VDD_IN,
             POM_5V_IN), else the sum of the rails.
  pmic       Raspberry Pi 5 PMIC rails (``vcgencmd pmic_read_adc``): sum of V x A over the rails. The SoC,
             RAM and I/O rails, not the 5 V input: conversion losses and USB devices are not included.
  battery    laptop battery discharge (/sys/class/power_supply, power_now or current_now x voltage_now):
             the whole device, only while it runs on battery.
  rapl       Intel/AMD RAPL energy counters (/sys/class/powercap): CPU package (+ DRAM), or the platform
             (psys) zone where present. Not the rest of the machine.
  nvml       NVIDIA GPU board energy (pynvml).

Every reader takes the filesystem root (tests pass fixture trees) or a command runner (tests pass
captured output), so the parsing that runs in tests is the parsing that runs on devices. Units: readings
are joules (counters) or watts (power meters); sysfs values are converted from µJ, µW, mA, mV, µV, µA.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

Runner = Callable[[Sequence[str]], str]  # runs a command and returns its stdout; raises OSError if it cannot
_RAPL_PERMISSION_FIX = (
    "energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694): run as root, or allow reads until the "
    "next boot with `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj`, or for good with a udev rule "
    '`ACTION=="add", SUBSYSTEM=="powercap", RUN+="/bin/chmod o+r /sys%p/energy_uj"` '
    "in /etc/udev/rules.d/99-fedge-rapl.rules"
)


class MeterUnavailable(Exception):
    """This kind of meter does not exist or cannot be read here; the message says why (and the fix)."""


def run_command(argv: Sequence[str]) -> str:
    """Run a short command (5 s timeout) and return its stdout; OSError if it is missing or fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False)
    except subprocess.TimeoutExpired as err:
        raise OSError(f"{argv[0]} timed out") from err
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)} exited with {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def board_model(root: Path = Path("/")) -> str | None:
    """The device-tree model (Raspberry Pi, Jetson, other ARM boards) or DMI vendor + product (x86)."""
    for rel in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        model = _text_or_none(root / rel)
        if model:
            return model
    vendor, product = (
        _text_or_none(root / "sys/class/dmi/id/sys_vendor"),
        _text_or_none(root / "sys/class/dmi/id/product_name"),
    )
    return " ".join(p for p in (vendor, product) if p) or None


def _text_or_none(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip().strip("\x00").strip()
    except OSError:
        return None


def _read(path: Path) -> str:
    return path.read_text().strip().strip("\x00")


def _read_float(path: Path) -> float:
    return float(_read(path))


class Meter:
    """A source of energy readings. ``kind`` "energy": ``read()`` is cumulative joules; "power": watts now."""

    method: str = ""
    kind: str = "energy"
    whole_device: bool = False  # True: measures the device (or board), not one component
    description: str = ""

    def read(self) -> float:
        raise NotImplementedError


# --- RAPL -----------------------------------------------------------------------------------------------------


class RaplMeter(Meter):
    """RAPL counters: sums the package and DRAM zones (or uses psys alone), wrapping at max_energy_range_uj."""

    method, kind = "rapl", "energy"

    def __init__(self, root: Path = Path("/")) -> None:
        base = root / "sys/class/powercap"
        if not base.is_dir():
            raise MeterUnavailable("no /sys/class/powercap on this machine (no RAPL driver, or a VM)")
        # Zones nest (intel-rapl:0:0 "core" is inside intel-rapl:0 "package-0"); dram and psys are not inside a package.
        zones = {z: _read(z / "name") for z in sorted(base.glob("intel-rapl:*")) if (z / "name").is_file()}
        psys = [z for z, n in zones.items() if n == "psys"]
        self.zones = psys or [z for z, n in zones.items() if n.startswith("package") or n == "dram"]
        if not self.zones:
            raise MeterUnavailable(f"{base} has no package, dram or psys zone")
        self.description = "RAPL " + " + ".join(zones[z] for z in self.zones)
        self._range = [_read_float(z / "max_energy_range_uj") for z in self.zones]
        self._last = [self._raw(z) for z in self.zones]
        self._total_uj = 0.0

    @staticmethod
    def _raw(zone: Path) -> float:
        try:
            return _read_float(zone / "energy_uj")
        except PermissionError:
            raise MeterUnavailable(f"{zone / 'energy_uj'}: permission denied; {_RAPL_PERMISSION_FIX}") from None

    def read(self) -> float:
        """Joules since the meter was created; a counter that went down wrapped once at its range."""
        for i, zone in enumerate(self.zones):
            raw = self._raw(zone)
            delta = raw - self._last[i]
            if delta < 0:
                delta += self._range[i]
            self._total_uj += delta
            self._last[i] = raw
        return self._total_uj / 1e6


def rapl_power_limit_w(root: Path = Path("/")) -> float | None:
    """The package's long-term power limit (PL1, about its TDP) in watts, or None. Often readable without root."""
    for zone in sorted((root / "sys/class/powercap").glob("intel-rapl:*")):
        if zone.name.count(":") != 1:
            continue
        try:
            for c in sorted(zone.glob("constraint_*_name")):
                if _read(c) == "long_term":
                    return _read_float(zone / c.name.replace("_name", "_power_limit_uw")) / 1e6
        except (OSError, ValueError):
            return None
    return None


# --- Jetson INA3221 -------------------------------------------------------------------------------------------

_INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")  # the board's input: the other rails are inside it


class Ina3221Meter(Meter):
    """Jetson rails from the ina3221 hwmon driver: in<i>_input (mV) x curr<i>_input (mA), or power<i>_input (µW)."""

    method, kind, whole_device = "ina3221", "power", True

    def __init__(self, root: Path = Path("/")) -> None:
        channels = []  # (label, voltage file or None, current file or None, power file or None)
        for hw in sorted((root / "sys/class/hwmon").glob("hwmon*")):
            if not (hw / "name").is_file() or _read(hw / "name") != "ina3221":
                continue
            for label_file in sorted(hw.glob("in*_label")):
                i = label_file.name[2:].split("_")[0]
                label = _read(label_file)
                if "sum of" in label.lower() or not (
                    (hw / f"curr{i}_input").is_file() or (hw / f"power{i}_input").is_file()
                ):
                    continue
                power = hw / f"power{i}_input"
                channels.append((label, hw / f"in{i}_input", hw / f"curr{i}_input", power if power.is_file() else None))
        if not channels:
            raise MeterUnavailable("no ina3221 rail monitor in /sys/class/hwmon (not a Jetson)")
        inputs = [c for c in channels if c[0].upper() in _INPUT_RAILS]
        self.channels = inputs or channels
        self.description = "Jetson INA3221 " + " + ".join(c[0] for c in self.channels)
        self.read()

    def read(self) -> float:
        total = 0.0
        for _, volts, amps, power in self.channels:
            if power is not None:
                total += _read_float(power) / 1e6  # µW
            else:
                total += _read_float(volts) * _read_float(amps) / 1e6  # mV x mA
        return total


# --- Raspberry Pi 5 PMIC --------------------------------------------------------------------------------------

_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<unit>[AV])\b[^=]*=\s*(?P<value>[-+0-9.eE]+)\s*[AV]?\s*$")


def parse_pmic(text: str) -> dict[str, tuple[float, float]]:
    """``vcgencmd pmic_read_adc`` output -> {rail: (volts, amps)} for rails with both readings.

    Lines look like ``VDD_CORE_A current(7)=2.12345678A`` and ``VDD_CORE_V volt(15)=0.87654321V`` (also
    ``VDD_CORE_A=2.1A`` on older firmware). Rails with only a voltage (EXT5V_V, BATT_V) are left out.
    """
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m:
            (amps if m["unit"] == "A" else volts)[m["rail"]] = float(m["value"])
    return {rail: (volts[rail], amps[rail]) for rail in sorted(amps) if rail in volts}


class PmicMeter(Meter):
    """Raspberry Pi 5: sum of V x A over the PMIC rails, read with ``vcgencmd pmic_read_adc`` each sample."""

    method, kind, whole_device = "pmic", "power", True

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run
        try:
            rails = parse_pmic(run(["vcgencmd", "pmic_read_adc"]))
        except OSError as err:
            raise MeterUnavailable(f"vcgencmd pmic_read_adc is not available ({err}): not a Raspberry Pi 5") from None
        if not rails:
            raise MeterUnavailable("vcgencmd pmic_read_adc printed no rail currents (firmware too old?)")
        self.description = f"Raspberry Pi 5 PMIC, {len(rails)} rails (SoC/RAM/IO, not the 5 V input)"

    def read(self) -> float:
        rails = parse_pmic(self.run(["vcgencmd", "pmic_read_adc"]))
        if not rails:
            raise OSError("vcgencmd pmic_read_adc printed no rails")
        return sum(v * a for v, a in rails.values())


# --- battery --------------------------------------------------------------------------------------------------


def power_supplies(root: Path = Path("/")) -> list[dict]:
    """Each /sys/class/power_supply entry: name, type, and (batteries) status, capacity %, power W, energy Wh."""
    out = []
    for ps in sorted((root / "sys/class/power_supply").glob("*")):
        info: dict = {"name": ps.name, "type": _read(ps / "type") if (ps / "type").is_file() else None}
        if (ps / "online").is_file():
            info["online"] = _read(ps / "online") == "1"
        if info["type"] == "Battery":
            info["status"] = _read(ps / "status") if (ps / "status").is_file() else None
            info["capacity_pct"] = _read_float(ps / "capacity") if (ps / "capacity").is_file() else None
            info["power_w"] = _battery_power_w(ps)
            info["energy_wh"] = _read_float(ps / "energy_now") / 1e6 if (ps / "energy_now").is_file() else None
        out.append(info)
    return out


def _battery_power_w(ps: Path) -> float | None:
    """power_now (µW), else current_now (µA) x voltage_now (µV); absolute (some report discharge as negative)."""
    if (ps / "power_now").is_file():
        return abs(_read_float(ps / "power_now")) / 1e6
    if (ps / "current_now").is_file() and (ps / "voltage_now").is_file():
        return abs(_read_float(ps / "current_now") * _read_float(ps / "voltage_now")) / 1e12
    return None


class BatteryMeter(Meter):
    """Discharge power of the laptop's batteries: the whole device, valid only while it runs on battery."""

    method, kind, whole_device = "battery", "power", True

    def __init__(self, root: Path = Path("/")) -> None:
        base = root / "sys/class/power_supply"
        supplies = power_supplies(root)
        batteries = [s for s in supplies if s["type"] == "Battery"]
        if not batteries:
            raise MeterUnavailable(f"no battery in {base}" if base.is_dir() else "no /sys/class/power_supply")
        if any(s.get("online") for s in supplies if s["type"] != "Battery") or not any(
            s["status"] == "Discharging" for s in batteries
        ):
            raise MeterUnavailable("on mains power: a battery measures the device only while discharging (unplug)")
        self.paths = [base / s["name"] for s in batteries if s["power_w"] is not None]
        if not self.paths:
            raise MeterUnavailable("the battery reports neither power_now nor current_now and voltage_now")
        self.description = "battery discharge " + " + ".join(p.name for p in self.paths)

    def read(self) -> float:
        watts = [_battery_power_w(p) for p in self.paths]
        if any(w is None for w in watts):
            raise OSError("the battery's power files disappeared")
        return sum(w for w in watts if w is not None)


# --- NVML -----------------------------------------------------------------------------------------------------


class NvmlMeter(Meter):
    """NVIDIA GPUs' total energy counters (mJ, Volta and newer) through pynvml, summed over the GPUs."""

    method, kind = "nvml", "energy"

    def __init__(self) -> None:
        try:
            import pynvml  # optional: only machines with an NVIDIA driver have it

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._start = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        except ImportError:
            raise MeterUnavailable("pynvml is not installed (pip install nvidia-ml-py) or no NVIDIA GPU") from None
        except Exception as err:  # pynvml raises its own NVMLError for no driver/no GPU/unsupported
            raise MeterUnavailable(f"NVML cannot read GPU energy ({err})") from None
        if not self.handles:
            raise MeterUnavailable("NVML found no GPU")
        self.description = f"NVML energy counters of {len(self.handles)} GPU(s)"

    def read(self) -> float:
        now = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        return sum(n - s for n, s in zip(now, self._start)) / 1e3  # mJ


# --- choosing ---------------------------------------------------------------------------------------------------


def probe_meters(root: Path = Path("/"), run: Runner = run_command, nvml: bool = True) -> list[Meter | str]:
    """Try every real meter: a Meter for each that works here, else the reason (prefixed with its method)."""
    makers: list[tuple[str, Callable[[], Meter]]] = [
        ("ina3221", lambda: Ina3221Meter(root)),
        ("pmic", lambda: PmicMeter(run)),
        ("battery", lambda: BatteryMeter(root)),
        ("rapl", lambda: RaplMeter(root)),
    ]
    if nvml:
        makers.append(("nvml", NvmlMeter))
    found: list[Meter | str] = []
    for method, make in makers:
        try:
            found.append(make())
        except MeterUnavailable as err:
            found.append(f"{method}: {err}")
        except (OSError, ValueError) as err:
            found.append(f"{method}: unreadable ({err})")
    return found


def select_meters(found: Sequence[Meter | str]) -> list[Meter]:
    """The first whole-device meter alone, else every component meter (RAPL + NVML add up), else none."""
    meters = [m for m in found if isinstance(m, Meter)]
    whole = [m for m in meters if m.whole_device]
    return whole[:1] or meters
