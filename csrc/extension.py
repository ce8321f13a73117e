"""The compiled extension's sources and flags, in one place for ``setup.py`` and for the JIT build
of ``zenith_fused/_ext.py``. Standard library only: ``setup.py`` reads it before knowing whether
torch can be imported.
"""
from __future__ import annotations

import os
import sys

CSRC = os.path.dirname(os.path.abspath(__file__))

# The baseline kernels come before the AVX2 / AVX512 / AVX512_BF16 builds: if the linker ever had to choose
# between copies of one inline function, it keeps the first (see cpu/isa_prelude.h).
CPU_SOURCES = (
    "bindings.cpp",
    "cpu/bindings_cpu.cpp",
    "cpu/multi_tensor_cpu.cpp",
    "cpu/kernels_cpu_default.cpp",
    "cpu/kernels_cpu_avx2.cpp",
    "cpu/kernels_cpu_avx512.cpp",
    "cpu/kernels_cpu_avx512_bf16.cpp",
)
CUDA_SOURCES = (
    "cuda/bindings_cuda.cpp",
    "cuda/kernels_cuda.cu",
)

# The environment variable setup.py and the loader read: "0" never builds, "1" must build (and
# lets the loader compile the extension on first use when it is missing), unset builds when it can.
BUILD_ENV = "ZENITH_FUSED_BUILD_EXT"


def sources(with_cuda: bool, *, absolute: bool) -> list[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    if absolute:
        return [os.path.join(CSRC, name) for name in names]
    return [f"csrc/{name}" for name in names]


def _openmp() -> list[str]:
    # at::parallel_for is a header template: without OpenMP it compiles to a serial loop. The
    # flag links libgomp by its soname, which resolves to the copy torch has already loaded.
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cxx_flags() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/fp:precise"]
    # No FMA contraction: the kernels reproduce the reference's separately rounded products and
    # sums bit for bit. The unknown-pragma warnings are torch headers' CUDA-only `#pragma unroll`.
    return ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas", *_openmp()]


def nvcc_flags() -> list[str]:
    # No --use_fast_math: the kernels are compared against the reference.
    return ["-O3"]


def link_flags() -> list[str]:
    return _openmp()
