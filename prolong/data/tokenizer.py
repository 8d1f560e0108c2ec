"""Tokenizers: load one (offline), or train a byte-level BPE on the job's own text; hash it.

Loading goes through ``transformers.AutoTokenizer`` with ``local_files_only=True``: preparing data
never downloads. A hub id must already be in the local HF cache (``hf download ID``) or be given as
a local path. Only fast (Rust-backed) tokenizers are accepted, because tokenization in worker
processes uses the ``tokenizers`` backend directly (it is what makes batched encoding fast).

A trained tokenizer (``trainVocabSize``) is a byte-level BPE (GPT-2 style pre-tokenisation, no
unknown tokens: every byte is in the alphabet) saved as a transformers tokenizer directory, with
these special tokens at ids 0-4:

    <|begin_of_text|> (bos)  <|end_of_text|> (eos)  <|pad|> (pad)  <|im_start|>  <|im_end|>

and the chatml chat template (:data:`CHATML_TEMPLATE`). Training reads a bounded sample of text
(``max_chars``): BPE merges converge long before a 20B-token corpus is read, and the sample keeps
the quickstart fast.

:func:`tokenizer_hash` is a content hash (vocabulary, merges, normaliser, special tokens, chat
template), so manifests detect a changed tokenizer even at an unchanged path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prolong.data.errors import DataError

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)

# chatml: "<|im_start|>{role}\n{content}<|im_end|>\n" per message. The conversation tokenizer in
# prolong.data.prepare labels an assistant turn's content and its closing <|im_end|> (see there).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3's chat format (used with chatTemplate: llama3 when the tokenizer has none of its own).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

DEFAULT_TRAIN_CHARS = 3_000_000
TOKENIZER_FORMAT = 1  # bump when train_bpe changes what it produces for the same input


def load_tokenizer(source: str | Path) -> Any:
    """A fast transformers tokenizer from a local path or the local HF cache (never downloads)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load tokenizer offline ({first}); give a local path or fetch "
                        f"it first with `hf download {source}`", path=str(source)) from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise DataError("needs a fast (tokenizers-backed) tokenizer", path=str(source))
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
              max_chars: int = DEFAULT_TRAIN_CHARS) -> Any:
    """Train a byte-level BPE of ``vocab_size`` entries (special tokens included) on ``texts``
    (at most ``max_chars`` characters are read) and save it as a transformers tokenizer directory.
    Written to a temporary name and renamed, so a crash never leaves a half-saved tokenizer."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"trainVocabSize {vocab_size} is below the 256 byte tokens plus "
                        f"{len(SPECIAL_TOKENS)} special tokens")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_bounded(texts, max_chars), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS,
                                  pad_token=PAD, extra_special_tokens=[IM_START, IM_END])
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 1 << 30  # length limits belong to the training spec, not here
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tok.save_pretrained(str(staging))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return tok


def _bounded(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    used = 0
    for text in texts:
        if used >= max_chars:
            return
        piece = text[: max_chars - used]
        used += len(piece)
        yield piece


def tokenizer_hash(tok: Any) -> str:
    """Content hash of what decides the token ids and the chat format (16 hex digits)."""
    h = hashlib.sha256()
    # The backend JSON holds vocab, merges, normaliser, pre-tokeniser and added tokens.
    backend = json.loads(tok.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    h.update(json.dumps(backend, sort_keys=True).encode())
    extra = {"special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
             "chat_template": tok.chat_template if isinstance(tok.chat_template, str)
             else json.dumps(tok.chat_template, sort_keys=True)}
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]


def vocab_size(tok: Any) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    return len(tok)


def chat_template_for(tok: Any, choice: str = "auto") -> str:
    """The chat template a conversation stream is rendered with: auto -> the tokenizer's own, else
    chatml (the documented fallback); llama3 / chatml force that format (the tokenizer's own
    template when it already is of that format, else ours)."""
    own = tok.chat_template if isinstance(tok.chat_template, str) else None
    if choice == "auto":
        return own or CHATML_TEMPLATE
    if choice == "llama3":  # a Llama-3 tokenizer's own template is the reference one
        return own if own and "<|start_header_id|>" in own else LLAMA3_TEMPLATE
    return own if own and IM_START in own else CHATML_TEMPLATE


# ---------------------------------------------------------------------------------------------
# Encoding (runs in worker processes: only `tokenizers`, `jinja2` and numpy, no transformers)
# ---------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def encoder_config(tok: Any, chat_template: str | None = None) -> dict[str, Any]:
    """What a worker needs to encode exactly like ``tok`` (picklable, no transformers object)."""
    return {"tokenizer_json": tok.backend_tokenizer.to_str(), "chat_template": chat_template,
            "bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}


def init_encoder(config: dict[str, Any]) -> None:
    """Set up this process's encoder (a Pool initializer, or called once in-process)."""
    from tokenizers import Tokenizer

    _STATE["tok"] = Tokenizer.from_str(config["tokenizer_json"])
    _STATE["config"] = config
    _STATE["template"] = _compile(config["chat_template"]) if config["chat_template"] else None


def _compile(template: str) -> Any:
    # The environment transformers renders chat templates in (sandboxed, trim/lstrip blocks).
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def encode_texts(texts: list[str]) -> list[Any]:
    """Token ids of each text, without BOS/EOS (ProLong's raw tokenized data has none)."""
    import numpy as np

    encs = _STATE["tok"].encode_batch_fast(texts, add_special_tokens=False) \
        if hasattr(_STATE["tok"], "encode_batch_fast") else \
        _STATE["tok"].encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint32) for e in encs]


def render(messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    cfg = _STATE["config"]
    return _STATE["template"].render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])


def conversation_segments(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_label) pieces that concatenate to the full render.

    An assistant turn's label span is what rendering that turn adds after the generation prompt
    (``<|im_start|>assistant\\n`` for chatml), minus trailing whitespace: for chatml exactly the
    content and its closing ``<|im_end|>``; the role header, the newline after ``<|im_end|>`` and
    every system/user token are not labelled. Needs a template where each prefix of the
    conversation renders to a prefix of the whole (true of chatml, Llama-3 and most others)."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        full = render(messages[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("chat template is not prefix-stable: rendering a conversation's "
                             "first turns does not give a prefix of the whole")
        body = full[len(prompt):]
        label = body.rstrip()
        out += [(prompt[len(done):], False), (label, True), (body[len(label):], False)]
        done = full
    whole = render(messages)
    if not whole.startswith(done):
        raise ValueError("chat template is not prefix-stable")
    out.append((whole[len(done):], False))
    return [(text, lab) for text, lab in out if text]


def encode_conversations(conversations: list[list[dict[str, str]]]) -> list[tuple[Any, Any]]:
    """(ids, mask) per conversation: each segment is encoded on its own, so a label span starts
    and ends exactly at a token boundary; mask is 1 on label segments' tokens."""
    import numpy as np

    segs = [conversation_segments(c) for c in conversations]
    flat = [text for s in segs for text, _ in s]
    encoded = encode_texts(flat) if flat else []
    out, k = [], 0
    for s in segs:
        parts = encoded[k: k + len(s)]
        k += len(s)
        ids = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
        mask = np.concatenate([np.full(len(p), lab, np.uint8) for p, (_, lab) in zip(parts, s, strict=True)]) \
            if parts else np.zeros(0, np.uint8)
        out.append((ids, mask))
    return out
