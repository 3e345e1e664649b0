#!/usr/bin/env bash
# One prepared run for a GPU machine with no network (../shared/MEASURING.md):
# install the project over the packages already there, print versions and the
# GPU, measure the device's ceilings, run the CUDA tests (real Triton
# compilation catches what the interpreter cannot), then the benchmarks in a
# short mode, and write JSON + a markdown table into OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Order: what is unmeasured and matters most comes first, so a run cut short
# still answers the open questions: install, ceilings, cuda-tests, then
# bench_train (issue 7's goal: full stack vs torchvision + torch.compile),
# profile (where ResNet-50's training step goes, torchvision + compile against
# fastresnet's stack: python -m fastresnet.profile), bench_convert,
# bench_fused_train_step, bench_bn_act, bench_fused_blocks, bench_conv, then
# every other bench_*.py.
#
# Time: each stage has a limit (its default below, or STAGE_SECONDS for all
# benchmark stages) and the run a budget (TOTAL_SECONDS): a stage gets at most
# what is left, so the run ends in time. A stage that runs out gets SIGINT
# first, so pytest still writes the benchmarks it finished.
# Switches: CUDA_TEST_SECONDS (the CUDA tests' limit), BENCH_FILES (space-separated
# benchmark files, in order; FILE@WORDS runs the cases that `pytest -k WORDS` selects, e.g.
# bench/bench_fused_train_step.py@eager; the entries `profile` and `tune` are those stages; BENCH_FILES="" runs
# none), SKIP_STAGES (e.g.
# "ceilings cuda-tests" for a second call), PYTEST_WORKERS (parallel CUDA tests, default 8;
# 0 = serial).
#
# Seconds per stage, expected on an H100/H200 (bench/RESULTS.md run 2 on the H200, serial tests):
#   install 10-20 | ceilings 20-30 | cuda-tests ~260 serial in run 2 (about 70% more tests since), -n 8 (Triton and
#   inductor compiles dominate; 16 CPU cores) | bench_train ~200-260 (two ResNet-50
#   training-step compiles in short mode, plus the fused blocks' per-shape tuning of 8
#   block shapes x 4 paths, Triton compiles included) |
#   profile ~60-90 after bench_train (3 profiled steps per provider after 2 warm-up steps; it builds the same
#   two compiled graphs and fused blocks as bench_train, so inductor's caches and the dispatch cache hold
#   them: without them it pays bench_train's ~200 s itself) |
#   bench_convert ~60-90 (one ResNet-50 inference compile) | bench_fused_train_step ~200
#   (two training-step compiles; inductor's cache helps on the same machine) | bench_bn_act,
#   bench_fused_blocks, bench_conv 40-90 each | bench_models, bench_data, bench_experiments 60-90.
#
# Fitting 15 minutes of device time (machine start 1-2 min each, counted): two calls, the
# exact commands in bench/RESULTS.md ("Next GPU run"):
#   call 1 (timeout_s 570): TOTAL_SECONDS=540 bash bench/gpu_check.sh $OUT
#       -> install, ceilings, cuda-tests (150 s), bench_train (260 s or what is left), profile (~60-90 s)
#   call 2 (timeout_s 180), issued at once so the machine is still warm (30 s):
#       TOTAL_SECONDS=160 SKIP_STAGES="ceilings cuda-tests" BENCH_FILES="bench/bench_bn_act.py
#       bench/bench_convert.py" bash bench/gpu_check.sh $OUT
#   Warm: start (60-120 s) + 570 + 180 <= 870 s. If call 2 would have to start a machine again,
#   skip it (two starts do not fit with the profile in call 1).
#
# Extra wheels (no network there): a git-ignored wheels/ folder at the repo root is
# installed first when it holds any (the GPU image already has pytest-xdist and execnet;
# nvidia-cudnn-frontend it lacks). Fill it on the CPU machine before the GPU call:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d wheels/ pytest-xdist execnet nvidia-cudnn-frontend
# and name wheels in the run's carry list (it is ignored, so it travels only when carried).
#
# Exit status: 0 when every stage passed, else the number that failed.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
total_seconds=${TOTAL_SECONDS:-480}
workers=${PYTEST_WORKERS:-8}  # 16 CPU cores there: Triton compiles dominate the CUDA tests
skip_stages=" ${SKIP_STAGES:-} "
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
# Benchmarks keep their dispatch decisions in the machine's cache (a second call on a warm
# machine reuses them); the tests get their own (contended timings must not reach the benchmarks).
bench_cache=${FASTRESNET_CACHE_DIR:-$HOME/.cache/fastresnet}
export PYTHONUNBUFFERED=1 FASTRESNET_BENCH_SHORT=1 FASTRESNET_CACHE_DIR="$bench_cache"
# Every candidate competes, the experimental shelf's too (fastresnet.experimental: a default run reaches
# only the main tree's, which have run on a GPU): a GPU run is where they are measured. Their first calls
# are checked against a main-tree path; grep the logs for "is off the reference". The tests set the switch
# themselves (tests/experimental runs with it).
export FASTRESNET_EXPERIMENTAL="${FASTRESNET_EXPERIMENTAL:-1}"
# inductor's FX-graph and AOT-autograd caches (default on in torch 2.11): a graph compiled by
# one stage (torchvision's ResNet-50 step in bench_train) is loaded, not recompiled, by the next.
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
failed=0

