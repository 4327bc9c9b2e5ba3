#!/usr/bin/env bash
# Pins the Dockerfiles' base image by digest: reads the digest of the container engine's debian:bookworm-slim
# (after `docker pull debian:bookworm-slim`, or the image ../shared/tools/container makes locally) and writes it
# into every FROM line of Dockerfile, Dockerfile.gpu and Dockerfile.runtime. Run it to move to a newer base on
# purpose (then rebuild and rerun scripts/docker-smoke.sh); a build never picks a new base by itself.
#
# Usage: scripts/pin-base.sh [IMAGE]          (default: debian:bookworm-slim)
# Engine: $ENGINE if set, else docker when its daemon answers, else podman.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-debian:bookworm-slim}
engine=${ENGINE:-$(docker info >/dev/null 2>&1 && echo docker || echo podman)}
repo_digest=$("$engine" image inspect --format '{{index .RepoDigests 0}}' "$image")
digest=${repo_digest##*@}
case "$digest" in sha256:*) ;; *) echo "[pin-base] no digest for $image (got '$repo_digest')" >&2; exit 1;; esac
for file in Dockerfile Dockerfile.gpu Dockerfile.runtime; do
  sed -E -i "s#^FROM debian:bookworm-slim(@sha256:[0-9a-f]{64})?#FROM debian:bookworm-slim@$digest#" "$file"
done
echo "[pin-base] Dockerfile, Dockerfile.gpu, Dockerfile.runtime: FROM debian:bookworm-slim@$digest" >&2
