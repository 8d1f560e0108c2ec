"""Build a model already partitioned over ZeRO-3 ranks, and stream pretrained weights into it.

Without this every rank would construct (or ``from_pretrained``) the whole model and only then
hand it to DeepSpeed to partition: 16 GB of Llama-3-8B in bf16 on each of 64 GPUs before the first
step. Here:

- **construction** runs inside ``deepspeed.zero.Init``: each module's parameters are partitioned
  as soon as that module is built, so a rank holds its 1/world share plus one module's full
  parameters at a time. transformers' own weight init is switched off meanwhile
  (``no_init_weights``): it would run on the empty partitions;
- **random init** then runs transformers' ZeRO-3 variant (``initialize_weights_zero3``): each
  module's parameters are gathered, rank 0 initialises them, and the exit of the gather broadcasts
  and re-partitions them. Rank 0's RNG alone decides the weights, so they do not depend on the
  world size (a stage resumed on another world size starts from the same init);
- **pretrained weights** are read by rank 0 from the checkpoint's safetensors files one tensor at
  a time, and each parameter is filled inside ``GatheredParameters(modifier_rank=0)``: every rank
  holds its partitions plus one parameter gathered, rank 0 also the one tensor it read. We do not
  use ``from_pretrained`` under transformers' ZeRO-3 switch (``HfDeepSpeedConfig``): in
  transformers 5.24 its rank 0 first reads the whole state dict into host memory.

The partition group is the engine's (``ParallelGroups.world_group``, DP x SP ranks), so the engine
keeps these partitions as they are. Only safetensors checkpoints load this way (what
``save_pretrained`` writes and hub Llama checkpoints ship); keys must match the model's parameter
names exactly, as they do for checkpoints transformers wrote for the same class.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class PartitionedLoadError(ValueError):
    """A checkpoint that cannot be streamed into a ZeRO-3 partitioned model (raised on every
    rank, with rank 0's reason)."""


@dataclass(frozen=True)
class Zero3Init:
    """What building a model partitioned for ZeRO-3 needs: the engine's DeepSpeed config (its
    ``zero_optimization`` and precision sections decide the partitioning and the parameter dtype)
    and the process group the engine partitions over."""

    config: dict[str, Any]
    """The DeepSpeed config the engine is built with (``zero_optimization.stage`` 3)."""
    group: Any = None
    """Process group to partition over (None: the whole world)."""

    def __post_init__(self) -> None:
        stage = self.config.get("zero_optimization", {}).get("stage")
        if stage != 3:
            raise ValueError(f"partitioned construction is for ZeRO stage 3, not {stage}")


def build_partitioned(config: Any, zero3: Zero3Init, *, attn: str, dtype: torch.dtype,
                      init: bool) -> Any:
    """The causal LM of ``config`` with its parameters partitioned as they are created.
    ``init``: random weights (transformers' ZeRO-3 init, rank 0's RNG); otherwise the values are
    left unset, for :func:`load_partitioned` to fill."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import (
        initialize_weights_zero3,
        prevent_arange_dtype_change,
    )

    # prevent_arange_dtype_change must be entered before zero.Init: zero.Init casts tensors
    # created inside it to the parameter dtype, which would round RoPE's fp32 inv_freq to bf16.
    with (no_init_weights(), prevent_arange_dtype_change(),
          deepspeed.zero.Init(config_dict_or_path=zero3.config, data_parallel_group=zero3.group)):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    if init:
        initialize_weights_zero3(model)
    model.tie_weights()
    return model


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file that holds it, for a local model directory (one
    ``model.safetensors`` or several shards named by ``model.safetensors.index.json``)."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / SAFETENSORS_SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise PartitionedLoadError(
        f"{directory}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (ZeRO-3 loads "
        "safetensors checkpoints tensor by tensor; re-save it with save_pretrained)")


def _full_shape(param: Any) -> tuple[int, ...]:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its data is then empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def match_parameters(model: Any, shapes: dict[str, tuple[int, ...]]
                     ) -> tuple[list[tuple[str, Any]], list[str]]:
    """(checkpoint key, parameter) for each distinct parameter of ``model``, in
    ``named_parameters`` order, and what does not match ``shapes`` (checkpoint key -> shape):
    parameters no key names (a tied parameter is named by any of its names), keys that name no
    parameter, and shapes that differ."""
    names: dict[int, list[str]] = {}
    params: dict[int, Any] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    pairs, missing, wrong, known = [], [], [], set()
    for pid, aliases in names.items():
        known.update(aliases)
        key = next((a for a in aliases if a in shapes), None)
        if key is None:
            missing.append(aliases[0])
            continue
        if tuple(shapes[key]) != _full_shape(params[pid]):
            wrong.append(f"{key} is {tuple(shapes[key])}, the model's {_full_shape(params[pid])}")
        pairs.append((key, params[pid]))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} parameter(s) ({', '.join(missing[:3])})")
    unexpected = sorted(set(shapes) - known)
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) name no parameter of the model "
                        f"({', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape(s) differ ({'; '.join(wrong[:3])})")
    return pairs, problems


def checkpoint_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _rank0_decision(problem: str | None) -> str | None:
    """Rank 0's ``problem`` on every rank (the others wait for it)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return problem
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def copy_tensor(dest: torch.Tensor, path: Path, key: str) -> None:
    """Copy tensor ``key`` of a safetensors file into ``dest`` (casting to its dtype). The file
    is opened for this one read: safetensors maps the whole file, and every page read through a
    mapping that stays open counts in the process's memory (rank 0 would end up holding the
    whole checkpoint)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        dest.copy_(f.get_tensor(key))


def load_partitioned(model: Any, directory: str | Path) -> None:
    """Fill the partitioned ``model`` (from :func:`build_partitioned` with ``init=False``) from
    the safetensors checkpoint in ``directory``: rank 0 reads, each parameter is gathered, filled
    on rank 0 and re-partitioned. Raises :class:`PartitionedLoadError` on every rank when the
    checkpoint's keys or shapes do not match the model's parameters (rank 0 checks the headers
    before any gather; the other ranks need no weight files)."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    files: dict[str, Path] = {}
    key_of: dict[int, str] = {}
    problem = None
    if rank == 0:
        try:
            files = checkpoint_files(directory)
            pairs, problems = match_parameters(model, checkpoint_shapes(files))
            key_of = {id(param): key for key, param in pairs}
            if problems:
                problem = f"{directory}: " + "; ".join(problems)
        except (OSError, ValueError) as exc:
            problem = str(exc)
    problem = _rank0_decision(problem)
    if problem is not None:
        raise PartitionedLoadError(problem)
    # Every rank walks the parameters in the same order: each gather is a collective.
    with torch.no_grad():
        for _, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    key = key_of[id(param)]
                    copy_tensor(param.data, files[key], key)


def gathered_parameters(model: Any, *, to_rank: int | None = 0
                        ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, full value on CPU) of each distinct parameter of a partitioned model, gathered one
    at a time, so no rank holds more than one full parameter on its device. The value is copied
    on ``to_rank`` only (every rank when None) and is None elsewhere. A collective: every rank
    must iterate it to the end."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            keep = to_rank is None or rank == to_rank
            yield name, param.detach().to("cpu", copy=True) if keep else None
