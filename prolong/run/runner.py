"""``prolongctl run``: run a job, or a pipeline stage after stage, on Ray.

Without an address it starts a local Ray instance (the laptop quickstart); with one (``auto`` on a
KubeRay head pod) it joins that cluster. For each stage, in order:

- a stage whose directory holds ``COMPLETE`` is skipped: same id, same result;
- a stage whose upstream is not complete is refused (a standalone file with ``fromStage`` must be
  run through its pipeline, which knows where the upstream lives);
- otherwise its token shards are prepared (idempotent) and a ``TorchTrainer`` runs it; a second
  run with the same id resumes from Ray Train's latest checkpoint;
- an EvalJob stage runs the HELMET harness instead, its samples sharded over Ray tasks
  (:func:`prolong.eval.job.run_eval_stage`).

A progress bar follows ``metrics.jsonl`` in the stage directory, which workers append to; each
stage ends with one result line and the run with a summary (:mod:`prolong.run.summary`). Worker
output goes to ``<stage dir>/logs/`` (:mod:`prolong.stage.logs`), not to the console.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from prolong.data.errors import DataError
from prolong.data.prepare import prepare_file, shard_dirs, tokenizer_ref
from prolong.eval.datacheck import check_data_dir
from prolong.eval.job import run_eval_stage
from prolong.jobfile import job_stage
from prolong.model.staging import StagingError, check_revision, model_location
from prolong.run.summary import StageOutcome, print_summary
from prolong.spec import EvalJob, Job, ProLongPipeline, SpecError
from prolong.spec.issues import SpecIssue
from prolong.specfile import Loaded, load
from prolong.stage.directory import StageDir, final_problems, read_metrics
from prolong.stage.identity import StageRef, pipeline_stages
from prolong.stage.lock import LOCK_FILE, StageLock, StageLocked
from prolong.stage.logs import logs_dir
from prolong.stage.payload import StageFileError, StageRun, read_stage_file, stage_file_beside
from prolong.stage.uri import absolute, is_object_store
from prolong.train.chaos import ChaosSpecError, chaos_drill
from prolong.train.entry import build_trainer
from prolong.versions import summary as versions_summary


class RunError(RuntimeError):
    """A stage could not run or did not finish (exit code 1)."""


def stages_of(loaded: Loaded, pipeline_file: str | Path | None = None,
              ) -> list[tuple[Job, StageRef, dict[str, str]]]:
    """(job, its identity, upstream stage name -> stage directory) for every stage, in order. A
    job file that a pipeline references (``pipeline_file``, else the one beside it) is that
    pipeline's stage, in that pipeline's directory: resolved as ``prolongctl submit`` resolves
    it (:func:`prolong.jobfile.job_stage`)."""
    doc = loaded.document
    if isinstance(doc, ProLongPipeline):
        refs = pipeline_stages(doc, loaded.jobs)
        dirs = {r.stage: r.directory for r in refs}
        return [(loaded.jobs[r.stage], r, dirs) for r in refs]
    stage_file = stage_file_beside(loaded.path)
    if stage_file.exists():
        # A pipeline stage running on its own (a RayJob): its identity comes from stage.json.
        try:
            info = read_stage_file(stage_file, doc)
        except StageFileError as exc:
            raise RunError(str(exc)) from None
        return [(doc, info.ref, info.upstream_dirs)]
    found = job_stage(loaded, pipeline_file)  # SpecError: a fromStage file no pipeline names
    return [(found.job, found.ref, {n: r.directory for n, r in found.upstream.items()})]


def data_source(loaded: Loaded, pipeline_file: str | Path | None = None) -> Loaded:
    """The file whose data a run prepares and reads: for a job file resolved through a pipeline,
    that pipeline (its stages' shards and tokenizers are the pipeline's, as ``run`` of the
    pipeline file prepares them); else the file itself."""
    if loaded.is_pipeline or stage_file_beside(loaded.path).exists():
        return loaded
    return job_stage(loaded, pipeline_file).pipeline or loaded


def run_file(path: str | Path, *, ray_address: str | None = None, progress: bool = True,
             until: str | None = None, console: Console | None = None,
             verbose: bool = False, pipeline_file: str | Path | None = None,
             require_prepared: bool = False) -> list[StageRef]:
    """Run every stage of the file that is not complete (up to and including stage ``until``);
    returns the stages, in order. The console gets one line per stage event, a progress bar per
    training stage and a summary at the end; worker output goes to each stage's logs/ (with
    ``verbose``, to the console as well, through Ray). ``require_prepared`` (a RayJob's head):
    the data and staged model must be ready already (:func:`check_prepared`); nothing is
    prepared here while the GPUs wait."""
    console = console or Console(stderr=True)
    loaded = load(path)
    stages = stages_of(loaded, pipeline_file)
    loaded = data_source(loaded, pipeline_file)
    if until is not None:
        names = [ref.stage for _, ref, _ in stages]
        if until not in names:
            raise RunError(f"--until {until}: no such stage (stages: {', '.join(names)})")
        stages = stages[: names.index(until) + 1]
    pending, stale = [], set()
    walls: dict[str, float] = {}
    for stage in stages:
        job, ref, upstream_dirs = stage
        if not StageDir(ref.directory).is_complete():
            pending.append(stage)
        elif (why := out_of_date(job, ref, upstream_dirs, {r.stage for _, r, _ in pending})):
            console.print(f"stage {ref.stage} ({ref.id}) is complete but {why}: it runs again",
                          markup=False, soft_wrap=True)
            pending.append(stage)
            stale.add(ref.stage)
        else:
            console.print(f"stage {ref.stage} ({ref.id}) is complete: {ref.directory}",
                          markup=False, soft_wrap=True)
    for job, ref, _ in pending:
        source = job.spec.model.source
        if source and job.spec.model.staged_path is None and Path(source).is_dir():
            try:  # a shipped model named without its revision: before any lock, data or Ray
                check_revision(source, job.spec.model.revision)
            except StagingError as exc:  # bad input: exit 2, naming the file and field
                rule = str(exc).removeprefix("model.revision: ")
                raise SpecError([SpecIssue(f"stage {ref.stage}: spec.model.revision", rule,
                                           file=str(path))]) from None
    with contextlib.ExitStack() as held:
        # One run of a stage at a time (prolong.stage.lock): every pending stage is locked
        # before data preparation or Ray start, so a second run of the same stages refuses at once.
        for _, ref, _ in pending:
            lock = StageLock(ref.directory, on_wait=lambda m: console.print(
                m, markup=False, soft_wrap=True))
            try:
                lock.acquire()
            except StageLocked as exc:
                raise RunError(str(exc)) from None
            held.callback(lock.release)
            if ref.stage in stale:  # under its lock: nobody else can be using it
                try:
                    aside = StageDir(ref.directory).supersede(keep=(LOCK_FILE,))
                except OSError as exc:
                    raise RunError(str(exc)) from None
                console.print(f"stage {ref.stage}: its previous outputs moved to {aside}",
                              markup=False, soft_wrap=True)
        # Upstream stages finished before this run must be usable now: fail before preparing data
        # or starting Ray (upstreams this run produces are checked when their turn comes).
        running = {ref.stage for _, ref, _ in pending}
        for job, ref, upstream_dirs in pending:
            if job.spec.model.from_stage not in running:
                upstream_ready(job, ref, upstream_dirs)
            if isinstance(job, EvalJob):  # bad eval data is bad input (exit 2), before any model
                check_data_dir(job.spec)
        if pending and require_prepared:
            check_prepared(loaded, [job for job, _, _ in pending])
        elif pending:
            _prepare(loaded.path, progress)
        if pending:
            _connect(ray_address, console, verbose=verbose)
        for job, ref, upstream_dirs in pending:
            _run_pending(job, ref, upstream_dirs, loaded, console, walls, progress=progress,
                         verbose=verbose)
    print_summary(console, [StageOutcome.read(ref, wall_seconds=walls.get(ref.stage))
                            for _, ref, _ in stages])
    return [ref for _, ref, _ in stages]


def out_of_date(job: Job, ref: StageRef, upstream_dirs: dict[str, str],
                rerunning: set[str]) -> str | None:
    """Why a complete stage must run again (None: it need not), make-style: the stage it starts
    from runs again now (``rerunning``), or completed after it did (someone re-ran it since)."""
    src = job.spec.model.from_stage
    if src is None or src not in upstream_dirs:
        return None
    if src in rerunning:
        return f"stage {src}, which it starts from, runs again"
    mine, theirs = (StageDir(d).completed_at() for d in (ref.directory, upstream_dirs[src]))
    if mine is not None and theirs is not None and theirs > mine:
        return f"stage {src}, which it starts from, completed after it"
    return None


def upstream_ready(job: Job, ref: StageRef, upstream_dirs: dict[str, str]) -> str | None:
    """The directory of the stage ``job`` starts from (None: it starts from none), once it is
    complete with loadable final weights; RunError otherwise, naming what is missing."""
    src = job.spec.model.from_stage
    if src is None:
        return None
    if src not in upstream_dirs:
        raise RunError(f"stage {ref.stage} starts from stage {src}, which this file does not "
                       "define: run the pipeline file")
    upstream_dir = upstream_dirs[src]
    if not StageDir(upstream_dir).is_complete():
        raise RunError(f"stage {ref.stage} needs stage {src} complete at {upstream_dir}")
    broken = final_problems(upstream_dir)
    if broken:  # refused here, before any worker starts, rather than deep in a model load
        raise RunError(f"stage {ref.stage} starts from stage {src}, whose final weights are "
                       f"incomplete: {'; '.join(broken)}")
    return upstream_dir


def _run_pending(job: Job, ref: StageRef, upstream_dirs: dict[str, str], loaded: Loaded,
                 console: Console, walls: dict[str, float], *, progress: bool,
                 verbose: bool) -> None:
    """One stage that was not complete when the run started (its lock held)."""
    upstream_dir = upstream_ready(job, ref, upstream_dirs)
    if StageDir(ref.directory).is_complete():  # finished by a run that held the lock before us
        console.print(f"stage {ref.stage} ({ref.id}) was completed by another run: "
                      f"{ref.directory}", markup=False, soft_wrap=True)
        return
    console.print(f"stage {ref.stage} ({job.kind}, id {ref.id}) -> {ref.directory}",
                  markup=False, soft_wrap=True)
    start = time.monotonic()
    _run_stage(job, ref, loaded, upstream_dir, console, progress=progress, verbose=verbose)
    walls[ref.stage] = time.monotonic() - start
    if not StageDir(ref.directory).is_complete():
        raise RunError(f"stage {ref.stage} ended without writing COMPLETE in {ref.directory}")
    console.print(StageOutcome.read(ref, wall_seconds=walls[ref.stage]).line(), markup=False,
                  soft_wrap=True)


def _run_stage(job: Job, ref: StageRef, loaded: Loaded, upstream_dir: str | None,
               console: Console, *, progress: bool, verbose: bool) -> None:
    """Train (or evaluate) one stage; a failure becomes one RunError line."""
    try:
        if isinstance(job, EvalJob):  # HELMET on Ray tasks, sharded over workers
            run_eval_stage(job, ref, upstream_dir, console_logs=verbose,
                           log=lambda m: console.print(m, markup=False, soft_wrap=True))
        else:
            run = stage_run(job, ref, loaded, upstream_dir)
            with (_progress(job, ref, console, enabled=progress),
                  chaos_drill(run.stage_ref().directory, world=job.spec.cluster.world_size,
                              every_steps=job.spec.checkpoint.every_steps,
                              max_failures=job.spec.cluster.max_failures,
                              say=lambda m: console.print(m, markup=False, soft_wrap=True))):
                build_trainer(run, console_logs=verbose).fit()
    except ChaosSpecError as exc:
        raise RunError(str(exc)) from None
    except Exception as exc:  # Ray Train / Ray task failures carry the worker's traceback
        raise RunError(f"stage {ref.stage} failed: {_root_cause(exc)}{_logs_hint(ref)}") from exc


def _root_cause(exc: BaseException) -> str:
    """The last line of the innermost error: what a worker raised, without Ray's wrapping and
    its tracebacks (those are in the stage's logs/)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _logs_hint(ref: StageRef) -> str:
    where = logs_dir(ref.directory)
    return f" (worker logs: {where})" if where is not None else ""


class NotPrepared(RunError):
    """A stage on a cluster whose preparation (model staging, token shards) is not done."""


def check_prepared(loaded: Loaded, jobs: list[Job]) -> None:
    """Refuse, in one line, a stage whose staged model or token shards are not ready: on a
    cluster they are made by the stage's preparation Job (prolong.k8s.preparation) before the
    GPU workers exist, never by the driver while they wait."""
    for job in jobs:
        hint = ("its preparation Job (prolongctl model stage / data prepare) has not completed "
                "for these inputs")
        try:
            if job.spec.model.staged_path is not None:
                model_location(job.spec.model)
            if not isinstance(job, EvalJob):
                shard_dirs(job, loaded, verify=True)
        except (DataError, StagingError) as exc:
            raise NotPrepared(f"stage {job.metadata.name} is not prepared: {exc}; {hint}"
                              ) from None


def _prepare(path: str | Path, progress: bool) -> None:
    prepare_file(str(path), progress=progress)


def worker_job(job: Job) -> dict[str, Any]:
    """The job as its workers receive it (by alias, JSON): a ``model.source`` that is a local
    directory here travels absolute, because workers run in another directory (the quickstart's
    stage 1 names its base as ./jobs/quickstart/base/final). The stage's id was computed here,
    from the spec as written."""
    data = job.model_dump(mode="json", by_alias=True)
    model = data["spec"].get("model") or {}
    source = model.get("source")
    if source and not is_object_store(source) and Path(source).is_dir():
        model["source"] = absolute(source)
    return data


def stage_run(job: Job, ref: StageRef, loaded: Loaded, upstream_dir: str | None) -> StageRun:
    """What the workers of one stage receive (every path absolute)."""
    shards = {domain: absolute(str(d)) for domain, d in shard_dirs(job, loaded).items()}
    ref = ref.with_storage_root(absolute(ref.storage_root))
    return StageRun(job=worker_job(job), stage=ref.to_json(),
                    upstream_dir=absolute(upstream_dir) if upstream_dir else None,
                    shard_dirs=shards, tokenizer_dir=absolute(tokenizer_ref(job, loaded).location))


def _connect(address: str | None, console: Console, *, verbose: bool = False) -> None:
    import ray  # only when a stage is about to run: a complete pipeline needs no Ray

    if ray.is_initialized():
        return
    # Workers write their output into the stage's logs/ (prolong.stage.logs); Ray copies it to
    # this console only when asked (--verbose). Its own driver notes are errors-only then too.
    context = ray.init(address=address, logging_level="WARNING" if verbose else "ERROR",
                       log_to_driver=verbose, configure_logging=True)
    url = getattr(context, "dashboard_url", None)
    console.print(f"Ray {'cluster ' + address if address else 'local instance'}"
                  + (f", dashboard http://{url}" if url else "") + f" | {versions_summary()}",
                  markup=False, soft_wrap=True)


class _progress:
    """Follow metrics.jsonl of a stage with a progress bar (a daemon thread)."""

    def __init__(self, job: Job, ref: StageRef, console: Console, *, enabled: bool):
        self.total = job.spec.total_steps
        self.stage = StageDir(ref.directory)
        self.enabled = enabled
        self.console = console
        self._stop = threading.Event()

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._follow, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)

    def _follow(self) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("steps", total=self.total, info="")
            while not self._stop.wait(1.0):
                self._update(bar, task)
            self._update(bar, task)

    def _update(self, bar: Progress, task) -> None:
        records = read_metrics(self.stage)
        if records:
            last = records[-1]
            bar.update(task, completed=last["step"],
                       info=f"loss {last['loss']:.4f} | {last['tokens_per_s']:,.0f} tok/s")

