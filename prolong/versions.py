"""Versions of the libraries a run depends on, logged with every run and written to manifests."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

TRACKED = ("prolong", "torch", "deepspeed", "transformers", "tokenizers", "datasets", "ray",
           "pydantic", "flash-attn", "flash-attn-3", "flash-attn-4", "kopf", "kubernetes")


def attention_kernels() -> str | None:
    """The attention kernel each backend ran in this process (``flash_attn=flash-attn-3 3.0.0``),
    or None before any ran. Read without importing torch: a process that never loaded the
    attention module ran none."""
    attention = sys.modules.get("prolong.model.attention")
    if attention is None:
        return None
    ran = attention.kernels_run()
    return ",".join(f"{backend}={kernel}" for backend, kernel in sorted(ran.items())) or None


def versions() -> dict[str, str | None]:
    """Installed version of each tracked distribution (None when absent), plus Python's and the
    attention kernels that ran (``attention-kernel``)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["attention-kernel"] = attention_kernels()
    return found


def summary() -> str:
    return " ".join(f"{k}={v}" for k, v in versions().items() if v is not None)
