"""prolongctl validate / show / plan: exit codes, one-line errors, and no tracebacks ever."""

from __future__ import annotations

import copy
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from prolong.cli import app, plan, reflow
from tests.conftest import JOBS, REPO, job_dict

runner = CliRunner()
ALL_JOB_FILES = sorted(str(p) for p in JOBS.glob("*/*.yaml"))


def run(*args: str):
    return runner.invoke(app, list(args))


def test_validate_all_recipe_files():
    result = run("validate", *ALL_JOB_FILES)
    assert result.exit_code == 0, result.output
    assert result.output.count("\nok  ") + result.output.startswith("ok  ") == len(ALL_JOB_FILES)


@pytest.mark.parametrize("case", ["broken_yaml", "string_for_number", "misspelled", "proportions_09"])
def test_malformed_files_exit_2_with_one_line(write_spec, case):
    data = job_dict("quickstart/stage1.yaml")
    if case == "broken_yaml":
        content, field = "apiVersion: prolong.dev/v1alpha1\nkind: [PretrainJob\n", "line 3"
    else:
        if case == "string_for_number":
            data["spec"]["globalBatchTokens"] = "lots"
            field = "spec.globalBatchTokens"
        elif case == "misspelled":
            data["spec"]["schedule"]["peakLr"] = data["spec"]["schedule"].pop("peakLR")
            field = "spec.schedule.peakLr"
        else:
            data["spec"]["data"]["streams"][0]["proportion"] = 0.2
            field = "spec.data.streams"
        content = data
    path = write_spec(content, f"{case}.yaml")
    result = run("validate", str(path))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"{path}: {field}"), lines[0]
    assert "Traceback" not in result.output


def test_validate_reports_each_file_and_fails_if_any_fails(write_spec):
    bad = job_dict("quickstart/stage1.yaml")
    bad["spec"]["steps"] = 0
    result = run("validate", ALL_JOB_FILES[0], str(write_spec(bad)))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 2


def test_verbose_lists_every_issue(write_spec):
    bad = job_dict("quickstart/stage1.yaml")
    bad["spec"]["steps"] = "x"
    bad["spec"]["seqLen"] = 4
    result = run("validate", "-v", str(write_spec(bad)))
    assert result.exit_code == 2
    assert "spec.steps" in result.output and "spec.seqLen" in result.output


def test_show_prints_resolved_spec_with_defaults():
    result = run("show", str(JOBS / "prolong-8b/pipeline.yaml"))
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    stages = resolved["spec"]["stages"]
    assert [s["name"] for s in stages] == ["stage1", "stage2", "sft", "eval"]
    assert stages[1]["spec"]["parallelism"]["sequenceParallel"] == 8
    assert stages[0]["spec"]["optimizer"]["eps"] == 1e-8  # a default, filled in


def test_plan_prints_the_recipe_budget():
    result = run("plan", str(JOBS / "prolong-8b/pipeline.yaml"))
    assert result.exit_code == 0, result.output
    text = result.output
    for stage, steps, tokens in (("stage1", "5,000", "20.97e9"), ("stage2", "2,500", "20.97e9"),
                                 ("sft", "250", "1.05e9")):
        row = next(line for line in text.splitlines() if line.startswith(stage + " "))
        assert steps in row and tokens in row, row
        assert re.search(r"\d[\d,]* *$", row), row  # GPU-hours column
    assert "document-causal" in text and "GPU-hours" in text
    # Each training stage's lockstep efficiency, and what more SP would give stage 1.
    assert len(re.findall(r"lockstep efficiency \d\.\d\d: mean / max row FLOPs", text)) == 3
    assert "lockstep efficiency at SP 2 / 4 / 8 (2 / 4 / 8 micro-batches per rank)" in text


def test_plan_summary_is_the_first_table_only():
    """The quickstart's first screen: one table, no per-stage memory breakdown."""
    full = run("plan", str(JOBS / "quickstart/pipeline.yaml")).output
    short = run("plan", str(JOBS / "quickstart/pipeline.yaml"), "--summary").output
    assert "memory per worker" in full and "memory per worker" not in short
    lines = short.strip().splitlines()
    assert full.startswith(short.rstrip()) and len(lines) == 3 + 6  # title, header, rule, stages
    assert [line.split()[0] for line in lines[3:]] == ["stage1", "stage2", "sft", "eval",
                                                      "sft-from-stage1", "eval-from-stage1"]


def test_plan_mfu_option_scales_hours():
    def hours(mfu: str) -> int:
        text = run("plan", str(JOBS / "prolong-8b/stage1-64k.yaml"), "--mfu", mfu).output
        return int(re.search(r"GPU-hours ([\d,]+)", text).group(1).replace(",", ""))
    assert hours("0.2") == pytest.approx(2 * hours("0.4"), abs=1)


