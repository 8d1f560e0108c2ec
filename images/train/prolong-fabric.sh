# Sourced by the image's entrypoint (`docker run`) and by login shells. Not what a KubeRay pod
# runs: KubeRay >= 1.4 starts Ray with `/bin/bash -c` (no login shell, no /etc/profile.d), so a
# stage's pods get NCCL_NET_PLUGIN in their env (prolong.k8s.rayjob.NETWORK_ENV), the plugin is
# on the image's LD_LIBRARY_PATH, and the GPU workers run the check as their container command
# (prolong.k8s.rayjob.FABRIC_CHECK). Here the same, for other starts:
#
# 1. NCCL over EFA: a pod of a `network: efa` stage (FI_PROVIDER=efa, prolong.k8s.rayjob) loads
#    the image's aws-ofi-nccl plugin (NCCL_NET_PLUGIN=ofi, the plugin and its libfabric on the
#    library path); every other pod keeps NCCL's own InfiniBand and socket transports, since the
#    plugin sits off the default library path. Exported here so Ray and its workers inherit it.
# 2. The NCCL fabric check (python -m prolong.k8s.fabric), once per container. It logs which
#    network NCCL took and warns when the stage asked for InfiniBand or EFA but NCCL would use
#    something else; PROLONG_FABRIC_STRICT=1 makes that fatal. No GPU (the head pod): one line.
#    PROLONG_OFI_ROOT: where the image keeps aws-ofi-nccl/ and libfabric/ (default /opt).
prolong_ofi="${PROLONG_OFI_ROOT:-/opt}/aws-ofi-nccl/lib"
if [ "${FI_PROVIDER:-}" = "efa" ] && [ -e "$prolong_ofi/libnccl-net-ofi.so" ]; then
    export NCCL_NET_PLUGIN="${NCCL_NET_PLUGIN:-ofi}"
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$prolong_ofi:"*) ;;
        *) export LD_LIBRARY_PATH="$prolong_ofi:${PROLONG_OFI_ROOT:-/opt}/libfabric/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
fi
unset prolong_ofi
if [ -z "${PROLONG_FABRIC_CHECKED:-}" ] && [ ! -e /tmp/.prolong-fabric-checked ]; then
    export PROLONG_FABRIC_CHECKED=1
    : > /tmp/.prolong-fabric-checked 2>/dev/null || true
    if ! timeout 180 python -m prolong.k8s.fabric; then
        [ "${PROLONG_FABRIC_STRICT:-0}" = "1" ] && exit 1
    fi
fi
