"""A stage's checkpoints on disk: their names, whether one is usable, and the older ones to fall
back to.

A checkpoint (``<stage dir>/checkpoint-<step>[<suffix>]/``) holds DeepSpeed's shards under
``ds/``, ``trainer_state.json`` (step, loader state) and one ``rng-rank<r>.pt`` per rank. One that a
crash, a full disk or a storage fault left partial or corrupt must not stop a resume when an older
good one exists: :func:`checkpoint_problems` says what is wrong with one (missing files, a file
torch cannot open, an unreadable trainer state) without loading it into an engine, so that every
rank can check a candidate and all agree before any of them loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.fs as pafs
import torch

from prolong.stage.directory import StageDir

CHECKPOINT_TAG = "ds"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d{6})(-[a-z0-9-]+)?$")


def checkpoint_dir_name(step: int, suffix: str = "") -> str:
    """``checkpoint-<step:06d><suffix>``; the suffix keeps a run that fell back past a broken
    checkpoint from writing a new one under the broken one's name (which Ray Train still holds in
    its bookkeeping, and would later delete)."""
    return f"checkpoint-{step:06d}{suffix}"


def step_of(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def checkpoint_problems(directory: Path, *, world: int, zero_stage: int) -> list[str]:
    """What makes a checkpoint unusable for a run of ``world`` ranks (empty: usable)."""
    problems: list[str] = []
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
        if not isinstance(state.get("step"), int) or "loader" not in state:
            problems.append(f"{TRAINER_STATE} has no step or loader state")
    except (OSError, ValueError) as exc:
        problems.append(f"{TRAINER_STATE} unreadable ({type(exc).__name__})")
    missing = [rng_file(r) for r in range(world) if not (directory / rng_file(r)).is_file()]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    shards = directory / CHECKPOINT_TAG
    files = sorted(shards.glob("*.pt")) if shards.is_dir() else []
    if not any(f.name.endswith("model_states.pt") for f in files):
        problems.append(f"no model states in {CHECKPOINT_TAG}/")
    optim = [f for f in files if f.name.endswith("optim_states.pt")]
    if zero_stage >= 1 and len(optim) != world:  # ZeRO partitions the optimizer over all ranks
        problems.append(f"{len(optim)} optimizer shards in {CHECKPOINT_TAG}/, {world} expected")
    for f in files:
        try:  # mmap: opens the archive and its index without reading the tensors
            torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        except Exception as exc:  # a truncated or corrupt archive fails in many ways
            problems.append(f"{CHECKPOINT_TAG}/{f.name} cannot be read "
                            f"({type(exc).__name__}: {str(exc)[:80]})")
    return problems


def older_checkpoints(stage: StageDir, than_step: int) -> list[str]:
    """URIs of the stage's checkpoints before step ``than_step``, newest first."""
    found = []
    for info in stage.fs.get_file_info(pafs.FileSelector(stage.path, allow_not_found=True)):
        name = info.base_name
        step = step_of(name)
        if step is not None and step < than_step:
            found.append((step, name))
    return [stage.uri_of(name) for _, name in sorted(found, reverse=True)]
