"""ZENITH's momentum update of many tensors in one launch.

Implements step 4 of ``zenith_fused/reference.py`` (``momentum_update``), per element, in float32::

    g   = g * grad_multiplier                    (unscaling and clipping, from the history kernel)
    d   = sign * g + weight_decay * p            (sign = -1 if maximize; the add only if wd != 0)
    buf = d if first else momentum * buf + (1 - dampening) * d
    d   = d + momentum * buf if nesterov else buf       (only if momentum != 0)
    p   = p - lr * lr_scale * d

``lr_scale``, ``step``, ``step_applied`` and ``grad_multiplier`` are read from device memory, so a skipped step costs
no host round trip: when ``step_applied == 0`` every load and store is masked off.
Hyper-parameters come per tensor from a ``[G, 6]`` float32 table (lr, momentum, 1 - dampening,
weight_decay, nesterov, maximize), so parameter groups of one dtype share one launch.

The buffer's "first step" is ``momentum_step == 0`` (never filled) or ``== step`` (filled by
another program of this launch); the program holding the tensor's first chunk records ``step``.
Any program reading after that write still sees "first", so the chunks agree without ordering.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dtypes import triton_dtype
from .table import (
    GRAD,
    HYPERPARAM_SLOT,
    MOMENTUM_BUFFER,
    MOMENTUM_STEP,
    NUMEL,
    PARAM,
    TENSOR_COLUMNS,
    TensorTable,
)

HYPERPARAM_COLUMNS = tl.constexpr(6)


@triton.jit
def _momentum_update_kernel(
    tensors,
    chunks,
    hyperparams,
    lr_scale_ptr,
    step_ptr,
    step_applied_ptr,
    grad_multiplier_ptr,
    DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunks + 2 * chunk)
    start = tl.load(chunks + 2 * chunk + 1)
    row = tensors + tensor * TENSOR_COLUMNS
    numel = tl.load(row + NUMEL)
    param = tl.load(row + PARAM).to(tl.pointer_type(DTYPE))
    grad = tl.load(row + GRAD).to(tl.pointer_type(DTYPE))

    hp = hyperparams + tl.load(row + HYPERPARAM_SLOT) * HYPERPARAM_COLUMNS
    lr = tl.load(hp + 0)
    momentum = tl.load(hp + 1)
    one_minus_dampening = tl.load(hp + 2)
    weight_decay = tl.load(hp + 3)
    nesterov = tl.load(hp + 4) != 0
    sign = tl.where(tl.load(hp + 5) != 0, -1.0, 1.0)

    # A skipped step masks every load and store off by treating the tensor as empty (scalar
    # conditions fold into integer bounds rather than being broadcast as booleans).
    applied = tl.load(step_applied_ptr) != 0
    limit = tl.where(applied, numel, 0)
    step_lr = lr * tl.load(lr_scale_ptr)
    grad_multiplier = tl.load(grad_multiplier_ptr)

    if HAS_MOMENTUM:
        has_buffer = momentum != 0
        buffer_limit = tl.where(has_buffer, limit, 0)
        buffer = tl.load(row + MOMENTUM_BUFFER).to(tl.pointer_type(DTYPE))
        buffer_step_ptr = tl.load(row + MOMENTUM_STEP).to(tl.pointer_type(tl.int64))
        step = tl.load(step_ptr)
        buffer_step = tl.load(buffer_step_ptr)
        first = (buffer_step == 0) | (buffer_step == step)
        tl.store(buffer_step_ptr, step, mask=has_buffer & applied & (buffer_step == 0) & (start == 0))

    # A small tensor's chunk ends early: no fully masked iterations.
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        mask = index < limit
        g = tl.load(grad + index, mask=mask, other=0.0).to(tl.float32) * grad_multiplier
        p = tl.load(param + index, mask=mask, other=0.0).to(tl.float32)
        d = sign * g
        d = tl.where(weight_decay != 0, d + weight_decay * p, d)
        if HAS_MOMENTUM:
            buffer_mask = index < buffer_limit
            b = tl.load(buffer + index, mask=buffer_mask, other=0.0).to(tl.float32)
            b = tl.where(first, d, momentum * b + one_minus_dampening * d)
            tl.store(buffer + index, b.to(DTYPE), mask=buffer_mask)
            d = tl.where(has_buffer, tl.where(nesterov, d + momentum * b, b), d)
        tl.store(param + index, (p - step_lr * d).to(DTYPE), mask=mask)


def momentum_update(
    table: TensorTable,
    dtype: torch.dtype,
    hyperparams: Tensor,
    *,
    lr_scale: Tensor,
    step: Tensor,
    step_applied: Tensor,
    grad_multiplier: Tensor,
    has_momentum: bool,
    block_size: int,
) -> None:
    """Update every tensor of ``table`` in place; ``hyperparams`` is float32 ``[G, 6]``."""
    if table.num_chunks == 0:
        return
    _momentum_update_kernel[(table.num_chunks,)](
        table.tensors,
        table.chunks,
        hyperparams,
        lr_scale,
        step,
        step_applied,
        grad_multiplier,
        DTYPE=triton_dtype(dtype),
        HAS_MOMENTUM=has_momentum,
        CHUNK=table.chunk_size,
        BLOCK=block_size,
    )