stage_limit() {  # stage_limit NAME: the default seconds of a stage
    case $1 in
        install) echo 90 ;;
        ceilings) echo 60 ;;
        cuda-tests) echo "${CUDA_TEST_SECONDS:-150}" ;;
        bench_train | bench_fused_train_step) echo "${STAGE_SECONDS:-260}" ;;
        profile) echo "${PROFILE_SECONDS:-120}" ;;
        tune) echo "${TUNE_SECONDS:-300}" ;;
        *) echo "${STAGE_SECONDS:-100}" ;;
    esac
}

stage() {  # stage NAME COMMAND...: run with a time limit, log to OUTDIR/logs/NAME.log
    local name=$1
    shift
    if [[ $skip_stages == *" $name "* ]]; then
        echo "=== $name: skipped (SKIP_STAGES)"
        return
    fi
    local seconds left=$((total_seconds - SECONDS))
    seconds=$(stage_limit "$name")
    [ "$seconds" -le "$left" ] || seconds=$left
    if [ "$seconds" -lt 10 ]; then
        echo "=== $name: skipped, the run's budget of ${total_seconds}s is spent"
        failed=$((failed + 1))
        return
    fi
    echo "=== $name (limit ${seconds}s, at ${SECONDS}s)"
    local start=$SECONDS
    timeout -s INT -k 15 "$seconds" "$@" > "$out/logs/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$out/logs/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

install_project() {
    local wheels
    wheels=$(ls wheels/*.whl 2>/dev/null)
    if [ -n "$wheels" ]; then  # idempotent: a wheel already installed at its version is left alone
        python3 -m pip install --no-deps --no-index --no-compile $wheels ||
            echo "wheels/: install failed; going on without them"
    fi
    python3 -m pip install --no-deps --no-build-isolation -e .
}

run_cuda_tests() {
    local parallel=()
    if [ "$workers" -gt 0 ] && python3 -c "import xdist" 2>/dev/null; then
        parallel=(-n "$workers")  # tests/conftest.py gives each worker its own dispatch cache
    fi
    FASTRESNET_CACHE_DIR="$out/logs/test-cache" python3 -m pytest tests -m cuda -q -p no:cacheprovider -rfE \
        --durations=15 "${parallel[@]}"
}

# The profile of ResNet-50's training step at batch 256, bf16, channels_last, compiled, fused blocks on
# (as bench_train's short mode): traces into logs/ (archived), profile.md/png/json beside the results.
run_profile() {
    python3 -m fastresnet.profile --model resnet50 --data.backend synthetic --data.batch_size 256 \
        --data.image_size 224 --amp bf16 --channels_last true --compile default --fused_blocks on \
        --providers torchvision+compile,fastresnet --steps 3 --warmup_steps 2 --out "$out/logs/profile" &&
        cp "$out"/logs/profile/profile.{md,png,json} "$out"/
}

# Every choice of that ResNet-50 run made ahead (python -m fastresnet.tune) from an empty cache of its own,
# so that its wall time is what a first run on a fresh machine pays; the decisions exported beside the results.
run_tune() {
    local started=$SECONDS
    FASTRESNET_CACHE_DIR="$out/logs/tune-cache" python3 -m fastresnet.tune --model resnet50 --data.backend synthetic \
        --data.batch_size 256 --data.image_size 224 --amp bf16 --channels_last true --compile default \
        --fused_blocks on --export "$out/decisions.json" > "$out/logs/tune.md" &&
        echo "tuning from an empty cache: $((SECONDS - started)) s" | tee -a "$out/logs/tune.md"
}

benchmark_files() {  # the default order: the open questions first, then every other file
    local first="bench/bench_train.py profile bench/bench_convert.py bench/bench_fused_train_step.py
        bench/bench_bn_act.py bench/bench_fused_blocks.py bench/bench_conv.py tune" file
    echo $first
    for file in bench/bench_*.py; do
        [[ " $(echo $first) " == *" $file "* ]] || echo "$file"
    done
}

# `timeout` runs programs, not shell functions: the functions go through bash -c.
export -f install_project run_cuda_tests run_profile run_tune
export out workers
stage install bash -c install_project
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
stage ceilings python3 bench/ceilings.py --out "$out/ceilings.json"
stage cuda-tests bash -c run_cuda_tests
files=${BENCH_FILES-$(benchmark_files)}
for entry in $files; do  # FILE, FILE@KEYWORDS (pytest -k KEYWORDS), profile or tune
    if [ "$entry" = profile ] || [ "$entry" = tune ]; then
        stage "$entry" bash -c "run_$entry"
        continue
    fi
    file=${entry%%@*}
    name=$(basename "$file" .py)
    select=()
    if [[ $entry == *@* ]]; then
        select=(-k "${entry#*@}")
        name+="-$(printf '%s' "${entry#*@}" | tr -c 'A-Za-z0-9_.-' '_')"
    fi
    stage "$name" python3 -m pytest "$file" "${select[@]}" --benchmark -q -p no:cacheprovider \
        --benchmark-json="$out/logs/$name.json" --benchmark-columns=median,iqr,rounds
done

jsons=$(ls "$out"/logs/bench_*.json 2>/dev/null)
if [ -n "$jsons" ]; then
    ceilings=()
    [ -f "$out/ceilings.json" ] && ceilings=(--ceilings "$out/ceilings.json")
    python3 bench/report.py $jsons "${ceilings[@]}" > "$out/results.md"
    cat "$out/results.md"
fi
[ -d "$bench_cache" ] && cp -r "$bench_cache" "$out/logs/dispatch-cache"
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
echo "stages failed: $failed"
exit $failed
