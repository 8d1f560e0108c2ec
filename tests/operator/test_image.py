"""The operator image installs only a few of prolong's dependencies (the ``keep`` set of its
Dockerfile): the handlers must import none of the training stack (torch, ray, deepspeed,
transformers, ...), and every module they import must be one the image has: the standard
library, prolong itself, or a distribution the image installs (the ``keep`` set and what pip
resolves for it, read from the installed distributions' metadata)."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.k8s.conftest import REPO

DOCKERFILE = REPO / "images" / "operator" / "Dockerfile"
# import name -> distribution name where they differ
DISTRIBUTION = {"yaml": "pyyaml"}
NEVER = {"torch", "ray", "deepspeed", "transformers", "tokenizers", "datasets", "rich", "typer",
         "matplotlib"}


def imported_by_handlers(only: set[str] | None = None) -> set[str]:
    """Top-level modules that importing operator/handlers.py loads. ``only``: as in the image,
    any other top-level module is not there (an import finder refuses it, so an optional import
    takes its fallback and a required one fails this call with the ImportError)."""
    code = (
        "import importlib.util, json, sys\n"
        "class Image:\n"
        "    def __init__(self, finder):\n"
        "        self.finder = finder\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        top = name.split('.')[0]  # _sysconfigdata_*: the platform's stdlib data\n"
        "        if top not in ONLY and not top.startswith('_sysconfigdata'):\n"
        "            return None  # not installed: the import raises ModuleNotFoundError\n"
        "        return self.finder.find_spec(name, path, target)\n"
        "if ONLY is not None:\n"
        "    sys.meta_path[:] = [Image(f) for f in sys.meta_path]\n"
        "before = set(sys.modules)\n"
        f"spec = importlib.util.spec_from_file_location('handlers', {str(REPO / 'operator' / 'handlers.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in set(sys.modules) - before})))\n")
    only = None if only is None else sorted(only)
    out = subprocess.run([sys.executable, "-c", f"ONLY = {only!r}\n" + code], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"importing operator/handlers.py failed:\n{out.stderr[-3000:]}"
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def image_keeps() -> set[str]:
    match = re.search(r"keep = \{([^}]*)\}", DOCKERFILE.read_text())
    assert match, f"{DOCKERFILE}: no keep = {{...}} set"
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def installed_with(distributions: set[str]) -> set[str]:
    """``distributions`` and everything pip installs for them (their requirements without
    extras, for this Python), as canonical names."""
    todo, seen = [canonicalize_name(d) for d in distributions], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def importable_in_image() -> set[str]:
    """Top-level modules the operator image can import."""
    installed = installed_with(image_keeps())
    provided = {module for module, dists in metadata.packages_distributions().items()
                if any(canonicalize_name(d) in installed for d in dists)}
    return provided | set(sys.stdlib_module_names) | {"prolong"}


def test_operator_imports_fit_its_image():
    imported = imported_by_handlers()
    assert not imported & NEVER, f"the operator imports {sorted(imported & NEVER)}"
    assert {"kopf", "kubernetes", "pydantic", "yaml"} <= imported
    # As in the image: with only what it installs importable, the handlers still import (an
    # import of anything else fails here, naming the module).
    in_image = imported_by_handlers(only=importable_in_image())
    assert {"kopf", "kubernetes", "pydantic", "yaml"} <= in_image


def test_a_module_outside_the_image_is_not_importable_there():
    """The allowed set is not everything in this venv: the training stack and the CLI's
    libraries are outside it, what the kept distributions pull in is inside."""
    allowed = importable_in_image()
    assert not allowed & (NEVER | {"numpy", "hypothesis", "pytest"}), sorted(allowed & NEVER)
    assert {"kopf", "kubernetes", "pydantic", "yaml", "pyarrow", "aiohttp", "urllib3"} <= allowed
