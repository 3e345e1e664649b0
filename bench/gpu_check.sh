#!/usr/bin/env bash
# One prepared run for a GPU machine with no network (../shared/MEASURING.md):
# install the project over the packages already there, print versions and the
# GPU, measure the device's ceilings, run the CUDA tests (real Triton
# compilation catches what the interpreter cannot), then every benchmark in a
# short mode, and write JSON + a markdown table into OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Each stage has its own time limit (STAGE_SECONDS) and the whole run a
# budget (TOTAL_SECONDS): a stage gets at most what is left, so one slow
# stage cannot eat the others and the run ends in time. A stage that runs out
# gets SIGINT first, so pytest still writes the benchmarks it finished.
# CUDA_TEST_SECONDS limits the CUDA tests alone; BENCH_FILES (space-separated paths) picks the benchmark files and their order.
# Seen on an H200 (bench/RESULTS.md): the CUDA tests need about 200 s, bench_train and
# bench_fused_train_step about 200 s each (two ResNet-50 training-step compiles), the other
# benchmark files 40-90 s: a full run takes longer than one 10-minute device call, so split it
# across calls with BENCH_FILES.
# Exit status: 0 when every stage passed, else the number that failed.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
stage_seconds=${STAGE_SECONDS:-150}
total_seconds=${TOTAL_SECONDS:-480}
mkdir -p "$out/logs"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 FASTRESNET_BENCH_SHORT=1 FASTRESNET_CACHE_DIR="$out/logs/cache"
failed=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/logs/NAME.log
    local name=$1 seconds=$2
    shift 2
    local left=$((total_seconds - SECONDS))
    [ "$seconds" -le "$left" ] || seconds=$left
    if [ "$seconds" -lt 10 ]; then
        echo "=== $name: skipped, the run's budget of ${total_seconds}s is spent"
        failed=$((failed + 1))
        return
    fi
    echo "=== $name (limit ${seconds}s)"
    local start=$SECONDS
    timeout -s INT -k 15 "$seconds" "$@" > "$out/logs/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$out/logs/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

stage install 120 bash -c 'python3 -m pip install --no-deps --no-build-isolation -e . && if [ -d wheels ]; then python3 -m pip install --no-deps --no-index wheels/*.whl; fi'  # wheels/: optional extras carried along (nvidia-cudnn-frontend)
stage ceilings 60 python3 bench/ceilings.py --out "$out/ceilings.json"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
stage cuda-tests "${CUDA_TEST_SECONDS:-$stage_seconds}" python3 -m pytest tests -m cuda -q -p no:cacheprovider -rf
for file in ${BENCH_FILES:-bench/bench_*.py}; do
    name=$(basename "$file" .py)
    stage "$name" "$stage_seconds" python3 -m pytest "$file" --benchmark -q -p no:cacheprovider \
        --benchmark-json="$out/logs/$name.json" --benchmark-columns=median,iqr,rounds
done

jsons=$(ls "$out"/logs/bench_*.json 2>/dev/null)
if [ -n "$jsons" ]; then
    python3 bench/report.py $jsons --ceilings "$out/ceilings.json" > "$out/results.md"
    cat "$out/results.md"
fi
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
echo "stages failed: $failed"
exit $failed
