"""The model judge, round trip against a chat-completions server started here: the prompts of a
HELMET checkout go out (a stand-in checkout written here: prolong ships none of HELMET's text),
its formulas come back; a malformed reply is retried, a request that keeps timing out
leaves its sample unjudged (score None, counted, out of the mean -- never a silent 0)."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from prolong.eval.harness import aggregate, record
from prolong.eval.judge import (
    API_KEY_ENV,
    JudgeClient,
    JudgeError,
    judge_records,
    load_prompts,
    parse_scores,
    qa_answer,
)
from prolong.eval.samples import Sample
from prolong.spec import JudgeSpec


class Judge(BaseHTTPRequestHandler):
    """Replies by what the prompt is about; counts requests per topic."""

    seen: ClassVar[Counter] = Counter()
    auth: ClassVar[list[str]] = []

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "judge-1"
        Judge.auth.append(self.headers.get("Authorization", ""))
        prompt = body["messages"][0]["content"]
        if "who guards the stone" in prompt:
            topic = "good"
            Judge.seen[topic] += 1
            # first a reply without a score, then a proper one
            text = ("Let me think... the answer is right." if Judge.seen[topic] == 1 else
                    'Reasoning: matches.\n{"fluency": 1, "correctness": 3}')
        elif "where does the river go" in prompt:
            Judge.seen["slow"] += 1
            time.sleep(1.0)  # past the client's timeout, every time
            text = '{"fluency": 1, "correctness": 3}'
        elif "key points" in prompt.lower() and "Key points:" in prompt.split("Now, read")[-1]:
            Judge.seen["recall"] += 1
            text = 'Two are present.\nOutput: {"recall": 2}'
        elif "Expert summary:" in prompt.split("Now, read")[-1]:
            Judge.seen["precision"] += 1
            text = '```json\n{"precision": 3, "sentence_count": 4}\n```'
        else:
            Judge.seen["fluency"] += 1
            text = '{"fluency": 1}'
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())


# Our own short templates with HELMET's placeholders, laid out as HELMET's judge scripts are.
LONGQA = textwrap.dedent('''
    raise SystemExit("load_prompts must read this file, not run it")
    judge_prompt = """Judge the answer; reply {{"fluency": 0 or 1, "correctness": 0 to 3}}.

    Question: {question}
    Correct answers: {correct_answers}
    Answer: {parsed_output}
    """
''')
SUMM = textwrap.dedent('''
    fluency_prompt = """Is this text fluent? Reply {{"fluency": 0 or 1}}.
    Now, read the text.
    Text: {text}"""
    fluency_prompt_book = fluency_prompt
    recall_prompt = """How many key points does the summary hold? Reply {{"recall": n}}.
    Now, read the key points and the summary.
    Key points:
    {keypoints}
    Summary: {summary}"""
    recall_prompt_book = recall_prompt
    precision_prompt = """Which sentences does the expert summary support?
    Reply {{"precision": n, "sentence_count": m}}.
    Now, read the summaries.
    Expert summary: {expert_summary}
    Summary: {summary}"""
    precision_prompt_book = precision_prompt
''')


def helmet_checkout(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "eval_gpt4_longqa.py").write_text(LONGQA)
    # The *_book names are plain strings in HELMET; here they alias, so spell them out.
    text = SUMM.replace("fluency_prompt_book = fluency_prompt\n", "")
    text = text.replace("recall_prompt_book = recall_prompt\n", "")
    text = text.replace("precision_prompt_book = precision_prompt\n", "")
    for name in ("fluency_prompt", "recall_prompt", "precision_prompt"):
        body = text.split(f"{name} = ", 1)[1].split('"""', 2)[1]
        text += f'{name}_book = """{body}"""\n'
    (root / "scripts" / "eval_gpt4_summ.py").write_text(text)
    return root


@pytest.fixture()
def helmet(tmp_path) -> Path:
    return helmet_checkout(tmp_path / "HELMET")


@pytest.fixture()
def server():
    Judge.seen.clear()
    Judge.auth.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _qa(index: int, question: str, output: str) -> dict:
    s = Sample("narrativeqa", 8192, index, "prompt", ["the keeper"], 10, prefix="Answer:",
               extra={"question": question})
    return record(s, output)


def _summ() -> dict:
    s = Sample("multi_lexsum", 8192, 0, "prompt", ["short summary"], 10, prefix="Summary:",
               extra={"keypoints": ["a", "b", "c", "d"], "expert_summary": "the long summary"})
    return record(s, "The court ruled. The case settled. Fees were paid. It ended.")


