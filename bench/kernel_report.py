#!/usr/bin/env python
"""Registers, spills and global load/store widths of every GPU kernel, compiled without a GPU.

    python bench/kernel_report.py --arch 90 [--json PATH] [--no-nvcc]

Triton: the launchers of ``zenith_fused.triton_kernels`` are called on CPU tensors with each
kernel's launch intercepted, once per specialization a step can launch (float32, bfloat16,
float16, float64; momentum on and off; GradScaler's ``grad_scale``/``found_inf`` and clipping
flags of the history kernel; aligned and unaligned tables, the latter made by slicing a flat
buffer at an odd offset, and for float32 a mixed table, one aligned tensor beside one at an odd
offset). Alignment is decided per tensor (the table's ALIGNED column): a table with any aligned
tensor launches the VECTORIZE specialization, in which each tensor takes the 128-bit path or the
scalar one at run time; a table with none launches the scalar-only kernel. The ``vectorize``
column shows which one a table of each kind runs. Each intercepted launch is bound with the same code ``JITFunction.run``
uses to pick a cached kernel (so the report compiles exactly the signature, constexprs and
alignment attributes a GPU launch would) and compiled ahead of time with ``triton.compile`` for
``GPUTarget("cuda", ARCH, 32)``, with the ``launch_config`` of that architecture. ptxas ships in
the Triton wheel; its ``-v`` log gives registers and spills, the PTX the widest ``ld.global`` and
``st.global`` in bits.

CUDA C++: ``nvcc -arch=sm_ARCH -Xptxas -v`` on ``csrc/cuda/kernels_cuda.cu`` (plain CUDA, include
path ``csrc/``), one row per kernel instantiation, widths from the kept PTX. Skipped, with a
message, when nvcc is absent.

One row per specialization: kernel, dtype, aligned, registers, spills, load_bits, store_bits, and
also num_warps, occupancy (theoretical, from registers and warps per program) and fma (fused
multiply-adds in the PTX; the update promises none). ``--json`` writes the rows.

Exit status 1 when anything fails to compile, when any kernel spills, when an aligned float32,
bfloat16 or float16 squared-norm kernel lacks 128-bit loads or such an update kernel lacks 128-bit
loads and stores (the reason the aligned specialization exists), or when a Triton update kernel
contains an FMA (its same-bits promise); 0 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16", "float16", "float64")
VECTOR_DTYPES = ("float32", "bfloat16", "float16")
COLUMNS = ("kernel", "dtype", "aligned", "vectorize", "registers", "spills", "load_bits", "store_bits", "num_warps",
           "occupancy", "fma", "loads", "stores")


# ---------------------------------------------------------------------------------- PTX and logs
_MEMORY_OP = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")


def access_mix(ptx: str) -> dict[str, dict[int, int]]:
    """How many ``ld.global`` / ``st.global`` instructions ``ptx`` has of each width in bits."""
    mix = {"ld": {}, "st": {}}
    for kind, suffix in _MEMORY_OP.findall(ptx):
        lanes, bits = 1, 0
        for part in suffix.split(".")[1:]:
            if re.fullmatch(r"v[248]", part):
                lanes = int(part[1:])
            elif re.fullmatch(r"[bfsu](8|16|32|64|128)", part):
                bits = int(part[1:])
        mix[kind][lanes * bits] = mix[kind].get(lanes * bits, 0) + 1
    return mix


def access_widths(ptx: str) -> tuple[int, int]:
    """The widest global load and store in ``ptx``, in bits (0 when there is none)."""
    mix = access_mix(ptx)
    return max(mix["ld"], default=0), max(mix["st"], default=0)


def mix_text(counts: dict[int, int]) -> str:
    """``{128: 6, 64: 9}`` -> ``"128x6 64x9"``: in a Triton kernel the 64-bit loads are mostly the
    int64 table's (addresses, sizes), so the mix shows what the data itself moves with."""
    return " ".join(f"{bits}x{n}" for bits, n in sorted(counts.items(), reverse=True)) or "-"


