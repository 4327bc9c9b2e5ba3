#!/usr/bin/env bash
# Builds the torch-free runtime image (Dockerfile.runtime) and checks it against the training side: its
# `predict` answers on real images equal `pipeline predict`'s for the float and the INT8 model of an export
# folder, and its `verify` passes. Prints the build time and the image size (goal: <= 400 MB).
#
# Usage: scripts/runtime-smoke.sh [--no-build] EXPORT_DIR [IMAGE...]
#   EXPORT_DIR: an export folder made by the pipeline (e.g. runs/default/export); IMAGE...: image files to
#   classify (default: 8 test images of Fashion-MNIST written as PNG).
# Engine: $CONTAINER if set, else ../shared/tools/container (podman on machines without Docker), else docker.
# Base: $BASE (NAME@sha256:DIGEST), else the engine's debian:bookworm-slim by digest (scripts/base-image.sh).
# Build arguments: $RUNTIME_BUILD_ARGS (e.g. "--build-arg OPENVINO=1"); tag: $RUNTIME_TAG (default kdiff-runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

build=1
[ "${1:-}" = "--no-build" ] && { build=0; shift; }
export_dir=$(cd "${1:?usage: scripts/runtime-smoke.sh [--no-build] EXPORT_DIR [IMAGE...]}" && pwd)
shift
TAG=${RUNTIME_TAG:-kdiff-runtime}
PY=${PY:-.venv/bin/python}
log() { echo "[runtime-smoke] $*" >&2; }

if [ -z "${CONTAINER:-}" ]; then
  if [ -x ../shared/tools/container ]; then CONTAINER=$(cd ../shared/tools && pwd)/container
  elif command -v docker >/dev/null 2>&1; then CONTAINER=docker
  else log "no container engine: set CONTAINER, or install docker"; exit 2; fi
fi
if [ $build -eq 1 ]; then
  # the base, by digest: $BASE, else the engine's own debian:bookworm-slim (scripts/base-image.sh)
  base=$(ENGINE=$([ "$CONTAINER" = docker ] && echo docker || echo podman) scripts/base-image.sh)
  log "building $TAG from Dockerfile.runtime with $CONTAINER on base $base"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$CONTAINER" build --build-arg BASE="$base" -f Dockerfile.runtime ${RUNTIME_BUILD_ARGS:-} -t "$TAG" .
  log "build time: $(( $(date +%s) - start )) s"
fi
if [ "$CONTAINER" = docker ]; then size=$(docker image inspect -f '{{.Size}}' "$TAG")
else size=$(podman image inspect --format '{{.Size}}' "$TAG"); fi
log "image size: $size bytes ($(( size / 1000000 )) MB; goal <= 400 MB)"

images=$(mktemp -d /tmp/kdiff-runtime-images.XXXXXX)
chmod 0755 "$images"
if [ $# -gt 0 ]; then cp "$@" "$images/"
else
  "$PY" - "$images" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
from pipeline.training.data import load_dataset
test = load_dataset("fashion-mnist").test
for i in range(8):
    pixels, _ = test[i * 997]
    Image.fromarray(pixels.squeeze(0).numpy()).save(Path(sys.argv[1]) / f"test{i}.png")
PYEOF
fi
chmod 0644 "$images"/*
names=$(cd "$images" && ls)

status=0
for model in model.onnx model_int8.onnx; do
  [ -f "$export_dir/$model" ] || { log "skip $model: not in $export_dir"; continue; }
  # shellcheck disable=SC2086
  host=$(cd "$images" && "$root/.venv/bin/pipeline" predict --model "$export_dir/$model" --top-k 3 $names)
  # shellcheck disable=SC2086
  inside=$("$CONTAINER" run -v "$export_dir:/model:ro" -v "$images:/work:ro" "$TAG" \
           predict --model "/model/$model" --top-k 3 $names)
  if [ "$host" = "$inside" ]; then log "ok  $model: the image's answers equal pipeline predict's"
  else log "FAILED  $model: answers differ"; diff <(echo "$host") <(echo "$inside") >&2 || true; status=1; fi
  echo "$inside"
done
"$CONTAINER" run -v "$export_dir:/model:ro" "$TAG" verify /model | tail -1
exit $status
