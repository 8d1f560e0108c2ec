"""The layout of prolong.spec: what it imports, and that the package re-exports its modules' names."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import prolong.spec

MODULES = ("helmet", "issues", "models", "rules")
NOT_IMPORTED = ("prolong.eval", "prolong.stage.identity", "prolong.stage.directory",
                "prolong.stage.payload", "prolong.k8s", "prolong.train")


def test_spec_imports_no_eval_stage_internals_k8s_or_train():
    # A fresh interpreter: other tests have long imported these packages into this one.
    code = ("import sys, prolong.spec; "
            f"print(' '.join(m for m in sys.modules if m.startswith({NOT_IMPORTED!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def _defined(module) -> set[str]:
    names = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_package_reexports_every_public_name_of_its_modules():
    for name in MODULES:
        module = importlib.import_module(f"prolong.spec.{name}")
        for attr in _defined(module):
            assert attr in prolong.spec.__all__, f"prolong.spec does not re-export {name}.{attr}"
            assert getattr(prolong.spec, attr) is getattr(module, attr)
