# Sourced by login shells (KubeRay starts every Ray pod with `bash -lc`): the NCCL fabric check
# (python -m prolong.k8s.fabric), once per container. It logs which network NCCL took and warns
# when the stage asked for InfiniBand or EFA but NCCL would use sockets; PROLONG_FABRIC_STRICT=1
# makes that fatal. No GPU (the head pod): one line, no NCCL.
if [ -z "${PROLONG_FABRIC_CHECKED:-}" ] && [ ! -e /tmp/.prolong-fabric-checked ]; then
    export PROLONG_FABRIC_CHECKED=1
    : > /tmp/.prolong-fabric-checked 2>/dev/null || true
    if ! timeout 180 python -m prolong.k8s.fabric; then
        [ "${PROLONG_FABRIC_STRICT:-0}" = "1" ] && exit 1
    fi
fi
