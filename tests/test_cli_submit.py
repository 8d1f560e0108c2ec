"""prolongctl submit / status / logs / delete through the Ray Job Submission API, against a real
local Ray cluster (``ray start --head`` with the dashboard, token auth on), plus the parts of the
commands that need no cluster.

The cluster runs in its own session (process group) under a short temporary directory, with its
own token file; teardown ends that process group only (``ray stop`` would stop every Ray instance
of this user on the machine, not just this one).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.k8s.backend import submission
from prolong.k8s.ray_backend import normalise_address, ray_submission_id, ray_token
from prolong.specfile import load
from prolong.stage.directory import StageDir
from tests.conftest import JOBS, REPO, job_dict

runner = CliRunner()
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_pids(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pgid]


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, str]]:
    """(dashboard URL, token) of a fresh head node with token auth on."""
    tmp = tempfile.mkdtemp(prefix="prolong-ray-", dir="/tmp")  # short: Ray's socket paths
    token = secrets.token_hex(16)
    token_file = Path(tmp, "auth_token")
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    dashboard = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port=0", "--num-cpus=2",
           f"--dashboard-port={dashboard}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}",
           f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}",
           "--object-store-memory=500000000", "--disable-usage-stats"]
    log = open(Path(tmp, "ray-start.log"), "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:  # the job API answers once the head and its agent are up
            try:
                req = urllib.request.Request(f"{url}/api/jobs/",
                                             headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray start failed: " +
                                       Path(tmp, "ray-start.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield url, token
    finally:
        pids = _group_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10  # some of Ray's processes outlive SIGTERM for long
        while _group_pids(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reap ray start itself as soon as it exits
            time.sleep(0.5)
        if _group_pids(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()
        time.sleep(0.5)
        left = [p for p in pids if _alive(p)]
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


def tiny_stage(tmp_path: Path, data_dir: Path) -> Path:
    """quickstart stage 1 cut to 3 steps; its data prepared in ``data_dir`` (the session's
    quickstart_data fixture, shared with the other tests that train quickstart stages)."""
    job = job_dict("quickstart/stage1.yaml")
    spec = job["spec"]
    spec["steps"] = 3
    spec["checkpoint"] = {"everySteps": 3}
    spec["storage"] = {"root": str(tmp_path / "runs")}
    spec["data"]["preparedDir"] = str(data_dir)
    # The quickstart's base is relative to the checkout; the Ray job's working_dir holds only
    # the spec, and this local Ray cluster shares this machine's files.
    spec["model"]["source"] = str(REPO / spec["model"]["source"])
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def invoke(*args: str, **env: str):
    return runner.invoke(app, list(args), env=env or None)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_stage_runs_on_an_existing_ray_cluster(ray_head, tmp_path: Path,
                                                 quickstart_data: Path) -> None:
    url, token = ray_head
    path = tiny_stage(tmp_path, quickstart_data)
    sid = ray_submission_id(submission(load(path)))  # what submit sends

    refused = invoke("status", sid, "--ray-address", url, "--ray-token", "not-the-token")
    assert refused.exit_code == 1 and "token auth" in refused.stderr

    done = invoke("submit", str(path), "--ray-address", url, "--wait", "--interval", "1",
                  "--timeout", "300", RAY_AUTH_TOKEN=token)
    assert done.exit_code == 0, done.output
    assert f"submitted Ray job {sid}" in done.stderr
    assert f"Ray job {sid} succeeded" in done.stderr
    (stage_dir,) = (tmp_path / "runs" / "quickstart-stage1").iterdir()
    assert StageDir(str(stage_dir)).is_complete() and stage_dir.name.endswith(sid[-8:])

    again = invoke("submit", str(path), "--ray-address", url, RAY_AUTH_TOKEN=token)
    assert again.exit_code == 0 and "exists" in again.stderr and "SUCCEEDED" in again.stderr

    shown = invoke("status", str(path), "--ray-address", url, RAY_AUTH_TOKEN=token)
    assert shown.exit_code == 0, shown.output
    assert f"Ray job {sid} at {url}: SUCCEEDED" in shown.stdout and sid[-8:] in shown.stdout
    by_job = invoke("status", "quickstart-stage1", "--ray-address", url, RAY_AUTH_TOKEN=token)
    assert by_job.exit_code == 0 and sid in by_job.stdout

    logs = invoke("logs", sid, "--ray-address", url, "--ray-token", token)
    assert logs.exit_code == 0, logs.output
    assert "stage pretrain complete" in logs.stdout

    gone = invoke("delete", sid, "--ray-address", url, RAY_AUTH_TOKEN=token)
    assert gone.exit_code == 0, gone.output
    missing = invoke("status", sid, "--ray-address", url, RAY_AUTH_TOKEN=token)
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1


# -- no cluster needed --------------------------------------------------------------------

@pytest.mark.parametrize("command", ["submit", "status", "logs", "delete"])
def test_help_has_examples(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout and "prolongctl " + command \
        in result.stdout


def test_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert ray_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert ray_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_token() == "from-env" and ray_token("explicit") == "explicit"


def test_submission_ids_are_deterministic() -> None:
    stage = submission(load(JOBS / "quickstart/stage1.yaml"))  # what submit sends
    again = submission(load(JOBS / "quickstart/stage1.yaml"))
    assert ray_submission_id(stage) == ray_submission_id(again)
    assert ray_submission_id(stage).startswith("quickstart-stage1-")
    pipeline = ray_submission_id(submission(load(JOBS / "quickstart/pipeline.yaml")))
    assert pipeline.startswith("quickstart-") and len(pipeline) <= 47
    assert normalise_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"


def test_unreachable_ray_exits_1_with_one_line() -> None:
    result = invoke("status", "x", "--ray-address", f"http://127.0.0.1:{_free_port()}")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1


def test_no_kubernetes_config_exits_1_with_one_line(tmp_path: Path) -> None:
    result = invoke("status", "x", KUBECONFIG=str(tmp_path / "missing"))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("no Kubernetes cluster configured")
