"""A stand-in training worker for the killer's tests: announces the moments a Worker announces,
in the same order, around a checkpoint file instead of DeepSpeed (python chaos_worker.py
STAGE_DIR RANK STEPS EVERY). Rank 0 writes checkpoints and the final marker."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prolong.train.chaos import chaos_point


def main(stage_dir: str, rank: int, steps: int, every: int) -> None:
    root = Path(stage_dir)
    ckpt = root / "checkpoint.json"

    def point(name: str, step: int) -> None:
        chaos_point(name, step, stage_dir=stage_dir, rank=rank)

    point("start", 0)
    step = 0
    if ckpt.exists():
        step = json.loads(ckpt.read_text())["step"]
        point("load", step)
    while step < steps:
        step += 1
        point("step", step)
        if step % every == 0 or step == steps:
            point("save", step)
            if rank == 0:
                tmp = root / "checkpoint.json.tmp"
                tmp.write_text(json.dumps({"step": step}))
                tmp.replace(ckpt)
                point("saved", step)
    if rank == 0:
        point("final", step)
        (root / "final").write_text("done")
        point("final", step)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
