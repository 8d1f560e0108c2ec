"""RayJob rendering: valid for KubeRay and Kubernetes, the right shape for the recipe, stable names."""

from __future__ import annotations

import json
import math
import random
import re
import string
from pathlib import Path

import pytest
import yaml

from prolong.k8s import dump_all, render
from prolong.k8s.rayjob import (
    DRIVER_LOG_CONTAINER,
    ENTRYPOINT,
    KUBERAY_SUBMISSION_MODES,
    QUEUE_LABEL,
    SUBMITTER_CONTAINER,
    render_stage,
    render_standalone,
)
from prolong.plan import wall_hours
from prolong.spec import API_VERSION, PretrainJob, SpecError
from prolong.specfile import load, parse_document
from prolong.stage.identity import SCHEDULING_ONLY, pipeline_stages, stage_id, standalone_stage
from prolong.stage.names import RAYJOB_NAME_MAX, rayjob_name
from prolong.stage.payload import JOB_FILE, STAGE_FILE

REPO = Path(__file__).resolve().parents[2]
JOB_FILES = sorted((REPO / "jobs").glob("*/*.yaml"))
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
STAGE2 = REPO / "jobs" / "prolong-8b" / "stage2-512k.yaml"


def _all_renders():
    """(label, [ConfigMap, RayJob]) for every job file and every stage of every pipeline file."""
    out = []
    for path in JOB_FILES:
        loaded = load(path)
        if loaded.is_pipeline:
            for stage in loaded.jobs:
                out.append((f"{path.parent.name}/{stage}",
                            render_stage(loaded.document, loaded.jobs, stage, namespace="ml")))
        else:
            out.append((f"{path.parent.name}/{path.name}", render(loaded)))
    return out


ALL = _all_renders()


