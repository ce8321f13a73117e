#!/usr/bin/env python
"""What ZenithFused promises on a CUDA GPU, checked on one: one subcommand per stage of gpu_check.sh.

    python bench/gpu_checks.py CHECK [--backends triton,cuda] [--json PATH]

Checks, in the priority order of ``bench/gpu_check.sh``:

* ``sync-graph``: no host synchronisation in a steady ``step()``: steps under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call (steady
  steps, new gradient tensors, a non-finite gradient, a tensor-lr and a float-lr change, the
  history read as tensors); and a ``torch.cuda.CUDAGraph`` capture of ``step()`` with tensor
  learning rates, warmed up on a side stream as torch's recipe does, replayed on new gradient
  values (one non-finite, the window wrapping, an lr change): parameters, momentum buffers and
  history equal, bit for bit, those of an optimizer stepped eagerly on the same gradients.
* ``reference``: every backend against ``ZenithFused(backend="reference")`` on ResNet-50 and
  GPT-2 small shapes plus an empty tensor, float32 and bfloat16, with aligned tensors and with
  every parameter and gradient one element into a buffer of its own (misaligned: the kernels'
  general path); 5 steps, window 3, one non-finite step.
* ``large``: one bfloat16 tensor of 2^31 + 16 elements, two steps, the norm against a float64
  sum and every element of the parameter and momentum buffer against torch's own arithmetic,
  the 16 elements past 2^31 included (they are made large, so a norm that drops them is off by
  percents).
* ``one-step``: three steps on a small mixed set (aligned, misaligned, bfloat16, empty), the
  program ``compute-sanitizer`` runs.
* ``bandwidth``: per-kernel device time of a real ``step()`` on one large tensor (from the
  profiler's kernel records, since the kernels are launched inside ``step()``), the whole step
  and a device-to-device copy of the same bytes timed with CUDA events; GB/s and share of the
  copy's, float32/bfloat16, aligned/misaligned.
* ``launches``: the kernels a real step launches, with the registers per thread the profiler
  records, for every dtype, alignment and momentum setting; against ``--report`` (the JSON of
  ``kernel_report.py --arch <this GPU's>``) when given.

Also ``backend NAME`` (makes NAME usable, e.g. compiles ``csrc/`` for ``"cuda"``, and says why
not), ``env`` (versions and device, ``key: value``) and ``selftest`` (every check above on the
CPU with small sizes: a dry run of this file's own code before GPU time is spent; it exercises no
sync mode, graph, CUDA event or kernel).

Only the package's public API is used (``ZenithFused``, its ``state``, ``history`` and
``backends``), so the checks do not depend on the step's internals.

Each result is one line: ``PASS|FAIL|SKIP check [backend] (seconds): numbers``; ``--json`` gets
the same as a list, rewritten after each result, so a run stopped by its time box keeps what it
finished. Exit status: 0 every check that ran passed, 1 one failed, 3 nothing could run.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import param_sets  # noqa: E402
import peers  # noqa: E402

LR, MOMENTUM = peers.LR, peers.MOMENTUM
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Substrings of the kernels' names, Triton's (_sq_norm_partials_kernel) and CUDA C++'s alike.
KERNEL_KINDS = (("sq_norm_partials", "norm"), ("update_history", "history"), ("momentum_update", "update"))
EXIT_NOTHING_RAN = 3


class Skip(Exception):
    """A check that cannot run here, with the reason."""


@dataclass
class Result:
    check: str
    backend: str
    passed: bool | None  # None: skipped
    detail: str
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0


class Recorder:
    """Runs checks, prints one line each, and keeps the JSON file current."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.results: list[Result] = []

    def run(self, check: str, backend: str, fn, *args, **kwargs) -> Result:
        start = time.perf_counter()
        try:
            passed, detail, numbers = fn(*args, **kwargs)
        except Skip as exc:
            passed, detail, numbers = None, str(exc), {}
        except Exception as exc:  # a crash is the check's failure, with where it happened
            lines = traceback.format_exc().splitlines()
            passed, detail, numbers = False, f"{type(exc).__name__}: {exc}\n" + "\n".join(lines[-8:]), {}
        return self.add(Result(check, backend, passed, detail, numbers, round(time.perf_counter() - start, 2)))

    def add(self, result: Result) -> Result:
        self.results.append(result)
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[result.passed]
        print(f"{verdict} {result.check} [{result.backend}] ({result.seconds:.1f} s): {result.detail}", flush=True)
        if self.path:
            Path(self.path).write_text(json.dumps([dataclasses.asdict(r) for r in self.results], indent=1))
        return result

    def exit_status(self) -> int:
        ran = [r for r in self.results if r.passed is not None]
        if not ran:
            return EXIT_NOTHING_RAN
        return 0 if all(r.passed for r in ran) else 1


# ------------------------------------------------------------------ tensors and optimizers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, in ZenithFused's own words (None: it can)."""
    from zenith_fused import ZenithFused

    try:
        ZenithFused([torch.zeros(1, device=device, requires_grad=True)], backend=backend)
    except RuntimeError as exc:
        return str(exc)
    return None


