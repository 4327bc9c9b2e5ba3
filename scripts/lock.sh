#!/usr/bin/env bash
# Regenerates the pinned dependency locks with `uv pip compile` (a standard resolver; never edit them by hand):
#   requirements/lock-cpu.txt  pyproject.toml (+ the `test` extra) + requirements/cpu.in
#   requirements/lock-gpu.txt  the same + onnxruntime-gpu (requirements/gpu.in), constrained to lock-cpu.txt
# Both target the Docker images' interpreter and platform (CPython 3.11, x86_64 manylinux_2_28, i.e. Debian
# bookworm), whatever machine runs this script, and resolve against PyPI.
# Used by: Dockerfile / Dockerfile.gpu (`pip install -c requirements/lock-*.txt ...`) and the README install
# (`pip install -c requirements/lock-cpu.txt -e '.[test]'`).
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

common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --extra test
        --annotation-style line --custom-compile-command scripts/lock.sh --quiet)
[ "${1:-}" = "--upgrade" ] && common+=(--upgrade)

"$UV" pip compile "${common[@]}" pyproject.toml requirements/cpu.in -o requirements/lock-cpu.txt
"$UV" pip compile "${common[@]}" pyproject.toml requirements/gpu.in -c requirements/lock-cpu.txt \
  -o requirements/lock-gpu.txt
echo "[lock] wrote requirements/lock-cpu.txt ($(grep -c '==' requirements/lock-cpu.txt) pins)" \
     "and requirements/lock-gpu.txt ($(grep -c '==' requirements/lock-gpu.txt) pins)" >&2
