"""The Job Submission path's handling of a head whose job agent is not up yet (Ray answers 500
"No available agent to submit job" for seconds after a head starts)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from prolong.k8s.ray_backend import AGENT_NOT_READY, submit_when_agent_ready

REFUSAL = RuntimeError(f"Request failed with status code 500: {AGENT_NOT_READY}, please try "
                       "again later..")


def sender(answers: list[object]):
    calls = []

    def send():
        calls.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    return send, calls


def test_a_head_without_its_agent_is_asked_again_until_it_takes_the_job():
    out, slept = io.StringIO(), []
    send, calls = sender([REFUSAL, REFUSAL, "raysubmit_1"])
    got = submit_when_agent_ready(send, Console(file=out, width=120), sleep=slept.append)
    assert got == "raysubmit_1" and len(calls) == 3
    assert slept == [1.0, 2.0]
    assert out.getvalue().count("job agent is not up yet") == 2


def test_other_errors_and_a_head_that_never_gets_its_agent_are_not_retried_forever():
    send, calls = sender([RuntimeError("Request failed with status code 400: bad entrypoint")])
    with pytest.raises(RuntimeError, match="400"):
        submit_when_agent_ready(send, Console(file=io.StringIO()), sleep=lambda s: None)
    assert len(calls) == 1
    send, calls = sender([REFUSAL] * 4)
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_when_agent_ready(send, Console(file=io.StringIO()), waits=(0.1, 0.2, 0.3),
                                sleep=lambda s: None)
    assert len(calls) == 4
