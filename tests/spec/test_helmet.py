"""prolong.spec.helmet, the spec's copy of the HELMET task names, agrees with prolong.eval.tasks."""

from __future__ import annotations

from prolong.eval.tasks import HELMET_TASKS
from prolong.spec.helmet import HELMET_TASK_SYNTHETIC


def test_helmet_task_names_and_synthetic_flags_match_the_eval_table():
    # Same names, same order (did_you_mean breaks ties by order), same synthetic flag: a task added
    # to or changed in prolong.eval.tasks must be added to or changed in prolong.spec.helmet too.
    assert list(HELMET_TASK_SYNTHETIC.items()) == [(n, t.synthetic) for n, t in HELMET_TASKS.items()]
    assert all(type(v) is bool for v in HELMET_TASK_SYNTHETIC.values())
