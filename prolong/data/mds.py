"""A reader for Mosaic MDS shards (ProLong's released data), without mosaicml-streaming.

mosaicml-streaming pins numpy<2.2 and transformers<5 and pulls torchvision, so it cannot live in our
environment. The on-disk format is small enough to read ourselves:

- ``index.json``: ``{"version": 2, "shards": [...]}``; each shard entry names its columns
  (``column_names``, ``column_encodings``, ``column_sizes``: null for variable-size columns), its
  ``compression`` (null or ``"zstd"``, ``"gz:9"``, ...), ``raw_data`` (basename, bytes) and, when
  compressed, ``zip_data`` (the file actually stored).
- a shard file: ``uint32 n``, ``uint32 offsets[n + 1]`` (absolute byte offsets of each sample),
  the writer's config as JSON, then the samples. A sample is ``uint32`` sizes of its variable-size
  columns, then every column's bytes in column order.

Supported encodings: bytes, str, int, the numpy scalars (uint8..uint64, int8..int64, float16..64),
str_int, str_float, str_decimal, json, and ndarray in all four forms (``ndarray``,
``ndarray:DTYPE``, ``ndarray:DTYPE:SHAPE``). Refused with a DataError: pkl (unpickling runs
arbitrary code) and the image encodings (pil, jpeg, png, ...: no use for text training).

Supported compressions: none, gz and bz2 (standard library), zstd, br and snappy (pyarrow's
bundled codecs: no extra dependency). Anything else is refused with a DataError naming the shard.

Trade-off: a shard is read (and decompressed) whole into memory, one shard at a time: MDS
compresses whole files, shards are ~64 MB by default, and reading is sequential during preparation.
"""

from __future__ import annotations

import bz2
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from prolong.data.errors import DataError

INDEX_FILE = "index.json"