def usable_backends(names: list[str], device: torch.device, recorder: Recorder, check: str) -> list[str]:
    usable = []
    for name in names:
        reason = backend_reason(name, device)
        if reason:
            recorder.add(Result(check, name, None, reason))
        else:
            usable.append(name)
    return usable


def dense(shape, dtype, device, misaligned: bool) -> torch.Tensor:
    """An uninitialised tensor; misaligned: a view one element into a buffer of its own, so that
    it never starts on the 16-byte boundary the kernels' vectorized path needs."""
    if not misaligned:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    return torch.empty(numel + 1, dtype=dtype, device=device)[1:].view(shape)


def random_tensor(shape, dtype, device, generator, scale: float = 1.0, misaligned: bool = False) -> torch.Tensor:
    """Normal values times ``scale``, drawn in float32 and rounded to ``dtype``."""
    out = dense(shape, dtype, device, misaligned)
    return out.copy_(torch.randn(shape, generator=generator, device=device).mul_(scale))


def random_like(t: torch.Tensor, generator, scale: float = 1.0, misaligned: bool = False) -> torch.Tensor:
    return random_tensor(t.shape, t.dtype, t.device, generator, scale, misaligned)


def make_params(shapes, dtype, device, generator, misaligned: bool = False) -> list[torch.Tensor]:
    return [random_tensor(shape, dtype, device, generator, misaligned=misaligned).requires_grad_(True)
            for shape in shapes]


def step_groups(device: torch.device, seed: int) -> list[list[torch.Tensor]]:
    """Two parameter groups over three buckets: float32 aligned (an empty tensor among odd and
    large ones), bfloat16 aligned, float16 misaligned."""
    generator = torch.Generator(device=device).manual_seed(seed)
    fp32 = make_params([(1000, 33), (7,), (1,), (0,), (4097,), (64, 3, 3, 3), (70000,)], torch.float32, device,
                       generator)
    bf16 = make_params([(513,), (32, 32)], torch.bfloat16, device, generator)
    fp16 = make_params([(301,), (5,)], torch.float16, device, generator, misaligned=True)
    return [fp32[:4] + bf16[:1] + fp16[:1], fp32[4:] + bf16[1:] + fp16[1:]]


def clone_groups(groups):
    """Copies that keep each tensor's alignment (``clone`` would align the misaligned ones)."""
    def copy(p):
        return dense(p.shape, p.dtype, p.device, misaligned=p.data_ptr() % 16 != 0).copy_(p.detach())

    return [[copy(p).requires_grad_(True) for p in g] for g in groups]


def buffers(opt, params) -> list[torch.Tensor | None]:
    return [opt.state[p].get("momentum_buffer") for p in params]


def history_fields(opt) -> dict[str, torch.Tensor]:
    history = opt.history
    return {f.name: getattr(history, f.name) for f in dataclasses.fields(history)}


# ------------------------------------------------------------------ 1. no host sync, CUDA graphs
def check_no_host_sync(backend: str, device: torch.device):
    from zenith_fused import ZenithFused

    groups = step_groups(device, seed=0)
    lr = torch.tensor(LR, device=device)  # group 0: a tensor lr, read by the kernels at every step
    opt = ZenithFused([{"params": groups[0], "lr": lr}, {"params": groups[1], "lr": 0.05}], momentum=MOMENTUM,
                      window_size=3, backend=backend)
    generator = torch.Generator(device=device).manual_seed(1)
    params = [p for g in groups for p in g]
    for _ in range(3):  # warm-up: Triton compilation, state, tables
        for p in params:
            p.grad = random_like(p, generator)
        opt.step()
    synchronize(device)
    skipped_before = int(opt.skipped_steps)
    steps, stage = 0, "steady steps"
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):  # the same gradient tensors, new values
            for p in params:
                p.grad.normal_(generator=generator)
            opt.step()
            steps += 1
        stage = "new gradient tensors"
        for p in params:
            p.grad = random_like(p, generator)
        opt.step()
        steps += 1
        stage = "a non-finite gradient"
        params[0].grad.view(-1)[0] = float("inf")
        opt.step()
        steps += 1
        params[0].grad.view(-1)[0] = 0.5
        stage = "a tensor-lr change"
        lr.fill_(0.2)
        opt.step()
        steps += 1
        stage = "a float-lr change"
        opt.param_groups[1]["lr"] = 0.02
        opt.step()
        steps += 1
        stage = "reading the history as tensors"
        _ = opt.grad_norm + opt.lr_scale
        for _ in range(3):
            opt.step()
            steps += 1
    except RuntimeError as exc:
        return False, f"synchronized during {stage} after {steps} clean steps: {exc}", {"clean_steps": steps}
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    skipped = int(opt.skipped_steps) - skipped_before
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    sequence = ("steady, new gradient tensors, one non-finite, a tensor-lr and a float-lr change, history read as "
                "tensors")
    if device.type == "cuda":
        detail = f"{steps} steps under set_sync_debug_mode('error') ({sequence}): no synchronizing call"
    else:
        detail = f"{steps} steps ran eagerly ({sequence}) [CPU dry run: synchronization not checked]"
    return skipped == 1 and finite, (f"{detail}; skipped_steps +{skipped} (expected +1); parameters finite: "
                                     f"{finite}"), {"steps": steps, "skipped": skipped}


