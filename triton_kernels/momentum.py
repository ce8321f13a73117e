"""ZENITH's momentum update of many tensors in one launch.

Implements step 4 of ``zenith_fused/reference.py`` (``momentum_update``), per element, in the
compute dtype ``C`` (float32; float64 for float64 tensors), each line one rounding::

    step_lr = lr * C(lr_scale)                   lr read through lr_ptrs[slot]
    d   = C(g) * C(grad_multiplier)              unscaling and clipping, from the history kernel
    d   = -d                                     if maximize
    d   = d + weight_decay * p                   if weight_decay != 0
    buf = d  if first  else  momentum * buf + (1 - dampening) * d        (if momentum != 0)
    d   = d + momentum * buf  if nesterov  else  buf                     (if momentum != 0)
    p   = p - step_lr * d

and each parameter and buffer is rounded once, at its store, to its dtype, to nearest-even
(``dtypes.to_storage``). ``lr_scale``, ``step``, ``step_applied`` and ``grad_multiplier`` are
read from device memory: when ``step_applied == 0`` every program finds an empty range and
nothing is loaded or stored. Hyper-parameters come per tensor from ``hyperparams[slot]`` (compute
dtype: momentum, 1 - dampening, weight_decay, nesterov, maximize); the lr from ``*lr_ptrs[slot]``.

The buffer's "first step" is ``momentum_step == 0`` (never filled) or ``== step`` (filled by
another program of this launch); the program holding the tensor's first chunk records ``step``.
Any program reading after that write still sees "first", so the chunks agree without ordering.

Same bits everywhere: the launch turns off FMA contraction (``enable_fp_fusion=False``: ptxas
``--fmad=false``), so a GPU rounds every product and sum separately as the reference and the
interpreter do, and the stores round to nearest-even on both. For finite values the update then
stores exactly the reference's bits on a GPU and under the interpreter. What can still differ:
NaN payloads (a NaN stays a NaN), and everything that depends on the norm (``lr_scale``,
``grad_multiplier``), which comes from the history kernel and differs in its last bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import config as _config
from .dtypes import to_storage, triton_compute_dtype, triton_dtype
from .table import (
    ALIGNED,
    CHUNK_COLUMNS,
    CHUNK_START,
    CHUNK_TENSOR,
    GRAD,
    HYPERPARAM_COLUMNS,
    HYPERPARAM_SLOT,
    MAXIMIZE,
    MOMENTUM,
    MOMENTUM_BUFFER,
    MOMENTUM_STEP,
    NESTEROV,
    NUMEL,
    ONE_MINUS_DAMPENING,
    PARAM,
    TENSOR_COLUMNS,
    VECTOR_ALIGNMENT,
    WEIGHT_DECAY,
)


@triton.jit
def _direction(g, p, grad_multiplier, maximize, weight_decay):
    """The reference's ``d`` before momentum: every operation rounded on its own."""
    d = g * grad_multiplier
    d = tl.where(maximize, -d, d)
    return tl.where(weight_decay != 0, d + weight_decay * p, d)


@triton.jit
def _momentum(d, b, first, momentum, one_minus_dampening, nesterov):
    """``(new buffer, new d)`` of torch.optim.SGD's momentum step."""
    b = tl.where(first, d, momentum * b + one_minus_dampening * d)
    return b, tl.where(nesterov, d + momentum * b, b)


@triton.jit
def _update_block(
    param, grad, buffer, offsets, n, step_lr, grad_multiplier, maximize, weight_decay,
    first, momentum, one_minus_dampening, nesterov,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, USE_BUFFER: tl.constexpr, MASKED: tl.constexpr,
):
    mask = offsets < n if MASKED else None
    g = tl.load(grad + offsets, mask=mask).to(COMPUTE)
    p = tl.load(param + offsets, mask=mask).to(COMPUTE)
    d = _direction(g, p, grad_multiplier, maximize, weight_decay)
    if USE_BUFFER:
        b = tl.load(buffer + offsets, mask=mask).to(COMPUTE)
        b, d = _momentum(d, b, first, momentum, one_minus_dampening, nesterov)
        tl.store(buffer + offsets, to_storage(b, DTYPE), mask=mask)
    tl.store(param + offsets, to_storage(p - step_lr * d, DTYPE), mask=mask)


