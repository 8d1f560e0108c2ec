"""Training, loading and hashing tokenizers; chat rendering and assistant-only label masks."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from prolong.data import tokenizer as tokmod
from prolong.data.errors import DataError

WORDS = ("the", "model", "reads", "long", "documents", "and", "learns", "to", "recall", "what",
         "it", "saw", "far", "back", "in", "its", "context", "while", "short", "text", "keeps",
         "general", "skills", "def", "return", "class", "import")


def corpus(n: int, seed: int) -> list[str]:
    """Known words and random letter strings: plenty of distinct pairs for 400 merges."""
    rng = random.Random(seed)
    def word() -> str:
        if rng.random() < 0.5:
            return rng.choice(WORDS)
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
    return [" ".join(word() for _ in range(rng.randint(5, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    tokmod.train_bpe(corpus(300, 1), 400, out)
    return out


def test_trained_tokenizer_is_loadable_with_special_tokens_and_chatml(trained):
    tok = tokmod.load_tokenizer(trained)
    assert len(tok) == 400
    assert [tok.convert_tokens_to_ids(t) for t in tokmod.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (tokmod.BOS, tokmod.EOS, tokmod.PAD)
    text = "héllo wörld ✓ \x00 tabs\tand unseen bytes 😀"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_hash_is_content_based(trained, tmp_path):
    a = tokmod.load_tokenizer(trained)
    assert tokmod.tokenizer_hash(a) == tokmod.tokenizer_hash(tokmod.load_tokenizer(trained))
    tokmod.train_bpe(corpus(300, 2), 400, tmp_path / "other")
    b = tokmod.load_tokenizer(tmp_path / "other")
    assert tokmod.tokenizer_hash(a) != tokmod.tokenizer_hash(b)
    b.chat_template = a.chat_template + " "
    assert tokmod.tokenizer_hash(b) != tokmod.tokenizer_hash(tokmod.load_tokenizer(tmp_path / "other"))


def test_loading_never_downloads(tmp_path):
    with pytest.raises(DataError, match="offline"):
        tokmod.load_tokenizer("prolong-test/definitely-not-cached")
    with pytest.raises(DataError):
        tokmod.load_tokenizer(tmp_path / "empty-dir")


def test_encode_texts_matches_the_transformers_tokenizer(trained):
    tok = tokmod.load_tokenizer(trained)
    tokmod.init_encoder(tokmod.encoder_config(tok))
    texts = corpus(20, 3)
    got = tokmod.encode_texts(texts)
    for text, ids in zip(texts, got, strict=True):
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]  # no BOS/EOS


def random_conversation(rng: random.Random) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "be brief"}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        for role in ("user", "assistant"):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
            msgs.append({"role": role, "content": text + rng.choice(["", "\n", " ✓"])})
    return msgs


def labelled_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_masks_decode_to_exactly_the_assistant_turns(trained, template):
    tok = tokmod.load_tokenizer(trained)
    chat = tokmod.chat_template_for(tok, template)
    tokmod.init_encoder(tokmod.encoder_config(tok, chat))
    rng = random.Random()
    convs = [random_conversation(rng) for _ in range(30)]
    end = tokmod.IM_END if template == "chatml" else "<|eot_id|>"
    for msgs, (ids, mask) in zip(convs, tokmod.encode_conversations(convs), strict=True):
        assert len(ids) == len(mask)
        # The whole row decodes to the rendered conversation.
        assert tok.decode(ids.tolist()) == tokmod.render(msgs)
        runs = [tok.decode(r) for r in labelled_runs(ids, mask)]
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        if template == "llama3":  # its template trims each message
            replies = [r.strip() for r in replies]
        # One labelled run per assistant turn: its content and end-of-turn marker, nothing else.
        assert runs == [r + end for r in replies]
