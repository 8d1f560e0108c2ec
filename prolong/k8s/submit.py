"""``prolongctl submit / status / logs / delete``: put a spec into a cluster and follow it.

Two back ends behind one interface (:class:`prolong.k8s.backend.Backend`), picked once per command
by :func:`open_backend`:

* **Kubernetes** (the default, :mod:`prolong.k8s.kube_backend`): a job file becomes its
  [ConfigMap, RayJob], a pipeline file the ProLongPipeline custom resource, which the operator runs.
* **Ray** (``--ray-address URL``, :mod:`prolong.k8s.ray_backend`): an existing Ray cluster's Job
  Submission API, with Ray's token auth.

Names are deterministic (``<job name>-<stage id>``), so submitting the same stage again finds the
existing run, reports it and creates nothing.
"""

from __future__ import annotations

from prolong.k8s.backend import Backend
from prolong.k8s.kube_backend import Kube, KubeBackend, default_namespace, kube_client
from prolong.k8s.ray_backend import RayBackend, RayJobs
from prolong.k8s.ray_backend import ray_token as find_ray_token


def open_backend(namespace: str | None, ray_address: str | None,
                 ray_token: str | None, ray_token_secret: str | None = None, *,
                 operator_check: bool = True) -> Backend:
    """The Job Submission API of the Ray cluster at ``ray_address`` (with ``ray_token``, else the
    token :func:`prolong.k8s.ray_backend.ray_token` finds, in the Secret ``ray_token_secret``
    among others) when one is given, else the Kubernetes API in ``namespace`` (default: the
    kubeconfig context's). ClusterError when neither can be reached or none is configured;
    TokenSecretError when the Secret is missing or holds no token. ``operator_check``: refuse a
    pipeline for a namespace no operator watches (prolong.k8s.kube_backend.check_operator)."""
    if ray_address:
        token = find_ray_token(ray_token, secret=ray_token_secret, namespace=namespace)
        return RayBackend(RayJobs(ray_address, token))
    return KubeBackend(Kube(kube_client(), namespace or default_namespace()),
                       operator_check=operator_check)


__all__ = ["open_backend"]
