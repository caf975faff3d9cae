"""No import loops inside sage_builder, and every module imports on its own.

A loop is what made modules need an import-order crutch (``import sage_builder.config  # noqa``
before anything else); these tests fail as soon as a new one appears, naming the modules in it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sage_builder"


def module_files() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(name: str, path: Path, module_level_only: bool) -> set[str]:
    """Every module an import statement in ``path`` names (``from a import b`` names ``a`` and ``a.b``).

    Imports under ``if TYPE_CHECKING:`` never run and are left out.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()

    def visit(nodes: list[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
            if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit(children)

    visit(ast.parse(path.read_text()).body)
    return names


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """module -> the sage_builder modules it imports (its own parent packages left out: Python imports a
    package's ``__init__`` before its modules, so those edges are no loop)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for imported in imported_names(name, path, module_level_only):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in files and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        loops.append(sorted(component))
    return loops


def test_the_loop_finder_finds_a_loop():
    assert import_loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_loops({"a": {"b"}, "b": set()}) == []


def test_no_import_loops_at_module_level():
    assert import_loops(import_graph(module_level_only=True)) == []


def test_no_import_loops_counting_imports_inside_functions():
    """A function-level import back into a module that imports you is a loop postponed, not removed.

    One exception: the assembled config tree (``sage_builder.config``) imports every stage's section,
    so a module that loading the config never imports may import it lazily (a judge that builds an
    ``LLMConfig``). A module the config loads at import time may not (``store.py`` once did).
    """
    module_level = import_graph(module_level_only=True)
    loaded_with_config, todo = set(), ["sage_builder.config"]
    while todo:
        for target in module_level[todo.pop()] - loaded_with_config:
            loaded_with_config.add(target)
            todo.append(target)
    graph = {}
    for name, edges in import_graph(module_level_only=False).items():
        lazy_config_ok = name not in loaded_with_config
        graph[name] = module_level[name] | (edges - {"sage_builder.config"} if lazy_config_ok else edges)
    assert import_loops(graph) == []


def test_stages_never_import_each_other():
    """A stage reads another's outputs, never its modules (STYLE.md): shared code lives outside
    ``stages/`` (``diffusion.py``, ``adapter.py``, ``user_embedding.py``). Config sections are the
    exception: the typed config is one tree (``sage_builder.config`` assembles every section)."""
    offenders = []
    for name, edges in import_graph(module_level_only=False).items():
        parts = name.split(".")
        if len(parts) < 4 or parts[1] != "stages":
            continue
        for target in edges:
            other = target.split(".")
            if (len(other) >= 4 and other[1] == "stages" and other[2] not in (parts[2], "base")
                    and other[-1] != "config"):
                offenders.append(f"{name} -> {target}")
    assert sorted(offenders) == []


def test_no_import_order_crutches():
    """No module imports another only for its side effect of being imported first, or late on purpose."""
    crutch = re.compile(r"^import sage_builder\.\S+\s+# noqa|# noqa: E402|^# Imported late", re.MULTILINE)
    offenders = [str(path.relative_to(ROOT)) for path in module_files().values() if crutch.search(path.read_text())]
    assert offenders == []


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    optional = {"vllm", "ray"}  # extras; their modules must still import when the extra is missing
    script = ("import importlib, sys\n"
              "failed = []\n"
              "for name in sys.argv[1:]:\n"
              "    import subprocess\n"
              "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
              "    if r.returncode: failed.append(name + ': ' + (r.stderr.strip().splitlines() or ['?'])[-1])\n"
              "print('\\n'.join(failed))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    names = [name for name in module_files() if not any(part in optional for part in name.split("."))]
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=1200)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
