"""The column numbers of ``zenith_fused.layout`` as ``tl.constexpr``, for use inside kernels.

The tables are built by the step plan; the kernels only need to know where each column is.
``zenith_fused.layout`` is the package's public statement of that contract.
"""
from __future__ import annotations

import triton.language as tl

from zenith_fused import layout as _layout

# Columns of ``tensors`` (int64 [N, TENSOR_COLUMNS]).
PARAM = tl.constexpr(_layout.PARAM)
GRAD = tl.constexpr(_layout.GRAD)
MOMENTUM_BUFFER = tl.constexpr(_layout.MOMENTUM_BUFFER)
MOMENTUM_STEP = tl.constexpr(_layout.MOMENTUM_STEP)
NUMEL = tl.constexpr(_layout.NUMEL)
HYPERPARAM_SLOT = tl.constexpr(_layout.HYPERPARAM_SLOT)
ALIGNED = tl.constexpr(_layout.ALIGNED)
TENSOR_COLUMNS = tl.constexpr(_layout.TENSOR_COLUMNS)
# Columns of ``chunks`` (int64 [C, CHUNK_COLUMNS]).
CHUNK_TENSOR = tl.constexpr(_layout.CHUNK_TENSOR)
CHUNK_START = tl.constexpr(_layout.CHUNK_START)
CHUNK_COLUMNS = tl.constexpr(_layout.CHUNK_COLUMNS)
# Columns of ``hyperparams`` ([G, HYPERPARAM_COLUMNS], compute dtype). LR is listed for
# completeness only: kernels read a group's lr through ``lr_ptrs``, never from this column.
LR = tl.constexpr(_layout.LR)
MOMENTUM = tl.constexpr(_layout.MOMENTUM)
ONE_MINUS_DAMPENING = tl.constexpr(_layout.ONE_MINUS_DAMPENING)
WEIGHT_DECAY = tl.constexpr(_layout.WEIGHT_DECAY)
NESTEROV = tl.constexpr(_layout.NESTEROV)
MAXIMIZE = tl.constexpr(_layout.MAXIMIZE)
HYPERPARAM_COLUMNS = tl.constexpr(_layout.HYPERPARAM_COLUMNS)
# Byte alignment of a tensor whose ALIGNED column is 1 (parameter, gradient and buffer).
VECTOR_ALIGNMENT = tl.constexpr(_layout.VECTOR_ALIGNMENT)
