#!/usr/bin/env python
"""One optimizer step of every zenith-fused backend and every peer, side by side in one process.

    python bench/step.py --device cuda --out bench/results/          # all sets, fp32 and bf16
    python bench/step.py --device cpu --quick --out /tmp/bench        # < 60 s smoke run
    python bench/step.py --device cpu --threads 1                     # full CPU sets (shared machine)
    python bench/step.py --device cuda --sets resnet50 --methods 'sgd-fused,zenith-*'

For each parameter set and dtype it checks that every ZENITH method computes what
``ZenithFused(backend="reference")`` computes, then times one ``step()`` of each method, round-robin
over repeats, and prints a table (bench/README.md explains every column). It writes
``<name>.json`` (rewritten after each set, so a run cut short keeps what it measured) and
``<name>.png`` into ``--out``, ``<name>`` being ``--name`` or ``step-<device>[-quick]``. The exit
status is 1 when a correctness check failed or the run was interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import param_sets  # noqa: E402
import peers  # noqa: E402

ZENITH_FUSED_BACKENDS = ("triton", "cuda", "cpu", "reference")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Bytes per value a step cannot avoid moving, in units of the dtype's size. ZENITH: the gradient
# is read twice (the global norm must be complete before any update), parameter and momentum
# buffer read and written once. Momentum SGD: the same without the second gradient read.
ARRAY_PASSES = {"zenith": 6, "sgd": 5}
BASELINE = {"cuda": "sgd-fused", "cpu": "sgd-foreach"}
MAX_REPLICAS = 8


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "zenith" or "sgd"
    make: Callable[..., object]  # (params, window_size=...) -> object with .step()
    description: str
    compiled: bool = False
    zenith_fused_backend: str | None = None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if self.zenith_fused_backend is None:
            return peers_by_name[self.name].unavailable_reason(device, dtype)
        from zenith_fused._engines import resolve_backend

        try:
            resolve_backend(self.zenith_fused_backend, device)
        except RuntimeError as exc:
            return str(exc)
        if self.zenith_fused_backend == "triton" and device.type == "cpu":
            return "Triton on CPU tensors runs in its interpreter (TRITON_INTERPRET=1): not a measurement"
        return None


def _zenith_fused(backend: str) -> Callable[..., object]:
    def make(params, window_size=peers.WINDOW_SIZE):
        from zenith_fused import ZenithFused

        return ZenithFused(params, lr=peers.LR, momentum=peers.MOMENTUM, window_size=window_size, backend=backend)

    return make


peers_by_name = {p.name: p for p in peers.PEERS + (peers.DEVICE_SIDE_EAGER,)}
METHODS: tuple[Method, ...] = tuple(
    Method(f"zenith-fused-{b}", "zenith", _zenith_fused(b), f'ZenithFused(backend="{b}")', zenith_fused_backend=b)
    for b in ZENITH_FUSED_BACKENDS
) + tuple(Method(p.name, p.family, p.make, p.description, compiled=p.compiled) for p in peers.PEERS)


@dataclass
class Row:
    set: str
    dtype: str
    method: str
    family: str
    description: str
    tensors: int
    values: int
    replicas: int
    samples: int = 0
    median_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    min_ms: float | None = None
    host_ms: float | None = None  # GPU: median host time to issue one step() call
    first_step_s: float | None = None  # includes JIT / torch.compile compilation
    bytes_per_step: int = 0
    gb_per_s: float | None = None
    pct_copy_bw: float | None = None
    baseline: str | None = None
    ratio_to_baseline: float | None = None
    kernels_per_step: float | None = None
    syncs_per_step: float | None = None
    d2h_copies_per_step: float | None = None
    check: str | None = None  # "PASS" / "FAIL" against ZenithFused(backend="reference")
    check_max_abs_diff: float | None = None
    others_cpu_pct: float | None = None  # CPU share other processes used while this set was timed


@dataclass
class Report:
    meta: dict
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)

    def skip(self, method: str, set_name: str | None, dtype: str | None, reason: str) -> None:
        self.skipped.append(dict(method=method, set=set_name, dtype=dtype, reason=reason))
        where = "/".join(x for x in (set_name, dtype) if x)
        print(f"  skip {method}{' on ' + where if where else ''}: {reason}", flush=True)


# --------------------------------------------------------------------------- device helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the timing must not be flattered by."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """A large device-memory copy, counting bytes read plus bytes written."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24 if quick else 1 << 26)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(3 if quick else 10):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times[1:]) / 1e9


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / ticks, own.user + own.system


