"""``prolongctl model ...``: stage a job's model and tokenizer once (mounted by prolong.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from prolong.cli_errors import EXIT_BAD_INPUT, err, user_errors

model_app = typer.Typer(help="Stage models and tokenizers to storage, once, for the workers.",
                        no_args_is_help=True, add_completion=False)


@model_app.callback()
def _group() -> None:
    """Stage models and tokenizers to storage, once, for the workers."""
    # A callback keeps `stage` a sub-command while it is the only one.


@model_app.command("stage")
def stage(
    file: Annotated[Path, typer.Argument(help="Job or pipeline spec file (YAML).")],
    force: Annotated[bool, typer.Option("--force", help="Stage again over a finished copy.")]
    = False,
) -> None:
    """Copy each stage's model.source to model.stagedPath (and a tokenizer with its own source
    to its stagedPath), atomically; already staged copies are kept. A hub id needs
    model.allowHub, and a gated one HF_TOKEN in the environment.

    \b
    Examples:
      prolongctl model stage jobs/prolong-8b/pipeline.yaml
    """
    from prolong.model.staging import StagingError, hub_token, stagings
    from prolong.model.staging import stage as stage_one
    from prolong.specfile import load

    console = Console(highlight=False, soft_wrap=True)
    with user_errors():
        loaded = load(file)
    done: set[tuple[str, str]] = set()
    try:
        for name, job in loaded.jobs.items():
            if job.spec.model.staged_path is None and not _tokenizer_staged(job.spec):
                continue
            for item in stagings(job.spec):
                if (item.source, item.target) in done:
                    continue
                done.add((item.source, item.target))
                copied = stage_one(item, token=hub_token(), force=force)
                console.print(f"{name}: {item.what} {item.source} -> {item.target}"
                              f"{'' if copied else ' (already staged)'}")
    except StagingError as exc:
        err.print(f"{file}: {exc}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if not done:
        err.print(f"{file}: model.stagedPath: no stage sets it, so there is nothing to stage",
                  markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)


def _tokenizer_staged(spec) -> bool:
    tok = spec.data.tokenizer if getattr(spec, "data", None) is not None else spec.tokenizer
    return tok.staged_path is not None
