"""``prolongctl data prepare``: every training stage's streams as token shards, built once.

Layout of the prepared directory (``data.preparedDir``, default ``<storage.root>/data``)::

    corpora/<name>-<envkey>/data.jsonl     embedded corpora (prolong.data.corpus)
    tokenizers/bpe<V>-<key>/               trained tokenizers (transformers-loadable)
    tokenized/<source>-<key>/              whole documents of one source, one tokenizer
    shards/<source>-<key>/                 what training reads: tokenized + length rules
    manifests/<job name>.json              per stage: domain -> shard dir, stats, hashes

Directory keys hash *identities* (source format/path/field, tokenizer source or trained-tokenizer
key, chat template, length rules), never contents, so two stages that share a stream, tokenizer
and rules share one shard directory, and the loader can find it without preparing anything.
*Contents* (source files' path + size + mtime, the tokenizer's content hash) are recorded in each
directory's meta.json; a mismatch rebuilds that directory in place, a match skips it. Source files
are fingerprinted by size and mtime (like make and rsync), not hashed: re-hashing 20B tokens of
input on every run would cost minutes.

Two levels (tokenized, then shards) so that a stream used with several length rules (stage 2's
code repos at 2K and at 256) is tokenized once; the price is a second copy on disk of the streams
whose rules keep most of the data.

Length rules, per stream (``TrainSpec.stream_min_length`` / ``stream_target_length``):

- ``long``: documents shorter than minLength are dropped; each kept document is cut into
  consecutive targetLength pieces from its start, and a final remainder shorter than targetLength
  is dropped. Every piece is its own document in the shards (position ids restart), exactly
  targetLength long, as the packer expects. Trade-off: up to targetLength - 1 tokens lost per
  document, in exchange for slots that are always full-length documents (ProLong keeps only
  documents at least as long as the target).
- ``concat`` and ``conversation``: documents shorter than minLength are dropped; the rest are kept
  whole (the packer cuts rows).
- Any packing: documents longer than ``maxLength`` (when set) are dropped before the rules
  above, so one source can feed a short stream and a long one.

Pretraining documents get no BOS/EOS (as in ProLong's released data: document boundaries travel
as lengths). Conversations are rendered with the chat template (``sft.chatTemplate``: the
tokenizer's own, else chatml) and carry a label mask that is 1 on assistant turns only (see
:func:`prolong.data.tokenizer.conversation_segments` for exactly which tokens).

A stage with ``model.fromStage`` and no tokenizer source uses the upstream stage's tokenizer,
resolved through the pipeline; preparing such a stage from its own file is refused with an
error naming the pipeline file to prepare instead.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prolong.data import corpus as corpus_mod
from prolong.data import sources
from prolong.data import tokenizer as tokmod
from prolong.data.errors import DataError
from prolong.data.shards import META_FILE, ShardWriter, TokenShards, token_dtype
from prolong.model.staging import StagingError, load_dir, tokenizer_location
from prolong.spec import DataStream, EvalJob, Job, SFTJob
from prolong.specfile import Loaded, load
from prolong.stage.lock import StageLock, StageLocked
from prolong.stage.payload import StageFileError, read_stage_file, stage_file_beside

PREPARE_FORMAT = 1  # bump when the bytes a build writes change for the same inputs
BATCH_DOCS = 256
BATCH_CHARS = 2_000_000


# ---------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------

def length_pieces(length: int, *, packing: str, min_length: int,
                  target_length: int | None = None,
                  max_length: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) token spans a document of ``length`` tokens contributes under the rules."""
    if length < min_length or length == 0 or (max_length is not None and length > max_length):
        return []
    if packing != "long":
        return [(0, length)]
    assert target_length is not None and target_length >= 1
    return [(k * target_length, (k + 1) * target_length) for k in range(length // target_length)]


def length_histogram(lengths: np.ndarray) -> list[dict[str, int]]:
    """Documents per power-of-two length bucket: {"upTo": 2**k, "documents": n} for n > 0,
    where a bucket holds lengths in (2**(k-1), 2**k]."""
    if len(lengths) == 0:
        return []
    ks = np.ceil(np.log2(np.maximum(np.asarray(lengths, dtype=np.float64), 1))).astype(int)
    values, counts = np.unique(ks, return_counts=True)
    return [{"upTo": int(2 ** k), "documents": int(n)} for k, n in zip(values, counts, strict=True)]


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.strip("/.")[-40:])
    return keep.strip("-.") or "stream"


# ---------------------------------------------------------------------------------------------
# Where things go
# ---------------------------------------------------------------------------------------------

def prepared_dir(job: Job) -> Path:
    data = job.spec.data
    return Path(data.prepared_dir) if data.prepared_dir else Path(job.spec.storage.root) / "data"


@dataclass(frozen=True)
class TokenizerRef:
    """Which tokenizer a stage uses: ``identity`` names it (stable), ``location`` loads it,
    ``train`` says how to build it when it is a trained one that does not exist yet."""

    identity: str
    location: str
    train: tuple[Job, int] | None = None


def tokenizer_ref(job: Job, loaded: Loaded, *, _seen: tuple[str, ...] = ()) -> TokenizerRef:
    """The tokenizer of a training stage, following model.fromStage through the pipeline. A
    source (its own or the model's) is named by that source and loaded from where
    :func:`prolong.model.staging.tokenizer_location` says: the staged copy, or a local
    directory; never the hub (a hub id with nothing staged is a DataError)."""
    tok = job.spec.data.tokenizer
    if tok.source:
        return TokenizerRef(f"source:{_source_identity(tok.source)}",
                            _source_location(job, loaded))
    if tok.train_vocab_size:
        vocab = tok.train_vocab_size
        key = _hash([tokmod.TOKENIZER_FORMAT, vocab, tokmod.DEFAULT_TRAIN_CHARS,
                     [_fingerprint(resolve_stream(s, job)) for s in _training_streams(job)]])
        where = prepared_dir(job) / "tokenizers" / f"bpe{vocab}-{key}"
        return TokenizerRef(f"trained:{where.name}", str(where), (job, vocab))
    if job.spec.model.source:
        return TokenizerRef(f"source:{_source_identity(job.spec.model.source)}",
                            _source_location(job, loaded))
    upstream = job.spec.model.from_stage
    if upstream:
        if not loaded.is_pipeline and (staged := _upstream_tokenizer(loaded, upstream)):
            return staged
        if not loaded.is_pipeline or upstream not in loaded.jobs:
            raise DataError(f"{job.metadata.name} takes its tokenizer from stage {upstream!r} "
                            "(model.fromStage); prepare the pipeline file that contains both "
                            "stages instead", path=loaded.path)
        if upstream in _seen:
            raise DataError(f"tokenizer lookup loops through stage {upstream}", path=loaded.path)
        up = loaded.jobs[upstream]
        if isinstance(up, EvalJob):
            raise DataError(f"stage {upstream} is an EvalJob and has no tokenizer",
                            path=loaded.path)
        return tokenizer_ref(up, loaded, _seen=(*_seen, upstream))
    raise DataError(f"{job.metadata.name}: no tokenizer: set data.tokenizer.source, "
                    "data.tokenizer.trainVocabSize or model.source", path=loaded.path)


def _source_location(job: Job, loaded: Loaded) -> str:
    """Where the stage's tokenizer source is loaded from (the identity stays the source: the
    staged copy is the same tokenizer, so shards prepared from either are the same)."""
    try:
        where = tokenizer_location(job.spec.data.tokenizer, job.spec.model, "data.tokenizer")
    except StagingError as exc:
        raise DataError(f"{job.metadata.name}: {exc}", path=loaded.path) from None
    assert where is not None  # called with a source
    return where


def _upstream_tokenizer(loaded: Loaded, upstream: str) -> TokenizerRef | None:
    """A pipeline stage run on its own (a RayJob's job.yaml with stage.json beside it): the
    stage it starts from saved its tokenizer in its final/ (prolong.train.loop), so that is the
    tokenizer, wherever the upstream got it. None without a stage.json naming ``upstream``."""
    path = stage_file_beside(loaded.path)
    if not path.is_file():
        return None
    try:
        info = read_stage_file(path, loaded.document)
    except StageFileError as exc:
        raise DataError(str(exc), path=str(path)) from None
    up = info.upstream.get(upstream)
    if up is None:
        return None
    return TokenizerRef(f"stage:{up.id}", f"{up.directory.rstrip('/')}/final")


def _source_identity(source: str) -> str:
    p = Path(source)
    return str(p.resolve()) if p.exists() else source


def _training_streams(job: Job) -> list[DataStream]:
    return [s for s in job.spec.data.streams if s.format != "mds"]


def resolve_stream(stream: DataStream, job: Job) -> DataStream:
    """An embedded stream as the jsonl file its corpus is built into (building it if needed)."""
    if stream.format != "embedded":
        return stream
    path = corpus_mod.corpus_file(stream.path, prepared_dir(job) / "corpora")
    return stream.model_copy(update={"format": "jsonl", "path": str(path)})


def _fingerprint(stream: DataStream) -> list[Any]:
    """What the stream's documents depend on: every input file's path, size and mtime."""
    files = sources.resolve_files(stream)
    return [[str(f.resolve()), st.st_size, st.st_mtime_ns] for f in files
            for st in (f.stat(),)]


@dataclass(frozen=True)
class StreamPlan:
    """Where one stream of one stage is prepared, and from what."""

    domain: str
    stream: DataStream  # as written in the spec
    conversation: bool
    chat_template: str | None
    masked: bool
    min_length: int
    target_length: int | None
    tokenized_dir: Path
    shard_dir: Path


def _conversation_options(job: Job) -> tuple[str, bool]:
    if isinstance(job, SFTJob):
        return job.spec.sft.chat_template, job.spec.sft.assistant_only_loss
    return "auto", True


def plan_streams(job: Job, ref: TokenizerRef, template_of: Any = None) -> list[StreamPlan]:
    """The directories of each stream of ``job`` (pure: reads no data). ``template_of(choice)``
    returns the chat template text for conversation streams (it needs the tokenizer)."""
    root = prepared_dir(job)
    out = []
    choice, assistant_only = _conversation_options(job)
    for s in job.spec.data.streams:
        conv = s.packing == "conversation"
        template = template_of(choice) if conv and template_of else None
        source = {"format": s.format, "path": s.path if s.format == "embedded"
                  else str(Path(s.path).absolute()),
                  "field": s.messages_field if conv else s.text_field}
        ident = {"source": source, "tokenizer": ref.identity, "conversation": conv,
                 "template": _hash(template) if conv else None, "masked": conv and assistant_only,
                 "format": PREPARE_FORMAT}
        min_len = job.spec.stream_min_length(s)
        target = job.spec.stream_target_length(s) if s.packing == "long" else None
        rules = {"packing": "long" if s.packing == "long" else "whole", "min": min_len,
                 "target": target}
        if s.max_length is not None:  # only when set: shards built before the field keep their hash
            rules["max"] = s.max_length
        slug = _slug(s.path)
        out.append(StreamPlan(s.domain, s, conv, template, conv and assistant_only, min_len,
                              target, root / "tokenized" / f"{slug}-{_hash(ident)}",
                              root / "shards" / f"{slug}-{_hash([ident, rules])}"))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

@dataclass
class StreamReport:
    stage: str
    domain: str
    shard_dir: Path
    documents: int
    tokens: int
    dropped: int
    built: bool  # False: an up-to-date directory was reused


@dataclass
class PrepareReport:
    """What ``prepare_file`` did. ``work_done`` is False when everything was already prepared."""

    path: str
    streams: list[StreamReport] = field(default_factory=list)
    tokenizers_trained: list[str] = field(default_factory=list)
    tokenized_built: list[str] = field(default_factory=list)
    corpora: list[str] = field(default_factory=list)
    manifests: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def shards_built(self) -> int:
        return len({r.shard_dir for r in self.streams if r.built})

    @property
    def work_done(self) -> bool:
        return bool(self.tokenizers_trained or self.tokenized_built or self.shards_built)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=f"prepared {self.path}", title_justify="left")
        for col in ("stage", "domain", "documents", "tokens", "dropped", "shards", ""):
            table.add_column(col, justify="right" if col in ("documents", "tokens", "dropped")
                             else "left")
        for r in self.streams:
            table.add_row(r.stage, r.domain, f"{r.documents:,}", f"{r.tokens:,}",
                          f"{r.dropped:,}", r.shard_dir.name, "built" if r.built else "reused")
        if self.work_done:
            done = (f"trained {len(self.tokenizers_trained)} tokenizer(s), tokenized "
                    f"{len(self.tokenized_built)} source(s), built {self.shards_built} shard "
                    "dir(s)")
        elif self.streams:
            done = "everything was up to date: nothing to do"
        else:
            done = "no training stage (PretrainJob, SFTJob) in the file: nothing to prepare"
        if not self.streams:
            from rich.text import Text

            return Text(f"{self.path}: {done}")
        table.caption = f"{done} in {self.seconds:.1f}s"
        table.caption_justify = "left"
        return table


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

