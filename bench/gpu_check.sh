#!/usr/bin/env bash
# Everything zenith-fused needs a CUDA GPU for, in one time-boxed command:
#
#   bash bench/gpu_check.sh OUT_DIR
#
#   build   (background) compile csrc/'s extension for this GPU (torch.utils.cpp_extension), so the
#           "cuda" backend is checked and measured too; skipped if csrc/ is absent
#   pytest  the test suite on CUDA with real Triton compilation (TRITON_INTERPRET unset)
#   checks  bench/gpu_checks.py: no host sync in step(), CUDA-graph capture and replay
#   report  bench/kernel_report.py --arch <this GPU's>: registers, spills, load/store widths of every
#           kernel specialization, compiled ahead of time -> OUT_DIR/kernel-report.json
#   bandwidth  bench/gpu_checks.py --bandwidth: achieved GB/s of each Triton kernel (CUDA events),
#           fp32/bf16, aligned/unaligned, a few sizes, next to torch's copy -> OUT_DIR/bandwidth.json
#   bench   bench/step.py on every set, fp32 and bf16 -> OUT_DIR/bench/step-cuda.{json,png}
#
# For a machine with torch and Triton installed and no network: it installs nothing. The package
# is made importable by copying zenith_fused/ and triton_kernels/ into a temporary folder laid out
# as installed (zenith_fused/triton_kernels/) on PYTHONPATH, with PYTHONSAFEPATH=1 so the
# checkout's own zenith_fused/ (which lacks triton_kernels) cannot shadow it.
#
# Each stage runs under `timeout` within one overall budget, logs to OUT_DIR/<stage>.log, and a
# failed stage does not stop the next. A summary table comes last.
# Exit status: 0 all stages passed; 1 a stage failed or timed out; 2 no CUDA GPU (then only the
# CPU-safe parts run: the import, gpu_checks.py --cpu-dry-run, kernel_report.py --arch 90,
# step.py --quick --device cpu).
#
# Environment: PYTHON (default python3); ZENITH_GPU_CHECK_SECONDS (overall budget, default 400);
# ZENITH_GPU_CHECK_BUILD=0 (skip the extension build); ZENITH_GPU_CHECK_PIP=1 (first try
# `pip install --no-deps --no-build-isolation --no-index -e .`, falling back to the copy: off by
# default, since it builds the extension through setup.py with no time box of its own and writes
# into the interpreter's environment).
set -u -o pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PY=${PYTHON:-python3}
BUDGET=${ZENITH_GPU_CHECK_SECONDS:-400}
T0=$SECONDS
DEADLINE=$((T0 + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/zenith-gpu-check.XXXXXX")
SITE=$WORK/site
SUMMARY=()
FAILED=0

say() { printf '[%3ds] %s\n' $((SECONDS - T0)) "$*"; }

record() {  # stage verdict seconds note
    SUMMARY+=("$(printf '%-8s %-8s %5ss  %s' "$1" "$2" "$3" "$4")")
    case $2 in PASS|SKIP) ;; *) FAILED=1 ;; esac
}

time_box() {  # wanted_seconds seconds_to_keep_for_later_stages -> seconds this stage may take
    local left=$((DEADLINE - SECONDS - $2))
    echo $(( $1 < left ? $1 : left ))
}

verdict_of() {  # exit status -> verdict
    case $1 in 0) echo PASS ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

# run_stage NAME LIMIT CMD...: run under timeout, log to OUT/NAME.log; sets RC and TOOK.
run_stage() {
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    if (( limit < 5 )); then
        RC=124; TOOK=0
        say "$name: no time left in the ${BUDGET}s budget" | tee "$OUT/$name.log"
        return
    fi
    say "$name: start, time box ${limit}s, log $OUT/$name.log"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC=$?
    TOOK=$((SECONDS - start))
    say "$name: exit $RC after ${TOOK}s"
}

# ------------------------------------------------------------------ make the package importable
# ZENITH_FUSED_BUILD_EXT=0: no stage compiles the extension on first use behind its own time box;
# the build stage below does it (its =1 and EXT_ENV's come later on the command line and win).
PKG_ENV=(env -u TRITON_INTERPRET PYTHONSAFEPATH=1 ZENITH_FUSED_BUILD_EXT=0)
probe='import zenith_fused, zenith_fused.triton_kernels, zenith_fused._engines; print(zenith_fused.__file__)'
setup_note=""
if [[ ${ZENITH_GPU_CHECK_PIP:-0} == 1 ]]; then
    run_stage pip "$(time_box 150 200)" "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    if (( RC == 0 )) && where=$(cd "$WORK" && "${PKG_ENV[@]}" "$PY" -c "$probe" 2>/dev/null); then
        setup_note="pip install -e . ($where)"
    else
        say "pip install failed or left the package unimportable (exit $RC): using the copy"
    fi
