#!/usr/bin/env bash
# The GPU check rehearsed here, on the CPU, the way the GPU machine will run it (docs/gpu.md):
#
#   benchmarks/rehearse.sh [RESULTS_DIR]        # default: rehearsal/ (ignored by git)
#
# 1. a fresh `git clone` of the committed tree (HEAD) into a temporary folder: no .venv, no build outputs,
#    nothing that git does not track; uncommitted changes are not in it (a line says so);
# 2. .whl/ filled there by the clone's own benchmarks/make_wheels.sh, for this interpreter's Python (the
#    device's is 3.12), the one ignored folder that the device call carries;
# 3. an interpreter that has torch and nothing of the project's: benchmarks/device_python.py links this
#    checkout's torch and the GPU machine's other packages into a new virtual environment, first on PATH,
#    so that gpu_check.sh's `python3` is that one; PYTHONPATH and VIRTUAL_ENV are cleared;
# 4. the device call's command line, run in the clone: bash benchmarks/gpu_check.sh "$OUT"; cat "$OUT/summary.txt"
#    with DEVICE=cpu and OUT an empty folder;
# 5. what would come back: the files under $OUT within the device's limits (at most 8 files, each at most
#    16 MiB and 64 MiB together, at most two folders down, names of letters, digits, '.', '_', '-') are
#    copied to RESULTS_DIR; anything else is named as left out, and the rehearsal fails.
#
# Settings: the torch-holding interpreter TORCH_PYTHON (default: .venv/bin/python, else python3); every
# setting of gpu_check.sh (STAGES, BUDGET_S, IMAGES, TRAIN_ARGS, ...) passes through; DEVICE is cpu. Its
# sizes and caps default to a CPU's, below (CelebA-sized resident splits would take hours on a CPU): the
# rehearsal tests the plumbing, about two minutes on 2 cores, never a speed.
# Exit status: gpu_check.sh's, or 1 when the set-up or the limits on what comes back fail.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=$(mkdir -p "${1:-$ROOT/rehearsal}" && cd "${1:-$ROOT/rehearsal}" && pwd)
if [[ -z ${TORCH_PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then TORCH_PYTHON=$ROOT/.venv/bin/python; else TORCH_PYTHON=python3; fi
fi
# A CPU's sizes, unless set: every stage runs, in minutes; the caps leave a busy 2-core machine time to finish.
: "${BUDGET_S:=900}" "${SMOKE_S:=300}" "${ANSWER_S:=300}" "${WARM_S:=300}" "${GRAPH_S:=300}" "${TESTS_S:=300}"
: "${BENCH_S:=300}" "${IMAGES:=200}" "${EPOCHS:=2}" "${WARM_EPOCHS:=1}" "${RESIDENT_TRAIN:=64}" "${RESIDENT_VAL:=16}"
: "${TRAIN_ARGS:=--batch-size 16 --workers 1 --no-compile}" "${SMOKE_ARGS:=--batch-size 16 --workers 1 --decode 16 --steps 1}"
: "${BENCH_ARGS:=--quick --no-compile --loaders torch,cache --batch-size 16 --workers 1 --steps 1 --repeats 2}"
export BUDGET_S SMOKE_S ANSWER_S WARM_S GRAPH_S TESTS_S BENCH_S IMAGES EPOCHS WARM_EPOCHS RESIDENT_TRAIN RESIDENT_VAL \
    TRAIN_ARGS SMOKE_ARGS BENCH_ARGS
MAX_FILES=8 MAX_BYTES=$((16 << 20)) MAX_TOTAL=$((64 << 20)) MAX_SENT_KIB=$((64 << 10))
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/rehearse.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
fail() { echo "rehearsal: $*" >&2; exit 1; }

# 1. the committed tree, cloned
head=$(git -C "$ROOT" rev-parse HEAD) || fail "$ROOT is not a git checkout"
git -C "$ROOT" diff --quiet HEAD 2>/dev/null ||
    echo "rehearsal: $ROOT has uncommitted changes; the rehearsal runs the committed tree, $(git -C "$ROOT" rev-parse --short HEAD)"
git clone --quiet --no-checkout "$ROOT" "$SCRATCH/repo" && git -C "$SCRATCH/repo" checkout --quiet --detach "$head" ||
    fail "git clone of $ROOT failed"
cd "$SCRATCH/repo" || fail "no clone"

# 3. the device's stand-in interpreter (made before the wheels: its pip downloads them, as no .venv is there)
"$TORCH_PYTHON" benchmarks/device_python.py "$SCRATCH/python" >"$SCRATCH/python.log" 2>&1 ||
    fail "benchmarks/device_python.py failed: $(tail -n 3 "$SCRATCH/python.log")"
PYVER=$("$SCRATCH/python/bin/python3" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# 2. the carried wheels, made by the clone's own script
PYTHON="$SCRATCH/python/bin/python3" PYVER=$PYVER bash benchmarks/make_wheels.sh >"$SCRATCH/wheels.log" 2>&1 ||
    fail "benchmarks/make_wheels.sh failed in a fresh clone: $(grep -v '^WARNING' "$SCRATCH/wheels.log" | tail -n 3)"
sent_kib=$(( $(git ls-files -z | du -skc --files0-from=- | tail -n 1 | cut -f1) + $(du -sk .whl | cut -f1) ))
(( sent_kib <= MAX_SENT_KIB )) || fail "the tree and .whl/ hold ${sent_kib} KiB, more than the 64 MiB that travel"

# 4. the device call's command line, with the device's environment
mkdir -p "$SCRATCH/out"
export OUT=$SCRATCH/out DEVICE=cpu PATH="$SCRATCH/python/bin:$PATH"
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME
echo "rehearsal: $(git rev-parse --short HEAD) cloned into $SCRATCH/repo, .whl/ for Python $PYVER ($(ls .whl | tr '\n' ' '))," \
     "python3 = $(command -v python3)"
bash benchmarks/gpu_check.sh "$OUT"; rc=$?
cat "$OUT/summary.txt"

# 5. what comes back
rm -rf "${RESULTS:?}"/*
left_out=()
files=0 total=0
while IFS= read -r -d '' path; do
    rel=${path#"$OUT"/}
    depth=$(( $(tr -cd '/' <<<"$rel" | wc -c) ))
    size=$(stat -c %s "$path")
    if [[ -L $path || ! -f $path ]]; then left_out+=("$rel (not a plain file)"); continue; fi
    if ! [[ $rel =~ ^[A-Za-z0-9._/-]+$ ]]; then left_out+=("$rel (a name with other characters)"); continue; fi
    if (( depth > 2 )); then left_out+=("$rel (more than two folders down)"); continue; fi
    if (( size > MAX_BYTES )); then left_out+=("$rel (over 16 MiB)"); continue; fi
    if (( files == MAX_FILES || total + size > MAX_TOTAL )); then left_out+=("$rel (past the 8 files or 64 MiB)"); continue; fi
    mkdir -p "$RESULTS/$(dirname "$rel")" && cp "$path" "$RESULTS/$rel"
    files=$((files + 1)) total=$((total + size))
done < <(find "$OUT" -mindepth 1 \( -type f -o -type l \) -print0 | sort -z)
echo "rehearsal: $files files came back to $RESULTS"
if (( ${#left_out[@]} )); then
    printf 'rehearsal: left out on the device: %s\n' "${left_out[@]}" >&2
    exit 1
fi
exit $rc
