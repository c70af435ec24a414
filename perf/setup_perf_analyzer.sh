#!/usr/bin/env bash
# Install Triton's perf_analyzer for `make perf`, idempotently, without touching the venv.
#
#   PY=.venv/bin/python bash perf/setup_perf_analyzer.sh
#
# What and why (measured on the 2-core Debian hosts, glibc 2.36):
# - PyPI `perf-analyzer` wheels need glibc 2.38, so the binary comes from the
#   tritonclient 2.47.0 wheel (its data/bin/perf_analyzer). Only that one file
#   is extracted: the venv keeps its own, newer tritonclient.
# - It links libb64.so.0d (Debian `libb64-0d`) and libcudart.so.12 (taken from
#   the pip wheel `nvidia-cuda-runtime-cu12`, only that .so; no GPU is needed).
# Both wheels are pinned by version and sha256. Everything lands in
# $PERF_ANALYZER_DIR (default .cache/perf_analyzer, git-ignored):
#   bin/perf_analyzer, lib/libcudart.so.12, STAMP
# perf/perf_analyzer.py finds it there and sets LD_LIBRARY_PATH itself.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
DEST="${PERF_ANALYZER_DIR:-$ROOT/.cache/perf_analyzer}"

TC_VERSION=2.47.0
TC_WHEEL=tritonclient-2.47.0-py3-none-manylinux1_x86_64.whl
TC_SHA256=754ab373a45306be0c45afbcde06838179d04561694f6d15e138530153aee581
TC_MEMBER=tritonclient-2.47.0.data/data/bin/perf_analyzer
CUDART_VERSION=12.9.79
CUDART_WHEEL=nvidia_cuda_runtime_cu12-12.9.79-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
CUDART_SHA256=25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3
CUDART_MEMBER=nvidia/cuda_runtime/lib/libcudart.so.12
STAMP_TEXT="tritonclient=$TC_VERSION $TC_SHA256 cudart=$CUDART_VERSION $CUDART_SHA256"

say() { echo "perf-setup: $*"; }
die() { echo "perf-setup: error: $*" >&2; exit 1; }

[[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] \
    || die "perf_analyzer from the tritonclient wheel is built for Linux x86_64 only"
[[ -x "$PY" ]] || die "no Python at $PY: run 'make install' first (or set PY=...)"

have_libb64() { ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; }

if ! have_libb64; then
    command -v apt-get >/dev/null \
        || die "libb64.so.0d is missing and there is no apt-get: install libb64 (0d ABI) by hand"
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || die "libb64-0d is missing: run as root 'apt-get install libb64-0d'"
        SUDO="sudo"
    fi
    say "installing Debian package libb64-0d"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libb64-0d >/dev/null
    have_libb64 || die "libb64-0d installed but libb64.so.0d is still not in the linker cache"
fi

check() {
    local out
    out="$(LD_LIBRARY_PATH="$DEST/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$DEST/bin/perf_analyzer" --version 2>&1)" || return 1
    [[ "$out" == *"Perf Analyzer Version $TC_VERSION"* ]]
}

if [[ -f "$DEST/STAMP" && "$(cat "$DEST/STAMP")" == "$STAMP_TEXT" ]] && check; then
    say "perf_analyzer $TC_VERSION ready in $DEST"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

fetch() {  # fetch <requirement> <wheel file> <sha256>
    "$PY" -m pip download -q --no-deps --only-binary=:all: "$1" -d "$WORK" \
        || die "pip could not download $1"
    [[ -f "$WORK/$2" ]] || die "pip downloaded $(ls "$WORK") for $1, expected $2"
    echo "$3  $WORK/$2" | sha256sum -c --quiet - || die "$2 does not match its pinned sha256"
}

say "downloading tritonclient==$TC_VERSION and nvidia-cuda-runtime-cu12==$CUDART_VERSION wheels"
fetch "tritonclient==$TC_VERSION" "$TC_WHEEL" "$TC_SHA256"
fetch "nvidia-cuda-runtime-cu12==$CUDART_VERSION" "$CUDART_WHEEL" "$CUDART_SHA256"

STAGE="$DEST.building.$$"
rm -rf "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/lib"
"$PY" - "$WORK/$TC_WHEEL" "$TC_MEMBER" "$STAGE/bin/perf_analyzer" \
        "$WORK/$CUDART_WHEEL" "$CUDART_MEMBER" "$STAGE/lib/libcudart.so.12" <<'EOF'
import shutil, sys, zipfile
args = sys.argv[1:]
for wheel, member, out in zip(args[0::3], args[1::3], args[2::3]):
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
chmod 0755 "$STAGE/bin/perf_analyzer"
echo "$STAMP_TEXT" > "$STAGE/STAMP"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$STAGE" "$DEST"
check || die "perf_analyzer in $DEST does not run; try: LD_LIBRARY_PATH=$DEST/lib ldd $DEST/bin/perf_analyzer"
say "perf_analyzer $TC_VERSION installed in $DEST"
