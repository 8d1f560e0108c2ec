"""The Ray Train entry: a stage's spec -> a ``TorchTrainer``.

``RunConfig(storage_path=<storageRoot>/<pipeline>, name=<stage>-<id>)`` makes Ray Train's run
directory *the* stage directory, so its checkpoints sit beside ``manifest.json`` and
``metrics.jsonl``, and a second ``fit()`` with the same stage id resumes from the latest
checkpoint (Ray Train V2 restores its checkpoint manager from the run directory).

What workers receive is a plain, JSON-serialisable :class:`StageRun`: the resolved job spec (the
same pydantic model re-validated on the worker), the stage's identity, where the upstream stage's
outputs are, and where each stream's token shards are.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from prolong.pipeline import StageRef
from prolong.spec import KIND_MODELS, Job


@dataclass(frozen=True)
class StageRun:
    """Everything a worker needs to train one stage."""

    job: dict[str, Any]
    """The resolved job (by alias, JSON)."""
    stage: dict[str, Any]
    """The StageRef as a dict."""
    upstream_dir: str | None = None
    """Stage directory of model.fromStage (its final/ weights, manifest, last checkpoint)."""
    shard_dirs: dict[str, str] = field(default_factory=dict)
    """Per domain: the prepared token-shard directory."""
    tokenizer_dir: str | None = None
    """The tokenizer saved with the prepared data (copied into final/)."""

    def job_model(self) -> Job:
        return KIND_MODELS[self.job["kind"]].model_validate(self.job)

    def stage_ref(self) -> StageRef:
        data = dict(self.stage)
        data["upstream"] = tuple(data["upstream"])
        return StageRef(**data)

    def to_config(self) -> dict[str, Any]:
        return {"stage_run": asdict(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StageRun:
        return cls(**config["stage_run"])


def run_name(ref: StageRef) -> str:
    return f"{ref.stage}-{ref.id}"


def run_storage_path(ref: StageRef) -> str:
    """Ray Train's storage_path: the pipeline directory (absolute for local roots)."""
    from prolong.train.stage_dir import StageDir

    stage_uri = StageDir(ref.directory).uri
    return stage_uri.rsplit("/", 1)[0]


def worker_env(gpu: bool) -> dict[str, str]:
    """Environment of the training workers. On CPU: DeepSpeed's CPU accelerator, and one
    intra-op thread per worker (each worker owns one core; more threads only contend). A fault
    injection set on the driver (prolong.train.loop.FAULT_ENV) travels along."""
    from prolong.train.loop import FAULT_ENV

    env = {} if gpu else {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                          "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env


def build_trainer(run: StageRun):
    """A TorchTrainer for the stage (imported lazily: Ray is heavy and not needed to validate)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from prolong.train.loop import train_worker

    job = run.job_model()
    ref = run.stage_ref()
    cluster = job.spec.cluster
    gpu = cluster.device == "gpu"
    scaling = ScalingConfig(
        num_workers=cluster.world_size,
        use_gpu=gpu,
        # CPU workers take one core each so that a 2-core laptop can host two of them.
        resources_per_worker=None if gpu else {"CPU": 1},
    )
    run_config = RunConfig(
        name=run_name(ref),
        storage_path=run_storage_path(ref),
        failure_config=FailureConfig(max_failures=cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=job.spec.checkpoint.keep),
        worker_runtime_env={"env_vars": worker_env(gpu)},
    )
    return TorchTrainer(
        train_worker,
        train_loop_config=run.to_config(),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )
