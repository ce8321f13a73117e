#!/usr/bin/env bash
# Everything zenith-fused needs a CUDA GPU for, in one time-boxed command that packs its evidence
# into one archive:
#
#   bash bench/gpu_check.sh [ARCHIVE_DIR]        # default: $OUT, else /tmp/zenith-gpu-check
#   python bench/unpack_gpu_results.py ARCHIVE_DIR/gpu-check.tar.gz   # -> bench/results/gpu-<device>-<date>/
#
# Stages, in priority order (a run cut short keeps the most important evidence), each under
# `timeout` with what is left of one budget (ZENITH_GPU_CHECK_SECONDS, default 300 s):
#
#   build       (background, from the start) compile csrc/ for this GPU, so that "cuda" is checked too
#   1 sync-graph  no host sync in a steady step(); CUDA-graph capture + replay bit-equal to eager steps
#   2 reference   triton and cuda against the reference: ResNet-50 and GPT-2 shapes, aligned and
#                 misaligned, an empty tensor
#   3 large       one bf16 tensor of 2^31 + 16 elements through the norm and the update, against torch
#   4 memcheck, racecheck   compute-sanitizer on three steps, where the tool exists
#   5 bandwidth   per-kernel GB/s of a real step against a device-to-device copy
#   6 bench       bench/step.py against SGD(fused=True), SGD(foreach=True) and a torch.compiled peer
#   7 report, launches   kernel_report.py for this GPU's architecture; the registers of real launches
#   8 tests       the tests that only a GPU runs
#
# Stages 1-3 run for "triton" while the extension builds, then for "cuda". All output goes to a
# temporary folder, packed into ARCHIVE_DIR/gpu-check.tar.gz when each stage starts and ends (a
# run killed outright still leaves the archive of the stage before) and on SIGTERM/SIGINT.
# Without a GPU every GPU stage prints "skipped (no GPU)" and only `selftest` runs: this file's and
# gpu_checks.py's code on the CPU, no GPU property.
#
# Exit status: 0 every stage passed; 1 a stage failed, timed out or was not reached; 2 no CUDA GPU
# (and the selftest passed).
#
# Environment: PYTHON (default python3); ZENITH_GPU_CHECK_SECONDS (budget, default 300);
# ZENITH_GPU_CHECK_STAGES (priorities to run, e.g. "5,6,7,8" to rerun what a first run did not
# reach; default all); ZENITH_GPU_CHECK_BUILD=0 (no extension build: "cuda" is skipped);
# ZENITH_GPU_CHECK_CACHE (a folder kept between runs on one machine, one run at a time, for the
# extension build and Triton's cache: a rerun on a warm machine compiles nothing again; default: a
# fresh one per run).
#
# It installs nothing: zenith_fused/, triton_kernels/ (as zenith_fused/triton_kernels/) and csrc/
# are copied into a folder on PYTHONPATH, with PYTHONSAFEPATH=1 so the checkout's zenith_fused/
# (which lacks triton_kernels) cannot shadow the copy.
set -u -o pipefail

ARCHIVE_DIR=${1:-${OUT:-${TMPDIR:-/tmp}/zenith-gpu-check}}
mkdir -p "$ARCHIVE_DIR" && ARCHIVE_DIR=$(cd "$ARCHIVE_DIR" && pwd)
ARCHIVE=$ARCHIVE_DIR/gpu-check.tar.gz
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
BUDGET=${ZENITH_GPU_CHECK_SECONDS:-300}
ONLY=${ZENITH_GPU_CHECK_STAGES:-}
MIN_STAGE=10  # a stage that would get fewer seconds than this is not started
T0=$SECONDS
DEADLINE=$((T0 + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/zenith-gpu-check.XXXXXX")
RES=$WORK/gpu-check  # what the archive holds
CACHE=${ZENITH_GPU_CHECK_CACHE:-$WORK/cache}
SITE=$WORK/site
mkdir -p "$RES" "$CACHE" "$SITE"
FAILED=0
STAGE_PID="" BUILD_PID="" BUILD_STATE=none CURRENT="" CURRENT_PRIO="" CURRENT_START=0 CURRENT_LIMIT=0

say() { printf '[%3ds] %s\n' $((SECONDS - T0)) "$*" | tee -a "$RES/console.log"; }
show() { tee -a "$RES/console.log"; }  # a command's lines to the console and its copy

pack() {  # the archive, replaced atomically: it is always a whole one
    tar -czf "$ARCHIVE.part" -C "$WORK" gpu-check 2>/dev/null && mv -f "$ARCHIVE.part" "$ARCHIVE"
}

# record PRIORITY STAGE VERDICT SECONDS LIMIT EXIT NOTE: one row of stages.tsv, the run's ledger.
record() {
    local note=${7//$'\t'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "${note//$'\n'/ }" >> "$RES/stages.tsv"
    case $3 in PASS|SKIP) ;; *) FAILED=1 ;; esac
    say "$2: $3 ${4}s - $7"
}

selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

verdict_of() {  # exit status -> verdict; gpu_checks.py exits 3 when nothing could run
    case $1 in 0) echo PASS ;; 3) echo SKIP ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

