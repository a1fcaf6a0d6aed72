"""Platform check: does each device class's install line resolve to wheels, how much does it download, and does
a line that promises CPU stay free of CUDA libraries?

For linux-aarch64, linux-x86_64 and macOS-arm64 at Python 3.11-3.13, each line of docs/install.md's "Per device"
table (torch, then fedge's core dependencies from pyproject.toml; then each extra: bnb, simulation, export) goes
through pip's own resolver as a cross-platform dry run: ``pip install --dry-run --report`` with ``--platform``,
``--python-version`` and ``--only-binary=:all:``. The baseline is the resolve itself: nothing is installed, and the
download size is the sum of the resolved wheels' sizes on PyPI's JSON API.

Two things would make that answer false here, so the script bypasses them:

- the machine's pip config (extra local indexes, a constraints file capping torch): pip runs ``--isolated`` with
  ``PIP_CONFIG_FILE=/dev/null`` against https://pypi.org/simple only;
- pip evaluates environment markers against the host, not ``--platform`` (pypa/pip#10050: an x86-64 host reads
  torch's ``platform_machine == "x86_64"`` CUDA requirements as true for an aarch64 target). pip runs under
  ``_PIP_WITH_MARKERS``, which sets the target's marker environment before pip starts.

    python benchmarks/platform_check.py [--out DIR] [--offline-fixture REPORT.json]

Writes benchmarks/results/platform_check.json and platform_check.md beside it (``--out`` elsewhere); exits 1 with
one line per problem when a line does not resolve or a CPU line pulls a CUDA library (nvidia-*, cuda-*, triton).
``--offline-fixture`` judges a saved pip report as every line's resolve, without network (for a look at the output).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import EXPLORATION, RESULTS, add_out_argument, write_results  # noqa: E402

PYPI = "https://pypi.org/simple"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTHONS = ("3.11", "3.12", "3.13")
EXTRAS = ("bnb", "simulation", "export")


def _manylinux(arch: str) -> tuple[str, ...]:
    """Every manylinux tag a glibc 2.36 system takes (Debian 12, Raspberry Pi OS Bookworm): pip does not widen a
    custom ``--platform manylinux_2_28`` to older glibc tags, and bitsandbytes ships manylinux_2_24 wheels."""
    return (*(f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)), f"manylinux2014_{arch}")


# (pip --platform tags, the PEP 508 marker values of that platform)
PLATFORMS = {
    "linux-aarch64": (
        _manylinux("aarch64"),
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64", "os_name": "posix"},
    ),
    "linux-x86_64": (
        _manylinux("x86_64"),
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
    ),
    "macos-arm64": (
        ("macosx_14_0_arm64", "macosx_11_0_arm64"),
        {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    ),
}
_CUDA = re.compile(r"^(nvidia-.+|cuda-.+|(pytorch-)?triton(-.+)?)$")
# argv[1]: the marker environment as JSON; the rest is pip's command line
_PIP_WITH_MARKERS = (
    "import json, sys; import pip._vendor.packaging.markers as m; env = json.loads(sys.argv.pop(1)); "
    "base = m.default_environment; m.default_environment = lambda: {**base(), **env}; "
    "from pip._internal.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class Line:
    """One row of docs/install.md's "Per device" table: the torch requirement, where torch comes from, its promise."""

    device: str
    platform: str
    torch: str
    cpu_only: bool  # the docs promise a CPU build: any CUDA library is a failure
    torch_index: str | None = None  # an index searched for torch besides PyPI (the PyTorch CPU index)
    not_offered: tuple[str, ...] = ()  # extras the docs say this device has no build for: failing to resolve is fine


LINES = (
    Line("x86-64 Linux, CPU only", "linux-x86_64", "torch", cpu_only=True, torch_index=CPU_INDEX),
    Line("x86-64 Linux, NVIDIA GPU", "linux-x86_64", "torch", cpu_only=False),
    Line("Raspberry Pi 4 / 5", "linux-aarch64", "torch==2.10.*", cpu_only=True, not_offered=("bnb",)),
    Line("macOS, Apple silicon", "macos-arm64", "torch", cpu_only=True),
)


