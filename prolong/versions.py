"""Versions of the libraries a run depends on, logged with every run and written to manifests."""

from __future__ import annotations

import platform
from importlib import metadata

TRACKED = ("prolong", "torch", "deepspeed", "transformers", "tokenizers", "datasets", "ray",
           "pydantic", "flash-attn", "flash-attn-4", "kopf", "kubernetes")


def versions() -> dict[str, str | None]:
    """Installed version of each tracked distribution (None when absent), plus Python's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def summary() -> str:
    return " ".join(f"{k}={v}" for k, v in versions().items() if v is not None)
