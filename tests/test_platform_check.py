"""benchmarks/platform_check.py's pure logic on small pip reports: no network, no pip run.

The fixtures under tests/fixtures/platform/ are pip ``--report`` files cut down to a few packages: torch 2.10 for
linux-aarch64 (a CPU build, as a real dry run found) and the same with the CUDA wheels torch 2.11+ pulls there.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import platform_check as pc  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "platform"
PI = next(line for line in pc.LINES if line.platform == "linux-aarch64")
GPU = next(line for line in pc.LINES if not line.cpu_only)


def _report(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _check(line: pc.Line, extra: str = "") -> pc.Check:
    return pc.Check(line.device, line.platform, "3.11", extra)


@pytest.mark.parametrize(
    "name, cuda",
    [
        ("nvidia-cublas-cu12", True),
        ("nvidia_cudnn_cu13", True),
        ("cuda-bindings", True),
        ("cuda_toolkit", True),
        ("triton", True),
        ("pytorch-triton", True),
        ("torch", False),
        ("numpy", False),
        ("onnxruntime", False),
        ("tritonclient-helper", False),
    ],
)
def test_cuda_libraries_are_told_from_the_rest(name, cuda):
    assert pc.is_cuda(name) is cuda


def test_a_report_parses_into_normalized_names_versions_and_urls():
    packages = pc.parse_report(_report("aarch64_torch_cuda.json"))
    assert [name for name, _, _ in packages] == [
        "torch",
        "fsspec",
        "networkx",
        "sympy",
        "nvidia-cublas-cu12",
        "triton",
        "cuda-bindings",
    ]
    assert packages[0][1] == "2.11.0" and packages[0][2].endswith("torch-2.11.0-cp311-cp311-manylinux_2_28_aarch64.whl")


def test_a_cpu_line_fails_on_a_report_with_nvidia_cublas():
    check = pc.judge(_check(PI), PI, pc.parse_report(_report("aarch64_torch_cuda.json")))
    assert check.status == "fail"
    assert check.cuda == ["cuda-bindings", "nvidia-cublas-cu12", "triton"]
    assert check.problems == [
        "linux-aarch64 py3.11 Raspberry Pi 4 / 5 [core]: promises CPU but needs CUDA libraries: "
        "cuda-bindings, nvidia-cublas-cu12, triton"
    ]


def test_a_cpu_line_passes_on_a_report_without_cuda():
    check = pc.judge(_check(PI), PI, pc.parse_report(_report("aarch64_torch_cpu.json")))
    assert (check.status, check.packages, check.cuda, check.problems) == ("ok", 4, [], [])


def test_a_cuda_line_reports_its_cuda_libraries_without_failing():
    check = pc.judge(_check(GPU), GPU, pc.parse_report(_report("aarch64_torch_cuda.json")))
    assert (check.status, check.cuda, check.problems) == ("ok", ["cuda-bindings", "nvidia-cublas-cu12", "triton"], [])


STDERR = """ERROR: Ignored the following versions that require a different python version: 3.7 Requires-Python >=3.12
ERROR: Could not find a version that satisfies the requirement nvidia-cudnn-cu13==9.19.0.56; platform_system == \
"Linux" (from torch) (from versions: 0.0.0a0)
ERROR: No matching distribution found for nvidia-cudnn-cu13==9.19.0.56; platform_system == "Linux"
"""


def test_a_failed_resolve_is_a_problem_and_names_the_cuda_library_it_wanted():
    check = pc.judge(_check(PI), PI, None, STDERR)
    assert check.status == "fail" and check.cuda == ["nvidia-cudnn-cu13"]
    assert check.problems[0].startswith("linux-aarch64 py3.11 Raspberry Pi 4 / 5 [core]: does not resolve to wheels:")
    assert "No matching distribution found for nvidia-cudnn-cu13" in check.problems[0]
    assert "promises CPU but needs CUDA libraries: nvidia-cudnn-cu13" in check.problems[1]


def test_an_extra_the_docs_say_is_not_offered_may_fail_to_resolve():
    stderr = "ERROR: No matching distribution found for bitsandbytes>=0.45\n"
    check = pc.judge(_check(PI, "bnb"), PI, None, stderr)
    assert (check.status, check.problems) == ("not offered", [])
    assert "bitsandbytes" in check.note


def test_the_pip_command_bypasses_local_config_and_sets_the_targets_markers(tmp_path):
    cmd = pc.pip_command("macos-arm64", "3.13", ["torch", "rich>=13"], tmp_path / "r.json", tmp_path / "t", None)
    markers = json.loads(cmd[3])
    assert markers["sys_platform"] == "darwin" and markers["platform_machine"] == "arm64"
    assert markers["python_version"] == "3.13"
    args = cmd[4:]
    for flag in ("--isolated", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--implementation=cp"):
        assert flag in args
    assert "--platform=macosx_14_0_arm64" in args and "--python-version=3.13" in args
    assert args[args.index("--index-url") + 1] == pc.PYPI and "--extra-index-url" not in args
    assert args[-2:] == ["torch", "rich>=13"]
    with_index = pc.pip_command("linux-x86_64", "3.11", ["torch"], tmp_path / "r", tmp_path / "t", pc.CPU_INDEX)
    assert with_index[with_index.index("--extra-index-url") + 1] == pc.CPU_INDEX


def test_requirements_come_from_pyproject(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["torch>=2.4", "rich>=13"]\n'
        '[project.optional-dependencies]\nbnb = ["bitsandbytes>=0.45"]\n'
    )
    assert pc.requirements(pyproject) == ["torch>=2.4", "rich>=13"]
    assert pc.requirements(pyproject, "bnb") == ["torch>=2.4", "rich>=13", "bitsandbytes>=0.45"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(pc.EXTRAS) <= set(extras)  # the extras the script checks are fedge's


def test_the_table_has_a_row_per_device_and_python():
    packages = pc.parse_report(_report("aarch64_torch_cpu.json"))
    checks = [pc.judge(_check(PI, extra), PI, packages) for extra in ("", *pc.EXTRAS)]
    rows = pc.table(checks).splitlines()
    assert len(rows) == 3
    assert rows[2].startswith("| Raspberry Pi 4 / 5 | linux-aarch64 | 3.11 | ok (4 pkgs) |")


def test_linux_targets_take_older_manylinux_tags():
    """bitsandbytes ships manylinux_2_24 wheels: a bare --platform manylinux_2_28 would report it missing."""
    cmd = pc.pip_command("linux-aarch64", "3.11", ["bitsandbytes"], Path("r"), Path("t"), None)
    assert {"--platform=manylinux_2_24_aarch64", "--platform=manylinux_2_28_aarch64"} <= set(cmd)


def test_every_line_the_check_knows_is_the_one_docs_install_md_gives():
    """The docs' per-device table and the check agree: each checked line's torch requirement appears in its row's
    install command, so changing one without the other fails here (the Pi's bare `pip install torch` of fedge 0.3.0
    is a CUDA build, as the CUDA fixture above shows)."""
    table = (ROOT / "docs" / "install.md").read_text().split("## Per device", 1)[1].split("\n\n## ", 1)[0]
    rows = {row.split("|")[1].strip(): row.split("|")[2] for row in table.splitlines() if row.startswith("| ")}
    for line in pc.LINES:
        row = next((cmd for device, cmd in rows.items() if device.startswith(line.device)), None)
        assert row is not None, f"docs/install.md has no row for {line.device!r}"
        torch = f"pip install '{line.torch}'" if any(c in line.torch for c in "=<>*") else f"pip install {line.torch}"
        assert torch in row, (line.device, torch, row)
        assert (line.torch_index or "") in row
