"""What this device is: CPU, ISA features, memory, accelerators, board, power source, sensors, software.

Readers take the filesystem root (tests pass fixture trees). A value that cannot be known here is a
:class:`Missing` with its reason; :func:`split_missing` turns a tree into plain JSON (``null`` there) plus a
``{"dotted.path": reason}`` map, so every ``null`` a program sees has its reason next to it.
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedge.edge_client.device import energy, meters
from fedge.edge_client.device.meters import board_model

# ISA features that matter for matmuls, as /proc/cpuinfo names them -> how people name them.
_ISA = {
    "sse4_2": "SSE4.2", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX-512F",
    "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "avx_vnni": "AVX-VNNI",
    "neon": "NEON", "asimd": "NEON", "asimdhp": "NEON-FP16", "asimddp": "NEON-DOTPROD", "bf16": "BF16",
    "i8mm": "I8MM", "sve": "SVE", "sve2": "SVE2",
}  # fmt: skip
_ARM_PARTS = {  # /proc/cpuinfo "CPU part" of ARM Ltd (implementer 0x41) cores found on edge boards
    "0xd03": "Cortex-A53", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd05": "Cortex-A55",
    "0xd0b": "Cortex-A76", "0xd42": "Cortex-A78AE", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1",
}  # fmt: skip
_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "flwr", "fedge")


@dataclass(frozen=True)
class Missing:
    """A value this device does not have or does not expose, and why."""

    reason: str


def split_missing(tree, path: str = "") -> tuple[object, dict[str, str]]:
    """(tree with every Missing replaced by None, {dotted path: reason})."""
    if isinstance(tree, Missing):
        return None, {path: tree.reason}
    reasons: dict[str, str] = {}
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out[key], sub = split_missing(value, f"{path}.{key}" if path else str(key))
            reasons.update(sub)
        return out, reasons
    if isinstance(tree, list):
        items = []
        for i, value in enumerate(tree):
            item, sub = split_missing(value, f"{path}[{i}]")
            items.append(item)
            reasons.update(sub)
        return items, reasons
    return tree, reasons


def _text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip().strip("\x00").strip()
    except OSError:
        return None


def cpuinfo_fields(text: str) -> dict[str, str]:
    """First value of each key in /proc/cpuinfo text (keys lower-cased)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def isa_features(cpuinfo: str) -> list[str]:
    """Matmul-relevant ISA features named in /proc/cpuinfo's flags (x86) or Features (ARM) lines."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return sorted({_ISA[f] for f in flags if f in _ISA})


def cpu(root: Path = Path("/")) -> dict:
    """Model, cores, frequencies (MHz), ISA features and whether bf16 runs natively."""
    from fedge.quantization.backends import cpu_supports_bf16

    text = _text(root / "proc/cpuinfo") or ""
    fields = cpuinfo_fields(text)
    arm = _ARM_PARTS.get(fields.get("cpu part", "")) if fields.get("cpu implementer") == "0x41" else None
    model = fields.get("model name") or arm or fields.get("hardware") or platform.processor()
    freq = psutil.cpu_freq() if root == Path("/") else None
    no_freq = Missing("no cpufreq information (a VM, or no cpufreq driver)")
    return {
        "model": model or Missing("/proc/cpuinfo names no model"),
        "arch": platform.machine(),
        "cores_physical": psutil.cpu_count(logical=False) or Missing("not reported"),
        "cores_logical": psutil.cpu_count(),
        "freq_mhz": {
            "current": round(freq.current) if freq and freq.current else no_freq,
            "max": round(freq.max) if freq and freq.max else no_freq,
        },
        "isa": isa_features(text) if text else Missing("no /proc/cpuinfo"),
        # Other processes' load when the profile starts: above the core count, every figure is a share of the CPU.
        "load_avg_1m": round(psutil.getloadavg()[0], 2),
        "bf16_native": cpu_supports_bf16(text) if text else Missing("no /proc/cpuinfo"),
    }


def board(root: Path = Path("/")) -> dict:
    model = board_model(root)
    tegra = _text(root / "etc/nv_tegra_release")
    return {
        "model": model or Missing("no device-tree model and no DMI product name"),
        "raspberry_pi": bool(model and model.startswith("Raspberry Pi")),
        "jetson": bool(tegra) or bool(model and "Jetson" in model),
        "jetson_release": tegra.splitlines()[0] if tegra else Missing("not a Jetson (no /etc/nv_tegra_release)"),
    }


def accelerators() -> dict:
    """CUDA devices (name, memory MB), and whether Apple MPS is there."""
    import torch

    cuda = (
        [
            {"name": torch.cuda.get_device_name(i), "memory_mb": torch.cuda.get_device_properties(i).total_memory >> 20}
            for i in range(torch.cuda.device_count())
        ]
        if torch.cuda.is_available()
        else Missing("no CUDA device visible to torch")
    )
    return {"cuda": cuda, "mps": torch.backends.mps.is_available()}


def memory() -> dict:
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    return {
        "ram_total_mb": vm.total >> 20,
        "ram_available_mb": vm.available >> 20,
        "swap_total_mb": swap.total >> 20,
    }


def power(root: Path = Path("/")) -> dict:
    """Power source ("battery", "mains") and battery state, from /sys/class/power_supply."""
    supplies = meters.power_supplies(root)
    if not supplies:
        reason = "no /sys/class/power_supply entries (a desktop, server or VM)"
        return {"source": Missing(reason), "battery": Missing(reason)}
    batteries = [s for s in supplies if s["type"] == "Battery"]
    mains = any(s.get("online") for s in supplies if s["type"] != "Battery")
    discharging = any(b.get("status") == "Discharging" for b in batteries)
    return {
        "source": "battery" if discharging and not mains else "mains",
        "battery": batteries[0] if batteries else Missing("no battery (mains-powered device)"),
    }


def temperatures(root: Path = Path("/")) -> dict[str, float]:
    """Temperatures in °C by sensor: thermal zones (type) and hwmon temp inputs (name/label); millidegrees read."""
    temps: dict[str, float] = {}
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        value, kind = _text(zone / "temp"), _text(zone / "type") or zone.name
        if value and value.lstrip("-").isdigit():
            temps[kind] = int(value) / 1000
    for hw in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        name = _text(hw / "name") or hw.name
        for inp in sorted(hw.glob("temp*_input")):
            value = _text(inp)
            label = _text(hw / inp.name.replace("_input", "_label")) or inp.name.split("_")[0]
            if value and value.lstrip("-").isdigit():
                temps[f"{name}/{label}"] = int(value) / 1000
    return temps


def max_temperature(root: Path = Path("/")) -> float | None:
    """The hottest sensor now (°C), or None without sensors: the profile timeline's temperature."""
    temps = temperatures(root)
    return max(temps.values()) if temps else None