# run_stage PRIORITY NAME WANT CMD...: CMD under `timeout` for WANT seconds or what is left of the
# budget, output to NAME.log; sets RC and TOOK, or returns 1 (recorded) when it does not start.
run_stage() {
    local prio=$1 name=$2 want=$3; shift 3
    if ! selected "$prio"; then
        record "$prio" "$name" SKIP 0 0 - "not selected (ZENITH_GPU_CHECK_STAGES=$ONLY)"; return 1
    fi
    local left=$((DEADLINE > SECONDS ? DEADLINE - SECONDS : 0))
    local limit=$((want < left ? want : left))
    if ((limit < MIN_STAGE)); then
        record "$prio" "$name" CUT 0 0 - "not started: ${left}s of the ${BUDGET}s budget left"; return 1
    fi
    CURRENT=$name CURRENT_PRIO=$prio CURRENT_START=$SECONDS CURRENT_LIMIT=$limit
    say "$name: start, time box ${limit}s"
    printf '%s\t%s\t%s\n' "$prio" "$name" "$limit" > "$RES/running.tsv"
    pack
    # In the background, so that a signal reaches the trap at once, not when the stage ends.
    timeout -k 5 "$limit" "$@" > "$RES/$name.log" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID"
    RC=$?
    TOOK=$((SECONDS - CURRENT_START))
    STAGE_PID="" CURRENT=""
    : > "$RES/running.tsv"
}

# finish_stage PRIORITY NAME NOTE: record the stage that run_stage ran, show its failures, pack.
finish_stage() {
    local verdict
    verdict=$(verdict_of "$RC")
    ((RC == 124 || RC == 137)) && set -- "$1" "$2" "cut off by its ${CURRENT_LIMIT}s time box; $3"
    record "$1" "$2" "$verdict" "$TOOK" "$CURRENT_LIMIT" "$RC" "$3"
    if [[ $verdict == FAIL || $verdict == TIMEOUT ]]; then
        tail -n 15 "$RES/$2.log" | sed 's/^/    | /' | show
    fi
    pack
}

checks_note() {  # the PASS/FAIL/SKIP lines of a gpu_checks.py log, counted, and the first failure
    local log=$RES/$1.log
    printf '%s PASS, %s FAIL, %s SKIP%s' "$(grep -c '^PASS ' "$log")" "$(grep -c '^FAIL ' "$log")" \
        "$(grep -c '^SKIP ' "$log")" "$(grep -m1 '^FAIL ' "$log" | cut -c1-160 | sed 's/^/: /')"
}

# gpu_checks PRIORITY NAME WANT CHECK BACKENDS [ARGS...]: one gpu_checks.py stage.
gpu_checks() {
    local prio=$1 name=$2 want=$3 check=$4 backends=$5; shift 5
    run_stage "$prio" "$name" "$want" "${PKG_ENV[@]}" "${EXT_ENV[@]}" "$PY" bench/gpu_checks.py "$check" \
        --backends "$backends" --json "$RES/$name.json" "$@" || return
    grep -E '^(PASS|FAIL|SKIP) ' "$RES/$name.log" | cut -c1-300 | show
    finish_stage "$prio" "$name" "$(checks_note "$name")"
}

stop_children() {
    local pid
    for pid in $STAGE_PID $BUILD_PID; do kill -TERM "$pid" 2>/dev/null; done
    for pid in $STAGE_PID $BUILD_PID; do wait "$pid" 2>/dev/null; done
}

summary() {
    echo | show
    say "== gpu_check summary (${GPU_NAME:-no GPU}; $((SECONDS - T0))s of the ${BUDGET}s budget; archive $ARCHIVE)"
    { printf 'prio\tstage\tresult\tseconds\tlimit\texit\tnote\n'; cat "$RES/stages.tsv"; } \
        | awk -F'\t' '{ printf "%-4s %-18s %-8s %5s %5s  %s\n", $1, $2, $3, $4, $5, substr($7, 1, 110) }' | show
}

