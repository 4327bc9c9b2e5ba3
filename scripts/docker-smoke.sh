#!/usr/bin/env bash
# Builds the CPU image and runs the tiny end-to-end chain inside it, with the run directory on a mounted volume;
# prints the build time and the image size, and checks the stage outputs, that they were written by the
# image's non-root user, and that a second identical run skips every finished stage.
#
# With --reproducible it proves the build reproducible by its outcome instead: two builds, each from a fresh clone
# of HEAD with no build cache left between them, must install identical package sets (`pip freeze`), and the tiny
# chain with --deterministic must write the same sha256 for fused/model.pt and export/model.onnx in the image and
# on this host (whose .venv scripts/bootstrap.sh installs from the same hashed lock); the IR and INT8 files are
# compared and reported too.
#
# Usage: scripts/docker-smoke.sh [--no-build | --reproducible] [TAG [DOCKERFILE]]
#        (default: kdiff-pipeline:cpu Dockerfile)
# Engine: $CONTAINER if set, else ../shared/tools/container (podman on machines without Docker), else docker.
# Base: $BASE (NAME@sha256:DIGEST), else the engine's debian:bookworm-slim by digest (scripts/base-image.sh).
# Run directory: $SMOKE_RUNS (default: a new temporary folder), mounted at /runs; the run is /runs/tiny.
# Extra flags of `pipeline run`: $SMOKE_ARGS (default: --precision fp32 --no-progress).
set -euo pipefail
cd "$(dirname "$0")/.."

build=1 reproducible=0
[ "${1:-}" = "--no-build" ] && { build=0; shift; }
[ "${1:-}" = "--reproducible" ] && { reproducible=1; shift; }
TAG=${1:-kdiff-pipeline:cpu}
DOCKERFILE=${2:-Dockerfile}
log() { echo "[docker-smoke] $*" >&2; }

if [ -z "${CONTAINER:-}" ]; then
  if [ -x ../shared/tools/container ]; then CONTAINER=$(cd ../shared/tools && pwd)/container
  elif command -v docker >/dev/null 2>&1; then CONTAINER=docker
  else log "no container engine: set CONTAINER, or install docker"; exit 2; fi
fi
image_size() {  # bytes, from whichever engine built the image
  engine image inspect --format '{{.Size}}' "$TAG"
}

engine() {  # the engine itself, for what the container tool does not wrap (inspect, rmi, prune)
  if [ "$CONTAINER" = docker ]; then docker "$@"; else podman "$@"; fi
}
if [ $build -eq 1 ]; then  # the base, by digest, passed to every build and logged (scripts/base-image.sh)
  base=$(ENGINE=$([ "$CONTAINER" = docker ] && echo docker || echo podman) scripts/base-image.sh)
  log "base: $base"
fi

if [ $reproducible -eq 1 ]; then
  work=$(mktemp -d /tmp/kdiff-repro.XXXXXX)
  chmod 0777 "$work"
  for n in 1 2; do
    engine rmi -f "$TAG" >/dev/null 2>&1 || true
    engine image prune -f >/dev/null   # the previous build's layers: nothing is reused
    git clone -q "$PWD" "$work/clone-$n"
    log "build $n of $TAG from a fresh clone of $(git rev-parse --short HEAD), no cache"
    start=$(date +%s)
    (cd "$work/clone-$n" && "$CONTAINER" build --build-arg BASE="$base" -f "$DOCKERFILE" -t "$TAG" .)
    log "build $n: $(( $(date +%s) - start )) s, image id $(engine image inspect --format '{{.Id}}' "$TAG" | cut -c1-19)"
    "$CONTAINER" run --entrypoint=pip "$TAG" freeze --all >"$work/freeze-$n.txt"
  done
  if cmp -s "$work/freeze-1.txt" "$work/freeze-2.txt"; then
    log "ok: pip freeze equal in both builds ($(wc -l <"$work/freeze-1.txt") packages)"
  else
    log "pip freeze differs between the builds:"; diff "$work/freeze-1.txt" "$work/freeze-2.txt" >&2 || true
    exit 1
  fi
  # exit 3 (an INT8 gate failed; the float artifacts are complete) still gives the files to compare
  args=(run --profile tiny --run-dir /runs/image --deterministic --no-progress)
  log "tiny chain with --deterministic in the image"
  "$CONTAINER" run -v "$work:/runs" "$TAG" "${args[@]}" >"$work/image.log" 2>&1 || [ $? -eq 3 ] \
    || { tail "$work/image.log" >&2; exit 1; }
  log "the same on this host (.venv from the same lock)"
  args[4]=$work/host
  .venv/bin/pipeline "${args[@]}" >"$work/host.log" 2>&1 || [ $? -eq 3 ] || { tail "$work/host.log" >&2; exit 1; }
  fail=0
  for f in fused/model.pt export/model.onnx export/openvino/model.xml export/openvino/model.bin \
           export/model_int8.onnx; do
    if [ ! -f "$work/image/$f" ] && [ ! -f "$work/host/$f" ]; then log "$f: written by neither"; continue; fi
    image=$(sha256sum "$work/image/$f" 2>/dev/null | cut -d' ' -f1) host=$(sha256sum "$work/host/$f" 2>/dev/null | cut -d' ' -f1)
    log "$f sha256 image ${image:-missing} host ${host:-missing}: $([ "$image" = "$host" ] && echo identical || echo DIFFERENT)"
    case "$f" in fused/model.pt|export/model.onnx) [ "$image" = "$host" ] || fail=1;; esac
  done
  [ $fail -eq 0 ] && log "PASS: reproducible ($work)" || log "FAIL: the artifacts differ ($work)"
  exit $fail
