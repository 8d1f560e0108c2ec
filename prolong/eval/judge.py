"""Model-judge scores for NarrativeQA and summarization, through any OpenAI-compatible endpoint.

HELMET scores these tasks with GPT-4o (``scripts/eval_gpt4_longqa.py``, ``eval_gpt4_summ.py``);
``EvalJob.spec.judge`` names the endpoint (``<endpoint>/chat/completions``: vLLM, TGI, a hosted
API), the model and the secret with its key. The prompts are HELMET's own, read
at run time from a local checkout of princeton-nlp/HELMET (``judge.helmetDir``: the string
constants of its two judge scripts, :data:`PROMPT_SOURCES`); prolong does not ship HELMET's
text. The scores follow its formulas:

- **NarrativeQA**: one call; the judge's JSON gives fluency (0/1) and correctness (0-3); the
  sample scores fluency x correctness x 100/3 (HELMET's gpt-4-score, scaled as its
  collect_results.py does).
- **∞Bench Sum, Multi-LexSum**: three calls -- fluency (0/1), key-point recall (points found),
  precision (supported sentences, sentence count); recall = found / key points, precision =
  supported / sentences, and the sample scores fluency x F1(recall, precision) x 100
  (gpt-4-f1). ∞Bench uses the "book" variants; Multi-LexSum's precision is checked against the
  long summary. Key points come from HELMET's files (see prolong.eval.loaders).

A request that fails (HTTP error, timeout) or whose reply holds no parseable score is retried
``judge.retries`` times; a sample still without scores is **unjudged**: its score is None, the
reason and every raw reply are stored in its record, and aggregation leaves it out and counts it
(prolong.eval.harness) -- never a silent 0. ``judge.concurrency`` requests run at once.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_KEY_ENV = "JUDGE_API_KEY"
"""The environment variable holding the judge's API key (the key of ``apiKeySecretRef``)."""

QA_TASKS = ("narrativeqa",)
SUMM_TASKS = ("infbench_sum", "multi_lexsum")


class JudgeError(RuntimeError):
    """A request that brought back no reply (HTTP error, timeout, no message content), or judge
    prompts that cannot be read."""


PROMPT_SOURCES: dict[str, tuple[str, str]] = {
    "qa": ("scripts/eval_gpt4_longqa.py", "judge_prompt"),
    "fluency_lexsum": ("scripts/eval_gpt4_summ.py", "fluency_prompt"),
    "fluency_book": ("scripts/eval_gpt4_summ.py", "fluency_prompt_book"),
    "recall_lexsum": ("scripts/eval_gpt4_summ.py", "recall_prompt"),
    "recall_book": ("scripts/eval_gpt4_summ.py", "recall_prompt_book"),
    "precision_lexsum": ("scripts/eval_gpt4_summ.py", "precision_prompt"),
    "precision_book": ("scripts/eval_gpt4_summ.py", "precision_prompt_book"),
}
"""Each judge prompt (a str.format template): the HELMET script and the module-level string
that holds it (HELMET commit 4526dfb)."""


@functools.lru_cache(maxsize=8)
def load_prompts(helmet_dir: str) -> dict[str, str]:
    """HELMET's judge prompts from a checkout of princeton-nlp/HELMET, by :data:`PROMPT_SOURCES`.
    Read with ``ast`` (nothing of HELMET's is executed); JudgeError names the file and the
    string when one is missing."""
    trees: dict[str, ast.Module] = {}
    out = {}
    for name, (rel, var) in PROMPT_SOURCES.items():
        path = Path(helmet_dir) / rel
        if rel not in trees:
            try:
                trees[rel] = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError) as exc:
                raise JudgeError(f"{path}: cannot read HELMET's judge script ({type(exc).__name__}"
                                 "); judge.helmetDir must be a checkout of princeton-nlp/HELMET"
                                 ) from None
        value = next((node.value.value for node in trees[rel].body
                      if isinstance(node, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == var for t in node.targets)
                      and isinstance(node.value, ast.Constant)
                      and isinstance(node.value.value, str)), None)
        if value is None:
            raise JudgeError(f"{path}: no string {var} (HELMET's {name} judge prompt)")
        out[name] = value
    return out


@dataclass
class JudgeClient:
    """Chat completions over plain HTTP: one user message in, the reply's text out."""

    endpoint: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    temperature: float = 0.1
    max_tokens: int = 4096
    prompts: dict[str, str] = field(default_factory=dict)
    """HELMET's judge prompts by name (:func:`load_prompts`)."""

    @classmethod
    def from_spec(cls, judge: Any) -> JudgeClient:
        """From ``EvalJob.spec.judge``; the key is read from JUDGE_API_KEY when a secret is named."""
        key = os.environ.get(API_KEY_ENV) if judge.api_key_secret_ref else None
        if judge.api_key_secret_ref and not key:
            raise JudgeError(f"judge.apiKeySecretRef {judge.api_key_secret_ref}: {API_KEY_ENV} "
                             "is not set in the eval's environment")
        return cls(judge.endpoint, judge.model, key, judge.timeout_seconds, judge.temperature,
                   judge.max_tokens, load_prompts(str(Path(judge.helmet_dir).absolute())))

    def ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint.rstrip("/") + "/chat/completions", body,
                                     headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
            content = data["choices"][0]["message"]["content"]
        except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError,
                IndexError, TypeError) as exc:
            raise JudgeError(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(content, str):
            raise JudgeError("the reply has no message content")
        return content


def parse_scores(text: str, keys: Sequence[str]) -> dict[str, float] | None:
    """The last {...} of a reply (or a ```json block) as numbers for ``keys``, else None."""
    candidates = re.findall(r"\{.*?\}", text, re.DOTALL)[-1:]
    candidates += re.findall(r"```json(.+?)```", text, re.DOTALL)[-1:]
    for raw in candidates:
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict) and all(isinstance(obj.get(k), int | float)
                                         and not isinstance(obj.get(k), bool) for k in keys):
            return {k: float(obj[k]) for k in keys}
    return None