def others_cpu_percent(before, after, wall_seconds: float) -> float | None:
    """Share of the machine's CPUs that other processes kept busy between two cpu_seconds()."""
    if before is None or after is None or wall_seconds <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, 100 * others / (wall_seconds * (os.cpu_count() or 1)))


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- measurement
def make_replica(shapes, device, dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(True)
        p.grad = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        params.append(p)
    return params


def first_steps(steppers: list, device: torch.device) -> float:
    """Take each replica's first step (lazy state, JIT compilation); return the first one's time."""
    synchronize(device)
    t0 = time.perf_counter()
    steppers[0].step()
    synchronize(device)
    first = time.perf_counter() - t0
    for s in steppers[1:]:
        s.step()
    synchronize(device)
    return first


def time_round_robin(steppers: dict[str, list], device: torch.device, *, repeats: int, max_seconds: float,
                     flush: torch.Tensor | None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step times in ms, the methods interleaved so that drifting load hits them alike.

    GPU: CUDA events around each step, the L2 flushed before each; CPU: the wall clock over one
    step of every replica."""
    names = list(steppers)
    samples: dict[str, list[float]] = {n: [] for n in names}
    host: dict[str, list[float]] = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        pending = []
        for name in order:
            if spent[name] > max_seconds and len(samples[name]) >= 3:
                continue
            replicas = steppers[name]
            if device.type == "cuda":
                for s in replicas:
                    flush.zero_()
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    t0 = time.perf_counter()
                    s.step()
                    host[name].append((time.perf_counter() - t0) * 1e3)
                    end.record()
                    pending.append((name, start, end))
            else:
                t0 = time.perf_counter()
                for s in replicas:
                    s.step()
                ms = (time.perf_counter() - t0) * 1e3 / len(replicas)
                samples[name].append(ms)
                spent[name] += ms * len(replicas) / 1e3
        if pending:
            torch.cuda.synchronize(device)
            for name, start, end in pending:
                ms = start.elapsed_time(end)
                samples[name].append(ms)
                spent[name] += ms / 1e3
    return samples, host


def _profile_sync_calls(prof) -> int:
    return sum(1 for e in prof.events()
               if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))


def count_launches(steppers: dict[str, list], device: torch.device, steps: int) -> dict[str, tuple[float, float]]:
    """Kernels and device-to-host copies per step of each method, from one profiler session.

    Each method's steps run inside a ``record_function`` range that ends with a synchronize, so
    every device event starts inside the range of the method that launched it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name, replicas in steppers.items():
            with record_function(f"bench::{name}"):
                for i in range(steps):
                    replicas[i % len(replicas)].step()
                synchronize(device)
    ranges = [(e.time_range.start, e.time_range.end, e.name.removeprefix("bench::"))
              for e in prof.events() if e.name.startswith("bench::")]
    counts = {name: [0, 0] for name in steppers}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        owner = next((name for start, end, name in ranges if start <= e.time_range.start <= end), None)
        if owner is None:
            continue
        if e.name.startswith("Memcpy"):
            counts[owner][1] += "DtoH" in e.name
        elif not e.name.startswith("Memset"):
            counts[owner][0] += 1
    return {name: (k / steps, c / steps) for name, (k, c) in counts.items()}


def count_syncs(replicas: list, device: torch.device, steps: int) -> float:
    """Synchronizing CUDA calls per step, as torch.cuda.set_sync_debug_mode("warn") reports them."""
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                replicas[i % len(replicas)].step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("synchroniz" in str(w.message).lower() for w in caught) / steps


def run_checks(methods: list[Method], initial: list[torch.Tensor], set_name: str, dtype_name: str,
               report: Report, *, steps: int, window_size: int, nonfinite_step: int | None) -> dict[str, tuple[str, float]]:
    """Every ZENITH method except the reference itself against ZenithFused(backend="reference")."""
    results = {}
    for m in methods:
        if m.family != "zenith" or m.zenith_fused_backend == "reference":
            continue
        try:
            r = peers.compare_with_reference(m.make, initial, name=m.name, steps=steps,
                                             window_size=window_size, nonfinite_step=nonfinite_step)
        except Exception as exc:  # a check that cannot run is a failed check, with its reason
            report.checks.append(dict(set=set_name, dtype=dtype_name, method=m.name, passed=False,
                                      error=f"{type(exc).__name__}: {exc}"))
            print(f"  check {m.name}: FAIL ({type(exc).__name__}: {exc})", flush=True)
            results[m.name] = ("FAIL", math.nan)
            continue
        verdict = "PASS" if r.passed else "FAIL"
        report.checks.append(dict(set=set_name, **asdict(r)))
        norms = ""
        if r.norm_rel_error is not None and r.reference_norm_rel_error is not None and (
                not r.passed or max(r.norm_rel_error, r.reference_norm_rel_error) > 1e-5):
            norms = (f"; global norm vs float64: {m.name} {r.norm_rel_error:.1e}, "
                     f"reference {r.reference_norm_rel_error:.1e}")
        print(f"  check {m.name} vs zenith-fused-reference ({r.steps} steps, window {r.window_size}"
              f"{', one non-finite' if nonfinite_step is not None else ''}): {verdict}, "
              f"max |diff| {r.max_abs_diff:.3g}{norms}", flush=True)
        results[m.name] = (verdict, r.max_abs_diff)
    return results


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_config(set_name: str, dtype_name: str, methods: list[Method], device: torch.device, args,
                 report: Report, budget: dict) -> None:
    shapes = param_sets.PARAM_SETS[set_name][0]
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    values = param_sets.numel(shapes)
    grad_bytes = values * itemsize
    replicas = max(1, min(args.max_replicas, math.ceil(args.rotate_bytes / grad_bytes)))
    print(f"\n== {set_name} {dtype_name}: {len(shapes)} tensors, {values / 1e6:.2f}M values, "
          f"{replicas} replica(s) rotated ({replicas * grad_bytes / 2**20:.0f} MiB of gradients)", flush=True)

    params = [make_replica(shapes, device, dtype, seed=r) for r in range(replicas)]
    steppers: dict[str, list] = {}
    first_step_s: dict[str, float] = {}
    runnable: list[Method] = []
    for m in methods:
        reason = m.unavailable_reason(device, dtype)
        if reason is None and m.compiled:
            if len(shapes) > args.compile_max_tensors:
                reason = (f"{len(shapes)} tensors > --compile-max-tensors {args.compile_max_tensors}: "
                          "torch.compile unrolls the per-tensor update, and its compile time grows with the "
                          "tensor count (about 0.2 s per tensor on a 2-core CPU)")
            elif budget["compile_spent"] >= args.compile_budget:
                reason = (f"compile budget spent ({budget['compile_spent']:.0f} s of --compile-budget "
                          f"{args.compile_budget:g} s)")
        if reason is not None:
            report.skip(m.name, set_name, dtype_name, reason)
            continue
        try:
            if m.compiled:
                peers.reset_compiled()
            steppers[m.name] = [m.make(p) for p in params]
            first_step_s[m.name] = first_steps(steppers[m.name], device)
            if m.compiled:
                budget["compile_spent"] += first_step_s[m.name]
                print(f"  {m.name}: compiled in {first_step_s[m.name]:.1f} s", flush=True)
            for _ in range(args.warmup - 1):
                for s in steppers[m.name]:
                    s.step()
        except Exception as exc:  # e.g. a torch.compile toolchain missing: report and go on
            steppers.pop(m.name, None)
            report.skip(m.name, set_name, dtype_name, f"failed to run: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        runnable.append(m)

    checks = {}
    if not args.no_check:
        initial = [p.detach() for p in params[0]]
        checks = run_checks(runnable, initial, set_name, dtype_name, report, steps=args.check_steps,
                            window_size=peers.WINDOW_SIZE, nonfinite_step=None)
        free_memory(device)

    flush = None
    if device.type == "cuda":
        flush = torch.empty(max(256 << 20, 2 * cache_bytes(device)), dtype=torch.int8, device=device)
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    samples, host = time_round_robin({m.name: steppers[m.name] for m in runnable}, device,
                                     repeats=args.repeats, max_seconds=args.max_seconds_per_method, flush=flush)
    others = others_cpu_percent(cpu_before, cpu_seconds(), time.perf_counter() - wall_before)
    if others is not None:
        print(f"  other processes used {others:.0f}% of the {os.cpu_count()} CPUs while this set was timed",
              flush=True)
    del flush

    rows = []
    for m in runnable:
        s = samples[m.name]
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        row = Row(set=set_name, dtype=dtype_name, method=m.name, family=m.family, description=m.description,
                  tensors=len(shapes), values=values, replicas=replicas, samples=len(s),
                  median_ms=statistics.median(s), p25_ms=q[0], p75_ms=q[2], min_ms=min(s),
                  host_ms=statistics.median(host[m.name]) if host[m.name] else None,
                  first_step_s=first_step_s[m.name], bytes_per_step=ARRAY_PASSES[m.family] * values * itemsize,
                  others_cpu_pct=others)
        row.gb_per_s = row.bytes_per_step / (row.median_ms / 1e3) / 1e9
        row.pct_copy_bw = 100 * row.gb_per_s / report.meta["copy_bandwidth_gbps"]
        if m.name in checks:
            row.check, row.check_max_abs_diff = checks[m.name]
        rows.append(row)
    if device.type == "cuda":
        launches = count_launches({m.name: steppers[m.name] for m in runnable}, device, args.count_steps)
        for row in rows:
            row.kernels_per_step, row.d2h_copies_per_step = launches[row.method]
            row.syncs_per_step = count_syncs(steppers[row.method], device, args.count_steps)
    baseline = next((r for r in rows if r.method == BASELINE[device.type]), None)
    for r in rows:
        if baseline is not None:
            r.baseline = baseline.method
            r.ratio_to_baseline = r.median_ms / baseline.median_ms
    report.rows.extend(rows)
    print_table(rows, gpu=device.type == "cuda")

    del steppers, params
    free_memory(device)


# --------------------------------------------------------------------------- output
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


_COLUMNS = (  # header, width, cell, GPU only
    ("set", 15, lambda r: r.set, False),
    ("dtype", 5, lambda r: r.dtype, False),
    ("method", 22, lambda r: r.method, False),
    ("ms/step", 9, lambda r: _fmt(r.median_ms, ".3f"), False),
    ("p25-p75", 17, lambda r: f"{_fmt(r.p25_ms, '.3f')}-{_fmt(r.p75_ms, '.3f')}", False),
    ("GB/s", 7, lambda r: _fmt(r.gb_per_s, ".1f"), False),
    ("%copy", 5, lambda r: _fmt(r.pct_copy_bw, ".0f"), False),
    ("x base", 6, lambda r: _fmt(r.ratio_to_baseline, ".2f"), False),
    ("kernels", 7, lambda r: _fmt(r.kernels_per_step, ".0f"), True),
    ("syncs", 5, lambda r: _fmt(r.syncs_per_step, ".1f"), True),
    ("host ms", 7, lambda r: _fmt(r.host_ms, ".3f"), True),
    ("first s", 7, lambda r: _fmt(r.first_step_s, ".2f"), False),
    ("check", 5, lambda r: r.check or "-", False),
)


def print_table(rows: list[Row], gpu: bool) -> None:
    columns = [c for c in _COLUMNS if gpu or not c[3]]
    print("  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w, _, _) in enumerate(columns)))
    for r in rows:
        print("  ".join(cell(r).ljust(w) if i < 3 else cell(r).rjust(w) for i, (_, w, cell, _) in enumerate(columns)))


def print_pivot(rows: list[Row]) -> None:
    """ms per step, one line per set and dtype, one column per method: the short view."""
    methods = list(dict.fromkeys(r.method for r in rows))
    configs = list(dict.fromkeys((r.set, r.dtype) for r in rows))
    short = [m.replace("zenith-fused-", "zf-").replace("zenith-", "z-") for m in methods]
    width = max([10] + [len(s) for s in short])
    print("ms/step (x baseline)".ljust(21) + "".join(s.rjust(width + 2) for s in short))
    for set_name, dtype in configs:
        cells = []
        for m in methods:
            r = next((r for r in rows if (r.set, r.dtype, r.method) == (set_name, dtype, m)), None)
            cell = "-" if r is None else f"{r.median_ms:.3g}" + (
                f" ({r.ratio_to_baseline:.2f})" if r.ratio_to_baseline is not None else "")
            cells.append(cell.rjust(width + 2))
        print(f"{set_name} {dtype}".ljust(21) + "".join(cells))


def write_json(report: Report, path: Path) -> None:
    payload = dict(meta=report.meta, rows=[asdict(r) for r in report.rows], skipped=report.skipped,
                   checks=report.checks)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


def write_chart(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((r.set, r.dtype) for r in report.rows))
    if not configs:
        return
    colors = {"sgd": "#8c8c8c", "zenith": "#e08a2c"}
    fused_color = "#2c7be0"
    ncols = min(2, len(configs))
    nrows = math.ceil(len(configs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 0.5 + 2.6 * nrows), squeeze=False)
    for ax, (set_name, dtype) in zip(axes.flat, configs):
        rows = [r for r in report.rows if r.set == set_name and r.dtype == dtype]
        names = [r.method for r in rows]
        times = [r.median_ms for r in rows]
        bar_colors = [fused_color if r.method.startswith("zenith-fused") else colors[r.family] for r in rows]
        y = range(len(rows))
        ax.barh(y, times, color=bar_colors)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(min(times) / 1.5, max(times) * 6)
        for yi, r in zip(y, rows):
            label = f"{r.median_ms:.3g} ms"
            if r.ratio_to_baseline is not None:
                label += f"  {r.ratio_to_baseline:.2f}x"
            if r.check == "FAIL":
                label += "  check FAIL"
            ax.text(r.median_ms * 1.05, yi, label, va="center", fontsize=7)
        values = rows[0].values
        ax.set_title(f"{set_name} {dtype} ({rows[0].tensors} tensors, {values / 1e6:.3g}M values)", fontsize=9)
        ax.set_xlabel("ms per step (median, log scale)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=fused_color, label="zenith-fused backends"),
                        Patch(color=colors["zenith"], label="hand-written ZENITH peers"),
                        Patch(color=colors["sgd"], label="torch.optim.SGD (momentum, no ZENITH)")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    meta = report.meta
    threads = f", {meta['torch_threads']} thread{'s' if meta['torch_threads'] != 1 else ''}" if meta["device"] == "cpu" else ""
    fig.suptitle(f"One optimizer step on {meta['device_name']} ({meta['device']}{threads}), torch {meta['torch']}"
                 f"{' (quick)' if meta['quick'] else ''}; x = time / {BASELINE[meta['device']]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sets, few repeats, no torch.compile: CPU < 60 s")
    ap.add_argument("--sets", help=f"comma-separated, from {', '.join(param_sets.PARAM_SETS)}; default: "
                                   f"{', '.join(param_sets.FULL_SETS)} (those meant for the device), "
                                   f"--quick: {', '.join(param_sets.QUICK_SETS)}")
    ap.add_argument("--methods", default="*", help="comma-separated names or globs, e.g. 'sgd-*,zenith-fused-*'; "
                                                   f"known: {', '.join(m.name for m in METHODS)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    ap.add_argument("--out", default="bench/results", help="folder for the JSON and PNG")
    ap.add_argument("--name", help="file stem of the outputs (default: step-<device>[-quick])")
    ap.add_argument("--repeats", type=int, help="round-robin rounds (GPU 10, CPU 9, --quick 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per replica, the first included")
    ap.add_argument("--max-seconds-per-method", type=float,
                    help="stop sampling a method once its timed steps add up to this (GPU 1, CPU 30, --quick 2)")
    ap.add_argument("--compile-budget", type=float,
                    help="seconds of torch.compile allowed over the run; the compiled peer is skipped once "
                         "spent (default: unlimited; --quick: 0, i.e. skipped)")
    ap.add_argument("--compile-max-tensors", type=int, default=600,
                    help="skip the compiled peer on sets with more tensors than this (default 600)")
    ap.add_argument("--time-budget", type=float, help="skip the remaining sets once the run has taken this long")
    ap.add_argument("--rotate-bytes", type=int,
                    help="rotate replicas of the set until their gradients exceed this (default: 2x the "
                         "last-level cache), up to --max-replicas")
    ap.add_argument("--threads", type=int,
                    help="torch.set_num_threads for CPU runs (default: torch's; --quick: 1)")
    ap.add_argument("--max-replicas", type=int, help=f"at most this many replicas (default {MAX_REPLICAS}, --quick 2)")
    ap.add_argument("--check-steps", type=int, default=3, help="steps of the check against the reference")
    ap.add_argument("--no-check", action="store_true", help="skip the checks against the reference")
    ap.add_argument("--count-steps", type=int, default=3, help="GPU: steps profiled for kernels and syncs")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else (10 if args.device == "cuda" else 9)
    if args.max_seconds_per_method is None:
        args.max_seconds_per_method = 2.0 if args.quick else (1.0 if args.device == "cuda" else 30.0)
    if args.threads is None and args.quick and args.device == "cpu":
        args.threads = 1  # a smoke run must not stall on thread barriers when the machine is busy
    if args.max_replicas is None:
        args.max_replicas = 2 if args.quick else MAX_REPLICAS
    if args.compile_budget is None:
        args.compile_budget = 0.0 if args.quick else math.inf
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("step.py: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.rotate_bytes is None:
        args.rotate_bytes = 2 * cache_bytes(device)
    set_names = args.sets.split(",") if args.sets else [
        s for s in (param_sets.QUICK_SETS if args.quick else param_sets.FULL_SETS)
        if device.type in param_sets.PARAM_SETS[s][1]]
    unknown = [s for s in set_names if s not in param_sets.PARAM_SETS]
    if unknown:
        print(f"step.py: unknown set(s) {unknown}; known: {list(param_sets.PARAM_SETS)}", file=sys.stderr)
        return 2
    dtype_names = args.dtypes.split(",")
    if any(d not in DTYPES for d in dtype_names):
        print(f"step.py: unknown dtype in {dtype_names}; known: {list(DTYPES)}", file=sys.stderr)
        return 2
    patterns = args.methods.split(",")
    methods = [m for m in METHODS if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]
    if not methods:
        print(f"step.py: --methods {args.methods!r} matches none of {[m.name for m in METHODS]}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"step-{device.type}{'-quick' if args.quick else ''}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"

    started = time.perf_counter()
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        pass
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        device=device.type, device_name=device_name(device), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), torch=torch.__version__, triton=triton_version,
        cuda=torch.version.cuda, python=platform.python_version(), git=git_revision(), quick=args.quick,
        load_average_before=os.getloadavg(),
        environment={k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                 "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET") if k in os.environ}, cache_bytes=cache_bytes(device), rotate_bytes=args.rotate_bytes,
        repeats=args.repeats, warmup=args.warmup, lr=peers.LR, momentum=peers.MOMENTUM,
        window_size=peers.WINDOW_SIZE, baseline=BASELINE[device.type],
        bytes_per_value=dict(zenith="6 x dtype size (grad read twice, param r/w, buffer r/w)",
                             sgd="5 x dtype size (grad read once, param r/w, buffer r/w)"),
        timing=("CUDA events around each step, L2 flushed before each, replicas rotated"
                if device.type == "cuda" else "wall clock over one step of each replica, methods round-robin"),
    )
    print(f"step.py on {meta['device_name']} ({device.type}), torch {meta['torch']}, triton {triton_version}, "
          f"{meta['torch_threads']} threads, load average {meta['load_average_before']}", flush=True)
    meta["copy_bandwidth_gbps"] = copy_bandwidth_gbps(device, args.quick)
    print(f"copy bandwidth (read + write): {meta['copy_bandwidth_gbps']:.1f} GB/s\n", flush=True)
    report = Report(meta=meta)

    # Always-on small check: odd shapes, a window that wraps, one non-finite step to skip.
    check_methods = [m for m in methods if not m.compiled]
    if any(m.name == "zenith-compiled" for m in methods):
        eager = peers.DEVICE_SIDE_EAGER
        check_methods.append(Method(eager.name, eager.family, eager.make, eager.description))
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        runnable = [m for m in check_methods if m.unavailable_reason(device, dtype) is None]
        run_checks(runnable, peers.small_check_params(device, dtype), "small-check", dtype_name, report,
                   steps=6, window_size=2, nonfinite_step=3)

    budget = dict(compile_spent=0.0)
    interrupted = None
    # A `timeout` around the run sends SIGTERM: finish with what was measured instead of nothing.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # dtype outermost: when --time-budget runs out, every set has been measured in the first dtype.
        for dtype_name in dtype_names:
            for set_name in set_names:
                if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                    report.skip("*", set_name, dtype_name, f"--time-budget {args.time_budget:g} s spent")
                    continue
                if device.type not in param_sets.PARAM_SETS[set_name][1]:
                    report.skip("*", set_name, dtype_name, f"set meant for {param_sets.PARAM_SETS[set_name][1]}")
                    continue
                try:
                    bench_config(set_name, dtype_name, methods, device, args, report, budget)
                except torch.cuda.OutOfMemoryError as exc:
                    report.skip("*", set_name, dtype_name, f"out of memory: {str(exc)[:200]}")
                    free_memory(device)
                report.meta["load_average_after"] = os.getloadavg()
                report.meta["seconds"] = round(time.perf_counter() - started, 1)
                write_json(report, json_path)
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "interrupted"
        report.meta["interrupted"] = interrupted
        print(f"\n{interrupted}: writing what was measured", flush=True)

    report.meta["load_average_after"] = os.getloadavg()
    report.meta["seconds"] = round(time.perf_counter() - started, 1)
    busiest = max((r.others_cpu_pct for r in report.rows if r.others_cpu_pct is not None), default=None)
    report.meta["max_others_cpu_pct"] = busiest
    write_json(report, json_path)
    write_chart(report, png_path)
    failed = [c for c in report.checks if not c.get("passed")]
    print(f"\n== summary ({device.type}, {meta['device_name']}, copy {meta['copy_bandwidth_gbps']:.1f} GB/s, "
          f"load average {_fmt_load(meta['load_average_before'])} -> {_fmt_load(meta['load_average_after'])} "
          f"on {meta['cpu_count']} CPUs, {meta['seconds']} s)")
    if busiest is not None and busiest > 10:
        print(f"note: other processes used up to {busiest:.0f}% of the CPUs while sets were timed: host-side "
              "timings are noisy (see p25-p75); compare methods within one set only")
    print_table(report.rows, gpu=device.type == "cuda")
    print()
    print_pivot(report.rows)
    print(f"wrote {json_path} and {png_path}")
    if failed:
        print(f"FAIL: {len(failed)} check(s) against zenith-fused-reference failed: "
              + ", ".join(f"{c.get('peer', c.get('method'))}/{c['set']}/{c['dtype']}" for c in failed))
        return 1
    return 1 if interrupted else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    sys.exit(main())
