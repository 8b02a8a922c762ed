"""The package's shape: one-way layers (import-linter's contracts in pyproject.toml), no prefopt import hidden
inside a function, no function longer than a screen, and entry points that nothing imports."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "prefopt"
ENTRY_POINTS = {"run", "sft", "pairs", "evaluate", "reference", "report", "dcr", "wandb_dashboard", "ches"}
MAX_FUNCTION_LINES = 80


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is in the test extra: pip install -e .[test]"
    out = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_no_prefopt_import_inside_a_function():
    hidden = []
    for path, tree in modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefopt"):
                        hidden.append(f"{path.relative_to(REPO)}:{node.lineno} from {node.module}")
                    if isinstance(node, ast.Import) and any(a.name.startswith("prefopt") for a in node.names):
                        hidden.append(f"{path.relative_to(REPO)}:{node.lineno} import")
    assert hidden == []


def test_no_function_is_longer_than_a_screen():
    long = []
    for path, tree in modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
                if fn.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name} ({fn.end_lineno - start + 1} lines)")
    assert long == []


def test_no_library_module_imports_an_entry_point():
    offenders = []
    for path, tree in modules():
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in {f"prefopt.{e}" for e in ENTRY_POINTS} and name not in {f"prefopt.{e}" for e in ENTRY_POINTS}:
                    offenders.append(f"{name} imports {t}")
    assert offenders == []


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_is_thin(entry):
    """An entry point parses arguments and hands over: no class of its own, at most a few short functions."""
    tree = ast.parse((PACKAGE / f"{entry}.py").read_text())
    assert not [n for n in tree.body if isinstance(n, ast.ClassDef)]
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert len(functions) <= 3 and all(f.end_lineno - f.lineno < 40 for f in functions)
