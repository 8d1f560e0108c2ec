"""The Ray Train entry: what build_trainer hands Ray for a stage's workers."""

from __future__ import annotations

import pytest

from prolong.spec import ClusterSpec
from prolong.specfile import load
from prolong.stage.identity import pipeline_stages
from prolong.stage.payload import StageRun
from prolong.train.entry import build_trainer, worker_threads
from prolong.train.threads import usable_threads
from tests.conftest import JOBS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _trainer(stage: str, **cluster):
    loaded = load(JOBS / "prolong-8b/pipeline.yaml")
    refs = {r.stage: r for r in pipeline_stages(loaded.document, loaded.jobs)}
    job = loaded.jobs[stage].model_dump(mode="json", by_alias=True)
    job["spec"]["cluster"].update(cluster)
    run = StageRun(job=job, stage=refs[stage].to_json(), shard_dirs={"books": "/abs/shards"})
    return build_trainer(run)


def test_gpu_workers_get_the_pod_s_cores_as_threads():
    """Stage 1 on 8 x H100 pods: each worker's 22 cores (kubernetes.cpusPerWorker's default)
    less 2 become its OpenMP/MKL threads, so DeepSpeed's CPU AdamW (offloadOptimizer) and the
    universal-checkpoint conversion do not run on the one thread Ray Train would set
    (OMP_NUM_THREADS=1 from its 1 reserved CPU); a stated cpusPerWorker is followed."""
    trainer = _trainer("stage1")
    env = trainer.run_config.worker_runtime_env["env_vars"]
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("20", "20")
    assert "DS_ACCELERATOR" not in env
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.num_workers == 64
    stated = _trainer("stage1", kubernetes={"cpusPerWorker": 12.5})
    assert stated.run_config.worker_runtime_env["env_vars"]["OMP_NUM_THREADS"] == "10"
    cpu = _trainer("stage1", device="cpu", nodes=1, workersPerNode=2)
    env = cpu.run_config.worker_runtime_env["env_vars"]
    assert (env["OMP_NUM_THREADS"], env["DS_ACCELERATOR"]) == ("1", "cpu")


def test_threads_follow_the_cluster_and_the_machine():
    assert worker_threads(ClusterSpec(device="gpu", kubernetes={"cpusPerWorker": 3})) == 1
    assert worker_threads(ClusterSpec(device="cpu")) == 1
    # A 16-core box with 8 GPU workers: 2 each, whatever the spec's pods would have had.
    assert usable_threads(20, 8, available=16) == 2
    assert usable_threads(20, 1, available=176) == 20
    assert usable_threads(20, 8, available=4) == 1