fi

if [ $build -eq 1 ]; then
  log "building $TAG from $DOCKERFILE with $CONTAINER"
  start=$(date +%s)
  "$CONTAINER" build --build-arg BASE="$base" -f "$DOCKERFILE" -t "$TAG" .
  log "build time: $(( $(date +%s) - start )) s"
fi
size=$(image_size)
log "image size: $size bytes ($(( size / 1000000 )) MB)"

runs=${SMOKE_RUNS:-$(mktemp -d /tmp/kdiff-smoke.XXXXXX)}
mkdir -p "$runs"
chmod 0777 "$runs"   # the image runs as uid 10001
# fp32: on a CPU with native bf16, --precision auto spends ~1 min per stage timing fp32 against bf16.
read -r -a extra <<<"${SMOKE_ARGS:---precision fp32 --no-progress}"
args=(run --profile tiny --run-dir /runs/tiny "${extra[@]}")
log "running: $CONTAINER run -v $runs:/runs $TAG ${args[*]}"
start=$(date +%s)
"$CONTAINER" run -v "$runs:/runs" "$TAG" "${args[@]}"
log "tiny chain: $(( $(date +%s) - start )) s"

fail=0
for f in config.yaml teacher/model.pt teacher/stage.json student/model.pt student/metrics.json \
         fused/model.pt fused/model.json fused/equivalence.json; do
  if [ -s "$runs/tiny/$f" ]; then log "ok: $f"; else log "MISSING: $f"; fail=1; fi
done
owner=$(stat -c %u "$runs/tiny/fused/model.pt" 2>/dev/null || echo '?')
[ "$owner" = 10001 ] && log "ok: written by uid 10001 (non-root)" || { log "files owned by uid $owner, not 10001"; fail=1; }
# The gates, and (pipelines with `run` orchestration) every stage of the manifest complete, the report written.
python3 - "$runs/tiny" <<'PY' || fail=1
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
ok = json.loads((run / "fused/equivalence.json").read_text()).get("passed") is True
print(f"[docker-smoke] fuse equivalence gates passed: {ok}", file=sys.stderr)
if (run / "manifest.json").is_file():
    manifest = json.loads((run / "manifest.json").read_text())
    stages = {name: entry.get("status") for name, entry in manifest["stages"].items()}
    print(f"[docker-smoke] manifest: run {manifest['run']['status']}, stages {stages}", file=sys.stderr)
    ok &= manifest["run"]["status"] == "complete" and all(v == "complete" for v in stages.values())
    if "report" in stages:
        ok &= (run / "report.md").is_file()
        print(f"[docker-smoke] report.md: {(run / 'report.md').is_file()}", file=sys.stderr)
sys.exit(0 if ok else 1)
PY

log "rerunning: every finished stage must be skipped"
start=$(date +%s)
"$CONTAINER" run -v "$runs:/runs" "$TAG" "${args[@]}" 2>&1 | tee "$runs/rerun.log"
log "rerun: $(( $(date +%s) - start )) s"
if [ -f "$runs/tiny/manifest.json" ]; then
  python3 - "$runs/tiny/manifest.json" <<'PY' || fail=1
import json, sys
actions = {name: entry.get("action") for name, entry in json.load(open(sys.argv[1]))["stages"].items()}
print(f"[docker-smoke] rerun actions: {actions}", file=sys.stderr)
sys.exit(0 if actions and all(a == "skipped" for a in actions.values()) else 1)
PY
else
  for stage in teacher student; do
    if grep -q "$stage: finished with these settings.*skipping" "$runs/rerun.log"; then log "ok: $stage skipped"
    else log "the rerun did not skip $stage"; fail=1; fi
  done
fi
[ $fail -eq 0 ] && log "PASS ($runs/tiny)" || log "FAIL ($runs/tiny)"
exit $fail
