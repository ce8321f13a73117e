"""Squared-norm partials of many gradients in one launch.

Implements step 1 of ZENITH (``zenith_fused/reference.py``): program ``c`` writes
``sq_norm_partials[c] = sum(g[i] ** 2 for i in chunk c)`` in float32, whatever the gradient dtype.
The partials sit in fixed slots and are summed in a fixed order by the history kernel, so the same
gradients give the same bits on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .table import GRAD, NUMEL, TENSOR_COLUMNS, TensorTable
from .dtypes import triton_dtype


@triton.jit
def _sq_norm_partials_kernel(
    tensors,
    chunks,
    sq_norm_partials,
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunks + 2 * chunk)
    start = tl.load(chunks + 2 * chunk + 1)
    numel = tl.load(tensors + tensor * TENSOR_COLUMNS + NUMEL)
    grad = tl.load(tensors + tensor * TENSOR_COLUMNS + GRAD).to(tl.pointer_type(DTYPE))

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # A small tensor's chunk ends early: no fully masked iterations.
    for offset in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        g = tl.load(grad + index, mask=index < numel, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(sq_norm_partials + chunk, tl.sum(acc, axis=0))


def sq_norm_partials(table: TensorTable, dtype: torch.dtype, out: Tensor, *, block_size: int) -> Tensor:
    """Write one float32 partial per chunk of ``table`` into ``out[:table.num_chunks]``."""
    if table.num_chunks:
        _sq_norm_partials_kernel[(table.num_chunks,)](
            table.tensors,
            table.chunks,
            out,
            DTYPE=triton_dtype(dtype),
            CHUNK=table.chunk_size,
            BLOCK=block_size,
        )
    return out[: table.num_chunks]
