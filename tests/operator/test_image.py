"""The operator image installs only a few of prolong's dependencies (the ``keep`` set of its
Dockerfile): the handlers must import none of the training stack (torch, ray, deepspeed,
transformers, ...), and each of our direct dependencies they do import must be in that set."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.k8s.conftest import REPO

DOCKERFILE = REPO / "images" / "operator" / "Dockerfile"
# import name -> distribution name where they differ
DISTRIBUTION = {"yaml": "pyyaml"}
NEVER = {"torch", "ray", "deepspeed", "transformers", "tokenizers", "datasets", "rich", "typer",
         "matplotlib"}


def imported_by_handlers() -> set[str]:
    code = (
        "import importlib.util, json, sys\n"
        "before = set(sys.modules)\n"
        f"spec = importlib.util.spec_from_file_location('handlers', {str(REPO / 'operator' / 'handlers.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in set(sys.modules) - before})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def image_keeps() -> set[str]:
    match = re.search(r"keep = \{([^}]*)\}", DOCKERFILE.read_text())
    assert match, f"{DOCKERFILE}: no keep = {{...}} set"
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def test_operator_imports_fit_its_image():
    imported = imported_by_handlers()
    assert not imported & NEVER, f"the operator imports {sorted(imported & NEVER)}"
    ours = {"kopf", "kubernetes", "pydantic", "yaml", "pyarrow"}
    assert {"kopf", "kubernetes", "pydantic", "yaml"} <= imported
    needed = {DISTRIBUTION.get(name, name) for name in imported & ours}
    assert needed <= image_keeps(), f"{DOCKERFILE} does not install {sorted(needed - image_keeps())}"
