"""Imports: every module of hooked_vlm and weights_conversion imports alone in a fresh interpreter; no function body
imports an internal module (where an import cycle could hide until the function runs); and the internal imports
that run when a module is imported form no cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hooked_vlm", "weights_conversion")


def find_modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name), found by walking the folders."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = find_modules()


def is_internal(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_statements(body: list[ast.stmt]):
    """The import statements that run when a module is imported: at module level, in class bodies and in `if` /
    `try` / `with` blocks, not in functions nor under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from import_time_statements(node.body)
            yield from import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from import_time_statements(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from import_time_statements(node.body)


def targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement of `module` names (`from pkg import sub` names the submodule `pkg.sub`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


@pytest.mark.slow  # ~20 s on 2 cores: one child interpreter per module
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter loads the third-party libraries the modules import (what every fresh interpreter would do,
    paid once), then forks a child per module that imports that module alone, none of ours loaded before it: an
    import cycle shows as an ImportError of a partly initialised module, in whichever module enters the cycle
    first."""
    third_party = sorted({ast.unparse(node) for module, path in MODULES.items()
                          for node in import_time_statements(ast.parse(path.read_text()).body)
                          if not any(is_internal(t) for t in targets(module, node))
                          and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")})
    script = r"""
import importlib, json, os, sys, traceback
modules, preload = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for statement in preload:
    try:
        exec(statement, {})
    except Exception:  # an optional library: the module importing it will say
        pass
assert not [m for m in sys.modules if m.split(".")[0] in ("hooked_vlm", "weights_conversion")]
failures, running, slots = {}, {}, max(1, len(os.sched_getaffinity(0)))

def reap():
    pid, status = os.wait()
    name = running.pop(pid)
    if os.waitstatus_to_exitcode(status) != 0 and name not in failures:
        failures[name] = f"exit status {os.waitstatus_to_exitcode(status)}"

for name in modules:
    while len(running) >= slots:
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            sys.stderr.write(f"--- {name}\n{traceback.format_exc()}")
            os._exit(1)
        os._exit(0)
    running[pid] = name
while running:
    reap()
print(json.dumps(sorted(failures)))
"""
    run = subprocess.run([sys.executable, "-c", script, json.dumps(sorted(MODULES)), json.dumps(third_party)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failed, f"modules that do not import alone: {failed}\n{run.stderr[-6000:]}"


def test_no_function_imports_an_internal_module():
    """Internal imports sit at module top, so that a cycle fails at import, not when a function first runs.
    Third-party imports may stay in functions (optional or heavy libraries, used on one path)."""
    found = set()
    for module, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                found |= {f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(fn)
                          if isinstance(node, (ast.Import, ast.ImportFrom))
                          and any(is_internal(t) for t in targets(module, node))}
    assert not found, "internal imports inside functions (move them to the top):\n" + "\n".join(sorted(found))


def test_import_graph_has_no_cycle():
    """The internal imports each module runs at import, as a graph (`from pkg import sub` is an edge to `pkg.sub`;
    the parent packages Python runs first are not edges: they are how a package re-exports its modules), has no
    cycle: the loader imports the converters, the converters import configs, and nothing imports back."""
    graph = {module: sorted({t for node in import_time_statements(ast.parse(path.read_text()).body)
                             for t in targets(module, node) if t in MODULES and t != module})
             for module, path in MODULES.items()}
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in graph:
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
