"""A stage directory on an object store whose requests fail: pyarrow's S3 filesystem (what
StageDir uses for s3:// roots) against a local S3 endpoint on 127.0.0.1 that answers 503
SlowDown on demand (tests/stage/s3_server.py; no network).

- transient faults (a few failed requests): every write and read of the stage directory goes
  through (pyarrow's retries), and what is read back is what was written;
- an outage: the write fails with one line and the commit marker is not written, so the stage is
  not complete; once the service returns the same writes go through and the stage completes once
  (marker chaos: make bench).
"""

from __future__ import annotations

import json

import pytest

from prolong.stage.directory import (
    Manifest,
    MetricsLog,
    StageDir,
    publish_directory,
    read_metrics,
    stage_complete,
)
from prolong.stage.identity import StageRef
from tests.stage.s3_server import S3Server


@pytest.fixture
def s3(monkeypatch):
    with S3Server() as server:
        server.state.buckets["runs"] = {}
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield server.state


def finish(stage: StageDir, weights, ref: StageRef) -> None:
    """What the trainer's rank 0 writes at the end, in its order: final/, the manifest, then
    COMPLETE (prolong.train.loop.Worker._finalize)."""
    publish_directory(str(weights), stage.final_uri)
    stage.write_manifest(Manifest.for_stage(ref, {"kind": "PretrainJob"}, final=stage.final_uri,
                                            steps=2))
    stage.mark_complete()


@pytest.fixture
def weights(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return d


REF = StageRef("p", "s", "PretrainJob", "abc", (), "s3://runs")


def test_transient_faults_are_ridden_out(s3, weights):
    stage = StageDir("s3://runs/p/s-abc")
    s3.fail.update(PUT=2, GET=1, HEAD=1, POST=1)
    log = MetricsLog(stage, every=2)
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step})
    log.close()
    finish(stage, weights, REF)
    assert s3.failed >= 4  # the faults happened, and were retried
    assert [r["step"] for r in read_metrics(stage)] == [1, 2, 3, 4, 5]
    assert stage_complete("s3://runs/p/s-abc")
    assert s3.buckets["runs"]["p/s-abc/final/model.safetensors"] == \
        (weights / "model.safetensors").read_bytes()


@pytest.mark.chaos  # pyarrow's retries back off for seconds before giving up
def test_an_outage_stops_in_one_line_then_completes_once_it_returns(s3, weights):
    stage = StageDir("s3://runs/p/s-abc")
    stage.write_json("probe.json", {"ok": True})
    s3.down = True
    with pytest.raises(OSError) as err:
        finish(stage, weights, REF)
    assert "\n" not in str(err.value) and "SLOW_DOWN" in str(err.value), str(err.value)
    s3.down = False
    assert not stage_complete("s3://runs/p/s-abc")  # nothing vouches for a half-written final/
    finish(stage, weights, REF)
    assert stage_complete("s3://runs/p/s-abc")
    keys = [k for k in s3.buckets["runs"] if k.startswith("p/s-abc/")]
    assert sum(k.endswith("/COMPLETE") for k in keys) == 1
    assert json.loads(s3.buckets["runs"]["p/s-abc/manifest.json"])["steps"] == 2
    assert s3.buckets["runs"]["p/s-abc/final/model.safetensors"] == \
        (weights / "model.safetensors").read_bytes()
