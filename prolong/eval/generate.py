"""Greedy generation for the harness: transformers ``generate`` (CPU or GPU), or vLLM on a GPU.

An answerer is anything with ``generate(samples, max_new_tokens) -> outputs``; the harness also
takes two test answerers (:class:`ReferenceAnswerer` reads the gold answer from the sample,
:class:`ConstantAnswerer` always says the same thing) that pin the scoring to 100 and 0.

**transformers.** Prompts of one task and length are decoded together (``batch_size`` at a time,
longest first), left-padded so every row's last prompt token sits at the same position, greedy,
with the KV cache. Our trained models carry our own document-masked attention backends
(prolong.model.attention), which refuse KV caches; they are loaded here with the standard
``sdpa`` implementation instead: a single unpacked prompt needs no document mask, so the two
compute the same attention.

**vLLM** is used when importable on a GPU (backend ``auto``) or when asked for (``vllm``). It is
not installed in this CPU environment, so that path is **untested** here.

Both backends stop the same way (:mod:`prolong.eval.stopping`): on the generation config's eos
list plus the chat template's end-of-turn tokens, and, for ``stop_new_line`` tasks (RAG, re-rank,
ICL), on the first newline during generation (an output starting with one is an empty answer).
vLLM's ``max_model_len`` is the longest length evaluated, capped at the model's own limit: every
prompt already leaves its output budget free within the length (prolong.eval.sizing).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from prolong.eval.samples import Sample
from prolong.eval.stopping import NEWLINE, cut_at_newline, stop_token_ids


class Answerer(Protocol):
    def generate(self, samples: Sequence[Sample], max_new_tokens: int, *,
                 stop_new_line: bool = False) -> list[str]: ...


def choose_backend(requested: str, *, has_vllm: bool, has_cuda: bool) -> str:
    """auto -> vllm when importable on a GPU, else hf; vllm without a GPU is an error."""
    if requested == "hf":
        return "hf"
    if requested == "vllm":
        if not (has_vllm and has_cuda):
            raise RuntimeError("generation.backend vllm needs the vllm package and a CUDA GPU")
        return "vllm"
    return "vllm" if has_vllm and has_cuda else "hf"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class ReferenceAnswerer:
    """Answers every sample with its gold reference (scores 100 on every task)."""

    def generate(self, samples: Sequence[Sample], max_new_tokens: int, *,
                 stop_new_line: bool = False) -> list[str]:
        return [" " + s.reference for s in samples]


class ConstantAnswerer:
    """Answers every sample with the same text (scores 0 on every task)."""

    def __init__(self, text: str = "qqqq"):
        self.text = text

    def generate(self, samples: Sequence[Sample], max_new_tokens: int, *,
                 stop_new_line: bool = False) -> list[str]:
        text = cut_at_newline(self.text) if stop_new_line else self.text
        return [text for _ in samples]


class HFGenerator:
    """transformers ``generate``: greedy, batched with left padding, KV cache on."""

    def __init__(self, model_path: str, *, tokenizer_path: str | None = None,
                 device: str | None = None, dtype: Any = None, batch_size: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tok = AutoTokenizer.from_pretrained(tokenizer_path or model_path, local_files_only=True)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        ).to(self.device).eval()
        self.model.config.use_cache = True
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(self.tok, model_path)

    def generate(self, samples: Sequence[Sample], max_new_tokens: int, *,
                 stop_new_line: bool = False) -> list[str]:
        import torch

        order = sorted(range(len(samples)), key=lambda i: -samples[i].tokens)
        outputs: list[str] = [""] * len(samples)
        stops = {"stop_strings": [NEWLINE], "tokenizer": self.tok} if stop_new_line else {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self._encode([samples[i] for i in idx])
            with torch.inference_mode():
                out = self.model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=self.tok.pad_token_id, eos_token_id=self.stop_ids,
                    temperature=None, top_p=None, top_k=None, **stops)
            new = out[:, batch["input_ids"].shape[1]:]
            for i, row in zip(idx, new, strict=True):
                text = self.tok.decode(row, skip_special_tokens=True)
                outputs[i] = cut_at_newline(text) if stop_new_line else text
        return outputs

    def _encode(self, samples: Sequence[Sample]) -> dict[str, Any]:
        import torch

        ids = [self.tok.backend_tokenizer.encode(s.prompt, add_special_tokens=s.add_special_tokens)
               .ids for s in samples]
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[r, width - len(x):] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}


def model_limit(model_path: str) -> int | None:
    """The model's own context limit (config.json's max_position_embeddings), if it says."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        limit = json.load(f).get("max_position_embeddings")
    return int(limit) if limit else None


def fitted_max_model_len(wanted: int | None, model_path: str) -> int | None:
    """vLLM's max_model_len: what the eval needs, never above the model's limit (vLLM refuses a
    max_model_len past max_position_embeddings)."""
    limit = model_limit(model_path)
    if wanted is None or limit is None:
        return wanted or limit
    return min(wanted, limit)


class VLLMGenerator:  # pragma: no cover - needs vllm and a GPU; untested in this environment
    """vLLM offline inference, greedy, on one GPU; stops as :class:`HFGenerator` does."""

    def __init__(self, model_path: str, *, tokenizer_path: str | None = None,
                 max_model_len: int | None = None):
        from vllm import LLM

        self.llm = LLM(model=model_path, tokenizer=tokenizer_path or model_path,
                       max_model_len=fitted_max_model_len(max_model_len, model_path),
                       tensor_parallel_size=1, enable_prefix_caching=False)
        self.tok = self.llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tok, model_path)

    def generate(self, samples: Sequence[Sample], max_new_tokens: int, *,
                 stop_new_line: bool = False) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                stop=[NEWLINE] if stop_new_line else None,
                                stop_token_ids=self.stop_ids, skip_special_tokens=True)
        prompts = [{"prompt_token_ids": self.tok.backend_tokenizer.encode(
            s.prompt, add_special_tokens=s.add_special_tokens).ids} for s in samples]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        texts = [r.outputs[0].text for r in results]
        return [cut_at_newline(t) for t in texts] if stop_new_line else texts


def build_generator(backend: str, model_path: str, *, tokenizer_path: str | None = None,
                    batch_size: int = 1, device: str | None = None,
                    max_model_len: int | None = None) -> Answerer:
    import torch

    has_cuda = torch.cuda.is_available() and device != "cpu"
    chosen = choose_backend(backend, has_vllm=vllm_available(), has_cuda=has_cuda)
    if chosen == "vllm":
        return VLLMGenerator(model_path, tokenizer_path=tokenizer_path, max_model_len=max_model_len)
    return HFGenerator(model_path, tokenizer_path=tokenizer_path, batch_size=batch_size,
                       device=device or ("cuda" if has_cuda else "cpu"))
