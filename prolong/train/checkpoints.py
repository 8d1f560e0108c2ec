"""A stage's checkpoints on disk: their names, whether one is usable, and the older ones to fall
back to.

A checkpoint (``<stage dir>/checkpoint-<step>[<suffix>]/``) holds DeepSpeed's shards under
``ds/``, ``trainer_state.json`` (step, loader state, and the :class:`Layout` that wrote it) and one
``rng-rank<r>.pt`` per rank; a resume on another world size adds DeepSpeed's universal copy beside
``ds/`` (:mod:`prolong.train.reshape`). One that a crash, a full disk or a storage fault left
partial or corrupt must not stop a resume when an older good one exists:
:func:`checkpoint_problems` says what is wrong with one (missing files, a file torch cannot open,
an unreadable trainer state), judged against the layout that wrote it and without loading it into
an engine, so that every rank can check a candidate and all agree before any of them loads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def digests_file(rank: int) -> str:
    return f"digests-rank{rank:05d}.json"


def _owned_by(rank: int, relative: str) -> bool:
    """Whether ``relative`` (a path inside a checkpoint) is one rank ``rank`` writes: its RNG
    file and DeepSpeed's per-rank shards (``zero_pp_rank_<r>_...``); rank 0 also everything
    else DeepSpeed and the trainer write once (model states under ZeRO 0-2, ``latest``, the
    trainer state). Ranks that share one directory (the tests' plain torch.distributed runs)
    then never hash each other's files while those are being written."""
    name = relative.rsplit("/", 1)[-1]
    if name.startswith("rng-rank") or name.startswith("digests-rank"):
        return name == rng_file(rank)
    match = re.match(r"zero_pp_rank_(\d+)_", name)
    return int(match.group(1)) == rank if match else rank == 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_digests(directory: Path, rank: int) -> None:
    """Rank ``rank``'s part of checkpoint ``directory`` is written: record the SHA-256 of each
    of its files (``digests-rank<r>.json``, written last). A flipped bit in a tensor leaves an
    archive torch opens without complaint; only the digest tells it from the one written."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    digests = {rel: _sha256(p) for p in files
               if _owned_by(rank, rel := p.relative_to(directory).as_posix())}
    tmp = directory / (digests_file(rank) + ".tmp")
    tmp.write_text(json.dumps(digests, sort_keys=True))
    tmp.replace(directory / digests_file(rank))


def _digest_problems(directory: Path, world: int, ranks: set[int] | None) -> list[str]:
    """Files that differ from what their rank recorded (checkpoints written before digests
    were recorded have none, and are judged on the rest)."""
    present = [r for r in range(world) if (directory / digests_file(r)).is_file()]
    if not present:
        return []
    problems = [f"missing {digests_file(r)}" for r in range(world) if r not in present]
    for r in present:
        if ranks is not None and r not in ranks:
            continue
        try:
            digests = json.loads((directory / digests_file(r)).read_text())
            if not isinstance(digests, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            problems.append(f"{digests_file(r)} unreadable ({type(exc).__name__})")
            continue
        for rel, want in sorted(digests.items()):
            path = directory / rel
            if not path.is_file():
                problems.append(f"missing {rel}")
            elif _sha256(path) != want:
                problems.append(f"{rel} differs from what rank {r} wrote (SHA-256)")
    return problems


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def rng_file_for(rank: int, saved_world: int) -> str:
    """The RNG file rank ``rank`` restores from a checkpoint of ``saved_world`` ranks: its own,
    or on a larger world the one of rank ``rank mod saved_world`` (a rank's RNG draws nothing
    the step's result depends on: dropout is off and the loader is seeded by step; restoring one
    keeps a same-world resume bit-identical)."""
    return rng_file(rank % saved_world)


@dataclass(frozen=True)
class Layout:
    """How the run that wrote a checkpoint was laid out: what decides whether DeepSpeed's shards
    fit another run (ZeRO partitions the optimizer, and under ZeRO-3 the weights, over all
    ``world`` ranks: DP x SP, since Ulysses shards activations, not parameters)."""

    world: int
    zero_stage: int
    sp: int | None = None
    """None for checkpoints written before the layout was recorded (not needed to load them)."""

    @classmethod
    def of(cls, dims: Any, zero_stage: int) -> Layout:
        """The layout of a run with these :class:`~prolong.parallel.dims.ParallelDims`."""
        return cls(world=dims.world_size, zero_stage=zero_stage, sp=dims.sp)

    def describe(self) -> str:
        shape = f" (DP {self.world // self.sp} x SP {self.sp})" if self.sp else ""
        return f"{self.world} worker{'s' if self.world > 1 else ''}{shape}, ZeRO-{self.zero_stage}"

    def to_json(self) -> dict[str, int | None]:
        return {"world": self.world, "zeroStage": self.zero_stage, "sp": self.sp}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        return cls(world=int(data["world"]), zero_stage=int(data["zeroStage"]),
                   sp=None if data.get("sp") is None else int(data["sp"]))


def read_layout(directory: Path) -> Layout:
    """The layout recorded in the checkpoint's trainer state; for a checkpoint written before it
    was recorded (or whose trainer state is unreadable), what its files show: one RNG file per
    rank, and DeepSpeed's file names (ZeRO-0 writes no optimizer shards, ZeRO-3 one model-state
    file per rank; ZeRO-1 and 2 differ only in a field of the shards)."""
    try:
        return Layout.from_json(json.loads((directory / TRAINER_STATE).read_text())["layout"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    world = len(list(directory.glob("rng-rank*.pt")))
    shards = directory / CHECKPOINT_TAG
    optim = sorted(shards.glob("*optim_states.pt"))
    if not optim:
        zero = 0
    elif any(shards.glob("*zero_pp_rank_*model_states.pt")):
        zero = 3
    else:
        try:  # mmap: reads the archive's index and one small field, not the tensors
            zero = int(torch.load(optim[0], map_location="cpu", mmap=True, weights_only=False)
                       ["optimizer_state_dict"].get("zero_stage", 1))
        except Exception:  # unreadable: checkpoint_problems names the file
            zero = 1
    # ZeRO >= 1 writes one optimizer shard per rank: a lost RNG file cannot shrink the world.
    return Layout(world=max(world, len(optim)), zero_stage=zero)


def checkpoint_problems(directory: Path, ranks: set[int] | None = None) -> list[str]:
    """What makes a checkpoint unusable (empty: usable), judged against the layout that wrote it
    and the digests its ranks recorded (those of ``ranks`` only, when given: each resuming rank
    hashes the files it loads, and the ranks agree). Whether it fits the resuming run is
    :func:`prolong.train.reshape.load_tag`'s question."""
    problems: list[str] = []
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
        if not isinstance(state.get("step"), int) or "loader" not in state:
            problems.append(f"{TRAINER_STATE} has no step or loader state")
    except (OSError, ValueError) as exc:
        problems.append(f"{TRAINER_STATE} unreadable ({type(exc).__name__})")
    layout = read_layout(directory)
    world = layout.world
    missing = [rng_file(r) for r in range(world) if not (directory / rng_file(r)).is_file()]
    if missing or not world:
        problems.append(f"missing {', '.join(missing) or 'every rng-rank*.pt'}")
    shards = directory / CHECKPOINT_TAG
    files = sorted(shards.glob("*.pt")) if shards.is_dir() else []
    if not any(f.name.endswith("model_states.pt") for f in files):
        problems.append(f"no model states in {CHECKPOINT_TAG}/")
    optim = [f for f in files if f.name.endswith("optim_states.pt")]
    if layout.zero_stage >= 1 and len(optim) != world:  # ZeRO partitions over all ranks
        problems.append(f"{len(optim)} optimizer shards in {CHECKPOINT_TAG}/, {world} expected")
    for f in files:
        try:  # mmap: opens the archive and its index without reading the tensors
            torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        except Exception as exc:  # a truncated or corrupt archive fails in many ways
            problems.append(f"{CHECKPOINT_TAG}/{f.name} cannot be read "
                            f"({type(exc).__name__}: {str(exc)[:80]})")
    return problems + _digest_problems(directory, world, ranks)


def older_checkpoints(stage: StageDir, than_step: int) -> list[str]:
    """URIs of the stage's checkpoints before step ``than_step``, newest first."""
    found = []
    for info in stage.fs.get_file_info(pafs.FileSelector(stage.path, allow_not_found=True)):
        name = info.base_name
        step = step_of(name)
        if step is not None and step < than_step:
            found.append((step, name))
    return [stage.uri_of(name) for _, name in sorted(found, reverse=True)]
