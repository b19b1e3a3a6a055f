"""Import order must not matter: each data module imports on its own, and no pronghorn modules import each other
at module level (a cycle that works only by statement order fails here, not in a user's import)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pronghorn

PACKAGE = Path(pronghorn.__file__).parent
DATA_MODULES = sorted(f"pronghorn.data.{p.stem}" for p in (PACKAGE / "data").glob("*.py") if p.stem != "__init__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module):
    """Imports run when the module is imported (not those inside functions or under ``TYPE_CHECKING``)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the pronghorn modules (not packages) it imports at module level."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    packages = {name for name, p in paths.items() if p.name == "__init__.py"}
    graph = {}
    for name, path in paths.items():
        if name in packages:
            continue  # a package's __init__ importing its modules is not a cycle
        base = name.rpartition(".")[0]
        targets = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            parent = base
            for _ in range(node.level - 1):
                parent = parent.rpartition(".")[0]
            module = (f"{parent}.{node.module}" if node.module else parent) if node.level else node.module
            targets.add(module)
            targets.update(f"{module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in paths and t not in packages and t != name}
    return graph


def test_no_module_level_import_cycles():
    graph = _import_graph()
    assert "pronghorn.data.formats" in graph and graph["pronghorn.data.oasst"]
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_each_data_module_imports_fresh():
    assert "pronghorn.data.oasst" in DATA_MODULES and "pronghorn.data.pretokenized" in DATA_MODULES
    code = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
            "from pronghorn.data import FORMATS; print(FORMATS)")

    def run(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, module], cwd=PACKAGE.parent, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(zip(DATA_MODULES, pool.map(run, DATA_MODULES)))
    failed = {m: r.stderr.strip().splitlines()[-1:] for m, r in results.items() if r.returncode}
    assert not failed, failed
    outputs = {r.stdout for r in results.values()}
    assert len(outputs) == 1 and "'oasst', 'tokenized'" in outputs.pop()  # the same formats whatever is imported
