"""The architecture as tests: import-linter's contracts (pyproject.toml) hold, they catch a violation, and no
module or class outgrows the size the team agreed on."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fct_registry"
LINT = Path(sys.executable).parent / "lint-imports"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_every_contract_is_kept():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("vectors/search.py", "import mlflow", "mlflow is imported only by the registry's MLflow store"),
    ("core/errors.py", "import fct_registry.cli.app", "Layers"),
    ("engines/local.py", "import fct_registry.engines.ray_engine", "Upgrade engines never import each other"),
    ("registry/versions.py", "import fct_registry.method.training", "No torch below the method"),
    ("usecases/upgrade.py", "import rich", "Terminal output (typer, rich) only in the CLI"),
])
def test_a_violation_breaks_its_contract(tmp_path, module, line, broken):
    shutil.copytree(PACKAGE, tmp_path / "fct_registry", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "fct_registry" / module
    target.write_text(target.read_text() + f"\n{line}  # injected by the test\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    summary = " ".join(result.stdout.split("Analyzed")[1].split())  # contract lines, unwrapped
    verdict = re.match(r".*?\b(KEPT|BROKEN)\b", summary[summary.index(broken):])
    assert verdict is not None and verdict.group(1) == "BROKEN", summary


def python_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", python_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_classes_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by responsibility"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, f"class {node.name} in {path.name}"
