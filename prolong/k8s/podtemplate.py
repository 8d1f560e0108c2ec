"""``cluster.podTemplate``: a user's strategic-merge patch over the pod templates we render.

Platform teams shape the pods a job creates (cost labels, Karpenter's do-not-disrupt, GKE
multi-network annotations, a priority class, pull secrets, head placement, sidecars). A patch for
the head and one for the workers are applied last, over everything the renderer built
(:func:`apply_pod_templates`, called once in :func:`prolong.k8s.rayjob.render_job`).

Merging follows Kubernetes' strategic merge patch (what ``kubectl patch`` does), driven by the
patch metadata of the core Pod schema, not by a table of our own:

* maps merge key by key; a key set to null is removed;
* a list with ``x-kubernetes-patch-strategy: merge`` and a patch merge key (containers, volumes,
  env, volumeMounts, imagePullSecrets, ports, ...) merges item by item on that key; new items are
  appended (the Ray container stays first, as KubeRay requires); a list of scalars with the
  merge strategy (finalizers) gets the new values appended;
* every other list is atomic and replaced whole: **tolerations** among them (Kubernetes defines
  no merge key for them), so a patch's tolerations replace ours (use ``cluster.tolerations`` to
  add to them);
* directives: ``$patch: replace`` (a map, or an item ``{$patch: replace}`` in a list: replace it
  whole), ``$patch: delete`` (a map, or a list item identified by its merge key: remove it).

The schema is the PodTemplateSpec of Kubernetes :data:`prolong.k8s.schemas.KUBE_VERSION`, as
kubernetes-validate ships it, cut to the definitions a pod template reaches and without
descriptions (``python -m prolong.k8s.podtemplate`` regenerates
``schemas/podtemplate-v1.json.gz``; tests/k8s/test_podtemplate.py keeps it equal to
kubernetes-validate's), so the operator and a plain ``pip install prolong`` check patches without
the 100 MB of schemas. :func:`patch_errors` checks a patch at ``validate`` time: the patch itself
(unknown fields, types), then the patch merged over the Ray container it will meet (required
fields of what it adds, the Ray container kept first).

Pure functions, no prolong imports (the spec rules call this module).
"""

from __future__ import annotations

import copy
import difflib
import functools
import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("schemas") / "podtemplate-v1.json.gz"
SCHEMA_KUBE_VERSION = "1.30"
"""The Kubernetes release of the shipped schema (equal to prolong.k8s.schemas.KUBE_VERSION)."""
ROOT = "io.k8s.api.core.v1.PodTemplateSpec"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
"""The Ray containers we render (first in their pods, as KubeRay requires)."""
RESERVED_LABELS = ("prolong.dev/", "app.kubernetes.io/")
"""Label prefixes of the stage's own pod labels, which a patch may not set."""
DIRECTIVE = "$patch"
DIRECTIVES = ("replace", "delete", "merge")
_DELETED = object()


# ------------------------------------------------------------------------------------------
# The schema
# ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def definitions() -> dict[str, Any]:
    """The shipped definitions (name -> JSON schema), PodTemplateSpec's closure."""
    with gzip.open(SCHEMA_FILE, "rt", encoding="utf-8") as f:
        return json.load(f)