@dataclass
class Check:
    """One resolve: a line (``extra`` "" for torch and the core dependencies alone) on one Python."""

    device: str
    platform: str
    python: str
    extra: str
    status: str = "ok"  # ok | fail | not checked | not offered
    packages: int = 0
    download_mb: float | None = None
    cuda: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str = ""


def requirements(pyproject: Path, extra: str = "") -> list[str]:
    """fedge's core dependencies, plus one extra's (fedge is not on PyPI: its dependencies stand in for it)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *(project["optional-dependencies"][extra] if extra else [])]


def pip_command(platform: str, python: str, reqs: list[str], report: Path, target: Path, index: str | None) -> list:
    """The pip dry run for ``reqs`` on ``platform`` at ``python``, with that platform's markers, writing ``report``."""
    tags, markers = PLATFORMS[platform]
    env = {**markers, "python_version": python, "python_full_version": f"{python}.0"}
    cmd = [sys.executable, "-c", _PIP_WITH_MARKERS, json.dumps(env), "install", "--isolated", "--dry-run"]
    cmd += ["--ignore-installed", "--disable-pip-version-check", "--quiet", "--report", str(report)]
    cmd += ["--only-binary=:all:", *(f"--platform={tag}" for tag in tags), f"--python-version={python}"]
    cmd += ["--implementation=cp", "--target", str(target), "--index-url", PYPI]
    return cmd + (["--extra-index-url", index] if index else []) + reqs


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_cuda(name: str) -> bool:
    """A CUDA library wheel: nvidia-* (cuBLAS, cuDNN, NCCL, ...), cuda-* (toolkit, bindings) or triton."""
    return bool(_CUDA.match(normalize(name)))


def parse_report(report: dict) -> list[tuple[str, str, str]]:
    """(normalized name, version, wheel URL) of every package a pip ``--report`` would install."""
    return [
        (normalize(item["metadata"]["name"]), item["metadata"]["version"], item["download_info"]["url"])
        for item in report["install"]
    ]


def unresolvable(stderr: str) -> list[str]:
    """The requirements pip names in "Could not find a version that satisfies the requirement X" errors."""
    return [normalize(m) for m in re.findall(r"satisfies the requirement ([A-Za-z0-9][A-Za-z0-9._-]*)", stderr)]


def judge(check: Check, line: Line, packages: list | None, stderr: str = "") -> Check:
    """Fill ``check`` from a resolve: ``packages`` from ``parse_report``, or None when pip failed with ``stderr``."""
    what = f"{check.platform} py{check.python} {line.device} [{check.extra or 'core'}]"
    if packages is None:
        missing = unresolvable(stderr)
        check.cuda = [n for n in missing if is_cuda(n)]
        reason = next((s for s in reversed(stderr.splitlines()) if s.startswith("ERROR")), "pip failed")
        if check.extra in line.not_offered:
            check.status, check.note = "not offered", f"as the docs say: {reason}"
            return check
        check.status = "fail"
        check.problems.append(f"{what}: does not resolve to wheels: {reason}")
    else:
        check.packages = len(packages)
        check.cuda = sorted(name for name, _, _ in packages if is_cuda(name))
        if check.extra in line.not_offered:
            check.note = "resolves, though the docs say there is no build"
    if line.cpu_only and check.cuda:
        check.status = "fail"
        check.problems.append(f"{what}: promises CPU but needs CUDA libraries: {', '.join(check.cuda)}")
    return check


