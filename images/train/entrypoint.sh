#!/bin/bash
# The train image's entrypoint for `docker run` and other non-KubeRay starts: the fabric check
# (once per container), then the command. KubeRay replaces the entrypoint with `/bin/bash -c`
# (no login shell): its pods get the same through their env and container command instead.
set -e
# shellcheck source=images/train/prolong-fabric.sh
. /etc/profile.d/prolong-fabric.sh
exec "$@"
