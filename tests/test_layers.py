"""The package's import contracts (pyproject.toml, [tool.importlinter]) hold: layers, independence, no cycles.

import-linter reads the package from disk under its import name, but fedge's folders are mapped onto the
``fedge`` name by setuptools (edge_client/ -> fedge.edge_client, ...), which an editable install resolves
only at import time. The test therefore lays the package out as a wheel would (a tree of symlinks) and runs
``lint-imports`` on that tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lay_out_package(dest: Path) -> Path:
    """Symlink every source file of each package in pyproject's package-dir mapping to where a wheel puts it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]:
        source = ROOT / setuptools["package-dir"].get(package, "")
        if package not in setuptools["package-dir"]:  # a subpackage inside its parent's folder
            parent, _, leaf = package.rpartition(".")
            source = ROOT / setuptools["package-dir"][parent] / leaf
        target = dest / package.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            (target / module.name).symlink_to(module)
    return dest


def lint_imports(tree: Path, config: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "300"}
    return subprocess.run([exe, str(config), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True)


def test_the_import_contracts_hold(tmp_path):
    tree = lay_out_package(tmp_path / "tree")
    done = lint_imports(tree, ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "KEPT" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the server imports the device side
        ("server/strategy.py", "from fedge.edge_client.planning import plan", "layers"),
        ("quantization/common/fsutil.py", "from fedge.server import state", "layers"),  # shared imports a side
        # plan imports costs
        ("edge_client/planning/costs.py", "from fedge.edge_client.planning import plan", "no import cycles"),
        # the device side's rooms: training sits below the device, planning beside training, the agent below federation
        ("edge_client/training/train.py", "from fedge.edge_client.device import profiling", "rooms"),
        ("edge_client/planning/plan.py", "from fedge.edge_client.training import train", "rooms"),
        ("edge_client/agent/hold.py", "from fedge.edge_client.federation import service", "rooms"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, broken):
    tree = lay_out_package(tmp_path / "tree")
    link = next(p for p in tree.rglob(Path(module).name) if p.resolve() == (ROOT / module).resolve())
    text = link.read_text()
    link.unlink()
    link.write_text(text + f"\n\ndef _added_by_the_test():\n    {line}\n")
    done = lint_imports(tree, ROOT / "pyproject.toml")
    assert done.returncode != 0
    report = done.stdout.split("Broken contracts")[-1]
    assert broken in report and line.split()[-1] in report


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists its packages by hand (folders are mapped onto one import name): a new room left out of the
    list would be missing from the installed package while the editable install still finds it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {ROOT / folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        folder = init.parent
        base = max((d for d in mapped if folder == d or d in folder.parents), key=lambda d: len(d.parts), default=None)
        if base is not None:
            found.add(".".join([mapped[base], *folder.relative_to(base).parts]))
    assert found == set(setuptools["packages"])


@pytest.mark.parametrize(("folder", "name"), [("quantization/common", "fedge.quantization.common"),
                                               ("edge_client/fedge", "fedge.edge_client.fedge")])  # fmt: skip
def test_a_mapped_folder_refuses_its_second_name(folder, name):
    """A folder mapped onto a name of its own sits inside another package's folder, which an editable install also
    reaches: imported under that second name its modules would exist twice (two settings classes, two caches)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / folder / "__init__.py")
    with pytest.raises(ImportError, match="import fedge"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
