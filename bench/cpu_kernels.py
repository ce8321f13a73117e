#!/usr/bin/env python
"""The compiled CPU kernels against torch's fused SGD, operator against operator.

    python bench/cpu_kernels.py [--threads N] [--sets resnet50 gpt2-small] [--dtypes float32 bfloat16]

Times, in one process and on the same tensors, ``torch._fused_sgd_`` (what
``torch.optim.SGD(fused=True)`` runs on the CPU: momentum 0.9, weight decay, no first step) and the
ZENITH operators as the step plan calls them (``torch.ops.zenith_fused``, on tables from
``zenith_fused._table``): ``momentum_update`` alone, ``sq_norm_partials`` alone, and the whole
step (norm partials, history, update). Each repeat runs every candidate once, in a rotating order;
the table shows medians, the ratio to fused SGD next to each time, and the bandwidth each one
reaches over the bytes it must move (fused SGD and the update: read p, g, buf, write p, buf; the
norm: read g; the step: both, 24 bytes per float32 parameter against SGD's 20, so 1.2x is byte
parity). ``torch._foreach_norm`` of the gradients is there for scale: what reading every gradient
once costs torch's own kernel.

Medians of interleaved repeats because the machine this runs on is usually shared; run with one
thread first (the default), then with all of them.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from param_sets import PARAM_SETS  # noqa: E402

from zenith_fused import _ext, _table  # noqa: E402
from zenith_fused.reference import ZenithHistory, compute_dtype  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 1e-4
CHUNK_SIZE = 32768  # the CPU engine's


def make_bucket(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    bufs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    steps = [torch.tensor(1) for _ in shapes]  # filled at step 1: every later step reads the buffer
    return params, grads, bufs, steps


def candidates(params, grads, bufs, steps, dtype):
    ops = torch.ops.zenith_fused
    placeholder = torch.zeros((), dtype=torch.int64)
    table = _table.build_tensor_table(params, grads, bufs, steps, [0] * len(params), chunk_size=CHUNK_SIZE,
                                      placeholder_step=placeholder)
    hyperparams, lr_ptrs = _table.hyperparam_table([(LR, MOMENTUM, 1.0, WEIGHT_DECAY, 0.0, 0.0)],
                                                   compute_dtype(dtype), torch.device("cpu"))
    history = ZenithHistory.zeros(100, torch.device("cpu"))
    history.step.fill_(5)
    history_list = history.kernel_tensors()
    partials = torch.empty(table.num_chunks)
    applied = torch.ones((), dtype=torch.int32)
    keep_alive = (placeholder, table, hyperparams, lr_ptrs, history)

    def sgd():
        torch._fused_sgd_(params, grads, bufs, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, lr=LR, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=False)

    def update():
        # A fixed step_applied and lr_scale: the update alone, whatever the history says.
        ops.momentum_update(table.tensors, table.chunks, dtype, CHUNK_SIZE, True, hyperparams, lr_ptrs,
                            history.lr_scale, history.step, applied, history.grad_multiplier)

    def norm():
        ops.sq_norm_partials(table.tensors, table.chunks, dtype, CHUNK_SIZE, partials)

    def step():
        ops.sq_norm_partials(table.tensors, table.chunks, dtype, CHUNK_SIZE, partials)
        ops.update_history(partials, history_list, None, None, None)
        ops.momentum_update(table.tensors, table.chunks, dtype, CHUNK_SIZE, True, hyperparams, lr_ptrs,
                            history.lr_scale, history.step, history.step_applied, history.grad_multiplier)

    def torch_norm():
        # torch's own multi-tensor norm: what reading every gradient once costs torch.
        torch._foreach_norm(grads)

    return ({"fused SGD": sgd, "update": update, "norm": norm, "ZENITH step": step, "torch norm": torch_norm},
            keep_alive)


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    names = list(fns)
    times = {name: [] for name in names}
    for name in names:  # warm-up: page faults, thread pool
        fns[name]()
    gc.collect()
    gc.disable()  # a collection inside a timed call would land on whichever candidate runs then
    try:
        _time_rounds(fns, names, times, repeats)
    finally:
        gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


def _time_rounds(fns, names, times, repeats):
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)


def bytes_moved(name: str, numel: int, element_size: int) -> int:
    per_element = {"fused SGD": 5, "update": 5, "norm": 1, "ZENITH step": 6, "torch norm": 1}[name]
    return per_element * numel * element_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: all cores)")
    ap.add_argument("--sets", nargs="+", default=["resnet50", "gpt2-small"], choices=sorted(PARAM_SETS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)

    reason = _ext.unavailable_reason("cpu")
    if reason is not None:
        print(f"the compiled CPU kernels are unavailable: {reason}", file=sys.stderr)
        return 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{threads} thread{'s' if threads != 1 else ''}, kernels {torch.ops.zenith_fused.cpu_kernel_isa()}, "
          f"medians of {args.repeats} interleaved repeats")
    header = f"{'set':<12} {'dtype':<9} {'candidate':<12} {'ms':>9} {'x SGD':>7} {'GB/s':>7}"
    print(header)
    print("-" * len(header))
    for set_name in args.sets:
        shapes = PARAM_SETS[set_name][0]
        numel = sum(math.prod(s) for s in shapes)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            params, grads, bufs, steps = make_bucket(shapes, dtype)
            fns, keep_alive = candidates(params, grads, bufs, steps, dtype)
            medians = time_interleaved(fns, args.repeats)
            base = medians["fused SGD"]
            for name, seconds in medians.items():
                gbps = bytes_moved(name, numel, params[0].element_size()) / seconds / 1e9
                print(f"{set_name:<12} {dtype_name:<9} {name:<12} {seconds * 1e3:9.2f} {seconds / base:7.2f} "
                      f"{gbps:7.1f}")
            del params, grads, bufs, steps, fns, keep_alive
    return 0


if __name__ == "__main__":
    sys.exit(main())
