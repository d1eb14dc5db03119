"""The layers contract is real: lint-imports passes on the package and fails on one upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this copy of compress, not the installed one
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "compress", tmp_path / "compress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_its_layers(copy) -> None:
    proc = lint(copy)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout + proc.stderr


def test_an_upward_import_inside_a_function_breaks_the_contract(copy) -> None:
    """infra is the bottom layer: importing the CLI from it, even lazily inside a function, is refused by name."""
    errors = copy / "compress" / "infra" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from compress.cli.main import main\n\n"
                      "    return main\n")
    proc = lint(copy)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout
    assert "compress.infra is not allowed to import compress.cli" in proc.stdout
    assert "compress.infra.errors -> compress.cli.main" in proc.stdout


def test_no_module_imports_itself_back() -> None:
    """No import cycles inside a layer either (the contract sees only imports between layers): no module reaches,
    through its imports, a module that imports it."""
    import grimp

    graph = grimp.build_graph("compress")
    cycles = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                     if graph.chain_exists(importer=b, imported=a)})
    assert cycles == []
