"""Reading spec files: YAML -> validated objects, with errors that name file, field and rule.

A pipeline file in ``jobs/`` may reference its stage files (``ref: stage1-64k.yaml``); loading it
inlines them, so a resolved pipeline always carries one copy of each number (the same object is
what ``render``/``submit`` put into the custom resource).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prolong.spec import (
    API_VERSION,
    JOB_KINDS,
    KIND_MODELS,
    KINDS,
    STAGE_TAGS,
    Document,
    Job,
    ProLongPipeline,
    RefStage,
    SpecError,
    SpecIssue,
    all_field_aliases,
    check_job,
    check_pipeline,
    did_you_mean,
    field_aliases_at,
)
from prolong.stage.names import stage_job_name


@dataclass(frozen=True)
class Loaded:
    """A validated document. For a pipeline, ``pipeline`` has every stage inline and ``jobs`` maps
    stage names to standalone job objects (named ``<pipeline>-<stage>``)."""

    path: str
    document: Document
    jobs: dict[str, Job]

    @property
    def is_pipeline(self) -> bool:
        return isinstance(self.document, ProLongPipeline)


def load(path: str | Path) -> Loaded:
    """Load and fully validate a spec file (structure and recipe rules). Raises SpecError."""
    path = str(path)
    raw = read_yaml(path)
    doc = parse_document(raw, file=path)
    if isinstance(doc, ProLongPipeline):
        pipeline, jobs = resolve_pipeline(doc, raw, file=path)
        return Loaded(path, pipeline, jobs)
    issues = [i.located(file=path) for i in check_job(doc)]
    if issues:
        raise SpecError(issues)
    return Loaded(path, doc, {doc.metadata.name: doc})


def read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue("", "file not found", file=path)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecIssue("", f"cannot read: {exc}", file=path)]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([SpecIssue(where, f"invalid YAML: {problem}", file=path)]) from None
    if not isinstance(data, dict):
        raise SpecError([SpecIssue("", "a spec file must be a YAML mapping with apiVersion, kind, "
                                   "metadata and spec", type(data).__name__, file=path)])
    return data


def parse_document(data: dict[str, Any], *, file: str | None = None) -> Document:
    """Structural validation of one object (no recipe rules)."""
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KIND_MODELS:
        hint = did_you_mean(str(kind), KINDS)
        rule = f"unknown kind; expected one of {', '.join(KINDS)}{hint}"
        raise SpecError([SpecIssue("kind", rule, kind, file=file)])
    if data.get("apiVersion") != API_VERSION:
        raise SpecError([SpecIssue("apiVersion", f"must be {API_VERSION}", data.get("apiVersion"),
                                   file=file)])
    try:
        return KIND_MODELS[kind].model_validate(data)
    except ValidationError as exc:
        raise SpecError(issues_from_validation(exc, file=file)) from None


def issues_from_validation(exc: ValidationError, *, file: str | None = None,
                           prefix: str = "") -> list[SpecIssue]:
    """Turn pydantic's errors into SpecIssues with dotted camelCase paths.

    A misspelled field shows up twice in pydantic (an unknown field and a missing one); the typo,
    with its suggestion, explains both, so it comes first and the matching "missing" is dropped.
    """
    typos: list[SpecIssue] = []
    explained: set[str] = set()
    rest: list[SpecIssue] = []
    aliases = None
    for err in exc.errors(include_url=False):
        path = _format_loc(err["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        kind = err["type"]
        rule = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if kind == "extra_forbidden":
            # The fields of the section the typo is in, else (a path that leads to no model)
            # every field name any section accepts.
            here = (field_aliases_at(KIND_MODELS[exc.title], tuple(err["loc"][:-1]))
                    if exc.title in KIND_MODELS else None)
            aliases = aliases if aliases is not None else all_field_aliases()
            name = str(err["loc"][-1])
            match = difflib.get_close_matches(name, here if here is not None else aliases, n=1,
                                              cutoff=0.6)
            if match:
                parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
                explained.add(parent + match[0])
            hint = f" (did you mean {match[0]}?)" if match else ""
            typos.append(SpecIssue(path, "unknown field" + hint, file=file))
        elif kind == "missing":
            rest.append(SpecIssue(path, "required field is missing", file=file))
        elif isinstance(value, dict | list) or kind in ("model_type", "invalid_stage"):
            rest.append(SpecIssue(path, rule, file=file))
        else:
            rest.append(SpecIssue(path, _lowercase_first(rule), value, file=file))
    rest = [i for i in rest if not (i.rule == "required field is missing" and i.path in explained)]
    return typos + rest


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2].isalpha() and not text[:2].isupper() else text


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _format_loc(loc: tuple[Any, ...]) -> str:
    """``spec.data.streams[2].proportion``; a key that is not a plain name (a typo can be
    anything, a newline included) is quoted and escaped, so a path always fits on one line."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in STAGE_TAGS or str(item).startswith("function-"):
            continue  # discriminated-union branch names are not part of the user's path
        elif not _PLAIN_KEY.match(str(item)):
            parts.append(f"[{json.dumps(str(item))}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def resolve_pipeline(doc: ProLongPipeline, raw: dict[str, Any],
                     *, file: str) -> tuple[ProLongPipeline, dict[str, Job]]:
    """Inline ``ref`` stages (relative to ``file``), validate every stage job and the rules
    between stages. ``raw`` is the document as parsed from YAML. Raises SpecError."""
    base = Path(file).parent
    issues: list[SpecIssue] = []
    stages_out: list[dict[str, Any]] = []
    jobs: dict[str, Job] = {}
    raw_stages = raw["spec"]["stages"]
    for i, stage in enumerate(doc.spec.stages):
        where = f"spec.stages[{i}]"
        if isinstance(stage, RefStage):
            ref_path = str(base / stage.ref)
            if not Path(ref_path).is_file():
                # The fault is in the pipeline file's field, not in a file that is not there.
                issues.append(SpecIssue(f"{where}.ref", f"file not found: {ref_path}", stage.ref,
                                        file=file))
                continue
            try:
                ref_raw = read_yaml(ref_path)
                job = parse_document(ref_raw, file=ref_path)
            except SpecError as err:
                issues += err.issues
                continue
            if job.kind not in JOB_KINDS:
                issues.append(SpecIssue(f"{where}.ref", f"must name a job file ({', '.join(JOB_KINDS)})",
                                        stage.ref, file=file))
                continue
            issues += [i_.located(file=ref_path) for i_ in check_job(job)]
            stage_dict = {"name": stage.name, "kind": job.kind,
                          "spec": job.spec.model_dump(mode="json", by_alias=True)}
        else:
            stage_dict = raw_stages[i]
            # Validated under the pipeline's own name (already within the name limit); the
            # stage job's longer <pipeline>-<stage> name is set below without re-validation.
            job = KIND_MODELS[stage.kind].model_validate({
                "apiVersion": API_VERSION, "kind": stage.kind,
                "metadata": {"name": doc.metadata.name},
                "spec": stage.spec.model_dump(by_alias=True)})
            issues += [i_.located(file=file, prefix=f"spec.stages[{i}]") for i_ in check_job(job)]
        jobs[stage.name] = _stage_job(job, stage_job_name(doc.metadata.name, stage.name),
                                      doc.metadata.labels)
        stages_out.append(stage_dict)
    if issues:
        raise SpecError(issues)
    resolved = ProLongPipeline.model_validate({
        "apiVersion": API_VERSION, "kind": "ProLongPipeline",
        "metadata": doc.metadata.model_dump(by_alias=True),
        "spec": {**doc.spec.model_dump(by_alias=True, exclude={"stages"}), "stages": stages_out},
    })
    issues = [i_.located(file=file) for i_ in check_pipeline(resolved, jobs)]
    if issues:
        raise SpecError(issues)
    return resolved, jobs


