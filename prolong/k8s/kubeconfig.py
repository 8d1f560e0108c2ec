"""Which cluster context and namespace a command talks to, resolved as kubectl resolves them.

kubectl's rules (client-go's clientcmd loading rules), which ``prolongctl`` follows so that
``submit`` lands where ``kubectl apply`` would:

* kubeconfig files: every file of ``$KUBECONFIG`` (``os.pathsep``-separated, missing ones
  skipped), else ``~/.kube/config``; with none, the pod's in-cluster configuration;
* merging: the **first** file that sets ``current-context`` wins, and so does the first
  definition of a context of a given name (the ``kubernetes`` package lets a later file's
  current-context win, so the client is handed the context resolved here);
* the namespace: ``--namespace``, else the current context's ``namespace``, else (in a pod)
  ``$POD_NAMESPACE`` or the service account's namespace file, else ``default``.

Reads files only; no kubernetes import (``validate`` must stay light).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "default"


def kubeconfig_paths() -> list[Path]:
    """The kubeconfig files kubectl would read, in order (existing ones only)."""
    env = os.environ.get("KUBECONFIG")
    candidates = [p for p in env.split(os.pathsep) if p] if env else ["~/.kube/config"]
    return [Path(p).expanduser() for p in candidates if Path(p).expanduser().is_file()]


@dataclass(frozen=True)
class Context:
    """The context in force: its name (None in a pod without kubeconfig) and namespace."""

    name: str | None
    namespace: str | None
    source: str
    """Where the namespace came from, for messages."""


def current_context() -> Context:
    """The current context under kubectl's merge rules (first current-context, first context of
    a name); in-cluster when no kubeconfig file exists."""
    paths = kubeconfig_paths()
    if not paths:
        ns = os.environ.get("POD_NAMESPACE")
        if ns:
            return Context(None, ns, "$POD_NAMESPACE")
        try:
            ns = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except OSError:
            ns = ""
        return Context(None, ns or None, "the pod's service account" if ns else "")
    current: str | None = None
    contexts: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(doc, dict):
            continue
        current = current or doc.get("current-context") or None
        for entry in doc.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name") not in contexts:
                contexts[entry.get("name")] = entry.get("context") or {}
    ns = (contexts.get(current) or {}).get("namespace") if current else None
    return Context(current, ns or None, f"kubeconfig context {current}" if ns else "")


def resolve_namespace(flag: str | None = None) -> tuple[str, str]:
    """(namespace, where it came from): ``--namespace``, else kubectl's default."""
    if flag:
        return flag, "--namespace"
    ctx = current_context()
    if ctx.namespace:
        return ctx.namespace, ctx.source
    return DEFAULT_NAMESPACE, "the default (no namespace in the kubeconfig context)"


def kubeconfig_argument() -> str | None:
    """Every kubeconfig file kubectl reads, joined for the ``kubernetes`` package's merger; None
    when there is none (in-cluster)."""
    paths = kubeconfig_paths()
    return os.pathsep.join(str(p) for p in paths) if paths else None
