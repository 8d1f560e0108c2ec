"""The package's shape: no import cycles, no private imports across modules, and each name of the
stage contract defined in exactly one place.

The import graph is read from the source (ast), imports inside functions and under TYPE_CHECKING
included: a cycle hidden in a function body is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((REPO / "prolong").rglob("*.py")), REPO / "operator" / "handlers.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in SOURCES}


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """(target module, imported name or "", line) for every import of one of our modules."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    out.append((sub, "", node.lineno))
                elif target in MODULES:
                    out.append((target, alias.name, node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports. A module importing its own parent package is left out:
    Python runs the package's __init__ first anyway, and it is no dependency of the module."""
    graph = {}
    for module in MODULES:
        graph[module] = {t for t, _, _ in imports_of(module)
                         if t != module and not module.startswith(t + ".")}
    return graph


def find_cycles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # prolong.cli imports the runner only when `prolongctl run` runs
    assert "prolong.run.runner" in graph["prolong.cli"]
    assert "prolong.stage.identity" in graph["prolong.run.runner"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among our modules:\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    found = [f"{MODULES[m].relative_to(REPO)}:{line}: imports {name} from {target}"
             for m in MODULES for target, name, line in imports_of(m)
             if name.startswith("_") and target != m]
    assert not found, "\n".join(found)


# Each name of the stage contract (and the few values the issue found decided twice) is assigned
# at module level in exactly one module.
DEFINED_ONCE = {
    "StageRef": "prolong.stage.identity",
    "stage_id": "prolong.stage.identity",
    "SCHEDULING_ONLY": "prolong.stage.identity",
    "pipeline_stages": "prolong.stage.identity",
    "standalone_stage": "prolong.stage.identity",
    "RAYJOB_NAME_MAX": "prolong.stage.names",
    "JOB_NAME_MAX": "prolong.stage.names",
    "DNS_1035": "prolong.stage.names",
    "rayjob_name": "prolong.stage.names",
    "attempt_rayjob_name": "prolong.stage.names",
    "PIPELINE_LABEL": "prolong.stage.names",
    "STAGE_ID_LABEL": "prolong.stage.names",
    "StageDir": "prolong.stage.directory",
    "Manifest": "prolong.stage.directory",
    "COMPLETE": "prolong.stage.directory",
    "MANIFEST": "prolong.stage.directory",
    "STAGE_FILE": "prolong.stage.payload",
    "JOB_FILE": "prolong.stage.payload",
    "StageRun": "prolong.stage.payload",
    "IGNORE_INDEX": "prolong.data.packing",
    "ParallelDims": "prolong.parallel.dims",
    "build_engine": "prolong.train.engine",
    "plan_pipeline": "prolong.reconcile.planner",
    "ObservedRayJob": "prolong.reconcile.observe",
    "PipelineStatus": "prolong.reconcile.status",
    "METRICS": "prolong.train.metrics",
}


def _module_level_definitions(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize("name", sorted(DEFINED_ONCE))
def test_contract_names_are_defined_once(name):
    where = [m for m in MODULES if name in _module_level_definitions(m)]
    assert where == [DEFINED_ONCE[name]], f"{name} is defined in {where}"


def test_the_stage_package_depends_only_on_the_spec():
    graph = import_graph()
    for module in (m for m in MODULES if m.startswith("prolong.stage")):
        outside = {t for t in graph[module] if not t.startswith(("prolong.stage", "prolong.spec"))}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_the_planner_depends_only_on_stage_and_spec():
    graph = import_graph()
    for module in (m for m in MODULES if m.startswith("prolong.reconcile")):
        outside = {t for t in graph[module]
                   if not t.startswith(("prolong.reconcile", "prolong.stage", "prolong.spec"))}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_the_run_layer_sits_above_train_and_eval():
    """prolong.run (stage order, locks, skips, the run's summary and report) drives training and
    eval stages; neither imports it, and the training engine does not import the eval harness."""
    graph = import_graph()
    found = []
    for module in sorted(MODULES):
        below = module.startswith(("prolong.train", "prolong.eval"))
        for target in sorted(graph[module]):
            if below and (target == "prolong.run" or target.startswith("prolong.run.")):
                found.append(f"{module} imports {target}")
            if module.startswith("prolong.train") and target.startswith("prolong.eval"):
                found.append(f"{module} imports {target}")
    assert not found, "\n".join(found)
    assert "prolong.run.runner" in graph["prolong.cli"]
    assert {"prolong.train.entry", "prolong.eval.job"} <= graph["prolong.run.runner"]