def check_cuda_graph(backend: str, device: torch.device, steps: int = 8):
    from zenith_fused import ZenithFused

    groups = step_groups(device, seed=2)
    twins = []
    for _ in range(2):  # [eager, graph]
        params = clone_groups(groups)
        lrs = [torch.tensor(LR, device=device), torch.tensor(0.05, device=device)]
        opt = ZenithFused([{"params": params[0], "lr": lrs[0]}, {"params": params[1], "lr": lrs[1]}],
                          momentum=MOMENTUM, window_size=3, backend=backend)
        flat = [p for g in params for p in g]
        for p in flat:
            p.grad = torch.zeros_like(p)  # static gradient tensors: the graph reads these addresses
        twins.append((opt, flat, lrs))
    generator = torch.Generator(device=device).manual_seed(3)
    # Norms change from step to step, so the window mean, maximum and scale move.
    sequence = [[torch.randn(p.shape, generator=generator, device=device).mul_(1.0 + i % 3).to(p.dtype)
                 for p in twins[0][1]] for i in range(steps)]
    nonfinite_step, lr_change_step = 4, 6
    sequence[nonfinite_step][0].view(-1)[3] = float("nan")

    def load(twin, i):
        opt, flat, lrs = twin
        for p, g in zip(flat, sequence[i]):
            p.grad.copy_(g)
        if i == lr_change_step:
            lrs[0].fill_(0.3)  # read from the device at replay: no recapture

    eager, graphed = twins
    for i in range(steps):
        load(eager, i)
        eager[0].step()

    load(graphed, 0)
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graphed[0].step()  # step 0, eagerly: compilation, state and tables outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed[0].step()
        replay = graph.replay
    else:
        graphed[0].step()
        replay = graphed[0].step
    for i in range(1, steps):
        load(graphed, i)
        replay()
    synchronize(device)

    params_equal = all(torch.equal(a, b) for a, b in zip(eager[1], graphed[1]))
    buffers_equal = all(a is b is None or (a is not None and b is not None and torch.equal(a, b))
                        for a, b in zip(buffers(eager[0], eager[1]), buffers(graphed[0], graphed[1])))
    eager_history, graph_history = history_fields(eager[0]), history_fields(graphed[0])
    history_diff = [name for name in eager_history
                    if not torch.equal(eager_history[name], graph_history[name])]
    max_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager[1], graphed[1]) if a.numel())
    t, skipped = int(graphed[0].history.step), int(graphed[0].history.skipped_steps)
    ok = params_equal and buffers_equal and not history_diff and t == steps - 1 and skipped == 1
    if device.type == "cuda":
        how = f"capture + {steps - 1} replays vs {steps} eager steps"
    else:
        how = f"{steps} eager steps twice [CPU dry run: the graph path without a capture]"
    return ok, (
        f"{how} (3 buckets, tensor lrs, one changed before step {lr_change_step}, window 3, a NaN at step "
        f"{nonfinite_step}): parameters equal {params_equal} (max |diff| {max_diff:.3g}), momentum buffers equal "
        f"{buffers_equal}, history fields differing: {', '.join(history_diff) or 'none'}; t={t} (expected "
        f"{steps - 1}), skipped={skipped} (expected 1)"), {
        "params_equal": params_equal, "buffers_equal": buffers_equal, "history_differs": history_diff,
        "max_abs_diff": max_diff, "replays": steps - 1 if device.type == "cuda" else 0}


# ------------------------------------------------------------------ 2. against the reference
def tolerance_excess(actual, expected, start, dtype, steps) -> tuple[float, float, int]:
    """(max |diff|, worst excess over atol + rtol * magnitude, elements over) of one tensor, with
    ``peers.PEER_TOLERANCES``: twins that are not resynchronised, a last-bit flip allowed per step."""
    atol, rtol = peers.PEER_TOLERANCES[dtype]
    if dtype != torch.float32:
        rtol *= steps + 1
    a, b = actual.float(), expected.float()
    diff = (a - b).abs()
    magnitude = torch.maximum(b.abs(), start.float().abs())
    excess = torch.where(torch.isfinite(a), diff - (atol + rtol * magnitude), torch.inf)
    return diff.max().item(), excess.max().item(), int((excess > 0).sum())