def fma_count(ptx: str) -> int:
    return len(re.findall(r"\bfma\.rn", ptx))


def ptxas_usage(log: str) -> list[tuple[str | None, int, int]]:
    """``(function, registers, spill bytes)`` per function in a ``ptxas -v`` log."""
    rows, function, spills = [], None, 0
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            function, spills = m.group(1), 0
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = int(m.group(1)) + int(m.group(2))
        elif m := re.search(r"Used (\d+) registers", line):
            rows.append((function, int(m.group(1)), spills))
    return rows


def occupancy(registers: int, num_warps: int) -> float:
    """Theoretical occupancy (resident warps / 64) of an sm_80/sm_90 SM: 64 K registers allocated
    per warp in units of 256, at most 64 warps and 32 programs."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // (per_warp * num_warps) if registers else 32
    programs = min(by_registers, 64 // num_warps, 32)
    return programs * num_warps / 64


# ---------------------------------------------------------------------------------- Triton
def _launches(arch: int):
    """Every launch the launchers make for ``arch``: ``[(name, dtype, aligned, kernel, args, kwargs)]``."""
    import torch

    from zenith_fused import _table
    from zenith_fused.reference import ZenithHistory
    from zenith_fused.triton_kernels import config, history, momentum, sq_norm

    cfg = config.config_for_arch(arch)
    captured = []

    def interceptor(kernel, meta):
        def run(*args, grid, warmup, **kwargs):
            captured.append((*meta(), kernel, args, kwargs))
        return run

    current = {}
    kernels = {
        "sq_norm_partials": sq_norm._sq_norm_partials_kernel,
        "momentum_update": momentum._momentum_update_kernel,
        "update_history": history._update_history_kernel,
    }
    original_config = config.launch_config
    config.launch_config = lambda device: cfg
    for name, kernel in kernels.items():
        kernel.run = interceptor(kernel, lambda name=name: (current.get("name", name), current["dtype"],
                                                            current["aligned"]))
    try:
        numels = (cfg.chunk_size + 5, 3)  # two chunks, then a small tensor
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            for aligned in (True, "mixed", False) if dtype_name == "float32" else (True, False):
                def tensors():
                    if aligned is True:
                        return [torch.zeros(n, dtype=dtype) for n in numels]
                    # One element into a buffer of its own: never 16-byte aligned, whatever the dtype.
                    odd = [torch.zeros(n + 1, dtype=dtype)[1:] for n in numels]
                    if aligned == "mixed":  # the large tensor aligned, the small one at an odd offset
                        return [torch.zeros(numels[0], dtype=dtype), odd[1]]
                    return odd
                params, grads = tensors(), tensors()
                steps = [torch.zeros((), dtype=torch.int64) for _ in numels]
                placeholder = torch.zeros((), dtype=torch.int64)
                for has_momentum in (True, False):
                    buffers = tensors() if has_momentum else [None] * len(numels)
                    table = _table.build_tensor_table(
                        params, grads, buffers, steps if has_momentum else [None] * len(numels), [0] * len(numels),
                        chunk_size=cfg.chunk_size, placeholder_step=placeholder)
                    assert table.aligned == (aligned is True) and table.has_momentum == has_momentum
                    assert table.any_aligned == (aligned is not False)
                    hyperparams, lr_ptrs = _table.hyperparam_table(
                        [(0.1, 0.9 if has_momentum else 0.0, 1.0, 0.0, 0.0, 0.0)],
                        torch.float64 if dtype == torch.float64 else torch.float32, torch.device("cpu"))
                    hist = ZenithHistory.zeros(4, torch.device("cpu"))
                    current.update(dtype=dtype_name, aligned=aligned)
                    if has_momentum:
                        current["name"] = "sq_norm_partials"
                        sq_norm.sq_norm_partials(table, dtype, torch.zeros(table.num_chunks + 1)[1:])
                    current["name"] = "momentum_update" + ("" if has_momentum else "[no momentum]")
                    momentum.momentum_update(table, dtype, hyperparams, lr_ptrs, hist.lr_scale, hist.step,
                                             hist.step_applied, hist.grad_multiplier)
        for grad_scale in (False, True):
            for found_inf in (False, True):
                for clip in (False, True):
                    flags = [f for f, on in (("grad_scale", grad_scale), ("found_inf", found_inf), ("clip", clip)) if on]
                    current.update(name="update_history" + (f"[{','.join(flags)}]" if flags else ""),
                                   dtype="float32", aligned=None)
                    hist = ZenithHistory.zeros(5, torch.device("cpu"))
                    history.update_history(torch.zeros(7), hist.kernel_tensors(),
                                           torch.ones(1) if grad_scale else None,
                                           torch.zeros(1, 1) if found_inf else None, 1.0 if clip else None)
    finally:
        config.launch_config = original_config
        for kernel in kernels.values():
            del kernel.run
    return captured


def compile_launch(arch: int, kernel, args, kwargs):
    """Compile what ``kernel[grid](*args, **kwargs)`` would compile on an sm_``arch`` GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, options, log.getvalue()


