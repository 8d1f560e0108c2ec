"""A stage directory on a filesystem that fills up.

The storage root is a small tmpfs mounted for the test (root only; skipped where mounting is not
allowed): big enough for the stage's first checkpoint, too small for the second. The run must
stop with one line naming the full disk, keep what it had whole (no final/, no COMPLETE, the
first checkpoint usable), and, once the filesystem is grown (remounted larger), the same stage
run again resumes and ends on the uninterrupted run's losses and weights.

- make test: final/ published onto a full filesystem (prolong.stage.directory.publish_directory,
  what the trainer's rank 0 calls) fails whole, and publishes whole once space returns;
- make bench (marker chaos): the whole stage on Ray.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from prolong.stage.directory import publish_directory


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (skips the test where it cannot be mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(
            ["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_final_published_onto_a_full_disk_is_whole_or_absent(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"\1" * 3_000_000)
    with small_filesystem(tmp_path / "disk", "2m") as grow:
        final = tmp_path / "disk" / "stage" / "final"
        final.parent.mkdir()
        with pytest.raises(OSError) as err:
            publish_directory(str(weights), str(final))
        assert err.value.errno == 28  # ENOSPC, in one line naming the destination
        assert "\n" not in str(err.value) and str(final) in str(err.value), str(err.value)
        assert not final.exists()  # readers never see half of it
        grow("16m")
        publish_directory(str(weights), str(final))
        assert (final / "model.safetensors").read_bytes() == b"\1" * 3_000_000
        assert sorted(p.name for p in final.parent.iterdir()) == ["final"]


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(3600)
def test_a_stage_on_a_filling_disk_stops_in_one_line_then_resumes(tmp_path_factory):
    import ray

    from prolong.run.runner import RunError, run_file
    from prolong.train.checkpoints import checkpoint_problems
    from tests.train.test_ray_run import _final_weights, _losses_by_step, only_stage, stage_spec

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        data = tmp_path_factory.mktemp("data")
        reference = stage_spec(tmp_path_factory.mktemp("reference"), data, steps=8, every=3,
                               sp=1, seq=256)
        run_file(reference, progress=False)
        ref_stage = only_stage(reference)
        one = sum(f.stat().st_size for f in
                  (Path(ref_stage.uri) / "checkpoint-000006").rglob("*") if f.is_file())

        base = tmp_path_factory.mktemp("full")
        with small_filesystem(base / "runs", f"{int(one * 1.6) // 1024}k") as grow:
            path = stage_spec(base, data, steps=8, every=3, sp=1, seq=256, max_failures=1)
            with pytest.raises(RunError) as err:
                run_file(path, progress=False)
            message = str(err.value)
            assert "\n" not in message and "No space left on device" in message, message
            stage = only_stage(path)
            root = Path(stage.uri)
            assert not stage.is_complete() and not (root / "final").exists()
            assert checkpoint_problems(root / "checkpoint-000003") == []

            grow("512m")
            run_file(path, progress=False)
            assert stage.is_complete()
            raw = (root / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(line)["step"] for line in raw] == list(range(1, 9))
            expected, got = _losses_by_step(ref_stage), _losses_by_step(stage)
            for step in expected:
                assert got[step] == pytest.approx(expected[step], rel=1e-6), step
            ref_w, w = _final_weights(ref_stage), _final_weights(stage)
            for name, tensor in ref_w.items():
                torch.testing.assert_close(w[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
            for directory in root.glob("checkpoint-*"):
                assert checkpoint_problems(directory) == [], directory
    finally:
        ray.shutdown()
