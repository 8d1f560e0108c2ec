"""Names of a stage's things: job names, RayJob / ConfigMap / retry names, labels.

Pure functions and constants, no prolong imports: the spec models take their name rules from
here (so a job name that validates is one a RayJob can be built from), and the renderer, the
planner, the operator and ``prolongctl submit`` take their names and labels from here.

KubeRay facts these follow (ray-operator/apis/ray/v1): a RayJob name is at most 47 characters
(the RayCluster and its head Service derive longer names from it) and a DNS-1035 label.
"""

from __future__ import annotations

import hashlib
import re

DNS_1035_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1035 label: what Kubernetes accepts as a Service-derived object name."""
DNS_1035 = re.compile(DNS_1035_PATTERN)

RAYJOB_NAME_MAX = 47
"""KubeRay's limit on RayJob names."""
JOB_NAME_MAX = 38
"""A job file's metadata.name: ``<name>-<8-character stage id>`` fits RAYJOB_NAME_MAX."""
STAGE_NAME_MAX = 20
"""A pipeline stage's name (spec.stages[].name)."""
NAME_HASH_LENGTH = 6
CONFIGMAP_SUFFIX = "-spec"
"""A stage's ConfigMap (job.yaml + stage.json) is named ``<rayjob>-spec``."""

LABEL_PREFIX = "prolong.dev/"
PIPELINE_LABEL = f"{LABEL_PREFIX}pipeline"
STAGE_LABEL = f"{LABEL_PREFIX}stage"
STAGE_ID_LABEL = f"{LABEL_PREFIX}stage-id"
KIND_LABEL = f"{LABEL_PREFIX}kind"
ATTEMPT_LABEL = f"{LABEL_PREFIX}attempt"
"""Set by the operator on the RayJob of each attempt (a retry is a new, run-once RayJob)."""
DIRECTORY_ANNOTATION = f"{LABEL_PREFIX}directory"
"""The stage directory, on the RayJob (an annotation: a URI is no label value)."""


def is_dns_1035(name: str) -> bool:
    return bool(DNS_1035.match(name))


def stage_job_name(pipeline: str, stage: str) -> str:
    """The job name of a pipeline's stage (up to 59 characters: longer than a job file may use,
    so renderers fit it with :func:`fit_name`)."""
    return f"{pipeline}-{stage}"


def fit_name(name: str, limit: int) -> str:
    """``name`` when it has at most ``limit`` characters, else its head plus a hash of all of it."""
    name = name.lower()
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:NAME_HASH_LENGTH]
    return f"{name[:limit - NAME_HASH_LENGTH - 1].rstrip('-')}-{digest}"


def rayjob_name(job_name: str, stage_id: str) -> str:
    """``<job name>-<stage id>``, at most 47 characters and DNS-1035.

    A pipeline stage's job name is ``<pipeline>-<stage>`` (up to 59 characters); when the whole
    name does not fit, the job name is cut and a short hash of the full job name keeps distinct
    stages apart. The stage id stays whole: it is what makes a re-run a new RayJob.
    """
    name = f"{fit_name(job_name, RAYJOB_NAME_MAX - len(stage_id) - 1)}-{stage_id}"
    if not is_dns_1035(name):
        raise ValueError(f"RayJob name {name!r} is not a DNS-1035 label")
    return name


def attempt_rayjob_name(first: str, attempt: int) -> str:
    """Name of a stage's ``attempt``-th RayJob, given the first attempt's name
    (``<job>-<stage id>``): the first itself, then ``<first>-r<attempt>``, cut to 47 characters
    when needed (keeping the stage id and a short hash of the full name, so that distinct names
    stay distinct)."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if attempt == 1:
        return first
    suffix = f"-r{attempt}"
    if len(first) + len(suffix) <= RAYJOB_NAME_MAX:
        return first + suffix
    head, _, sid = first.rpartition("-")
    digest = hashlib.sha256(first.encode()).hexdigest()[:4]
    keep = RAYJOB_NAME_MAX - len(suffix) - len(sid) - len(digest) - 2
    return f"{head[:keep].rstrip('-')}-{digest}-{sid}{suffix}"


def configmap_name(rayjob: str) -> str:
    """The ConfigMap that carries a stage's job.yaml and stage.json (shared by its attempts)."""
    return f"{rayjob}{CONFIGMAP_SUFFIX}"
