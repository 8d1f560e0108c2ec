"""Shipping a finished stage, and the quickstart's shipped base held to the spec that made it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prolong.data.tokenizer import load_tokenizer, tokenizer_hash, train_bpe
from prolong.model.staging import SHIPPED
from prolong.run.ship import ShipError, main, ship_stage, stage_directory
from prolong.stage.directory import StageDir

ROOT = Path(__file__).resolve().parents[2]
BASE_SPEC = ROOT / "jobs/quickstart/base.yaml"
BASE = ROOT / "jobs/quickstart/base"


def finished_stage(tmp_path: Path) -> Path:
    """A stage directory as a training run leaves it: final/ (weights, tokenizer), checkpoints,
    logs, manifest, curves, COMPLETE."""
    stage = tmp_path / "runs/demo/pretrain-0123abcd"
    final = stage / "final"
    tok = train_bpe(["a small corpus of words, numbers 1234567 and keys"] * 20, 300, final)
    (final / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (final / "model.safetensors").write_bytes(b"weights")  # copied, not read
    (stage / "checkpoint-000010").mkdir()
    (stage / "logs").mkdir()
    (stage / "curves.png").write_bytes(b"\x89PNG fake")
    (stage / "manifest.json").write_text(json.dumps(
        {"pipeline": "demo", "stage": "pretrain", "id": "0123abcd", "kind": "PretrainJob",
         "spec": {}, "steps": 10, "tokenizer_hash": tokenizer_hash(tok)}))
    return stage


def test_ships_what_the_next_stage_loads_and_nothing_else(tmp_path):
    stage = finished_stage(tmp_path)
    with pytest.raises(ShipError, match="not complete"):
        ship_stage(stage, tmp_path / "base")
    (stage / "COMPLETE").write_text("{}")
    dest = tmp_path / "base"
    (dest / "final").mkdir(parents=True)
    (dest / "final/stale.bin").write_bytes(b"old")  # the destination is replaced as a whole
    ship_stage(stage, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["curves.png", "final", "manifest.json"]
    names = {p.name for p in (dest / "final").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "stale.bin" not in names and not (tmp_path / "base.partial").exists()
    assert StageDir(str(dest)).read_manifest().tokenizer_hash == \
        tokenizer_hash(load_tokenizer(dest / "final"))
    # final/ says which run made it: a stage starting from it must name that id (model.revision).
    assert json.loads((dest / "final" / SHIPPED).read_text()) == \
        {"pipeline": "demo", "stage": "pretrain", "id": "0123abcd"}


def test_ship_command_exits_1_on_an_unfinished_stage(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(BASE_SPEC.read_text().replace("./runs", str(tmp_path / "runs")))
    assert main([str(spec), str(tmp_path / "out")]) == 1
    assert "not complete" in capsys.readouterr().err


def test_the_shipped_quickstart_base_is_what_base_yaml_declares():
    """Editing base.yaml without re-making the base (`make quickstart-base`) fails here: the
    shipped manifest's stage id is no longer the spec's. The tokenizer in final/ is the one the
    run trained (its content hash is the manifest's), and the weights fit the repository."""
    manifest = StageDir(str(BASE)).read_manifest()
    stage_dir = stage_directory(BASE_SPEC)
    assert (manifest.stage, manifest.id) == ("pretrain", stage_dir.name.rsplit("-", 1)[1])
    assert manifest.kind == "PretrainJob" and manifest.steps
    assert manifest.tokenizer_hash == tokenizer_hash(load_tokenizer(BASE / "final"))
    assert (BASE / "final/model.safetensors").stat().st_size <= 10 * 2**20
    assert (BASE / "curves.png").read_bytes().startswith(b"\x89PNG")
    # The stages that start from it state its shape (the loader checks the config against it).
    stage1 = yaml.safe_load((ROOT / "jobs/quickstart/stage1.yaml").read_text())["spec"]["model"]
    assert stage1["source"] == "./jobs/quickstart/base/final"
    # ... and its revision, which makes stage 1 (and everything after it) a new run when the base
    # is re-made: the loader refuses a shipped model named under another revision.
    shipped = json.loads((BASE / "final" / SHIPPED).read_text())
    assert shipped == {"pipeline": manifest.pipeline, "stage": "pretrain", "id": manifest.id}
    assert stage1["revision"] == manifest.id
    config = json.loads((BASE / "final/config.json").read_text())
    arch = stage1["architecture"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        (arch["numLayers"], arch["hiddenSize"], arch["vocabSize"])
