#!/usr/bin/env bash
# One command for a GPU machine: install, the CUDA tests, the benchmark, one epoch of train.py per loader.
#
#   benchmarks/make_wheels.sh                 # here, with a package index: fills .whl/ (about 10 MB)
#   benchmarks/gpu_check.sh [OUTDIR]          # there, from the checkout's root, with .whl/ beside it
#
# It uses the machine's own torch and torchvision, installs the wheels from .whl/ (webdataset, simplejpeg,
# TorchCodec) into a scratch folder and the project with --no-deps, and writes its results, eight files,
# into OUTDIR ($OUT if set, else gpu-check/): summary.txt (each step: ok, skipped or failed, seconds),
# env.txt, install.log, test_cuda.log, shards.log, train.log (each run's output and metrics.jsonl),
# throughput.txt and throughput.json. Scratch (shards, checkpoints) goes to a temporary folder.
# It keeps within BUDGET_S seconds (570, so that it ends inside a ten-minute limit) by giving each
# step at most what is left; a step that runs out is stopped and reported.
#
# Settings, from the environment:
#   PYTHON=python3      the interpreter that has torch
#   DEVICE=cuda         cpu runs every step on the CPU (the CUDA tests skip): a dry run of this script
#   IMAGES=10000        synthetic faces for the train.py runs
#   TRAIN_ARGS=         extra train.py flags, for every run
#   BENCH_ARGS=         extra benchmarks/throughput.py flags (e.g. --quick)
#   WHEELS=.whl         the wheels to install; a missing or empty folder installs none
#   INSTALL=1           0: install nothing (the environment already has the project's needs)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

OUTDIR=$(mkdir -p "${1:-${OUT:-gpu-check}}" && cd "${1:-${OUT:-gpu-check}}" && pwd)
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-10000}
TRAIN_ARGS=${TRAIN_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:-}
WHEELS=${WHEELS:-$ROOT/.whl}
INSTALL=${INSTALL:-1}
BUDGET_S=${BUDGET_S:-570}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SUMMARY=$OUTDIR/summary.txt
FAILED=0
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_S LOG COMMAND...: runs COMMAND with its output appended to LOG, for at most CAP_S seconds
# or what is left of the budget, and records the outcome.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$(( BUDGET_S - SECONDS ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 20 )); then
        note "$(printf '%-22s skipped: %ss of the %ss budget left' "$name" "$left" "$BUDGET_S")"
        FAILED=1
        return 1
    fi
    echo "== $name: $*" >>"$log"
    local started=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local took=$(( SECONDS - started ))
    if (( rc == 0 )); then
        note "$(printf '%-22s ok      %4ss' "$name" "$took")"
    elif (( rc == 124 )); then
        note "$(printf '%-22s STOPPED %4ss  (its %ss ran out; see %s)' "$name" "$took" "$limit" "$(basename "$log")")"
        FAILED=1
    else
        note "$(printf '%-22s FAILED  %4ss  (exit %s; see %s)' "$name" "$took" "$rc" "$(basename "$log")")"
        FAILED=1
    fi
    return $rc
}

note "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') | device $DEVICE | $IMAGES synthetic faces | budget ${BUDGET_S}s"
note "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with local changes)')"

# ----------------------------------------------------------------------------- install
INSTALL_LOG=$OUTDIR/install.log
: >"$INSTALL_LOG"
if [[ $INSTALL == 1 ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if (( ${#wheels[@]} )); then
        step "install wheels" 120 "$INSTALL_LOG" "$PYTHON" -m pip install --no-index --no-deps --no-compile \
            --target "$WORK/site" "${wheels[@]}"
    else
        note "install wheels         none in $WHEELS (benchmarks/make_wheels.sh fills it): using what is installed"
    fi
    step "install project" 120 "$INSTALL_LOG" "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation \
        -e "$ROOT"
fi

ENV_LOG=$OUTDIR/env.txt
"$PYTHON" - >"$ENV_LOG" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("torchvision", "torchcodec", "webdataset", "simplejpeg", "PIL", "numpy", "tqdm", "nvidia.dali"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exn:  # absent, or broken: either way the line says so
        print(f"{name} missing ({type(exn).__name__}: {exn})")
try:
    from pipeline.torch_loader import jpeg_decoder
    print("GPU decode:", jpeg_decoder(torch.device("cuda"))[0] if torch.cuda.is_available() else "no CUDA")
except Exception as exn:
    print("GPU decode: none", exn)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi >>"$ENV_LOG" 2>&1
note "$(head -n 1 "$ENV_LOG")"
note "$(grep '^GPU decode' "$ENV_LOG")"
if "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then
    HAVE_DALI=1
else
    HAVE_DALI=0
    note "DALI is absent (about 480 MB installed, more than one transfer carries): its test, train run and benchmark rows are skipped"
fi

# ----------------------------------------------------------------------------- the CUDA tests
step "tests/test_cuda.py" 240 "$OUTDIR/test_cuda.log" "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
note "$(printf '%-22s %s' '' "$(tail -n 1 "$OUTDIR/test_cuda.log")")"

# ----------------------------------------------------------------------------- shards for the runs
step "shards" 120 "$OUTDIR/shards.log" "$PYTHON" prep/shard.py --synthetic "$IMAGES" \
    --data-path "$WORK/faces/img_align_celeba" --output-dir "$WORK/shards" --quiet

# ----------------------------------------------------------------------------- the benchmark
# Before the runs: it prints its table only at the end, and the runs reuse its compiled kernels
# (inductor's cache on disk), so what it leaves of the budget goes further there.
# shellcheck disable=SC2086
step "benchmark" 330 "$OUTDIR/throughput.txt" "$PYTHON" benchmarks/throughput.py --device "$DEVICE" \
    --json "$OUTDIR/throughput.json" $BENCH_ARGS

# ----------------------------------------------------------------------------- one epoch per loader
# One run per line: a name, then train.py's flags. Another way of feeding the model (a resident cache,
# say) is one more line here.
TRAIN_RUNS=(
    "torch --loader torch"
    "dali --loader dali"
)
TRAIN_LOG=$OUTDIR/train.log
: >"$TRAIN_LOG"
for run in "${TRAIN_RUNS[@]}"; do
    read -r name flags <<<"$run"
    if [[ $flags == *"--loader dali"* && $HAVE_DALI == 0 ]]; then
        note "$(printf '%-22s skipped: DALI is absent' "train $name")"
        continue
    fi
    # shellcheck disable=SC2086  # the flags are words
    step "train $name" 150 "$TRAIN_LOG" "$PYTHON" train.py --data-path "$WORK/shards" --epochs 1 \
        --device "$DEVICE" --output-dir "$WORK/train-$name" $flags $TRAIN_ARGS &&
        { echo "-- $name metrics.jsonl"; cat "$WORK/train-$name/metrics.jsonl"; } >>"$TRAIN_LOG"
done

note "done in ${SECONDS}s: $([[ $FAILED == 0 ]] && echo 'every step ok' || echo 'some steps did not pass')"
exit $FAILED