on_signal() {
    local sig=$1
    trap - TERM INT
    say "stopped by SIG$sig"
    stop_children
    if [[ -n $CURRENT ]]; then
        record "$CURRENT_PRIO" "$CURRENT" STOPPED $((SECONDS - CURRENT_START)) "$CURRENT_LIMIT" - "stopped by SIG$sig"
        : > "$RES/running.tsv"
    fi
    if [[ $BUILD_STATE == running ]]; then
        record 0 build STOPPED $(($(date +%s) - BUILD_T0)) "$build_limit" - "stopped by SIG$sig"
    fi
    echo "stopped: by SIG$sig after $((SECONDS - T0))s" >> "$RES/env.txt"
    summary
    pack
    rm -rf "$WORK"
    [[ $sig == TERM ]] && exit 143
    exit 130
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# ------------------------------------------------------------------ the plan and the package
# Every stage of a full run, so that the unpacked summary can name what was never reached.
printf '%s\t%s\n' 0 selftest 0 build 1 sync-graph-triton 2 reference-triton 3 large-triton 1 sync-graph-cuda \
    2 reference-cuda 3 large-cuda 4 memcheck 4 racecheck 5 bandwidth 6 bench 7 report 7 launches 8 tests \
    > "$RES/plan.tsv"
: > "$RES/stages.tsv"
: > "$RES/running.tsv"

say "zenith-fused gpu_check: budget ${BUDGET}s${ONLY:+, stages $ONLY}; archive $ARCHIVE"
cp -R zenith_fused "$SITE/zenith_fused"
rm -rf "$SITE/zenith_fused/triton_kernels"
cp -R triton_kernels "$SITE/zenith_fused/triton_kernels"
[[ -d csrc ]] && cp -R csrc "$SITE/csrc"  # zenith_fused/_ext.py compiles csrc/ beside the package
# What was built here is not for that GPU's interpreter: the build stage makes the extension.
find "$SITE" \( -name __pycache__ -prune -o -name '_C*.so' \) -exec rm -rf {} +
PKG_ENV=(env -u TRITON_INTERPRET PYTHONSAFEPATH=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
         PYTHONUNBUFFERED=1 ZENITH_FUSED_BUILD_EXT=0 TRITON_CACHE_DIR="$CACHE/triton")
EXT_ENV=()

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "budget_s: $BUDGET"
    echo "stages_selected: ${ONLY:-all}"
    echo "host: $(uname -n) $(uname -m), $(nproc 2>/dev/null || echo '?') CPUs"
    dirty=$(git -C "$REPO" status --porcelain -- zenith_fused triton_kernels csrc bench tests 2>/dev/null)
    commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'none (no .git)')
    echo "git: $commit${dirty:+ + uncommitted changes}"
    # The same digest unpack_gpu_results.py computes of a checkout, to say which sources ran.
    echo "sources_sha256: $(find zenith_fused triton_kernels csrc bench tests -type f \( -name '*.py' -o -name '*.cu' \
        -o -name '*.cpp' -o -name '*.h' -o -name '*.sh' \) -not -path '*/__pycache__/*' -print0 2>/dev/null \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
    timeout -k 5 60 "${PKG_ENV[@]}" "$PY" bench/gpu_checks.py env 2>&1
    echo "import_exit: $?"
    nvidia-smi --query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader 2>/dev/null \
        | sed 's/^/nvidia_smi: /'
} > "$RES/env.txt"
show < "$RES/env.txt"
GPU_NAME=$(sed -n 's/^gpu: //p' "$RES/env.txt")
[[ $GPU_NAME == none ]] && GPU_NAME=""
if grep -q '^import_exit: 0' "$RES/env.txt"; then
    say "package: copy on PYTHONPATH ($(sed -n 's/^zenith_fused: //p' "$RES/env.txt"))"
else
    say "the package does not import: $(grep -m1 '^zenith_fused' "$RES/env.txt")"
    FAILED=1
fi
pack

