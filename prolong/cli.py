"""``prolongctl``: validate, inspect, plan and run ProLong job specs.

Exit codes: 0 success, 2 bad input (one line naming file, field and rule), 1 failure while running.
Set PROLONG_DEBUG=1 to see tracebacks of unexpected failures.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from prolong import plan as planning
from prolong.cli_errors import EXIT_BAD_INPUT, EXIT_FAILED, err, user_errors
from prolong.data.cli import data_app
from prolong.eval.cli import eval_app
from prolong.k8s import dump_all
from prolong.k8s import render as render_objects
from prolong.k8s.backend import (
    ClusterError,
    ClusterUnreachable,
    SubmitRefused,
    UnknownName,
    resolve_name,
    submission,
)
from prolong.k8s.doctor import run_checks
from prolong.k8s.kube_backend import default_namespace, dry_run_offline, kube_client
from prolong.k8s.mounts import check_mounts
from prolong.k8s.ray_backend import TokenSecretError
from prolong.k8s.schemas import InvalidObjects
from prolong.k8s.staged import check_submission
from prolong.k8s.submit import open_backend
from prolong.model.cli import model_app
from prolong.spec import ProLongPipeline, SpecError, resolved_architecture
from prolong.specfile import Loaded, dump_yaml, load
from prolong.stage.identity import StageRef, pipeline_stages, standalone_stage

app = typer.Typer(
    name="prolongctl",
    help="Train long-context models with the ProLong recipe: validate, plan and run job specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(model_app, name="model")
out = Console(highlight=False, soft_wrap=True)


FILES_ARG = typer.Argument(..., help="Spec files (job or pipeline YAML).", show_default=False)
FILE_ARG = typer.Argument(..., help="A job or pipeline spec file.", show_default=False)


@app.command()
def validate(
    files: list[Path] = FILES_ARG,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every issue, not just the first."),
) -> None:
    """Check spec files: structure, recipe rules, and (for pipelines) the stages they reference.
    A stage that names a volume (storage.volumeClaim, cluster.kubernetes.volumes) runs on
    Kubernetes: every local path it reads must lie under a volume its pods mount.

    Prints one line per file and exits 2 if any file is invalid.

    [bold]Examples[/bold]

      prolongctl validate jobs/prolong-8b/*.yaml

      prolongctl validate -v my-stage2.yaml
    """
    failed = 0
    for path in files:
        try:
            loaded = load(path)
            # A stage that names a volume runs on Kubernetes: its pods must see what it reads.
            check_mounts(loaded, declared_only=True)
        except SpecError as exc:
            failed += 1
            err.print(exc.one_line() if not verbose else str(exc), markup=False)
            if verbose:
                for issue in exc.issues[1:]:
                    err.print(f"  {issue}", markup=False)
            continue
        doc = loaded.document
        detail = (f"{len(doc.spec.stages)} stages" if isinstance(doc, ProLongPipeline)
                  else doc.metadata.name)
        out.print(f"ok  {path}  ({doc.kind}: {detail})", markup=False)
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def show(file: Path = FILE_ARG) -> None:
    """Print the resolved spec: defaults filled in, a pipeline's stage files inlined.

    [bold]Examples[/bold]

      prolongctl show jobs/prolong-8b/stage2-512k.yaml

      prolongctl show jobs/quickstart/pipeline.yaml > quickstart-resolved.yaml
    """
    with user_errors():
        loaded = load(file)
    out.print(dump_yaml(loaded.document), markup=False, end="")


@app.command()
def plan(
    file: Path = FILE_ARG,
    mfu: float = typer.Option(planning.DEFAULT_MFU, min=0.01, max=1.0,
                              help="Model FLOPs utilisation assumed for GPU-hour estimates."),
    short_doc_tokens: int = typer.Option(planning.DEFAULT_SHORT_DOC_TOKENS, min=1,
                                         help="Assumed length of short documents for the "
                                              "document-causal FLOPs figure."),
    summary_only: bool = typer.Option(False, "--summary",
                                      help="Only the one-table summary (stage, kind, steps, "
                                           "tokens, devices, GPU-hours), without each stage's "
                                           "detail."),
) -> None:
    """Show what a job or pipeline will do: steps, tokens per stage and per domain, rows per
    step, FLOPs per token (6N+12LHdS and document-causal 6N+6LHd·Σd²/S), GPU-hours at --mfu,
    each training stage's estimated peak memory per GPU against the GPU's (warned when it does
    not fit) and its lockstep efficiency (how much of each micro-step the replicas train rather
    than wait for the slowest row). --summary prints the first table only (the quickstart's first
    screen).

    [bold]Examples[/bold]

      prolongctl plan jobs/prolong-8b/pipeline.yaml

      prolongctl plan jobs/prolong-8b/stage2-512k.yaml --mfu 0.3

      prolongctl plan jobs/quickstart/pipeline.yaml --summary
    """
    with user_errors():
        loaded = load(file)
    plans = [planning.plan_stage(job, ref, resolved_architecture(job, loaded.jobs), mfu=mfu,
                                 short_doc_tokens=short_doc_tokens)
             for job, ref in _stages(loaded)]
    _print_plan(loaded, plans, mfu, detail=not summary_only)


@app.command()
def render(
    file: Path = FILE_ARG,
    namespace: str = typer.Option(None, "--namespace", "-n", help="Namespace to put on the objects."),
) -> None:
    """Print the Kubernetes objects for a spec as YAML: for a job its ConfigMap, its preparation
    Job (CPU only: model staging and data preparation, completed before the RayJob is created)
    and its KubeRay RayJob; the ProLongPipeline custom resource (stages inline) for a pipeline.

    [bold]Examples[/bold]

      prolongctl render jobs/prolong-8b/stage2-512k.yaml

      prolongctl render jobs/prolong-8b/pipeline.yaml | kubectl apply -f -
    """

    with user_errors():
        loaded = load(file)
    out.print(dump_all(render_objects(loaded, namespace=namespace, preparation=True)),
              markup=False, end="")


PIPELINE_OPT = typer.Option(None, "--pipeline", help="For a job file: the pipeline file whose stage "
                            "it is (default: the one pipeline file beside it that references "
                            "it).")


@app.command()
def run(
    file: Path = FILE_ARG,
    ray_address: str = typer.Option(None, "--ray-address",
                                    help="Join this Ray cluster (auto on a KubeRay head pod) "
                                         "instead of starting a local one."),
    until: str = typer.Option(None, "--until", help="Stop after this stage of a pipeline."),
    pipeline: Path = PIPELINE_OPT,
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the workers' and Ray's log lines on the console too "
                                      "(they always go to each stage's logs/)."),
    require_prepared: bool = typer.Option(
        False, "--require-prepared", help="Refuse (one line) a stage whose model is not staged "
        "or whose data is not prepared, instead of preparing it here (a RayJob's head: the "
        "stage's preparation Job did that before the GPUs were asked for)."),
) -> None:
    """Run a job, or a pipeline stage after stage, on Ray Train: prepares the data, trains, and
    writes <storage.root>/<pipeline>/<stage>-<id>/ (metrics.jsonl, checkpoints, final/, logs/,
    COMPLETE). Complete stages are skipped; an interrupted stage resumes from its last
    checkpoint. A job file that a pipeline references runs as that pipeline's stage, in the
    pipeline's directory (as submit resolves it); its upstream stage must be complete. The console shows one line per stage event, a progress bar per training stage and
    a summary at the end; worker output goes to each stage's logs/.

    [bold]Examples[/bold]

      prolongctl run jobs/quickstart/stage1.yaml

      prolongctl run jobs/quickstart/pipeline.yaml --until sft

      prolongctl run /etc/prolong/job.yaml --ray-address auto --require-prepared
    """
    # The engine loads torch, transformers and the data pipeline: only `run` pays for them.
    from prolong.run.runner import RunError, run_file

    with user_errors():
        try:
            run_file(file, ray_address=ray_address, progress=not no_progress, until=until,
                     verbose=verbose, pipeline_file=pipeline, require_prepared=require_prepared)
        except RunError as exc:
            err.print(f"prolongctl run: {exc}", markup=False)
            raise typer.Exit(EXIT_FAILED) from None


REPORT_TARGETS_ARG = typer.Argument(..., show_default=False,
                                    help="Spec files (job or pipeline), pipeline directories "
                                         "(<storage.root>/<pipeline>) or stage directories.")
PRICE_OPT = typer.Option(None, "--price-per-device-hour", min=0.0,
                         help="Price of one device-hour, for a cost column.")
REPORT_OUT_OPT = typer.Option(None, "--out", "-o",
                              help="Also write report.md (every run, side by side) here.")


@app.command()
def report(targets: list[Path] = REPORT_TARGETS_ARG, price: float | None = PRICE_OPT,
           out_dir: Path | None = REPORT_OUT_OPT) -> None:
    """Summarise finished runs: per stage its steps, tokens, last loss, time, device-hours,
    tokens/s per device, MFU and cost, and the eval scores by task and length. Several targets
    are put side by side in report.md.

    [bold]Examples[/bold]

      prolongctl report jobs/quickstart/pipeline.yaml

      prolongctl report runs/quickstart runs/other-quickstart --price-per-device-hour 2.5 --out reports/
    """
    # Reading stage directories loads pyarrow's filesystems (+0.2 s): only `report` needs them.
    from prolong.eval.report import SCORES_PNG, comparison_png
    from prolong.run.report import eval_results, run_markdown, run_rows
    from prolong.run.summary import print_run_report

    with user_errors():
        try:
            runs = [run_rows(t) for t in targets]
        except ValueError as exc:
            err.print(f"prolongctl report: {exc}", markup=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
    print_run_report(out, runs, price)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "report.md"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(run_markdown(runs, price))
        tmp.replace(path)
        out.print(f"wrote {path}", markup=False)
        evals = eval_results(runs)
        if evals:
            png = out_dir / SCORES_PNG
            tmp = png.with_name(f".{png.name}.tmp")
            tmp.write_bytes(comparison_png(evals))
            tmp.replace(png)
            out.print(f"wrote {png} ({len(evals)} eval stage{'s' if len(evals) > 1 else ''})",
                      markup=False)


# -- submit / status / logs / delete (a prolong.k8s.backend.Backend does the work) ---------------

NAME_ARG = typer.Argument(..., show_default=False,
                          help="A pipeline name, a RayJob name (Ray: a submission id), a job name, "
                               "or the spec file itself.")
NAMESPACE_OPT = typer.Option(None, "--namespace", "-n",
                             help="Kubernetes namespace (default: the kubeconfig context's).")
RAY_ADDRESS_OPT = typer.Option(None, "--ray-address",
                               help="Use this Ray cluster's Job Submission API (its dashboard URL, "
                                    "e.g. http://127.0.0.1:8265) instead of Kubernetes.")
RAY_TOKEN_OPT = typer.Option(None, "--ray-token", envvar="RAY_AUTH_TOKEN", show_envvar=True,
                             help="Ray auth token (default: --ray-token-secret, else "
                                  "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token when present).")
RAY_TOKEN_SECRET_OPT = typer.Option(None, "--ray-token-secret", envvar="PROLONG_RAY_TOKEN_SECRET",
                                    show_envvar=True, metavar="[NAMESPACE/]NAME",
                                    help="Read the Ray token from this Kubernetes Secret (key "
                                         "auth_token; KubeRay's is named like the Ray cluster).")


@contextmanager
def cluster_errors() -> Iterator[None]:
    """Unknown names, refused submissions and objects that fail their schema exit 2, cluster
    failures exit 1; one line each."""
    with user_errors():
        try:
            yield
        except (UnknownName, SubmitRefused, InvalidObjects, TokenSecretError) as exc:
            err.print(str(exc), markup=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except ClusterError as exc:
            err.print(str(exc), markup=False)
            raise typer.Exit(EXIT_FAILED) from None


@app.command()
def submit(
    file: Path = FILE_ARG,
    namespace: str = NAMESPACE_OPT,
    pipeline: Path = PIPELINE_OPT,
    with_upstream: bool = typer.Option(False, "--with-upstream", help="When a stage's upstream "
                                       "stages are not complete, submit its pipeline up to "
                                       "that stage instead of refusing."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be created; create "
                                 "nothing (server-side when the API server supports it; with "
                                 "no cluster reachable, checked here against the schemas)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the run until it ends: exit 0 on "
                              "success, 1 on failure."),
    ray_address: str = RAY_ADDRESS_OPT,
    ray_token: str = RAY_TOKEN_OPT,
    ray_token_secret: str = RAY_TOKEN_SECRET_OPT,
    interval: float = typer.Option(5.0, "--interval", min=0.05, help="Seconds between status "
                                   "reads with --wait."),
    timeout: float = typer.Option(None, "--timeout", min=1, help="Give up waiting after this many "
                                  "seconds (exit 1)."),
    no_operator_check: bool = typer.Option(False, "--no-operator-check", help="Submit a pipeline "
                                           "even when no prolong operator watches the namespace "
                                           "(its marker ConfigMap prolong-operator is missing)."),
) -> None:
    """Submit a spec: a job becomes its ConfigMap + KubeRay RayJob, a pipeline the ProLongPipeline
    custom resource (the operator runs its stages). Names come from stage ids, so submitting
    the same stage again reports the existing run and creates nothing. With --ray-address the
    job goes to an existing Ray cluster through the Job Submission API instead.

    A job file that a pipeline references (the pipeline file beside it, or --pipeline) is
    submitted as that pipeline's stage, with its upstream stages' real ids and directories. When
    an upstream stage is not complete (its RayJobs, its pipeline's status, its COMPLETE marker),
    submit refuses (exit 2) and creates nothing, or with --with-upstream submits the pipeline up
    to that stage.

    The namespace is kubectl's: --namespace, else the kubeconfig context's, else default. A
    pipeline is refused (exit 2) when no operator watches that namespace (the chart's marker
    ConfigMap prolong-operator is not there), unless --no-operator-check.

    [bold]Examples[/bold]

      prolongctl submit jobs/prolong-8b/stage2-512k.yaml -n ml --wait

      prolongctl submit jobs/prolong-8b/stage2-512k.yaml --with-upstream

      prolongctl submit jobs/prolong-8b/pipeline.yaml --dry-run

      prolongctl submit jobs/quickstart/stage1.yaml --ray-address http://127.0.0.1:8265 --wait

      prolongctl submit jobs/prolong-8b/stage1-64k.yaml --ray-address http://localhost:8265 --ray-token-secret ml/prolong-ray
    """
    with cluster_errors():
        loaded = load(file)
        if not ray_address:  # the pods must see every path the stages read
            check_mounts(loaded)
        what = submission(loaded, pipeline)
        # Before the cluster is asked anything: a stage whose staged model is missing would be
        # found by its workers only after every GPU was provisioned (prolong.k8s.staged).
        check_submission(what, err, with_upstream=with_upstream)
        try:
            backend = open_backend(namespace, ray_address, ray_token, ray_token_secret,
                                   operator_check=not no_operator_check)
            done = backend.submit(what, err, dry_run=dry_run, yaml_out=out,
                                  with_upstream=with_upstream)
        except ClusterUnreachable as exc:
            if not dry_run or ray_address:
                raise
            dry_run_offline(what, namespace or default_namespace(), str(exc), err, out)
            return
        ok = dry_run or not wait or backend.wait(done, err, interval=interval, timeout=timeout)
    if not ok:
        raise typer.Exit(EXIT_FAILED)


DOCTOR_FILES_ARG = typer.Argument(None, show_default=False,
                                  help="The spec files you will submit (their claims, Secrets, "
                                       "queues and images are checked).")


@app.command()
def doctor(
    files: list[Path] = DOCTOR_FILES_ARG,
    namespace: str = NAMESPACE_OPT,
    operator_namespace: str = typer.Option(None, "--operator-namespace",
                                           help="Where the chart installed the operator "
                                                "(default: --namespace)."),
    no_probe: bool = typer.Option(False, "--no-probe", help="Do not start the Pod that checks "
                                  "a written claim is writable by the pods' user."),
    probe_timeout: float = typer.Option(120.0, "--probe-timeout", min=1,
                                        help="Seconds to wait for that Pod."),
) -> None:
    """Check a cluster before the first submit, one line per check: KubeRay's RayJob CRD (>= 1.6),
    the operator running and watching the namespace, each claim the stages mount (Bound, its
    access mode, writable by the pods' user), the Secrets and Kueue LocalQueues the specs name,
    and that each stage names its image. Exits 2 when any check fails.

    [bold]Examples[/bold]

      prolongctl doctor jobs/prolong-8b/pipeline.yaml -n ml

      prolongctl doctor -n ml --operator-namespace prolong-system
    """
    with cluster_errors():
        jobs = [job for path in files or [] for job in load(path).jobs.values()]
        ns = namespace or default_namespace()
        checks = run_checks(kube_client(), ns, jobs, operator_namespace=operator_namespace,
                            probe=not no_probe, probe_timeout=probe_timeout)
    for check in checks:
        out.print(check.line(), markup=False)
    failed = [c for c in checks if not c.ok]
    out.print(f"{len(checks) - len(failed)} of {len(checks)} checks passed in namespace {ns}",
              markup=False)
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def status(name: str = NAME_ARG, namespace: str = NAMESPACE_OPT,
           ray_address: str = RAY_ADDRESS_OPT, ray_token: str = RAY_TOKEN_OPT,
           ray_token_secret: str = RAY_TOKEN_SECRET_OPT) -> None:
    """Show a run: a pipeline's phase and stage table (ids, RayJobs, dashboards), or a RayJob's
    state (KubeRay's jobDeploymentStatus and jobStatus). Unknown names exit 2.

    [bold]Examples[/bold]

      prolongctl status prolong-8b

      prolongctl status jobs/quickstart/stage1.yaml --ray-address http://127.0.0.1:8265
    """
    with cluster_errors():
        backend = open_backend(namespace, ray_address, ray_token, ray_token_secret)
        backend.status(resolve_name(name), out)


@app.command()
def logs(name: str = NAME_ARG, follow: bool = typer.Option(False, "--follow", "-f",
                                                           help="Keep streaming new output."),
         namespace: str = NAMESPACE_OPT, ray_address: str = RAY_ADDRESS_OPT,
         ray_token: str = RAY_TOKEN_OPT, ray_token_secret: str = RAY_TOKEN_SECRET_OPT) -> None:
    """Print a run's logs: the Ray driver's output, from the head pod's driver-log container
    (HTTPMode) or the submitter's pod (K8sJobMode); a pipeline's current stage; on Ray, the
    job's driver output.

    [bold]Examples[/bold]

      prolongctl logs prolong-8b -f

      prolongctl logs quickstart-stage1-0123abcd --ray-address http://127.0.0.1:8265
    """
    with cluster_errors():
        backend = open_backend(namespace, ray_address, ray_token, ray_token_secret)
        backend.logs(resolve_name(name), sys.stdout, follow=follow)


@app.command()
def delete(name: str = NAME_ARG, namespace: str = NAMESPACE_OPT,
           ray_address: str = RAY_ADDRESS_OPT, ray_token: str = RAY_TOKEN_OPT,
           ray_token_secret: str = RAY_TOKEN_SECRET_OPT) -> None:
    """Delete a run: a pipeline custom resource (its RayJobs go with it), or a RayJob and its
    ConfigMap; on Ray, stop and delete the job. Stage outputs in storage are kept.

    [bold]Examples[/bold]

      prolongctl delete quickstart-stage1-0123abcd -n ml

      prolongctl delete prolong-8b
    """
    with cluster_errors():
        backend = open_backend(namespace, ray_address, ray_token, ray_token_secret)
        backend.delete(resolve_name(name), err)


def _stages(loaded: Loaded) -> list[tuple]:
    doc = loaded.document
    if isinstance(doc, ProLongPipeline):
        refs = pipeline_stages(doc, loaded.jobs)
        return [(loaded.jobs[r.stage], r) for r in refs]
    return [(doc, standalone_stage(doc))]


def format_count(value: float | None) -> str:
    """Large counts as 20.97e9, small ones with thousands separators."""
    if value is None:
        return "-"
    if abs(value) >= 1e8:
        return f"{value / 1e9:.2f}e9"
    return f"{value:,.0f}"


def format_hours(plan: planning.StagePlan) -> str:
    if plan.gpu_hours is None:
        return "n/a (CPU)" if plan.device == "cpu" else "unknown"
    return f"{plan.gpu_hours:,.0f}"


def _print_plan(loaded: Loaded, plans: list[planning.StagePlan], mfu: float, *,
                detail: bool = True) -> None:
    doc = loaded.document
    out.print(f"[bold]{doc.metadata.name}[/bold] ({doc.kind}, {loaded.path}): "
              f"GPU-hours at MFU {mfu:.2f} on 6N+12LHdS")
    summary = Table(show_edge=False, pad_edge=False)
    for col in ("stage", "kind", "steps", "tokens", "GPUs", "GPU-hours"):
        summary.add_column(col, justify="left" if col in ("stage", "kind") else "right",
                           no_wrap=True)
    for p in plans:
        gpus = f"{p.gpus}x {p.gpu_type}" if p.device == "gpu" else f"{p.gpus} CPU"
        summary.add_row(p.stage.stage, p.kind, format_count(p.steps), format_count(p.tokens), gpus,
                        format_hours(p))
    out.print(summary)
    if not detail:
        return
    for p in plans:
        _print_stage(p)


def _print_stage(p: planning.StagePlan) -> None:
    ref: StageRef = p.stage
    out.print()
    out.print(f"[bold]{ref.stage}[/bold] {p.kind} id {ref.id} -> {ref.directory}")
    if p.kind == "EvalJob":
        out.print(f"  prompts {p.prompts:,} | prompt tokens {format_count(p.tokens)}")
        if p.flops_dense is not None:
            out.print(f"  FLOPs/prompt token (prefill 2N+4LHdS) {format_count(p.flops_dense)}")
    else:
        out.print(f"  steps {p.steps:,} | tokens {format_count(p.tokens)} | sequence "
                  f"{p.sequence_length:,} | rows/step {p.rows_per_step} | micro-batches/rank "
                  f"{p.micro_batches_per_rank} | warmup {p.warmup_steps} steps")
        out.print(f"  parallel: {p.gpus} workers = SP {p.sp} x DP {p.dp}")
        if p.flops_dense is not None:
            out.print(f"  FLOPs/token: dense 6N+12LHdS {format_count(p.flops_dense)} | "
                      f"document-causal 6N+6LHd·Σd²/S {format_count(p.flops_doc_causal)}")
        if p.lockstep is not None:
            out.print(f"  lockstep efficiency {p.lockstep.efficiency:.2f}: mean / max row FLOPs "
                      f"per micro-step under the loader's placement ({p.lockstep.steps} steps "
                      "replayed over document lengths; ZeRO-3 makes every replica wait for the "
                      "slowest row)")
        _print_memory(p)
        domains = Table(show_edge=False, pad_edge=False, box=None)
        domains.add_column("  domain", no_wrap=True)
        domains.add_column("share", justify="right", no_wrap=True)
        domains.add_column("tokens", justify="right", no_wrap=True)
        for d in p.domains:
            domains.add_row(f"  {d.domain}", f"{d.proportion:.1%}", format_count(d.tokens))
        out.print(domains)
    if p.gpu_hours is not None:
        wall = p.gpu_hours / max(1, p.gpus)
        out.print(f"  GPU-hours {p.gpu_hours:,.0f} (about {wall:,.1f} h on {p.gpus} GPUs)")
    if p.at_risk_gpu_hours is not None:
        out.print(f"  checkpoints about every {p.checkpoint_hours * 60:,.0f} min: up to "
                  f"{p.at_risk_gpu_hours:,.0f} GPU-hours at risk per interruption "
                  "(checkpoint.everySteps / everyMinutes)")
    for note in p.notes:
        out.print(f"  [dim]note: {note}[/dim]")


def _print_memory(p: planning.StagePlan) -> None:
    """The estimated peak memory per GPU (prolong.model.memory), line by line, then the device."""
    if p.memory is None:
        return
    table = Table(show_edge=False, pad_edge=False, box=None)
    table.add_column("  memory per " + ("GPU" if p.device == "gpu" else "worker"), no_wrap=True)
    table.add_column("GiB", justify="right", no_wrap=True)
    table.add_column("counted as")
    for row in p.memory_rows:
        table.add_row(f"  {row.item}", f"{row.bytes / planning.GIB:,.2f}", row.detail)
    device = ("(no device limit on CPU)" if p.memory.device_bytes is None else
              f"of {p.memory.device_bytes / planning.GIB:,.2f} on the {p.gpu_type} "
              f"({p.memory.peak / p.memory.device_bytes:.0%})")
    table.add_row("  [bold]estimated peak[/bold]", f"[bold]{p.memory.peak / planning.GIB:,.2f}"
                  "[/bold]", device)
    out.print(table)
    if p.memory_warning:
        out.print(f"  [bold yellow]warning:[/bold yellow] {p.memory_warning}")


# -- help text ---------------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def reflow(text: str) -> str:
    """Help text with each prose paragraph on one line, for the terminal to wrap.

    Typer's rich markup mode prints a docstring's line breaks as they are (but for the first
    paragraph of a command's own --help), so a docstring wrapped at 100 columns would show its
    breaks. A paragraph with an indented or bulleted line (examples, lists) or marked ``\\b``
    (click's "keep as is") stays as written.
    """
    paragraphs = _PARAGRAPH_BREAK.split(inspect.cleandoc(text))
    return "\n\n".join(p if _literal(p) else " ".join(line.strip() for line in p.splitlines())
                       for p in paragraphs)


def _literal(paragraph: str) -> bool:
    return paragraph.startswith("\b") or any(
        line[:1].isspace() or line.startswith(("- ", "* ")) for line in paragraph.splitlines())


def reflow_help(typer_app: typer.Typer) -> None:
    """:func:`reflow` the help of every command of ``typer_app`` and of its sub-apps (before
    Typer builds the click commands, which it does on each call of the app)."""
    for info in typer_app.registered_commands:
        text = info.help if info.help is not None else inspect.getdoc(info.callback)
        if text:
            info.help = reflow(text)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


reflow_help(app)


def main() -> None:
    """Console-script entry: unexpected failures exit 1 with one line (traceback with PROLONG_DEBUG)."""
    try:
        app()
    except Exception as exc:  # the last line of defence of a CLI
        if os.environ.get("PROLONG_DEBUG"):
            raise
        err.print(f"prolongctl: {type(exc).__name__}: {exc}", markup=False)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
