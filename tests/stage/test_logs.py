"""Worker output into <stage dir>/logs/: file descriptors 1 and 2, child processes included."""

from __future__ import annotations

import subprocess
import sys

from prolong.stage.logs import LOG_MODE_ENV, logs_dir, output_to, stage_output


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