# ------------------------------------------------------------------ no GPU: the selftest only
if [[ -z $GPU_NAME ]]; then
    say "NO CUDA GPU visible to torch: every GPU stage is skipped"
    if run_stage 0 selftest 60 "${PKG_ENV[@]}" "$PY" bench/gpu_checks.py selftest --json "$RES/selftest.json"; then
        grep -E '^(PASS|FAIL|SKIP) ' "$RES/selftest.log" | cut -c1-200 | show
        finish_stage 0 selftest "$(checks_note selftest) (the checks' code on the CPU; no GPU property)"
    fi
    tail -n +2 "$RES/plan.tsv" | while IFS=$'\t' read -r prio name; do
        printf '%s\t%s\tSKIP\t0\t0\t-\tskipped (no GPU)\n' "$prio" "$name" >> "$RES/stages.tsv"
        say "$name: skipped (no GPU)"
    done
    summary
    if ((FAILED)); then
        say "RESULT: FAIL (no GPU; the selftest did not pass or the package did not import)"
    else
        say "RESULT: NO GPU (nothing GPU-related ran; the selftest passed)"
    fi
    pack
    rm -rf "$WORK"
    exit $((FAILED ? 1 : 2))
fi
printf '0\tselftest\tSKIP\t0\t0\t-\ta GPU is here: the stages themselves run\n' >> "$RES/stages.tsv"

# ------------------------------------------------------------------ the GPU stages
say "GPU: $GPU_NAME"
ARCH=$(sed -n 's/^capability: //p' "$RES/env.txt" | tr -d .)
NPROC=$(nproc 2>/dev/null || echo 8)

# The extension builds on the CPUs while stages 1-3 run Triton on the GPU.
build_limit=$(((DEADLINE - SECONDS) < 150 ? DEADLINE - SECONDS : 150))
if [[ ${ZENITH_GPU_CHECK_BUILD:-1} == 0 || ! -d $SITE/csrc ]]; then
    record 0 build SKIP 0 0 - "ZENITH_GPU_CHECK_BUILD=0 or no csrc/: the cuda backend is skipped"
elif ((build_limit < MIN_STAGE)); then
    record 0 build CUT 0 0 - "not started: ${build_limit}s of the ${BUDGET}s budget left"
    BUILD_STATE=cut
else
    say "build: start in the background, time box ${build_limit}s"
    BUILD_T0=$(date +%s)
    timeout -k 5 "$build_limit" "${PKG_ENV[@]}" ZENITH_FUSED_BUILD_EXT=1 TORCH_EXTENSIONS_DIR="$CACHE/ext" \
        MAX_JOBS="$NPROC" "$PY" bench/gpu_checks.py backend cuda > "$RES/build.log" 2>&1 &
    BUILD_PID=$!
    BUILD_STATE=running
fi

wait_for_build() {
    [[ $BUILD_STATE == running ]] || return
    say "build: waiting for it"
    wait "$BUILD_PID"
    local rc=$?
    BUILD_PID=""
    local verdict took
    verdict=$(verdict_of "$rc")
    [[ $verdict == SKIP ]] && verdict=FAIL
    # How long it ran, not how long until a stage needed it: its log's last write.
    took=$(($(stat -c %Y "$RES/build.log" 2>/dev/null || date +%s) - BUILD_T0))
    if [[ $verdict == PASS ]]; then
        BUILD_STATE=ready
        record 0 build PASS "$took" "$build_limit" 0 "$(tail -n 1 "$RES/build.log" | cut -c1-120)"
    else
        BUILD_STATE=failed
        tail -n 15 "$RES/build.log" | sed 's/^/    | /' | show
        record 0 build "$verdict" "$took" "$build_limit" "$rc" \
            "the cuda backend is skipped: $(grep -m1 -E 'unavailable|rror' "$RES/build.log" | cut -c1-140)"
    fi
    pack
}

cuda_stage() {  # PRIORITY NAME: record a cuda stage that cannot run, or return 0 when it can
    case $BUILD_STATE in
        ready) return 0 ;;
        none) record "$1" "$2" SKIP 0 0 - "no extension build (ZENITH_GPU_CHECK_BUILD=0 or no csrc/)" ;;
        *) record "$1" "$2" SKIP 0 0 - "the extension did not build (see build.log)" ;;
    esac
    return 1
}

gpu_checks 1 sync-graph-triton 40 sync-graph triton
gpu_checks 2 reference-triton 40 reference triton
gpu_checks 3 large-triton 30 large triton
wait_for_build
if [[ $BUILD_STATE == ready ]]; then
    EXT_ENV=(ZENITH_FUSED_BUILD_EXT=1 TORCH_EXTENSIONS_DIR="$CACHE/ext")
    BACKENDS=triton,cuda
else
    BACKENDS=triton