def assert_kuberay_accepts(spec: dict) -> None:
    """KubeRay's own checks of a RayJob that its CRD schema leaves out: the CEL rules of
    deletionStrategy and ValidateRayJobSpec / ValidateRayClusterSpec (validation.go, v1.7)."""
    rules = spec["deletionStrategy"]["deletionRules"]
    assert spec["shutdownAfterJobFinishes"] is False  # rules and shutdown are exclusive
    assert not spec.get("ttlSecondsAfterFinished")  # a TTL needs shutdownAfterJobFinishes
    ttl: dict[tuple[str, str], dict[str, int]] = {}
    for rule in rules:
        cond = {k: v for k, v in rule["condition"].items() if k != "ttlSeconds"}
        assert len(cond) == 1 and set(cond) <= {"jobStatus", "jobDeploymentStatus"}, cond
        key = next(iter(cond.items()))
        assert rule["policy"] not in ttl.setdefault(key, {}), f"duplicate rule {rule}"
        ttl[key][rule["policy"]] = rule["condition"]["ttlSeconds"]
    for key, by_policy in ttl.items():  # Workers <= Cluster <= Self
        order = [by_policy[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf")
                 if p in by_policy]
        assert order == sorted(order), (key, by_policy)
    # Every ending releases the GPUs: the job succeeded or failed, or the RayJob failed.
    assert {("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"),
            ("jobDeploymentStatus", "Failed")} <= {k for k, p in ttl.items()
                                                   if "DeleteWorkers" in p}
    assert spec["preRunningDeadlineSeconds"] >= 1
    assert spec.get("activeDeadlineSeconds", 1) > 0 and spec["backoffLimit"] >= 0
    if spec["submissionMode"] == "InteractiveMode":
        assert spec["backoffLimit"] == 0
    cluster = spec["rayClusterSpec"]
    if cluster["authOptions"]["mode"] == "token":
        major, minor, _ = map(int, cluster["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), "token auth needs Ray 2.52.0"
        assert not cluster["authOptions"].get("enableK8sTokenAuth")  # not for RayJobs


def _by_kind(objs):
    return {o["kind"]: o for o in objs}


def _worker(rayjob):
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def _with_kubernetes(path: Path, **k8s) -> PretrainJob:
    raw = yaml.safe_load(path.read_text())
    raw["spec"]["cluster"]["kubernetes"] = k8s
    return parse_document(raw)


@pytest.mark.parametrize(("label", "objs"), ALL, ids=[a for a, _ in ALL])
def test_rendered_objects_are_valid(label, objs, validate_object):
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob"]
    for obj in objs:
        validate_object(obj)
    cm, rj = objs
    spec = rj["spec"]
    # What KubeRay's CRD cannot check (no enum, no CEL) but its operator rejects.
    assert spec["submissionMode"] in KUBERAY_SUBMISSION_MODES
    assert_kuberay_accepts(spec)
    assert spec["entrypoint"] == ENTRYPOINT
    name = rj["metadata"]["name"]
    assert spec["jobId"] == name  # deterministic Ray submission id
    head_template = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    templates = [head_template, _worker(rj)["template"]]
    if spec["submissionMode"] == "K8sJobMode":
        # KubeRay's submitter Job: the stage's labels (the chart's NetworkPolicy admits only
        # labelled stage pods to a head's dashboard) and the restricted profile; no command, so
        # KubeRay fills in `ray job submit` and the token's environment.
        submitter = spec["submitterPodTemplate"]
        assert submitter["metadata"]["labels"] == head_template["metadata"]["labels"]
        (container,) = submitter["spec"]["containers"]
        assert container["name"] == SUBMITTER_CONTAINER and "command" not in container
        assert container["image"] == head_template["spec"]["containers"][0]["image"]
        assert submitter["spec"]["restartPolicy"] == "Never"
        templates.append(submitter)
    for pod in (t["spec"] for t in templates):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = pod["containers"][0]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert set(sc["capabilities"].get("add", [])) <= {"IPC_LOCK"}  # RDMA's one exception
    assert len(name) <= RAYJOB_NAME_MAX and DNS_1035.match(name), name
    assert cm["metadata"]["name"] == f"{name}-spec"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "prolong-spec", "configMap": {"name": cm["metadata"]["name"]}} in head["volumes"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    for label_key in ("prolong.dev/stage-id", "prolong.dev/pipeline", "prolong.dev/stage",
                      "app.kubernetes.io/name", "app.kubernetes.io/managed-by"):
        assert label_key in rj["metadata"]["labels"]


@pytest.mark.parametrize(("label", "objs"), ALL, ids=[a for a, _ in ALL])
def test_configmap_carries_a_loadable_spec_with_the_same_id(label, objs):
    cm, rj = objs
    job = parse_document(yaml.safe_load(cm["data"][JOB_FILE]))
    stage = json.loads(cm["data"][STAGE_FILE])
    # The engine recomputes the id from what it receives: it must be the id in the name.
    assert stage_id(job, tuple(stage["upstream"])) == stage["id"]
    assert rj["metadata"]["name"].endswith("-" + stage["id"])
    assert rj["metadata"]["labels"]["prolong.dev/stage-id"] == stage["id"]
    assert stage["directory"] == f"{stage['storageRoot'].rstrip('/')}/{stage['pipeline']}/" \
                                 f"{stage['stage']}-{stage['id']}"


def test_stage2_asks_for_eight_h100_nodes_with_shm_and_sp8():
    cm, rj = render(load(STAGE2))
    job = load(STAGE2).document
    nodes = job.spec.cluster.nodes
    worker = _worker(rj)
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == nodes == 8
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind]["nvidia.com/gpu"] == "8"
        assert container["resources"][kind]["cpu"] == "176"
        assert container["resources"][kind]["memory"] == "1600Gi"
    assert nodes * int(container["resources"]["limits"]["nvidia.com/gpu"]) == 64
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "storage", "mountPath": "/mnt/prolong"} in container["volumeMounts"]
    assert {"name": "storage", "persistentVolumeClaim": {"claimName": "prolong-runs"}} in pod["volumes"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    spec = yaml.safe_load(cm["data"][JOB_FILE])
    assert spec["spec"]["parallelism"]["sequenceParallel"] == 8
    assert spec["spec"]["sequenceLength"] == 524288
    # HTTPMode: KubeRay submits through the dashboard and follows the Ray job itself; no
    # submitter Job whose retries running out (an eviction, a dropped log stream) would fail a
    # healthy multi-day run and, through the deletion rule for a failed RayJob, drop its workers.
    assert rj["spec"]["submissionMode"] == "HTTPMode"
    assert "submitterConfig" not in rj["spec"] and "submitterPodTemplate" not in rj["spec"]
    assert QUEUE_LABEL not in rj["metadata"]["labels"]


def test_every_shipped_training_stage_runs_in_http_mode():
    for label, (_, rj) in ALL:
        if rj["metadata"]["labels"]["prolong.dev/kind"] in ("PretrainJob", "SFTJob"):
            assert rj["spec"]["submissionMode"] == "HTTPMode", label
            assert "submitterConfig" not in rj["spec"], label
        if rj["spec"]["submissionMode"] != "HTTPMode":
            continue
        # prolongctl logs reads the driver's log from the head pod's driver-log container,
        # which follows the file Ray writes for this RayJob's submission id in the session
        # directory it shares with the Ray container.
        head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        ray, log = head["containers"]
        assert ray["name"] == "ray-head" and log["name"] == DRIVER_LOG_CONTAINER, label
        assert log["command"][-1] == \
            f"/tmp/ray/session_latest/logs/job-driver-{rj['spec']['jobId']}.log"
        assert log["image"] == ray["image"] and log["securityContext"]["capabilities"] == {
            "drop": ["ALL"]}
        shared = {m["name"] for m in ray["volumeMounts"] if m["mountPath"] == "/tmp/ray"}
        assert shared == {m["name"] for m in log["volumeMounts"]} == {"ray-logs"}
        assert {"name": "ray-logs", "emptyDir": {}} in head["volumes"]


def test_pipeline_stages_record_their_upstream():
    loaded = load(REPO / "jobs" / "prolong-8b" / "pipeline.yaml")
    refs = {r.stage: r for r in pipeline_stages(loaded.document, loaded.jobs)}
    cm, rj = render_stage(loaded.document, loaded.jobs, "stage2")
    stage = json.loads(cm["data"][STAGE_FILE])
    assert stage["upstreamStages"] == {"stage1": {"id": refs["stage1"].id,
                                                  "directory": refs["stage1"].directory}}
    assert stage["directory"] == refs["stage2"].directory == \
        f"/mnt/prolong/prolong-8b/stage2-{refs['stage2'].id}"
    assert rj["metadata"]["labels"]["prolong.dev/pipeline"] == "prolong-8b"
    assert rj["metadata"]["labels"]["prolong.dev/stage"] == "stage2"
    assert rj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "prolong-operator"
    # The long pipeline-stage name is shortened but keeps the whole stage id.
    assert rj["metadata"]["name"].endswith(refs["stage2"].id)


def test_names_fit_for_long_pipelines(tmp_path):
    # Stages by ref: prolong.specfile names an inline stage's job <pipeline>-<stage> and
    # validates it against the 38-character Metadata limit, which long names exceed.
    (tmp_path / "stage.yaml").write_text((REPO / "jobs" / "quickstart" / "stage1.yaml").read_text())
    longest = "p" + "x" * 36 + "e"  # 38 characters, the Metadata limit
    stages = ["a" * 19 + str(i) for i in range(3)]  # 20 characters, the stage-name limit
    pipeline = {"apiVersion": API_VERSION, "kind": "ProLongPipeline",
                "metadata": {"name": longest},
                "spec": {"stages": [{"name": s, "ref": "stage.yaml"} for s in stages]}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    loaded = load(tmp_path / "pipeline.yaml")
    names = []
    for stage in stages:
        objs = render_stage(loaded.document, loaded.jobs, stage)
        name = objs[1]["metadata"]["name"]
        assert len(name) <= RAYJOB_NAME_MAX and DNS_1035.match(name), name
        assert objs == render_stage(loaded.document, loaded.jobs, stage)  # deterministic
        # The engine can load the delivered spec (its name shortened to a job file's limit).
        job = parse_document(yaml.safe_load(objs[0]["data"][JOB_FILE]))
        assert job.metadata.labels["prolong.dev/pipeline"] == longest
        assert job.metadata.labels["prolong.dev/stage"] == stage
        names.append(name)
    assert len(set(names)) == len(names)  # same id, different stages: still distinct


def test_rayjob_name_random_inputs():
    rng = random.Random()
    alphabet = string.ascii_lowercase + string.digits + "-"
    seen = {}
    for _ in range(500):
        length = rng.randint(1, 59)
        body = "".join(rng.choice(alphabet) for _ in range(length - 1))
        job = (rng.choice(string.ascii_lowercase) + body).rstrip("-") or "a"
        sid = "".join(rng.choice("0123456789abcdef") for _ in range(8))
        name = rayjob_name(job, sid)
        assert len(name) <= RAYJOB_NAME_MAX and DNS_1035.match(name), (job, name)
        assert name.endswith("-" + sid)
        if len(job) + 9 <= RAYJOB_NAME_MAX:
            assert name == f"{job}-{sid}"  # short names are kept as they are
        assert seen.setdefault((job, sid), name) == name
    assert len(set(seen.values())) == len(seen)


def test_kubernetes_knobs(validate_object):
    job = _with_kubernetes(STAGE2, network="efa", queue="h100-queue", submissionMode="HTTPMode",
                           activeDeadlineSeconds=86400, backoffLimit=1,
                           deletionRules=False, deleteClusterAfterSeconds=600,
                           preRunningDeadlineSeconds=7200, rayAuthSecret="prolong-ray-token",
                           cpusPerWorker=20.5, memoryPerWorkerGi=180,
                           ncclEnv={"NCCL_DEBUG": "INFO"}, serviceAccount="trainer")
    objs = render_standalone(job)
    for obj in objs:
        validate_object(obj)
    _, rj = objs
    spec = rj["spec"]
    assert spec["submissionMode"] == "HTTPMode" in KUBERAY_SUBMISSION_MODES
    assert spec["activeDeadlineSeconds"] == 86400 and spec["backoffLimit"] == 1
    # KubeRay without the RayJobDeletionPolicy gate: one TTL for the whole cluster.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert "deletionStrategy" not in spec and spec["preRunningDeadlineSeconds"] == 7200
    assert "submitterConfig" not in spec  # HTTPMode has no submitter Job
    assert "submitterPodTemplate" not in spec
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token",
                                                     "secretName": "prolong-ray-token"}
    assert rj["metadata"]["labels"][QUEUE_LABEL] == "h100-queue"
    pod = _worker(rj)["template"]["spec"]
    container = pod["containers"][0]
    limits = container["resources"]["limits"]
    assert limits["vpc.amazonaws.com/efa"] == "32"
    assert limits["cpu"] == "164" and limits["memory"] == "1440Gi"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["NCCL_DEBUG"] == "INFO"
    assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert pod["serviceAccountName"] == "trainer"
    # Scheduling-only: none of it changes the stage id.
    assert standalone_stage(job).id == standalone_stage(load(STAGE2).document).id


def test_object_store_root_uses_a_secret_not_a_volume(validate_object):
    raw = yaml.safe_load(STAGE2.read_text())
    raw["spec"]["storage"] = {"root": "s3://bucket/prolong"}
    raw["spec"]["cluster"]["kubernetes"] = {"objectStoreSecret": "s3-credentials",
                                            "network": "infiniband"}
    objs = render_standalone(parse_document(raw))
    for obj in objs:
        validate_object(obj)
    rj = objs[1]
    for group in (rj["spec"]["rayClusterSpec"]["headGroupSpec"], _worker(rj)):
        container = group["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert not any(v.get("persistentVolumeClaim") for v in group["template"]["spec"]["volumes"])
    limits = _worker(rj)["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["rdma/rdma_shared_device_a"] == "1"
    assert "s3://bucket/prolong/prolong-8b-stage2-512k/pretrain-" in \
        json.loads(objs[0]["data"][STAGE_FILE])["directory"]


def test_cpu_jobs_ask_for_no_gpu():
    _, rj = render(load(REPO / "jobs" / "quickstart" / "stage1.yaml"))
    worker = _worker(rj)
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and limits["cpu"] == "4"
    assert worker["groupName"] == "cpu-workers"


def test_pipeline_file_renders_its_custom_resource():
    (cr,) = render(load(REPO / "jobs" / "prolong-8b" / "pipeline.yaml"), namespace="ml")
    assert cr["kind"] == "ProLongPipeline" and cr["metadata"]["namespace"] == "ml"
    assert [s["name"] for s in cr["spec"]["stages"]] == ["stage1", "stage2", "sft", "eval"]
    assert all("spec" in s and "ref" not in s for s in cr["spec"]["stages"])
    text = dump_all([cr])
    assert "&id" not in text and yaml.safe_load(text) == cr


def test_kubernetes_section_is_documented_and_scheduling_only():
    from prolong.spec import KubernetesSpec

    assert ("cluster", "kubernetes") in SCHEDULING_ONLY
    for name, field in KubernetesSpec.model_fields.items():
        assert field.description, f"KubernetesSpec.{name} has no docstring"
    assert set(KubernetesSpec.model_fields["submission_mode"].annotation.__args__) <= \
        set(KUBERAY_SUBMISSION_MODES)


def test_the_packaged_kuberay_schema_is_the_crds(tmp_path) -> None:
    """The RayJob schema submit --dry-run checks against offline is KubeRay's CRD, unchanged."""
    from prolong.k8s.schemas import KUBERAY_RAYJOB_SCHEMA, extract_rayjob_schema
    from tests.k8s.conftest import KUBERAY_SCHEMAS

    fresh = tmp_path / "rayjob-v1.json.gz"
    extract_rayjob_schema(KUBERAY_SCHEMAS / "ray.io_rayjobs.yaml", fresh)
    assert fresh.read_bytes() == KUBERAY_RAYJOB_SCHEMA.read_bytes(), \
        "regenerate: python -m prolong.k8s.schemas shared/schemas/kuberay/ray.io_rayjobs.yaml"


def test_lifecycle_defaults_release_the_gpus_and_bound_the_run():
    _, rj = render(load(STAGE2))
    spec = rj["spec"]
    rules = {(tuple(sorted((k, v) for k, v in r["condition"].items() if k != "ttlSeconds")),
              r["policy"]): r["condition"]["ttlSeconds"]
             for r in spec["deletionStrategy"]["deletionRules"]}
    assert rules[((("jobStatus", "SUCCEEDED"),), "DeleteWorkers")] == 0  # GPUs freed at once
    assert rules[((("jobStatus", "FAILED"),), "DeleteCluster")] == 300  # head kept 5 min
    assert not any(policy == "DeleteSelf" for _, policy in rules)  # the RayJob is the history
    assert "submitterConfig" not in spec  # HTTPMode: no submitter to run out of retries
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # activeDeadlineSeconds: the plan's estimate x 2 + 1 h (stage 2: about 200 h on 64 H100s).
    loaded = load(STAGE2)
    ref = standalone_stage(loaded.document)
    hours = wall_hours(loaded.document, ref)
    assert 150 < hours < 250
    assert spec["activeDeadlineSeconds"] == math.ceil(hours * 3600 * 2.0) + 3600


def test_a_cpu_stage_has_no_deadline_without_an_estimate_and_zero_turns_it_off():
    _, rj = render(load(REPO / "jobs" / "quickstart" / "stage1.yaml"))
    assert "activeDeadlineSeconds" not in rj["spec"]
    job = _with_kubernetes(STAGE2, activeDeadlineSeconds=0)
    assert "activeDeadlineSeconds" not in render_standalone(job)[1]["spec"]


@pytest.mark.parametrize(("k8s", "field", "rule"), [
    ({"releaseWorkersAfterSeconds": 600, "deleteClusterAfterSeconds": 60},
     "spec.cluster.kubernetes", "releaseWorkersAfterSeconds must not exceed"),
    ({"rayVersion": "2.50.0"}, "spec.cluster.kubernetes", "rayAuth token needs rayVersion 2.52.0"),
    ({"preRunningDeadlineSeconds": 0}, "spec.cluster.kubernetes.preRunningDeadlineSeconds",
     "greater than or equal to 1"),
    ({"rayAuth": "none"}, "spec.cluster.kubernetes.rayAuth", "'token' or 'disabled'"),
])
def test_lifecycle_fields_are_validated(tmp_path, k8s, field, rule):
    raw = yaml.safe_load(STAGE2.read_text())
    raw["spec"]["cluster"]["kubernetes"] = k8s
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as err:
        load(path)
    line = err.value.one_line()
    assert line.startswith(f"{path}: {field}") and rule in line, line


def test_the_judge_key_reaches_every_ray_container_from_its_secret(tmp_path, validate_object,
                                                                   monkeypatch):
    from prolong.eval.judge import API_KEY_ENV, PROMPT_SOURCES, JudgeClient

    helmet = tmp_path / "HELMET"  # a stand-in checkout: the seven prompt strings the judge reads
    for rel in {rel for rel, _ in PROMPT_SOURCES.values()}:
        (helmet / rel).parent.mkdir(parents=True, exist_ok=True)
        (helmet / rel).write_text("".join(f"{var} = 'stand-in {var}'\n"
                                          for r, var in PROMPT_SOURCES.values() if r == rel))
    raw = yaml.safe_load((REPO / "jobs" / "prolong-8b" / "eval.yaml").read_text())
    raw["spec"]["model"] = {"source": "/models/prolong-8b"}
    judge = {"endpoint": "https://judge.example/v1", "model": "gpt-4o", "helmetDir": str(helmet)}
    raw["spec"]["judge"] = {**judge, "apiKeySecretRef": "judge-api"}
    job = parse_document(raw)
    objs = render_standalone(job)
    for obj in objs:
        validate_object(obj)
    cluster = objs[1]["spec"]["rayClusterSpec"]
    containers = [g["template"]["spec"]["containers"][0]
                  for g in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"])]
    assert [c["name"] for c in containers] == ["ray-head", "ray-worker"]
    want = {"name": API_KEY_ENV,
            "valueFrom": {"secretKeyRef": {"name": "judge-api", "key": API_KEY_ENV}}}
    for c in containers:
        assert [e for e in c["env"] if e["name"] == API_KEY_ENV] == [want]
    # The judge reads the variable that env entry sets.
    monkeypatch.setenv(want["name"], "sk-from-the-secret")
    assert JudgeClient.from_spec(job.spec.judge).api_key == "sk-from-the-secret"
    # No secret named, or not an eval: no such variable.
    raw["spec"]["judge"] = judge
    for other in (parse_document(raw), load(STAGE2).document):
        cluster = render_standalone(other)[1]["spec"]["rayClusterSpec"]
        for g in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            assert API_KEY_ENV not in {e["name"] for e in g["template"]["spec"]["containers"][0]["env"]}


def _bytes(quantity: str) -> int:
    return int(quantity.removesuffix("Gi")) * 2**30


@pytest.mark.parametrize(("label", "objs"), ALL, ids=[label for label, _ in ALL])
def test_the_object_store_fits_in_shm(label, objs):
    """Each Ray pod starts with an object store inside its memory-backed /dev/shm (left to Ray,
    the head's 8Gi shm got a 10 GB store, which Ray then keeps in /tmp on disk)."""
    from ray._private import ray_constants

    rc = objs[1]["spec"]["rayClusterSpec"]
    for group in (rc["headGroupSpec"], *rc["workerGroupSpecs"]):
        spec = group["template"]["spec"]
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        store = int(group["rayStartParams"]["object-store-memory"])
        assert 0 < store <= _bytes(shm["emptyDir"]["sizeLimit"]), (label, store, shm)
        memory = _bytes(spec["containers"][0]["resources"]["limits"]["memory"])
        default = min(int(memory * ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION),
                      ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES)
        assert store == min(default, int(_bytes(shm["emptyDir"]["sizeLimit"]) * 0.95))
