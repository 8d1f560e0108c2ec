"""``make images REGISTRY=...``: both images built and tagged under the registry given (read with
``make -n``, the commands make would run: no Docker daemon here), and refused without one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args],
                          capture_output=True, text=True, timeout=60)


def test_make_images_builds_and_tags_both_under_the_registry():
    done = make("-n", "images", "REGISTRY=registry.example.com/ml")
    assert done.returncode == 0, done.stderr
    builds = [line.split() for line in done.stdout.splitlines() if " build " in line]
    assert builds == [
        ["docker", "build", "-f", "images/train/Dockerfile", "-t",
         f"registry.example.com/ml/prolong-train:{VERSION}", "."],
        ["docker", "build", "-f", "images/operator/Dockerfile", "-t",
         f"registry.example.com/ml/prolong-operator:{VERSION}", "."]]
    podman = make("-n", "images", "REGISTRY=r.example/x", "DOCKER=podman")
    assert [line.split()[0] for line in podman.stdout.splitlines() if " build " in line] == \
        ["podman", "podman"]


def test_make_images_without_a_registry_is_refused_before_any_build():
    done = make("images", "DOCKER=false")  # a build would fail differently
    assert done.returncode != 0
    assert "make images REGISTRY=<registry>/<path>" in done.stderr
    assert "build" not in done.stdout
