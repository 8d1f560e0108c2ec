"""Whose object is it: what the operator makes of a name that already exists (pure).

A stage's RayJob and ConfigMap are named from its id and attempt, so a create answered 409
AlreadyExists found an object of exactly the name the plan wanted. :func:`claim` says what it is:

* ``ours``: this pipeline owns it (its uid in the ownerReferences): a create of ours whose
  response was lost or timed out, or a reconcile that raced this one. Nothing to do.
* ``adopt``: no controller, and the labels of the same run (pipeline, stage, stage id and, for a
  RayJob, attempt), e.g. the stage submitted with ``prolongctl submit`` before the pipeline
  existed. The same stage id is the same run, so the pipeline takes it over
  (:func:`adoption_patch`) instead of running the stage a second time under another name.
* ``taken``: controlled by something else (a same-named pipeline deleted but not yet garbage
  collected) or the labels of another run. The operator leaves it alone; the stage waits with
  the reason in its status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prolong.stage.names import ATTEMPT_LABEL, PIPELINE_LABEL, STAGE_ID_LABEL, STAGE_LABEL

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


@dataclass(frozen=True)
class Claim:
    verdict: Literal["ours", "adopt", "taken"]
    reason: str | None = None
    """For ``taken``: one line naming the object and who holds it."""


def controlled_by_another(obj: Mapping[str, Any], uid: str | None) -> str | None:
    """Why ``obj`` belongs to someone else (None when it is ours or has no controller): a
    controller ownerReference other than the pipeline with ``uid``."""
    meta = obj.get("metadata") or {}
    owners = meta.get("ownerReferences") or ()
    if uid is None or any(o.get("uid") == uid for o in owners):
        return None
    controller = next((o for o in owners if o.get("controller")), None)
    if controller is None:
        return None
    return (f"{obj.get('kind', 'object')} {meta.get('name')} already exists and is controlled "
            f"by {controller.get('kind')} {controller.get('name')} (uid {controller.get('uid')}),"
            f" not by this pipeline")


def claim(existing: Mapping[str, Any], wanted: Mapping[str, Any], uid: str | None) -> Claim:
    """Judge ``existing``, found under the name of ``wanted`` (the object the operator tried to
    create for the pipeline with ``uid``)."""
    meta = existing.get("metadata") or {}
    owners = meta.get("ownerReferences") or ()
    if uid is not None and any(o.get("uid") == uid for o in owners):
        return Claim("ours")
    other = controlled_by_another(existing, uid)
    if other is not None:
        return Claim("taken", other)
    have, want = meta.get("labels") or {}, wanted["metadata"].get("labels") or {}
    keys = [PIPELINE_LABEL, STAGE_LABEL, STAGE_ID_LABEL]
    if wanted.get("kind") == "RayJob":
        keys.append(ATTEMPT_LABEL)
    # A RayJob without the attempt label is attempt 1 (observe_rayjob reads it so).
    differ = [f"{k}={have.get(k, '1' if k == ATTEMPT_LABEL else None)!r}" for k in keys
              if have.get(k, "1" if k == ATTEMPT_LABEL else None) != want.get(k)]
    if differ:
        return Claim("taken", f"{wanted.get('kind', 'object')} {meta.get('name')} already exists "
                              f"for another run ({', '.join(differ)})")
    # Without a uid (a body not read from an API server) ownership cannot be told: the labels of
    # the same run are all there is, and nothing can be adopted.
    return Claim("ours" if uid is None else "adopt")


def adoption_patch(existing: Mapping[str, Any], owner: Mapping[str, Any],
                   managed_by: str) -> dict[str, Any]:
    """The merge patch that makes ``existing`` the pipeline's: its ownerReference (so deleting
    the pipeline deletes it) and the managed-by label the operator's RayJob watch selects on.
    It carries the resourceVersion read, so a concurrent change answers 409 instead of being
    overwritten."""
    meta = existing.get("metadata") or {}
    return {"metadata": {"resourceVersion": meta.get("resourceVersion"),
                         "ownerReferences": [*(meta.get("ownerReferences") or ()), dict(owner)],
                         "labels": {MANAGED_BY_LABEL: managed_by}}}
