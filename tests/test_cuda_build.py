"""The CUDA sources of csrc/ compile, also on machines without a GPU, into the code we promise.

csrc/cuda/kernels_cuda.cu is plain CUDA (see its header comment), so nvcc alone turns it into
object code here, with the flags torch's own extension builds pass, for sm_80 and sm_90: no kernel
spills or uses a stack frame (ptxas -v), the streaming kernels have 128-bit global loads (and the
update 128-bit stores) for their aligned path, every tensor access is a global one (the addresses
come out of an int64 table; generic accesses would be slower), and the PTX has no fused
multiply-add (the update promises the reference's separately rounded operations).
csrc/cuda/bindings_cuda.cpp
needs torch's c10/cuda headers; a CPU-only torch wheel ships them without their generated
configuration header, so that file is checked for syntax and types against the same headers with
that header's one job (export macros) switched off.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and cpp_extension.CUDA_HOME is not None:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        found = candidate if os.path.exists(candidate) else None
    return found


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")

# What torch.utils.cpp_extension passes to every compile of an extension named zenith_fused._C.
TORCH_DEFINES = [
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
]


def _includes() -> list[str]:
    return [f"-I{path}" for path in cpp_extension.include_paths()]


def _cuda_include() -> str:
    """The include folder of the CUDA install nvcc belongs to."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(_resolve_wrapper(NVCC)))), "include")


def _resolve_wrapper(nvcc: str) -> str:
    # Some installs put a shell wrapper on the PATH (`exec /usr/local/cuda-X/bin/nvcc "$@"`).
    with open(nvcc, "rb") as f:
        head = f.read(512)
    if head.startswith(b"#!"):
        for word in head.decode(errors="replace").split():
            if word.endswith("/nvcc") and os.path.exists(word):
                return word
    return nvcc


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


ARCHS = ["80", "90"]
# Every kernel template instance: the norm and the update per storage type, the update with and
# without momentum buffers, and the history kernel.
KERNEL_DTYPES = ("f", "6__half", "13__nv_bfloat16", "d")
EXPECTED_KERNELS = 1 + len(KERNEL_DTYPES) + 2 * len(KERNEL_DTYPES)


def _nvcc_command(arch: str, *outputs: str) -> list[str]:
    return [
        NVCC,
        os.path.join(CSRC, "cuda", "kernels_cuda.cu"),
        *outputs,
        "-std=c++20",
        "-O3",
        "-Xcompiler",
        "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *TORCH_DEFINES,
        *_includes(),
    ]


def _kernel_name(mangled: str) -> str:
    """``sq_norm_partials_kernelIfE...`` -> ``sq_norm_partials_kernel<f>``, etc."""
    for kernel in ("sq_norm_partials_kernel", "momentum_update_kernel", "update_history_kernel"):
        if kernel in mangled:
            rest = mangled.split(kernel, 1)[1]
            return kernel + (f"<{rest[1:].split('E')[0].split('Lb')[0]}{', momentum' if 'Lb1' in rest else ''}>"
                             if rest.startswith("I") else "")
    return mangled


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_compile_without_spills(tmp_path, arch):
    obj = tmp_path / f"kernels_cuda_sm{arch}.o"
    result = subprocess.run(_nvcc_command(arch, "-c", "-o", str(obj), "-Xptxas", "-v"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert obj.stat().st_size > 0
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'", then "N bytes stack frame, N bytes
    # spill stores, N bytes spill loads" and "Used N registers".
    log = result.stderr
    entries = re.findall(r"Compiling entry function '(\w+)'[^\n]*\n(?:[^\n]*\n)*?\s*(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(entries) == EXPECTED_KERNELS, log
    for mangled, stack, spill_stores, spill_loads in entries:
        assert (stack, spill_stores, spill_loads) == ("0", "0", "0"), f"{_kernel_name(mangled)} on sm_{arch}:\n{log}"
    nm = shutil.which("nm")
    if nm is not None:
        symbols = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        for launcher in ("launch_sq_norm_partials", "launch_update_history", "launch_momentum_update"):
            assert f" T zenith_fused::cuda::{launcher}(" in symbols, f"{launcher} is not defined in {obj}"


def _ptx_entries(tmp_path, arch: str) -> dict[str, str]:
    ptx = tmp_path / f"kernels_cuda_sm{arch}.ptx"
    _run(_nvcc_command(arch, "-ptx", "-o", str(ptx)))
    text = ptx.read_text()
    names = list(re.finditer(r"\.entry (\w+)\(", text))
    return {m.group(1): text[m.start(): names[i + 1].start() if i + 1 < len(names) else len(text)]
            for i, m in enumerate(names)}


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_use_wide_global_accesses_and_no_fma(tmp_path, arch):
    entries = _ptx_entries(tmp_path, arch)
    assert len(entries) == EXPECTED_KERNELS, list(entries)
    wide = re.compile(r"\b(ld|st)\.global(\.\w+)*\.(v4\.(u32|f32|b32)|v2\.(f64|u64|b64))\b")
    for mangled, body in entries.items():
        name = _kernel_name(mangled)
        assert not re.search(r"\bfma\.", body), f"{name}: the PTX contracts a product and a sum into an FMA"
        # Tensor data through generic pointers would be ld/st without a state space.
        generic = re.findall(r"^\s*(?:@%p\d+\s+)?((?:ld|st)\.(?!global|shared|param|local|const)[\w.]+)", body, re.M)
        assert not generic, f"{name}: generic memory accesses {sorted(set(generic))}"
        if "update_history" in mangled:
            continue
        kinds = {m.group(1) for m in wide.finditer(body)}
        expected = {"ld", "st"} if "momentum_update" in mangled else {"ld"}
        assert expected <= kinds, f"{name}: no 128-bit global {sorted(expected - kinds)}"


@pytest.mark.skipif(sys.platform != "linux", reason="checks the bindings with the GNU-style host compiler")
def test_cuda_bindings_compile_against_torch_headers():
    cuda_include = _cuda_include()
    if not os.path.exists(os.path.join(cuda_include, "cuda_runtime_api.h")):
        pytest.skip(f"no cuda_runtime_api.h under {cuda_include}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx})")
    generated = any(
        os.path.exists(os.path.join(path, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
        for path in cpp_extension.include_paths()
    )
    # The generated c10/cuda/impl/cuda_cmake_macros.h, absent from CPU wheels, only defines
    # export macros; this switch is c10's own for builds without it.
    no_generated_header = [] if generated else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    _run(
        [
            cxx,
            "-fsyntax-only",
            "-std=c++20",
            os.path.join(CSRC, "cuda", "bindings_cuda.cpp"),
            *TORCH_DEFINES,
            *no_generated_header,
            *_includes(),
            f"-I{cuda_include}",
        ]
    )
