"""Ship a finished training stage into the repository: its final/ (weights and tokenizer), its
manifest.json and its curves.png, so that a later stage can name the copy as ``model.source``.

The quickstart starts from a pretrained tiny base as ProLong starts from Llama-3-8B-Instruct; the
base is made by our own pipeline (``jobs/quickstart/base.yaml``) and shipped under
``jobs/quickstart/base/`` (``make quickstart-base``: run it, then ship it). The copy keeps the
run's manifest, so a test can hold the copy to the spec: the manifest's stage id is the spec's
(editing the spec without re-making the base fails) and final/'s tokenizer is the one the run
used (its content hash is the manifest's).

final/ also gets ``shipped.json`` (pipeline, stage, id): a stage's id sees its ``model.source``
only as a path, so a spec that starts from the copy names the id as ``model.revision`` (checked
wherever the model is loaded, :func:`prolong.model.staging.check_revision`), and re-making the
base makes every stage after it a new run instead of a finished one.

Only what the next stage loads travels: config, weights, tokenizer files. Checkpoints, logs and
metrics stay in the run directory. The copy is written beside the destination and renamed over
it, so an interrupted ship never leaves a half-written base.

Usage: ``python -m prolong.run.ship SPEC DEST``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from prolong.jobfile import job_stage
from prolong.model.staging import SHIPPED
from prolong.spec import EvalJob
from prolong.specfile import load
from prolong.stage.directory import COMPLETE, MANIFEST, StageDir

FINAL = "final"
SHIPPED_FILES = (MANIFEST, "curves.png")
FINAL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""What final/ keeps in the copy: what ``from_pretrained`` of the model and tokenizer read."""


class ShipError(RuntimeError):
    """The stage cannot be shipped (not a training stage, or not complete)."""


def stage_directory(spec_file: str | Path) -> Path:
    """The directory of the stage a standalone training job file stands for."""
    loaded = load(spec_file)
    found = job_stage(loaded)
    if isinstance(found.job, EvalJob):
        raise ShipError(f"{spec_file}: an EvalJob has no model to ship")
    return Path(found.ref.directory)


def ship_stage(stage_dir: str | Path, dest: str | Path) -> Path:
    """Copy the finished stage at ``stage_dir`` to ``dest`` (replaced as a whole)."""
    stage_dir, dest = Path(stage_dir), Path(dest)
    if not (stage_dir / COMPLETE).is_file():
        raise ShipError(f"{stage_dir}: the stage is not complete (no {COMPLETE}); run it first")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / FINAL).mkdir(parents=True)
    for name in SHIPPED_FILES:
        shutil.copy2(stage_dir / name, staging / name)
    for name in FINAL_FILES:
        if (stage_dir / FINAL / name).is_file():
            shutil.copy2(stage_dir / FINAL / name, staging / FINAL / name)
    if not (staging / FINAL / "model.safetensors").is_file():
        raise ShipError(f"{stage_dir / FINAL}: no model.safetensors to ship")
    manifest = StageDir(str(stage_dir)).read_manifest()
    (staging / FINAL / SHIPPED).write_text(json.dumps(
        {"pipeline": manifest.pipeline, "stage": manifest.stage, "id": manifest.id}, indent=1)
        + "\n")
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m prolong.run.ship SPEC DEST", file=sys.stderr)
        return 2
    try:
        dest = ship_stage(stage_directory(args[0]), args[1])
    except ShipError as exc:
        print(f"ship: {exc}", file=sys.stderr)
        return 1
    manifest = StageDir(str(dest)).read_manifest()
    print(f"shipped {manifest.pipeline}/{manifest.stage} id {manifest.id} "
          f"({manifest.steps:,} steps) to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