def triton_rows(arch: int) -> tuple[list[dict], list[str]]:
    import triton

    rows, errors = [], []
    with tempfile.TemporaryDirectory(prefix="zenith-kernel-report-") as cache:
        # A private cache, always compiled: ptxas runs (and logs) for every specialization.
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
        try:
            launches = _launches(arch)
        except Exception:
            return [], [f"triton: could not record the launches:\n{traceback.format_exc()}"]
        for name, dtype, aligned, kernel, args, kwargs in launches:
            try:
                compiled, options, log = compile_launch(arch, kernel, args, kwargs)
            except Exception as exc:
                errors.append(f"triton {name} {dtype} aligned={aligned}: {type(exc).__name__}: {exc}")
                continue
            ptx = compiled.asm["ptx"]
            usage = ptxas_usage(log)
            load_bits, store_bits = access_widths(ptx)
            mix = access_mix(ptx)
            registers, spills = (usage[-1][1], usage[-1][2]) if usage else (None, None)
            if registers is None:
                errors.append(f"triton {name} {dtype}: no ptxas -v log (triton {triton.__version__})")
            rows.append(dict(
                kernel=name, dtype=dtype, aligned=aligned, vectorize=kwargs.get("VECTORIZE"),
                registers=registers, spills=spills,
                load_bits=load_bits, store_bits=store_bits, num_warps=options.num_warps,
                occupancy=None if registers is None else occupancy(registers, options.num_warps),
                fma=fma_count(ptx), loads=mix_text(mix["ld"]), stores=mix_text(mix["st"]), source="triton",
            ))
    return rows, errors


# ---------------------------------------------------------------------------------- nvcc
def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short_cuda_name(demangled: str) -> tuple[str, str]:
    """``(kernel<template args>, dtype)`` from a demangled kernel name."""
    head = demangled.replace("(anonymous namespace)::", "").split("(")[0]
    head = re.sub(r"^(void\s+)?([\w:]*::)?", "", head.split("<")[0]) + ("<" + head.split("<", 1)[1] if "<" in head else "")
    dtype = "-"
    for token, name in (("double", "float64"), ("__nv_bfloat16", "bfloat16"), ("__half", "float16"),
                        ("float", "float32")):
        if token in head:
            dtype = name
            break
    return head, dtype


