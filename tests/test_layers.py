"""The import-linter contract of pyproject.toml holds, and it fails on an upward import.

import-linter reads packages from the file system; `pipelines/` is installed as `dalpsr.pipelines` (a package-dir
mapping), so the check runs on a copy laid out as a wheel installs it: `dalpsr/` with `pipelines/` inside.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter")


def installed_layout(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "dalpsr", dst / "dalpsr", ignore=ignore)
    shutil.copytree(ROOT / "pipelines", dst / "dalpsr" / "pipelines", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_layers_contract_holds(tmp_path):
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken" in result.stdout


def test_an_upward_function_level_import_breaks_it(tmp_path):
    tree = installed_layout(tmp_path)
    tiling = tree / "dalpsr" / "tiling.py"
    tiling.write_text(
        tiling.read_text() + "\n\ndef _upward():\n    from dalpsr.loaders.dat import load_dat_checkpoint\n\n"
        "    return load_dat_checkpoint\n"
    )
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "dalpsr.tiling -> dalpsr.loaders.dat" in result.stdout
