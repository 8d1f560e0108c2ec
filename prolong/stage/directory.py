"""The stage directory: ``<storageRoot>/<pipeline>/<stage>-<id>/``.

Holds ``manifest.json`` (spec, id, upstream ids, versions, final checkpoint path, summary metrics),
``metrics.jsonl`` (one JSON object per step), Ray Train's checkpoints, ``final/`` (HF weights and
tokenizer) and, written last, the marker ``COMPLETE``. A stage is complete exactly when the marker
exists: everything it vouches for was written before it, so a crash at any point leaves either a
complete stage or one that the next submission resumes.

Paths may be local (relative paths are made absolute) or object-store URIs (``s3://``, ``gs://``);
``pyarrow.fs`` handles both, so workers on a cluster, the runner and the operator read the same
layout. :class:`Manifest` is the one typed form of ``manifest.json`` for training and eval stages
alike: :meth:`StageDir.write_manifest` is its only writer, :meth:`StageDir.read_manifest` its only
reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from prolong.stage.identity import StageRef
from prolong.stage.uri import absolute, is_object_store

MANIFEST = "manifest.json"
METRICS_LOG = "metrics.jsonl"
FINAL = "final"
COMPLETE = "COMPLETE"
"""The commit point of a stage, written last."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a path in it; local relative paths are made absolute."""
    return pafs.FileSystem.from_uri(absolute(uri))


def local_copy(uri: str, *, only: tuple[str, ...] | None = None) -> str:
    """A local directory holding ``uri``: itself when local, else a downloaded copy (a model's
    weights or a checkpoint on an object store, for libraries that read only local files).
    ``only``: download just these files of it (a model's config without its weights)."""
    if not is_object_store(uri):
        return uri
    fs, path = resolve(uri)
    local = tempfile.mkdtemp(prefix="prolong-download-")
    if only is None:
        pafs.copy_files(path, local, source_filesystem=fs)
    else:
        for name in only:
            pafs.copy_files(f"{path.rstrip('/')}/{name}", f"{local}/{name}", source_filesystem=fs)
    return local


def publish_directory(local_dir: str, uri: str) -> None:
    """Copy a finished local directory to ``uri`` so that readers never see half of it: locally
    through ``<uri>.partial`` and a rename; object stores have no rename, so there the stage's
    COMPLETE marker (written after this) is the commit point."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        partial = Path(path + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            shutil.copytree(local_dir, partial)
        except OSError as exc:  # a full disk, a quota: nothing half-copied stays behind
            shutil.rmtree(partial, ignore_errors=True)
            raise _copy_failure(exc, uri) from None
        partial.chmod(0o755)  # mkdtemp's 0700 would hide the contents from other users
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
    else:
        pafs.copy_files(local_dir, path, destination_filesystem=fs)


def _copy_failure(exc: OSError, uri: str) -> OSError:
    """One OSError (errno kept) for a failed copy: shutil.copytree gathers one error per file
    into a list, which would print as a page of tuples."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) \
            and exc.args[0]:
        why = str(exc.args[0][0][-1])
        code = re.match(r"\[Errno (\d+)\] ([^:]+)", why)
        if code:
            return OSError(int(code.group(1)), f"{code.group(2)}: cannot publish {uri}")
        return OSError(f"cannot publish {uri}: {why[:200]}")
    return OSError(exc.errno, f"{exc.strerror or exc}: cannot publish {uri}")


class Manifest(BaseModel):
    """``manifest.json``: what a finished stage vouches for. Training stages fill ``final``,
    ``final_checkpoint``, ``steps`` and ``tokens``; eval stages ``model``, ``results`` and
    ``samples``. Keys are snake_case, as every manifest written so far has them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pipeline: str
    stage: str
    id: str
    kind: str
    upstream: list[str] = Field(default_factory=list)
    """Ids of the stages this one started from."""
    spec: dict[str, Any]
    """The resolved job (by alias, JSON)."""
    summary: dict[str, Any] = Field(default_factory=dict)
    """Headline figures: first/last loss and tokens/s for training, scores for eval."""
    versions: dict[str, Any] = Field(default_factory=dict)
    """Library versions that ran (prolong.versions)."""
    final: str | None = None
    """URI of final/ (HF weights and tokenizer)."""
    final_checkpoint: str | None = None
    """URI of the last DeepSpeed checkpoint (what weightsAndOptimizer loads)."""
    steps: int | None = None
    tokens: int | None = None
    tokenizer_hash: str | None = None
    """Content hash of final/'s tokenizer (prolong.data.tokenizer.tokenizer_hash): a copy of the
    weights shipped elsewhere can be checked against the run that made it."""
    model: str | None = None
    """The weights an eval stage evaluated."""
    results: str | None = None
    """URI of an eval stage's results.json."""
    samples: int | None = None
    """Samples an eval stage scored."""

    @classmethod
    def for_stage(cls, ref: StageRef, spec: dict[str, Any], **fields: Any) -> Manifest:
        return cls(pipeline=ref.pipeline, stage=ref.stage, id=ref.id, kind=ref.kind,
                   upstream=list(ref.upstream), spec=spec, **fields)


