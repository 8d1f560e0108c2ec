"""ZeRO-3 loading without a full model per rank: two gloo ranks on CPU load a saved model through
the trainer's own path, and each rank's peak memory while loading stays a fraction of the model.

The measure (see ``zero3_worker.py``): the rise of each process's resident-set high-water mark
during loading, with glibc's mmap threshold fixed so that freed tensors leave the resident set. A
ZeRO-3 rank holds its half of the parameters plus one gathered parameter (and, on rank 0, the one
tensor it read), about 0.5 + 2 x 5% of the model here; the bound is 0.75. The same measure of the
ZeRO 0-2 path (``from_pretrained``, a full copy) in the same processes must reach the whole
model, so the measure can see a full model when there is one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prolong.model.build import build_model
from prolong.spec import ArchitectureSpec, ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
import sp_harness as H  # the parity tests' launcher, shared

WORKER = Path(__file__).resolve().parent / "zero3_worker.py"
# About 21M parameters (84 MB in fp32) in 75 tensors; the largest (embedding, LM head) are 5%
# each, so one gathered parameter is small next to a rank's half.
ARCH = dict(num_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=1024, vocab_size=2048, tie_word_embeddings=False)
MICRO = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, vocab_size=97, tie_word_embeddings=False)
"""Loaded first through both paths (see zero3_worker.py)."""
BOUND = 0.75
"""Each ZeRO-3 rank's loading peak, as a fraction of the full fp32 model."""
SAVE_BOUND = 0.25
"""Each rank's peak while writing the model back (one parameter gathered at a time, plus rank
0's host copy of it: 2 x 5% at most), as a fraction of the model."""
CONTROL = 0.9
"""The full (ZeRO 0-2) load's peak must reach at least this fraction of the model."""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    model = build_model(ModelSpec(architecture=ArchitectureSpec(**ARCH)), seed=5)
    model.save_pretrained(root / "model")
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    build_model(ModelSpec(architecture=ArchitectureSpec(**MICRO)), seed=6).save_pretrained(
        root / "micro")
    (root / "no-weights").mkdir()
    shutil.copy(root / "micro" / "config.json", root / "no-weights")
    camel = ArchitectureSpec(**ARCH).model_dump(by_alias=True, exclude={"preset"})
    micro = ArchitectureSpec(**MICRO).model_dump(by_alias=True, exclude={"preset"})
    mp = pytest.MonkeyPatch()
    mp.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # see zero3_worker.py: freed tensors leave RSS
    try:
        H.launch(2, ["--model", str(root / "model"), "--arch", json.dumps(camel),
                     "--no-weights", str(root / "no-weights"), "--warmup-model", str(root / "micro"), "--warmup", json.dumps(micro),
                     "--save-to", str(root / "final"),
                     "--out", str(root / "out.json")], timeout=300, log_dir=root, worker=WORKER)
    finally:
        mp.undo()
    out = json.loads((root / "out.json").read_text())
    return {"out": out, "full_bytes": full_bytes, "root": root,
            "saved": load_file(root / "model" / "model.safetensors")}


def test_each_rank_loads_a_fraction_of_the_model(loaded):
    full = loaded["full_bytes"]
    assert 60e6 < full < 120e6  # a few tens of MB, as the test means
    for r in loaded["out"]["ranks"]:
        share, control = r["zero3_peak"] / full, r["full_peak"] / full
        print(f"rank {r['rank']}: ZeRO-3 loading peak {r['zero3_peak'] / 2**20:.1f} MiB = "
              f"{share:.2f} x the {full / 2**20:.1f} MiB model; holds "
              f"{r['partition_bytes'] / 2**20:.1f} MiB after; full load {control:.2f} x")
        assert share < BOUND, r
        assert control > CONTROL, r  # the measure sees a whole model when one is loaded
        # Each rank keeps half of the parameters (ZeRO pads each one to a multiple of 2).
        assert abs(r["partition_bytes"] - full / 2) < 0.01 * full


def test_gathered_weights_equal_the_saved_ones(loaded):
    out, saved = loaded["out"], loaded["saved"]
    assert sorted(out["names"]) == sorted(saved)
    assert out["worst_abs_diff"] == 0.0
    assert any(t.abs().max() > 0 for t in saved.values())  # real weights, not zeros
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_a_checkpoint_without_safetensors_is_refused_on_every_rank(loaded):
    refusals = [r["refusal"] for r in loaded["out"]["ranks"]]
    assert refusals[0] == refusals[1]
    assert refusals[0].endswith("no-weights: no model.safetensors or model.safetensors.index.json "
                                "(ZeRO-3 loads safetensors checkpoints tensor by tensor; re-save "
                                "it with save_pretrained)")


def test_writing_it_back_holds_one_parameter_at_a_time(loaded):
    """What _finalize writes final/ with (prolong.model.save): the peak on every rank is a
    fraction of the model, and the file is the saved model, tensor for tensor."""
    full = loaded["full_bytes"]
    for r in loaded["out"]["ranks"]:
        share = r["save_peak"] / full
        print(f"rank {r['rank']}: writing peak {r['save_peak'] / 2**20:.1f} MiB = {share:.2f} x "
              f"the model; all gathered at once {r['gather_all_peak'] / full:.2f} x")
        assert share < SAVE_BOUND, r
        # The measure sees a whole model when every parameter is gathered at once.
        assert r["gather_all_peak"] / full > CONTROL, r
    final = loaded["root"] / "final"
    written, saved = load_file(final / "model.safetensors"), loaded["saved"]
    assert sorted(written) == sorted(saved)
    assert all(torch.equal(written[k], saved[k]) for k in saved)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[name]), name
