#!/bin/bash
# The train image's entrypoint for `docker run` and other non-KubeRay starts: the fabric check
# (once per container), then the command. KubeRay replaces the entrypoint with `bash -lc`, whose
# login shell sources the same file from /etc/profile.d.
set -e
# shellcheck source=images/train/prolong-fabric.sh
. /etc/profile.d/prolong-fabric.sh
exec "$@"
