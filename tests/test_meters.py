"""Energy meters read fixture sysfs trees and captured command output through their real parsing code."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.edge_client.device import meters
from fedge.edge_client.device.meters import BatteryMeter, Ina3221Meter, Meter, MeterUnavailable, PmicMeter, RaplMeter

FIXTURES = Path(__file__).parent / "fixtures"
RANGE_UJ = 262143328850  # a real package max_energy_range_uj (about 262 kJ)


def write_tree(root: Path, files: dict[str, object]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{content}\n")
    return root


def rapl_tree(root: Path, package0: int, package1: int, dram: int) -> Path:
    base = "sys/class/powercap"
    return write_tree(
        root,
        {
            f"{base}/intel-rapl:0/name": "package-0",
            f"{base}/intel-rapl:0/energy_uj": package0,
            f"{base}/intel-rapl:0/max_energy_range_uj": RANGE_UJ,
            f"{base}/intel-rapl:0/constraint_0_name": "long_term",
            f"{base}/intel-rapl:0/constraint_0_power_limit_uw": 65000000,
            f"{base}/intel-rapl:0:0/name": "core",  # inside the package: must not be added again
            f"{base}/intel-rapl:0:0/energy_uj": 5,
            f"{base}/intel-rapl:0:0/max_energy_range_uj": RANGE_UJ,
            f"{base}/intel-rapl:0:2/name": "dram",
            f"{base}/intel-rapl:0:2/energy_uj": dram,
            f"{base}/intel-rapl:0:2/max_energy_range_uj": RANGE_UJ,
            f"{base}/intel-rapl:1/name": "package-1",
            f"{base}/intel-rapl:1/energy_uj": package1,
            f"{base}/intel-rapl:1/max_energy_range_uj": RANGE_UJ,
        },
    )


def test_rapl_sums_packages_and_dram_and_survives_a_counter_wraparound(tmp_path):
    rapl_tree(tmp_path, package0=RANGE_UJ - 1_000_000, package1=10_000_000, dram=0)
    meter = RaplMeter(tmp_path)
    assert meter.description == "RAPL package-0 + dram + package-1"
    assert meter.read() == 0.0
    # package-0 wrapped: 1 J before the wrap + 2 J after; package-1 +3 J; dram +0.5 J
    rapl_tree(tmp_path, package0=2_000_000, package1=13_000_000, dram=500_000)
    assert meter.read() == pytest.approx(6.5)
    rapl_tree(tmp_path, package0=3_000_000, package1=13_000_000, dram=500_000)
    assert meter.read() == pytest.approx(7.5)


def test_rapl_prefers_the_platform_zone_which_covers_the_others(tmp_path):
    rapl_tree(tmp_path, 0, 0, 0)
    write_tree(
        tmp_path,
        {
            "sys/class/powercap/intel-rapl:2/name": "psys",
            "sys/class/powercap/intel-rapl:2/energy_uj": 100,
            "sys/class/powercap/intel-rapl:2/max_energy_range_uj": RANGE_UJ,
        },
    )
    assert RaplMeter(tmp_path).description == "RAPL psys"


def test_rapl_permission_error_says_how_to_fix_it(tmp_path, monkeypatch):
    rapl_tree(tmp_path, 1, 2, 3)
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(MeterUnavailable) as err:
        RaplMeter(tmp_path)
    assert "permission denied" in str(err.value) and "chmod o+r" in str(err.value) and "root" in str(err.value)
    assert "udev" in str(err.value)


def test_no_powercap_is_a_reason_not_an_error(tmp_path):
    with pytest.raises(MeterUnavailable, match="no /sys/class/powercap"):
        RaplMeter(tmp_path)


def ina3221_tree(root: Path, with_input_rail: bool = True) -> Path:
    hw = "sys/class/hwmon/hwmon3"
    files = {
        f"{hw}/name": "ina3221",
        f"{hw}/in1_label": "VDD_IN" if with_input_rail else "VDD_GPU_SOC",
        f"{hw}/in1_input": 5000,  # mV
        f"{hw}/curr1_input": 1200,  # mA -> 6.0 W
        f"{hw}/in2_label": "VDD_CPU_GPU_CV",
        f"{hw}/in2_input": 5000,
        f"{hw}/curr2_input": 400,  # 2.0 W
        f"{hw}/in3_label": "VDD_SOC",
        f"{hw}/in3_input": 5000,
        f"{hw}/curr3_input": 300,  # 1.5 W
        f"{hw}/in7_label": "sum of shunt voltages",
        f"{hw}/in7_input": 999,
        "sys/class/hwmon/hwmon0/name": "cpu_thermal",
    }
    return write_tree(root, files)


def test_jetson_ina3221_uses_the_board_input_rail_when_labelled(tmp_path):
    meter = Ina3221Meter(ina3221_tree(tmp_path))
    assert meter.read() == pytest.approx(6.0)
    assert meter.description == "Jetson INA3221 VDD_IN"


def test_jetson_ina3221_sums_the_rails_without_an_input_rail(tmp_path):
    meter = Ina3221Meter(ina3221_tree(tmp_path, with_input_rail=False))
    assert meter.read() == pytest.approx(6.0 + 2.0 + 1.5)


def test_ina3221_power_inputs_in_microwatts(tmp_path):
    hw = "sys/class/hwmon/hwmon1"
    write_tree(tmp_path, {f"{hw}/name": "ina3221", f"{hw}/in1_label": "VDD_IN", f"{hw}/power1_input": 7_250_000})
    assert Ina3221Meter(tmp_path).read() == pytest.approx(7.25)


def test_pmic_parses_captured_output_and_sums_volts_times_amps():
    text = (FIXTURES / "pi5_pmic_read_adc.txt").read_text()
    rails = meters.parse_pmic(text)
    assert rails["VDD_CORE"] == (0.87654321, 2.12345678)
    assert "EXT5V" not in rails and "BATT" not in rails and len(rails) == 12
    meter = PmicMeter(lambda argv: text)
    assert meter.read() == pytest.approx(sum(v * a for v, a in rails.values()))
    assert meter.read() == pytest.approx(2.9040, abs=1e-3)  # VDD_CORE 1.8613 W + 1.0427 W on 11 rails


def test_pmic_older_firmware_format():
    assert meters.parse_pmic("VDD_CORE_A=1.5A\nVDD_CORE_V=0.8V\n") == {"VDD_CORE": (0.8, 1.5)}


def test_pmic_absent_or_unsupported():
    def missing(argv):
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    with pytest.raises(MeterUnavailable, match="not a Raspberry Pi 5"):
        PmicMeter(missing)
    with pytest.raises(MeterUnavailable, match="no rail currents"):
        PmicMeter(lambda argv: 'error=1 error_msg="Command not registered"\n')


def battery_tree(root: Path, status: str = "Discharging", ac_online: int = 0, power: bool = True) -> Path:
    bat = "sys/class/power_supply/BAT0"
    files: dict[str, object] = {
        f"{bat}/type": "Battery",
        f"{bat}/status": status,
        f"{bat}/capacity": 81,
        f"{bat}/energy_now": 42_000_000,  # µWh
        "sys/class/power_supply/AC/type": "Mains",
        "sys/class/power_supply/AC/online": ac_online,
    }
    if power:
        files[f"{bat}/power_now"] = 12_500_000  # µW
    else:
        files[f"{bat}/current_now"] = -1_000_000  # µA (some firmware reports discharge as negative)
        files[f"{bat}/voltage_now"] = 11_400_000  # µV
    return write_tree(root, files)


def test_battery_power_now_and_current_times_voltage(tmp_path):
    assert BatteryMeter(battery_tree(tmp_path / "a")).read() == pytest.approx(12.5)
    assert BatteryMeter(battery_tree(tmp_path / "b", power=False)).read() == pytest.approx(11.4)
    supplies = {s["name"]: s for s in meters.power_supplies(tmp_path / "a")}
    assert supplies["BAT0"]["energy_wh"] == pytest.approx(42.0) and supplies["AC"]["online"] is False


def test_battery_on_mains_is_unavailable_with_the_reason(tmp_path):
    with pytest.raises(MeterUnavailable, match="mains"):
        BatteryMeter(battery_tree(tmp_path, status="Charging", ac_online=1))


def test_probe_reports_every_method_and_select_prefers_a_whole_device_meter(tmp_path):
    rapl_tree(tmp_path, 1, 2, 3)
    ina3221_tree(tmp_path)
    found = meters.probe_meters(tmp_path, run=lambda argv: "", nvml=False)
    kinds = {m.method if isinstance(m, Meter) else m.split(":")[0] for m in found}
    assert kinds == {"ina3221", "pmic", "battery", "rapl"}
    assert [m.method for m in meters.select_meters(found)] == ["ina3221"]
    rapl_only = meters.probe_meters(tmp_path / "x", run=lambda argv: "", nvml=False)
    assert meters.select_meters(rapl_only) == []


def test_run_command_turns_a_missing_program_into_oserror():
    with pytest.raises(OSError):
        meters.run_command(["fedge-no-such-program-xyz"])