def test_plan_of_invalid_file_exits_2(write_spec):
    result = run("plan", str(write_spec("kind: Nope\n")))
    assert result.exit_code == 2 and "unknown kind" in result.output


@pytest.mark.parametrize("command", ["validate", "show", "plan", "render"])
def test_help_has_examples(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Examples" in result.output


def test_help_reflows_docstring_paragraphs():
    """A docstring wrapped at 100 columns reads as one paragraph on a wide terminal; the
    examples keep their own lines."""
    source = inspect.getdoc(plan).splitlines()
    assert source[1] and not source[1][0].isspace()  # the first paragraph spans two lines
    spanning = " ".join(source[0].split()[-2:] + source[1].split()[:2])  # "rows per step, FLOPs"
    for args in (["plan", "--help"], ["--help"]):  # the command's help, the list of commands
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert any(spanning in line for line in result.output.splitlines()), result.output
    lines = [line.strip() for line in runner.invoke(app, ["plan", "--help"],
                                                    env={"COLUMNS": "200"}).output.splitlines()]
    assert "Examples" in lines and "prolongctl plan jobs/prolong-8b/pipeline.yaml" in lines


def test_reflow_keeps_examples_lists_and_verbatim_paragraphs():
    text = ("One sentence\n    over two lines.\n\n    [bold]Examples[/bold]\n\n"
            "      prolongctl plan a.yaml\n      prolongctl plan b.yaml\n\n"
            "    - a list\n    - of two\n\n    \b\n    kept\n    as is\n")
    assert reflow(text) == ("One sentence over two lines.\n\n[bold]Examples[/bold]\n\n"
                            "  prolongctl plan a.yaml\n  prolongctl plan b.yaml\n\n"
                            "- a list\n- of two\n\n\b\nkept\nas is")


def test_console_script_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: PretrainJob\napiVersion: prolong.dev/v1alpha1\nmetadata: {name: x}\nspec: 3\n")
    cmd = [sys.executable, "-m", "prolong.cli", "validate"]
    ok = subprocess.run([*cmd, str(JOBS / "quickstart/pipeline.yaml")], capture_output=True,
                        text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2 and failed.stderr.strip().startswith(f"{bad}: spec")
    assert "Traceback" not in failed.stderr


# ---- random mutations: validate or exit 2 naming a field, never a traceback -------------------

_SEEDS = ["quickstart/stage1.yaml", "quickstart/stage2.yaml", "quickstart/sft.yaml",
          "quickstart/eval.yaml", "prolong-8b/stage2-512k.yaml", "prolong-8b/eval.yaml"]
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**7, 10**9),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                               st.integers(), max_size=2))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, path, action, value, key):
    doc = copy.deepcopy(doc)
    if not path:
        return value if action == "replace" else doc
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if action == "delete":
        parent.pop(last)
    elif action == "replace":
        parent[last] = value
    elif action == "rename" and isinstance(parent, dict):
        parent[str(last) + key] = parent.pop(last)
    elif action == "add" and isinstance(parent[last], dict):
        parent[last][key or "extra"] = value
    return doc


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations_never_traceback(tmp_path_factory, data):
    seed = data.draw(st.sampled_from(_SEEDS))
    doc = job_dict(seed)
    path = data.draw(st.sampled_from(list(_paths(doc))))
    action = data.draw(st.sampled_from(["delete", "replace", "rename", "add"]))
    value = data.draw(_VALUES)
    key = data.draw(st.text(alphabet="abcxyzE_", min_size=1, max_size=3))
    mutated = _mutate(doc, path, action, value, key)
    out = Path(tmp_path_factory.mktemp("m")) / "job.yaml"
    out.write_text(yaml.safe_dump(mutated, sort_keys=False))
    result = run("validate", str(out))
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        line = result.output.strip()
        assert len(line.splitlines()) == 1
        # names the file and a field (or, for a non-mapping document, says what it must be)
        assert re.match(rf"{re.escape(str(out))}: ((apiVersion|kind|metadata|spec)\S*: |a spec file must)",
                        line), line


def test_render_prints_a_rayjob_for_stage2():
    result = run("render", str(JOBS / "prolong-8b/stage2-512k.yaml"), "-n", "training")
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(result.output))
    # The stage's preparation Job (CPU only) sits between its ConfigMap and its RayJob.
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job", "RayJob"]
    assert all(o["metadata"]["namespace"] == "training" for o in objects)
    workers = objects[2]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 8
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] in (8, "8")
