#!/usr/bin/env bash
# One short GPU check of latency-aware pruning (8 minutes at most): the CUDA-marked tests, the
# latency-target benchmark on cuda (float16, channels_last: how a GPU deployment runs), and a
# shortened main job with a latency target measured on the GPU. Writes OUT/GPU_CHECK.md (card, date, commit, each step's status
# and time) and each step's log next to it.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to benchmarks/gpu_check
#
# Each step has its own time limit (100 + 230 + 120 s, each plus 10 s to die after its TERM: 480 s),
# so the whole check ends within 8 minutes even when a step hangs; a failing step is recorded and the
# next one still runs. The benchmark step is estimated at about 2.5 minutes on a GPU (counted from its
# probes and model calls: `python benchmarks/bench_latency_target.py --estimate` with the step's
# options and --device cuda), the Fashion-MNIST comparison left to the main_job step's short run.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu_check}
mkdir -p "$OUT"
RESULTS="$OUT/GPU_CHECK.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 YOLO_OFFLINE=1
PY=${PYTHON:-python}

card=$($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
if [ -z "$card" ]; then
    echo "gpu_check: torch sees no CUDA device here; run this on a GPU machine" >&2
    exit 2
fi
{
    echo "# GPU check (latency-aware pruning)"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Card: $card"
    echo "- torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "| step | exit status | seconds | log |"
    echo "|---|---:|---:|---|"
} > "$RESULTS"

step() {
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "| $name | $rc$([ $rc -eq 124 ] && echo ' (time limit)') | $(( $(date +%s) - start )) | $name.log |" >> "$RESULTS"
}

step cuda_tests 100 $PY -m pytest -q -m gpu -p no:cacheprovider tests
step latency_benchmark 230 $PY benchmarks/bench_latency_target.py --device cuda --dtype float16 --channels-last \
    --models resnet18 --batches 1,32 --targets 0.5 --depthwise mobilenet_v3_small --ladder 0.3,0.5,0.7 \
    --rounds 10 --search-rounds 7 --probe-rounds 3 --no-fmnist --md "$OUT/LATENCY_cuda.md" --json "$OUT/latency_cuda.json"
step main_job 120 $PY -m fxprune run --limit 2048 --epochs 1 --baseline-epochs 1 --no-control --no-compile \
    --device cuda --target-latency 0.5 --latency-device cuda --latency-batch 32 --out "$OUT/run"

{
    echo
    echo "## CUDA-marked tests"
    echo
    echo '```'
    tail -n 5 "$OUT/cuda_tests.log"
    echo '```'
    echo
    if [ -f "$OUT/LATENCY_cuda.md" ]; then sed 's/^# /## /' "$OUT/LATENCY_cuda.md"; else echo "(no latency benchmark table: see latency_benchmark.log)"; fi
    echo
    echo "## Main job (fxprune run --target-latency 0.5 on cuda)"
    echo
    if [ -f "$OUT/run/report.md" ]; then sed -n '/## Latency target/,/^## [^L]/p' "$OUT/run/report.md"; else echo '```'; tail -n 5 "$OUT/main_job.log"; echo '```'; fi
} >> "$RESULTS"
echo "gpu_check: results in $RESULTS"
