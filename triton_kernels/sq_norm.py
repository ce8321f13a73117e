"""Squared-norm partials of many gradients in one launch.

Implements step 1 of ZENITH (``zenith_fused.reference.squared_norm_partials``, per chunk rather
than per tensor): program ``c`` writes

    sq_norm_partials[c] = sum over the elements i of chunk c of g[i] ** 2

accumulated in float32 (float64 for float64 gradients) and stored as float32. The partials sit in
fixed slots that the history kernel sums in a fixed order: the same gradients give the same bits on
every run. The sum's order (lanes of a block, then a tree over the lanes) is not torch.sum's, so a
partial may differ from the reference in its last bits, and from the interpreter's on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import config as _config
from .dtypes import triton_dtype
from .table import ALIGNED, CHUNK_COLUMNS, CHUNK_START, CHUNK_TENSOR, GRAD, NUMEL, TENSOR_COLUMNS, VECTOR_ALIGNMENT


@triton.jit
def _sq_norm_block(grad, offsets, n, ACC_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        g = tl.load(grad + offsets, mask=offsets < n, other=0.0)
    else:
        g = tl.load(grad + offsets)
    g = g.to(ACC_DTYPE)
    return g * g


@triton.jit
def _sq_norm_chunk(row, start, n, lanes, DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   VECTOR: tl.constexpr):
    """The per-lane sums of squares of elements ``[start, start + n)`` of the gradient of the
    tensor-table row ``row``."""
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    # The address is loaded here, not passed in: an alignment hint must sit on an op of this
    # function's body (a hint on an argument does not survive inlining).
    grad = tl.load(row + GRAD).to(tl.pointer_type(DTYPE))
    if VECTOR:
        # The host checked this tensor's address (its ALIGNED column), and chunks start at
        # multiples of the chunk size (a multiple of 16 elements, which start // 16 * 16 shows the
        # compiler at the cost of a shift): so the unmasked main loop becomes 128-bit loads.
        grad = tl.multiple_of(grad, VECTOR_ALIGNMENT) + start // 16 * 16
        full = n // BLOCK * BLOCK
        for offset in range(0, full, BLOCK):
            offsets = tl.max_contiguous(tl.multiple_of(offset + lanes, BLOCK), BLOCK)
            acc += _sq_norm_block(grad, offsets, n, ACC_DTYPE, MASKED=False)
        acc += _sq_norm_block(grad, full + lanes, n, ACC_DTYPE, MASKED=True)
    else:
        grad = grad + start
        # A small tensor's chunk ends early: no fully masked iterations.
        for offset in range(0, n, BLOCK):
            acc += _sq_norm_block(grad, offset + lanes, n, ACC_DTYPE, MASKED=True)
    return acc


# ``out`` is a slice of a plan-owned buffer at any offset: specializing on its alignment would
# compile a new kernel per offset, and a scalar store gains nothing from it.
@triton.jit(do_not_specialize_on_alignment=["sq_norm_partials"])
def _sq_norm_partials_kernel(
    tensors,
    chunks,
    sq_norm_partials,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    VECTORIZE: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunks + CHUNK_COLUMNS * chunk + CHUNK_TENSOR)
    start = tl.load(chunks + CHUNK_COLUMNS * chunk + CHUNK_START)
    row = tensors + tensor * TENSOR_COLUMNS
    # Elements of this chunk; <= CHUNK, so the offsets within it fit in int32.
    n = tl.minimum(tl.load(row + NUMEL) - start, CHUNK).to(tl.int32)
    lanes = tl.arange(0, BLOCK)
    # Alignment is decided per tensor: a misaligned view takes the masked scalar loop without
    # taking the rest of its bucket with it. VECTORIZE (some tensor is aligned) leaves the
    # 128-bit path out of the kernel when no tensor could take it.
    if VECTORIZE:
        if tl.load(row + ALIGNED) != 0:
            acc = _sq_norm_chunk(row, start, n, lanes, DTYPE, ACC_DTYPE, BLOCK, VECTOR=True)
        else:
            acc = _sq_norm_chunk(row, start, n, lanes, DTYPE, ACC_DTYPE, BLOCK, VECTOR=False)
    else:
        acc = _sq_norm_chunk(row, start, n, lanes, DTYPE, ACC_DTYPE, BLOCK, VECTOR=False)
    tl.store(sq_norm_partials + chunk, tl.sum(acc, axis=0).to(tl.float32))


def sq_norm_partials(table, dtype: torch.dtype, out: Tensor) -> None:
    """Write ``out[c]`` = the squared L2 norm of chunk ``c`` of ``table``'s gradients.

    ``table``: the bucket's tensor table (``.tensors``, ``.chunks``, ``.num_chunks``, ``.chunk_size``,
    ``.has_momentum``, ``.any_aligned``), its columns as :mod:`zenith_fused.layout` defines them.
    ``out`` is a contiguous float32 1-D tensor of ``table.num_chunks`` elements on the table's
    device. The formula is in this module's docstring; the math is ``zenith_fused/reference.py``'s.
    """
    if table.num_chunks == 0:
        return
    config = _config.launch_config(table.tensors.device)
    _sq_norm_partials_kernel[(table.num_chunks,)](
        table.tensors,
        table.chunks,
        out,
        DTYPE=triton_dtype(dtype),
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        CHUNK=table.chunk_size,
        BLOCK=_config.block_for(config, table.chunk_size, dtype),
        VECTORIZE=table.any_aligned and table.chunk_size % 16 == 0,
        num_warps=config.num_warps,
        # No contraction of g * g + acc into an FMA: the GPU then accumulates each lane as the
        # interpreter does (the reduction tree across lanes still differs, see the docstring).
        enable_fp_fusion=False,
    )
