"""Resuming a checkpoint on another world size: DeepSpeed's universal checkpoint.

ZeRO-1/2/3 cut the fp32 master weights and AdamW moments (ZeRO-3 the weights too) into one shard
per rank of the world that wrote them, DP x SP (Ulysses shards activations, not parameters, and
ZeRO partitions over the sequence-data-parallel group), and DeepSpeed refuses to load them on
another world size. A stage that lost a node, or one that starts from an upstream stage that ran
on another world size, loads a universal copy instead: DeepSpeed's ``ds_to_universal`` rewrites
the shards as one file per parameter and state (``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``),
which an engine built with ``checkpoint.load_universal`` cuts for its own world. Which rows each
rank reads afterwards is the loader's business and needs no conversion (its state is the same on
every rank and independent of the world: see :mod:`prolong.data.mixture`).

The copy is made once, beside DeepSpeed's own shards (``<checkpoint>/ds_universal/``, so Ray
Train's retention deletes it with its checkpoint), built under a temporary name in the same
directory and renamed into place: a reader sees all of it or none, and a crash mid-conversion
leaves only the temporary directory (deleted with the checkpoint).

Refused, with one line naming the checkpoint (:class:`ReshapeError`): a change of ZeRO stage
(DeepSpeed's universal loader reads the model-state files of the loading engine's stage), and a
checkpoint on an object store (the copy is written beside the checkpoint, which needs a
filesystem every worker shares). ZeRO-0 never needs the copy: its one file holds the whole model
and optimizer.

Two DeepSpeed quirks (0.19.8) are handled here, each shown by tests/train/test_reshape.py:

1. Ulysses' mpu aliases "model parallel" to SP (as DeepSpeed's own ``parallel_state_sp`` does),
   so a checkpoint written with SP > 1 records ``tp_degree = SP`` though no parameter is sharded,
   and the converter then looks for SP model-state files that do not exist. It converts a staged
   view of the shards whose model states record tensor parallelism 1.
2. ZeRO-3's universal load copies the hyperparameters of the checkpoint's first parameter group
   into every group (our no-decay group gets weight decay) and hands every partition the same
   ``step`` tensor, which AdamW then increments once per partition. :func:`load_universal` gives
   each group its own hyperparameters back and each partition its own step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from prolong.stage.uri import is_object_store
from prolong.train.checkpoints import CHECKPOINT_TAG, Layout

UNIVERSAL_TAG = f"{CHECKPOINT_TAG}_universal"
"""The universal copy's tag (DeepSpeed's own naming: ``<tag>_universal``)."""


class ReshapeError(RuntimeError):
    """A checkpoint cannot be loaded on this run's layout; the message is one line."""


def load_tag(checkpoint: str, saved: Layout, current: Layout) -> str:
    """The tag to load ``checkpoint`` (its URI, for messages) from on the ``current`` layout:
    DeepSpeed's own shards when they fit it, else the universal copy."""
    if saved.zero_stage != current.zero_stage:
        raise ReshapeError(
            f"{checkpoint}: written with ZeRO-{saved.zero_stage}, this run uses "
            f"ZeRO-{current.zero_stage}; DeepSpeed converts a checkpoint to another world size "
            f"but not to another ZeRO stage (run with zeroStage {saved.zero_stage})")
    if saved.zero_stage == 0 or saved.world == current.world:
        return CHECKPOINT_TAG
    if is_object_store(checkpoint):
        raise ReshapeError(
            f"{checkpoint}: written by {saved.describe()}, this run has {current.describe()}; "
            "the universal copy that changes the world size is written beside the checkpoint, "
            f"which needs a shared filesystem, not an object store (run on {saved.world} "
            "workers, or copy the stage to a shared volume)")
    return UNIVERSAL_TAG


def has_universal(directory: Path) -> bool:
    return (directory / UNIVERSAL_TAG).is_dir()


def convert_to_universal(directory: Path) -> Path:
    """``<directory>/ds_universal``, converted from ``<directory>/ds`` unless already there.
    Concurrent converters of one checkpoint (two stages starting from the same upstream) are
    safe: the first rename wins and the others drop their copy."""
    # deepspeed is loaded by the engine builder by now; imported here for the same reason as
    # there (it fixes its accelerator at import).
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target = directory / UNIVERSAL_TAG
    if target.is_dir():
        return target
    work = Path(tempfile.mkdtemp(prefix=f".{UNIVERSAL_TAG}-", dir=directory))
    try:
        staged = _staged_shards(directory / CHECKPOINT_TAG, work / "input")
        out = work / UNIVERSAL_TAG
        # One extract/merge process: more would fork a worker that holds process groups.
        ds_to_universal(SimpleNamespace(
            input_folder=str(staged), output_folder=str(out), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True,
            # Checkpoints carry no UNIVERSAL_CHECKPOINT_INFO (it describes tensor/pipeline
            # parallel layouts, which we do not use); the converter asks for an empty one.
            inject_missing_state=True))
        try:
            os.rename(out, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _staged_shards(shards: Path, staged: Path) -> Path:
    """``shards`` as the converter should read them (quirk 1 of the module docstring): links to
    every file, except model states that record tensor parallelism > 1, rewritten with 1."""
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE

    staged.mkdir(parents=True)
    for f in sorted(shards.iterdir()):
        if f.name.endswith("model_states.pt"):
            state = torch.load(f, map_location="cpu", weights_only=False)
            dims = state.get(CHECKPOINT_PARALLEL_DIMS) or {}
            if dims.get(CHECKPOINT_TP_DEGREE, 1) != 1:
                dims[CHECKPOINT_TP_DEGREE] = 1
                torch.save(state, staged / f.name)
                continue
        (staged / f.name).symlink_to(f.resolve())
    return staged


def load_universal(engine: Any, directory: Path, **load_kwargs: Any) -> None:
    """``engine.load_checkpoint`` of ``<directory>/ds_universal`` (an engine built with
    ``load_universal``), then quirk 2 of the module docstring undone: every parameter group
    keeps this run's hyperparameters but the learning rate (the checkpoint's, as a native load
    restores it), and every partition owns its AdamW step."""
    inner = engine.optimizer.optimizer  # the client AdamW that ZeRO wraps
    ours = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in inner.param_groups]
    engine.load_checkpoint(str(directory), tag=UNIVERSAL_TAG, **load_kwargs)
    for group, hyper in zip(inner.param_groups, ours, strict=True):
        group.update(hyper)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