_SCALARS = {name: np.dtype(name) for name in (
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64")}
# NDArray's one-byte codes (streaming.base.format.mds.encodings.NDArray).
_NDARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16",
                   32: "uint32", 33: "int32", 34: "float32", 64: "uint64", 65: "int64",
                   66: "float64"}
_SHAPE_DTYPES = {0: np.uint8, 1: np.uint16, 2: np.uint32, 3: np.uint64}
_REFUSED = {"pkl": "pickle can run arbitrary code when read",
            **{e: "image columns are not text" for e in (
                "pil", "jpeg", "png", "jpeg_array", "jpegarray", "list[pil]", "list[jpeg]",
                "list[png]")}}
_PYARROW_CODECS = {"zstd": "zstd", "br": "brotli", "snappy": "snappy"}
SUPPORTED_COMPRESSIONS = ("none", "gz", "bz2", *_PYARROW_CODECS)


def _decoder(encoding: str, where: str):
    """A function bytes -> value for one column encoding; DataError if we do not read it."""
    if encoding in _SCALARS:
        dtype = _SCALARS[encoding]
        return lambda b: np.frombuffer(b, dtype, count=1)[0]
    simple = {"bytes": bytes, "str": lambda b: bytes(b).decode("utf-8"),
              "int": lambda b: int(np.frombuffer(b, np.int64, count=1)[0]),
              "str_int": lambda b: int(bytes(b).decode("utf-8")),
              "str_float": lambda b: float(bytes(b).decode("utf-8")),
              "str_decimal": lambda b: Decimal(bytes(b).decode("utf-8")),
              "json": lambda b: json.loads(bytes(b).decode("utf-8"))}
    if encoding in simple:
        return simple[encoding]
    if encoding == "ndarray" or encoding.startswith("ndarray:"):
        return _ndarray_decoder(encoding, where)
    why = _REFUSED.get(encoding, "unknown encoding")
    raise DataError(f"MDS column encoding {encoding!r} is not supported ({why}); supported: "
                    "bytes, str, int, json, str_int, str_float, str_decimal, numpy scalars, "
                    "ndarray[:dtype[:shape]]", path=where)


def _ndarray_decoder(encoding: str, where: str):
    args = encoding.split(":")[1:]
    dtype = np.dtype(args[0]) if args else None
    if dtype is not None and dtype.name not in _NDARRAY_DTYPES.values():
        raise DataError(f"MDS column encoding {encoding!r}: unsupported ndarray dtype", path=where)
    shape = tuple(int(x) for x in args[1].split(",")) if len(args) > 1 else None

    def decode(data: memoryview) -> np.ndarray:
        pos = 0
        dt = dtype
        if dt is None:
            dt = np.dtype(_NDARRAY_DTYPES[data[0]])
            pos = 1
        shp = shape
        if shp is None:
            code = data[pos]
            ndim, shape_dtype = code >> 2, _SHAPE_DTYPES[code & 3]
            width = ndim * np.dtype(shape_dtype).itemsize
            shp = tuple(int(x) for x in np.frombuffer(data[pos + 1: pos + 1 + width], shape_dtype))
            pos += 1 + width
        # A copy: callers keep arrays after the shard's buffer is released.
        return np.frombuffer(data[pos:], dt).reshape(shp).copy()

    return decode


def _shard_entry(entry: Any, directory: Path, where: str) -> _Shard:
    """One shard of index.json, checked: a malformed entry is a DataError naming the shard."""
    if not isinstance(entry, dict):
        raise DataError(f"shard entry is a {type(entry).__name__}, not an object", path=where)
    if entry.get("format", "mds") != "mds":
        raise DataError(f"shard format {entry.get('format')!r} is not mds", path=where)
    compression = entry.get("compression")
    algo = compression.split(":")[0] if isinstance(compression, str) else compression
    if compression is not None and algo not in SUPPORTED_COMPRESSIONS:
        raise DataError(f"MDS compression {compression!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED_COMPRESSIONS)})", path=where)
    try:
        stored = entry["zip_data"] if compression else entry["raw_data"]
        basename = stored["basename"]
        names, encodings, sizes = (list(entry[k]) for k in (
            "column_names", "column_encodings", "column_sizes"))
        shard = _Shard(directory / basename, compression or None,
                       int(entry["raw_data"]["bytes"]), names, encodings, sizes,
                       int(entry["samples"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"malformed shard entry ({type(exc).__name__}: {exc})", path=where) \
            from None
    if not isinstance(basename, str) or not basename or Path(basename).name != basename:
        raise DataError(f"shard file name {basename!r} is not a file in the dataset directory",
                        path=where)
    if not (len(names) == len(encodings) == len(sizes)) or not names or \
            not all(isinstance(x, str) for x in (*names, *encodings)) or \
            not all(x is None or (isinstance(x, int) and x >= 0) for x in sizes):
        raise DataError("column_names, column_encodings and column_sizes disagree", path=where)
    if shard.samples < 0 or shard.raw_bytes < 0:
        raise DataError("negative samples or bytes", path=where)
    return shard


@dataclass(frozen=True)
class _Shard:
    path: Path
    compression: str | None
    raw_bytes: int
    names: list[str]
    encodings: list[str]
    sizes: list[int | None]
    samples: int


class MDSDataset:
    """The samples of one MDS dataset directory (``index.json`` + shard files), in order.

    ``len(ds)`` counts samples; iterating yields dicts {column: value}. Every shard's encodings and
    compression are checked when the index is opened, so an unsupported one fails before any work.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise DataError(f"not an MDS dataset (no {INDEX_FILE})", path=str(self.directory))
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            entries = index["shards"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"unreadable MDS index: {exc}", path=str(index_path)) from None
        if not isinstance(entries, list):
            raise DataError(f"unreadable MDS index: shards is a {type(entries).__name__}, not a "
                            "list", path=str(index_path))
        self.shards: list[_Shard] = []
        self._decoders = []
        for i, entry in enumerate(entries):
            where = f"{index_path} shard {i}"
            shard = _shard_entry(entry, self.directory, where)
            self._decoders.append([_decoder(e, f"{shard.path} column {n}")
                                   for n, e in zip(shard.names, shard.encodings, strict=True)])
            if self.shards and (shard.names, shard.encodings) != (self.shards[0].names,
                                                                  self.shards[0].encodings):
                raise DataError("columns differ from shard 0's (one dataset has one set of "
                                "columns)", path=where)
            self.shards.append(shard)

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def columns(self) -> dict[str, str]:
        return dict(zip(self.shards[0].names, self.shards[0].encodings, strict=True)) \
            if self.shards else {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard, decoders in zip(self.shards, self._decoders, strict=True):
            yield from self._read_shard(shard, decoders)

    def _read_shard(self, shard: _Shard, decoders) -> Iterator[dict[str, Any]]:
        if not shard.path.is_file():
            raise DataError("MDS shard file is missing", path=str(shard.path))
        data = shard.path.read_bytes() if shard.compression is None else _decompress(shard)
        yield from self._samples(memoryview(data), shard, decoders)

    @staticmethod
    def _samples(buf: memoryview, shard: _Shard, decoders) -> Iterator[dict[str, Any]]:
        where = str(shard.path)
        if len(buf) < 4:
            raise DataError("truncated MDS shard", path=where)
        n = int(np.frombuffer(buf[:4], np.uint32)[0])
        if n != shard.samples or len(buf) < 4 * (n + 2):
            raise DataError(f"shard holds {n} samples, index.json says {shard.samples}", path=where)
        offsets = np.frombuffer(buf[4: 4 * (n + 2)], np.uint32).astype(np.int64)
        if offsets[-1] > len(buf) or np.any(np.diff(offsets) < 0):
            raise DataError("truncated or corrupt MDS shard (sample offsets out of range)",
                            path=where)
        if offsets[0] < 4 * (n + 2):
            raise DataError("corrupt MDS shard (sample offsets overlap its header)", path=where)
        n_var = sum(1 for s in shard.sizes if s is None)
        for i in range(n):
            sample = buf[offsets[i]: offsets[i + 1]]
            try:
                out = _sample(sample, shard, decoders, n_var)
            except DataError:
                raise
            except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
                # A column's bytes that its encoding cannot decode: a corrupt shard, or an
                # index.json whose columns are not the shard's.
                raise DataError(f"sample {i} does not decode ({type(exc).__name__}: "
                                f"{str(exc)[:120]})", path=where) from None
            if out is None:
                raise DataError(f"sample {i}: column sizes do not add up to the sample's bytes",
                                path=where)
            yield out


def _sample(sample: memoryview, shard: _Shard, decoders, n_var: int) -> dict[str, Any] | None:
    """One sample's columns (None when their sizes do not add up to its bytes)."""
    var_sizes = np.frombuffer(sample[: 4 * n_var], np.uint32) if n_var else ()
    pos, k, out = 4 * n_var, 0, {}
    for name, size, decode in zip(shard.names, shard.sizes, decoders, strict=True):
        if size is None:
            size = int(var_sizes[k])
            k += 1
        if pos + size > len(sample):
            return None
        out[name] = decode(sample[pos: pos + size])
        pos += size
    return out if pos == len(sample) else None


def _decompress(shard: _Shard) -> bytes:
    algo = shard.compression.split(":")[0]
    data = shard.path.read_bytes()
    try:
        if algo == "gz":
            out = gzip.decompress(data)
        elif algo == "bz2":
            out = bz2.decompress(data)
        else:
            import pyarrow as pa
            out = pa.Codec(_PYARROW_CODECS[algo]).decompress(
                data, decompressed_size=shard.raw_bytes, asbytes=True)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot decompress ({shard.compression}): {exc}", path=str(shard.path)) \
            from None
    if len(out) != shard.raw_bytes:
        raise DataError(f"decompressed to {len(out)} bytes, index.json says {shard.raw_bytes}",
                        path=str(shard.path))
    return out


def find_datasets(root: str | Path) -> list[Path]:
    """Every MDS dataset directory (one holding index.json) under ``root``, sorted. ProLong's
    releases nest one dataset per domain under a common root."""
    root = Path(root)
    if (root / INDEX_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(INDEX_FILE))


def iter_documents(root: str | Path) -> Iterator[tuple[str, np.ndarray, str | None]]:
    """Token documents of ProLong-style MDS data: ``(id, input_ids[start:end], domain)`` for every
    ``(start, end)`` of each sample's ``indices``; a sample without ``indices`` is one document.
    The id is ``<dataset dir relative to root>/<sample>/<doc>``, stable across runs."""
    root = Path(root)
    for ds_dir in find_datasets(root):
        ds = MDSDataset(ds_dir)
        cols = ds.columns
        if "input_ids" not in cols:
            raise DataError(f"MDS dataset has no input_ids column (columns: {', '.join(cols)})",
                            path=str(ds_dir))
        rel = ds_dir.relative_to(root).as_posix() if ds_dir != root else "."
        for i, sample in enumerate(ds):
            ids = np.asarray(sample["input_ids"]).reshape(-1)
            if not np.issubdtype(ids.dtype, np.integer):
                raise DataError(f"sample {i}: input_ids are {ids.dtype}, not integer token ids",
                                path=str(ds_dir))
            domain = sample.get("domain")
            spans = sample.get("indices")
            if spans is None:
                yield f"{rel}/{i}", ids, domain
                continue
            spans = np.asarray(spans).reshape(-1, 2)
            for j, (start, end) in enumerate(spans.tolist()):
                if not 0 <= start <= end <= len(ids):
                    raise DataError(f"sample {i}: document span ({start}, {end}) outside its "
                                    f"{len(ids)} input_ids", path=str(ds_dir))
                yield f"{rel}/{i}/{j}", ids[start:end], domain
