"""The CUDA sources of csrc/ compile, also on machines without a GPU.

csrc/cuda/kernels_cuda.cu is plain CUDA (see its header comment), so nvcc alone turns it into
object code here, with the flags torch's own extension builds pass. csrc/cuda/bindings_cuda.cpp
needs torch's c10/cuda headers; a CPU-only torch wheel ships them without their generated
configuration header, so that file is checked for syntax and types against the same headers with
that header's one job (export macros) switched off.
"""
from __future__ import annotations

import os
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


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_to_object_code(tmp_path, arch):
    obj = tmp_path / f"kernels_cuda_sm{arch}.o"
    _run(
        [
            NVCC,
            "-c",
            os.path.join(CSRC, "cuda", "kernels_cuda.cu"),
            "-o",
            str(obj),
            "-std=c++20",
            "-O3",
            "-Xcompiler",
            "-fPIC",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            *cpp_extension.COMMON_NVCC_FLAGS,
            *TORCH_DEFINES,
            *_includes(),
        ]
    )
    assert obj.stat().st_size > 0
    nm = shutil.which("nm")
    if nm is not None:
        symbols = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        for launcher in ("launch_sq_norm_partials", "launch_update_history", "launch_momentum_update"):
            assert f" T zenith_fused::cuda::{launcher}(" in symbols, f"{launcher} is not defined in {obj}"


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
