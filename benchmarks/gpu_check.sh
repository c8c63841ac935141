#!/usr/bin/env bash
# One command for a GPU machine, in stages ordered by what they answer, inside a time budget.
# docs/gpu.md gives the whole device call; benchmarks/rehearse.sh runs it here first, as it will run there.
#
#   benchmarks/make_wheels.sh                 # here, with a package index: fills .whl/
#   bash benchmarks/gpu_check.sh "$OUT"       # there, from the checkout's root, with .whl/ carried beside it
#
# Setup (always): the wheels from .whl/ into a scratch folder, the environment, a few thousand synthetic
# JPEGs sharded by prep/shard.py. Then the stages, each writing its results as it ends, so that a run cut
# anywhere still returns everything finished before the cut:
#   smoke   versions, which JPEG decoder loaded, one eager step (no compile: the answer's compile is the
#           machine's first, so that it measures a cold one), one cache batch, a batched decode of a few
#           hundred JPEGs on the device against the CPU decode (benchmarks/smoke.py);
#   answer  train.py itself for EPOCHS epochs with --cache on over resident splits of CelebA's size on a
#           machine that has run nothing yet (cold: the fill decodes and writes the decoded file, the
#           compile starts from empty caches), each epoch's wall time split into steps, evaluation,
#           checkpoint and pictures, and the projection of 40 CelebA epochs (benchmarks/celeba_epochs.py);
#   warm    the same for WARM_EPOCHS epochs, now with the decoded file and inductor's caches in place:
#           what a second run on the machine takes;
#   graph   the same run with --cuda-graph on, where train.py has that flag, its losses and weights
#           compared with the answer's and its steps with the answer's steps (its fill is a load of the
#           decoded file, labelled so);
#   tests   the tests marked `cuda` (pytest -m cuda), the graphed step's first, each under a per-test
#           timeout (pytest-timeout, where installed);
#   bench   benchmarks/throughput.py: every step mode, the loaders, the fill, with the time that is left;
#           its JSON is rewritten after every row and when the stage's time runs out.
# OUTDIR ($OUT if set, else gpu-check/) receives eight files: summary.txt (first line: the answer, "40
# CelebA epochs: X s cold, Y s warm (...)", or "no answer: STAGE failed, see LOG"; then the parts, then
# one line per stage: ok, FAILED, STOPPED or skipped, with its seconds), results.json (every stage's
# figures), setup.log, smoke.log, answer.log (answer, warm and graph), bench.log, throughput.json,
# tests.log. Scratch (shards, runs, wheels) goes to a temporary folder. No file is larger than 16 MiB
# (report.py fit).
#
# Settings, from the environment:
#   STAGES=smoke,answer,warm,graph,tests,bench   the stages to run, in this order whatever the order given
#   BUDGET_S=360        seconds for the whole check; each stage gets at most its cap or what is left. With
#                       the machine's start (1-3 min) it leaves a partial rerun inside a 15-minute lease
#   SMOKE_S=60 ANSWER_S=150 WARM_S=90 GRAPH_S=110 TESTS_S=180 BENCH_S=150   the stages' caps, in seconds
#   PYTHON=python3      the interpreter that has torch
#   DEVICE=cuda         cpu runs every stage on the CPU (CUDA tests skip): benchmarks/rehearse.sh
#   IMAGES=4000         synthetic faces sharded for the fill, the smoke and the benchmark
#   EPOCHS=3            epochs of the answer run (the first holds the compile)
#   WARM_EPOCHS=2       epochs of the warm run
#   RESIDENT_TRAIN=162770 RESIDENT_VAL=19867   the answer run's resident split sizes (CelebA's)
#   TRAIN_ARGS=         extra train.py flags for the answer and graph runs
#   SMOKE_ARGS=         extra benchmarks/smoke.py flags
#   BENCH_ARGS=--repeats 3   extra benchmarks/throughput.py flags
#   TEST_TIMEOUT_S=120  each CUDA test's limit
#   WHEELS=.whl         the wheels to install; a missing or empty folder installs none
#   INSTALL=1           0: install nothing (the environment already has the project's needs)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