fi
if [[ -z $setup_note ]]; then
    mkdir -p "$SITE"
    cp -R zenith_fused "$SITE/zenith_fused"
    rm -rf "$SITE/zenith_fused/triton_kernels"
    cp -R triton_kernels "$SITE/zenith_fused/triton_kernels"
    # zenith_fused/_ext.py compiles the extension from csrc/ next to the package's parent folder.
    [[ -d csrc ]] && cp -R csrc "$SITE/csrc"
    find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
    PKG_ENV+=(PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}")
fi
if where=$("${PKG_ENV[@]}" "$PY" -c "$probe" 2> "$OUT/import.log"); then
    setup_note=${setup_note:-"copy on PYTHONPATH: $where"}
    record import PASS 0 "$setup_note"
else
    record import FAIL 0 "the package does not import: see $OUT/import.log"
    cat "$OUT/import.log"
fi
say "package: $setup_note"

HAS_GPU=0
gpu_name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
if [[ -n $gpu_name ]]; then
    HAS_GPU=1
    "$PY" -c 'import torch, triton; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")' 2>&1
    say "GPU: $gpu_name"
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>/dev/null
else
    say "NO CUDA GPU visible to torch: running the CPU-safe parts only"
fi

# ------------------------------------------------------------------ stages
if (( HAS_GPU )); then
    # The extension builds on the CPUs while pytest mostly waits on the GPU. pytest itself does
    # not use it (it would block on the build's lock); the checks and the benchmark do.
    build_pid=""
    EXT_ENV=()
    if [[ ${ZENITH_GPU_CHECK_BUILD:-1} != 0 && -d "$SITE/csrc" ]]; then
        build_limit=$(time_box 120 220)
        say "build: start in the background, time box ${build_limit}s, log $OUT/build.log"
        build_start=$SECONDS
        ( timeout -k 10 "$build_limit" "${PKG_ENV[@]}" ZENITH_FUSED_BUILD_EXT=1 TORCH_EXTENSIONS_DIR="$WORK/ext" \
            MAX_JOBS="${MAX_JOBS:-8}" "$PY" -c '
import sys
from zenith_fused import _ext
reason = _ext.unavailable_reason("cuda")
print(reason or "the cpu and cuda kernels of csrc/ are built and load")
sys.exit(1 if reason else 0)' > "$OUT/build.log" 2>&1 ) &
        build_pid=$!
    elif [[ -n $setup_note && $setup_note == pip* ]]; then
        record build SKIP 0 "pip install -e . built what setup.py builds"
    else
        record build SKIP 0 "ZENITH_GPU_CHECK_BUILD=0 or no csrc/"
    fi

    xdist=()
    "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 4)
    per_test=()
    "$PY" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout 90)
    run_stage pytest "$(time_box 110 220)" "${PKG_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider \
        "${xdist[@]}" "${per_test[@]}" --durations=5 tests
    tail -n 25 "$OUT/pytest.log"
    note=$(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -n 1 | tr -s '=' | cut -c1-90)
    [[ -z $note ]] && note="no result line; progress $(grep -oE '\[ *[0-9]+%\]' "$OUT/pytest.log" | tail -n 1)"
    record pytest "$(verdict_of $RC)" "$TOOK" "$note"

    if [[ -n $build_pid ]]; then
        wait "$build_pid"; build_rc=$?
        tail -n 3 "$OUT/build.log"
        if (( build_rc == 0 )); then
            EXT_ENV=(ZENITH_FUSED_BUILD_EXT=1 TORCH_EXTENSIONS_DIR="$WORK/ext")
            record build PASS $((SECONDS - build_start)) "csrc/ extension built: the cuda backend runs below"
        else
            record build "$(verdict_of $build_rc)" $((SECONDS - build_start)) \
                "$(tail -n 1 "$OUT/build.log" | cut -c1-100) (the cuda backend is skipped below)"
        fi
    fi

    run_stage checks "$(time_box 45 175)" "${PKG_ENV[@]}" "${EXT_ENV[@]}" "$PY" bench/gpu_checks.py
    grep -E '^(PASS|FAIL|SKIP)' "$OUT/checks.log"
    (( RC != 0 )) && tail -n 20 "$OUT/checks.log"
    record checks "$(verdict_of $RC)" "$TOOK" "$(grep -c '^PASS' "$OUT/checks.log") PASS, $(grep -c '^FAIL' "$OUT/checks.log") FAIL"

    arch=$("$PY" -c 'import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)' 2>/dev/null)
    run_stage report "$(time_box 40 135)" "${PKG_ENV[@]}" "$PY" bench/kernel_report.py --arch "${arch:-90}" \
        --json "$OUT/kernel-report.json"
    grep -E '^(FAIL|CUDA C\+\+)|kernels, ' "$OUT/report.log"
    record report "$(verdict_of $RC)" "$TOOK" "sm_${arch:-90}: $(grep -E 'kernels, ' "$OUT/report.log" | tail -n 1)"

    run_stage bandwidth "$(time_box 60 75)" "${PKG_ENV[@]}" "$PY" bench/gpu_checks.py --bandwidth "$OUT/bandwidth.json" \
        --bandwidth-budget 45
    sed -n '/^kernel /,$p' "$OUT/bandwidth.log"
    (( RC != 0 )) && tail -n 15 "$OUT/bandwidth.log"
    record bandwidth "$(verdict_of $RC)" "$TOOK" "$OUT/bandwidth.json"

    limit=$(time_box 180 0)
    run_stage bench "$limit" "${PKG_ENV[@]}" "${EXT_ENV[@]}" "$PY" bench/step.py --device cuda --dtypes fp32,bf16 \
        --out "$OUT/bench" --time-budget $((limit > 60 ? limit - 40 : limit / 2)) --compile-budget 30 \
        --compile-max-tensors 300 --repeats 6 --max-seconds-per-method 0.3
    grep '^== summary' "$OUT/bench.log"
    sed -n '/^ms\/step/,$p' "$OUT/bench.log"
    grep -E '^(FAIL|note)' "$OUT/bench.log"
    (( RC != 0 )) && tail -n 15 "$OUT/bench.log"
    record bench "$(verdict_of $RC)" "$TOOK" "$(grep -c '^  skip' "$OUT/bench.log") skips; $OUT/bench/step-cuda.{json,png}"
