"""Kubernetes rendering: spec files -> objects to apply (no cluster access here).

* a job file renders to [ConfigMap, RayJob] (:mod:`prolong.k8s.rayjob`), as a stage of the
  pipeline that references it when one does (:mod:`prolong.k8s.target`);
* a pipeline file renders to its ProLongPipeline custom resource with every stage inline; the
  operator then creates each stage's [ConfigMap, RayJob] with :func:`rayjob.render_stage`.

:mod:`prolong.k8s.crd` generates the CustomResourceDefinition from the same pydantic models.
"""

from __future__ import annotations

from typing import Any

import yaml

from prolong.k8s.rayjob import pipeline_resource
from prolong.k8s.target import stage_target
from prolong.specfile import Loaded

__all__ = ["dump_all", "render"]


def render(loaded: Loaded, *, namespace: str | None = None, pipeline_file: str | None = None,
           preparation: bool = False) -> list[dict[str, Any]]:
    """What ``prolongctl render``/``submit`` print or apply for a loaded spec file: a job file
    as the stage it stands for (:func:`prolong.k8s.target.stage_target`: through the pipeline
    that references it, so stage.json names the real upstream stages). ``preparation``: the
    stage's preparation Job too, between its ConfigMap and its RayJob (the order of creation:
    the RayJob only once the Job completed)."""
    if loaded.is_pipeline:
        return [pipeline_resource(loaded.document, namespace=namespace)]
    target = stage_target(loaded, pipeline_file)
    configmap, rayjob = target.render(namespace=namespace)
    prep = target.preparation(namespace=namespace) if preparation else None
    return [configmap, *([prep] if prep else []), rayjob]


class _Dumper(yaml.SafeDumper):
    """Plain YAML for humans and kubectl: no anchors/aliases, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.split("\n")) \
        else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_all(objects: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML stream (``kubectl apply -f -`` input)."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100)
