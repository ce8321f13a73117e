"""The one place that decides which backend runs each (device, dtype) bucket, and makes it.

Each backend is one module whose engine runs the step plan's three calls on a bucket:
``sq_norm_partials(bucket)`` (into ``bucket.partials``), ``update_history(partials, history,
inputs)`` and ``momentum_update(bucket, view)``; none of them reads a device value on the host.

* ``"reference"``: :mod:`zenith_fused._reference_engine`, readable PyTorch, any device.
* ``"triton"``: :mod:`zenith_fused._triton_engine`, CUDA tensors (CPU ones under the interpreter).
* ``"cpu"`` / ``"cuda"``: :mod:`zenith_fused._compiled_engines`, the compiled kernels of ``csrc/``.

The engine modules import nothing from this one (no import circle); this module imports each of
them only when its backend is first used, so a missing Triton or extension costs nothing.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("auto", "triton", "cpu", "cuda", "reference")


def _triton_unavailable_reason(device: torch.device) -> str | None:
    try:
        importlib.import_module("zenith_fused.triton_kernels")
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"Triton could not be imported ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"the Triton kernels run on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1; "
        f"got a parameter on {device}"
    )


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run tensors on ``device``, or None when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_unavailable_reason(device)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors; got a parameter on {device}"
        from . import _ext  # loads the compiled extension on first use

        return _ext.unavailable_reason(backend)
    raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on ``device``; raises RuntimeError if an explicit one can't.

    ``"auto"`` picks, in order: for CUDA tensors Triton when it imports, else the compiled "cuda"
    kernels when built; for CPU tensors the compiled "cpu" kernels when built; the reference
    otherwise.
    """
    if backend == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if unavailable_reason(candidate, device) is None:
                    return candidate
        elif device.type == "cpu" and unavailable_reason("cpu", device) is None:
            return "cpu"
        return "reference"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"ZenithFused backend {backend!r} cannot run: {reason}")
    return backend


_ENGINE_CLASSES = {
    "reference": ("zenith_fused._reference_engine", "ReferenceEngine"),
    "triton": ("zenith_fused._triton_engine", "TritonEngine"),
    "cpu": ("zenith_fused._compiled_engines", "CpuEngine"),
    "cuda": ("zenith_fused._compiled_engines", "CudaEngine"),
}


def make_engine(name: str):
    module, cls = _ENGINE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)()
