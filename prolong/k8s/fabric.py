"""Which network NCCL really uses on this node, said once when a Ray pod starts.

``network: efa`` or ``infiniband`` in a job spec only asks for devices and sets the NCCL/libfabric
environment (prolong.k8s.rayjob); whether NCCL then runs over RDMA depends on the image: the
verbs providers (mlx5, efa), libfabric and, for EFA, the aws-ofi-nccl net plugin. Without them
NCCL quietly falls back to TCP sockets, 10-50x slower for the all-reduces and all-to-alls of a
512K-token step. So every GPU worker pod runs this module before Ray starts: it is the rendered
container's command (prolong.k8s.rayjob.FABRIC_CHECK), which KubeRay >= 1.4 runs as
``/bin/bash -c -- "python -m prolong.k8s.fabric && ulimit ...; ray start ..."`` (no login
shell, so nothing in /etc/profile.d counts; ``docker run`` goes through the image's
entrypoint, which runs the same check). It initialises NCCL
once on one GPU with ``NCCL_DEBUG=INFO``, reads which net plugin loaded and which network it
chose, and logs one line, a WARNING when that is not the fabric the stage asked for. With
``--strict`` (or ``PROLONG_FABRIC_STRICT=1``) a mismatch exits 1, failing the pod before training.
EFA counts only through the aws-ofi-nccl plugin on libfabric's efa provider (the train image
builds it, :data:`OFI_PLUGIN_DIR`).

The parsing is pure and tested on NCCL's log lines; the probe needs a CUDA GPU (skipped without).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

OFI_PLUGIN_DIR = "/opt/aws-ofi-nccl/lib"
OFI_PLUGIN = "libnccl-net-ofi.so"
"""Where images/train/Dockerfile installs the aws-ofi-nccl plugin (off the default library path:
its /etc/profile.d hook puts it on the path and sets NCCL_NET_PLUGIN=ofi for FI_PROVIDER=efa)."""
OFI_PLUGIN_NAMES = ("AWS Libfabric", "Libfabric", "OFI")
"""The names aws-ofi-nccl reports to NCCL (``Loaded net plugin <name>``), by release."""

NETWORKS = {"IB": "infiniband", "Socket": "tcp", "AWS Libfabric": "efa", "Libfabric": "efa",
            "OFI": "efa"}
"""NCCL's network names (``Using network <name>``; aws-ofi-nccl calls itself "AWS Libfabric",
newer releases "Libfabric") -> our spec's ``network`` values."""

_USING = re.compile(r"NCCL INFO Using network (?P<name>.+?)\s*$")
_LOADED = re.compile(r"NCCL INFO NET/Plugin\s*:?\s*Loaded net plugin (?P<name>.+?)"
                     r"(?: \(v\d+\))?\s*$")
_NO_PLUGIN = re.compile(r"NCCL INFO NET/Plugin\s*:?\s*(?P<why>(?:Could not find|No plugin found|"
                        r"Plugin load \(.*?\) returned|Failed to find).*?)\s*$")
_DEVICES = re.compile(r"NCCL INFO NET/(?P<net>IB|Socket|OFI)\s*:\s*Using (?P<devs>.+?)"
                      r"(?:\s*;\s*OOB.*)?$")
_OFI = re.compile(r"NCCL INFO NET/OFI .*?(?:Selected [Pp]rovider is|provider) (?P<prov>\w+)")
_IB_NONE = re.compile(r"NCCL INFO NET/IB\s*:\s*No device found")


@dataclass(frozen=True)
class NcclNet:
    """What NCCL said about its network while it initialised."""

    network: str | None = None
    """The network NCCL chose (``IB``, ``Socket``, ``AWS Libfabric``, ...); None: not said."""
    plugin: str | None = None
    """The external net plugin that loaded (None: NCCL's internal IB/Socket transports)."""
    plugin_missing: str | None = None
    """Why no external plugin loaded, as NCCL put it."""
    devices: list[str] = field(default_factory=list)
    """The NICs it uses, e.g. ``mlx5_0:1/IB`` or ``eth0:10.0.0.5<0>``."""
    ofi_provider: str | None = None
    """The libfabric provider aws-ofi-nccl selected (``efa``, ``tcp``, ...)."""
    no_ib_device: bool = False

    @property
    def fabric(self) -> str | None:
        """The network as a spec's ``network`` value (tcp, infiniband, efa), None if unknown."""
        if self.network is None:
            return None
        if self.ofi_provider is not None and self.ofi_provider != "efa":
            return "tcp"  # aws-ofi-nccl over libfabric's tcp/sockets provider
        return NETWORKS.get(self.network, self.network.lower())


def parse_nccl_log(text: str) -> NcclNet:
    """The NET lines of an ``NCCL_DEBUG=INFO`` log (NCCL 2.18-2.2x formats)."""
    found: dict[str, object] = {}
    devices: list[str] = []
    for line in text.splitlines():
        if m := _USING.search(line):
            found.setdefault("network", m["name"])
        elif m := _LOADED.search(line):
            found["plugin"] = m["name"]
        elif m := _NO_PLUGIN.search(line):
            found.setdefault("plugin_missing", m["why"])
        elif m := _DEVICES.search(line):
            # "[0]mlx5_0:1/IB [1]mlx5_1:1/IB [RO]": the numbered entries, flags dropped
            devices += [d for d in re.split(r"\s*\[\d+\]", re.sub(r"\[[A-Z]+\]", "", m["devs"]))
                        if d.strip()]
        elif m := _OFI.search(line):
            found.setdefault("ofi_provider", m["prov"].lower())
        elif _IB_NONE.search(line):
            found["no_ib_device"] = True
    return NcclNet(devices=[d.strip() for d in devices], **found)  # type: ignore[arg-type]


