"""The Kubernetes API client, configured the way every part of prolong looks for a cluster."""

from __future__ import annotations

import os

import kubernetes
from kubernetes.client import ApiClient


def kube_client() -> ApiClient:
    """A client for $KUBECONFIG if set, else the pod's service account, else ~/.kube/config."""
    path = os.environ.get("KUBECONFIG")
    if path:
        return kubernetes.config.new_client_from_config(config_file=path.split(os.pathsep)[0])
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        return kubernetes.config.new_client_from_config()
    return ApiClient(config)
