"""Run conditions on fixture sysfs trees and captured command output: laptops, desktops, a Raspberry Pi, networks."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from fedge.edge_client.agent import conditions as cond
from fedge.edge_client.agent.conditions import LoadHistory, RunConditions, Sources


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return root


def _no_commands(cmd):
    raise FileNotFoundError(cmd[0])


def _commands(outputs: dict[str, str]):
    """A runner answering by the command's first two words; anything else is not installed."""

    def run(cmd):
        key = " ".join(cmd[:2])
        if key not in outputs:
            raise FileNotFoundError(cmd[0])
        return outputs[key]

    return run


LAPTOP_ON_BATTERY = {
    "sys/class/power_supply/AC/type": "Mains",
    "sys/class/power_supply/AC/online": "0",
    "sys/class/power_supply/BAT0/type": "Battery",
    "sys/class/power_supply/BAT0/status": "Discharging",
    "sys/class/power_supply/BAT0/capacity": "34",
}
ROUTE_WLAN = (
    "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    "wlan0\t0000A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0\n"
    "wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0"
)


def test_a_laptop_on_battery_starts_above_the_floor_and_continues_above_the_lower_one(tmp_path):
    dev = Sources(root=_tree(tmp_path, LAPTOP_ON_BATTERY), run=_no_commands)
    start = cond.power(dev, require_ac=False, min_battery=50)
    assert start.ok is False and "34%" in start.detail and start.source == "/sys/class/power_supply"
    assert cond.power(dev, require_ac=False, min_battery=30).ok is True
    assert cond.power(dev, require_ac=True, min_battery=0).ok is False  # mains required
    (tmp_path / "sys/class/power_supply/AC/online").write_text("1\n")
    assert cond.power(dev, require_ac=True, min_battery=50).ok is True


def test_a_desktop_has_no_supplies_and_is_on_mains(tmp_path):
    reading = cond.power(Sources(root=tmp_path, run=_no_commands), require_ac=True, min_battery=50)
    assert reading.ok is True and "mains" in reading.detail


def test_a_battery_of_unknown_charge_is_unknown(tmp_path):
    files = {k: v for k, v in LAPTOP_ON_BATTERY.items() if not k.endswith("capacity")}
    reading = cond.power(Sources(root=_tree(tmp_path, files), run=_no_commands), False, 50)
    assert reading.ok is None and not reading.satisfied(unknown_ok=False) and reading.satisfied(unknown_ok=True)


@pytest.mark.parametrize(
    ("throttled", "power_ok", "heat_ok", "words"),
    [
        ("throttled=0x0", True, True, ""),
        ("throttled=0x50000", True, True, ""),  # under-voltage and throttling since boot, not now
        ("throttled=0x50005", False, False, "under-voltage"),  # under-voltage and throttled now
        ("throttled=0x80008", True, False, "soft temperature limit"),
    ],
)
def test_a_raspberry_pi_reports_under_voltage_and_throttling(tmp_path, throttled, power_ok, heat_ok, words):
    root = _tree(tmp_path, {"sys/class/thermal/thermal_zone0/type": "cpu-thermal",
                            "sys/class/thermal/thermal_zone0/temp": "52600"})  # fmt: skip
    dev = Sources(root=root, run=_commands({"vcgencmd get_throttled": throttled + "\n"}))
    power, heat = cond.power(dev, False, 50), cond.heat(dev, 75)
    assert (power.ok, heat.ok) == (power_ok, heat_ok), (power, heat)
    assert words in power.detail + heat.detail
    if heat_ok:
        assert "53°C (cpu-thermal)" in heat.detail


def test_heat_takes_the_hottest_sensor_against_the_start_and_continue_limits(tmp_path):
    root = _tree(tmp_path, {
        "sys/class/thermal/thermal_zone0/type": "x86_pkg_temp", "sys/class/thermal/thermal_zone0/temp": "45000",
        "sys/class/hwmon/hwmon2/name": "nvme", "sys/class/hwmon/hwmon2/temp1_input": "81000",
        "sys/class/hwmon/hwmon2/temp1_label": "Composite",
    })  # fmt: skip
    dev = Sources(root=root, run=_no_commands)
    start, going = cond.heat(dev, 75), cond.heat(dev, 85)
    assert start.ok is False and "81°C (nvme/Composite)" in start.detail
    assert going.ok is True
    assert cond.heat(Sources(root=tmp_path / "empty", run=_no_commands), 75).ok is None