else
    record pytest SKIP 0 "no GPU (CI runs the suite on the CPU)"
    run_stage checks "$(time_box 60 60)" "${PKG_ENV[@]}" "$PY" bench/gpu_checks.py --cpu-dry-run --backends reference,cpu
    grep -E '^(PASS|FAIL|SKIP)' "$OUT/checks.log"
    record checks "$(verdict_of $RC)" "$TOOK" "CPU dry run of the check sequences (no sync mode, no graph)"
    run_stage report "$(time_box 60 90)" "${PKG_ENV[@]}" "$PY" bench/kernel_report.py --arch 90 \
        --json "$OUT/kernel-report.json"
    grep -E '^(FAIL|CUDA C\+\+)|kernels, ' "$OUT/report.log"
    record report "$(verdict_of $RC)" "$TOOK" "sm_90 ahead of time: $(grep -E 'kernels, ' "$OUT/report.log" | tail -n 1)"
    run_stage bench "$(time_box 90 0)" "${PKG_ENV[@]}" "$PY" bench/step.py --quick --device cpu --out "$OUT/bench"
    sed -n '/^ms\/step/,$p' "$OUT/bench.log"
    record bench "$(verdict_of $RC)" "$TOOK" "--quick --device cpu -> $OUT/bench/step-cpu-quick.{json,png}"
fi

# ------------------------------------------------------------------ summary
echo
echo "== gpu_check summary (${gpu_name:-no GPU}; $((SECONDS - T0))s of ${BUDGET}s; logs in $OUT)"
printf '%-8s %-8s %6s  %s\n' stage result time note
printf '%s\n' "${SUMMARY[@]}"
rm -rf "$WORK"
if (( FAILED )); then
    echo "RESULT: FAIL"
    exit 1
fi
if (( ! HAS_GPU )); then
    echo "RESULT: NO GPU (CPU-safe parts passed; GPU stages not run)"
    exit 2
fi
echo "RESULT: PASS"
exit 0
