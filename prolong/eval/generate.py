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

``stop_new_line`` tasks (RAG, re-rank, ICL) have their output cut at the first newline after
decoding, as HELMET's stop-on-newline does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any, Protocol

from prolong.eval.samples import Sample


class Answerer(Protocol):
    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[str]: ...


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


def stop_at_newline(text: str) -> str:
    """HELMET's stop_new_line: the output up to its first newline (leading newlines skipped)."""
    stripped = text.lstrip("\n")
    return stripped.split("\n", 1)[0]


class ReferenceAnswerer:
    """Answers every sample with its gold reference (scores 100 on every task)."""

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
        return [" " + s.reference for s in samples]


class ConstantAnswerer:
    """Answers every sample with the same text (scores 0 on every task)."""

    def __init__(self, text: str = "qqqq"):
        self.text = text

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
        return [self.text for _ in samples]


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

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
        import torch

        order = sorted(range(len(samples)), key=lambda i: -samples[i].tokens)
        outputs: list[str] = [""] * len(samples)
        eos = self.tok.eos_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self._encode([samples[i] for i in idx])
            with torch.inference_mode():
                out = self.model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=self.tok.pad_token_id, eos_token_id=eos,
                    temperature=None, top_p=None, top_k=None)
            new = out[:, batch["input_ids"].shape[1]:]
            for i, row in zip(idx, new, strict=True):
                outputs[i] = self.tok.decode(row, skip_special_tokens=True)
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


class VLLMGenerator:  # pragma: no cover - needs vllm and a GPU; untested in this environment
    """vLLM offline inference, greedy, on one GPU."""

    def __init__(self, model_path: str, *, tokenizer_path: str | None = None,
                 max_model_len: int | None = None):
        from vllm import LLM

        self.llm = LLM(model=model_path, tokenizer=tokenizer_path or model_path,
                       max_model_len=max_model_len, tensor_parallel_size=1,
                       enable_prefix_caching=False)
        self.tok = self.llm.get_tokenizer()

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        prompts = [{"prompt_token_ids": self.tok.backend_tokenizer.encode(
            s.prompt, add_special_tokens=s.add_special_tokens).ids} for s in samples]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [r.outputs[0].text for r in results]


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
