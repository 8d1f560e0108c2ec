"""The startup fabric check (prolong.k8s.fabric) on NCCL's own log lines: which network and net
plugin NCCL took, and the WARNING when that is not the fabric the stage asks for."""

from __future__ import annotations

from pathlib import Path

from prolong.k8s.fabric import (
    OFI_PLUGIN,
    OFI_PLUGIN_DIR,
    expected_fabric,
    main,
    parse_nccl_log,
    plugin_libraries,
    verdict,
)
from prolong.k8s.rayjob import NETWORK_ENV

HOST = "gpu-node-1:4711:4711 [0]"
IB = f"""{HOST} NCCL INFO Bootstrap : Using eth0:10.0.0.5<0>
{HOST} NCCL INFO NET/Plugin: Could not find: libnccl-net.so. Using internal network plugin.
{HOST} NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [RO]; OOB eth0:10.0.0.5<0>
{HOST} NCCL INFO Using network IB
{HOST} NCCL INFO ncclCommInitRank comm 0x5555 rank 0 nranks 1 - Init COMPLETE
"""
SOCKETS = f"""{HOST} NCCL INFO NET/Plugin: Could not find: libnccl-net.so. Using internal network plugin.
{HOST} NCCL INFO NET/IB : No device found.
{HOST} NCCL INFO NET/Socket : Using [0]eth0:10.0.0.5<0>
{HOST} NCCL INFO Using network Socket
"""
EFA = f"""{HOST} NCCL INFO NET/OFI Using aws-ofi-nccl 1.9.1-aws
{HOST} NCCL INFO NET/OFI Selected Provider is efa (found 32 nics)
{HOST} NCCL INFO NET/Plugin: Loaded net plugin AWS Libfabric (v8)
{HOST} NCCL INFO Using network AWS Libfabric
"""
OFI_OVER_TCP = EFA.replace("Selected Provider is efa", "Selected Provider is tcp")


def test_parses_the_network_plugin_and_devices():
    ib = parse_nccl_log(IB)
    assert (ib.network, ib.plugin, ib.fabric) == ("IB", None, "infiniband")
    assert ib.devices == ["mlx5_0:1/IB", "mlx5_1:1/IB"]
    assert ib.plugin_missing.startswith("Could not find: libnccl-net.so")
    sockets = parse_nccl_log(SOCKETS)
    assert (sockets.network, sockets.fabric, sockets.no_ib_device) == ("Socket", "tcp", True)
    efa = parse_nccl_log(EFA)
    assert (efa.plugin, efa.network, efa.ofi_provider, efa.fabric) == \
        ("AWS Libfabric", "AWS Libfabric", "efa", "efa")
    assert parse_nccl_log(OFI_OVER_TCP).fabric == "tcp"  # the plugin, but not the EFA provider
    assert parse_nccl_log("").network is None


def test_the_expected_fabric_is_what_the_renderer_sets():
    for network, env in NETWORK_ENV.items():
        assert expected_fabric(env) == network


def test_verdicts(tmp_path: Path):
    ok, line = verdict(parse_nccl_log(IB), "infiniband", [])
    assert ok and line.startswith("fabric check: NCCL network: IB") and line.endswith(": ok")
    ok, line = verdict(parse_nccl_log(SOCKETS), "efa", [])
    assert not ok and "WARNING" in line and "no aws-ofi-nccl plugin loaded" in line
    assert "no libnccl-net*.so on the library path" in line
    ok, line = verdict(parse_nccl_log(SOCKETS), "infiniband", [])
    assert not ok and "found no InfiniBand device" in line
    assert verdict(parse_nccl_log(EFA), "efa", [])[0]
    assert verdict(parse_nccl_log(SOCKETS), "tcp", [])[0]
    assert not verdict(parse_nccl_log(""), "tcp", [])[0]  # NCCL said nothing: not ok


def test_plugin_libraries_are_found_on_the_library_path(tmp_path: Path):
    (tmp_path / "libnccl-net-ofi.so").write_bytes(b"")
    (tmp_path / "libother.so").write_bytes(b"")
    found = plugin_libraries({"LD_LIBRARY_PATH": f"/nonexistent:{tmp_path}"})
    assert str(tmp_path / "libnccl-net-ofi.so") in found
    assert not any(f.endswith("libother.so") for f in found)


def test_without_a_gpu_it_says_so_and_passes(capsys):
    assert main(["--strict"]) == 0  # no /dev/nvidia* here
    assert capsys.readouterr().out.strip() == "fabric check: no GPU on this node, skipped"


def test_efa_needs_the_ofi_plugin_and_says_what_is_missing():
    ofi = f"{OFI_PLUGIN_DIR}/{OFI_PLUGIN}"
    ok, line = verdict(parse_nccl_log(SOCKETS), "efa", [], {})
    assert not ok and "NCCL_NET_PLUGIN is not set" in line and f"no {OFI_PLUGIN}" in line
    # Installed and named, yet not loaded: only that is said.
    ok, line = verdict(parse_nccl_log(SOCKETS), "efa", [ofi], {"NCCL_NET_PLUGIN": "ofi"})
    assert not ok and f"libraries found: {ofi}" in line
    assert "NCCL_NET_PLUGIN" not in line and f"no {OFI_PLUGIN}" not in line
    assert verdict(parse_nccl_log(EFA), "efa", [ofi], {"NCCL_NET_PLUGIN": "ofi"})[0]
    newer = EFA.replace("AWS Libfabric", "Libfabric")  # newer releases' name
    assert verdict(parse_nccl_log(newer), "efa", [ofi])[0]
    # A Libfabric network some other plugin claims is no aws-ofi-nccl.
    other = EFA.replace("Loaded net plugin AWS Libfabric", "Loaded net plugin Vendor")
    assert not verdict(parse_nccl_log(other), "efa", [ofi])[0]