def nvcc_rows(arch: int, source: Path) -> tuple[list[dict], list[str], str | None]:
    """Rows for every kernel of ``source``; ``(rows, errors, skip message)``."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [], [], "nvcc not found: CUDA C++ kernels not compiled"
    if not source.exists():
        return [], [], f"{source} does not exist: CUDA C++ kernels not compiled"
    with tempfile.TemporaryDirectory(prefix="zenith-nvcc-") as work:
        cmd = [nvcc, f"-arch=sm_{arch}", "-Xptxas", "-v", "-I", str(REPO / "csrc"), "--keep", "--keep-dir", work,
               "-c", str(source), "-o", os.path.join(work, "kernels.o")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return [], [f"nvcc sm_{arch}: timed out"], None
        if proc.returncode != 0:
            return [], [f"nvcc sm_{arch} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"], None
        ptx_files = list(Path(work).glob("*.ptx"))
        ptx = ptx_files[0].read_text() if ptx_files else ""
    entries = {}
    for match in re.finditer(r"\.entry\s+(\S+?)\s*\(", ptx):
        body_end = ptx.find("\n}", match.end())
        entries[match.group(1)] = ptx[match.end():body_end]
    usage = [u for u in ptxas_usage(proc.stdout + proc.stderr) if u[0]]
    names = _demangle([u[0] for u in usage])
    rows = []
    for (mangled, registers, spills), demangled in zip(usage, names):
        name, dtype = _short_cuda_name(demangled)
        body = entries.get(mangled, "")
        load_bits, store_bits = access_widths(body) if body else (None, None)
        mix = access_mix(body)
        rows.append(dict(kernel=f"cuda:{name}", dtype=dtype, aligned=None, vectorize=None, registers=registers, spills=spills,
                         load_bits=load_bits, store_bits=store_bits, num_warps=None, occupancy=None,
                         fma=fma_count(body) if body else None, loads=mix_text(mix["ld"]),
                         stores=mix_text(mix["st"]), source="nvcc"))
    if not rows:
        return [], [f"nvcc sm_{arch}: no kernel found in the ptxas -v log"], None
    return rows, [], None


# ---------------------------------------------------------------------------------- verdict
def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        what = f"{r['kernel']} {r['dtype']} aligned={r['aligned']}"
        if r["spills"]:
            out.append(f"{what}: spills {r['spills']} bytes")
        if r["source"] != "triton":
            continue
        base = r["kernel"].split("[")[0]
        if r["aligned"] is not False and r["aligned"] is not None and r["dtype"] in VECTOR_DTYPES:
            if base == "sq_norm_partials" and r["load_bits"] < 128:
                out.append(f"{what}: widest load {r['load_bits']} bits, expected 128")
            if base == "momentum_update" and (r["load_bits"] < 128 or r["store_bits"] < 128):
                out.append(f"{what}: widest load/store {r['load_bits']}/{r['store_bits']} bits, expected 128/128")
        if base == "momentum_update" and r["fma"]:
            out.append(f"{what}: {r['fma']} FMA instructions; the update must round each operation")
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0%}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    shown = COLUMNS
    cells = [[_cell(r[c]) for c in shown] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(shown)]
    print("  ".join(c.ljust(w) for c, w in zip(shown, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv=None) -> int:
    # The report compiles real kernels: the interpreter's stand-ins have nothing to compile. Done
    # here, not at import, so that a process importing this module for its helpers (bench/
    # gpu_checks.py, the tests) keeps its own TRITON_INTERPRET.
    os.environ.pop("TRITON_INTERPRET", None)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, required=True, help="compute capability, e.g. 80 or 90")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--no-nvcc", action="store_true", help="skip the CUDA C++ kernels")
    ap.add_argument("--cuda-source", type=Path, default=REPO / "csrc" / "cuda" / "kernels_cuda.cu")
    args = ap.parse_args(argv)

    import triton
    import torch

    print(f"kernel report for sm_{args.arch}: triton {triton.__version__}, torch {torch.__version__}")
    rows, errors = triton_rows(args.arch)
    if args.no_nvcc:
        print("CUDA C++: skipped (--no-nvcc)")
    else:
        cuda, cuda_errors, skip = nvcc_rows(args.arch, args.cuda_source)
        rows += cuda
        errors += cuda_errors
        if skip:
            print(f"CUDA C++: SKIP: {skip}")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows,
                                         "errors": errors}, indent=1))
    failures = errors + problems(rows)
    for line in failures:
        print(f"FAIL {line}")
    print(f"{len(rows)} kernels, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
