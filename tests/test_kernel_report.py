"""bench/kernel_report.py: every Triton specialization compiles for sm_90 and sm_80 without a GPU,
with no spills, 128-bit loads and stores in the aligned float32/bfloat16/float16 streaming kernels,
no FMA in the update, and the CUDA C++ kernels compiled by nvcc where it exists."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KEYS = {"kernel", "dtype", "aligned", "registers", "spills", "load_bits", "store_bits"}


@pytest.mark.parametrize("arch", [90, 80])
def test_kernel_report(arch, tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernel_report.py"), "--arch", str(arch),
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["arch"] == arch and report["errors"] == []
    rows = report["rows"]
    assert all(KEYS <= row.keys() for row in rows)
    triton = [r for r in rows if r["source"] == "triton"]
    # 4 dtypes x aligned/unaligned x (norm, update with and without momentum), float32's mixed
    # table (one aligned tensor, one at an odd offset) x the same 3, and 8 history flag sets.
    assert len(triton) == 4 * 2 * 3 + 3 + 8
    assert len({(r["kernel"], r["dtype"], r["aligned"]) for r in triton}) == len(triton)
    for r in rows:
        assert r["spills"] == 0 and r["registers"] > 0, r
    for r in triton:
        base = r["kernel"].split("[")[0]
        if base != "update_history":
            # Any aligned tensor: the per-tensor 128-bit path is compiled in; none: scalar only.
            assert r["vectorize"] == (r["aligned"] is not False), r
        if r["aligned"] in (True, "mixed") and r["dtype"] in ("float32", "bfloat16", "float16"):
            assert r["load_bits"] == 128, r
            if base == "momentum_update":
                assert r["store_bits"] == 128, r
        if r["aligned"] is False and base != "update_history":
            # The general kernel's data accesses are scalar (the 64-bit ones are the int64 table).
            assert r["load_bits"] <= 64, r
        if base == "momentum_update":
            assert r["fma"] == 0, r
        assert r["registers"] <= 64, r  # at least half the SM's warps resident
    if shutil.which("nvcc"):
        assert any(r["source"] == "nvcc" for r in rows), proc.stdout[-2000:]
    else:
        assert "nvcc not found" in proc.stdout
