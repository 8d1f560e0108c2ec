"""Stopping during generation, through HFGenerator with a scripted model: a tiny Llama whose greedy
next token is a fixed function of the current token, so each test decides exactly what the model
"says". vLLM shares the stop rules (prolong.eval.stopping) but is not installed here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prolong.eval.generate import HFGenerator, fitted_max_model_len
from prolong.eval.samples import Sample
from prolong.eval.stopping import stop_token_ids

PROMPT = "the keeper found the stone"


def scripted_model(out: Path, tokenizer, table: dict[int, int], default: int) -> Path:
    """Layers that add nothing, one-hot embeddings and an lm_head that maps token t to
    ``table[t]`` (else ``default``): greedy decoding follows the table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab + 8, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                         head_dim=vocab + 8, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        for t in range(vocab):
            model.model.embed_tokens.weight[t, t] = 1.0
            model.lm_head.weight[table.get(t, default), t] = 1.0
            if table.get(t, default) != default:
                model.lm_head.weight[default, t] = 0.5
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _sample() -> Sample:
    return Sample("nq", 4096, 0, PROMPT, ["stone"], 0)


def test_a_leading_newline_is_an_empty_answer(tmp_path, tokenizer):
    """The model answers "\\n river river ...": HELMET stops at the newline, so the answer is
    empty (the old cut-after-decoding skipped the newline and answered "river ...")."""
    last = _ids(tokenizer, PROMPT)[-1]
    newline = _ids(tokenizer, "\n")[0]
    word = _ids(tokenizer, " river")[0]
    model = scripted_model(tmp_path / "m", tokenizer, {last: newline, newline: word}, word)
    gen = HFGenerator(str(model), device="cpu")
    assert gen.generate([_sample()], 8, stop_new_line=True) == [""]
    assert gen.generate([_sample()], 3, stop_new_line=False)[0].startswith("\n river")


def test_an_end_of_turn_token_stops_a_chat_model(tmp_path, tokenizer):
    """"river <|im_end|> river ...": the chat template's end-of-turn token ends the answer even
    though the generation config lists only <|end_of_text|> (the old eos-only stop ran on)."""
    last = _ids(tokenizer, PROMPT)[-1]
    word = _ids(tokenizer, " river")[0]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = scripted_model(tmp_path / "m", tokenizer, {last: word, word: im_end}, word)
    assert json.loads((model / "generation_config.json").read_text())["eos_token_id"] == \
        tokenizer.eos_token_id
    gen = HFGenerator(str(model), device="cpu")
    assert im_end in gen.stop_ids and tokenizer.eos_token_id in gen.stop_ids
    assert gen.generate([_sample()], 8) == [tokenizer.decode([word])]


def test_stop_ids_take_the_generation_configs_list(tmp_path, tokenizer):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    ids = stop_token_ids(tokenizer, str(tmp_path))
    assert ids[:2] == [7, 9] and tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("wanted", "limit", "fitted"), [(131072, 131072, 131072),
                                                          (262144, 131072, 131072),
                                                          (65536, 131072, 65536)])
def test_vllm_max_model_len_never_exceeds_the_model(tmp_path, wanted, limit, fitted):
    """The old value was the length plus the output budget (132,272 at 128K), which a model
    capped at 131,072 refuses; prompts now leave the output budget free within the length."""
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": limit}))
    assert fitted_max_model_len(wanted, str(tmp_path)) == fitted
