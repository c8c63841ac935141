#!/usr/bin/env bash
# Downloads into .whl/ the wheels that benchmarks/gpu_check.sh installs on a GPU machine that has torch,
# torchvision, tqdm, numpy, pyyaml and pillow but no package index: the versions installed in this
# checkout's .venv (the ones the test suite ran), built for that machine's Python.
#
#   benchmarks/make_wheels.sh            # Python 3.12, x86-64 Linux
#   PYVER=3.11 benchmarks/make_wheels.sh
#
# NVIDIA DALI is left out: installed it takes about 480 MB, more than one transfer to such a machine carries;
# gpu_check.sh says so and skips its rows.
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-50}
PACKAGES=(webdataset braceexpand simplejpeg torchcodec)  # the project's needs that such a machine lacks

pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
        echo "error: $name is not installed in $PYTHON's environment; pip install -e '.[test]' first" >&2
        exit 1
    }
    pins+=("$name==$version")
done

rm -rf .whl
mkdir -p .whl
# torchcodec's wheels are tagged manylinux_2_28, simplejpeg's manylinux2014: pip matches tags exactly.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --dest .whl "${pins[@]}"

size_kib=$(du -sk .whl | cut -f1)
ls -1 .whl
echo "$(( size_kib / 1024 )) MiB in .whl/ for Python $PYVER: ${pins[*]}"
if (( size_kib > LIMIT_MIB * 1024 )); then
    echo "error: .whl/ holds more than $LIMIT_MIB MiB" >&2
    exit 1
fi