def compare_with_reference(backend, device, shapes, dtype, misaligned, steps=5, window_size=3, seed=0):
    """Step ``backend`` and the reference on identical fresh random gradients; compare everything."""
    from zenith_fused import ZenithFused

    generator = torch.Generator(device=device).manual_seed(seed)
    params = make_params(shapes, dtype, device, generator, misaligned)
    start = [p.detach().clone() for p in params]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    fused = ZenithFused(params, lr=LR, momentum=MOMENTUM, window_size=window_size, backend=backend)
    reference = ZenithFused(ref_params, lr=LR, momentum=MOMENTUM, window_size=window_size, backend="reference")
    first = next(i for i, p in enumerate(params) if p.numel())
    for step in range(steps):
        scale = (3.0, 1.0, 2.0)[step % 3]  # norms that fall and rise: the scale leaves 1
        for p, r in zip(params, ref_params):
            p.grad = random_like(p, generator, scale, misaligned)
            r.grad = p.grad.detach().clone()
        if step == 2:
            params[first].grad.view(-1)[0] = float("inf")
            ref_params[first].grad.view(-1)[0] = float("inf")
        fused.step()
        reference.step()
    synchronize(device)
    worst = dict(max_abs_diff=0.0, worst_excess=-math.inf, elements_over=0, worst_tensor=None)
    pairs = list(zip(params, ref_params, start)) + [
        (a, b, s) for a, b, s in zip(buffers(fused, params), buffers(reference, ref_params), start)]
    for index, (a, b, s) in enumerate(pairs):
        if a is None or b is None:
            if a is not b:
                worst["elements_over"] += 1
                worst["worst_tensor"] = f"buffer {index % len(params)}: present on one side only"
            continue
        if a.numel() == 0:
            continue
        diff, excess, over = tolerance_excess(a, b, s, dtype, steps)
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["elements_over"] += over
        if excess > worst["worst_excess"]:
            kind = "param" if index < len(params) else "buffer"
            worst.update(worst_excess=excess, worst_tensor=f"{kind} {index % len(params)} {tuple(a.shape)}")
    ours, theirs = history_fields(fused), history_fields(reference)
    history_off = [name for name in ("step", "skipped_steps") if not torch.equal(ours[name], theirs[name])]
    history_off += [name for name in ("norm_window", "window_max", "grad_norm", "lr_scale")
                    if not torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, equal_nan=True)]
    ok = worst["elements_over"] == 0 and not history_off
    return ok, worst, history_off


REFERENCE_SETS = ("resnet50", "gpt2-small")