def test_judge_round_trip_retries_then_reports_unjudged(server, helmet, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sekret")
    spec = JudgeSpec(endpoint=server, model="judge-1", api_key_secret_ref="judge-key",
                     helmet_dir=str(helmet), timeout_seconds=0.3, retries=1, concurrency=3)
    client = JudgeClient.from_spec(spec)
    records = [_qa(0, "who guards the stone?", "Answer: the keeper"),
               _qa(1, "where does the river go?", "to the sea"), _summ()]
    before = [r["score"] for r in records]
    assert all(r["metric"] == "rougeL_f1_standin" for r in records)  # stand-ins until judged
    counts = judge_records(records, client, concurrency=spec.concurrency, retries=spec.retries)
    good, slow, summ = records
    assert counts == {"judged": 2, "unjudged": 1}
    # malformed first reply: retried, the raw replies of both attempts kept
    assert Judge.seen["good"] == 2 and good["score"] == pytest.approx(100.0)
    assert [("reply" in a) for a in good["judge"]["attempts"][0]] == [True, True]
    assert good["metric"] == "judge_qa" and good["judge"]["standin_score"] == before[0]
    # timing out on every attempt: unjudged, not 0
    assert Judge.seen["slow"] == 2 and slow["score"] is None
    assert "no parseable score after 2 attempts" in slow["judge"]["unjudged"]
    assert all("error" in a for a in slow["judge"]["attempts"][0])
    # summary: fluency 1, recall 2/4, precision 3/4 -> F1 0.6 -> 60
    assert summ["score"] == pytest.approx(60.0) and summ["metric"] == "judge_summ"
    assert summ["judge"]["scores"]["recall"] == 0.5 and summ["judge"]["scores"]["precision"] == 0.75
    assert set(Judge.auth) == {"Bearer sekret"}
    res = aggregate(records, tasks=["narrativeqa", "multi_lexsum"], lengths=[8192])
    assert res["tasks"]["narrativeqa"]["by_length"]["8192"] == pytest.approx(100.0)  # 1 judged
    assert res["tasks"]["narrativeqa"]["unjudged"] == {"8192": 1}
    assert res["tasks"]["narrativeqa"]["metric"] == "judge_qa"
    assert res["unjudged"] == {"narrativeqa": {"8192": 1}}


def test_prompts_are_read_from_a_helmet_checkout_without_running_it(helmet, tmp_path):
    prompts = load_prompts(str(helmet))
    assert sorted(prompts) == ["fluency_book", "fluency_lexsum", "precision_book",
                               "precision_lexsum", "qa", "recall_book", "recall_lexsum"]
    filled = prompts["qa"].format(question="q?", correct_answers=["a"], parsed_output="x")
    assert filled.endswith("Question: q?\nCorrect answers: ['a']\nAnswer: x\n")
    assert "{text}" in prompts["fluency_book"]
    with pytest.raises(JudgeError, match=r"eval_gpt4_longqa\.py: cannot read HELMET's judge "
                                         r"script.*judge\.helmetDir"):
        load_prompts(str(tmp_path / "nowhere"))
    broken = helmet_checkout(tmp_path / "old")
    script = broken / "scripts" / "eval_gpt4_summ.py"
    script.write_text(script.read_text().replace("recall_prompt = ", "recall_p = "))
    with pytest.raises(JudgeError, match=r"eval_gpt4_summ\.py: no string recall_prompt "):
        load_prompts(str(broken))


def test_reply_parsing_and_the_answer_shown():
    assert parse_scores('x {"a": 1} y {"fluency": 1, "correctness": 2}',
                        ["fluency", "correctness"]) == {"fluency": 1.0, "correctness": 2.0}
    assert parse_scores('{"fluency": "high"}', ["fluency"]) is None
    assert parse_scores("no json here", ["fluency"]) is None
    assert qa_answer("Answer: Answer: the keeper\nmore") == "the keeper more"


def test_without_keypoints_a_summary_is_unjudged_not_zero(server, helmet):
    rec = _summ()
    rec["judge_inputs"]["keypoints"] = None
    judge_records([rec], JudgeClient(server, "judge-1", timeout=2,
                                     prompts=load_prompts(str(helmet))), retries=0)
    assert rec["score"] is None and "no key points" in rec["judge"]["unjudged"]
    assert sum(Judge.seen.values()) == 0


def test_a_named_secret_without_its_key_is_refused(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=API_KEY_ENV):
        JudgeClient.from_spec(JudgeSpec(endpoint="http://x/v1", model="m", helmet_dir="/h",
                                        api_key_secret_ref="judge-key"))


def test_an_eval_without_its_judge_key_stops_before_any_model_loads(monkeypatch, tmp_path,
                                                                    helmet):
    from prolong.data.errors import DataError
    from prolong.eval.job import run_eval_stage
    from prolong.spec import EvalJob
    from prolong.stage.identity import standalone_stage

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    job = EvalJob.model_validate({
        "apiVersion": "prolong.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "keyless"},
        "spec": {"model": {"source": str(tmp_path / "no-such-model")}, "tasks": ["json_kv"],
                 "lengths": [8192], "storage": {"root": str(tmp_path / "runs")},
                 "judge": {"endpoint": "http://judge/v1", "model": "m", "helmetDir": str(helmet),
                           "apiKeySecretRef": "judge-key"}}})
    with pytest.raises(DataError) as err:
        run_eval_stage(job, standalone_stage(job), None, use_ray=False, log=lambda _m: None)
    assert API_KEY_ENV in str(err.value) and "judge-key" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()  # nothing written, no model looked for