def expected_fabric(env: Mapping[str, str]) -> str:
    """The fabric a stage's pod asks for, from the environment prolong.k8s.rayjob renders
    (``FI_PROVIDER=efa`` for efa, ``NCCL_IB_DISABLE=0`` for infiniband), else tcp."""
    if env.get("FI_PROVIDER", "").lower() == "efa":
        return "efa"
    if env.get("NCCL_IB_DISABLE") == "0":
        return "infiniband"
    return "tcp"


def plugin_libraries(env: Mapping[str, str]) -> list[str]:
    """NCCL net plugin libraries (``libnccl-net*.so``) on the library path: what NCCL can load."""
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += ["/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/opt/amazon/ofi-nccl/lib",
             OFI_PLUGIN_DIR]
    found = []
    for d in dict.fromkeys(dirs):
        try:
            found += sorted(str(p) for p in Path(d).glob("libnccl-net*.so*"))
        except OSError:
            continue
    return found


def is_ofi(plugin: str | None) -> bool:
    return plugin is not None and plugin.startswith(OFI_PLUGIN_NAMES)


def verdict(net: NcclNet, expected: str, plugins: list[str],
            env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(ok, the one line to log). EFA is ok only through the aws-ofi-nccl plugin on libfabric's
    efa provider; ``env`` (the pod's) explains a plugin that did not load."""
    env = {} if env is None else env
    what = net.network or "unknown (NCCL named no network)"
    detail = [f"plugin {net.plugin}" if net.plugin else "internal transports"]
    if net.ofi_provider:
        detail.append(f"libfabric provider {net.ofi_provider}")
    if net.devices:
        detail.append("devices " + " ".join(net.devices[:8]))
    line = f"NCCL network: {what} ({'; '.join(detail)}); the stage asks for {expected}"
    if net.fabric == expected and (expected != "efa" or is_ofi(net.plugin)):
        return True, f"fabric check: {line}: ok"
    why = []
    if expected == "efa" and not is_ofi(net.plugin):
        why.append("no aws-ofi-nccl plugin loaded (" + (
            f"libraries found: {', '.join(plugins)}" if plugins else
            "no libnccl-net*.so on the library path") + ")")
        if not env.get("NCCL_NET_PLUGIN"):
            why.append("NCCL_NET_PLUGIN is not set (the train image's /etc/profile.d hook sets "
                       "it to ofi when FI_PROVIDER=efa and the plugin is installed)")
        if not any(p.endswith(OFI_PLUGIN) for p in plugins):
            why.append(f"no {OFI_PLUGIN} (the train image installs it in {OFI_PLUGIN_DIR} "
                       "unless built with AWS_OFI_NCCL_VERSION empty)")
    if expected == "infiniband" and net.no_ib_device:
        why.append("NCCL found no InfiniBand device (are the RDMA devices mounted, "
                   "ibverbs-providers installed?)")
    if net.plugin_missing and expected == "efa":
        why.append(f"NCCL: {net.plugin_missing}")
    reason = f": {'; '.join(why)}" if why else ""
    return False, f"fabric check: WARNING {line}{reason}"


PROBE = """
import os, socket, torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
t = torch.ones(1, device="cuda"); dist.all_reduce(t); torch.cuda.synchronize()
dist.destroy_process_group()
"""
"""One rank, one all-reduce: enough for NCCL to load its net plugin and pick a network."""


def probe(env: Mapping[str, str], timeout: float = 120) -> str:
    """NCCL's INIT/NET log of one initialisation on GPU 0, in a child process (so this
    process's environment and GPU stay untouched)."""
    with tempfile.TemporaryDirectory(prefix="prolong-fabric-") as tmp:
        log = Path(tmp) / "nccl.log"
        child = {**env, "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET",
                 "NCCL_DEBUG_FILE": str(log)}
        done = subprocess.run([sys.executable, "-c", PROBE], env=child, capture_output=True,
                              text=True, timeout=timeout)
        text = log.read_text(errors="replace") if log.exists() else ""
        return text + done.stdout + done.stderr


def has_gpu() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    strict = "--strict" in args or os.environ.get("PROLONG_FABRIC_STRICT") == "1"
    env = dict(os.environ)
    if not has_gpu():
        print("fabric check: no GPU on this node, skipped", flush=True)
        return 0
    try:
        text = probe(env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"fabric check: WARNING NCCL could not be probed: {exc}", flush=True)
        return 1 if strict else 0
    ok, line = verdict(parse_nccl_log(text), expected_fabric(env), plugin_libraries(env), env)
    print(line, flush=True)
    return 0 if ok or not strict else 1


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["NETWORKS", "OFI_PLUGIN", "OFI_PLUGIN_DIR", "OFI_PLUGIN_NAMES", "NcclNet",
           "expected_fabric", "is_ofi", "main", "parse_nccl_log", "plugin_libraries", "probe",
           "verdict"]