OUTDIR=$(mkdir -p "${1:-${OUT:-gpu-check}}" && cd "${1:-${OUT:-gpu-check}}" && pwd)
STAGES=${STAGES:-smoke,answer,warm,graph,tests,bench}
BUDGET_S=${BUDGET_S:-360}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-4000}
EPOCHS=${EPOCHS:-3}
WARM_EPOCHS=${WARM_EPOCHS:-2}
RESIDENT_TRAIN=${RESIDENT_TRAIN:-162770}
RESIDENT_VAL=${RESIDENT_VAL:-19867}
TRAIN_ARGS=${TRAIN_ARGS:-}
SMOKE_ARGS=${SMOKE_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:---repeats 3}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-120}
SMOKE_S=${SMOKE_S:-60} ANSWER_S=${ANSWER_S:-150} WARM_S=${WARM_S:-90} GRAPH_S=${GRAPH_S:-110} TESTS_S=${TESTS_S:-180}
BENCH_S=${BENCH_S:-150}
WHEELS=${WHEELS:-$ROOT/.whl}
INSTALL=${INSTALL:-1}
RESERVE_S=8   # kept back from every stage for the summary at the end
KILL_S=5      # after its time, a stage gets SIGINT, then SIGKILL this much later
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for stage in ${STAGES//,/ }; do
    case $stage in smoke|answer|warm|graph|tests|bench) ;;
        *) echo "error: STAGES: unknown stage '$stage'; choose from smoke,answer,warm,graph,tests,bench" >&2; exit 2 ;;
    esac
done
wants() { [[ ",$STAGES," == *",$1,"* ]]; }

RESULTS=$OUTDIR/results.json
SUMMARY=$OUTDIR/summary.txt
SETUP_LOG=$OUTDIR/setup.log
LINES=$WORK/stages.txt
FAILED=0
rm -f "$RESULTS" "$SUMMARY" "$SETUP_LOG" "$OUTDIR"/{smoke.log,answer.log,bench.log,throughput.json,tests.log}
: >"$LINES"
note() { echo "$*" | tee -a "$LINES"; }
summarize() { "$PYTHON" benchmarks/report.py summary "$RESULTS" "$LINES" "$SUMMARY" || cp "$LINES" "$SUMMARY"; }

