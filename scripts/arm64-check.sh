#!/usr/bin/env bash
# Proves the device runtime on linux/arm64 by outcome, under user-mode emulation (qemu-user-static), from a clean
# clone: builds an arm64 Debian root file system with debootstrap, installs python3 and the runtime wheel
# (runtime/, console script kdiff-runtime) from the hash-pinned aarch64 lock inside it, then classifies the same
# real Fashion-MNIST test images on x86 (this machine) and on arm64 with every model file of an export folder
# (model.onnx, model_int8.onnx, and the OpenVINO IRs when the OpenVINO lock installs) and compares: top-1
# agreement, max abs logit difference, and `verify` on the copied export folder; once verify passed there,
# EXPORT_DIR/manifest.json records aarch64 in `checked_on` of each file that met its goal (files not touched).
# Emulation is ~10x slower than a real board: its answers count, its timings do not (run `kdiff-runtime bench` on
# the device for those).
#
# Usage: sudo scripts/arm64-check.sh EXPORT_DIR [IMAGES]      (IMAGES: test images to compare, default 600)
# Needs root (debootstrap, chroot, bind mounts) and `apt-get install qemu-user-static binfmt-support debootstrap`.
# Cache: $ARM64_CACHE (default build/arm64): root/ is the arm64 root file system (reused when present; delete it to
# rebuild), check/ the images, outputs and comparison of the last check. Python on x86: $PY (default
# .venv/bin/python, with the runtime's packages: numpy, Pillow, onnxruntime, openvino).
# Data: $FASHION_MNIST (default /usr/share/datasets/fashion-mnist: Debian's idx files).
# ARM64_ROOT_ONLY=1: build (or check) the root file system and stop. Results of a run: benchmarks/results/*-arm64.md.
# Exit codes: 0 every model within its goal, 1 a model outside it, 2 bad input or a missing tool.
set -euo pipefail
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$(pwd)/$1" ;; esac; }
export_dir=$(absolute "${1:?usage: scripts/arm64-check.sh EXPORT_DIR [IMAGES]}")
count=${2:-600}
cd "$(dirname "$0")/.."
repo=$(pwd)
CACHE=$(absolute "${ARM64_CACHE:-build/arm64}")
ROOT=$CACHE/root
CHECK=$CACHE/check
PY=$(absolute "${PY:-.venv/bin/python}")
DATA=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
SUITE=bookworm
unset PIP_FIND_LINKS  # a host setting (a local wheel folder) that the root does not have
begin=$(date +%s)
log() { echo "[arm64-check $(date +%H:%M:%S)] $*" >&2; }
die() { log "$*"; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and bind mounts)"
for tool in debootstrap chroot qemu-aarch64-static; do
  command -v "$tool" >/dev/null || die "no $tool: apt-get install qemu-user-static binfmt-support debootstrap"
done
[ "${ARM64_ROOT_ONLY:-0}" = 1 ] || [ -f "$export_dir/model.onnx" ] || die "no model.onnx in $export_dir (an export folder of a finished run)"
[ -f "$DATA/t10k-images-idx3-ubyte.gz" ] || die "no Fashion-MNIST test split in $DATA (set FASHION_MNIST)"
"$PY" -c 'import onnxruntime, PIL, numpy' 2>/dev/null || die "$PY lacks the runtime's packages (set PY)"
# One check at a time per cache: a second one would delete the first's outputs and unmount its /sys on exit.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -n 9 || die "another arm64-check is running on $CACHE (wait for it, or set ARM64_CACHE to another folder)"

# --- arm64 binaries run through binfmt_misc ------------------------------------------------------------------
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
  || die "qemu-aarch64 is not registered with binfmt_misc (install binfmt-support)"

