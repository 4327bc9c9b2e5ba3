#!/usr/bin/env bash
# Pins the Dockerfiles' default base by digest: writes the engine's debian:bookworm-slim as NAME@sha256:DIGEST
# (scripts/base-image.sh; after `docker pull debian:bookworm-slim` this is the multi-architecture index digest the
# registry serves, which pins amd64 and arm64 alike) into the `ARG BASE=` line of Dockerfile, Dockerfile.gpu and
# Dockerfile.runtime. Run it to move to a newer base on purpose (then rebuild and rerun scripts/docker-smoke.sh);
# a build never picks a new base by itself. Do not commit the digest of a base made locally (no other machine
# has it); pass such a base per build instead: --build-arg BASE=..., as the smoke scripts do.
#
# Usage: scripts/pin-base.sh [IMAGE]          (default: debian:bookworm-slim)
# Engine: $ENGINE if set, else docker when its daemon answers, else podman.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(BASE='' scripts/base-image.sh "${1:-debian:bookworm-slim}")
for file in Dockerfile Dockerfile.gpu Dockerfile.runtime; do
  sed -E -i "s#^ARG BASE=.*#ARG BASE=$base#" "$file"
done
echo "[pin-base] Dockerfile, Dockerfile.gpu, Dockerfile.runtime: ARG BASE=$base" >&2
