"""Worker output into <stage dir>/logs/: file descriptors 1 and 2, child processes included."""

from __future__ import annotations

import subprocess
import sys

from prolong.stage.logs import (
    LOG_MODE_ENV,
    POD_STDOUT,
    TEE_ENV,
    logs_dir,
    output_to,
    stage_output,
)


def test_output_to_catches_python_and_native_output(tmp_path, capfd):
    path = tmp_path / "logs" / "worker.log"
    with output_to(path):
        print("from python")
        print("to stderr", file=sys.stderr)
        subprocess.run([sys.executable, "-c", "import os; os.write(1, b'from a child\\n')"],
                       check=True)
    print("after")
    text = path.read_text()
    assert "from python" in text and "to stderr" in text and "from a child" in text
    out, err = capfd.readouterr()
    assert "from python" not in out + err and "after" in out


def test_stage_output_follows_the_log_mode(tmp_path, monkeypatch):
    stage = str(tmp_path / "p" / "s-1")
    monkeypatch.setenv(LOG_MODE_ENV, "files")
    with stage_output(stage, "worker-rank000") as path:
        print("hello")
    assert path == logs_dir(stage) / "worker-rank000.log" and "hello" in path.read_text()
    monkeypatch.setenv(LOG_MODE_ENV, "console")
    with stage_output(stage, "worker-rank001") as path:
        pass
    assert path is None
    assert logs_dir("s3://bucket/p/s-1") is None


def test_on_kubernetes_the_log_is_copied_to_the_pods_stdout(tmp_path, monkeypatch):
    """$PROLONG_WORKER_TEE (the rendered pods set /proc/1/fd/1, the container's stdout): every
    line also goes there, prefixed with the worker's name; the file keeps it all as before."""
    from prolong.k8s.rayjob import render_standalone
    from prolong.specfile import load
    from tests.conftest import JOBS

    pod_stdout = tmp_path / "pod-stdout"
    stage = str(tmp_path / "p" / "s-1")
    monkeypatch.setenv(LOG_MODE_ENV, "files")
    monkeypatch.setenv(TEE_ENV, str(pod_stdout))
    with stage_output(stage, "worker-rank002") as path:
        print("step 1 loss 7.5")
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'nccl: ring 0\\n')"],
                       check=True)
        print("no newline at the end", end="")
    assert "step 1 loss 7.5" in path.read_text() and "nccl: ring 0" in path.read_text()
    assert pod_stdout.read_text().splitlines() == [
        "[worker-rank002] step 1 loss 7.5", "[worker-rank002] nccl: ring 0",
        "[worker-rank002] no newline at the end"]
    # What the rendered pods set.
    _, rayjob = render_standalone(load(JOBS / "prolong-8b/stage1-64k.yaml").document)
    rc = rayjob["spec"]["rayClusterSpec"]
    for group in (rc["headGroupSpec"], *rc["workerGroupSpecs"]):
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env[TEE_ENV] == POD_STDOUT == "/proc/1/fd/1"


def test_a_pod_stdout_nobody_reads_never_stalls_the_worker(tmp_path, monkeypatch):
    """A full pipe as the tee target (its reader stalled): the worker finishes, the file has it
    all."""
    import os
    import threading

    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    monkeypatch.setenv(LOG_MODE_ENV, "files")
    monkeypatch.setenv(TEE_ENV, str(fifo))
    done = threading.Event()

    def work() -> None:
        with stage_output(str(tmp_path / "p" / "s-1"), "worker-rank000"):
            for i in range(3000):
                print(f"line {i:05d} " + "x" * 100)
        done.set()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    assert done.wait(60), "the worker stalled on a full pod stdout"
    os.close(reader)
    text = (tmp_path / "p" / "s-1" / "logs" / "worker-rank000.log").read_text()
    assert "line 02999" in text
