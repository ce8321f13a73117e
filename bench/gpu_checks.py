#!/usr/bin/env python
"""Checks of ZenithFused that need a CUDA GPU and that the test suite on a CPU cannot make.

    python bench/gpu_checks.py [--backends triton,cuda,reference]

* no-host-sync: after warm-up, steps under ``torch.cuda.set_sync_debug_mode("error")``, which
  raises on any synchronizing CUDA call: steady steps, new gradient tensors (the fused backends
  rebuild their tensor table), a non-finite gradient (the step must be skipped on the device), and
  a learning-rate change (a new hyper-parameter table).
* cuda-graph: one eager step, a ``torch.cuda.CUDAGraph`` capture of ``step()`` over static
  gradient tensors, then replays with new gradient values copied in (one of them non-finite, the
  window wrapping); parameters, momentum buffers and history must equal, bit for bit, those of an
  optimizer stepped eagerly on the same gradients.

Each check prints one PASS/FAIL line with its numbers. Exit status: 0 all passed, 1 a check
failed, 2 no CUDA GPU. Graph capture of the reference backend is reported but does not count:
the reference promises no host sync, not capturability.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

# --cpu-dry-run runs the same sequences on the CPU (no sync mode, the "graph" stepping eagerly), so
# the checks' own logic can be exercised on a machine without a GPU before GPU time is spent.
DEVICE = "cuda"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def set_sync_debug_mode(mode: str) -> None:
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode(mode)

SHAPES = [(1000, 33), (7,), (1,), (4097,), (64, 3, 3, 3), (70000,)]
BF16_SHAPES = [(513,), (32, 32)]


def make_groups(seed: int = 0) -> list[list[torch.Tensor]]:
    """Two parameter groups; float32 and bfloat16 tensors, so the step spans two buckets."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    fp32 = [torch.randn(s, device=DEVICE, generator=generator).requires_grad_(True) for s in SHAPES]
    bf16 = [torch.randn(s, device=DEVICE, generator=generator, dtype=torch.bfloat16).requires_grad_(True)
            for s in BF16_SHAPES]
    return [fp32[:3] + bf16[:1], fp32[3:] + bf16[1:]]


def clone_groups(groups):
    return [[p.detach().clone().requires_grad_(True) for p in g] for g in groups]


def make_optimizer(groups, backend: str, window_size: int = 3):
    from zenith_fused import ZenithFused

    return ZenithFused([{"params": groups[0]}, {"params": groups[1], "lr": 0.05}], lr=0.1, momentum=0.9,
                       window_size=window_size, backend=backend)


def random_grads(groups, generator, scale: float = 1.0):
    return [[torch.randn(p.shape, device=DEVICE, generator=generator, dtype=p.dtype) * scale for p in g]
            for g in groups]


def check_no_host_sync(backend: str) -> tuple[bool, str]:
    groups = make_groups()
    opt = make_optimizer(groups, backend)
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    params = [p for g in groups for p in g]
    for grads in (random_grads(groups, generator) for _ in range(3)):  # warm-up: JIT, tables
        for p, gr in zip(params, (x for g in grads for x in g)):
            p.grad = gr
        opt.step()
    synchronize()
    skipped_before = int(opt.skipped_steps)
    steps = 0
    stage = "steady steps"
    set_sync_debug_mode("error")
    try:
        for _ in range(5):  # the same gradient tensors, new values
            for p in params:
                p.grad.normal_(generator=generator)
            opt.step()
            steps += 1
        stage = "new gradient tensors"
        for p in params:
            p.grad = torch.randn(p.shape, device=DEVICE, dtype=p.dtype, generator=generator)
        opt.step()
        steps += 1
        stage = "a non-finite gradient"
        params[0].grad.view(-1)[0] = float("inf")
        opt.step()
        steps += 1
        params[0].grad.view(-1)[0] = 0.5
        stage = "a learning-rate change"
        opt.param_groups[0]["lr"] = 0.2
        opt.step()
        steps += 1
        stage = "reading the history as tensors"
        _ = opt.grad_norm + opt.lr_scale  # device tensors: no read on the host
        for _ in range(3):
            opt.step()
            steps += 1
    except RuntimeError as exc:
        set_sync_debug_mode("default")
        where = "".join(traceback.format_exc(limit=-4).splitlines(keepends=True)[-8:])
        return False, f"synchronized during {stage} after {steps} clean steps: {exc}\n{where}"
    finally:
        set_sync_debug_mode("default")
    synchronize()
    skipped = int(opt.skipped_steps) - skipped_before
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    ok = skipped == 1 and finite
    return ok, (f"{steps} steps under set_sync_debug_mode('error') (steady, new grad tensors, one non-finite, "
                f"an lr change): 0 syncs; skipped_steps +{skipped} (expected +1); parameters finite: {finite}")


