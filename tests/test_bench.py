"""bench/step.py keeps running: its --quick mode on the CPU writes rows, a chart and passing checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_step_quick_cpu_writes_rows_and_chart(tmp_path):
    env = dict(os.environ)
    # The benchmark measures compiled code only; the Triton interpreter is no measurement.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "step.py"), "--quick", "--device", "cpu", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    report = json.loads((tmp_path / "step-cpu-quick.json").read_text())
    rows = report["rows"]
    for method in ("zenith-fused-reference", "sgd-foreach", "zenith-host-sync"):
        timed = [r for r in rows if r["method"] == method]
        assert timed, f"no row for {method}; methods: {sorted({r['method'] for r in rows})}"
        assert all(r["median_ms"] > 0 and r["gb_per_s"] > 0 for r in timed), timed
    assert all(r["ratio_to_baseline"] is not None for r in rows)
    assert {(r["set"], r["dtype"]) for r in rows} == {
        (s, d) for s in ("resnet50-layer1", "500x64") for d in ("fp32", "bf16")
    }
    assert report["checks"] and all(c["passed"] for c in report["checks"]), report["checks"]
    assert report["meta"]["copy_bandwidth_gbps"] > 0
    # The compiled peer is skipped in --quick mode, and says so.
    assert any(s["method"] == "zenith-compiled" for s in report["skipped"])
    assert (tmp_path / "step-cpu-quick.png").stat().st_size > 0