HOOK = Path(__file__).resolve().parents[2] / "images" / "train" / "prolong-fabric.sh"


def _hook_env(env: dict[str, str], times: int = 1) -> dict[str, str]:
    """The environment after a login shell sourced the image's hook ``times`` times (the check
    itself marked as done, so no NCCL probe runs)."""
    import subprocess

    script = f". {HOOK}; " * times + "env -0"
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PROLONG_FABRIC_CHECKED": "1", **env})
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def test_the_image_hook_loads_the_ofi_plugin_only_for_efa(tmp_path: Path):
    (tmp_path / "aws-ofi-nccl" / "lib").mkdir(parents=True)
    (tmp_path / "aws-ofi-nccl" / "lib" / OFI_PLUGIN).write_bytes(b"")
    root = {"PROLONG_OFI_ROOT": str(tmp_path)}
    efa = _hook_env({**root, **NETWORK_ENV["efa"], "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64"},
                    times=2)
    assert efa["NCCL_NET_PLUGIN"] == "ofi"
    assert efa["LD_LIBRARY_PATH"] == (f"{tmp_path}/aws-ofi-nccl/lib:{tmp_path}/libfabric/lib:"
                                      "/usr/local/nvidia/lib64")  # once, though sourced twice
    assert expected_fabric(efa) == "efa"
    for network in ("infiniband", "tcp"):
        env = _hook_env({**root, **NETWORK_ENV[network]})
        assert "NCCL_NET_PLUGIN" not in env and "aws-ofi-nccl" not in env.get(
            "LD_LIBRARY_PATH", ""), network
    # `docker run` of an image built without the plugin: the hook alone does not ask for it.
    assert "NCCL_NET_PLUGIN" not in _hook_env({"FI_PROVIDER": "efa", "PROLONG_OFI_ROOT":
                                               str(tmp_path / "none")})
    assert _hook_env({**root, **NETWORK_ENV["efa"], "NCCL_NET_PLUGIN": "mine"})[
        "NCCL_NET_PLUGIN"] == "mine"


# -- KubeRay's container command (ray-project/kuberay, ray-operator/controllers/ray) ------------
# utils/util.go GetContainerCommand (v1.4.2:706-714, v1.7.0:1005-1013): ["/bin/bash", "-c",
# "--"], "-cl" only when the operator runs with ENABLE_LOGIN_SHELL=true; common/pod.go BuildPod
# (v1.4.2:444-476, v1.7.0:878-912): the Ray container's own command and args, each word
# framed by spaces (convertCmdToString, v1.7.0:1036-1042), then "&& ulimit -n
# ${RAY_START_ULIMIT_OPEN_FILES:-65536}; <ray start ...>", as the single argument.

def kuberay_command(container: dict, ray_start: str) -> list[str]:
    """The Ray container's command line as KubeRay >= 1.4 (default settings) rewrites it."""
    def words(cmd: list[str]) -> str:
        return "".join(f" {w} " for w in cmd)

    cmd = words(container.get("command") or []) + words(container.get("args") or [])
    generated = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {ray_start}"
    assert "ray start" not in cmd  # else KubeRay leaves the command alone
    return ["/bin/bash", "-c", "--", f"{cmd} && {generated}" if cmd else generated]


def test_the_efa_hook_runs_through_kuberays_own_command_form(tmp_path):
    """A `network: efa` worker pod, started as KubeRay starts it (bash -c, no login shell): the
    fabric check runs before Ray, and Ray starts with the EFA plugin selected. `ray start` is
    replaced by a command that prints the environment Ray would start with."""
    import json
    import os
    import subprocess
    import sys

    from prolong.k8s.rayjob import FABRIC_CHECK, render_standalone
    from prolong.specfile import parse_document
    from tests.conftest import job_dict

    raw = job_dict("prolong-8b/stage1-64k.yaml")
    raw["spec"]["cluster"]["kubernetes"]["network"] = "efa"
    _, rayjob = render_standalone(parse_document(raw))
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["command"] == FABRIC_CHECK
    show = tmp_path / "ray_start.py"
    show.write_text("import json, os\nprint('RAY-ENV ' + json.dumps(dict(os.environ)))\n")
    argv = kuberay_command(container, f"{sys.executable} {show}")
    assert argv[:3] == ["/bin/bash", "-c", "--"] and "-l" not in argv[1]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # The pod's PATH leads to the image's python; here to this environment's.
    env.update(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",
               PYTHONPATH=os.environ.get("PYTHONPATH", ""), HOME=str(tmp_path))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    check = [i for i, line in enumerate(lines) if line.startswith("fabric check:")]
    ray = [i for i, line in enumerate(lines) if line.startswith("RAY-ENV ")]
    assert check and ray and check[0] < ray[0], done.stdout  # the check, then Ray
    ray_env = json.loads(lines[ray[0]].removeprefix("RAY-ENV "))
    assert ray_env["NCCL_NET_PLUGIN"] == "ofi" and ray_env["FI_PROVIDER"] == "efa"
