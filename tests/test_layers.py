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
        ("server/strategy.py", "from fedge.edge_client import plan", "layers"),  # the server imports the device side
        ("edge_client/fedge/common/fsutil.py", "from fedge.server import state", "layers"),  # shared imports a side
        ("edge_client/costs.py", "from fedge.edge_client import plan", "no import cycles"),  # plan imports costs
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