def check_cuda_graph(backend: str, steps: int = 8) -> tuple[bool, str]:
    groups = make_groups(seed=2)
    eager_groups, graph_groups = clone_groups(groups), clone_groups(groups)
    eager_opt = make_optimizer(eager_groups, backend)
    graph_opt = make_optimizer(graph_groups, backend)
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    # The gradient norm changes from step to step so the window mean, maximum and scale move.
    sequence = [random_grads(groups, generator, scale=1.0 + i % 3) for i in range(steps)]
    nonfinite_step = 4
    sequence[nonfinite_step][0][0].view(-1)[3] = float("nan")

    eager_params = [p for g in eager_groups for p in g]
    graph_params = [p for g in graph_groups for p in g]
    for params in (eager_params, graph_params):
        for p in params:
            p.grad = torch.empty_like(p)  # static gradient tensors: the graph reads these addresses

    def load(params, i):
        for p, g in zip(params, (x for gs in sequence[i] for x in gs)):
            p.grad.copy_(g)

    for i in range(steps):
        load(eager_params, i)
        eager_opt.step()

    load(graph_params, 0)
    if DEVICE == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph_opt.step()  # step 1, eagerly: JIT compilation, state and tables outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_opt.step()
        replay = graph.replay
    else:
        graph_opt.step()
        replay = graph_opt.step
    for i in range(1, steps):
        load(graph_params, i)
        replay()
    synchronize()

    diffs = {}
    for name, a_list, b_list in (
        ("params", eager_params, graph_params),
        ("momentum buffers", [eager_opt.state[p]["momentum_buffer"] for p in eager_params],
         [graph_opt.state[p]["momentum_buffer"] for p in graph_params]),
    ):
        diffs[name] = max((a.float() - b.float()).abs().max().item() for a, b in zip(a_list, b_list))
    history_equal = all(
        torch.equal(getattr(eager_opt.history, f), getattr(graph_opt.history, f))
        for f in ("step", "norm_window", "window_max", "skipped_steps", "lr_scale")
    )
    equal = all(torch.equal(a, b) for a, b in zip(eager_params, graph_params)) and all(
        torch.equal(eager_opt.state[a]["momentum_buffer"], graph_opt.state[b]["momentum_buffer"])
        for a, b in zip(eager_params, graph_params)
    )
    t, skipped = int(graph_opt.history.step), int(graph_opt.history.skipped_steps)
    ok = equal and history_equal and t == steps - 1 and skipped == 1
    return ok, (f"capture + {steps - 1} replays vs {steps} eager steps (window 3, one NaN step): "
                f"max |diff| params {diffs['params']:.3g}, buffers {diffs['momentum buffers']:.3g}; "
                f"history equal: {history_equal}; t={t} (expected {steps - 1}), skipped={skipped} (expected 1)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="triton,cuda,reference",
                    help="ZenithFused backends to check; those that cannot run on CUDA are skipped")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the checks' sequences on the CPU, without sync mode or graphs (no PASS means much)")
    args = ap.parse_args(argv)
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("SKIP gpu_checks: no CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    from zenith_fused._engines import resolve_backend

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run: no sync mode, no graph)"
    print(f"gpu_checks on {name}, torch {torch.__version__}")
    results = []
    for backend in args.backends.split(","):
        try:
            resolve_backend(backend, torch.device(DEVICE))
        except RuntimeError as exc:
            print(f"SKIP [{backend}]: {exc}")
            continue
        for name, check, counts in (("no-host-sync", check_no_host_sync, True),
                                    ("cuda-graph", check_cuda_graph, backend != "reference")):
            t0 = time.perf_counter()
            try:
                ok, detail = check(backend)
            except Exception as exc:  # a crash is a failure of the check, with its reason
                ok, detail = False, f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exc(limit=-3))
            set_sync_debug_mode("default")
            verdict = "PASS" if ok else "FAIL"
            note = "" if counts else " (informational)"
            print(f"{verdict} {name} [{backend}]{note} ({time.perf_counter() - t0:.1f} s): {detail}", flush=True)
            results.append(ok or not counts)
    if not results:
        print(f"FAIL: no backend could run on {DEVICE}")
        return 1
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
