"""Where a stage's storage is: a local path or an object-store URI. Pure string rules, no I/O and
no pyarrow, so that rendering (and every ``prolongctl`` start-up) does not load a filesystem
layer just to tell the two apart."""

from __future__ import annotations

from pathlib import Path


def is_object_store(uri: str) -> bool:
    """``s3://...``, ``gs://...`` (any ``scheme://``) as opposed to a local path."""
    return "://" in uri


def absolute(uri: str) -> str:
    """Workers and pods run in another directory: local paths travel absolute, URIs as given."""
    return uri if is_object_store(uri) else str(Path(uri).resolve())
