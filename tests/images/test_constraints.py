"""images/constraints.txt against what declares and what installs the dependencies: every pin
satisfies the ranges of pyproject.toml (runtime dependencies, extras, build requirements) and the
Makefile's torch and DeepSpeed, and the environment the tests run in is the pinned one (``make
setup`` installs with the file; ``make lock`` rewrites it)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "images" / "constraints.txt"
MAKEFILE = REPO / "Makefile"


def pins(text: str) -> dict[str, Version]:
    """name -> pinned version of a constraints file (one ``name==version`` a line)."""
    out = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt:{number}: {line} is not a pin"
        out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def declared() -> list[tuple[str, Requirement]]:
    """(where, requirement) of every requirement pyproject.toml and the Makefile declare."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    out = [("project.dependencies", Requirement(r)) for r in data["project"]["dependencies"]]
    for extra, reqs in data["project"]["optional-dependencies"].items():
        out += [(f"project.optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    out += [("build-system.requires", Requirement(r)) for r in data["build-system"]["requires"]]
    make = MAKEFILE.read_text()
    for var in ("TORCH_CPU", "DEEPSPEED"):
        value = re.search(rf"^{var}\s*:=\s*(.+)$", make, re.M)[1].strip()
        out.append((f"Makefile {var}", Requirement(value)))
    return out


def violations(pinned: dict[str, Version], reqs: list[tuple[str, Requirement]]) -> list[str]:
    """One line per pin outside a declared range (unpinned requirements are not checked here:
    an extra that no environment installs, such as gpu's flash-attn, has no pin)."""
    out = []
    for where, req in reqs:
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = pinned.get(canonicalize_name(req.name))
        if version is not None and not req.specifier.contains(version, prereleases=True):
            out.append(f"{where}: {req} excludes the pinned {req.name}=={version}")
    return out


def test_every_pin_satisfies_the_declared_ranges() -> None:
    pinned = pins(CONSTRAINTS.read_text())
    assert violations(pinned, declared()) == []
    # The runtime dependencies are all pinned (the images install nothing unpinned).
    runtime = [r for w, r in declared() if w == "project.dependencies"]
    assert [r.name for r in runtime if canonicalize_name(r.name) not in pinned] == []


def test_a_pin_outside_a_range_is_reported() -> None:
    pinned = {"deepspeed": Version("0.20.1"), "torch": Version("2.13.0")}
    reqs = [("project.dependencies", Requirement("deepspeed>=0.19.8,<0.20")),
            ("Makefile TORCH_CPU", Requirement("torch==2.13.0")),
            ("project.dependencies", Requirement("torch>=2.6; python_version < '3'"))]
    assert violations(pinned, reqs) == [
        "project.dependencies: deepspeed<0.20,>=0.19.8 excludes the pinned deepspeed==0.20.1"]


def test_the_tests_run_on_the_pinned_versions() -> None:
    """What `make setup` installed is what the file pins (local labels aside: the CPU torch is
    2.13.0+cpu). A mismatch means the venv was upgraded without `make lock`, or the file was
    edited by hand: the images would not get what the tests ran with."""
    wrong = []
    for name, version in pins(CONSTRAINTS.read_text()).items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}=={version}: not installed")
            continue
        if installed.public != version.public:
            wrong.append(f"{name}=={version}: {installed} installed")
    assert wrong == [], "run `make lock` (or `make setup` after a pull): " + "; ".join(wrong)


def test_setup_installs_with_the_constraints() -> None:
    recipe = MAKEFILE.read_text().split("\n$(STAMP):", 1)[1].split("\n\n", 1)[0]
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert len(installs) == 4
    assert all("--constraint $(CONSTRAINTS)" in line for line in installs), installs
    assert re.search(r"^CONSTRAINTS\s*:=\s*images/constraints.txt$", MAKEFILE.read_text(), re.M)