@triton.jit
def _update_range(
    param, grad, buffer, n, step_lr, grad_multiplier, maximize, weight_decay,
    first, momentum, one_minus_dampening, nesterov,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, USE_BUFFER: tl.constexpr,
    BLOCK: tl.constexpr, VECTOR: tl.constexpr,
):
    """Elements ``[0, n)`` of the chunk whose first element ``param``/``grad``/``buffer`` point at."""
    lanes = tl.arange(0, BLOCK)
    if VECTOR:
        # Unmasked 128-bit main loop, one masked tail block.
        full = n // BLOCK * BLOCK
        for offset in range(0, full, BLOCK):
            offsets = tl.max_contiguous(tl.multiple_of(offset + lanes, BLOCK), BLOCK)
            _update_block(param, grad, buffer, offsets, n, step_lr, grad_multiplier, maximize, weight_decay,
                          first, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE, USE_BUFFER, MASKED=False)
        _update_block(param, grad, buffer, full + lanes, n, step_lr, grad_multiplier, maximize, weight_decay,
                      first, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE, USE_BUFFER, MASKED=True)
    else:
        for offset in range(0, n, BLOCK):
            _update_block(param, grad, buffer, offset + lanes, n, step_lr, grad_multiplier, maximize, weight_decay,
                          first, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE, USE_BUFFER, MASKED=True)


@triton.jit
def _update_chunk(
    row, start, aligned, n, step_lr, grad_multiplier, maximize, weight_decay,
    first, momentum, one_minus_dampening, nesterov,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, USE_BUFFER: tl.constexpr,
    BLOCK: tl.constexpr, VECTORIZE: tl.constexpr,
):
    """The chunk at element ``start`` of the tensor-table row ``row``: the 128-bit path when this
    tensor is aligned (its ALIGNED column, checked by the host for parameter, gradient and buffer
    alike), the masked scalar path otherwise. Alignment is per tensor, so a misaligned view does
    not slow the rest of its bucket."""
    if VECTORIZE:
        if aligned:
            _update_range(_row_pointer(row, PARAM, start, DTYPE, True), _row_pointer(row, GRAD, start, DTYPE, True),
                          _row_pointer(row, MOMENTUM_BUFFER, start, DTYPE, True), n, step_lr, grad_multiplier,
                          maximize, weight_decay, first, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE,
                          USE_BUFFER, BLOCK, VECTOR=True)
        else:
            _update_range(_row_pointer(row, PARAM, start, DTYPE, False), _row_pointer(row, GRAD, start, DTYPE, False),
                          _row_pointer(row, MOMENTUM_BUFFER, start, DTYPE, False), n, step_lr, grad_multiplier,
                          maximize, weight_decay, first, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE,
                          USE_BUFFER, BLOCK, VECTOR=False)
    else:
        _update_range(_row_pointer(row, PARAM, start, DTYPE, False), _row_pointer(row, GRAD, start, DTYPE, False),
                      _row_pointer(row, MOMENTUM_BUFFER, start, DTYPE, False), n, step_lr, grad_multiplier,
                      maximize, weight_decay, first, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE,
                      USE_BUFFER, BLOCK, VECTOR=False)


