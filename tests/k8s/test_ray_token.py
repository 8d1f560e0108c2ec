"""The Ray token from a Kubernetes Secret (``--ray-token-secret``): the Secret KubeRay generates
for a cluster with token auth (key auth_token), read over HTTP from kmock through the CLI's real
kubernetes client; a missing Secret or key is bad input (exit 2, one line)."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import kmock
import pytest
import pytest_asyncio
from typer.testing import CliRunner

from prolong.cli import app
from prolong.k8s.ray_backend import TOKEN_KEY, TokenSecretError, ray_token
from tests.conftest import use_kmock_kubeconfig

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]
SECRETS = kmock.resource("v1/secrets")
runner = CliRunner()


@pytest_asyncio.fixture
async def secrets(kmock: kmock.KubernetesEmulator, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[aiohttp.ClientSession]:
    kmock.resources[SECRETS] = kmock.ResourceInfo(namespaced=True, kind="Secret",
                                                  verbs={"get", "create"})
    url = str(kmock.url).rstrip("/")
    use_kmock_kubeconfig(url, tmp_path, "default", monkeypatch)
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    async with aiohttp.ClientSession(base_url=url,
                                     connector=aiohttp.TCPConnector(force_close=True)) as s:
        for ns, name, data in (("ml", "prolong-ray", {TOKEN_KEY: "s3cr3t-token\n"}),
                               ("ml", "other", {"password": "x"})):
            body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name,
                                                                        "namespace": ns},
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
            async with s.post(f"/api/v1/namespaces/{ns}/secrets", json=body) as resp:
                assert resp.status < 300, await resp.text()
        yield s


async def test_the_token_comes_from_the_secret(secrets) -> None:
    assert await asyncio.to_thread(ray_token, secret="ml/prolong-ray") == "s3cr3t-token"
    assert await asyncio.to_thread(ray_token, secret="prolong-ray", namespace="ml") == \
        "s3cr3t-token"
    # An explicit token wins; nothing is read then.
    assert await asyncio.to_thread(ray_token, "given", secret="ml/missing") == "given"
    with pytest.raises(TokenSecretError, match=r"Secret ml/other has no key auth_token"):
        await asyncio.to_thread(ray_token, secret="ml/other")
    with pytest.raises(TokenSecretError, match=r"Secret default/prolong-ray does not exist"):
        await asyncio.to_thread(ray_token, secret="prolong-ray")  # the context's namespace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_cli_reads_it_and_refuses_a_bad_one(secrets) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # no Ray there
    bad = await asyncio.to_thread(runner.invoke, app, [
        "status", "x", "--ray-address", url, "--ray-token-secret", "ml/missing"])
    assert bad.exit_code == 2
    assert bad.output.strip() == ("--ray-token-secret ml/missing: Secret ml/missing does not "
                                  "exist (KubeRay names it like the Ray cluster)")
    # Found: the command gets as far as Ray, which is not there (exit 1, a cluster failure).
    good = await asyncio.to_thread(runner.invoke, app, [
        "status", "x", "--ray-address", url, "-n", "ml", "--ray-token-secret", "prolong-ray"])
    assert good.exit_code == 1 and f"Ray at {url}" in good.output
    env = await asyncio.to_thread(runner.invoke, app, ["logs", "x", "--ray-address", url],
                                  env={"PROLONG_RAY_TOKEN_SECRET": "ml/other"})
    assert env.exit_code == 2 and "has no key auth_token" in env.output
