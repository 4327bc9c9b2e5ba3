#!/usr/bin/env bash
# Set up everything the pipeline needs on a fresh Debian-like machine, idempotently:
#   - Debian's dataset-fashion-mnist (the built-in default data) when apt is available,
#   - a virtual environment in .venv with torch/torchvision and this package (+ test extras), on x86_64 from the
#     hashed locks the Docker images use (requirements/lock-torch.txt, requirements/lock-cpu.txt).
# Usage: scripts/bootstrap.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# x86_64 installs the hashed locks (torch 2.14.1, torchvision 0.29.1: requirements/torch.in); other machines
# (the locks are for x86_64) these pins:
TORCH_SPEC=${TORCH_SPEC:-"torch==2.9.1 torchvision==0.24.1"}
EXTRAS=""
[ "${1:-}" = "--test" ] && EXTRAS="[test]"

log() { echo "[bootstrap] $*" >&2; }

# 1. The default dataset (real Fashion-MNIST, shipped by Debian).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    log "installing Debian's dataset-fashion-mnist"
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; then
      log "could not install dataset-fashion-mnist; pass --data-root or --download to the pipeline"
    fi
  else
    log "apt-get not available: give the pipeline --data-root DIR or --download"
  fi
fi

# 2. The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ "$(uname -m)" = x86_64 ]; then
  # The hashed locks the Docker images install (scripts/lock.sh): the same files here, each sha256 checked.
  if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    log "installing torch and torchvision from requirements/lock-torch.txt"
    "${PIP[@]}" install --require-hashes -r requirements/lock-torch.txt
  fi
  stamp="$VENV/.installed-lock"
  if [ ! -f "$stamp" ] || [ requirements/lock-cpu.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing requirements/lock-cpu.txt and the pipeline package (editable)"
    "${PIP[@]}" install --require-hashes -r requirements/lock-cpu.txt
    "${PIP[@]}" install --no-deps -e .
    touch "$stamp"
  fi
  exit 0
fi
# Other platforms (the locks are for x86_64): the torch pins of docs/development.md, then the package and its dependencies.
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_SPEC
fi
stamp="$VENV/.installed$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing the pipeline package$EXTRAS"
  "${PIP[@]}" install -e ".$EXTRAS"
  touch "$stamp"
fi