def pipeline_from_resource(body: dict[str, Any]) -> tuple[ProLongPipeline, dict[str, Job]]:
    """A ProLongPipeline custom resource as read from the cluster -> the validated pipeline and
    its stage jobs. In the cluster every stage is inline (render/submit inline them), so a
    ``ref`` stage is an issue here. Raises SpecError."""
    meta = body.get("metadata") or {}
    raw = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": {"name": meta.get("name"), "labels": meta.get("labels") or {}},
           "spec": body.get("spec") or {}}
    doc = parse_document(raw)
    if not isinstance(doc, ProLongPipeline):
        raise SpecError([SpecIssue("kind", "must be ProLongPipeline", doc.kind)])
    refs = [SpecIssue(f"spec.stages[{i}].ref", "a pipeline in the cluster has its stages inline "
                      "(prolongctl render/submit inline them)", s.ref)
            for i, s in enumerate(doc.spec.stages) if isinstance(s, RefStage)]
    if refs:
        raise SpecError(refs)
    return resolve_pipeline(doc, raw, file="")


GITOPS_LABEL_PREFIXES = ("kustomize.toolkit.fluxcd.io/", "helm.toolkit.fluxcd.io/",
                         "argocd.argoproj.io/")
"""Labels a GitOps tool puts on the pipeline it applied: never passed on to the stages' objects
(the tool would take the operator's RayJobs for its own)."""


def _stage_job(job: Job, name: str, pipeline_labels: dict[str, str]) -> Job:
    """A stage's job named ``name``, with the pipeline's labels under its own (they reach the
    stage's RayJob and pods)."""
    inherited = {k: v for k, v in pipeline_labels.items()
                 if not k.startswith(GITOPS_LABEL_PREFIXES)}
    meta = job.metadata.model_copy(update={"name": name,
                                           "labels": {**inherited, **job.metadata.labels}})
    return job.model_copy(update={"metadata": meta})


def dump_yaml(doc: Document) -> str:
    """The resolved object (defaults filled in) as YAML, in the file's own field names."""
    data = doc.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, width=100)