class _Encoder:
    """Encodes batches in-process (workers <= 1, or a single batch) or in a pool of spawned
    processes. Spawn, not fork: the parent may hold threads (rich's refresher, the tokenizers
    thread pool). concurrent.futures rather than multiprocessing.Pool: a worker that dies (at
    start-up or killed for memory) fails the run with BrokenProcessPool instead of hanging it,
    and batches are read in the calling thread, at most 2 per worker ahead of the writer."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: Any = None
        self._pool_key: str | None = None

    def map(self, fn: Any, config: dict[str, Any], batches: Iterator[list[Any]]) -> Iterator[Any]:
        batches = iter(batches)
        head = [b for b in (next(batches, None), next(batches, None)) if b is not None]
        if self.workers <= 1 or len(head) < 2:  # one batch is not worth starting processes
            tokmod.init_encoder(config)
            yield from map(fn, itertools.chain(head, batches))
            return
        pool = self._pool_for(config)
        window: collections.deque[Any] = collections.deque()
        for batch in itertools.chain(head, batches):
            window.append(pool.submit(fn, batch))
            if len(window) >= 2 * self.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def _pool_for(self, config: dict[str, Any]) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        key = _hash(config, 16)
        if self._pool is None or self._pool_key != key:
            self.close()
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"),
                                             initializer=tokmod.init_encoder, initargs=(config,))
            self._pool_key = key
        return self._pool

    def close(self, *, terminate: bool = False) -> None:
        if self._pool is not None:
            # After an error, drop queued batches nobody will read.
            self._pool.shutdown(wait=True, cancel_futures=terminate)
            self._pool = None


def _batches(docs: Iterator[sources.Document], conv: bool) -> Iterator[list[Any]]:
    batch: list[Any] = []
    chars = 0
    for d in docs:
        item = d.messages if conv else d.text
        batch.append(item)
        chars += sum(len(m["content"]) for m in item) if conv else len(item)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None


class _Preparer:
    def __init__(self, loaded: Loaded, workers: int, progress: Any):
        self.loaded = loaded
        self.encoder = _Encoder(workers)
        self.progress = progress
        self.report = PrepareReport(loaded.path)
        self._tokenizers: dict[str, tuple[Any, str]] = {}

    # -- tokenizer ------------------------------------------------------------------------
    def tokenizer(self, ref: TokenizerRef) -> tuple[Any, str]:
        if ref.identity in self._tokenizers:
            return self._tokenizers[ref.identity]
        loc = Path(ref.location)
        if ref.train is not None and not (loc / "tokenizer.json").is_file():
            job, vocab = ref.train
            task = self._task(f"training BPE tokenizer ({vocab})", None)
            tokmod.train_bpe(self._training_texts(job), vocab, loc)
            self._done(task)
            self.report.tokenizers_trained.append(str(loc))
        tok = tokmod.load_tokenizer(load_dir(ref.location))
        value = (tok, tokmod.tokenizer_hash(tok))
        self._tokenizers[ref.identity] = value
        return value

    def _training_texts(self, job: Job) -> Iterator[str]:
        """Round-robin over the job's streams, each up to an equal share of the sample."""
        streams = [resolve_stream(s, job) for s in _training_streams(job)]
        if not streams:
            raise DataError("trainVocabSize needs text streams to train on (mds streams are "
                            "already tokenized)", path=self.loaded.path)
        share = tokmod.DEFAULT_TRAIN_CHARS // len(streams)
        iters = [self._texts(s, share) for s in streams]
        while iters:
            for it in list(iters):
                text = next(it, None)
                if text is None:
                    iters.remove(it)
                else:
                    yield text

    @staticmethod
    def _texts(stream: DataStream, budget: int) -> Iterator[str]:
        used = 0
        for doc in sources.iter_documents(stream):
            text = doc.text if doc.text is not None else \
                "\n".join(m["content"] for m in (doc.messages or []))
            yield text[: budget - used]
            used += len(text)
            if used >= budget:
                return

    # -- streams --------------------------------------------------------------------------
    def stage(self, name: str, job: Job) -> Path:
        ref = tokenizer_ref(job, self.loaded)
        tok, tok_hash = self.tokenizer(ref)
        plans = plan_streams(job, ref, lambda choice: tokmod.chat_template_for(tok, choice))
        entries = {}
        for plan in plans:
            resolved = resolve_stream(plan.stream, job)
            if plan.stream.format == "embedded" and plan.stream.path not in self.report.corpora:
                self.report.corpora.append(plan.stream.path)
            inputs = {"source": _fingerprint(resolved), "tokenizer": tok_hash,
                      "template": plan.chat_template, "format": PREPARE_FORMAT}
            tokenized = self._tokenize(plan, resolved, tok, inputs)
            result = self._apply_rules(plan, tokenized)
            meta = _read_meta(plan.shard_dir) or {}
            self.report.streams.append(StreamReport(
                name, plan.domain, plan.shard_dir, meta["num_docs"], meta["num_tokens"],
                meta["stats"]["dropped"], result))
            entries[plan.domain] = {"shard_dir": str(plan.shard_dir),
                                    "tokenized_dir": str(plan.tokenized_dir),
                                    "rules": meta["rules"], "stats": meta["stats"],
                                    "inputs_hash": meta["inputs_hash"]}
        manifest = {"job": job.metadata.name, "stage": name, "spec_file": self.loaded.path,
                    "tokenizer": {"identity": ref.identity, "location": ref.location,
                                  "hash": tok_hash, "vocab_size": tokmod.vocab_size(tok)},
                    "streams": entries}
        path = prepared_dir(job) / "manifests" / f"{job.metadata.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self.report.manifests.append(path)
        return path

    def _tokenize(self, plan: StreamPlan, stream: DataStream, tok: Any,
                  inputs: dict[str, Any]) -> dict[str, Any]:
        inputs_hash = _hash(inputs, 16)
        meta = _read_meta(plan.tokenized_dir)
        if meta and meta.get("inputs_hash") == inputs_hash:
            return meta
        vocab = tokmod.vocab_size(tok)
        writer = ShardWriter(plan.tokenized_dir, dtype=token_dtype(vocab), with_mask=plan.masked)
        task = self._task(f"tokenizing {plan.domain}", None)
        count = empty = 0
        try:
            for ids, mask in self._encoded(plan, stream, tok, vocab):
                if len(ids) == 0:
                    empty += 1
                    continue
                writer.add(ids, mask if plan.masked else None)
                count += 1
                if self.progress is not None and count % 64 == 0:
                    self.progress.update(task, completed=count)
        except BaseException:
            writer.abort()
            raise
        meta = {"inputs": inputs, "inputs_hash": inputs_hash, "empty_documents": empty,
                "vocab_size": vocab}
        writer.close(meta)
        self._done(task, count)
        self.report.tokenized_built.append(str(plan.tokenized_dir))
        return _read_meta(plan.tokenized_dir) or {}

    def _encoded(self, plan: StreamPlan, stream: DataStream, tok: Any,
                 vocab: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        docs = sources.iter_documents(stream)
        if stream.format == "mds":
            for doc in docs:
                ids = doc.tokens
                if ids is not None and len(ids) and int(ids.max()) >= vocab:
                    raise DataError(f"token id {int(ids.max())} in document {doc.id} is outside "
                                    f"the tokenizer's vocabulary ({vocab}): the shards were made "
                                    "with another tokenizer", domain=plan.domain, path=stream.path)
                yield ids, None
            return
        config = tokmod.encoder_config(tok, plan.chat_template)
        if plan.conversation:
            fn = tokmod.encode_conversations
            try:
                for batch in self.encoder.map(fn, config, _batches(docs, True)):
                    yield from batch
            except ValueError as exc:  # a template that cannot be split into turns
                raise DataError(str(exc), domain=plan.domain, path=stream.path) from None
            return
        for batch in self.encoder.map(tokmod.encode_texts, config, _batches(docs, False)):
            for ids in batch:
                yield ids, None

    def _apply_rules(self, plan: StreamPlan, tokenized: dict[str, Any]) -> bool:
        rules = {"packing": plan.stream.packing, "minLength": plan.min_length,
                 "targetLength": plan.target_length}
        if plan.stream.max_length is not None:
            rules["maxLength"] = plan.stream.max_length
        inputs_hash = _hash([tokenized["inputs_hash"], rules], 16)
        meta = _read_meta(plan.shard_dir)
        if meta and meta.get("inputs_hash") == inputs_hash:
            return False
        src = TokenShards(plan.tokenized_dir)
        lengths = src.lengths
        writer = ShardWriter(plan.shard_dir, dtype=src.tokens.dtype, with_mask=plan.masked)
        kept_docs, labels, out_lengths = 0, 0, []
        try:
            for i, n in enumerate(lengths.tolist()):
                pieces = length_pieces(n, packing=plan.stream.packing, min_length=plan.min_length,
                                       target_length=plan.target_length,
                                       max_length=plan.stream.max_length)
                if pieces:
                    kept_docs += 1
                doc, mask = src.doc(i), src.mask(i)
                for a, b in pieces:
                    writer.add(doc[a:b], None if mask is None else mask[a:b])
                    out_lengths.append(b - a)
                    labels += int(mask[a:b].sum()) if mask is not None else 0
        except BaseException:
            writer.abort()
            raise
        if not out_lengths:
            writer.abort()
            longest = int(lengths.max()) if len(lengths) else 0
            shortest = int(lengths.min()) if len(lengths) else 0
            cap = plan.stream.max_length
            if cap is not None and shortest > cap:
                raise DataError(f"all {len(lengths)} documents are longer than maxLength {cap} "
                                f"tokens (shortest: {shortest}); raise maxLength",
                                domain=plan.domain, path=plan.stream.path)
            if cap is not None and longest >= plan.min_length:
                raise DataError(f"no document of the {len(lengths)} has between minLength "
                                f"{plan.min_length} and maxLength {cap} tokens; widen the range",
                                domain=plan.domain, path=plan.stream.path)
            raise DataError(f"all {len(lengths)} documents are shorter than minLength "
                            f"{plan.min_length} tokens (longest: {longest}); lower minLength or "
                            "targetLength, or add longer documents", domain=plan.domain,
                            path=plan.stream.path)
        out = np.asarray(out_lengths, dtype=np.int64)
        stats = {"documents": len(out), "tokens": int(out.sum()),
                 "source_documents": len(lengths), "kept_source_documents": kept_docs,
                 "dropped": len(lengths) - kept_docs,
                 "length_histogram": length_histogram(out), "mean_length": float(out.mean())}
        if plan.masked:
            stats["label_tokens"] = labels
        writer.close({"inputs_hash": inputs_hash, "rules": rules,
                      "tokenized_inputs_hash": tokenized["inputs_hash"],
                      "tokenizer_hash": tokenized["inputs"]["tokenizer"],
                      "source": tokenized["inputs"]["source"], "stats": stats})
        (plan.shard_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        return True

    # -- progress -------------------------------------------------------------------------
    def _task(self, description: str, total: int | None) -> Any:
        return self.progress.add_task(description, total=total) if self.progress else None

    def _done(self, task: Any, count: int | None = None) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, total=count or 1, completed=count or 1)


def training_stages(loaded: Loaded) -> dict[str, Job]:
    """The stages that need shards (PretrainJob, SFTJob), in file order."""
    return {name: job for name, job in loaded.jobs.items() if not isinstance(job, EvalJob)}


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


PREPARE_WAIT_SECONDS = 1.0


def prepare_file(path: str, *, workers: int | None = None, progress: bool = True) -> PrepareReport:
    """Prepare every training stage of a job or pipeline file. Idempotent: a second run with the
    same inputs does no work (see the module docstring for what counts as the same).

    One preparation per prepared directory at a time: two runs would share staging names
    (``<dir>.partial``) and one could rename the other's half-written directory into place. The
    second run waits for the first's lock (:class:`~prolong.stage.lock.StageLock`, the same
    create-exclusive file with heartbeat and stale takeover), then finds its work done."""
    loaded = load(path)
    stages = training_stages(loaded)  # an EvalJob-only file has nothing to prepare
    roots = sorted({str(prepared_dir(job).absolute()) for job in stages.values()})
    with contextlib.ExitStack() as held:
        for root in roots:  # sorted: two runs over overlapping roots cannot deadlock
            held.enter_context(_wait_for_lock(root, progress))
        return _prepare_loaded(loaded, stages, workers, progress)


@contextlib.contextmanager
def _wait_for_lock(root: str, progress: bool) -> Iterator[None]:
    lock = StageLock(root)
    told = False
    while True:
        try:
            lock.acquire()
            break
        except StageLocked as exc:
            if progress and not told:
                print(f"waiting: another data preparation holds {root} ({exc})", file=sys.stderr)
                told = True
            time.sleep(PREPARE_WAIT_SECONDS)
    try:
        yield
    finally:
        lock.release()


def _prepare_loaded(loaded: Loaded, stages: dict[str, Job], workers: int | None,
                    progress: bool) -> PrepareReport:
    start = time.monotonic()
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                       MofNCompleteColumn(), TimeElapsedColumn())
    prep = _Preparer(loaded, workers if workers is not None else default_workers(), bar)
    try:
        if bar is not None:
            bar.start()
        for name, job in stages.items():
            prep.stage(name, job)
    except BaseException:
        prep.encoder.close(terminate=True)
        raise
    finally:
        prep.encoder.close()
        if bar is not None:
            bar.stop()
    prep.report.seconds = time.monotonic() - start
    return prep.report


