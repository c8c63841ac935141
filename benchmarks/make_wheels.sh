#!/usr/bin/env bash
# Downloads into .whl/ the wheels of benchmarks/wheels.txt (the project's needs that the GPU machine lacks,
# at the versions the test suite runs), built for that machine's Python, for benchmarks/gpu_check.sh to
# install there. Needs any python3 with pip and a package index (or the wheel cache below); no .venv.
#
#   benchmarks/make_wheels.sh                  # Python 3.12, x86-64 Linux, into .whl/
#   PYVER=3.11 DEST=/tmp/w benchmarks/make_wheels.sh
#
# Settings: PYVER (3.12), DEST (.whl), PYTHON (python3: the interpreter whose pip downloads), LIMIT_MIB (50),
# WHEEL_CACHE (~/.cache/celeba-vae/wheels: wheels downloaded once are taken from there without the index).
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-50}
WHEEL_CACHE=${WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/celeba-vae/wheels}

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "error: $PYTHON has no pip; install it (python3 -m ensurepip --user) or set PYTHON to an interpreter with pip" >&2
    exit 1
fi
mapfile -t pins < <(grep -v '^\s*\(#\|$\)' benchmarks/wheels.txt)
(( ${#pins[@]} )) || { echo "error: benchmarks/wheels.txt names no package" >&2; exit 1; }

# torchcodec's wheels are tagged manylinux_2_28, simplejpeg's manylinux2014: pip matches tags exactly.
download=(-m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER"
          --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
mkdir -p "$WHEEL_CACHE"
rm -rf "$DEST"
mkdir -p "$DEST"
if ! "$PYTHON" "${download[@]}" --no-index --find-links "$WHEEL_CACHE" --dest "$DEST" "${pins[@]}" 2>/dev/null; then
    "$PYTHON" "${download[@]}" --dest "$WHEEL_CACHE" "${pins[@]}" || {
        echo "error: could not download ${pins[*]} for Python $PYVER (is a package index reachable?)" >&2
        exit 1
    }
    "$PYTHON" "${download[@]}" --no-index --find-links "$WHEEL_CACHE" --dest "$DEST" "${pins[@]}"
fi

size_kib=$(du -sk "$DEST" | cut -f1)
ls -1 "$DEST"
echo "$(( size_kib / 1024 )) MiB in $DEST/ for Python $PYVER: ${pins[*]}"
if (( size_kib > LIMIT_MIB * 1024 )); then
    echo "error: $DEST/ holds more than $LIMIT_MIB MiB" >&2
    exit 1
fi
