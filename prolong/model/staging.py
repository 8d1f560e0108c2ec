"""Model and tokenizer staging: copy a model once to storage, and load it from there on every rank.

``prolongctl model stage FILE`` copies ``model.source`` (a local directory, or a hub id when
``model.allowHub`` says so) to ``model.stagedPath``, and a tokenizer with its own source to
``tokenizer.stagedPath``. The copy is atomic: it is assembled in a local temporary directory, then
published through :func:`prolong.stage.directory.publish_directory` (a rename on local paths and
volumes) with a :data:`STAGED` marker written last, which is the commit point on object stores
(no rename there). A staged directory without its marker is not staged.

Workers never download (:func:`model_location`, :func:`tokenizer_location`: the one resolution
the trainer, data prepare and eval all use): they read the staged directory, or a local source
directory, and refuse a hub id that has not been staged.

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

from prolong.stage.uri import absolute, is_object_store

# prolong.stage.directory (pyarrow's filesystems) is imported where it is used: loading the CLI
# must not load a filesystem layer.

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


SHIPPED = "shipped.json"
"""Written into a shipped stage's final/ by ``prolong.run.ship``: which run made these weights
(pipeline, stage, id). A spec that starts from such a directory names the id as model.revision."""


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
    revision: str | None = None
    """The hub revision to download (model.revision; the model only)."""


def is_staged(uri: str) -> bool:
    """Whether ``uri`` holds a finished staging (its marker exists)."""
    return staged_marker(uri) is not None


def staged_marker(uri: str) -> dict[str, Any] | None:
    """The marker of a finished staging at ``uri`` (what, source, stagedAt), None when nothing
    finished staging there."""
    import pyarrow.fs as pafs

    from prolong.stage.directory import resolve

    fs, path = resolve(uri)
    if fs.get_file_info(f"{path}/{STAGED}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{STAGED}") as f:
        return json.loads(f.read().decode())


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
                           model.allow_hub, model.revision))
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
        if item.what == "model":
            check_revision(item.source, item.revision)
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
                      allow_patterns=patterns, revision=item.revision)


def _marker_source(item: Staging) -> str:
    return absolute(item.source) if _is_local_dir(item.source) else item.source


def stage(item: Staging, *, token: str | None = None, force: bool = False) -> bool:
    """Copy ``item`` to its target, once: False when it is already staged (and not ``force``).
    A target staged from another source is refused (without ``force``): the workers would load
    the old one. A tokenizer-only copy does not count as the model staged: the model is copied
    over it (its files include the tokenizer's)."""
    from prolong.stage.directory import publish_directory, resolve

    check_source(item, token)
    done = staged_marker(item.target)
    if done is not None and not force:
        if done.get("source") != _marker_source(item):
            raise StagingError(f"{item.field}: {item.target} holds a copy of "
                               f"{done.get('source')}, not {item.source} (pass --force to "
                               "replace it, or name another stagedPath)")
        if item.what == "model" and done.get("revision") != item.revision:
            raise StagingError(f"model.revision: {item.target} holds revision "
                               f"{done.get('revision')!r} of {item.source}, not "
                               f"{item.revision!r} (pass --force to replace it, or name another "
                               "stagedPath)")
        if item.what == "tokenizer" or done.get("what") == "model":
            return False
    with tempfile.TemporaryDirectory(prefix="prolong-stage-") as tmp:
        directory = Path(tmp) / "staged"
        directory.mkdir()
        _fill(item, directory, token)
        (directory / STAGED).unlink(missing_ok=True)
        marker = json.dumps({"what": item.what, "source": _marker_source(item),
                             "revision": item.revision, "stagedAt": time.time()})
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


def check_staged(uri: str, field: str) -> str:
    """``uri``, once it holds a finished staging; :class:`StagingError` otherwise."""
    if not is_staged(uri):
        raise StagingError(f"{field}: {uri} is not staged (run `prolongctl model stage FILE` "
                           "first)")
    return uri


def staged_dir(uri: str, field: str) -> str:
    """A local directory holding the staged ``uri`` (downloaded when it is on an object store).
    Raises :class:`StagingError` when nothing finished staging there."""
    from prolong.stage.directory import local_copy

    return local_copy(check_staged(uri, field))


# -- where workers load from ---------------------------------------------------------------
# One resolution for every reader (the trainer's model, data prepare's and the trainer's
# tokenizer, the eval workers' model and tokenizer): the staged copy when there is one, else a
# local source directory; a hub id is refused, never downloaded. The *_location functions give
# the place as a string that travels to other machines (an object-store URI stays a URI); the
# *_load_dir functions give a local directory on this one.

def model_location(model: Any) -> str | None:
    """Where ``model`` (a ModelSpec) is loaded from: its staged directory (checked to be staged),
    else its local source directory; None for a random init (or fromStage: the caller's)."""
    if model.staged_path is not None:
        return check_staged(model.staged_path, "model.stagedPath")
    if model.source is None:
        return None
    if _is_local_dir(model.source):
        check_revision(model.source, model.revision)
        return model.source
    raise StagingError(f"model.source: {model.source} is not a local directory and workers do "
                       "not download; set model.stagedPath and run `prolongctl model stage FILE`")


def check_revision(directory: str, revision: str | None) -> None:
    """A local model directory shipped by ``prolong.run.ship`` must be named with its id as
    ``model.revision``: the id is what makes a stage that starts from it a new run when the
    shipped weights are re-made (a stage's id is a pure function of its spec, which holds only the
    directory's path). Other local directories carry no version, so any revision is a label."""
    marker = Path(directory) / SHIPPED
    if not marker.is_file():
        return
    shipped = json.loads(marker.read_text())
    if revision != shipped["id"]:
        said = "is not set" if revision is None else f"is {revision!r}"
        raise StagingError(f"model.revision: {directory} holds the weights of run "
                           f"{shipped['pipeline']}/{shipped['stage']}-{shipped['id']} and "
                           f"model.revision {said}; set it to {shipped['id']!r} so that this "
                           "stage's id follows the weights it starts from")


def model_load_dir(model: Any) -> str | None:
    """:func:`model_location` as a local directory (downloaded from an object store)."""
    from prolong.stage.directory import local_copy

    where = model_location(model)
    return None if where is None else local_copy(where)


def tokenizer_location(tok: Any, model: Any, field: str) -> str | None:
    """Where a tokenizer (a TokenizerSpec; ``field`` is its spec path, ``data.tokenizer`` or
    ``tokenizer``) is loaded from: its own stagedPath; else, when its source is the model's (or
    left out), the model's staged directory, which holds the tokenizer files; else its local
    source directory. None when neither it nor the model has a source (a trained tokenizer, or
    the upstream stage's). A hub id with nothing staged is refused."""
    if tok.staged_path is not None:
        return check_staged(tok.staged_path, f"{field}.stagedPath")
    source = tok.source or model.source
    if source is None:
        return None
    if source == model.source and model.staged_path is not None:
        return check_staged(model.staged_path, "model.stagedPath")
    if _is_local_dir(source):
        return source
    where = f"{field}.source" if tok.source else "model.source"
    raise StagingError(f"{where}: {source} is not a local directory and workers do not "
                       f"download; set {field}.stagedPath and run `prolongctl model stage FILE`")


def load_dir(location: str) -> str:
    """A local directory holding ``location`` (from :func:`model_location` or
    :func:`tokenizer_location`): itself, or a downloaded copy of an object-store URI."""
    from prolong.stage.directory import local_copy

    return local_copy(location)


def hub_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None