# ---------------------------------------------------------------------------------------------
# For the loader and trainer
# ---------------------------------------------------------------------------------------------

def shard_dirs(job: Job, loaded: Loaded, *, verify: bool = True) -> dict[str, Path]:
    """Each stream's (domain's) shard directory. With ``verify`` (the default), check that it is
    prepared, from the current inputs and with the current tokenizer; DataError otherwise."""
    if isinstance(job, EvalJob):
        raise DataError(f"{job.metadata.name} is an EvalJob: it has no training data")
    ref = tokenizer_ref(job, loaded)
    tok = None
    if verify or any(s.packing == "conversation" for s in job.spec.data.streams):
        if not Path(ref.location).exists() and ref.train is not None:
            raise DataError("the stage's tokenizer has not been trained yet; run `prolongctl "
                            f"data prepare {loaded.path}`", path=ref.location)
        tok = tokmod.load_tokenizer(load_dir(ref.location))
    plans = plan_streams(job, ref, (lambda c: tokmod.chat_template_for(tok, c)) if tok else None)
    out = {}
    for plan in plans:
        if verify:
            _verify(plan, job, loaded, tokmod.tokenizer_hash(tok))
        out[plan.domain] = plan.shard_dir
    return out


def _verify(plan: StreamPlan, job: Job, loaded: Loaded, tok_hash: str) -> None:
    meta = _read_meta(plan.shard_dir)
    hint = f"run `prolongctl data prepare {loaded.path}`"
    if meta is None:
        raise DataError(f"not prepared ({plan.shard_dir} is missing); {hint}",
                        domain=plan.domain, path=plan.stream.path)
    if meta.get("tokenizer_hash") != tok_hash:
        raise DataError(f"shards in {plan.shard_dir} were prepared with another tokenizer (hash "
                        f"{meta.get('tokenizer_hash')}, current {tok_hash}); {hint}",
                        domain=plan.domain, path=plan.stream.path)
    current = _fingerprint(resolve_stream(plan.stream, job))
    if meta.get("source") != current:
        raise DataError(f"input files changed since {plan.shard_dir} was prepared; {hint}",
                        domain=plan.domain, path=plan.stream.path)


def open_shards(job: Job, loaded: Loaded) -> dict[str, TokenShards]:
    """Verified, memory-mapped shards per domain (what MixtureLoader.from_spec takes)."""
    return {domain: TokenShards(d) for domain, d in shard_dirs(job, loaded).items()}


def stage_tokenizer(job: Job, loaded: Loaded) -> Any:
    """The transformers tokenizer a training stage uses (to save beside its final weights)."""
    ref = tokenizer_ref(job, loaded)
    if ref.train is not None and not Path(ref.location).exists():
        raise DataError(f"tokenizer not trained yet; run `prolongctl data prepare {loaded.path}`",
                        path=ref.location)
    return tokmod.load_tokenizer(load_dir(ref.location))
