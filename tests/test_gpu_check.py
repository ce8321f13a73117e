"""bench/gpu_check.sh and bench/unpack_gpu_results.py on a machine without a GPU, and the helpers of
bench/gpu_checks.py that need none.

Without a GPU the script must say of every GPU stage that it was skipped, run only its selftest,
and still pack one archive, also when it is stopped or its budget is spent; the unpack script
must make a results folder with a summary from any of those archives.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))
import gpu_checks  # noqa: E402
import unpack_gpu_results  # noqa: E402

GPU_STAGES = ("build", "sync-graph-triton", "reference-triton", "large-triton", "sync-graph-cuda", "reference-cuda",
              "large-cuda", "memcheck", "racecheck", "bandwidth", "bench", "report", "launches", "tests")
# What the GPU stages print when they ran; a run without a GPU must print none of it.
GPU_CLAIMS = ("no synchronizing call", "replays vs", "capture +", "GB/s as a share", "registers launched",
              "ERROR SUMMARY")

needs_no_gpu = pytest.mark.skipif(
    torch.cuda.is_available() or not all(shutil.which(tool) for tool in ("bash", "tar", "timeout", "sha256sum")),
    reason="runs the no-GPU path of bench/gpu_check.sh (needs bash, tar, timeout, sha256sum and no CUDA GPU)")


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path / "tmp"), **extra)
    return env


def unpack(archive: Path, dest: Path) -> Path:
    proc = subprocess.run([sys.executable, str(BENCH / "unpack_gpu_results.py"), str(archive), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = Path(proc.stdout.splitlines()[0])
    assert folder.parent == dest and (folder / "README.md").exists()
    return folder


@needs_no_gpu
def test_without_a_gpu_every_gpu_stage_is_skipped_and_one_archive_unpacks(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out)], cwd=tmp_path, env=script_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log[-4000:]
    assert took < 120
    for stage in GPU_STAGES:
        assert f"{stage}: skipped (no GPU)" in proc.stdout, stage
    assert "selftest: PASS" in proc.stdout and "RESULT: NO GPU" in proc.stdout
    for claim in GPU_CLAIMS:
        assert claim not in proc.stdout, claim
    assert sorted(os.listdir(out)) == ["gpu-check.tar.gz"]
    assert not list((tmp_path / "tmp").glob("zenith-gpu-check.*"))  # the work folder is gone

    folder = unpack(out / "gpu-check.tar.gz", tmp_path / "results")
    assert folder.name.startswith("gpu-no-gpu-20")
    readme = (folder / "README.md").read_text()
    assert "**No GPU: nothing GPU-related ran.**" in readme
    assert "| 0 | selftest | PASS |" in readme
    for stage in GPU_STAGES:
        assert f"| {stage} | SKIP | 0 | 0 | - | skipped (no GPU) |" in readme, stage
    assert "Nothing: every planned stage finished." in readme
    for name in ("env.txt", "plan.tsv", "stages.tsv", "console.log", "selftest.log", "selftest.json"):
        assert (folder / name).is_file(), name
    # A second archive of the same device and day gets a folder of its own.
    assert unpack(out / "gpu-check.tar.gz", tmp_path / "results").name == folder.name + "-2"


@needs_no_gpu
def test_a_spent_budget_starts_no_stage_and_still_packs(tmp_path):
    out = tmp_path / "out"  # through $OUT, as on the device machine
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=tmp_path,
                          env=script_env(tmp_path, OUT=str(out), ZENITH_GPU_CHECK_SECONDS="0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "selftest: CUT" in proc.stdout
    readme = (unpack(out / "gpu-check.tar.gz", tmp_path / "results") / "README.md").read_text()
    assert "- `selftest`: CUT, not started: 0s of the 0s budget left" in readme


@needs_no_gpu
def test_a_stopped_run_still_leaves_an_archive_that_names_the_stopped_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(BENCH / "gpu_check.sh"), str(out)], cwd=tmp_path, env=script_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "selftest: start" in line:  # its Python is still importing torch
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 143, rest[-4000:]
    finally:
        proc.kill()
    assert "stopped by SIGTERM" in rest
    assert sorted(os.listdir(out)) == ["gpu-check.tar.gz"]
    readme = (unpack(out / "gpu-check.tar.gz", tmp_path / "results") / "README.md").read_text()
    assert "**The run was stopped by SIGTERM after" in readme
    assert "- `selftest`: STOPPED, stopped by SIGTERM" in readme
    assert "- `sync-graph-triton`: never reached" in readme


def test_unpack_refuses_members_outside_its_folder(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"x"
        member = tarfile.TarInfo("gpu-check/../../escaped.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match="unexpected member 'gpu-check/../../escaped.txt'"):
        unpack_gpu_results.unpack(archive, tmp_path / "results")
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "results").iterdir()) == []


def test_device_slug_names_the_gpu_model():
    assert unpack_gpu_results.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert unpack_gpu_results.device_slug("NVIDIA H200") == "h200"
    assert unpack_gpu_results.device_slug("none") == "no-gpu"


def test_kernel_records_classify_triton_and_cuda_kernels_and_keep_registers():
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "_sq_norm_partials_kernel", "dur": 12.5,
         "args": {"registers per thread": 32, "grid": [100, 1, 1], "block": [128, 1, 1]}},
        {"cat": "kernel", "name": "void zenith_fused::(anonymous namespace)::momentum_update_kernel<float, true>"
                                 "(long const*, long const*)", "dur": 40.0, "args": {"registers per thread": 40}},
        {"cat": "kernel", "name": "_update_history_kernel", "dur": 2.0, "args": {}},
        {"cat": "kernel", "name": "at::native::vectorized_elementwise_kernel", "dur": 1.0, "args": {}},
        {"cat": "cpu_op", "name": "aten::copy_", "dur": 5.0},
    ]}
    records = gpu_checks.kernel_records(trace)
    assert [(r["kind"], r["us"], r["registers"]) for r in records] == [
        ("norm", 12.5, 32), ("update", 40.0, 40), ("history", 2.0, None), (None, 1.0, None)]
    assert records[0]["block"] == [128, 1, 1]


def test_report_key_names_the_kernel_report_row_of_a_launch():
    launch = {"kind": "update", "name": "_momentum_update_kernel"}
    assert gpu_checks.report_key("triton", launch, "bfloat16", False, False) == (
        "triton", "momentum_update[no momentum]", "bfloat16", False)
    assert gpu_checks.report_key("triton", {"kind": "history", "name": "_update_history_kernel"}, "float16", True,
                                 True) == ("triton", "update_history", "float32", None)
    cuda = {"kind": "norm", "name": "void zenith_fused::(anonymous namespace)::sq_norm_partials_kernel<float>"
                                    "(long const*, long const*, long, float*)"}
    assert gpu_checks.report_key("cuda", cuda, "float32", True, True) == (
        "nvcc", "cuda:sq_norm_partials_kernel<float>", "float32", None)


def test_bf16_ulps_counts_representable_steps_across_zero():
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    next_up = torch.tensor([1 + 2**-7], dtype=torch.bfloat16)
    assert gpu_checks.bf16_ulps(one, next_up).item() == 1
    zero, negative_zero = torch.zeros(1, dtype=torch.bfloat16), -torch.zeros(1, dtype=torch.bfloat16)
    assert gpu_checks.bf16_ulps(zero, negative_zero).item() == 0
    tiny = torch.tensor([2**-133], dtype=torch.bfloat16)  # the smallest subnormal
    assert gpu_checks.bf16_ulps(tiny, -tiny).item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tolerance_excess_flags_what_is_over_and_what_is_not_finite(dtype):
    start = torch.ones(4, dtype=dtype)
    expected = torch.tensor([1.0, 2.0, -3.0, 0.5], dtype=dtype)
    assert gpu_checks.tolerance_excess(expected.clone(), expected, start, dtype, steps=5)[2] == 0
    actual = expected.clone()
    actual[1] = 2.5
    actual[3] = float("nan")
    _, excess, over = gpu_checks.tolerance_excess(actual, expected, start, dtype, steps=5)
    assert over == 2 and excess > 0