# --- the arm64 root file system with python3 (cached) --------------------------------------------------------
# While the script runs, the host's /dev (device nodes made inside the root may be unusable: "/dev/null: Permission
# denied"), /proc and /sys are bound into the root (OpenVINO's ARM CPU plugin needs /sys: without it, it dies of a
# segmentation fault under qemu). qemu-user shows arm64 processes the host's x86 /proc/cpuinfo, on which ONNX
# Runtime's cpuinfo library (ARM build) crashes when /sys is there too; so an ARM-format cpuinfo is bound over it:
# two ARMv8.2 cores (Neoverse-N1 class) with NEON and the dot-product extension. It is a label for the runtimes'
# CPU detection only: the instructions that run are those qemu emulates.
mounted=()
cleanup() { local i; for (( i=${#mounted[@]}-1; i>=0; i-- )); do umount "${mounted[i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
mount_host() {
  local fs
  for fs in dev proc sys; do
    mountpoint -q "$ROOT/$fs" || { mount --bind "/$fs" "$ROOT/$fs"; mounted+=("$ROOT/$fs"); }
  done
  local cpuinfo=$CACHE/cpuinfo-arm64 n
  : >"$cpuinfo"
  for n in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics %s\n%b\n\n' \
      "$n" "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" \
      "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1" \
      >>"$cpuinfo"
  done
  findmnt -rn "$ROOT/proc/cpuinfo" >/dev/null || { mount --bind "$cpuinfo" "$ROOT/proc/cpuinfo"; mounted+=("$ROOT/proc/cpuinfo"); }
}
start=$(date +%s)
if [ ! -f "$ROOT/.kdiff-base" ]; then
  log "building an arm64 $SUITE root file system in $ROOT with debootstrap (~4 min, then python3 ~4 min)"
  for fs in proc/cpuinfo dev proc sys; do if findmnt -rn "$ROOT/$fs" >/dev/null; then umount "$ROOT/$fs"; fi; done
  rm -rf --one-file-system "$ROOT"
  mkdir -p "$CACHE"
  debootstrap --arch=arm64 --variant=minbase "$SUITE" "$ROOT" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  mount_host
  chroot "$ROOT" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends python3 python3-venv ca-certificates >/dev/null && apt-get clean'
  touch "$ROOT/.kdiff-base"
  log "root file system ready in $(( $(date +%s) - start )) s"
else
  log "reusing the arm64 root file system in $ROOT"
fi
mount_host
[ "$(chroot "$ROOT" uname -m)" = aarch64 ] || die "$ROOT does not run as aarch64"
# the machine's name server, package-index settings and CA bundle, for pip inside the root
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"

[ "${ARM64_ROOT_ONLY:-0}" = 1 ] && { log "ARM64_ROOT_ONLY=1: stopping after the root file system"; exit 0; }

# --- the runtime inside the root: the aarch64 lock (with OpenVINO when its wheel installs), then the wheel --------
start=$(date +%s)
venv=/opt/kdiff
locks=(requirements/lock-runtime-openvino-aarch64.txt requirements/lock-runtime-aarch64.txt)
mkdir -p "$ROOT/work"
installed=
for lock in "${locks[@]}"; do
  stamp="$ROOT$venv/.kdiff-lock-$(sha256sum "$lock" | cut -c1-16)"
  if [ -f "$stamp" ]; then installed=$lock; log "reusing $venv in the root: $lock is installed"; break; fi
  log "installing $lock into $venv in the root (pip, --require-hashes)"
  rm -rf "${ROOT:?}$venv"
  cp "$lock" "$ROOT/work/lock.txt"
  if chroot "$ROOT" /bin/sh -c "python3 -m venv $venv && $venv/bin/pip install -q --disable-pip-version-check \
       --no-cache-dir --require-hashes -r /work/lock.txt"; then
    touch "$stamp"; installed=$lock; break
  fi
  log "$lock did not install on arm64; trying the next lock"
done
[ -n "$installed" ] || die "no runtime lock installed in the arm64 root"
rm -rf "$CHECK" && mkdir -p "$CHECK/x86" "$CHECK/arm64" "$CHECK/src"
cp -r runtime exporters "$CHECK/src/" && rm -rf "$CHECK/src/runtime/build" "$CHECK/src/runtime/"*.egg-info
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$CHECK/dist" "$CHECK/src/runtime"
wheel=$(ls "$CHECK"/dist/kdiff_runtime-*.whl)
rm -rf "$ROOT/work/dist" && mkdir -p "$ROOT/work/dist" && cp "$wheel" "$ROOT/work/dist/"
chroot "$ROOT" "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall \
  "/work/dist/$(basename "$wheel")"
log "runtime installed in the root ($installed + $(basename "$wheel")) in $(( $(date +%s) - start )) s"
chroot "$ROOT" "$venv/bin/python" -c 'import torch' 2>/dev/null && die "torch is in the arm64 runtime"
chroot "$ROOT" "$venv/bin/python" -c 'import platform, numpy, onnxruntime; print("[arm64-check] in the root:",
  platform.machine(), "python", platform.python_version(), "onnxruntime", onnxruntime.__version__, "numpy",
  numpy.__version__)' >&2

# --- the same images and model files on both sides -------------------------------------------------------------
"$PY" -c 'import platform, numpy, onnxruntime; print("[arm64-check] on x86:", platform.machine(), "python",
  platform.python_version(), "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)' >&2
PYTHONPATH=$repo "$PY" scripts/arm64_compare.py images "$DATA" "$CHECK/images" "$count"
models=(model.onnx model_int8.onnx)
if chroot "$ROOT" "$venv/bin/python" -c 'import openvino' 2>/dev/null; then
  for ir in openvino/model.xml openvino/model_int8.xml; do
    if [ -f "$export_dir/$ir" ]; then models+=("$ir"); fi
  done
else
  log "no OpenVINO in the arm64 root: the IRs are not compared"
fi
rm -rf "$ROOT/work/export" "$ROOT/work/images" "$ROOT/work/out"
cp -r "$export_dir" "$ROOT/work/export"
cp -r "$CHECK/images" "$ROOT/work/images"
cp scripts/arm64_compare.py "$ROOT/work/"
mkdir -p "$ROOT/work/out"
for model in "${models[@]}"; do
  stem=${model//\//_}
  t0=$(date +%s)
  PYTHONPATH=$repo "$PY" scripts/arm64_compare.py logits "$export_dir/$model" "$CHECK/images" "$CHECK/x86/$stem.npy"
  (cd "$CHECK/images" && PYTHONPATH=$repo "$PY" -m exporters predict --json --model "$export_dir/$model" ./*.png) \
    >"$CHECK/x86/$stem.jsonl"
  t1=$(date +%s)
  chroot "$ROOT" "$venv/bin/python" /work/arm64_compare.py logits "/work/export/$model" /work/images \
    "/work/out/$stem.npy"
  chroot "$ROOT" /bin/sh -c "cd /work/images && $venv/bin/kdiff-runtime predict --json --model /work/export/$model \
    ./*.png" >"$CHECK/arm64/$stem.jsonl"
  cp "$ROOT/work/out/$stem.npy" "$CHECK/arm64/"
  log "$model: x86 $(( t1 - t0 )) s, arm64 (emulated) $(( $(date +%s) - t1 )) s for $count images"
done

status=0
rm -f "$CHECK/met.txt"
PYTHONPATH=$repo "$PY" scripts/arm64_compare.py compare "$CHECK" "${models[@]}" | tee "$CHECK/agreement.md" || status=1
verified=0
if chroot "$ROOT" "$venv/bin/kdiff-runtime" verify /work/export >"$CHECK/verify-arm64.txt" 2>&1; then
  log "verify on the copied export folder in the arm64 root: passed ($(tail -1 "$CHECK/verify-arm64.txt"))"
  verified=1
else
  log "verify in the arm64 root FAILED:"; cat "$CHECK/verify-arm64.txt" >&2; status=1
fi
met=()
if [ -f "$CHECK/met.txt" ]; then mapfile -t met <"$CHECK/met.txt"; fi
if [ "$verified" = 1 ] && [ "${#met[@]}" -gt 0 ]; then  # the manifest names the architecture for those files
  arch=$(chroot "$ROOT" "$venv/bin/python" -c 'import platform; print(platform.machine())')
  PYTHONPATH=$repo "$PY" scripts/arm64_compare.py record "$export_dir" "$arch" "${met[@]}" || status=2
fi
log "total $(( $(date +%s) - begin )) s; outputs in $CHECK"
exit $status