def qa_answer(output: str, prefix: str = "Answer:") -> str:
    """What HELMET shows its QA judge: the output on one line, after the answer prefix when it
    repeats it (and after a second copy of the prefix)."""
    flat = output.replace("\n", " ")
    m = re.search(f"(?:{re.escape(prefix)})(.*)$", flat, flags=re.IGNORECASE)
    text = (m.group(1) if m else flat).strip()
    return re.sub(f"^{re.escape(prefix)}", "", text, flags=re.IGNORECASE).strip()


@dataclass(frozen=True)
class Call:
    prompt: str
    keys: tuple[str, ...]


def calls_for(record: dict[str, Any], prompts: dict[str, str]) -> list[Call] | str:
    """The judge calls of one record, or why it cannot be judged."""
    inputs = record.get("judge_inputs") or {}
    if record["task"] in QA_TASKS:
        prompt = prompts["qa"].format(question=inputs.get("question", ""),
                                              correct_answers=record["answers"],
                                              parsed_output=qa_answer(record["output"]))
        return [Call(prompt, ("fluency", "correctness"))]
    keypoints = inputs.get("keypoints")
    if not keypoints:
        return "no key points for this sample (HELMET's key-point file is missing or lacks it)"
    kind = "book" if record["task"] == "infbench_sum" else "lexsum"
    summary = record["output"].strip()
    points = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(keypoints))
    return [Call(prompts[f"fluency_{kind}"].format(text=summary), ("fluency",)),
            Call(prompts[f"recall_{kind}"].format(keypoints=points, summary=summary),
                 ("recall",)),
            Call(prompts[f"precision_{kind}"].format(
                expert_summary=inputs.get("expert_summary") or "", summary=summary),
                ("precision", "sentence_count"))]


def qa_score(s: dict[str, float]) -> float:
    """HELMET's gpt-4-score of one sample, 0-100."""
    return s["fluency"] * s["correctness"] * 100 / 3


def summ_score(fluency: dict[str, float], recall: dict[str, float],
               precision: dict[str, float], keypoints: int) -> dict[str, float]:
    """HELMET's gpt-4-f1 of one sample (``f1``, 0-100) and its parts."""
    rec = recall["recall"] / keypoints if keypoints > 0 else 0.0
    count = precision["sentence_count"]
    prec = precision["precision"] / count if count > 0 else 0.0
    f1 = fluency["fluency"] * 2 * rec * prec / (rec + prec) if rec + prec > 0 else 0.0
    return {"fluency": fluency["fluency"], "recall": rec, "precision": prec, "f1": 100 * f1}


def _ask_until_parsed(ask: Callable[[str], str], call: Call, retries: int
                      ) -> tuple[dict[str, float] | None, list[dict[str, str]]]:
    attempts: list[dict[str, str]] = []
    for _ in range(retries + 1):
        try:
            reply = ask(call.prompt)
        except JudgeError as exc:
            attempts.append({"error": str(exc)})
            continue
        attempts.append({"reply": reply})
        scores = parse_scores(reply, call.keys)
        if scores is not None:
            return scores, attempts
    return None, attempts


def judge_record(record: dict[str, Any], ask: Callable[[str], str], retries: int,
                 model: str, prompts: dict[str, str]) -> None:
    """Score one record in place: ``score`` and ``metric`` from the judge, or ``score`` None and
    ``judge.unjudged`` with the reason. Every raw reply is kept under ``judge.attempts``."""
    calls = calls_for(record, prompts)
    standin = record["score"]
    record["judge"] = {"model": model, "standin_score": standin}
    if isinstance(calls, str):
        record.update(score=None, metric=_metric(record))
        record["judge"]["unjudged"] = calls
        return
    results, attempts = [], []
    for call in calls:
        scores, tried = _ask_until_parsed(ask, call, retries)
        attempts.append(tried)
        results.append(scores)
    record["judge"]["attempts"] = attempts
    record["metric"] = _metric(record)
    if any(r is None for r in results):
        record["score"] = None
        record["judge"]["unjudged"] = (f"no parseable score after {retries + 1} attempts "
                                       "(see attempts)")
        return
    if record["task"] in QA_TASKS:
        record["judge"]["scores"] = results[0]
        record["score"] = qa_score(results[0])
    else:
        parts = summ_score(*results, keypoints=len(record["judge_inputs"]["keypoints"]))
        record["judge"]["scores"] = {**results[1], **results[2], **parts}
        record["score"] = parts["f1"]


def _metric(record: dict[str, Any]) -> str:
    return "judge_qa" if record["task"] in QA_TASKS else "judge_summ"


def judge_records(records: list[dict[str, Any]], client: JudgeClient, *, concurrency: int = 8,
                  retries: int = 3, log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Judge every record of a judged task (in place), ``concurrency`` at a time; returns counts
    of judged and unjudged samples."""
    todo = [r for r in records if "judge_inputs" in r and "skipped" not in r]
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(lambda r: judge_record(r, client.ask, retries, client.model,
                                             client.prompts), todo))
    unjudged = sum(r["score"] is None for r in todo)
    if log is not None and todo:
        log(f"judge {client.model}: {len(todo) - unjudged} samples judged, {unjudged} unjudged")
    return {"judged": len(todo) - unjudged, "unjudged": unjudged}

