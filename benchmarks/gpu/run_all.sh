#!/usr/bin/env bash
# The prepared GPU check: one command, at most 8 minutes on one H100 or H200, nothing beyond the project's install.
#
#   bash benchmarks/gpu/run_all.sh [RESULTS_DIR]      # default: benchmarks/results/gpu-<UTC time>
#
# Stages (benchmarks/gpu/stage_*.py, each under its own time budget, seconds):
#   gpu_tests 100   the gpu-marked tests
#   kernels   130   fused Triton kernels vs eager vs torch.compile, GB/s or TFLOP/s against the device's peak
#   dit        60   DiT forward+backward at the 1.3B width on 32,760 tokens, as many blocks as the budget allows
#   distill   100   one 5:1 distillation cycle on one GPU, reduced-depth 1.3B, random weights built in code
#   vif        60   VIF vs full-rate 4-step sampling
# then summary.json and summary.md in RESULTS_DIR (docs: benchmarks/gpu/README.md).
#
# Without CUDA it checks what it can (scripts compile, libraries import, configs load, then every stage on tiny
# shapes on the CPU, the Triton kernels in the interpreter) and exits 3 with "needs CUDA". Exit 1: a check or a
# stage failed. Python: $PYTHON, else the project's .venv, else python3.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
RESULTS="${1:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
    PY="$(command -v python3)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
HERE="$ROOT/benchmarks/gpu"
STAGES=(gpu_tests kernels dit distill vif)
declare -A BUDGET=([gpu_tests]=100 [kernels]=130 [dit]=60 [distill]=100 [vif]=60)
START=$SECONDS

mkdir -p "$RESULTS" || { echo "run_all: cannot create $RESULTS" >&2; exit 1; }
rm -f "$RESULTS"/*.rc
echo "GPU check -> $RESULTS (python: $PY)"

# stage NAME SECONDS [--dry-run]: run it under timeout, keep its exit status for the summary
stage() {
    local name="$1" budget="$2"
    shift 2
    echo "== $name (budget ${budget} s)"
    # the stage sizes its work to a budget 10 s short of the limit: its own start-up (imports) counts too
    timeout --kill-after=10 "$budget" "$PY" "$HERE/stage_$name.py" --results "$RESULTS" --budget $((budget - 10)) "$@"
    local rc=$?
    echo "$rc" >"$RESULTS/$name.rc"
    [ "$rc" -eq 0 ] || echo "   $name: exit $rc" >&2
}

"$PY" "$HERE/preflight.py" --results "$RESULTS"
pre=$?
if [ "$pre" -eq 3 ]; then
    echo "No CUDA device: dry-running every stage on tiny CPU shapes (checks the paths, measures nothing)"
    for name in "${STAGES[@]}"; do
        if [ "$name" = kernels ]; then  # the fused kernels run in Triton's interpreter
            TRITON_INTERPRET=1 VIDISTILL_KERNELS=triton stage "$name" 300 --dry-run
        else
            stage "$name" 300 --dry-run
        fi
    done
    if ! "$PY" "$HERE/summary.py" --results "$RESULTS" --dry-run; then
        echo "run_all: the dry run failed (see above and $RESULTS/summary.md)" >&2
        exit 1
    fi
    echo "run_all: needs CUDA: every check that runs without a GPU passed ($((SECONDS - START)) s); run this" \
        "script on a machine with an NVIDIA GPU (H100/H200) for the measurements" >&2
    exit 3
fi
[ "$pre" -eq 0 ] || { echo "run_all: preflight failed (see above)" >&2; exit 1; }

for name in "${STAGES[@]}"; do
    stage "$name" "${BUDGET[$name]}"
done
"$PY" "$HERE/summary.py" --results "$RESULTS"
rc=$?
echo "run_all: done in $((SECONDS - START)) s"
exit "$rc"
