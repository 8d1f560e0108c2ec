"""The Ray Train entry: a stage's spec -> a ``TorchTrainer``.

``RunConfig(storage_path=<storageRoot>/<pipeline>, name=<stage>-<id>)`` makes Ray Train's run
directory *the* stage directory, so its checkpoints sit beside ``manifest.json`` and
``metrics.jsonl``, and a second ``fit()`` with the same stage id resumes from the latest
checkpoint (Ray Train V2 restores its checkpoint manager from the run directory).

What workers receive is a plain, JSON-serialisable :class:`prolong.stage.payload.StageRun`: the
resolved job spec (the same pydantic model re-validated on the worker), the stage's identity,
where the upstream stage's outputs are, and where each stream's token shards are.
"""

from __future__ import annotations

import os

from prolong.k8s.rayjob import DEFAULT_CPUS_PER_WORKER
from prolong.model.memory import allocator_env
from prolong.spec import ClusterSpec, MemorySpec
from prolong.stage.directory import StageDir
from prolong.stage.identity import StageRef
from prolong.stage.logs import LOG_MODE_ENV
from prolong.stage.payload import StageRun
from prolong.train.chaos import CHAOS_ENV
from prolong.train.faults import FAULT_ENV


def run_storage_path(ref: StageRef) -> str:
    """Ray Train's storage_path: the pipeline directory (absolute for local roots)."""
    return StageDir(ref.pipeline_directory).uri


SPARE_CPUS_PER_GPU_WORKER = 2
"""Of a GPU worker's cores, kept from its compute threads: NCCL's proxy threads, Ray's and the
loader's work run beside them."""


def worker_threads(cluster: ClusterSpec) -> int:
    """Compute threads of one training worker (OpenMP, torch intra-op). On GPU: the cores the
    RayJob gives each worker (``kubernetes.cpusPerWorker``, default 22) less
    :data:`SPARE_CPUS_PER_GPU_WORKER`: the optimizer step under ``offloadOptimizer`` (DeepSpeed's
    CPU AdamW) and the universal-checkpoint conversion run on them. Ray Train reserves one CPU
    per worker and would otherwise set ``OMP_NUM_THREADS=1``, leaving 21 of the 22 idle. On
    CPU: one (each worker owns one core; more threads only contend)."""
    if cluster.device != "gpu":
        return 1
    cpus = cluster.kubernetes.cpus_per_worker or DEFAULT_CPUS_PER_WORKER["gpu"]
    return max(1, int(cpus) - SPARE_CPUS_PER_GPU_WORKER)


def worker_env(gpu: bool, *, console_logs: bool = False, memory: MemorySpec | None = None,
               threads: int = 1) -> dict[str, str]:
    """Environment of the training workers: ``threads`` OpenMP / MKL threads
    (:func:`worker_threads`; set here, Ray keeps an ``OMP_NUM_THREADS`` it finds). On CPU:
    DeepSpeed's CPU accelerator. On GPU: the CUDA allocator setting of ``memory``
    (parallelism.memory.expandableSegments). Worker output goes to the stage's logs/ unless
    ``console_logs``. A fault injection set on the driver (:data:`prolong.train.faults.FAULT_ENV`)
    or a chaos drill (:data:`prolong.train.chaos.CHAOS_ENV`) travels along."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if not gpu:
        env.update({"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    env.update(allocator_env(memory or MemorySpec(), gpu=gpu))
    env[LOG_MODE_ENV] = "console" if console_logs else "files"
    for name in (FAULT_ENV, CHAOS_ENV):  # drills set on the driver
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def build_trainer(run: StageRun, *, console_logs: bool = False):
    """A TorchTrainer for the stage (worker output to the stage's logs/ unless
    ``console_logs``)."""
    # Imported here, not at the top: Ray Train and the worker's module (torch, transformers:
    # about 5 s) are heavy, and the runner imports this module for every `prolongctl run`, even
    # one whose stages are all complete.
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
        name=ref.dir_name,
        storage_path=run_storage_path(ref),
        failure_config=FailureConfig(max_failures=cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=job.spec.checkpoint.keep),
        worker_runtime_env={"env_vars": worker_env(
            gpu, console_logs=console_logs, memory=job.spec.parallelism.memory,
            threads=worker_threads(cluster))},
    )
    return TorchTrainer(
        train_worker,
        train_loop_config=run.to_config(),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )
