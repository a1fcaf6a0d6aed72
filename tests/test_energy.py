"""An energy session samples meters in the background, marks phases, and falls back to a labelled estimate."""

from __future__ import annotations

import threading
import time

import pytest

from fedge.edge_client.device import energy
from fedge.edge_client.device.energy import EnergySession
from fedge.edge_client.device.meters import Meter, RaplMeter
from tests.test_meters import rapl_tree


def test_tdp_comes_from_rapl_pl1_then_a_known_board_then_an_assumption(tmp_path):
    rapl_tree(tmp_path, 1, 2, 3)
    assert energy.detect_tdp(tmp_path) == (65.0, "RAPL long-term power limit")
    watts, source = energy.detect_tdp(tmp_path / "empty", "Raspberry Pi 5 Model B Rev 1.0")
    assert watts == 8.0 and "Raspberry Pi 5" in source
    watts, source = energy.detect_tdp(tmp_path / "empty", None)
    assert watts > 0 and source.startswith("assumed")


class ConstantPower(Meter):
    method, kind, whole_device = "fake", "power", True

    def read(self) -> float:
        return 10.0


def test_session_integrates_a_power_meter_and_records_phases_and_a_timeline():
    with EnergySession([ConstantPower()], (8.0, "test"), interval_s=0.01) as s:
        with s.phase("work"):
            threading.Event().wait(0.05)
    r = s.result
    assert r.method == "fake" and not r.estimated and r.note is None
    assert r.joules == pytest.approx(10.0 * r.seconds, rel=0.05)
    work = r.phases["work"]
    assert work.joules == pytest.approx(10.0 * (work.end_s - work.start_s), rel=0.05)
    assert r.timeline and {"t_s", "power_w", "cpu_pct", "rss_mb", "temp_c"} <= set(r.timeline[-1])


def test_a_meter_that_vanishes_mid_run_falls_back_to_the_estimate_with_a_note(tmp_path):
    rapl_tree(tmp_path, 1_000_000, 0, 0)
    meter = RaplMeter(tmp_path)
    with EnergySession([meter], (8.0, "test"), interval_s=0.01) as s:
        with s.phase("before"):
            s.sample()
        (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").unlink()  # driver unloaded mid-run
        with s.phase("after"):
            sum(i * i for i in range(200_000))  # some CPU time for the estimate
    r = s.result
    assert r.method == "estimated" and r.estimated
    assert "rapl meter stopped working" in r.note and "estimated" in r.note
    assert r.joules >= 0 and r.phases["after"].joules == r.phases["after"].estimated_joules
    assert r.phases["before"].joules == r.phases["before"].estimated_joules  # one method for the whole result


def test_without_meters_the_estimate_is_cpu_time_times_tdp_over_cores():
    with EnergySession([], (8.0, "declared"), interval_s=0.01) as s:
        start = time.process_time()  # 0.1 s of CPU: /proc's tick-sampled CPU time sees it even on a busy machine
        while time.process_time() - start < 0.1:
            sum(i * i for i in range(10_000))
    r = s.result
    assert r.method == "estimated" and "TDP 8 W (declared)" in r.description
    assert r.joules > 0


def test_estimate_rejects_a_nonpositive_tdp():
    with pytest.raises(ValueError, match="TDP"):
        energy.EstimateMeter(0, "x")


class Counter(Meter):
    """A counter meter that has counted before any session started (like a RAPL meter reused across rounds)."""

    method, kind = "counter", "energy"

    def __init__(self) -> None:
        self.joules = 1000.0

    def read(self) -> float:
        self.joules += 1.0
        return self.joules


def test_a_counter_shared_by_sessions_counts_only_each_sessions_energy():
    counter = Counter()
    for _ in range(2):
        with EnergySession([counter], (8.0, "test"), interval_s=10) as s:
            pass
        # reads: one on entering, one on leaving: 1 J each, whatever the counter held before
        assert s.result.joules == pytest.approx(1.0) and s.result.method == "counter"


class Broken(Meter):
    """A meter whose library raises its own exception type (like pynvml's NVMLError) after a few reads."""

    method, kind = "broken", "energy"

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> float:
        self.reads += 1
        if self.reads > 2:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return float(self.reads)


def test_any_meter_error_falls_back_and_never_reaches_the_work():
    def bad_sensor() -> float:
        raise OSError("thermal zone gone")

    with EnergySession([Broken()], (8.0, "test"), interval_s=0.01, temperature=bad_sensor) as s:
        threading.Event().wait(0.05)
    assert s.result.method == "estimated" and "GPU_IS_LOST" in s.result.note
    assert all(row["temp_c"] is None for row in s.result.timeline)
