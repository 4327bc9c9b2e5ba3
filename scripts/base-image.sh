#!/usr/bin/env bash
# Prints the base image to build on, by digest: $BASE when set, else the container engine's own
# debian:bookworm-slim as NAME@sha256:DIGEST (pulled from a registry, or made locally, e.g. by ../shared/tools/container
# with debootstrap on machines without a registry). The Dockerfiles take it as `--build-arg BASE=...`: the smoke
# scripts pass it and log it, so a build states which base it used; scripts/pin-base.sh writes it as the default.
#
# Usage: scripts/base-image.sh [IMAGE]        (default: debian:bookworm-slim)
# Engine: $ENGINE if set, else docker when its daemon answers, else podman. Exit 1: the engine has no such image.
set -euo pipefail
if [ -n "${BASE:-}" ]; then echo "$BASE"; exit 0; fi
image=${1:-debian:bookworm-slim}
engine=${ENGINE:-$(docker info >/dev/null 2>&1 && echo docker || echo podman)}
repo_digest=$("$engine" image inspect --format '{{index .RepoDigests 0}}' "$image" 2>/dev/null || true)
digest=${repo_digest##*@}
case "$digest" in
  sha256:*) echo "${image%%@*}@$digest" ;;
  *) echo "[base-image] $engine has no $image with a digest (got '$repo_digest'): pull it, or set BASE" >&2; exit 1 ;;
esac
