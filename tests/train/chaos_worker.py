"""A stand-in training worker for the killer's tests: announces the moments a Worker announces,
in the same order, around a checkpoint file instead of DeepSpeed (python chaos_worker.py
STAGE_DIR RANK STEPS EVERY GROUP). Rank 0 writes checkpoints and the final marker. The two ranks
of a group meet before every step (files in STAGE_DIR), as a Worker's collectives make them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prolong.train.chaos import chaos_point


def main(stage_dir: str, rank: int, steps: int, every: int, group: int) -> None:
    root = Path(stage_dir)
    ckpt = root / "checkpoint.json"

    def meet(step: int) -> None:  # both ranks reach a step before either goes on
        (root / f"g{group}-r{rank}-s{step}").touch()
        peer = root / f"g{group}-r{1 - rank}-s{step}"
        deadline = time.monotonic() + 60
        while not peer.exists() and time.monotonic() < deadline:
            time.sleep(0.005)

    def point(name: str, step: int) -> None:
        chaos_point(name, step, stage_dir=stage_dir, rank=rank)

    point("start", 0)
    step = 0
    if ckpt.exists():
        step = json.loads(ckpt.read_text())["step"]
        point("load", step)
    while step < steps:
        step += 1
        meet(step)
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
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
