"""Emulated edge devices for simulation and tests: CPU throttling, an enforced memory cap, a link model.

A profile describes a device relative to the reference machine this project measures on (2 vCPU x86 with
AVX-512 and AMX-BF16): ``slowdown`` is how many times longer a training step takes there at the same compute
dtype. Emulation runs the real training here and makes it behave like the device:

- `apply_threads` + `Throttle`: limit torch's threads, stretch each step by sleeping (slowdown - 1) x its time
  (on a virtual clock, at its fastest rate seen: a busy host does not slow the emulated device);
- `RssWatchdog`: samples this process's RSS in a background thread and raises `EmulatedOutOfMemory` from the
  training loop's step callback once it exceeded the cap (an OOM the client can report, not a dead process);
- `Link`: seconds a payload takes (latency + bytes / bandwidth), and a sleep that emulates the transfer.

All three are callables or objects with an injectable clock/sleep/RSS reader, so tests never wait.
``resource.setrlimit(RLIMIT_AS)`` is not used: it caps address space, not RAM. Measured here after loading
SmolLM2-135M in fp32: 1.55 GB virtual for 0.42 GB resident (the mapped weights file, glibc arenas, thread
stacks), so an address-space cap equal to a device's RAM would fail far below the RAM it stands for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedge.common.errors import FedgeError
from fedge.edge_client.planning.plan import GIB, HOST, LADDER, DeviceCaps, HostCalibration

MB = 1_000_000


@dataclass(frozen=True)
class DeviceProfile:
    """An emulated device. Bytes, bytes per second and seconds.

    ``slowdown``: step-time multiplier against the reference machine at the same compute dtype (>= 1: an
    emulation can stretch time, not shrink it). ``precisions``: base precisions that work there (bnb-* only
    where bitsandbytes runs). ``bf16_native``: the CPU/GPU has a bf16 fast path, so bf16 and the quantized
    paths compute in bf16; without it they compute in fp32 (bf16 is then emulated and slow: not offered).
    """

    name: str
    threads: int
    slowdown: float
    memory_bytes: int
    precisions: tuple[str, ...]
    bf16_native: bool
    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    latency_s: float
    train_watts: float = 0.0  # power while training (0: unknown); an energy budget needs it

    def __post_init__(self) -> None:
        object.__setattr__(self, "precisions", tuple(self.precisions))
        if not (math.isfinite(self.train_watts) and self.train_watts >= 0):
            raise ValueError(f"device {self.name!r}: train_watts must be a finite number >= 0, got {self.train_watts}")
        if self.threads < 1:
            raise ValueError(f"device {self.name!r}: threads must be >= 1, got {self.threads}")
        if not self.slowdown >= 1:
            raise ValueError(
                f"device {self.name!r}: slowdown must be >= 1 (emulation cannot speed up), got {self.slowdown}"
            )
        for name in ("memory_bytes", "uplink_bytes_per_s", "downlink_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"device {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        if self.latency_s < 0:
            raise ValueError(f"device {self.name!r}: latency_s must be >= 0, got {self.latency_s}")
        known = (*LADDER, "fp16", "bnb-int8", "bnb-nf4")
        unknown = [p for p in self.precisions if p not in known]
        if unknown or not self.precisions:
            raise ValueError(f"device {self.name!r}: precisions {list(self.precisions)} must be some of {list(known)}")
        if "bf16" in self.precisions and not self.bf16_native:
            raise ValueError(f"device {self.name!r}: precision bf16 needs bf16_native = true")

    @property
    def link(self) -> Link:
        return Link(self.uplink_bytes_per_s, self.downlink_bytes_per_s, self.latency_s)

    def caps(self, host: HostCalibration = HOST, overhead_s: float = 0.0) -> DeviceCaps:
        """The planner's view of this device: the host's calibrated throughput divided by the slowdown."""
        gflops = {}
        for p in LADDER:
            if p in self.precisions:
                key = p if p in ("fp32", "bf16") or self.bf16_native else f"{p}-fp32"
                gflops[p] = host.train_gflops[key] / self.slowdown
        return DeviceCaps(
            name=self.name,
            threads=self.threads,
            memory_bytes=self.memory_bytes,
            train_gflops=gflops,
            bf16_native=self.bf16_native,
            uplink_bytes_per_s=self.uplink_bytes_per_s,
            downlink_bytes_per_s=self.downlink_bytes_per_s,
            latency_s=self.latency_s,
            overhead_s=overhead_s,
            train_watts=self.train_watts or None,
            watts_source=f"the {self.name} profile's power while training",
        )


# Slowdowns are relative to this project's reference machine: fp32 matmul ~306 GFLOP/s, bf16 (AMX) ~1,750
# (FACTS.md). A device without bf16 trains in fp32, so its slowdown compares fp32 with fp32.
PROFILES: dict[str, DeviceProfile] = {
    # Raspberry Pi 4 Model B, 2 GB: 4x Cortex-A72 @ 1.5 GHz (Armv8.0: NEON, no bf16, no fp16 arithmetic);
    # fp32 SGEMM ~15-20 GFLOP/s on 4 cores (OpenBLAS/Ruy reports; HPL fp64 ~10-13 GFLOP/s), so ~17x slower
    # than the reference machine's fp32. Raspberry Pi OS Lite idles at ~250 MB: ~1.6 GiB left of 2 GB.
    # bitsandbytes has no build for a 32/64-bit Pi: portable precisions only. Link: 2.4 GHz Wi-Fi
    # in a building, ~2 MB/s up / 5 MB/s down, ~30 ms.
    "pi4-2gb": DeviceProfile(
        "pi4-2gb", 4, 17.0, int(1.6 * GIB), ("fp32", "int8", "int4"), False, 2 * MB, 5 * MB, 0.030, 6.0
    ),
    # Raspberry Pi 5, 8 GB: 4x Cortex-A76 @ 2.4 GHz (Armv8.2: fp16 and dot-product, no bf16); ~2-3x a Pi 4
    # per Raspberry Pi Ltd's launch figures and HPL runs (~30 GFLOP/s fp64), fp32 SGEMM ~50-60 GFLOP/s: ~6x.
    # 8 GB minus OS and a desktop-less service stack: 6 GiB for training. Link: 5 GHz Wi-Fi, ~5/10 MB/s.
    "pi5-8gb": DeviceProfile("pi5-8gb", 4, 6.0, 6 * GIB, ("fp32", "int8", "int4"), False, 5 * MB, 10 * MB, 0.020, 8.0),
    # NVIDIA Jetson Orin Nano 8 GB: 6x Cortex-A78AE @ 1.5 GHz + a 1024-core Ampere GPU (bf16/fp16 tensor
    # cores, ~20 dense INT8 TOPS per NVIDIA's datasheet), 8 GB shared by CPU and GPU. Emulated as one
    # bf16-capable device at the reference machine's speed (slowdown 1): its GPU would train faster than
    # this host, which sleep-based emulation cannot reproduce, so the emulation is conservative. JetPack
    # with the desktop off leaves ~5 GiB. No bitsandbytes wheel for JetPack's aarch64 torch: portable
    # precisions only. Link: LTE field deployment, ~0.75 MB/s up / 3 MB/s down, ~60 ms.
    "jetson-orin-nano": DeviceProfile(
        "jetson-orin-nano", 6, 1.0, 5 * GIB, ("fp32", "bf16", "int8", "int4"), True, 750_000, 3 * MB, 0.060, 15.0
    ),
    # A typical laptop: 4 cores / 8 threads x86 with AVX2 and FMA at ~3 GHz (fp32 peak ~380 GFLOP/s, about
    # the reference machine's fp32), no AMX/AVX512-BF16, so bf16 is emulated and slow: fp32 compute.
    # 16 GB with a browser open: 6 GiB for training. bitsandbytes works on x86. Home Wi-Fi ~10/30 MB/s.
    "laptop": DeviceProfile(
        "laptop",
        4,
        1.0,
        6 * GIB,
        ("fp32", "int8", "int4", "bnb-int8", "bnb-nf4"),
        False,
        10 * MB,
        30 * MB,
        0.015,
        28.0,
    ),
}


def load_profile(spec: str) -> DeviceProfile:
    """A device profile from a built-in name, a .json/.toml file, or ``key=value,key=value`` text.

    File and text profiles may start from a built-in with ``base = "pi5-8gb"`` and override fields;
    otherwise every field is required. Sizes accept plain bytes. Raises FedgeError naming the field.
    """
    if spec in PROFILES:
        return PROFILES[spec]
    path = Path(spec)
    if path.suffix in (".json", ".toml"):
        try:
            raw = path.read_text()
            data = json.loads(raw) if path.suffix == ".json" else _toml_loads(raw)
        except (OSError, ValueError) as err:
            raise FedgeError(f"device profile {path}: cannot read it ({err})") from None
        return profile_from_dict(data, where=str(path))
    if "=" in spec:
        return profile_from_dict(_parse_pairs(spec), where=repr(spec))
    raise FedgeError(f"unknown device {spec!r}: use one of {sorted(PROFILES)}, a .json/.toml file or key=value pairs")


def _toml_loads(text: str) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        raise ValueError("TOML profiles need Python 3.11 or later; use a .json profile") from None
    return tomllib.loads(text)


def _parse_pairs(text: str) -> dict:
    data: dict[str, object] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            if data and key:  # a list value continues: precisions=fp32,int4
                last = list(data)[-1]
                data[last] = f"{data[last]},{key}"
                continue
            raise FedgeError(f"device profile {text!r}: expected key=value, got {pair!r}")
        data[key.strip()] = value.strip()
    return data


def profile_from_dict(data: dict, where: str = "profile") -> DeviceProfile:
    """Build and validate a profile from parsed JSON/TOML/key=value data (strings are converted)."""
    data = dict(data)
    base = data.pop("base", None)
    fields = {f.name: f for f in dataclasses.fields(DeviceProfile)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FedgeError(f"device profile {where}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    if base is not None:
        if base not in PROFILES:
            raise FedgeError(f"device profile {where}: base {base!r} is not one of {sorted(PROFILES)}")
        data = {**dataclasses.asdict(PROFILES[base]), **data}
    missing = sorted(n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING)
    if missing:
        raise FedgeError(f"device profile {where}: missing field(s) {missing} (or give base = a built-in name)")
    try:
        values = {name: _convert(name, data[name]) for name in fields if name in data}
        return DeviceProfile(**values)
    except ValueError as err:
        raise FedgeError(f"device profile {where}: {err}") from None


def _convert(name: str, value: object) -> object:
    kinds = {"threads": int, "memory_bytes": int, "bf16_native": bool, "name": str, "precisions": tuple}
    kind = kinds.get(name, float)
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if kind is tuple:
            return tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else tuple(value)
        if kind is int:
            return int(float(value))  # accepts 1.5e9
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"field {name!r}: expected {kind.__name__}, got {value!r}") from None


# --- CPU throttling ----------------------------------------------------------------------------------------


def apply_threads(threads: int) -> None:
    """Limit torch's intra-op threads to the device's (capped by the cores this machine has)."""
    import os

    import torch

    torch.set_num_threads(max(1, min(threads, os.cpu_count() or threads)))


class Throttle:
    """A training-loop ``on_step`` callback that makes each step take ``slowdown`` times its measured time.

    After a step of ``seconds`` it sleeps (slowdown - 1) x seconds. ``step_s`` records the emulated step
    times (measured x slowdown); ``slept_s`` the sleeps. ``sleep`` is injectable for tests.

    With ``rewind`` (a virtual device clock's), a step's host time is its tokens at the fastest seconds per token
    seen in this run on a step no longer than it, when that is less than its wall time: other work on the host
    (other emulated devices, other jobs) then does not slow the emulated device down, and the wall time beyond it
    goes to ``rewind``, which takes it off the device's clock. Only steps no longer than it count, since a step's
    fixed costs make short steps dearer per token: a long step's rate would undercount a short one. (Process CPU
    time would not do: torch's threads spin while they wait for a core.)
    Without ``rewind`` (wall-clock emulation) time already spent cannot be undone: the step counts at its wall time.
    """

    def __init__(
        self,
        slowdown: float,
        sleep: Callable[[float], None] = time.sleep,
        rewind: Callable[[float], None] | None = None,
    ) -> None:
        if not slowdown >= 1:
            raise ValueError(f"slowdown must be >= 1, got {slowdown}")
        self.slowdown, self.sleep, self.rewind = slowdown, sleep, rewind
        self._rates: list[tuple[int, float]] = []  # (tokens, seconds per token) of each step so far
        self.step_s: list[float] = []
        self.slept_s: list[float] = []

    def __call__(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        host = seconds
        if self.rewind is not None and tokens > 0:
            self._rates.append((tokens, seconds / tokens))
            best = min(rate for n, rate in self._rates if n <= tokens)
            host = min(seconds, best * tokens)
            if seconds > host:
                self.rewind(seconds - host)
        extra = (self.slowdown - 1) * host
        if extra > 0:
            self.sleep(extra)
        self.slept_s.append(extra)
        self.step_s.append(host * self.slowdown)


def chain(*callbacks: Callable[[int, float, int, float], bool | None]) -> Callable[[int, float, int, float], bool]:
    """One ``on_step`` callback calling each in order; it asks the loop to stop if any of them does."""

    def on_step(step: int, loss: float, tokens: int, seconds: float) -> bool:
        stop = False
        for callback in callbacks:
            stop = bool(callback(step, loss, tokens, seconds)) or stop
        return stop

    return on_step


# --- memory cap ----------------------------------------------------------------------------------------------


class EmulatedOutOfMemory(MemoryError):
    """The process exceeded its emulated device's memory cap; the client reports an OOM failure."""


def _process_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class RssWatchdog:
    """Enforce a memory cap on this process's resident set: sample RSS every ``interval_s`` in a thread.

    Once a sample exceeds ``cap_bytes`` the watchdog trips; the trip surfaces as `EmulatedOutOfMemory`
    from `check` (use the watchdog as the training loop's ``on_step`` callback, so a trip stops training
    at the end of the step) and on leaving the ``with`` block. ``peak_bytes`` is the highest sample.
    ``read_rss`` is injectable for tests.
    """

    def __init__(
        self,
        cap_bytes: int,
        read_rss: Callable[[], int] = _process_rss,
        interval_s: float = 0.05,
        device: str = "device",
    ) -> None:
        self.cap_bytes, self.read_rss, self.interval_s, self.device = cap_bytes, read_rss, interval_s, device
        self.peak_bytes = 0
        self.tripped_at: int | None = None  # the RSS sample that exceeded the cap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Read RSS once, update the peak, trip if over the cap. Returns the reading."""
        rss = self.read_rss()
        self.peak_bytes = max(self.peak_bytes, rss)
        if rss > self.cap_bytes and self.tripped_at is None:
            self.tripped_at = rss
        return rss

    def check(self) -> None:
        """Raise EmulatedOutOfMemory if the cap was exceeded at any sample so far."""
        if self.tripped_at is not None:
            raise EmulatedOutOfMemory(
                f"emulated out of memory on {self.device}: RSS reached {self.tripped_at / GIB:.2f} GiB, "
                f"over the device's {self.cap_bytes / GIB:.2f} GiB cap"
            )

    def __call__(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        self.sample()
        self.check()

    def start(self) -> RssWatchdog:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssWatchdog:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None:
            self.check()


@contextmanager
def emulate(
    profile: DeviceProfile,
    sleep: Callable[[float], None] = time.sleep,
    read_rss: Callable[[], int] = _process_rss,
    rewind: Callable[[float], None] | None = None,
) -> Iterator[Callable[[int, float, int, float], bool]]:
    """Run the enclosed training as ``profile``: its threads, its speed, its memory cap.

    Yields the ``on_step`` callback to pass to `fedge.edge_client.training.train.train` (chain it with a `Replanner`
    placed after it, so re-planning sees the stretched steps). Raises `EmulatedOutOfMemory` from the step that
    finds the cap exceeded, or on leaving the block. The cap covers the whole process RSS, so emulate one
    device per process (Flower runs each ClientApp in its own). ``rewind``: a virtual clock's, see `Throttle`.
    """
    apply_threads(profile.threads)
    throttle = Throttle(profile.slowdown, sleep, rewind)
    with RssWatchdog(profile.memory_bytes, read_rss=read_rss, device=profile.name) as watchdog:
        yield chain(throttle, watchdog)


# --- link -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A network link: bandwidth in bytes per second each way, one-way latency in seconds."""

    uplink_bytes_per_s: float
    downlink_bytes_per_s: float
    latency_s: float

    def seconds(self, n_bytes: int, direction: str = "up") -> float:
        """Seconds to move ``n_bytes``: latency + bytes / bandwidth (``direction`` "up" or "down")."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        rate = self.uplink_bytes_per_s if direction == "up" else self.downlink_bytes_per_s
        return self.latency_s + n_bytes / rate

    def transfer(self, n_bytes: int, direction: str = "up", sleep: Callable[[float], None] = time.sleep) -> float:
        """Emulate a transfer by sleeping its duration; returns the seconds slept."""
        seconds = self.seconds(n_bytes, direction)
        sleep(seconds)
        return seconds


# --- this machine -----------------------------------------------------------------------------------------


def this_machine(name: str = "this-machine", host: HostCalibration = HOST, measured: dict | None = None) -> DeviceCaps:
    """The planner's view of the machine it runs on: its memory and cores, and its speed.

    Training may use 80% of the memory available now. The speed comes from ``measured`` (this device's
    `fedge profile` report, see `saved_profile`) where there is one: its matmul GFLOP/s per dtype scaled by the
    reference machine's measured training/matmul ratio; else the reference machine's own calibration, which fits
    only machines like it. ``DeviceCaps.source`` says which. The link is unknown (the caps' defaults).
    """
    import os

    import psutil

    from fedge.quantization.backends import cpu_supports_bf16

    bf16 = cpu_supports_bf16()
    base = {"name": name, "threads": os.cpu_count() or 1, "memory_bytes": int(0.8 * psutil.virtual_memory().available),
            "bf16_native": bf16, **_training_watts(measured)}  # fmt: skip
    matmul = {k: v["median"] for k, v in ((measured or {}).get("matmul_gflops") or {}).items() if v}
    if matmul.get("fp32"):
        source = f"measured: `fedge profile` of this device ({measured.get('created', 'undated')})"
        return DeviceCaps.from_dict({**base, "matmul_gflops": matmul, "source": source})
    keys = {"fp32": "fp32", "int8": "int8" if bf16 else "int8-fp32", "int4": "int4" if bf16 else "int4-fp32"}
    if bf16:
        keys["bf16"] = "bf16"
    source = "the reference machine's calibration (no `fedge profile` of this device for this model)"
    return DeviceCaps(**base, train_gflops={p: host.train_gflops[k] for p, k in keys.items()}, source=source)


def _training_watts(measured: dict | None) -> dict:
    """This machine's power while training: its `fedge profile`'s measured mean, else its rated power (RAPL's
    limit, a known board, or an assumed figure per core: `fedge.edge_client.device.energy.detect_tdp`)."""
    from fedge.edge_client.device.energy import detect_tdp

    training = (measured or {}).get("training")
    watts = training.get("mean_power_w") if isinstance(training, dict) else None
    if isinstance(watts, (int, float)) and math.isfinite(watts) and watts > 0:
        return {"train_watts": float(watts), "watts_source": "measured by `fedge profile` of this device"}
    tdp, source = detect_tdp()
    return {"train_watts": tdp, "watts_source": source}


PROFILE_DIR = "profiles"  # under the model cache: one `fedge profile` report per model, of this device


def profile_path(cache_dir: Path, model: str) -> Path:
    """Where `fedge profile --model MODEL` keeps its report for the planner (a model path becomes a safe name)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)[-120:]
    return Path(cache_dir) / PROFILE_DIR / f"{safe}.json"


def saved_profile(cache_dir: Path, model: str) -> dict | None:
    """This device's saved `fedge profile` report for ``model`` (None if there is none, or it is unreadable or of
    another machine: a cache copied from elsewhere must not set this device's plans)."""
    import platform

    try:
        saved = json.loads(profile_path(cache_dir, model).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("machine") != platform.node():
        return None
    return saved
