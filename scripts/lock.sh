#!/usr/bin/env bash
# Regenerates the pinned, hashed dependency locks with `uv pip compile` (a standard resolver; never edit them by
# hand). Every pin carries the sha256 of each file PyPI has for it, and every install reads a lock as a
# requirements file with `pip install --require-hashes -r` (pip does not check hashes given in a -c constraints
# file), so a build gets exactly these files or fails:
#   requirements/lock-cpu.txt      pyproject.toml (+ the `test` extra) + requirements/cpu.in (the torch pins)
#   requirements/lock-torch.txt    torch + torchvision and their dependencies only (the images' first layer)
#   requirements/lock-gpu.txt      the CPU lock + onnxruntime-gpu in place of onnxruntime (requirements/gpu.in)
#   requirements/lock-runtime.txt  numpy, Pillow, onnxruntime (Dockerfile.runtime); -openvino.txt adds OpenVINO
#   requirements/lock-runtime-aarch64.txt, lock-runtime-openvino-aarch64.txt   the same for linux/arm64 (aarch64)
#   requirements/lock-runtime-build.txt   setuptools + wheel: what builds the kdiff-runtime wheel (runtime/) in an
#                                  image (pure Python, one lock for every architecture)
# All but the first are compiled with -c requirements/lock-cpu.txt, so a package has one version everywhere.
# They target the Docker images' interpreter and platform (CPython 3.11, x86_64 manylinux_2_28, i.e. Debian
# bookworm; the aarch64 locks: aarch64 manylinux_2_28, and manylinux_2_35 with OpenVINO, whose aarch64 wheel needs
# it; bookworm's glibc is 2.36), whatever machine runs this script, and resolve against PyPI.
# Used by: the Dockerfiles and scripts/bootstrap.sh (the host install that `make setup` / `make test` run).
#
# Usage: scripts/lock.sh [--upgrade]     (default: keep the current pins that still fit, add/remove what changed;
#                                          --upgrade: move every pin to the newest allowed release)
#        UV=/path/to/uv scripts/lock.sh  (use that uv instead of installing the pinned one into build/tools)
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
TOOLS=${TOOLS_VENV:-build/tools}
if [ -z "${UV:-}" ]; then
  UV=$TOOLS/bin/uv
  if ! "$UV" --version 2>/dev/null | grep -q "^uv $UV_VERSION\b"; then
    echo "[lock] installing uv==$UV_VERSION into $TOOLS" >&2
    [ -x "$TOOLS/bin/python" ] || python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
  fi
fi

options=(--python-version 3.11 --generate-hashes --annotation-style line --custom-compile-command scripts/lock.sh
         --quiet)
[ "${1:-}" = "--upgrade" ] && options+=(--upgrade)
common=(--python-platform x86_64-manylinux_2_28 "${options[@]}")

"$UV" pip compile "${common[@]}" --extra test pyproject.toml requirements/cpu.in -o requirements/lock-cpu.txt
pinned=(-c requirements/lock-cpu.txt)
"$UV" pip compile "${common[@]}" "${pinned[@]}" requirements/torch.in -o requirements/lock-torch.txt
"$UV" pip compile "${common[@]}" "${pinned[@]}" --extra test --no-emit-package onnxruntime pyproject.toml \
  requirements/gpu.in -o requirements/lock-gpu.txt
"$UV" pip compile "${common[@]}" "${pinned[@]}" requirements/runtime.in -o requirements/lock-runtime.txt
"$UV" pip compile "${common[@]}" "${pinned[@]}" requirements/runtime-openvino.in \
  -o requirements/lock-runtime-openvino.txt
"$UV" pip compile "${common[@]}" "${pinned[@]}" requirements/runtime-build.in -o requirements/lock-runtime-build.txt
"$UV" pip compile --python-platform aarch64-manylinux_2_28 "${options[@]}" "${pinned[@]}" requirements/runtime.in \
  -o requirements/lock-runtime-aarch64.txt
"$UV" pip compile --python-platform aarch64-manylinux_2_35 "${options[@]}" "${pinned[@]}" \
  requirements/runtime-openvino.in -o requirements/lock-runtime-openvino-aarch64.txt
for lock in requirements/lock-*.txt; do
  echo "[lock] wrote $lock ($(grep -c '^[A-Za-z0-9].*==' "$lock") pins)" >&2
done
