"""The import contract of the execution layer: layers (pyproject's import-linter contract), no cycles,
internal imports at module top, and `excise --help` without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parent.parent / "src" / "excise"
ROOT = SRC.parent.parent
# The CLI imports its command groups at start-up; they import the API inside each command so
# that `excise --help` never loads torch.
LAZY_OK = ("cli.py", "commands/")


def test_layers_contract():
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]


def test_no_import_cycles():
    graph = grimp.build_graph("excise")
    cycles = []
    for mod in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(mod):
            if imported.startswith(mod + "."):  # a package importing its own submodules (registration)
                continue
            chain = graph.find_shortest_chain(importer=imported, imported=mod)
            if chain:
                cycles.append(" -> ".join((mod,) + tuple(chain)))
    assert not cycles, "\n".join(cycles[:10])


def _function_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("excise"):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.module}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("excise") for a in node.names):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_internal_imports_at_module_top():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if not rel.startswith(LAZY_OK):
            found += _function_imports(path)
    assert not found, f"{len(found)} internal imports inside functions:\n" + "\n".join(found[:40])


def test_help_does_not_import_torch():
    code = "import sys; from excise.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_file_over_400_lines():
    long = [f"{p.relative_to(SRC)}: {n}" for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420]
    assert not long, long