def software(root: Path = Path("/")) -> dict:
    os_release = _text(root / "etc/os-release") or ""
    pretty = next(
        (line.split("=", 1)[1].strip('"') for line in os_release.splitlines() if line.startswith("PRETTY")), None
    )
    versions: dict[str, object] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = Missing("not installed")
    return {"os": pretty or platform.platform(), "kernel": platform.release(), "versions": versions}


def quantization_backends() -> dict:
    """For each precision: "ok" or why not here (the real checks of `fedge.quantization.backends`), and auto's pick."""
    from fedge.quantization.backends import PRECISIONS, BackendUnavailable, pick_device, resolve_precision

    device = pick_device("auto")
    out: dict[str, object] = {"device": str(device), "auto": resolve_precision("auto", device)}
    for precision in PRECISIONS[1:]:
        try:
            resolve_precision(precision, device)
            out[precision] = "ok"
        except BackendUnavailable as err:
            out[precision] = Missing(str(err))
    return out


def energy_meters(root: Path = Path("/"), run: meters.Runner = meters.run_command) -> dict:
    """Which meters work here (method -> description) and why the others do not (method -> reason)."""
    found = meters.probe_meters(root, run)
    tdp_w, tdp_source = energy.detect_tdp(root, board_model(root))
    return {
        "available": {m.method: m.description for m in found if isinstance(m, meters.Meter)},
        "unavailable": dict(s.split(": ", 1) for s in found if isinstance(s, str)),
        "selected": [m.method for m in meters.select_meters(found)] or ["estimated"],
        "tdp_w": tdp_w,
        "tdp_source": tdp_source,
    }


def collect(root: Path = Path("/"), run: meters.Runner = meters.run_command) -> dict:
    """The whole inventory (may contain :class:`Missing`; see :func:`split_missing`)."""
    temps = temperatures(root)
    return {
        "hostname": platform.node(),
        "cpu": cpu(root),
        "memory": memory(),
        "accelerators": accelerators(),
        "board": board(root),
        "power": power(root),
        "temperatures_c": temps or Missing("no thermal zones or hwmon temperature sensors exposed"),
        "software": software(root),
        "quantization": quantization_backends(),
        "energy": energy_meters(root, run),
        "torch_threads": _torch_threads(),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
