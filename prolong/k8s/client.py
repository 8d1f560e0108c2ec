"""The Kubernetes API client, configured the way every part of prolong looks for a cluster, and
the policy that rides out a flaky API server (:class:`RetryPolicy`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client import ApiClient, ApiException

from prolong.k8s.kubeconfig import current_context, kubeconfig_argument

T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
"""API answers that say "try again": overload, an API server or etcd restarting, a proxy."""


def kube_client() -> ApiClient:
    """A client for $KUBECONFIG if set (every file of it, merged as kubectl merges them, in the
    context kubectl would use: prolong.k8s.kubeconfig), else the pod's service account, else
    ~/.kube/config."""
    if os.environ.get("KUBECONFIG"):
        return kubernetes.config.new_client_from_config(
            config_file=kubeconfig_argument() or os.environ["KUBECONFIG"],
            context=current_context().name)
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        return kubernetes.config.new_client_from_config()
    return ApiClient(config)


def transient(exc: BaseException) -> bool:
    """Whether a failed call is worth repeating: a transient HTTP status, or no answer at all (a
    timeout, a reset connection). Such a call may still have taken effect on the server (only
    its response was lost), so it is repeated only where a repeat is safe: reads, merge patches,
    deletes that accept 404, and creates whose 409 the caller reads as "it exists"."""
    if isinstance(exc, ApiException):
        # status 0: the client wrapped a transport error (an SSL failure) into an ApiException
        return exc.status in TRANSIENT_STATUSES or exc.status == 0
    return isinstance(exc, urllib3.exceptions.HTTPError)


@dataclass(frozen=True)
class RetryPolicy:
    """Each call gets ``timeout`` seconds (without one, a hung connection holds the caller
    forever); a transient failure is repeated up to ``attempts`` calls in all, after
    ``first_delay`` x 2^n seconds (at most ``max_delay``, or the server's Retry-After when
    longer, within the same cap)."""

    attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 5.0
    timeout: float = 30.0

    def delay(self, failures: int, exc: BaseException | None = None) -> float:
        """The wait after the ``failures``-th failed call (1-based)."""
        wait = self.first_delay * 2 ** (failures - 1)
        retry_after = _retry_after(exc)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_delay)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` (a generated kubernetes API method) under this policy; the
        last failure, or the first that is not transient, is raised."""
        failures = 0
        while True:
            try:
                return fn(*args, _request_timeout=self.timeout, **kwargs)
            except Exception as exc:  # sorted by transient(): the rest is raised at once
                failures += 1
                if failures >= self.attempts or not transient(exc):
                    raise
                time.sleep(self.delay(failures, exc))


def _retry_after(exc: BaseException | None) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None
