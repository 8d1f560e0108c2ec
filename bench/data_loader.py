"""Data-loader throughput on one CPU core: our MixtureLoader vs mosaicml-streaming.

What it measures, in one run:

1. **ours**: ``MixtureLoader.next_step()`` over synthetic token shards (a ProLong stage-1-like mix:
   60% documents of exactly ``S`` tokens, 40% short documents with log-normal lengths, vocabulary
   128,256 so the tokens are uint32), until ``--rows`` rows are out, as [1, S] torch tensors with
   labels, positions and document lengths. Tokens per second of wall time.
2. **streaming**: the *same rows* (ProLong's packed MDS layout: ``input_ids`` uint32 and the
   per-document ``indices``) written to an MDS copy with ``MDSWriter`` and read back through
   ``StreamingDataset`` (local, no shuffle), each sample turned into the same fields by the same
   ``build_row``; so the difference is the reading layer. A checksum proves the rows are equal.

Both run pinned to the same single core (``os.sched_setaffinity``; children inherit it) with the
files in the page cache (written just before, then read once untimed), best of ``--repeats``.

mosaicml-streaming 0.13 pins numpy<2.2 and transformers<5 and pulls torchvision, so it cannot live
in our environment. The benchmark builds its own virtual environment (``--venv``, default
``.cache/bench-streaming-venv``) with ``mosaicml-streaming --no-deps`` plus only what a local MDS
read imports: numpy<2.2, torch (StreamingDataset is a torch IterableDataset; pip takes the local CPU
build for the exact pin), xxhash, zstd, python-snappy, brotli, pillow, tqdm, catalogue. The child
imports ``streaming.base.dataset`` without running the package ``__init__``s, which import the
vision and NLP helpers (torchvision, transformers) that reading MDS never touches.

Run: ``.venv/bin/python bench/data_loader.py`` (``--no-streaming`` for ours alone; ``--json PATH``
writes the figures for ``bench/table.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prolong.data.mixture import MixtureLoader  # noqa: E402
from prolong.data.shards import ShardWriter, TokenShards, token_dtype  # noqa: E402
from prolong.spec import DataStream  # noqa: E402

VOCAB = 128256
STREAMING_REQUIREMENTS = [
    "numpy<2.2", "torch==2.13.0", "xxhash<4", "zstd<2", "python-snappy<1", "Brotli", "pillow",
    "tqdm<5", "catalogue<3",
]
STREAMING_PACKAGE = "mosaicml-streaming==0.13.0"
GOAL = 53_000  # tokens/s on one core (the data issue's goal)


def make_shards(root: Path, seq_len: int, long_docs: int, short_tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    dtype = token_dtype(VOCAB)
    w = ShardWriter(root / "long", dtype=dtype)
    for _ in range(long_docs):
        w.add(rng.integers(0, VOCAB, seq_len, dtype=dtype))
    w.close()
    w = ShardWriter(root / "short", dtype=dtype)
    total = 0
    while total < short_tokens:
        # Web-text-like lengths: median ~700 tokens, a long tail, capped at the row length.
        n = int(min(seq_len, max(8, rng.lognormal(6.5, 1.2))))
        w.add(rng.integers(0, VOCAB, n, dtype=dtype))
        total += n
    w.close()
    streams = [
        (DataStream(domain="long", path="long", format="jsonl", packing="long", proportion=0.6),
         TokenShards(root / "long")),
        (DataStream(domain="short", path="short", format="jsonl", packing="concat",
                    proportion=0.4), TokenShards(root / "short")),
    ]
    return streams


def make_loader(streams, seq_len: int, rows_per_step: int, seed: int) -> MixtureLoader:
    return MixtureLoader(streams, seq_len=seq_len, rows_per_step=rows_per_step, seed=seed,
                         reorder=True)


def checksum(input_ids_rows) -> int:
    acc = 0
    for i, ids in enumerate(input_ids_rows):
        acc = (acc * 1_000_003 + int(np.asarray(ids, dtype=np.int64).sum()) + i) % (1 << 61)
    return acc


def bench_ours(streams, seq_len, rows_per_step, steps, repeats, seed) -> tuple[float, list]:
    best = 0.0
    for _ in range(repeats):
        loader = make_loader(streams, seq_len, rows_per_step, seed)
        loader.next_step()  # untimed: first epoch permutations, first touches
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            for mb in loader.next_step():
                n += mb.input_ids.numel()
        best = max(best, n / (time.perf_counter() - t0))
    # The rows the streaming side must reproduce: the same loader, same steps, after warm-up.
    loader = make_loader(streams, seq_len, rows_per_step, seed)
    loader.next_step()
    rows = [r for _ in range(steps) for r in loader.next_rows()]
    return best, rows


def ensure_streaming_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    want = json.dumps([STREAMING_PACKAGE, *STREAMING_REQUIREMENTS])
    if python.exists() and marker.exists() and marker.read_text() == want:
        return python
    print(f"building {venv} (once) ...", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["--no-deps", STREAMING_PACKAGE], STREAMING_REQUIREMENTS):
        # pip warns that streaming's full requirements are missing: by design, so keep quiet
        # unless the install itself fails.
        proc = subprocess.run([*pip, *args], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"pip install {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    marker.write_text(want)
    return python


CHILD = r'''
import importlib.util, json, os, sys, time, types
import numpy as np

# Import the MDS reader and writer without streaming/__init__.py and streaming/base/__init__.py:
# they import the vision and NLP extras (torchvision, transformers) that local MDS reads never use.
for name in ("streaming", "streaming.base"):
    spec = importlib.util.find_spec(name)
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = pkg
from streaming.base.dataset import StreamingDataset
from streaming.base.format.mds.writer import MDSWriter
import streaming.base.util as sutil

repo, work, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, repo)
from prolong.data.packing import build_row

ids = np.load(os.path.join(work, "rows.npy"), mmap_mode="r")
lengths = json.load(open(os.path.join(work, "doc_lengths.json")))
domains = json.load(open(os.path.join(work, "domains.json")))
mds = os.path.join(work, "mds")
with MDSWriter(out=mds, columns={"input_ids": "ndarray:uint32", "indices": "ndarray:uint32",
                                 "domain": "str"}, size_limit=1 << 27) as out:
    for row, lens, dom in zip(ids, lengths, domains):
        ends = np.cumsum(lens)
        out.write({"input_ids": np.ascontiguousarray(row),
                   "indices": np.stack([ends - lens, ends], 1).astype(np.uint32), "domain": dom})

sutil.clean_stale_shared_memory()
ds = StreamingDataset(local=mds, shuffle=False, batch_size=1)

def packed(sample):
    x = sample["input_ids"]
    return build_row([x[a:b] for a, b in sample["indices"]], domain=sample["domain"]).to_torch()

def run(fn):
    t0 = time.perf_counter()
    n = 0
    for sample in ds:
        out = fn(sample)
        n += out.input_ids.numel() if hasattr(out, "input_ids") else out["input_ids"].size
    return n / (time.perf_counter() - t0), n

for sample in ds:  # untimed: page cache, shared memory, first-epoch setup
    pass
full = max(run(packed)[0] for _ in range(repeats))
raw = max(run(lambda s: s)[0] for _ in range(repeats))
acc = 0
for i, sample in enumerate(ds):
    acc = (acc * 1_000_003 + int(sample["input_ids"].astype(np.int64).sum()) + i) % (1 << 61)
print("RESULT " + json.dumps({"tokens_per_s": full, "raw_tokens_per_s": raw, "checksum": acc,
                              "rows": len(ds), "affinity": sorted(os.sched_getaffinity(0))}))
'''


def bench_streaming(python: Path, rows, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-mds-") as work:
        np.save(Path(work) / "rows.npy", np.stack([r.input_ids for r in rows]).astype(np.uint32))
        (Path(work) / "doc_lengths.json").write_text(json.dumps([r.doc_lengths.tolist()
                                                                 for r in rows]))
        (Path(work) / "domains.json").write_text(json.dumps([r.domain for r in rows]))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([str(python), "-c", CHILD, str(REPO), work, str(repeats)],
                              capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"streaming child failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--rows-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32, help="timed steps (rows = steps x rows/step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the last)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venv", type=Path, default=REPO / ".cache" / "bench-streaming-venv")
    ap.add_argument("--no-streaming", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)

    python = None if args.no_streaming else ensure_streaming_venv(args.venv)
    rows_total = args.steps * args.rows_per_step
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        s = args.seq_len
        # Enough data that the timed rows run through epochs of neither stream too often.
        streams = make_shards(Path(tmp), s, long_docs=max(8, int(0.6 * rows_total) + 4),
                              short_tokens=int(0.45 * rows_total * s) + s, seed=args.seed)
        ours, rows = bench_ours(streams, s, args.rows_per_step, args.steps, args.repeats,
                                args.seed)
        print(f"core {core}, S={s}, {rows_total} rows ({rows_total * s / 1e6:.1f}M tokens), "
              f"mix 60% long docs / 40% short docs, uint32 tokens (vocab {VOCAB})")
        print(f"ours (MixtureLoader -> torch):        {ours:>16,.0f} tokens/s "
              f"(goal {GOAL:,}: {'met' if ours >= GOAL else 'NOT met'})")
        result = {"bench": "data_loader", "seq_len": s, "rows": rows_total, "core": core,
                  "goal": GOAL, "ours_tokens_per_s": ours, "streaming_tokens_per_s": None,
                  "command": " ".join(["python", "bench/data_loader.py",
                                        *_without_json(sys.argv[1:])])}
        if python is None:
            write_json(args.json, result)
            return
        theirs = bench_streaming(python, rows, args.repeats)
    if theirs["checksum"] != checksum(r.input_ids for r in rows):
        raise SystemExit("streaming read back different rows than ours: checksum mismatch")
    assert theirs["affinity"] == [core], theirs["affinity"]
    print(f"mosaicml-streaming StreamingDataset:  {theirs['tokens_per_s']:>16,.0f} tokens/s "
          f"(same rows, same build_row; raw sample reads alone "
          f"{theirs['raw_tokens_per_s']:,.0f} tokens/s)")
    print(f"ratio ours / streaming:               {ours / theirs['tokens_per_s']:>16.2f}x")
    result.update(streaming_tokens_per_s=theirs["tokens_per_s"],
                  streaming_raw_tokens_per_s=theirs["raw_tokens_per_s"])
    write_json(args.json, result)


def _without_json(argv: list[str]) -> list[str]:
    """The arguments that decide the figures (``--json PATH`` only says where they go)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--json" or (i and argv[i - 1] == "--json"):
            continue
        out.append(arg)
    return out


def write_json(path: Path | None, result: dict) -> None:
    """The figures for bench/table.py, written atomically (temporary name + rename)."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