fi
cuda_stage 1 sync-graph-cuda && gpu_checks 1 sync-graph-cuda 25 sync-graph cuda
cuda_stage 2 reference-cuda && gpu_checks 2 reference-cuda 30 reference cuda
cuda_stage 3 large-cuda && gpu_checks 3 large-cuda 25 large cuda

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1)
for tool in memcheck racecheck; do
    if [[ -z $SANITIZER ]]; then
        record 4 "$tool" SKIP 0 0 - "compute-sanitizer not found"
        continue
    fi
    # Without torch's caching allocator every tensor is an allocation of its own, so memcheck sees
    # an access past a tensor's end instead of into its neighbour.
    run_stage 4 "$tool" 45 "${PKG_ENV[@]}" "${EXT_ENV[@]}" PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
        --tool "$tool" --error-exitcode 1 --print-limit 20 "$PY" bench/gpu_checks.py one-step \
        --backends "$BACKENDS" || continue
    grep -E '^(PASS|FAIL|SKIP) |(ERROR|RACECHECK) SUMMARY' "$RES/$tool.log" | cut -c1-200 | show
    finish_stage 4 "$tool" "$BACKENDS: $(grep -m1 -E '(ERROR|RACECHECK) SUMMARY' "$RES/$tool.log" | sed 's/^=* *//')"
done

if run_stage 5 bandwidth 30 "${PKG_ENV[@]}" "${EXT_ENV[@]}" "$PY" bench/gpu_checks.py bandwidth \
        --backends "$BACKENDS" --json "$RES/bandwidth.json"; then
    sed -n '/^backend /,/^PASS\|^FAIL/p' "$RES/bandwidth.log" | show
    finish_stage 5 bandwidth "$(checks_note bandwidth)"
fi

# step.py starts no new set after --time-budget and writes what it measured on SIGTERM.
bench_limit=$(((DEADLINE - SECONDS) < 60 ? DEADLINE - SECONDS : 60))
if run_stage 6 bench 60 "${PKG_ENV[@]}" "${EXT_ENV[@]}" "$PY" bench/step.py --device cuda \
        --sets resnet50,gpt2-small --dtypes fp32,bf16 \
        --methods 'zenith-fused-triton,zenith-fused-cuda,sgd-fused,sgd-foreach,zenith-compiled' \
        --out "$RES/bench" --name step-cuda --time-budget $((bench_limit > 25 ? bench_limit - 20 : 5)) \
        --compile-budget 25 --repeats 6 \
        --max-seconds-per-method 0.25 --count-steps 2; then
    sed -n '/^ms\/step/,$p' "$RES/bench.log" | show
    finish_stage 6 bench "$(grep -m1 '^== summary' "$RES/bench.log" | cut -c1-100)$(
        grep -m1 '^FAIL' "$RES/bench.log" | sed 's/^/; /')"
fi

if run_stage 7 report 45 "${PKG_ENV[@]}" "$PY" bench/kernel_report.py --arch "${ARCH:-90}" \
        --json "$RES/kernel-report.json"; then
    grep -E '^(FAIL|CUDA C\+\+)|kernels, ' "$RES/report.log" | show
    finish_stage 7 report "sm_${ARCH:-90}: $(grep -E 'kernels, [0-9]+ failures' "$RES/report.log" | tail -n 1)"
fi
gpu_checks 7 launches 30 launches "$BACKENDS" --report "$RES/kernel-report.json"

# The tests a CPU run skips or runs only in Triton's interpreter.
xdist=()
workers=$((NPROC / 2 > 8 ? 8 : (NPROC / 2 > 1 ? NPROC / 2 : 1)))
"${PKG_ENV[@]}" "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n "$workers")
per_test=()
"${PKG_ENV[@]}" "$PY" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout 60)
if run_stage 8 tests 45 "${PKG_ENV[@]}" "${EXT_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider \
        "${xdist[@]}" "${per_test[@]}" -k "(cuda and not test_cuda_build) or test_engines or test_step_paths" \
        --junitxml "$RES/tests.xml" tests; then
    result=$(grep -E '(passed|failed|error)' "$RES/tests.log" | tail -n 1 | tr -s '=' | cut -c1-100)
    show <<< "$result" > /dev/null
    finish_stage 8 tests "${result:-no result line (see tests.log)}"
fi

summary
if ((FAILED)); then say "RESULT: FAIL"; else say "RESULT: PASS"; fi
pack
rm -rf "$WORK"
exit $((FAILED ? 1 : 0))
