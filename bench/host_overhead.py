"""Host time of one ``step()``: ZenithFused's backends against torch's own SGD, side by side.

Every parameter holds one element, so the kernels cost next to nothing and what is measured is the
host's work per step: Python, the dispatcher, checks and launches. That is what bounds a GPU step
unless it is captured in a CUDA graph. The sets have the tensor counts of ResNet-50 (161), GPT-2
small (148) and a model of 2000 tensors; the gradients stay the same tensors from step to step, as
in training with ``zero_grad(set_to_none=False)``; ``--set-to-none`` gives every parameter a new
gradient tensor before every step instead, as the default ``zero_grad()`` and backward do.

Where no GPU is present the Triton backend runs its plan with the three launchers replaced by
no-ops (the output says so): that measures everything ZenithFused does on the host except the
launches themselves, which on a GPU cost a few microseconds each. The peers are
``torch.optim.SGD(momentum=0.9)`` with ``fused=True`` and with ``foreach=True``. Methods are
interleaved round by round and medians are reported, with one thread, as ratios to
``SGD(fused=True)`` next to the absolute microseconds.

    python bench/host_overhead.py --out bench/results --name host-overhead-cpu-2cores-<date>
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# The Triton backend is resolvable on CPU tensors only under the interpreter; its launchers are
# replaced by no-ops below, so nothing is interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from zenith_fused import ZenithFused  # noqa: E402

SETS = {"resnet50": 161, "gpt2-small": 148, "2000-tensors": 2000}
PEERS = ("sgd-fused", "sgd-foreach")


def _noop_triton_launches() -> bool:
    """Replace the Triton launchers by no-ops where there is no GPU; True when done."""
    if torch.cuda.is_available():
        return False
    import zenith_fused.triton_kernels as kernels

    for name in ("sq_norm_partials", "update_history", "momentum_update"):
        setattr(kernels, name, lambda *args, **kwargs: None)
    return True


def make_optimizer(method: str, params: list[torch.Tensor]):
    if method == "sgd-fused":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    if method == "sgd-foreach":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True)
    backend = method.removeprefix("zenith-")
    return ZenithFused(params, lr=0.1, momentum=0.9, backend=backend)


def available_methods(device: torch.device) -> tuple[list[str], dict[str, str]]:
    from zenith_fused._engines import unavailable_reason

    methods, skipped = list(PEERS), {}
    for backend in ("cpu", "triton", "cuda", "reference"):
        reason = unavailable_reason(backend, device)
        if reason is None:
            methods.append(f"zenith-{backend}")
        else:
            skipped[f"zenith-{backend}"] = reason
    return methods, skipped


def time_steps(opt, params, steps: int, sync, grad_sets) -> float:
    """Microseconds per step over ``steps`` steps. With ``grad_sets``, every step first gives each
    parameter a gradient tensor other than its last one (what ``zero_grad(set_to_none=True)``
    then backward does); that assignment is timed for every method alike."""
    sync()
    start = time.perf_counter()
    for k in range(steps):
        if grad_sets:
            for p, g in zip(params, grad_sets[k % 2]):
                p.grad = g
        opt.step()
    sync()
    return (time.perf_counter() - start) / steps * 1e6


def measure(count: int, methods: list[str], device: torch.device, rounds: int, steps: int, set_to_none: bool) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {}
    for method in methods:
        params = [torch.nn.Parameter(torch.randn(1, device=device)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        grad_sets = [[torch.randn_like(p) for p in params] for _ in range(2)] if set_to_none else None
        opt = make_optimizer(method, params)
        for _ in range(3):  # state, plan, first-call costs
            opt.step()
        runs[method] = (opt, params, grad_sets)
    samples = {m: [] for m in methods}
    for _ in range(rounds):
        for method in methods:
            opt, params, grad_sets = runs[method]
            samples[method].append(time_steps(opt, params, steps, sync, grad_sets))
    return {m: statistics.median(v) for m, v in samples.items()} | {"_samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median taken)")
    parser.add_argument("--steps", type=int, default=50, help="steps per round and method")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated among {list(SETS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set-to-none", action="store_true",
                        help="give every parameter a new gradient tensor before every step, as "
                             "zero_grad(set_to_none=True) and backward do (timed for every method)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON")
    parser.add_argument("--name", default=None, help="file stem (default host-overhead-<device>)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 10 steps: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 10
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    noop = device.type == "cpu" and _noop_triton_launches()
    methods, skipped = available_methods(device)

    print(f"step() host time, 1-element tensors, {device}, {args.threads} thread(s), medians of "
          f"{args.rounds} interleaved rounds of {args.steps} steps"
          + (", a new gradient tensor per parameter before every step (assignment timed)" if args.set_to_none else ""))
    if noop:
        print("no GPU: the Triton backend's three launchers are replaced by no-ops (host work only)")
    for method, reason in skipped.items():
        print(f"skipped {method}: {reason}")
    results = {}
    header = f"{'set':<14}{'tensors':>8}" + "".join(f"{m:>22}" for m in methods)
    print(header)
    for name in args.sets.split(","):
        count = SETS[name]
        medians = measure(count, methods, device, args.rounds, args.steps, args.set_to_none)
        base = medians["sgd-fused"]
        cells = "".join(f"{medians[m]:>12.0f} us {medians[m] / base:>5.2f}x" for m in methods)
        print(f"{name:<14}{count:>8}{cells}")
        results[name] = {"tensors": count, "median_us": {m: medians[m] for m in methods},
                         "ratio_to_sgd_fused": {m: medians[m] / base for m in methods},
                         "samples_us": medians["_samples"]}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.name or f"host-overhead-{device.type}"
        report = {
            "what": "step() host microseconds with 1-element tensors; medians of interleaved rounds",
            "device": str(device), "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
            "triton_launches_are_noops": noop, "set_to_none": args.set_to_none, "skipped": skipped,
            "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "results": results,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
