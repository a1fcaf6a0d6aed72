"""The device inventory reads fixture trees (a Raspberry Pi, a Jetson, a laptop) and says why a value is missing."""

from __future__ import annotations

from pathlib import Path

from fedge.edge_client.device import inventory
from fedge.edge_client.device.inventory import Missing, split_missing
from tests.test_meters import battery_tree, write_tree

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
"""
PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_isa_features_on_x86_and_arm():
    assert inventory.isa_features(X86_CPUINFO) == [
        "AMX", "AMX-BF16", "AMX-INT8", "AVX", "AVX-512F", "AVX2", "AVX512-BF16", "AVX512-VNNI", "F16C", "FMA", "SSE4.2"
    ]  # fmt: skip
    assert inventory.isa_features(PI5_CPUINFO) == ["NEON", "NEON-DOTPROD", "NEON-FP16"]


def test_a_raspberry_pi_from_its_device_tree(tmp_path):
    write_tree(tmp_path, {"proc/cpuinfo": PI5_CPUINFO, "proc/device-tree/model": "Raspberry Pi 5 Model B Rev 1.0\x00"})
    board = inventory.board(tmp_path)
    assert board["model"] == "Raspberry Pi 5 Model B Rev 1.0" and board["raspberry_pi"] and not board["jetson"]
    cpu = inventory.cpu(tmp_path)
    assert cpu["model"] == "Cortex-A76" and cpu["bf16_native"] is False
    assert isinstance(cpu["freq_mhz"]["max"], Missing)  # a fixture root has no live cpufreq


def test_the_firmware_devicetree_path_and_a_jetson_release_file(tmp_path):
    write_tree(
        tmp_path,
        {
            "sys/firmware/devicetree/base/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
            "etc/nv_tegra_release": "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64\n",
        },
    )
    b = inventory.board(tmp_path)
    assert (
        b["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
        and b["jetson"]
        and b["jetson_release"].startswith("# R36")
    )


def test_dmi_names_an_x86_machine(tmp_path):
    write_tree(tmp_path, {"sys/class/dmi/id/sys_vendor": "LENOVO", "sys/class/dmi/id/product_name": "21CB"})
    assert inventory.board_model(tmp_path) == "LENOVO 21CB"


def test_temperatures_from_thermal_zones_and_hwmon(tmp_path):
    write_tree(
        tmp_path,
        {
            "sys/class/thermal/thermal_zone0/type": "cpu-thermal",
            "sys/class/thermal/thermal_zone0/temp": 61250,
            "sys/class/hwmon/hwmon2/name": "coretemp",
            "sys/class/hwmon/hwmon2/temp1_label": "Package id 0",
            "sys/class/hwmon/hwmon2/temp1_input": 48000,
        },
    )
    assert inventory.temperatures(tmp_path) == {"cpu-thermal": 61.25, "coretemp/Package id 0": 48.0}
    assert inventory.max_temperature(tmp_path) == 61.25
    assert inventory.max_temperature(tmp_path / "none") is None


def test_power_source_from_the_battery(tmp_path):
    p = inventory.power(battery_tree(tmp_path))
    assert p["source"] == "battery" and p["battery"]["capacity_pct"] == 81 and p["battery"]["power_w"] == 12.5
    assert isinstance(inventory.power(tmp_path / "none")["source"], Missing)


def test_split_missing_gives_every_null_its_reason():
    tree = {"a": 1, "b": Missing("no b here"), "c": {"d": [Missing("gone"), 2]}, "e": None}
    clean, reasons = split_missing(tree)
    assert clean == {"a": 1, "b": None, "c": {"d": [None, 2]}, "e": None}
    assert reasons == {"b": "no b here", "c.d[0]": "gone"}


def null_paths(tree, path: str = "") -> set[str]:
    """Dotted paths of every None in a JSON-like tree."""
    if tree is None:
        return {path}
    if isinstance(tree, dict):
        return set().union(*(null_paths(v, f"{path}.{k}" if path else k) for k, v in tree.items()))
    if isinstance(tree, list):
        return set().union(*(null_paths(v, f"{path}[{i}]") for i, v in enumerate(tree)))
    return set()


def test_collect_on_an_empty_machine_explains_every_null(tmp_path: Path):
    def no_commands(argv):
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    clean, reasons = split_missing(inventory.collect(tmp_path, no_commands))
    assert null_paths(clean) <= set(reasons)
    assert "temperatures_c" in reasons and "board.model" in reasons
    assert set(clean["energy"]["unavailable"]) >= {"rapl", "pmic", "battery", "ina3221"}
    assert clean["energy"]["selected"] == ["estimated"]
    assert clean["quantization"]["fp32"] == "ok" and clean["quantization"]["int4"] == "ok"
    assert clean["software"]["versions"]["torch"]
