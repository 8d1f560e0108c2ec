"""Model and tokenizer staging: copy a model once to storage, and load it from there on every rank.

``prolongctl model stage FILE`` copies ``model.source`` (a local directory, or a hub id when
``model.allowHub`` says so) to ``model.stagedPath``, and a tokenizer with its own source to
``tokenizer.stagedPath``. The copy is atomic: it is assembled in a local temporary directory, then
published through :func:`prolong.stage.directory.publish_directory` (a rename on local paths and
volumes) with a :data:`STAGED` marker written last, which is the commit point on object stores
(no rename there). A staged directory without its marker is not staged.

Workers never download (:func:`model_load_dir`): they read the staged directory, or a local
source directory, and refuse a hub id that has not been staged.

A hub source is *gated* when its organisation is one of :data:`GATED_ORGS` (Meta's Llama
checkpoints, which ProLong starts from): staging it needs a token, HF_TOKEN in the environment,
which the Ray pods get from the ``model.hubTokenSecret`` Secret. The hub is asked nothing before
the download itself.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolong.stage.directory import local_copy, publish_directory, resolve
from prolong.stage.uri import absolute, is_object_store

STAGED = "STAGED.json"
"""Written last into a staged directory: what was staged from where, and when."""
TOKEN_ENV = "HF_TOKEN"
"""Where staging reads the hub token (the pods get it from ``model.hubTokenSecret``)."""
TOKEN_SECRET_KEY = "token"
"""The key of ``model.hubTokenSecret`` that holds the token."""
GATED_ORGS = ("meta-llama",)
"""Hub organisations whose models need an accepted licence and a token."""
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
"""What a hub snapshot copies: config, weights (safetensors only), tokenizer files."""


class StagingError(ValueError):
    """Bad input to staging or to loading a staged model: one line naming the field and rule."""


@dataclass(frozen=True)
class Staging:
    """One copy to make: ``what`` (model or tokenizer), from ``source`` to ``target``."""

    what: str
    field: str
    """The spec field of the source (for messages)."""
    source: str
    target: str
    allow_hub: bool


def is_staged(uri: str) -> bool:
    """Whether ``uri`` holds a finished staging (its marker exists)."""
    fs, path = resolve(uri)
    import pyarrow.fs as pafs

    return fs.get_file_info(f"{path}/{STAGED}").type == pafs.FileType.File


def is_gated(source: str) -> bool:
    return source.split("/", 1)[0] in GATED_ORGS


def _is_local_dir(source: str) -> bool:
    return not is_object_store(source) and Path(source).is_dir()


def stagings(spec: Any) -> list[Staging]:
    """The copies a job's spec asks for: the model (``model.stagedPath``) and a tokenizer with
    its own source and stagedPath. A train spec's tokenizer is ``data.tokenizer``, an eval
    spec's ``tokenizer``."""
    out = []
    model = spec.model
    if model.staged_path is not None:
        if model.source is None:
            raise StagingError("model.stagedPath: there is no model.source to stage")
        out.append(Staging("model", "model.source", model.source, model.staged_path,
                           model.allow_hub))
    data = getattr(spec, "data", None)
    tok, field = (data.tokenizer, "data.tokenizer") if data is not None else (spec.tokenizer,
                                                                              "tokenizer")
    if tok.staged_path is not None:
        source = tok.source or model.source
        if source is None:
            raise StagingError(f"{field}.stagedPath: there is no {field}.source or model.source "
                               "to stage")
        out.append(Staging("tokenizer", f"{field}.source" if tok.source else "model.source",
                           source, tok.staged_path, tok.allow_hub or
                           (tok.source is None and model.allow_hub)))
    if not out:
        raise StagingError("model.stagedPath: not set, so there is nothing to stage (name the "
                           "directory the model is staged to and loaded from)")
    return out


def check_source(item: Staging, token: str | None) -> None:
    """Refuse, before any copy, a source that may not or cannot be read."""
    if _is_local_dir(item.source):
        return
    if is_object_store(item.source) or item.source.startswith(("/", ".")):
        raise StagingError(f"{item.field}: {item.source} is not a local directory")
    if not item.allow_hub:
        raise StagingError(f"{item.field}: {item.source} is not a local directory and the hub is "
                           f"not allowed (set {item.field.rsplit('.', 1)[0]}.allowHub: true to "
                           "download it)")
    if is_gated(item.source) and not token:
        raise StagingError(f"{item.field}: {item.source} is gated and {TOKEN_ENV} is not set "
                           "(in the cluster it comes from model.hubTokenSecret)")


def _fill(item: Staging, directory: Path, token: str | None) -> None:
    """Copy ``item``'s files into ``directory``."""
    import shutil

    if _is_local_dir(item.source):
        shutil.copytree(item.source, directory, dirs_exist_ok=True)
        return
    from huggingface_hub import snapshot_download  # reached only with allowHub

    patterns = list(HUB_FILES) if item.what == "model" else [
        p for p in HUB_FILES if p != "*.safetensors"]
    snapshot_download(item.source, local_dir=str(directory), token=token,
                      allow_patterns=patterns)


def stage(item: Staging, *, token: str | None = None, force: bool = False) -> bool:
    """Copy ``item`` to its target, once: False when it is already staged (and not ``force``)."""
    check_source(item, token)
    if is_staged(item.target) and not force:
        return False
    with tempfile.TemporaryDirectory(prefix="prolong-stage-") as tmp:
        directory = Path(tmp) / "staged"
        directory.mkdir()
        _fill(item, directory, token)
        (directory / STAGED).unlink(missing_ok=True)
        marker = json.dumps({"what": item.what, "source": absolute(item.source)
                             if _is_local_dir(item.source) else item.source,
                             "stagedAt": time.time()})
        if is_object_store(item.target):
            # No rename on object stores: the files first, the marker last (the commit point).
            publish_directory(str(directory), item.target)
            fs, path = resolve(item.target)
            with fs.open_output_stream(f"{path}/{STAGED}") as out:
                out.write(marker.encode())
        else:
            (directory / STAGED).write_text(marker)
            publish_directory(str(directory), item.target)
    return True


def staged_dir(uri: str, field: str) -> str:
    """A local directory holding the staged ``uri`` (downloaded when it is on an object store).
    Raises :class:`StagingError` when nothing finished staging there."""
    if not is_staged(uri):
        raise StagingError(f"{field}: {uri} is not staged (run `prolongctl model stage FILE` "
                           "first)")
    return local_copy(uri)


def model_load_dir(model: Any) -> str | None:
    """Where a worker loads ``model`` (a ModelSpec) from: its staged directory, else its local
    source directory; None for a random init. Never a hub id: workers do not download."""
    if model.staged_path is not None:
        return staged_dir(model.staged_path, "model.stagedPath")
    if model.source is None:
        return None
    if _is_local_dir(model.source):
        return model.source
    raise StagingError(f"model.source: {model.source} is not a local directory and workers do "
                       "not download; set model.stagedPath and run `prolongctl model stage FILE`")


def hub_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None