def check_reference(backend, device, sets=REFERENCE_SETS, shapes_of=None):
    """All (set, dtype, layout) cases; the result lists each case's numbers."""
    cases, failed = [], []
    for set_name in sets:
        shapes = (shapes_of or (lambda name: param_sets.PARAM_SETS[name][0]))(set_name) + [(0,)]
        for dtype in (torch.float32, torch.bfloat16):
            for misaligned in (False, True):
                ok, worst, history_off = compare_with_reference(backend, device, shapes, dtype, misaligned)
                case = f"{set_name} {DTYPE_NAMES[dtype]} {'misaligned' if misaligned else 'aligned'}"
                cases.append(dict(case=case, passed=ok, history_off=history_off, tensors=len(shapes), **worst))
                if not ok:
                    failed.append(f"{case}: {worst['elements_over']} elements over tolerance (worst "
                                  f"{worst['worst_tensor']}, excess {worst['worst_excess']:.3g}), history off "
                                  f"{history_off or 'none'}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    max_diff = max(c["max_abs_diff"] for c in cases)
    detail = (f"{len(cases) - len(failed)}/{len(cases)} cases within peers.PEER_TOLERANCES after 5 steps (window 3, "
              f"one non-finite) on {', '.join(sets)} + an empty tensor, fp32/bf16, aligned/misaligned; max |diff| "
              f"{max_diff:.3g}")
    if failed:
        detail += "; " + "; ".join(failed)
    return not failed, detail, {"cases": cases}


# ------------------------------------------------------------------ 3. past 2^31 elements
def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place, for two bfloat16 tensors (sign-magnitude bits made ordered)."""
    def ordered(t):
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def fill_pattern(t: torch.Tensor, modulus: int, scale: float, chunk: int) -> None:
    """``t[i] = ((i % modulus) - modulus // 2) * scale``, exact in bfloat16, written in chunks."""
    for begin in range(0, t.numel(), chunk):
        end = min(t.numel(), begin + chunk)
        index = torch.arange(begin, end, device=t.device)
        t[begin:end] = ((index % modulus) - modulus // 2).to(torch.float32).mul_(scale)


def check_large(backend, device, numel: int = 2**31 + 16, tail: int = 16, chunk: int = 2**27):
    from zenith_fused import ZenithFused

    dtype = torch.bfloat16
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = 5 * numel * 2 + 4 * chunk * 8  # p, g, buffer, copies of p and buffer; float64/float32 chunks
        if free < need:
            raise Skip(f"needs {need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free")
    boundary = numel - tail
    p = torch.empty(numel, dtype=dtype, device=device)
    g = torch.empty(numel, dtype=dtype, device=device)
    fill_pattern(p, 127, 1 / 32, chunk)
    fill_pattern(g, 251, 1 / 64, chunk)
    # The elements past 2^31 are large, so a norm that misses or misplaces them is off by percents.
    g[boundary:] = 4096 + 32 * torch.arange(tail, device=device, dtype=torch.float32)
    exact = math.sqrt(sum(g[b:b + chunk].double().square().sum().item() for b in range(0, numel, chunk)))

    p.requires_grad_(True)
    opt = ZenithFused([p], lr=LR, momentum=MOMENTUM, window_size=4, backend=backend)
    p.grad = g
    numbers = {"numel": numel, "exact_norm": exact}
    problems = []

    def check_step(step, expected_param, expected_buffer):
        """Compare p and its buffer with torch's arithmetic, chunk by chunk."""
        norm_error = abs(float(opt.grad_norm) - exact) / exact
        numbers[f"step{step}_norm_rel_error"] = norm_error
        if not norm_error <= 1e-4:
            problems.append(f"step {step}: norm {float(opt.grad_norm):.9g} vs float64 {exact:.9g} "
                            f"(relative error {norm_error:.2e})")
        scale = float(opt.lr_scale)
        if scale != 1.0:
            problems.append(f"step {step}: lr_scale {scale}, expected 1 (same norm every step)")
        buf = opt.state[p]["momentum_buffer"]
        for name, actual, expected in (("param", p.detach(), expected_param), ("buffer", buf, expected_buffer)):
            max_ulps, off, tail_ulps = 0, 0, 0
            for begin in range(0, numel, chunk):
                end = min(numel, begin + chunk)
                ulps = bf16_ulps(actual[begin:end], expected(begin, end))
                max_ulps = max(max_ulps, int(ulps.max()))
                off += int((ulps > 0).sum())
                if end > boundary - 1024:  # the elements around 2^31 and past it
                    tail_ulps = max(tail_ulps, int(ulps[max(0, boundary - 1024 - begin):].max()))
            numbers.update({f"step{step}_{name}_max_ulps": max_ulps, f"step{step}_{name}_elements_off": off,
                            f"step{step}_{name}_max_ulps_at_end": tail_ulps})
            if max_ulps > 1:
                problems.append(f"step {step}: {name} off by up to {max_ulps} ulps ({off} elements; "
                                f"{tail_ulps} ulps at the end)")

    lr32 = torch.tensor(LR, dtype=torch.float32, device=device)

    def pattern_p0(begin, end):
        p0 = torch.empty(end - begin, dtype=dtype, device=device)
        index = torch.arange(begin, end, device=device)
        p0.copy_(((index % 127) - 127 // 2).to(torch.float32).mul_(1 / 32))
        return p0

    # Step 1: the buffer is the gradient; p1 = p0 - (lr * s) * g, each operation rounded in float32.
    opt.step()
    step_lr = lr32 * opt.lr_scale
    check_step(1, lambda b, e: (pattern_p0(b, e).float() - step_lr * g[b:e].float()).to(dtype),
               lambda b, e: g[b:e])
    # Step 2, the same gradient: buffer = momentum * buffer + g, p2 = p1 - (lr * s) * that (float32).
    p1 = p.detach().clone()
    b1 = opt.state[p]["momentum_buffer"].clone()
    opt.step()
    step_lr = lr32 * opt.lr_scale

    def new_buffer(b, e):
        return b1[b:e].float() * MOMENTUM + g[b:e].float()

    check_step(2, lambda b, e: (p1[b:e].float() - step_lr * new_buffer(b, e)).to(dtype),
               lambda b, e: new_buffer(b, e).to(dtype))
    t = int(opt.history.step)
    if t != 2:
        problems.append(f"history step {t}, expected 2")
    size = f"2^31 + {numel - 2**31}" if numel > 2**31 else str(numel)
    detail = (f"one bf16 tensor of {size} elements, 2 steps: norm relative error "
              f"{numbers['step1_norm_rel_error']:.1e}/{numbers['step2_norm_rel_error']:.1e} vs float64; param max "
              f"{numbers['step1_param_max_ulps']}/{numbers['step2_param_max_ulps']} ulps "
              f"({numbers['step1_param_elements_off']}/{numbers['step2_param_elements_off']} elements off), buffer "
              f"max {numbers['step1_buffer_max_ulps']}/{numbers['step2_buffer_max_ulps']} ulps vs torch; from "
              f"1024 elements before index {boundary} to the end: {numbers['step2_param_max_ulps_at_end']} ulps")
    if problems:
        detail += "; " + "; ".join(problems)
    return not problems, detail, numbers


# ------------------------------------------------------------------ 4. what compute-sanitizer runs
def check_one_step(backend, device):
    from zenith_fused import ZenithFused

    groups = step_groups(device, seed=4)
    opt = ZenithFused([{"params": groups[0]}, {"params": groups[1], "lr": 0.05}], momentum=MOMENTUM, window_size=2,
                      backend=backend)
    generator = torch.Generator(device=device).manual_seed(5)
    params = [p for g in groups for p in g]
    for _ in range(3):  # the first step fills the buffers, the later ones read them
        for p in params:
            p.grad = random_like(p, generator, misaligned=p.dtype == torch.float16)
        opt.step()
    synchronize(device)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    buckets = ", ".join(f"{DTYPE_NAMES.get(dtype, dtype)}: {name}" for (_, dtype), name in opt.backends.items())
    return finite, f"3 steps on {len(params)} tensors ({buckets}); parameters finite: {finite}", {}


# ------------------------------------------------------------------ 5. bandwidth, 7. launches
def kernel_kind(name: str) -> str | None:
    return next((kind for key, kind in KERNEL_KINDS if key in name), None)


def kernel_records(trace: dict) -> list[dict]:
    """The GPU kernels of a torch.profiler chrome trace: name, microseconds, registers, launch shape."""
    records = []
    for event in trace.get("traceEvents", []):
        if event.get("cat") != "kernel":
            continue
        args = event.get("args", {})
        records.append(dict(name=event.get("name", ""), kind=kernel_kind(event.get("name", "")),
                            us=float(event.get("dur", 0.0)), registers=args.get("registers per thread"),
                            grid=args.get("grid"), block=args.get("block"),
                            shared_memory=args.get("shared memory")))
    return records


def profile_kernels(fn, repeats: int, device: torch.device) -> list[dict]:
    """The kernels ``repeats`` calls of ``fn`` launch, as :func:`kernel_records` gives them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        synchronize(device)
    with tempfile.TemporaryDirectory(prefix="zenith-trace-") as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        return kernel_records(json.loads(Path(path).read_text()))


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn``: CUDA events around each call (wall clock on the CPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_bandwidth(backends, device, numel: int = 2**27, repeats: int = 10):
    """One row per (backend, dtype, layout, kernel), the whole step and torch's copy of the same
    tensor; every GB/s is also given as a share of the aligned copy's (what the memory gives a stream)."""
    from zenith_fused import ZenithFused

    rows = []
    generator = torch.Generator(device=device).manual_seed(6)

    def row(backend, kernel, dtype, layout, nbytes, ms, copy_gbps, **extra):
        gbps = nbytes / ms / 1e6 if nbytes and ms > 0 else None
        rows.append(dict(backend=backend, kernel=kernel, dtype=DTYPE_NAMES[dtype], layout=layout, numel=numel,
                         bytes=nbytes, ms=ms, gb_per_s=gbps, vs_copy=gbps / copy_gbps if gbps else None,
                         registers=None, **extra))

    for dtype in (torch.float32, torch.bfloat16):
        size = torch.empty((), dtype=dtype).element_size()
        copy_gbps = None
        for misaligned in (False, True):
            layout = "misaligned" if misaligned else "aligned"
            src = random_tensor((numel,), dtype, device, generator, misaligned=misaligned)
            dst = dense((numel,), dtype, device, misaligned)
            copy_ms = median_ms(functools.partial(dst.copy_, src), repeats, device)
            copy_gbps = copy_gbps or 2 * numel * size / copy_ms / 1e6  # the aligned copy's
            row("torch", "copy_", dtype, layout, 2 * numel * size, copy_ms, copy_gbps)
            del dst
            for backend in backends:
                p = dense((numel,), dtype, device, misaligned).copy_(src).requires_grad_(True)
                p.grad = random_like(p, generator, misaligned=misaligned)
                opt = ZenithFused([p], lr=torch.tensor(1e-6, device=device), momentum=MOMENTUM, window_size=4,
                                  backend=backend)
                for _ in range(3):  # compilation, the momentum buffer
                    opt.step()
                step_ms = median_ms(opt.step, repeats, device)
                kernels = profile_kernels(opt.step, repeats, device)
                # Bytes each kernel must move: the norm reads g; the update reads p, g, buffer and
                # writes p, buffer; the history kernel's few hundred bytes are not counted.
                for kind, nbytes in (("norm", numel * size), ("update", 5 * numel * size), ("history", 0)):
                    mine = [k for k in kernels if k["kind"] == kind]
                    if mine:
                        row(backend, kind, dtype, layout, nbytes, statistics.median(k["us"] for k in mine) / 1e3,
                            copy_gbps, name=mine[0]["name"][:80])
                        rows[-1]["registers"] = mine[0]["registers"]
                row(backend, "step()", dtype, layout, 6 * numel * size, step_ms, copy_gbps)
                del opt, p
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del src
    print(f"{'backend':8} {'kernel':8} {'dtype':5} {'layout':10} {'ms':>8} {'GB/s':>8} {'/copy':>6} regs")
    for r in rows:
        gbps = "-" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}"
        vs = "-" if r["vs_copy"] is None else f"{r['vs_copy']:.2f}"
        print(f"{r['backend']:8} {r['kernel']:8} {r['dtype']:5} {r['layout']:10} {r['ms']:8.4f} {gbps:>8} {vs:>6} "
              f"{r['registers'] if r['registers'] is not None else '-'}")
    timed = [r for r in rows if r["kernel"] in ("norm", "update")]
    if device.type == "cuda" and len(timed) < 8 * len(backends):
        return False, f"the profiler saw {len(timed)} norm/update kernels, expected {8 * len(backends)}", {"rows": rows}
    parts = []
    for backend in backends:
        for kind in ("norm", "update"):
            shares = [r["vs_copy"] for r in timed if r["backend"] == backend and r["kernel"] == kind]
            if shares:
                parts.append(f"{backend} {kind} {min(shares):.2f}-{max(shares):.2f}")
    detail = f"{numel} elements, fp32/bf16, aligned/misaligned: "
    detail += f"kernel GB/s as a share of the aligned copy's: {', '.join(parts)}" if parts else "no kernel timed"
    if device.type != "cuda":
        detail += " [CPU dry run: wall clock, no kernels]"
    return True, detail, {"rows": rows}


def report_rows(report: dict) -> dict:
    """``(source, kernel, dtype, aligned) -> row`` of a kernel_report.py JSON."""
    return {(r["source"], r["kernel"], r["dtype"], r["aligned"]): r for r in report.get("rows", [])}


def report_key(backend: str, record: dict, dtype: str, aligned: bool | str, has_momentum: bool):
    """The kernel_report.py row a launched kernel corresponds to."""
    if backend == "triton":
        if record["kind"] == "history":
            return ("triton", "update_history", "float32", None)
        if record["kind"] == "norm":
            return ("triton", "sq_norm_partials", dtype, aligned)
        return ("triton", "momentum_update" + ("" if has_momentum else "[no momentum]"), dtype, aligned)
    import kernel_report  # bench/: the report's own way of naming CUDA C++ kernels

    name, kernel_dtype = kernel_report._short_cuda_name(record["name"])
    return ("nvcc", f"cuda:{name}", kernel_dtype, None)


def check_launches(backends, device, report_path: str | None = None):
    """The kernels of one real step per (backend, dtype, layout, momentum), with the registers
    the profiler records; Triton's must equal kernel_report.py's for the same specialization."""
    from zenith_fused import ZenithFused

    report = None
    if report_path and Path(report_path).exists():
        report = report_rows(json.loads(Path(report_path).read_text()))
    records, mismatches, notes, unsupported = [], [], [], []
    generator = torch.Generator(device=device).manual_seed(7)
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            dtype_name = str(dtype).removeprefix("torch.")
            # kernel_report.py's layouts: every tensor aligned, none, and for float32 a mixed table
            # (the large tensor aligned, the small one one element into its buffer).
            for aligned in (True, "mixed", False) if dtype == torch.float32 else (True, False):
                for momentum in (MOMENTUM, 0.0):
                    params = [random_tensor(shape, dtype, device, generator, misaligned=misaligned).requires_grad_()
                              for shape, misaligned in (((70000,), aligned is False), ((3,), aligned is not True))]
                    for p in params:
                        p.grad = random_like(p, generator, misaligned=p.data_ptr() % 16 != 0)
                    try:
                        opt = ZenithFused(params, lr=LR, momentum=momentum, window_size=2, backend=backend)
                    except (RuntimeError, ValueError, TypeError) as exc:
                        unsupported.append(f"{backend} {dtype_name}: {exc}")
                        continue
                    opt.step()
                    for record in profile_kernels(opt.step, 1, device):
                        if record["kind"] is None:
                            continue
                        record.update(backend=backend, dtype=dtype_name, aligned=aligned, momentum=momentum != 0)
                        records.append(record)
                        if report is None:
                            continue
                        key = report_key(backend, record, dtype_name, aligned, momentum != 0)
                        row = report.get(key)
                        found = mismatches if backend == "triton" else notes  # see the detail below
                        what = f"{backend} {key[1]} {key[2]} aligned={key[3]}"
                        if row is None:
                            found.append(f"{what}: launched, but the report has no such row")
                            continue
                        record["report_registers"] = row["registers"]
                        if row["registers"] != record["registers"]:
                            found.append(f"{what}: {record['registers']} registers launched, {row['registers']} "
                                         "in the report")
                        threads = (record["block"] or [None])[0]
                        if row.get("num_warps") and threads != 32 * row["num_warps"]:
                            found.append(f"{what}: {threads} threads per block launched, {row['num_warps']} "
                                         "warps in the report")
    if device.type == "cuda" and not records:
        return False, "the profiler recorded no ZENITH kernel", {"records": records}
    detail = (f"{len(records)} kernel launches (4 dtypes x aligned/misaligned, fp32 also mixed, x momentum on/off "
              f"per backend)")
    if unsupported:
        detail += f"; not taken: {'; '.join(unsupported)}"
    if report is None:
        detail += "; no kernel report to compare with"
    else:
        compared = [r for r in records if r.get("report_registers") is not None]
        equal = sum(r["report_registers"] == r["registers"] for r in compared)
        detail += f"; registers equal to the report's in {equal} of {len(compared)} compared launches"
        if mismatches:
            detail += "; Triton: " + "; ".join(sorted(set(mismatches)))
        if notes:
            # The report compiles csrc/ with plain nvcc -arch flags, the extension is built with
            # torch's (its -D__CUDA_NO_HALF_OPERATORS__ and friends): a difference is worth a look,
            # not a failure.
            detail += "; CUDA C++ (informational, other compile flags): " + "; ".join(sorted(set(notes)))
    if device.type != "cuda":
        detail += " [CPU dry run: no kernels]"
    return not mismatches, detail, {"records": records, "mismatches": sorted(set(mismatches)),
                                    "notes": sorted(set(notes)), "unsupported": unsupported}


# ------------------------------------------------------------------ env, backend, selftest
def print_env(device: torch.device) -> int:
    import platform

    print(f"python: {platform.python_version()}")
    print(f"torch: {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton: {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        print(f"triton: not importable ({type(exc).__name__}: {exc})")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"gpu: {props.name}")
        print(f"capability: {props.major}.{props.minor}")
        print(f"sm_count: {props.multi_processor_count}")
        print(f"memory_gib: {props.total_memory / 2**30:.1f}")
        print(f"l2_mib: {getattr(props, 'L2_cache_size', 0) / 2**20:.0f}")
    else:
        print("gpu: none")
    try:
        import zenith_fused
    except Exception as exc:  # noqa: BLE001
        print(f"zenith_fused: does not import ({type(exc).__name__}: {exc})")
        return 1
    print(f"zenith_fused: {zenith_fused.__file__}")
    return 0


def make_ready(backend: str, device: torch.device) -> int:
    """Build (``"cuda"``: compile ``csrc/``), then take one step: ready means it ran."""
    from zenith_fused import ZenithFused

    start = time.perf_counter()
    reason = backend_reason(backend, device)
    if reason:
        print(f"{backend} backend unavailable: {reason}")
        return 1
    p = torch.ones(3, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    ZenithFused([p], backend=backend).step()
    synchronize(device)
    print(f"{backend} backend ready on {device}: one step ran ({time.perf_counter() - start:.0f} s)")
    return 0


def selftest(recorder: Recorder) -> None:
    """Every check on the CPU, the reference backend, small sizes: this file's code, not a GPU."""
    cpu = torch.device("cpu")
    small = {"small": [(7, 13), (1,), (33,), (4, 3, 3, 3), (1000,)]}
    recorder.run("selftest sync-graph/no-host-sync", "reference", check_no_host_sync, "reference", cpu)
    recorder.run("selftest sync-graph/cuda-graph", "reference", check_cuda_graph, "reference", cpu)
    recorder.run("selftest reference", "reference", check_reference, "reference", cpu, sets=("small",),
                 shapes_of=small.__getitem__)
    recorder.run("selftest large", "reference", check_large, "reference", cpu, numel=4096 + 16, chunk=1000)
    recorder.run("selftest one-step", "reference", check_one_step, "reference", cpu)
    recorder.run("selftest bandwidth", "reference", check_bandwidth, ["reference"], cpu, numel=1 << 12, repeats=2)
    recorder.run("selftest launches", "reference", check_launches, ["reference"], cpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("check", choices=("sync-graph", "reference", "large", "one-step", "bandwidth", "launches",
                                      "backend", "env", "selftest"))
    ap.add_argument("name", nargs="?", help="backend: the backend to make ready (e.g. cuda)")
    ap.add_argument("--backends", default="triton,cuda", help="comma-separated ZenithFused backends")
    ap.add_argument("--json", help="write the results here (rewritten after each)")
    ap.add_argument("--report", help="launches: kernel_report.py's JSON for this GPU's architecture")
    ap.add_argument("--numel", type=int, help="large / bandwidth: elements of the tensor")
    args = ap.parse_args(argv)
    if args.check == "env":
        return print_env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    recorder = Recorder(args.json)
    if args.check == "selftest":
        selftest(recorder)
        return recorder.exit_status()
    if not torch.cuda.is_available():
        print(f"SKIP {args.check}: no CUDA GPU (torch.cuda.is_available() is False)")
        return EXIT_NOTHING_RAN
    device = torch.device("cuda")
    if args.check == "backend":
        return make_ready(args.name or "cuda", device)
    print(f"gpu_checks {args.check} on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    backends = usable_backends(args.backends.split(","), device, recorder, args.check)
    sized = {} if args.numel is None else {"numel": args.numel}
    if args.check == "bandwidth" and backends:
        recorder.run("bandwidth", ",".join(backends), check_bandwidth, backends, device, **sized)
    elif args.check == "launches" and backends:
        recorder.run("launches", ",".join(backends), check_launches, backends, device, args.report)
    per_backend = {
        "sync-graph": [("sync-graph/no-host-sync", check_no_host_sync, {}),
                       ("sync-graph/cuda-graph", check_cuda_graph, {})],
        "reference": [("reference", check_reference, {})],
        "large": [("large", check_large, sized)],
        "one-step": [("one-step", check_one_step, {})],
    }.get(args.check, [])
    for backend in backends:
        for name, check, kwargs in per_backend:
            recorder.run(name, backend, check, backend, device, **kwargs)
            torch.cuda.empty_cache()
    return recorder.exit_status()


if __name__ == "__main__":
    sys.exit(main())
