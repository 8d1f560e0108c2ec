"""Where a stage's storage is: a local path or an object-store URI. Pure string rules, no I/O and
no pyarrow, so that rendering (and every ``prolongctl`` start-up) does not load a filesystem
layer just to tell the two apart."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
"""A hub repository id: organisation/name, one slash."""


def is_object_store(uri: str) -> bool:
    """``s3://...``, ``gs://...`` (any ``scheme://``) as opposed to a local path."""
    return "://" in uri


def absolute(uri: str) -> str:
    """Workers and pods run in another directory: local paths travel absolute, URIs as given."""
    return uri if is_object_store(uri) else str(Path(uri).resolve())


def is_hub_id(source: str) -> bool:
    """Whether a model or tokenizer ``source`` names a hub repository (org/name) rather than a
    place on storage: not an object-store URI, not an absolute or ./ path, not an existing
    local directory. Here, beside the other source rules, because the spec rules use it and
    must not import the staging code (which reaches the stage directory layer)."""
    if is_object_store(source) or source.startswith(("/", ".", "~")):
        return False
    return HUB_ID.fullmatch(source) is not None and not Path(source).is_dir()
