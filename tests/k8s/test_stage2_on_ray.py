"""Stage 2 of the quickstart, submitted on its own as ``prolongctl submit stage2.yaml`` renders it,
trains from stage 1 when its RayJob's entrypoint runs on a real Ray cluster.

Both stages are rendered by the product (:func:`prolong.k8s.target.stage_target`, what submit
creates), their ConfigMaps' files are written where the head pod mounts them, and each RayJob's
own ``spec.entrypoint`` runs as a Ray job with the RayJob's ``jobId`` as submission id and the
head container's environment: what KubeRay's submitter does in K8sJobMode. One local head node
(token auth on, the fixture of tests/test_cli_submit.py) runs both. The pipeline is the shortened
quickstart of tests/test_quickstart.py (a few steps per stage).

The one difference from a pod: the ConfigMap is mounted at the head container's mountPath
(/etc/prolong); here its files are in a temporary directory, and the entrypoint's mount path is
replaced by that directory (read from the rendered pod, not retyped).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prolong.k8s.ray_backend import RayJobs
from prolong.k8s.rayjob import SPEC_MOUNT
from prolong.k8s.target import stage_target, upstream_state
from prolong.specfile import load
from prolong.stage.directory import StageDir, read_metrics, stage_complete
from prolong.stage.payload import STAGE_FILE
from tests import test_cli_submit
from tests.test_quickstart import shortened

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ray_head = test_cli_submit.ray_head  # one local head node with token auth, for this module


def head_container(rayjob: dict[str, Any]) -> dict[str, Any]:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def mount_configmap(configmap: dict[str, Any], rayjob: dict[str, Any], into: Path) -> str:
    """Write the ConfigMap's files into ``into`` and return the RayJob's entrypoint with the
    mount path of that ConfigMap in the head pod replaced by ``into``."""
    pod = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"]
                 if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]]
    (mount,) = [m for m in head_container(rayjob)["volumeMounts"] if m["name"] == volume["name"]]
    into.mkdir(parents=True)
    for name, text in configmap["data"].items():
        (into / name).write_text(text)
    entrypoint = rayjob["spec"]["entrypoint"]
    assert mount["mountPath"] in entrypoint, entrypoint
    return entrypoint.replace(mount["mountPath"], str(into))


def run_preparation(prep: dict[str, Any], etc: Path, spec_mount: str) -> None:
    """Run the stage's preparation Job as its pod would: each container's command in order
    (init containers first), with the ConfigMap's mount path replaced by ``etc`` (where
    :func:`mount_configmap` wrote its files) and the container's environment."""
    pod = prep["spec"]["template"]["spec"]
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        command = [arg.replace(spec_mount, str(etc)) for arg in container["command"]]
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        # The image's PATH starts with its venv (images/train/Dockerfile); here this one's.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{container['name']}: {done.stderr[-3000:]}"


def run_as_kuberay(ray: RayJobs, rayjob: dict[str, Any], entrypoint: str,
                   timeout: float) -> str:
    """Run the entrypoint on the head as KubeRay's submitter does; the job's final status and
    logs."""
    env = {e["name"]: e["value"] for e in head_container(rayjob)["env"] if "value" in e}
    sid = rayjob["spec"]["jobId"]
    ray.client.submit_job(entrypoint=entrypoint, submission_id=sid,
                          runtime_env={"env_vars": env})
    deadline = time.monotonic() + timeout
    while (status := str(ray.client.get_job_status(sid))) not in ("SUCCEEDED", "FAILED",
                                                                  "STOPPED"):
        assert time.monotonic() < deadline, f"Ray job {sid} still {status}: " + \
            ray.client.get_job_logs(sid)[-3000:]
        time.sleep(1)
    return status + "\n" + ray.client.get_job_logs(sid)


@pytest.mark.timeout(1200)
def test_stage2_submitted_alone_trains_from_stage1(ray_head, tmp_path: Path, kuberay,
                                                   quickstart_data: Path) -> None:
    url, token = ray_head
    ray = RayJobs(url, token)
    jobs = shortened(tmp_path, quickstart_data).parent
    stage1 = stage_target(load(jobs / "stage1.yaml"))
    stage2 = stage_target(load(jobs / "stage2.yaml"))
    assert stage2.upstream == {"stage1": stage1.ref}

    # Stage 1, through its own RayJob (as `submit stage1.yaml` creates it): its entrypoint
    # refuses data that its preparation Job has not prepared, so that Job runs first.
    configmap, rayjob = stage1.render()
    entrypoint = mount_configmap(configmap, rayjob, tmp_path / "etc1")
    run_preparation(stage1.preparation(), tmp_path / "etc1", SPEC_MOUNT)
    ran = run_as_kuberay(ray, rayjob, entrypoint, 600)
    assert ran.startswith("SUCCEEDED"), ran[-3000:]
    assert stage_complete(stage1.ref.directory)
    # What submit checks before it creates stage 2: its upstream's COMPLETE marker.
    assert upstream_state(stage1.ref, marker=True).done

    configmap, rayjob = stage2.render()
    assert not [e for e in kuberay["RayJob"].iter_errors(rayjob)]
    stage_json = json.loads(configmap["data"][STAGE_FILE])
    assert stage_json["upstreamStages"] == {
        "stage1": {"id": stage1.ref.id, "directory": stage1.ref.directory}}
    entrypoint = mount_configmap(configmap, rayjob, tmp_path / "etc2")
    run_preparation(stage2.preparation(), tmp_path / "etc2", SPEC_MOUNT)
    ran = run_as_kuberay(ray, rayjob, entrypoint, 400)
    assert ran.startswith("SUCCEEDED"), ran[-3000:]

    out = StageDir(stage2.ref.directory)
    assert out.is_complete() and Path(stage2.ref.directory).name.endswith(stage2.ref.id)
    manifest = out.read_manifest()
    assert manifest.upstream == [stage1.ref.id]
    assert (manifest.stage, manifest.id) == ("stage2", stage2.ref.id)
    steps = stage2.job.spec.steps
    assert manifest.steps == steps
    assert [r["step"] for r in read_metrics(out)] == list(range(1, steps + 1))
    # Started from stage 1's model: its tokenizer, and its weights. A random init's first loss
    # is about ln(vocabulary) (8.3 here); stage 1's four steps bring it to about 7.6, and stage
    # 2's first step starts there (7.3-7.6 measured), not from scratch.
    up = StageDir(stage1.ref.directory)
    tokenizer = (Path(up.final_uri) / "tokenizer.json").read_bytes()
    assert (Path(out.final_uri) / "tokenizer.json").read_bytes() == tokenizer
    from_scratch = math.log(len(json.loads(tokenizer)["model"]["vocab"]))
    first2, last1 = read_metrics(out)[0]["loss"], read_metrics(up)[-1]["loss"]
    assert first2 < from_scratch - 0.4 and last1 < from_scratch - 0.4, (first2, last1,
                                                                       from_scratch)