def _resolve(node: dict[str, Any] | None) -> dict[str, Any]:
    """A schema node with its ``$ref`` followed (the field's own keys kept)."""
    if not node:
        return {}
    while "$ref" in node:
        target = definitions()[node["$ref"].split("/")[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _field(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The schema of field ``key`` of an object node (the raw field node, with its patch
    metadata), or its additionalProperties' for a map."""
    props = node.get("properties") or {}
    if key in props:
        return props[key]
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def _merge_key(field: dict[str, Any] | None) -> tuple[bool, str | None]:
    """(merges, merge key) of a list field: Kubernetes' x-kubernetes-patch-strategy / -key."""
    if not field:
        return False, None
    strategy = str(field.get("x-kubernetes-patch-strategy") or "").split(",")
    return "merge" in strategy, field.get("x-kubernetes-patch-merge-key")


# ------------------------------------------------------------------------------------------
# Strategic merge
# ------------------------------------------------------------------------------------------

class PatchError(ValueError):
    """A patch that cannot be applied (a bad directive, a list item without its merge key),
    at ``path`` inside the patch."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.rule = path, message


def strategic_merge(base: Any, patch: Any, schema: dict[str, Any] | None = None) -> Any:
    """``base`` with ``patch`` applied as a Kubernetes strategic merge patch; ``schema``: the
    node both sit at (default: a PodTemplateSpec). Neither input is changed."""
    node = _resolve(schema if schema is not None else {"$ref": f"#/$defs/{ROOT}"})
    out = _merge_map(base, patch, node, "")
    return {} if out is _DELETED else out


def _merge_map(base: Any, patch: dict[str, Any], node: dict[str, Any], path: str) -> Any:
    directive = patch.get(DIRECTIVE, "merge")
    if directive not in DIRECTIVES:
        raise PatchError(_join(path, DIRECTIVE), f"must be one of {', '.join(DIRECTIVES)}")
    if directive == "delete":
        return _DELETED
    body = {k: v for k, v in patch.items() if k != DIRECTIVE}
    if directive == "replace" or not isinstance(base, dict):
        return _strip(body)
    out = copy.deepcopy(base)
    for key, value in body.items():
        if value is None:
            out.pop(key, None)
            continue
        field = _field(node, key)
        merged = _merge_value(out.get(key), value, field, _join(path, key))
        if merged is _DELETED:
            out.pop(key, None)
        else:
            out[key] = merged
    return out


def _merge_value(base: Any, patch: Any, field: dict[str, Any] | None, path: str) -> Any:
    node = _resolve(field)
    if isinstance(patch, dict):
        return _merge_map(base, patch, node, path)
    if isinstance(patch, list) and isinstance(base, list):
        merges, key = _merge_key(field)
        if merges:
            return _merge_list(base, patch, key, _resolve(node.get("items")), path)
    return _strip(patch)


def _merge_list(base: list[Any], patch: list[Any], key: str | None,
                items: dict[str, Any], path: str) -> list[Any]:
    if any(isinstance(p, dict) and p.get(DIRECTIVE) == "replace" and len(p) == 1 for p in patch):
        return [_strip(p) for p in patch if not (isinstance(p, dict) and DIRECTIVE in p
                                                 and len(p) == 1)]
    out = copy.deepcopy(base)
    if key is None:  # a set of scalars (finalizers): add what is missing
        return out + [copy.deepcopy(p) for p in patch if p not in out]
    for i, item in enumerate(patch):
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"{path}[{i}]", f"{key} is missing (the key this list merges on)")
        at = next((i for i, b in enumerate(out) if isinstance(b, dict)
                   and b.get(key) == item[key]), None)
        if item.get(DIRECTIVE) == "delete":
            if at is not None:
                out.pop(at)
            continue
        if at is None:
            out.append(_strip(item))
        else:
            out[at] = _merge_map(out[at], item, items, f"{path}[{i}]")
    return out


def _strip(value: Any) -> Any:
    """A patch value as an object: directives dropped (``$patch: merge`` on a new item)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != DIRECTIVE and v is not None}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------
# Applying the user's patches to a rendered RayJob
# ------------------------------------------------------------------------------------------

def apply_pod_templates(cluster_spec: dict[str, Any], head: dict[str, Any] | None,
                        workers: dict[str, Any] | None, keep_labels: dict[str, str]) -> None:
    """Patch (in place) the head template and every worker group's template of a rendered
    ``rayClusterSpec``. ``keep_labels``: the stage's own labels, put back after the patch (the
    operator, the NetworkPolicies and ``prolongctl`` find the pods by them)."""
    groups = [(cluster_spec["headGroupSpec"], head)]
    groups += [(g, workers) for g in cluster_spec.get("workerGroupSpecs", [])]
    for group, patch in groups:
        if not patch:
            continue
        template = strategic_merge(group["template"], patch)
        labels = template.setdefault("metadata", {}).setdefault("labels", {})
        labels.update(keep_labels)
        group["template"] = template


# ------------------------------------------------------------------------------------------
# Checking a patch (validate time)
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchProblem:
    """One thing wrong with a patch: where (a path inside the patch, ``spec.tolerations[0]
    .efect``) and the rule broken."""

    path: str
    rule: str


def patch_errors(patch: Any, ray_container: str,
                 reserved_label_prefixes: tuple[str, ...] = ()) -> list[PatchProblem]:
    """Everything wrong with one pod-template patch, as it will meet a pod template whose first
    container is ``ray_container``: its shape under the Pod schema (required fields aside, since
    a patch names only what it changes), its directives, labels it may not set, then the merged
    result's required fields and the Ray container kept first."""
    if not isinstance(patch, dict):
        return [PatchProblem("", "must be a pod template (metadata and spec)")]
    problems = _directive_problems(patch, "")
    if problems:
        return problems
    problems = _schema_problems(_strip(patch), required=False)
    labels = ((patch.get("metadata") or {}).get("labels") or {})
    for name in labels if isinstance(labels, dict) else ():
        if str(name).startswith(reserved_label_prefixes):
            problems.append(PatchProblem(f"metadata.labels[{json.dumps(str(name))}]",
                                         "this label is set by prolong and cannot be patched"))
    if problems:
        return problems
    skeleton = {"metadata": {}, "spec": {"containers": [{"name": ray_container, "image": "x"}]}}
    try:
        merged = strategic_merge(skeleton, patch)
    except PatchError as exc:
        return [PatchProblem(exc.path, exc.rule)]
    containers = (merged.get("spec") or {}).get("containers") or []
    if not containers or containers[0].get("name") != ray_container:
        return [PatchProblem("spec.containers", f"the Ray container {ray_container} must stay "
                             "(KubeRay runs Ray in a pod's first container)")]
    return [_in_patch(p, merged, patch) for p in _schema_problems(merged, required=True)]


def _directive_problems(value: Any, path: str) -> list[PatchProblem]:
    out: list[PatchProblem] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            where = f"{path}.{key}".lstrip(".")
            if key == DIRECTIVE:
                if sub not in DIRECTIVES:
                    out.append(PatchProblem(where, f"must be one of {', '.join(DIRECTIVES)}"))
            elif str(key).startswith("$"):
                out.append(PatchProblem(where, f"unsupported patch directive (supported: "
                                        f"{DIRECTIVE}: {' | '.join(DIRECTIVES)})"))
            else:
                out += _directive_problems(sub, where)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            out += _directive_problems(sub, f"{path}[{i}]")
    return out


@functools.lru_cache(maxsize=2)
def _validator(required: bool) -> Any:
    import jsonschema  # imported here: only a check needs it, not the renderer

    base = jsonschema.Draft202012Validator
    cls = base if required else jsonschema.validators.extend(
        base, {"required": lambda *_: iter(())})
    return cls({"$defs": definitions(), "$ref": f"#/$defs/{ROOT}"})


def _schema_problems(obj: dict[str, Any], *, required: bool) -> list[PatchProblem]:
    out = []
    for err in sorted(_validator(required).iter_errors(obj), key=lambda e: list(map(str, e.path))):
        for leaf in _leaves(err):
            out.append(_problem(leaf))
    return out


def _leaves(err: Any) -> list[Any]:
    """The most specific errors under ``err`` (a oneOf/anyOf's branches)."""
    return [err] if not err.context else [e for c in err.context for e in _leaves(c)][:1]


def _problem(err: Any) -> PatchProblem:
    path = _path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted((err.schema.get("properties") or {}).keys())
        extra = sorted(set(err.instance) - set(allowed))
        name = extra[0] if extra else "?"
        match = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {match[0]}?)" if match else ""
        return PatchProblem(_join(path, name), f"unknown field{hint}")
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return PatchProblem(_join(path, missing), "required field is missing")
    return PatchProblem(path, err.message)


def _in_patch(problem: PatchProblem, merged: dict[str, Any], patch: dict[str, Any]) -> PatchProblem:
    """A problem found in the merged template, at the same item of the patch (list indices of
    merge-keyed lists differ between the two)."""
    parts = _split(problem.path)
    node_m, node_p, out = merged, patch, []
    for part in parts:
        if isinstance(part, int) and isinstance(node_m, list) and isinstance(node_p, list):
            item = node_m[part] if part < len(node_m) else None
            key = next((k for k in ("name", "mountPath", "containerPort", "ip", "topologyKey")
                        if isinstance(item, dict) and k in item), None)
            at = next((i for i, p in enumerate(node_p) if isinstance(p, dict) and key
                       and p.get(key) == item.get(key)), part)
            out.append(at)
            node_m = item
            node_p = node_p[at] if at < len(node_p) else None
        else:
            out.append(part)
            node_m = node_m.get(part) if isinstance(node_m, dict) else None
            node_p = node_p.get(part) if isinstance(node_p, dict) else None
    return PatchProblem(_path(out), problem.rule)


def _split(path: str) -> list[str | int]:
    out: list[str | int] = []
    for piece in path.replace("[", ".[").split("."):
        if not piece:
            continue
        out.append(int(piece[1:-1]) if piece.startswith("[") and piece[1:-1].isdigit() else piece)
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ------------------------------------------------------------------------------------------
# Generating the shipped schema
# ------------------------------------------------------------------------------------------

def extract_schema(kube_version: str = SCHEMA_KUBE_VERSION) -> dict[str, Any]:
    """PodTemplateSpec's closure from kubernetes-validate's strict schemas, descriptions
    dropped (the shipped file's content)."""
    import kubernetes_validate  # the generator's input; not needed at run time

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = base / f"v{kube_version}.0-local-strict" / "_definitions.json"
    every = json.loads(path.read_text())["$defs"]
    out: dict[str, Any] = {}
    todo = [ROOT]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out[name] = _without_descriptions(every[name])
        todo += list(_refs(out[name]))
    return dict(sorted(out.items()))


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"
                or not isinstance(v, str)}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"].split("/")[-1]] if isinstance(node.get("$ref"), str) else []
        return found + [r for k, v in node.items() if k != "$ref" for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def schema_bytes(schema: dict[str, Any]) -> bytes:
    data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    return gzip.compress(data, mtime=0)  # mtime 0: the same schema, the same bytes


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else SCHEMA_FILE
    out.write_bytes(schema_bytes(extract_schema()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
