"""Engines over the compiled operators of ``csrc/`` (``torch.ops.zenith_fused``, see ``_ext.py``).

The same three methods as :class:`zenith_fused._triton_engine.TritonEngine`, one operator call each for
a whole (device, dtype) bucket, every parameter group included:

* ``CpuEngine``: C++ over ``at::vec::Vectorized`` (the AVX512, AVX2 or baseline build, as ATen
  picks its own), chunks spread over ATen's intra-op threads.
* ``CudaEngine``: multi-tensor CUDA kernels; the history lives on the device and the host never
  reads it.

The math of every operator is ``zenith_fused/reference.py``'s; the squared-norm partials are one
per chunk of ``chunk_size`` elements, so they do not depend on the number of threads.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ext
from ._engines import Bucket, HyperparamTables, StepView
from .reference import StepInputs, ZenithHistory

__all__ = ["CpuEngine", "CudaEngine"]


class _CompiledEngine:
    name: str
    chunk_size: int

    def __init__(self) -> None:
        reason = _ext.unavailable_reason(self.name)
        if reason is not None:
            raise RuntimeError(f"ZenithFused backend {self.name!r} cannot run: {reason}")
        ops = torch.ops.zenith_fused
        # The overloads themselves: resolving the packet on every call costs more than the CPU
        # kernels do on small models.
        self._sq_norm_partials = ops.sq_norm_partials.default
        self._update_history = ops.update_history.default
        self._momentum_update = ops.momentum_update.default
        self._hyperparams = HyperparamTables()

    def sq_norm_partials(self, bucket: Bucket) -> Tensor:
        return self._sq_norm_partials(bucket.grads, self.chunk_size)

    def update_history(
        self, history: ZenithHistory, sq_norm_partials: Tensor, inputs: StepInputs = StepInputs()
    ) -> None:
        # The kernels read GradScaler's tensors as float32, as the reference converts them.
        grad_scale = None if inputs.grad_scale is None else inputs.grad_scale.to(torch.float32)
        found_inf = None if inputs.found_inf is None else inputs.found_inf.to(torch.float32)
        self._update_history(
            sq_norm_partials,
            *history.kernel_tensors(),
            grad_scale,
            found_inf,
            inputs.max_grad_norm,
        )

    def momentum_update(self, bucket: Bucket, view: StepView) -> None:
        self._momentum_update(
            bucket.params,
            bucket.grads,
            bucket.momentum_buffers,
            bucket.momentum_steps,
            self._hyperparams.get(bucket),
            bucket.hyperparam_slots,
            view.lr_scale,
            view.step,
            view.step_applied,
            view.grad_multiplier,
            self.chunk_size,
        )


class CpuEngine(_CompiledEngine):
    """The fused C++ kernels for CPU tensors."""

    name = "cpu"
    # 128 KiB of float32 per chunk: long enough that per-chunk costs vanish, short enough that a
    # ResNet-50 yields hundreds of chunks to balance over the threads.
    chunk_size = 32768


class CudaEngine(_CompiledEngine):
    """The multi-tensor CUDA kernels for CUDA tensors."""

    name = "cuda"
    # One block of 512 threads per chunk, 128 elements per thread (PyTorch's multi-tensor size).
    chunk_size = 65536
