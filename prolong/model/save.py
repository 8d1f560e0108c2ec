"""Write a model's HF weights (safetensors) one parameter at a time: no rank holds the whole model.

``save_pretrained`` needs the whole state dict in memory. Under ZeRO-3 that means gathering every
parameter at once (each rank then holds the full model: 16 GB of Llama-3-8B in bf16 on every GPU)
and copying them all to rank 0's host memory. Here each parameter is gathered alone
(:func:`prolong.model.zero3.gathered_parameters`, a collective every rank takes part in), copied to
rank 0's host and written straight into its place in the file, then freed. That works because a
safetensors file is an 8-byte header length, a JSON header naming each tensor's dtype, shape and
byte range, then the raw bytes: the shapes and dtypes are known before any value is gathered
(ZeRO-3 keeps the full shape in ``ds_shape``), so the header is written first and each value
streamed after it, in the header's order. Peak memory: one parameter on each device, that
parameter twice on rank 0's host (its copy, its bytes).

The directory holds what ``save_pretrained`` writes for the same model: ``config.json`` (with its
``dtype`` and ``architectures``), ``generation_config.json`` for generative models, and the
weights as ``model.safetensors`` or, above :data:`MAX_SHARD_BYTES`, numbered shards named by
``model.safetensors.index.json``. Tied parameters are written once (under the first name, as
``named_parameters`` lists them); non-persistent buffers (RoPE's inv_freq) are not written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from prolong.model.zero3 import gathered_parameters

MAX_SHARD_BYTES = 5 * 10**9
"""Largest weights file (transformers' and the hub's usual shard size)."""
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                      torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the written checkpoint: its name, full shape, dtype and size."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def weight_entries(model: Any) -> list[TensorEntry]:
    """The tensors to write, in the order they are gathered: each distinct parameter (full shape,
    also when ZeRO-3 has partitioned it), then the persistent buffers."""
    out = [TensorEntry(name, tuple(getattr(p, "ds_shape", p.shape)), p.dtype)
           for name, p in model.named_parameters()]
    persistent = set(model.state_dict(keep_vars=True))
    out += [TensorEntry(name, tuple(b.shape), b.dtype) for name, b in model.named_buffers()
            if name in persistent]
    return out


def shard_plan(entries: list[TensorEntry], max_bytes: int = MAX_SHARD_BYTES
               ) -> list[list[TensorEntry]]:
    """Consecutive entries grouped into files of at most ``max_bytes`` (a larger tensor gets a
    file of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(entries: list[TensorEntry]) -> bytes:
    """The 8-byte length and the JSON header of a file holding ``entries`` in this order, padded
    with spaces to a multiple of 8 bytes (as the safetensors library writes it)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        if e.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{e.name}: dtype {e.dtype} has no safetensors name")
        header[e.name] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_tensor(out: BinaryIO, entry: TensorEntry, value: torch.Tensor) -> None:
    if tuple(value.shape) != entry.shape or value.dtype != entry.dtype:
        raise ValueError(f"{entry.name}: gathered {tuple(value.shape)} {value.dtype}, planned "
                         f"{entry.shape} {entry.dtype}")
    flat = value.detach().contiguous().reshape(-1)
    out.write(flat.view(torch.uint8).numpy().data)  # little-endian, as safetensors stores it


def save_weights(model: Any, directory: str | Path | None, *,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``model``'s config and weights into ``directory`` (an existing local directory on
    the writing rank, None on the others). A collective under ZeRO-3: every rank must call it;
    the rank whose ``directory`` is given writes (rank 0 gathers the values)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    writing = directory is not None
    if writing and rank != 0:
        raise ValueError("only rank 0 receives the gathered values: pass directory there")
    entries = weight_entries(model)
    plan = shard_plan(entries, max_shard_bytes)
    names = shard_names(len(plan))
    where = {e.name: i for i, shard in enumerate(plan) for e in shard}
    out: BinaryIO | None = None
    current = -1
    n_params = sum(1 for _ in model.named_parameters())
    values = gathered_parameters(model, to_rank=0)
    buffers = dict(model.named_buffers())
    try:
        for k, entry in enumerate(entries):
            # Every rank walks the gathers in the same order; only the writer keeps the values.
            if k < n_params:
                name, value = next(values)
                assert name == entry.name, (name, entry.name)
            else:
                value = buffers[entry.name].detach().to("cpu")
            if not writing:
                continue
            if where[entry.name] != current:
                if out is not None:
                    out.close()
                current = where[entry.name]
                out = open(Path(directory) / names[current], "wb")  # noqa: SIM115 - kept open across entries
                out.write(safetensors_header(plan[current]))
            _write_tensor(out, entry, value)
            del value
        for _ in values:  # the generator's end (none left: every parameter was planned)
            pass
    finally:
        if out is not None:
            out.close()
    if not writing:
        return
    directory = Path(directory)
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: names[where[e.name]] for e in entries}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = model.config
    config.dtype = str(entries[0].dtype).split(".")[1] if entries else config.dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "can_generate", lambda: False)() and \
            getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