@pytest.mark.parametrize(
    ("nmcli", "interfaces", "ok"),
    [
        ("no\n", [], True),
        ("no (guessed)\n", [], True),
        ("yes\n", [], False),
        ("yes (guessed)\n", ["wlan0"], False),  # NetworkManager knows better than the list
        (None, ["eth0"], False),
        (None, ["wlan0"], True),
        (None, [], None),
        ("unknown\n", [], None),
    ],
)
def test_network_metered_from_networkmanager_or_the_interface_list(tmp_path, nmcli, interfaces, ok):
    root = _tree(tmp_path, {"proc/net/route": ROUTE_WLAN})
    run = _commands({"nmcli -g": nmcli}) if nmcli is not None else _no_commands
    reading = cond.network(Sources(root=root, run=run), allow_metered=False, interfaces=interfaces)
    assert reading.ok is ok, reading
    assert "wlan0" in reading.detail
    assert cond.network(Sources(root=root, run=run), allow_metered=True, interfaces=[]).ok is True


def test_no_default_route_is_unknown(tmp_path):
    root = _tree(tmp_path, {"proc/net/route": ROUTE_WLAN.splitlines()[0]})
    assert cond.network(Sources(root=root, run=_no_commands), False, []).ok is None


def test_load_counts_other_processes_only_and_needs_the_whole_idle_window():
    load = LoadHistory()
    # 2 cores = 2 s of CPU per second; this agent's tree uses 1.5 s of each 2 s; others 0.2 s
    for t in range(0, 601, 60):
        load.sample(t, busy_s=1.7 * t, total_s=2.0 * t, own_s=1.5 * t)
    start = load.reading(max_load=25, minutes=5)
    assert start.ok is True and "10%" in start.detail  # others: 0.2 / 2 s
    short = LoadHistory()
    for t in (0, 60, 120):
        short.sample(t, busy_s=0.0, total_s=2.0 * t, own_s=0.0)
    assert short.reading(25, minutes=5).ok is None and "measuring" in short.reading(25, minutes=5).detail
    assert short.reading(25, minutes=0).ok is True  # continuing judges the latest interval only
    busy = LoadHistory()
    for t, other in ((0, 0.0), (60, 0.1), (120, 1.5), (180, 0.1)):  # one busy minute: 75% of the CPUs
        busy.sample(t, busy_s=other * 60 + (busy._last[1] if busy._last else 0), total_s=2.0 * t, own_s=0.0)
    assert busy.reading(max_load=25, minutes=2).ok is False
    assert LoadHistory().reading(25, 5).ok is None


def test_cpu_seconds_reads_this_machine():
    busy, total, own = cond.cpu_seconds()
    assert 0 <= busy <= total and own >= 0


@pytest.mark.parametrize(
    ("spec", "hour", "ok"), [("22:00-07:00", 23, True), ("22:00-07:00", 3, True), ("22:00-07:00", 12, False),
                             ("09:00-17:00", 12, True), ("09:00-17:00", 17, False)],
)  # fmt: skip
def test_time_window_may_wrap_midnight(spec, hour, ok):
    assert cond.in_window(spec, datetime(2026, 12, 1, hour, 30)).ok is ok


def test_disk_and_the_full_check_with_start_and_continue_thresholds(tmp_path):
    root = _tree(tmp_path / "root", {**LAPTOP_ON_BATTERY, "proc/net/route": ROUTE_WLAN,
                                     "sys/class/power_supply/BAT0/capacity": "40"})  # fmt: skip
    dev = Sources(root=root, run=_commands({"nmcli -g": "no\n"}), now=lambda: datetime(2026, 12, 1, 23, 0),
                  free_memory_mb=lambda: 900.0, state_dir=tmp_path / "state")  # fmt: skip
    conditions = RunConditions(window="22:00-07:00", min_free_memory_mb=1000)
    load = LoadHistory()
    for t in range(0, 601, 60):
        load.sample(t, 0.0, 2.0 * t, 0.0)
    start = cond.check(conditions, dev, load, starting=True)
    assert [r.name for r in start] == ["power", "heat", "network", "load", "window", "memory", "disk"]
    blocking = cond.failing(start, conditions.unknown_ok)
    assert [r.name for r in blocking] == ["power", "heat", "memory"]  # 40% < 50%, no sensors, 900 < 1000 MB
    assert [r.name for r in cond.failing(start, unknown_ok=True)] == ["power", "memory"]
    going = cond.check(conditions, dev, load, starting=False)
    assert [r.name for r in cond.failing(going, unknown_ok=True)] == []  # 40% >= 30%: the round goes on
    assert "memory" not in [r.name for r in going]  # memory and disk are judged once, at the start
    assert cond.disk(tmp_path, min_free_mb=1e12).ok is False


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(min_battery=120), "min_battery"),
        (dict(min_battery=20), "min_battery_continue"),
        (dict(max_temp=90), "continue thresholds"),
        (dict(window="late"), "HH:MM-HH:MM"),
        (dict(idle_minutes=float("nan")), "idle_minutes"),
    ],
)
def test_bad_conditions_are_refused_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        RunConditions(**kwargs)


def test_run_command_raises_for_a_missing_command():
    with pytest.raises((OSError, subprocess.SubprocessError)):
        cond.run_command(["fedge-no-such-command-xyz"])
