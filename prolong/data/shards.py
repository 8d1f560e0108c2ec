"""Token shards: the on-disk form of one tokenized stream.

A shard directory holds

- ``tokens.bin``: every document's token ids back to back (flat array, dtype from meta.json),
- ``offsets.npy``: int64 start offset of each document plus the end (length n_docs + 1),
- ``mask.bin`` (optional): one uint8 per token, 1 where the token may be a prediction target
  (SFT writes 0 on everything but assistant turns); absent means every token is a target,
- ``meta.json``: dtype, counts, and whatever the writer's caller records (tokenizer hash, source
  hashes, length rules) so that a changed input or tokenizer is detected.

Readers memory-map ``tokens.bin``: opening a 20B-token stream costs nothing and documents are
zero-copy views. Writers build the directory under a temporary name and rename it into place, so a
crash never leaves a half-written shard that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
MASK_FILE = "mask.bin"
META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use for vocabularies that fit; Llama-3's does not."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


class ShardWriter:
    """Append documents, then ``close()`` to publish the directory atomically."""

    def __init__(self, directory: str | Path, *, dtype: np.dtype | str = np.uint32,
                 with_mask: bool = False):
        self.directory = Path(directory)
        self.dtype = np.dtype(dtype)
        self._staging = self.directory.with_name(self.directory.name + ".partial")
        if self._staging.exists():
            shutil.rmtree(self._staging)
        self._staging.mkdir(parents=True)
        self._tokens = open(self._staging / TOKENS_FILE, "wb")  # noqa: SIM115 (closed in close())
        self._mask = open(self._staging / MASK_FILE, "wb") if with_mask else None  # noqa: SIM115
        self._offsets = [0]
        self._closed = False

    def add(self, ids: Iterable[int] | np.ndarray, mask: Iterable[int] | np.ndarray | None = None) -> None:
        """Append one document (and, for a writer made with_mask, its 0/1 label mask)."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document is a 1-D array of token ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype}")
        if (self._mask is None) != (mask is None):
            raise ValueError("give a mask for every document exactly when the writer has with_mask")
        if self._mask is not None:
            m = np.asarray(mask, dtype=np.uint8)
            if m.shape != arr.shape:
                raise ValueError(f"mask shape {m.shape} differs from the document's {arr.shape}")
            self._mask.write(m.tobytes())
        self._tokens.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + int(arr.size))

    def close(self, meta: dict[str, Any] | None = None) -> Path:
        """Write offsets and meta, then move the directory into place (replacing an old one)."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()
        offsets = np.asarray(self._offsets, dtype=np.int64)
        np.save(self._staging / OFFSETS_FILE, offsets)
        info = {"dtype": self.dtype.name, "num_docs": len(offsets) - 1,
                "num_tokens": int(offsets[-1]), "has_mask": self._mask is not None, **(meta or {})}
        (self._staging / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.replace(self._staging, self.directory)
        self._closed = True
        return self.directory

    def abort(self) -> None:
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()
        shutil.rmtree(self._staging, ignore_errors=True)
        self._closed = True


class DocumentOffsets:
    """What a stream's document offsets tell (count, tokens, lengths): shared by the shards on
    disk and the lengths-only stand-in the planner replays (prolong.data.lockstep)."""

    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class TokenShards(DocumentOffsets):
    """Read-only, memory-mapped view of a shard directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.directory}: not a token shard directory (no {META_FILE};"
                                    " run `prolongctl data prepare`)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.offsets: np.ndarray = np.load(self.directory / OFFSETS_FILE)
        dtype = np.dtype(self.meta["dtype"])
        n_tokens = int(self.offsets[-1])
        # np.memmap refuses empty files; an empty stream is rejected by its builder anyway.
        self.tokens: np.ndarray = (np.memmap(self.directory / TOKENS_FILE, dtype=dtype, mode="r",
                                             shape=(n_tokens,))
                                   if n_tokens else np.zeros(0, dtype=dtype))
        self.mask_array: np.ndarray | None = None
        if self.meta.get("has_mask"):
            self.mask_array = (np.memmap(self.directory / MASK_FILE, dtype=np.uint8, mode="r",
                                         shape=(n_tokens,)) if n_tokens else np.zeros(0, np.uint8))

    def doc(self, i: int) -> np.ndarray:
        """Document ``i`` as a zero-copy view."""
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def mask(self, i: int) -> np.ndarray | None:
        """Label mask of document ``i`` (None when every token is a target)."""
        if self.mask_array is None:
            return None
        return self.mask_array[self.offsets[i]: self.offsets[i + 1]]

    def span(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the flat stream (crossing document boundaries)."""
        return self.tokens[start:stop]
