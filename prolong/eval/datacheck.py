"""Check an eval's ``dataDir`` before any model is loaded: every file its tasks and lengths read
exists, parses, and holds records with the fields the loaders use.

A problem is bad input (:class:`~prolong.data.errors.DataError`: one line naming the file, the line
and the rule; ``prolongctl run`` exits 2), found in seconds instead of after a model load and
hours of generation on the tasks before it. Files follow prolong.eval.loaders' layout.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prolong.data.errors import DataError
from prolong.eval import loaders
from prolong.eval.sizing import Sizing, UnsupportedLength
from prolong.eval.tasks import HELMET_TASKS

RAG_FIELDS = ("question", "answers", "ctxs")
RERANK_FIELDS = ("qid", "query", "ctxs")
LONG_FIELDS = {
    "narrativeqa": ("document", "question", "answers"),
    "infbench_qa": ("context", "input", "answer"), "infbench_mc": ("context", "input", "answer"),
    "infbench_sum": ("context", "input", "answer"), "multi_lexsum": ("sources", "summary/short"),
}
ALCE_FIELDS = ("question", "docs")
ALCE_PROMPT_FIELDS = ("instruction", "demo_prompt", "doc_prompt", "demos")


def _fail(path: str, rule: str, line: int | None = None) -> DataError:
    where = f"{path}:{line}" if line is not None else path
    return DataError(f"{where}: {rule}")


def check_records(path: str, fields: tuple[str, ...], what: str) -> None:
    """Every record of ``path`` (.jsonl: one JSON object per line; .json: a list or
    {"data": [...]}) is an object with ``fields``."""
    if not os.path.isfile(path):
        raise _fail(path, f"missing ({what}; see prolong.eval.loaders for the layout)")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as exc:
                    raise _fail(path, f"not valid JSON ({exc.msg})", n) from None
        else:
            try:
                data = json.load(f)
            except ValueError as exc:
                raise _fail(path, f"not valid JSON ({exc.msg})", exc.lineno) from None
            if isinstance(data, dict) and "data" in data:
                data = data["data"]
            if not isinstance(data, list):
                raise _fail(path, "must hold a JSON list of records (or {\"data\": [...]})")
            rows = [(None, r) for r in data]
    if not rows:
        raise _fail(path, f"holds no records ({what})")
    for n, rec in rows:
        if not isinstance(rec, dict):
            raise _fail(path, "a record must be a JSON object", n)
        lacking = [k for k in fields if k not in rec]
        if lacking:
            raise _fail(path, f"record lacks {', '.join(lacking)} ({what} has "
                              f"{', '.join(fields)})", n)


def _files(task: str, length: int, data_dir: str, sizing: Sizing) -> list[tuple[str, tuple, str]]:
    """(path, required fields, description) of every file ``task`` reads at ``length``."""
    j = os.path.join
    category = HELMET_TASKS[task].category
    if category == "rag":
        test, demo = loaders.RAG_FILES[task]
        want = loaders.passages_for(task, length, sizing)
        try:
            path = loaders.k_file(data_dir, test, want, sizing)
        except loaders.MissingData as exc:
            raise DataError(f"{exc} (task {task} at {length})") from None
        return [(path, RAG_FIELDS, "HELMET's KILT RAG file"),
                (j(data_dir, demo), RAG_FIELDS, "HELMET's KILT demo file")]
    if task == "msmarco":
        want = loaders.passages_for(task, length, sizing)
        try:
            path = loaders.k_file(data_dir, loaders.RERANK_FILES[0], want, sizing)
        except loaders.MissingData as exc:
            raise DataError(f"{exc} (task msmarco at {length})") from None
        return [(path, RERANK_FIELDS, "HELMET's MS MARCO re-rank file"),
                (j(data_dir, loaders.RERANK_FILES[1]), RERANK_FIELDS, "MS MARCO demo file")]
    if category == "icl":
        return [(j(data_dir, f"icl/{task}/{split}.jsonl"), ("text",), f"the {task} {split} export")
                for split in ("train", "test")]
    if task == "narrativeqa":
        return [(j(data_dir, "narrativeqa/test.jsonl"), LONG_FIELDS[task], "the NarrativeQA export")]
    if task in loaders.INFBENCH_FILES:
        return [(j(data_dir, f"infbench/{loaders.INFBENCH_FILES[task]}.jsonl"), LONG_FIELDS[task],
                 "InfiniteBench's file")]
    if task == "multi_lexsum":
        return [(j(data_dir, "multi_lexsum/validation.jsonl"), LONG_FIELDS[task],
                 "the Multi-LexSum export")]
    name = task.removeprefix("alce_")
    data = next((p for p in (f"alce/{name}_eval_gtr_top2000.json",
                             f"alce/{name}_eval_gtr_top2000.jsonl")
                 if os.path.isfile(j(data_dir, p))), f"alce/{name}_eval_gtr_top2000.json")
    prompt = next((p for p in (f"alce/{name}_revised.json", f"prompts/{name}_revised.json")
                   if os.path.isfile(j(data_dir, p))), f"prompts/{name}_revised.json")
    return [(j(data_dir, data), ALCE_FIELDS, "HELMET's ALCE file"),
            (j(data_dir, prompt), ALCE_PROMPT_FIELDS, "HELMET's ALCE prompt file")]


def _check_prompt_file(path: str, fields: tuple[str, ...]) -> None:
    if not os.path.isfile(path):
        raise _fail(path, "missing (HELMET's ALCE prompt file: instruction, demo_prompt, "
                          "doc_prompt, demos)")
    try:
        with open(path, encoding="utf-8") as f:
            obj: Any = json.load(f)
    except ValueError as exc:
        raise _fail(path, f"not valid JSON ({exc.msg})", exc.lineno) from None
    lacking = [k for k in fields if not isinstance(obj, dict) or k not in obj]
    if lacking:
        raise _fail(path, f"lacks {', '.join(lacking)} (an ALCE prompt file has "
                          f"{', '.join(fields)})")


def check_data_dir(spec: Any) -> None:
    """Raise DataError for the first missing or malformed file an EvalSpec's tasks read."""
    released = [t for t in spec.tasks if not HELMET_TASKS[t].synthetic]
    if not released:
        return
    if not spec.data_dir or not os.path.isdir(spec.data_dir):
        raise DataError(f"dataDir {spec.data_dir}: not a directory (needed by "
                        f"{', '.join(released)})")
    sizing = Sizing(spec.sizing)
    seen: set[str] = set()
    for task in released:
        for length in spec.lengths:
            try:
                files = _files(task, length, spec.data_dir, sizing)
            except UnsupportedLength as exc:
                raise DataError(str(exc)) from None
            for path, fields, what in files:
                if path in seen:
                    continue
                seen.add(path)
                if fields is ALCE_PROMPT_FIELDS:
                    _check_prompt_file(path, fields)
                else:
                    check_records(path, fields, what)