@cache
def pypi_sizes(name: str) -> dict[str, int]:
    """filename -> bytes of every file of every release of ``name`` (PyPI's JSON API, one request per name: the
    per-version endpoint /pypi/NAME/VERSION/json answered 404 from this machine)."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as reply:
        releases = json.load(reply)["releases"]
    return {f["filename"]: f["size"] for files in releases.values() for f in files}


def download_mb(packages: list[tuple[str, str, str]]) -> float | None:
    """MB (10^6 bytes) of the wheels; None when a size is not on PyPI (a wheel from another index)."""
    sizes = [pypi_sizes(name).get(url.rsplit("/", 1)[-1]) for name, _, url in packages]
    return None if None in sizes else round(sum(sizes) / 1e6, 1)


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=15).close()
        return True
    except OSError:
        return False


def run_check(line: Line, python: str, extra: str, fixture: dict | None) -> Check:
    """Resolve one line on one Python (or judge ``fixture`` as its report) and judge it; a check that could not
    run (a timeout, PyPI's JSON API down) is a failure that says so."""
    check = Check(line.device, line.platform, python, extra)
    try:
        return _resolve(check, line, fixture)
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        check.status = "fail"
        check.problems.append(f"{line.platform} py{python} {line.device} [{extra or 'core'}]: not checked: {e!r}")
        return check


def _resolve(check: Check, line: Line, fixture: dict | None) -> Check:
    python, extra = check.python, check.extra
    if fixture is not None:
        return judge(check, line, parse_report(fixture))
    if line.torch_index and not reachable(line.torch_index):
        check.status, check.note = "not checked", f"not checked here (index unreachable: {line.torch_index})"
        return check
    reqs = [line.torch, *requirements(ROOT / "pyproject.toml", extra)]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = pip_command(line.platform, python, reqs, report, Path(tmp) / "target", line.torch_index)
        env = {**os.environ, "PIP_CONFIG_FILE": "/dev/null"}  # --isolated skips user config, not the site's
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        if done.returncode != 0 or not report.exists():
            return judge(check, line, None, done.stderr)
        packages = parse_report(json.loads(report.read_text()))
    judge(check, line, packages)
    check.download_mb = download_mb(packages)
    return check


def table(checks: list[Check]) -> str:
    """One row per device and Python: each line's status and MB, and the CUDA libraries its core line pulls."""
    lines = [
        "| device | platform | python | core | + bnb | + simulation | + export | CUDA libraries (core) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict[str, Check]] = {}
    for c in checks:
        rows.setdefault((c.device, c.platform, c.python), {})[c.extra] = c
    for (device, platform, python), by_extra in rows.items():
        cells = [_cell(by_extra[extra]) for extra in ("", *EXTRAS)]
        cuda = by_extra[""].cuda
        lines.append(f"| {device} | {platform} | {python} | {' | '.join(cells)} | {', '.join(cuda) or '-'} |")
    return "\n".join(lines)


def _cell(check: Check) -> str:
    mb = f", {check.download_mb:g} MB" if check.download_mb is not None else ""
    return f"{check.status}{mb}" + (f" ({check.packages} pkgs)" if check.packages else "")


def main() -> int:
    from rich.progress import Progress

    from fedge.common.fsutil import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(p, "runs with --out or --offline-fixture")
    p.add_argument("--offline-fixture", type=Path, metavar="REPORT.json", help="judge this pip report, no network")
    p.add_argument("--jobs", type=int, default=4, help="pip resolves at a time")
    args = p.parse_args()
    fixture = json.loads(args.offline_fixture.read_text()) if args.offline_fixture else None
    folder = args.out if (fixture is not None or args.out != EXPLORATION) else RESULTS
    plan = [(line, py, extra) for line in LINES for py in PYTHONS for extra in ("", *EXTRAS)]
    t0 = time.perf_counter()
    with Progress() as progress, ThreadPoolExecutor(args.jobs) as pool:
        task = progress.add_task("resolving install lines", total=len(plan))
        futures = [pool.submit(run_check, *item, fixture) for item in plan]
        for future in futures:
            future.add_done_callback(lambda _: progress.advance(task))
        checks = [future.result() for future in futures]
    seconds = round(time.perf_counter() - t0, 1)
    problems = [problem for c in checks for problem in c.problems]
    markdown = (
        f"Install lines resolved by pip {'(offline fixture)' if fixture else 'against PyPI'} in {seconds:g} s "
        "(`python benchmarks/platform_check.py`); MB: the wheels' download size.\n\n" + table(checks) + "\n"
    )
    lines = [{"device": ln.device, "install": asdict(ln)} for ln in LINES]
    results = {"seconds": seconds, "lines": lines, "checks": [asdict(c) for c in checks], "problems": problems}
    path = write_results("platform_check", results, folder)
    atomic_write_text(folder / "platform_check.md", markdown)
    print(markdown)
    print("\n".join(f"PROBLEM {problem}" for problem in problems))
    print(f"wrote {path} and {folder / 'platform_check.md'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
