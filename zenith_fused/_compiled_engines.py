"""The compiled backends: the operators of ``csrc/`` (``torch.ops.zenith_fused``, see ``_ext.py``)
on a plan's bucket, one operator call per step each, whatever the number of tensors.

* ``CpuEngine``: C++ over ``at::vec::Vectorized`` (the AVX512, AVX2 or baseline build, as ATen
  picks its own, or AVX512 with AVX512_BF16 where the processor has it and ``ATEN_CPU_CAPABILITY``
  names no build), chunks spread over ATen's intra-op threads.
* ``CudaEngine``: CUDA kernels that read the plan's tables from device memory, one launch per
  operator; the history lives on the device and the host never reads it.

The math of every operator is ``zenith_fused/reference.py``'s; the squared-norm partials are one
per chunk of ``chunk_size`` elements, so they do not depend on the number of threads.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ext
from .reference import StepInputs

__all__ = ["CpuEngine", "CudaEngine"]


class _CompiledEngine:
    name: str
    uses_table = True
    chunk_elements: int

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

    def chunk_size(self, device: torch.device) -> int:
        return self.chunk_elements

    def sq_norm_partials(self, bucket) -> None:
        table = bucket.table
        self._sq_norm_partials(table.tensors, table.chunks, bucket.dtype, table.chunk_size, bucket.partials)

    def update_history(self, sq_norm_partials: Tensor, history: list[Tensor], inputs: StepInputs) -> None:
        self._update_history(sq_norm_partials, history, inputs.grad_scale, inputs.found_inf, inputs.max_grad_norm)

    def momentum_update(self, bucket, view) -> None:
        table = bucket.table
        self._momentum_update(
            table.tensors, table.chunks, bucket.dtype, table.chunk_size, table.has_momentum,
            bucket.hyperparams, bucket.lr_ptrs, view.lr_scale, view.step, view.step_applied, view.grad_multiplier,
        )


class CpuEngine(_CompiledEngine):
    """The fused C++ kernels for CPU tensors."""

    name = "cpu"
    # 128 KiB of float32 per chunk: long enough that per-chunk costs vanish, short enough that a
    # ResNet-50 yields hundreds of chunks to balance over the threads.
    chunk_elements = 32768


class CudaEngine(_CompiledEngine):
    """The table-driven CUDA kernels for CUDA tensors."""

    name = "cuda"
    # One block per chunk: 64 Ki elements keep a block streaming long enough to hide its start-up
    # while a ResNet-50 still gives hundreds of blocks.
    chunk_elements = 65536