# stage NAME CAP_S LOG COMMAND...: runs COMMAND, its output appended to LOG, for at most CAP_S seconds or
# what is left of the budget (then SIGINT, so that it writes what it has), records the outcome and
# rewrites summary.txt. Returns COMMAND's status.
stage() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$(( BUDGET_S - SECONDS - RESERVE_S - KILL_S ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        note "$(printf '%-8s skipped: %ss of the %ss budget left' "$name" "$(( BUDGET_S - SECONDS ))" "$BUDGET_S")"
        FAILED=1
        summarize
        return 125
    fi
    echo "== $name ($(date -u +%H:%M:%S), at most ${limit}s): $*" >>"$log"
    local started=$SECONDS
    timeout --signal=INT --kill-after=$KILL_S "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local took=$(( SECONDS - started ))
    if (( rc == 0 )); then
        note "$(printf '%-8s ok      %4ss' "$name" "$took")"
    elif (( rc == 124 || rc == 130 || rc == 137 )); then
        note "$(printf '%-8s STOPPED %4ss  (its %ss ran out; what it finished is kept; see %s)' "$name" "$took" "$limit" "$(basename "$log")")"
        FAILED=1
    else
        note "$(printf '%-8s FAILED  %4ss  (exit %s; see %s)' "$name" "$took" "$rc" "$(basename "$log")")"
        FAILED=1
    fi
    summarize
    return $rc
}

note "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') | device $DEVICE | stages $STAGES | budget ${BUDGET_S}s"
note "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with local changes)')"

# ----------------------------------------------------------------------------- setup
if [[ $INSTALL == 1 ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if (( ${#wheels[@]} )); then
        stage install 60 "$SETUP_LOG" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" "${wheels[@]}"
    else
        note "install  none in $WHEELS (benchmarks/make_wheels.sh fills it): using what is installed"
    fi
fi

# The environment, under a timeout: a driver that hangs at CUDA's start is one line, not the whole budget.
echo "== environment" >>"$SETUP_LOG"
timeout --kill-after=5 60 "$PYTHON" - "$DEVICE" >>"$SETUP_LOG" 2>&1 <<'EOF'
import importlib, platform, sys, torch
cuda = sys.argv[1].startswith("cuda")
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("torchvision", "torchcodec", "triton", "webdataset", "simplejpeg", "PIL", "numpy", "tqdm", "pytest_timeout",
             "nvidia.dali"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as exn:  # absent, or broken: either way the line says so
        print(f"{name} missing ({type(exn).__name__}: {exn})")
if cuda and not torch.cuda.is_available():
    sys.exit("error: DEVICE is cuda but torch sees no GPU")
EOF
env_rc=$?
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi >>"$SETUP_LOG" 2>&1
if (( env_rc != 0 )); then
    note "env      FAILED (exit $env_rc; see setup.log): $(tail -n 1 "$SETUP_LOG")"
    summarize
    exit 1
fi
note "env      $(grep -m1 '^python ' "$SETUP_LOG")"

if wants smoke || wants answer || wants warm || wants graph || wants bench; then
    stage shards 90 "$SETUP_LOG" "$PYTHON" prep/shard.py --synthetic "$IMAGES" \
        --data-path "$WORK/faces/img_align_celeba" --output-dir "$WORK/shards" --quiet ||
        { note "the stages need the shards: stopping"; summarize; exit 1; }
fi

# ----------------------------------------------------------------------------- the stages
if wants smoke; then
    # shellcheck disable=SC2086  # the flags are words
    stage smoke "$SMOKE_S" "$OUTDIR/smoke.log" "$PYTHON" benchmarks/smoke.py --data-path "$WORK/shards" \
        --images "$WORK/faces/img_align_celeba" --device "$DEVICE" --json "$RESULTS" $SMOKE_ARGS
fi

answer_run() {  # KEY CAP EPOCHS [celeba_epochs.py flags]
    local key=$1 cap=$2 epochs=$3
    shift 3
    # shellcheck disable=SC2086
    stage "$key" "$cap" "$OUTDIR/answer.log" "$PYTHON" benchmarks/celeba_epochs.py --data-path "$WORK/shards" \
        --output-dir "$WORK/run-$key" --json "$RESULTS" --key "$key" --epochs "$epochs" \
        --train-images "$RESIDENT_TRAIN" --val-images "$RESIDENT_VAL" --device "$DEVICE" "$@" $TRAIN_ARGS
}
# train.py's default --cache-file auto: the answer run decodes and writes the decoded file beside the shards,
# the warm and graph runs load it (results.json and summary.txt say which fill was which).
wants answer && answer_run answer "$ANSWER_S" "$EPOCHS"
wants warm && answer_run warm "$WARM_S" "$WARM_EPOCHS"
if wants graph; then
    if reason=$("$PYTHON" benchmarks/report.py skip-graph "$RESULTS"); then  # known from the answer run
        note "$(printf '%-8s skipped: %s' graph "$reason")"
        summarize
    else
        answer_run graph "$GRAPH_S" "$EPOCHS" --graphed --compare answer
    fi
fi

if wants tests; then
    timeout_flag=()
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
        timeout_flag=(--timeout "$TEST_TIMEOUT_S")  # the plugin loads itself once installed
    else
        note "tests    pytest-timeout is not installed: no per-test limit, the stage's alone"
    fi
    # The tests marked `cuda` (pyproject.toml), selected by the marker alone: the graphed step's correctness
    # tests first (their file's CUDA tests come in its order), then the CUDA paths, the cache's, the flags';
    # DALI's where DALI is installed (it is not carried: too large).
    tests=(tests/test_cuda_graph.py tests/test_cuda.py tests/test_cache.py tests/test_flag_effects.py)
    "$PYTHON" -c "import nvidia.dali" 2>/dev/null && tests+=(tests/test_dali.py)
    stage tests "$TESTS_S" "$OUTDIR/tests.log" "$PYTHON" -m pytest -q -rs -p no:cacheprovider --durations=0 \
        "${timeout_flag[@]}" -m cuda "${tests[@]}"
    note "$(printf '%-8s %s' '' "$(grep -E '(passed|failed|skipped|error)' "$OUTDIR/tests.log" | tail -n 1)")"
    summarize
fi

if wants bench; then
    # shellcheck disable=SC2086
    stage bench "$BENCH_S" "$OUTDIR/bench.log" "$PYTHON" benchmarks/throughput.py --device "$DEVICE" \
        --images "$WORK/faces/img_align_celeba" --limit 0 --json "$OUTDIR/throughput.json" $BENCH_ARGS
    note "$(printf '%-8s %s' '' "$("$PYTHON" benchmarks/report.py bench "$OUTDIR/throughput.json" 2>&1 | tail -n 1)")"
    summarize
fi

problems=$("$PYTHON" benchmarks/report.py fit "$OUTDIR" 2>&1) || { note "results  $problems"; FAILED=1; }
note "done in ${SECONDS}s: $([[ $FAILED == 0 ]] && echo 'every stage ok' || echo 'some stages did not pass')"
summarize
exit $FAILED