@triton.jit
def _row_pointer(row, column: tl.constexpr, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in ``column`` of a tensor-table row, plus ``start`` elements. Loaded here, not
    passed in: an alignment hint must sit on an op of the body (one on an argument does not
    survive inlining). Chunks start at multiples of 16 elements, which ``start // 16 * 16`` shows
    the compiler at the cost of a shift."""
    pointer = tl.load(row + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        return tl.multiple_of(pointer, VECTOR_ALIGNMENT) + start // 16 * 16
    return pointer + start


@triton.jit
def _momentum_update_kernel(
    tensors,
    chunks,
    hyperparams,
    lr_ptrs,
    lr_scale_ptr,
    step_ptr,
    step_applied_ptr,
    grad_multiplier_ptr,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VECTORIZE: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunks + CHUNK_COLUMNS * chunk + CHUNK_TENSOR)
    start = tl.load(chunks + CHUNK_COLUMNS * chunk + CHUNK_START)
    row = tensors + tensor * TENSOR_COLUMNS
    numel = tl.load(row + NUMEL)
    aligned = tl.load(row + ALIGNED) != 0

    slot = tl.load(row + HYPERPARAM_SLOT)
    hp = hyperparams + slot * HYPERPARAM_COLUMNS
    lr = tl.load(tl.load(lr_ptrs + slot).to(tl.pointer_type(COMPUTE)))
    momentum = tl.load(hp + MOMENTUM)
    one_minus_dampening = tl.load(hp + ONE_MINUS_DAMPENING)
    weight_decay = tl.load(hp + WEIGHT_DECAY)
    nesterov = tl.load(hp + NESTEROV) != 0
    maximize = tl.load(hp + MAXIMIZE) != 0
    step_lr = lr * tl.load(lr_scale_ptr).to(COMPUTE)
    grad_multiplier = tl.load(grad_multiplier_ptr).to(COMPUTE)

    # A skipped step leaves every program an empty range (a scalar condition folded into the
    # bound, not a mask over the block).
    applied = tl.load(step_applied_ptr) != 0
    n = tl.where(applied, tl.minimum(numel - start, CHUNK), 0).to(tl.int32)

    if HAS_MOMENTUM:
        has_buffer = momentum != 0
        # A tensor without a buffer has placeholder addresses: never read or write them.
        buffer_step_ptr = tl.load(row + MOMENTUM_STEP).to(tl.pointer_type(tl.int64))
        buffer_step = tl.load(buffer_step_ptr, mask=has_buffer, other=0)
        step = tl.load(step_ptr)
        first = (buffer_step == 0) | (buffer_step == step)
        tl.store(buffer_step_ptr, step, mask=has_buffer & applied & (buffer_step == 0) & (start == 0))
        if has_buffer:
            _update_chunk(row, start, aligned, n, step_lr, grad_multiplier, maximize, weight_decay,
                          first, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE, True, BLOCK, VECTORIZE)
        else:
            _update_chunk(row, start, aligned, n, step_lr, grad_multiplier, maximize, weight_decay,
                          False, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE, False, BLOCK, VECTORIZE)
    else:
        _update_chunk(row, start, aligned, n, step_lr, grad_multiplier, maximize, weight_decay,
                      False, momentum, one_minus_dampening, nesterov, DTYPE, COMPUTE, False, BLOCK, VECTORIZE)


def momentum_update(
    table,
    dtype: torch.dtype,
    hyperparams: Tensor,
    lr_ptrs: Tensor,
    lr_scale: Tensor,
    step: Tensor,
    step_applied: Tensor,
    grad_multiplier: Tensor,
) -> None:
    """Update every tensor of ``table`` in place (the formula is in this module's docstring).

    ``table``: the bucket's tensor table (``.tensors``, ``.chunks``, ``.num_chunks``, ``.chunk_size``,
    ``.has_momentum``, ``.any_aligned``), its columns as :mod:`zenith_fused.layout` defines them.
    ``hyperparams`` ``[G, 6]`` and the scalars ``lr_ptrs`` point at are in the compute dtype of
    ``dtype`` (float64 for float64, else float32); ``lr_scale``, ``step``, ``step_applied`` and
    ``grad_multiplier`` are the history's 0-dim tensors, on the table's device.
    """
    if table.num_chunks == 0:
        return
    compute = triton_compute_dtype(dtype)
    if hyperparams.dtype != (torch.float64 if compute == tl.float64 else torch.float32):
        raise TypeError(f"hyperparams for {dtype} tensors must be in the compute dtype, got {hyperparams.dtype}")
    config = _config.launch_config(table.tensors.device)
    _momentum_update_kernel[(table.num_chunks,)](
        table.tensors,
        table.chunks,
        hyperparams,
        lr_ptrs,
        lr_scale,
        step,
        step_applied,
        grad_multiplier,
        DTYPE=triton_dtype(dtype),
        COMPUTE=compute,
        HAS_MOMENTUM=table.has_momentum,
        CHUNK=table.chunk_size,
        BLOCK=_config.block_for(config, table.chunk_size, dtype),
        VECTORIZE=table.any_aligned and table.chunk_size % 16 == 0,
        num_warps=config.num_warps,
        # Round every product and sum on its own, as the reference does: see the docstring.
        enable_fp_fusion=False,
    )
