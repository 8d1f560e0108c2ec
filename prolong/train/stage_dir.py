"""The stage directory: ``<storageRoot>/<pipeline>/<stage>-<id>/``.

Holds ``manifest.json`` (spec, id, upstream ids, versions, final checkpoint path, summary metrics),
``metrics.jsonl`` (one JSON object per step), Ray Train's checkpoints, ``final/`` (HF weights and
tokenizer) and, written last, the marker ``COMPLETE``. A stage is complete exactly when the marker
exists: everything it vouches for was written before it, so a crash at any point leaves either a
complete stage or one that the next submission resumes.

Paths may be local (relative paths are made absolute) or object-store URIs (``s3://``, ``gs://``);
``pyarrow.fs`` handles both, so workers on a cluster and the operator read the same layout.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from prolong.pipeline import StageRef

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
FINAL = "final"
COMPLETE = "COMPLETE"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a path in it; local relative paths are made absolute."""
    if "://" not in uri:
        uri = str(Path(uri).resolve())
    return pafs.FileSystem.from_uri(uri)


class StageDir:
    """Reads and writes one stage's directory."""

    def __init__(self, uri: str):
        self.uri = uri if "://" in uri else str(Path(uri).resolve())
        self.fs, self.path = resolve(self.uri)

    @classmethod
    def for_stage(cls, ref: StageRef) -> StageDir:
        return cls(ref.directory)

    def _p(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def uri_of(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    @property
    def final_uri(self) -> str:
        return self.uri_of(FINAL)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._p(name)).type != pafs.FileType.NotFound

    def is_complete(self) -> bool:
        return self.exists(COMPLETE)

    def ensure(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_json(self, name: str, data: Any) -> None:
        """Write through a temporary name and rename, so readers never see half a file."""
        self.ensure()
        tmp = self._p(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as out:
            out.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())
        self.fs.move(tmp, self._p(name))

    def read_json(self, name: str) -> Any:
        with self.fs.open_input_stream(self._p(name)) as src:
            return json.loads(src.read().decode())

    def write_manifest(self, data: dict[str, Any]) -> None:
        self.write_json(MANIFEST, data)

    def read_manifest(self) -> dict[str, Any]:
        return self.read_json(MANIFEST)

    def mark_complete(self) -> None:
        """The commit point of a stage: call only after manifest and final/ are written."""
        if not self.exists(MANIFEST):
            raise RuntimeError(f"{self.uri}: cannot mark complete before manifest.json exists")
        self.write_json(COMPLETE, {"completed_at": time.time()})


class MetricsLog:
    """Append-only ``metrics.jsonl``. Local files are appended and flushed per line; object stores
    cannot append, so there the whole log is rewritten through a temporary name every ``every``
    lines and at close."""

    def __init__(self, stage: StageDir, *, every: int = 20):
        self.stage = stage
        self.local = isinstance(stage.fs, pafs.LocalFileSystem)
        self.every = every
        self._lines: list[str] = []
        stage.ensure()
        self._file = open(os.path.join(stage.path, METRICS), "a") if self.local else None  # noqa: SIM115

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, default=float)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._lines.append(line)
        if len(self._lines) % self.every == 0:
            self._rewrite()

    def _rewrite(self) -> None:
        old = b""
        if self.stage.exists(METRICS):
            with self.stage.fs.open_input_stream(self.stage._p(METRICS)) as src:
                old = src.read()
        tmp = self.stage._p(f".{METRICS}.{uuid.uuid4().hex}.tmp")
        with self.stage.fs.open_output_stream(tmp) as out:
            out.write(old + ("\n".join(self._lines) + "\n").encode())
        self.stage.fs.move(tmp, self.stage._p(METRICS))
        self._lines.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._lines:
            self._rewrite()


def read_metrics(stage: StageDir) -> list[dict[str, Any]]:
    if not stage.exists(METRICS):
        return []
    with stage.fs.open_input_stream(stage._p(METRICS)) as src:
        return [json.loads(line) for line in src.read().decode().splitlines() if line.strip()]