class StageDir:
    """Reads and writes one stage's directory."""

    def __init__(self, uri: str):
        self.uri = absolute(uri)
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

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write through a temporary name and a move, so readers never see half a file."""
        self.ensure()
        tmp = self._p(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, self._p(name))

    def write_json(self, name: str, data: Any) -> None:
        self.write_bytes(name, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._p(name)) as src:
            return src.read()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name).decode())

    def write_manifest(self, manifest: Manifest) -> None:
        self.write_json(MANIFEST, manifest.model_dump(mode="json", exclude_none=True))

    def read_manifest(self) -> Manifest:
        return Manifest.model_validate(self.read_json(MANIFEST))

    def completed_at(self) -> float | None:
        """When the stage committed (the time in its COMPLETE marker); None while incomplete, 0
        for a marker without a readable time."""
        if not self.is_complete():
            return None
        try:
            return float(self.read_json(COMPLETE)["completed_at"])
        except (KeyError, TypeError, ValueError):
            return 0.0

    def supersede(self, keep: tuple[str, ...] = ()) -> str:
        """Move every entry except ``keep`` into the sibling ``<dir>.superseded-<UTC time>`` and
        return its URI: a stage that must run again from scratch starts from an empty directory,
        and the outputs it replaces are kept, not deleted. ``keep`` leaves the run's own lock in
        place. Refused (OSError) on object stores, which cannot move directories."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            raise OSError(f"{self.uri}: cannot move a stage directory aside on an object store; "
                          "delete it to run the stage again")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = Path(f"{self.path.rstrip('/')}.superseded-{stamp}")
        target.mkdir(parents=True, exist_ok=False)
        for entry in sorted(Path(self.path).iterdir()):
            if entry.name not in keep:
                os.replace(entry, target / entry.name)
        return str(target)

    def mark_complete(self) -> None:
        """The commit point of a stage: call only after manifest and final/ are written."""
        if not self.exists(MANIFEST):
            raise RuntimeError(f"{self.uri}: cannot mark complete before manifest.json exists")
        self.write_json(COMPLETE, {"completed_at": time.time()})


class MetricsLog:
    """Append-only ``metrics.jsonl``, one row per step. Local files are appended and flushed per
    line; object stores cannot append, so there the whole log is rewritten through a temporary
    name every ``every`` lines and at close.

    A run that resumes from the checkpoint of step k replays steps k+1, k+2, ...: opened with
    ``resume_from=k``, the log first drops its rows after step k (atomically), so that every
    reader sees each step once, with the values of the run that produced the final weights.
    """

    def __init__(self, stage: StageDir, *, every: int = 20, resume_from: int | None = None):
        self.stage = stage
        self.local = isinstance(stage.fs, pafs.LocalFileSystem)
        self.every = every
        self._lines: list[str] = []
        stage.ensure()
        if resume_from is not None:
            self._truncate_after(resume_from)
        self._file = open(os.path.join(stage.path, METRICS_LOG), "a") if self.local else None  # noqa: SIM115

    def _truncate_after(self, step: int) -> None:
        rows = read_metrics(self.stage)
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) != len(rows):
            self.stage.write_bytes(METRICS_LOG, "".join(
                json.dumps(r, sort_keys=True, default=float) + "\n" for r in kept).encode())

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
        old = self.stage.read_bytes(METRICS_LOG) if self.stage.exists(METRICS_LOG) else b""
        self.stage.write_bytes(METRICS_LOG, old + ("\n".join(self._lines) + "\n").encode())
        self._lines.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._lines:
            self._rewrite()


def read_metrics(stage: StageDir) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` in step order, one per step (a later row of a step wins:
    a replayed step's values replace the earlier ones, even in a log written before
    :class:`MetricsLog` dropped replayed rows itself)."""
    if not stage.exists(METRICS_LOG):
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in stage.read_bytes(METRICS_LOG).decode().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.pop(row.get("step"), None)  # re-insert: the replayed row takes the later place
            rows[row.get("step")] = row
    return sorted(rows.values(), key=lambda r: r.get("step", 0))


SAFETENSORS_INDEX = "model.safetensors.index.json"


def final_problems(directory: str) -> list[str]:
    """What is missing from a stage's ``final/`` for a next stage to load it (empty: nothing):
    its config and every weight file (one ``model.safetensors``, or the index and each shard
    it names). Each problem names the path."""
    stage = StageDir(directory)
    final = f"{FINAL}/"
    if not stage.exists(FINAL):
        return [f"{stage.final_uri} is missing"]
    problems = [f"{stage.uri_of(final + 'config.json')} is missing"] \
        if not stage.exists(final + "config.json") else []
    if stage.exists(final + "model.safetensors"):
        return problems
    if not stage.exists(final + SAFETENSORS_INDEX):
        return [*problems, f"{stage.final_uri} has no model.safetensors nor {SAFETENSORS_INDEX}"]
    try:
        shards = sorted(set(json.loads(stage.read_bytes(final + SAFETENSORS_INDEX))["weight_map"]
                            .values()))
    except (ValueError, KeyError, AttributeError):
        return [*problems, f"{stage.uri_of(final + SAFETENSORS_INDEX)} is unreadable"]
    return problems + [f"{stage.uri_of(final + name)} is missing" for name in shards
                       if not stage.exists(final + name)]


def stage_complete(directory: str) -> bool:
    """Whether a stage directory (local or object store) holds its COMPLETE marker; False when
    the storage cannot be read from here (the stage is then submitted, and the engine itself
    finds its output complete)."""
    try:
        return StageDir(directory).is_complete()
    except (OSError, ValueError):  # pyarrow raises both for unreachable or unknown filesystems
        return False
