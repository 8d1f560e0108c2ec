"""When generation stops, the same on both backends (transformers ``generate`` and vLLM).

- **End of sequence and end of turn.** HELMET stops on the model's generation-config eos list,
  which for chat models holds the end-of-turn token (``<|eot_id|>`` for Llama-3-Instruct,
  ``<|im_end|>`` for chatml models). A model directory may lack that list, or list only the
  tokenizer's eos, so we add the end-of-turn tokens its chat template uses: otherwise a chat model
  runs on past its answer into a new turn.
- **Newline.** Tasks HELMET runs with ``stop_new_line`` (RAG, re-rank, ICL) stop at the first
  newline *during* generation: an output that starts with a newline is an empty answer. We stop on
  the string "\\n" (so tokens that merely contain a newline, such as ".\\n", stop too, as vLLM's
  stop strings do) and cut the decoded text before it (:func:`cut_at_newline`).
"""

from __future__ import annotations

import json
import os
from typing import Any

END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
"""End-of-turn tokens of common chat templates (Llama-3, chatml/Qwen, Phi-3, Gemma)."""

NEWLINE = "\n"


def generation_config_eos(model_dir: str | None) -> list[int]:
    """The eos ids of ``<model_dir>/generation_config.json`` (an int or a list), or []."""
    if not model_dir:
        return []
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [int(x) for x in (eos if isinstance(eos, list) else [eos])]


def stop_token_ids(tokenizer: Any, model_dir: str | None) -> list[int]:
    """Token ids that end generation: the generation config's eos list, the tokenizer's eos, and
    the end-of-turn tokens the tokenizer's chat template uses (in that order, no repeats)."""
    ids = generation_config_eos(model_dir)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in template and t in vocab]
    return list(dict.fromkeys(ids))


def cut_at_newline(text: str) -> str:
    """The output before its first newline: HELMET stops there, so a leading newline leaves an
    empty answer (it does not skip to the next line)."""
    return text.split(NEWLINE, 1)[0]
