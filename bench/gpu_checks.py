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

* bandwidth (``--bandwidth PATH``, instead of the checks above): achieved bandwidth of each Triton
  kernel (squared-norm partials; update with and without momentum) with CUDA events, float32 and
  bfloat16, aligned and unaligned tables, a few sizes, next to a device-to-device copy of the same
  bytes; plus the registers and spills of the kernels the GPU actually compiled. JSON to PATH.

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


# ------------------------------------------------------------------ bandwidth of the Triton kernels
def _spy_kernels():
    """Wrap each Triton kernel so that the compiled kernel of its last launch is kept."""
    from zenith_fused.triton_kernels import history, momentum, sq_norm

    compiled = {}

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                result = self.kernel[grid](*args, **kwargs)
                compiled[self.name] = result
                return result
            return launch

    for module, attr in ((sq_norm, "_sq_norm_partials_kernel"), (momentum, "_momentum_update_kernel"),
                         (history, "_update_history_kernel")):
        kernel = getattr(module, attr)
        setattr(module, attr, Spy(attr, getattr(kernel, "kernel", kernel)))
    return compiled


def _time_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, each between two CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure_bandwidth(path: str, sizes=(1 << 20, 1 << 24, 1 << 27), repeats: int = 20, budget_s: float = 60.0,
                      device: str = "cuda") -> int:
    """Achieved GB/s of each streaming kernel, written to ``path`` as JSON; returns an exit status.
    (``device="cpu"`` with the interpreter and stand-in CUDA events only exercises this code.)"""
    import json

    from zenith_fused import _table
    from zenith_fused import triton_kernels as K
    from zenith_fused.reference import ZenithHistory

    compiled = _spy_kernels()
    device = torch.device(device)
    config = K.launch_config(device)
    free, _ = torch.cuda.mem_get_info()
    rows, t0 = [], time.perf_counter()
    for dtype in (torch.float32, torch.bfloat16):
        for numel in sizes:
            size = torch.tensor([], dtype=dtype).element_size()
            if 6 * numel * size > 0.5 * free:
                print(f"SKIP bandwidth {dtype} {numel}: not enough free memory")
                continue
            for aligned in (True, False):
                if time.perf_counter() - t0 > budget_s:
                    print(f"SKIP bandwidth {dtype} {numel} aligned={aligned}: over the {budget_s:.0f} s budget")
                    continue
                offset = 0 if aligned else 1

                def tensor():  # unaligned: a view one element into a buffer
                    return torch.randn(numel + offset, device=device).to(dtype)[offset:]

                param, grad, buffer = tensor(), tensor(), tensor()
                step = torch.zeros((), dtype=torch.int64, device=device)
                history = ZenithHistory.zeros(4, device)
                history.step_applied.fill_(1)
                history.step.fill_(1)
                for momentum in (True, False):
                    table = _table.build_tensor_table(
                        [param], [grad], [buffer if momentum else None], [step if momentum else None], [0],
                        chunk_size=config.chunk_size, placeholder_step=history.step)
                    hyperparams, lr_ptrs = _table.hyperparam_table(
                        [(1e-6, 0.9 if momentum else 0.0, 1.0, 0.0, 0.0, 0.0)], torch.float32, device)
                    partials = torch.empty(table.num_chunks, device=device)
                    cases = [("sq_norm_partials", numel * size,
                              lambda: K.sq_norm_partials(table, dtype, partials))] if momentum else []
                    cases.append(("momentum_update" + ("" if momentum else "[no momentum]"),
                                  numel * size * (5 if momentum else 3),
                                  lambda: K.momentum_update(table, dtype, hyperparams, lr_ptrs, history.lr_scale,
                                                            history.step, history.step_applied,
                                                            history.grad_multiplier)))
                    for name, nbytes, fn in cases:
                        ms = _time_ms(fn, repeats)
                        kernel = compiled.get("_sq_norm_partials_kernel" if name == "sq_norm_partials"
                                              else "_momentum_update_kernel")
                        rows.append(dict(kernel=name, dtype=str(dtype).replace("torch.", ""), aligned=aligned,
                                         numel=numel, bytes=nbytes, ms=ms, gb_per_s=nbytes / ms / 1e6,
                                         registers=getattr(kernel, "n_regs", None),
                                         spills=getattr(kernel, "n_spills", None)))
                # The same bytes through torch's copy kernel: what the memory system gives a stream.
                dst = torch.empty_like(param)
                ms = _time_ms(lambda: dst.copy_(param), repeats)
                rows.append(dict(kernel="torch copy_", dtype=str(dtype).replace("torch.", ""), aligned=aligned,
                                 numel=numel, bytes=2 * numel * size, ms=ms, gb_per_s=2 * numel * size / ms / 1e6,
                                 registers=None, spills=None))
                del param, grad, buffer, dst
                torch.cuda.empty_cache()
    copy = {(r["dtype"], r["numel"], r["aligned"]): r["gb_per_s"] for r in rows if r["kernel"] == "torch copy_"}
    print(f"{'kernel':30} {'dtype':9} {'aligned':7} {'numel':>10} {'ms':>8} {'GB/s':>8} {'/copy':>6} regs spills")
    for r in rows:
        r["vs_copy"] = r["gb_per_s"] / copy.get((r["dtype"], r["numel"], r["aligned"]), float("nan"))
        print(f"{r['kernel']:30} {r['dtype']:9} {str(r['aligned']):7} {r['numel']:>10} {r['ms']:8.4f} "
              f"{r['gb_per_s']:8.1f} {r['vs_copy']:6.2f} {r['registers']} {r['spills']}")
    import triton

    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                   "torch": torch.__version__, "triton": triton.__version__,
                   "launch_config": config.__dict__, "rows": rows}, f, indent=1)
    print(f"bandwidth: {len(rows)} rows -> {path}")
    spilled = [r for r in rows if r["spills"]]
    for r in spilled:
        print(f"FAIL bandwidth: {r['kernel']} {r['dtype']} spills {r['spills']}")
    return 1 if spilled or not rows else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="triton,cuda,reference",
                    help="ZenithFused backends to check; those that cannot run on CUDA are skipped")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the checks' sequences on the CPU, without sync mode or graphs (no PASS means much)")
    ap.add_argument("--bandwidth", metavar="PATH",
                    help="instead of the checks: measure the Triton kernels' bandwidth, JSON to PATH")
    ap.add_argument("--bandwidth-budget", type=float, default=60.0, help="seconds for the measurements")
    args = ap.parse_args(argv)
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("SKIP gpu_checks: no CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    if args.bandwidth:
        if DEVICE != "cuda":
            print("SKIP bandwidth: needs a CUDA GPU")
            return 2
        return measure_bandwidth(args.bandwidth, budget_s=args.bandwidth_budget)
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
