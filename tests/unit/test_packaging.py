"""The installed distribution: one import namespace (`stillhouse.*`) over the top-level folders."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TOP = ("flows", "tasks", "storage")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_under_the_stillhouse_namespace():
    st = _pyproject()["tool"]["setuptools"]
    listed = set(st["packages"])
    found = {
        "stillhouse." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
    assert st["package-dir"] == {f"stillhouse.{t}": t for t in TOP}
    assert _pyproject()["project"]["scripts"]["stillhouse"] == "stillhouse.flows.cli:main"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("top", ["flows", "tasks", "storage", "tests", "bench"])
def test_no_import_uses_the_old_generic_top_level_names(top):
    bad = [
        f"{f.relative_to(ROOT)}: {name}"
        for f in (ROOT / top).rglob("*.py")
        for name in _imports(f)
        if name.split(".")[0] in TOP and f.name != "vllm_worker.py"
    ]
    assert not bad


def test_tasks_and_storage_never_import_prefect():
    bad = [
        f"{f.relative_to(ROOT)}: {name}"
        for top in ("tasks", "storage")
        for f in (ROOT / top).rglob("*.py")
        for name in _imports(f)
        if name.split(".")[0] == "prefect"
    ]
    assert not bad


def test_the_vllm_worker_imports_only_the_standard_library_pyarrow_and_vllm():
    import sys

    worker = ROOT / "tasks" / "backends" / "vllm_worker.py"
    roots = {name.split(".")[0] for name in _imports(worker)}
    assert roots - set(sys.stdlib_module_names) <= {"pyarrow", "vllm"}
    # It runs as `python -m tasks.backends.vllm_worker`: the packages above it import nothing.
    for init in (ROOT / "tasks" / "__init__.py", ROOT / "tasks" / "backends" / "__init__.py"):
        assert not _imports(init)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "stillhouse." + ".".join(parts)


def test_no_import_circles():
    """Module-level and function-level imports alike: a circle hidden inside a function is still one."""
    modules = {_module_name(f): f for top in TOP for f in (ROOT / top).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path):
            # `from stillhouse.tasks.verify import score` names a module; `from x.y import f` a function
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                deps |= {f"{node.module}.{a.name}" for a in node.names} & set(modules)
        # A module's own packages are imported before it whatever it imports: not an edge.
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
