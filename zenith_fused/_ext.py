"""The compiled operators of zenith_fused (``torch.ops.zenith_fused``), loaded on first use.

``setup.py`` builds them as the extension ``zenith_fused._C`` from ``csrc/`` when torch and a C++
compiler are present at install time (the CUDA kernels too when torch has CUDA and nvcc is
found). A plain ``pip install .`` builds in an isolated environment without torch, so there the
extension is missing: it is then compiled on first use from the sources the package ships
(``zenith_fused/csrc``, torch.utils.cpp_extension.load with ninja, cached by torch), with one line
on stderr saying so. ``ZENITH_FUSED_BUILD_EXT=0`` turns that off; where neither works the "cpu"
and "cuda" backends report why, and ``"auto"`` uses Triton or the reference.

This module also registers the operators' fake implementations, so that they trace under
``torch.compile``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading

import torch

__all__ = ["cpu_kernels_available", "cuda_kernels_available", "unavailable_reason"]

_lock = threading.Lock()
_loaded = False
_load_error: str | None = None


def _extension_config():
    """The shipped sources' extension.py (``zenith_fused/csrc``, or the checkout's ``csrc/``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "csrc", "extension.py"), os.path.join(os.path.dirname(here), "csrc", "extension.py")]
    path = next((c for c in candidates if os.path.exists(c)), None)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("zenith_fused_extension_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_build() -> None:
    from torch.utils import cpp_extension

    config = _extension_config()
    if config is None:
        raise RuntimeError("the package's csrc/ sources are missing")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    print(
        f"zenith_fused: compiling the {'CPU and CUDA' if with_cuda else 'CPU'} kernels on first use "
        "(once, a few minutes; torch caches the build)",
        file=sys.stderr, flush=True,
    )
    cpp_extension.load(
        name="zenith_fused_jit",
        sources=config.sources(with_cuda, absolute=True),
        extra_cflags=config.cxx_flags(),
        extra_cuda_cflags=config.nvcc_flags(),
        extra_ldflags=config.link_flags(),
        is_python_module=False,  # loads the library into torch.ops; no Python module needed
    )


def _load() -> str | None:
    """Load the operators once; None when they are registered, else the reason they are not."""
    global _loaded, _load_error
    with _lock:
        if _loaded:
            return _load_error
        try:
            importlib.import_module("zenith_fused._C")
        except ImportError as exc:
            build = os.environ.get("ZENITH_FUSED_BUILD_EXT")
            if build != "0":
                try:
                    _jit_build()
                except Exception as jit_exc:  # compiler errors come as RuntimeError, subprocess errors
                    _load_error = (
                        f"the compiled extension zenith_fused._C is not built ({exc}), and compiling it "
                        f"on first use failed: {type(jit_exc).__name__}: {jit_exc}"
                    )
            else:
                _load_error = (
                    f"the compiled extension zenith_fused._C is not built ({exc}), and "
                    "ZENITH_FUSED_BUILD_EXT=0 turns off compiling it on first use. Reinstall with torch "
                    "importable and a C++ compiler (`pip install --no-build-isolation .`), or unset "
                    "ZENITH_FUSED_BUILD_EXT"
                )
        if _load_error is None:
            _register_fakes()
        _loaded = True
        return _load_error


def unavailable_reason(backend: str) -> str | None:
    """Why the compiled ``backend`` ("cpu" or "cuda") cannot run here, or None when it can."""
    reason = _load()
    if reason is not None:
        return reason
    if backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "zenith_fused::momentum_update", "CUDA"
    ):
        return (
            "the compiled extension was built without its CUDA kernels (at build time torch had no "
            "CUDA or nvcc was not found)"
        )
    return None


def cpu_kernels_available() -> bool:
    return unavailable_reason("cpu") is None


def cuda_kernels_available() -> bool:
    return unavailable_reason("cuda") is None


def _register_fakes() -> None:
    """The operators' fake implementations, so that they trace (torch.compile, meta tensors).

    All three only write into their arguments: the history list and ``out`` by schema, and the
    tensors a table points at by address (callers that trace ``momentum_update`` wrap it in an
    operator of their own that declares those).
    """

    @torch.library.register_fake("zenith_fused::sq_norm_partials")
    def _(tensors, chunks, dtype, chunk_size, out):
        return None

    @torch.library.register_fake("zenith_fused::update_history")
    def _(sq_norm_partials, history, grad_scale, found_inf, max_grad_norm):
        return None

    @torch.library.register_fake("zenith_fused::momentum_update")
    def _(tensors, chunks, dtype, chunk_size, has_momentum, hyperparams, lr_ptrs, lr_scale, step, step_applied,
          grad_multiplier):
        return None
