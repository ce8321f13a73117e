"""Column numbers of ``zenith_fused._table``'s tables as ``tl.constexpr``, for use inside kernels.

The tables themselves (``TensorTable``, ``build_tensor_table``, ``hyperparam_table``) are built by
the step plan with ``zenith_fused._table``; the kernels only need to know where each column is.
"""
from __future__ import annotations

import triton.language as tl

from zenith_fused import _table

# Columns of ``tensors`` (int64 [N, TENSOR_COLUMNS]).
PARAM = tl.constexpr(_table.PARAM)
GRAD = tl.constexpr(_table.GRAD)
MOMENTUM_BUFFER = tl.constexpr(_table.MOMENTUM_BUFFER)
MOMENTUM_STEP = tl.constexpr(_table.MOMENTUM_STEP)
NUMEL = tl.constexpr(_table.NUMEL)
HYPERPARAM_SLOT = tl.constexpr(_table.HYPERPARAM_SLOT)
TENSOR_COLUMNS = tl.constexpr(_table.TENSOR_COLUMNS)
# Columns of ``hyperparams`` ([G, HYPERPARAM_COLUMNS], compute dtype). LR is listed for
# completeness only: kernels read a group's lr through ``lr_ptrs``, never from this column.
LR = tl.constexpr(_table.LR)
MOMENTUM = tl.constexpr(_table.MOMENTUM)
ONE_MINUS_DAMPENING = tl.constexpr(_table.ONE_MINUS_DAMPENING)
WEIGHT_DECAY = tl.constexpr(_table.WEIGHT_DECAY)
NESTEROV = tl.constexpr(_table.NESTEROV)
MAXIMIZE = tl.constexpr(_table.MAXIMIZE)
HYPERPARAM_COLUMNS = tl.constexpr(_table.HYPERPARAM_COLUMNS)
# Byte alignment that ``TensorTable.aligned`` promises for every parameter, gradient and buffer.
VECTOR_ALIGNMENT = tl.constexpr(_table.VECTOR_ALIGNMENT)
