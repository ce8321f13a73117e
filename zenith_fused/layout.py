"""The positional contracts between the Python side and the kernels: defined here, once.

Every fused backend reads the same device tables and the same history list. Python builds them
(:mod:`zenith_fused._table`, :class:`zenith_fused.reference.ZenithHistory`), and three kinds of
kernel read them: Triton (``zenith_fused.triton_kernels``, which imports this module),
C++ on the CPU and CUDA C++ (``csrc/common.h``, which repeats the numbers for C++;
``tests/test_layout.py`` fails when the two drift).

Tensor table, int64 ``[N, TENSOR_COLUMNS]``, one row per tensor of a bucket:

====================  ======================================================================
``PARAM``             address of the parameter (its real view for a complex parameter)
``GRAD``              address of the gradient
``MOMENTUM_BUFFER``   address of the momentum buffer (the parameter's own when it has none)
``MOMENTUM_STEP``     address of the int64 step at which the buffer was first filled
``NUMEL``             element count
``HYPERPARAM_SLOT``   row of the tensor's parameter group in the hyper-parameter table
``ALIGNED``           1 when parameter, gradient and buffer start on a ``VECTOR_ALIGNMENT``
                      boundary (the kernels' 128-bit path), else 0: decided per tensor
====================  ======================================================================

Chunk table, int64 ``[C, CHUNK_COLUMNS]``, one row per program (CUDA block, CPU work item):
``CHUNK_TENSOR`` (the tensor's row) and ``CHUNK_START`` (its first element). Chunk ``c``'s squared-
norm partial goes to slot ``c``.

Hyper-parameter table, compute dtype ``[G, HYPERPARAM_COLUMNS]``, one row per parameter group:
``LR`` (read through ``lr_ptrs``, never from this column), ``MOMENTUM``, ``ONE_MINUS_DAMPENING``,
``WEIGHT_DECAY``, ``NESTEROV``, ``MAXIMIZE``.

History list: the tensors of ``HISTORY_FIELDS``, in that order (see
:class:`zenith_fused.reference.ZenithHistory` for each one's meaning, dtype and shape).

How the norm is summed, on every backend: each chunk's squares are accumulated in float32
(float64 for float64 gradients) and stored as a float32 partial; the partials, and the window of
norms, are summed in float64 and rounded once to float32. A float64 sum of a few thousand float32
values is exact to far below float32's last bit, so the order each backend sums in (index order,
lanes then a tree, torch.sum's) no longer shows in ``n_t`` or ``m_t`` except at rounding ties.
"""
from __future__ import annotations

__all__ = [
    "PARAM", "GRAD", "MOMENTUM_BUFFER", "MOMENTUM_STEP", "NUMEL", "HYPERPARAM_SLOT", "ALIGNED",
    "TENSOR_COLUMNS", "CHUNK_TENSOR", "CHUNK_START", "CHUNK_COLUMNS",
    "LR", "MOMENTUM", "ONE_MINUS_DAMPENING", "WEIGHT_DECAY", "NESTEROV", "MAXIMIZE", "HYPERPARAM_COLUMNS",
    "HISTORY_FIELDS", "VECTOR_ALIGNMENT",
]

# Columns of the tensor table.
TENSOR_COLUMN_NAMES = ("PARAM", "GRAD", "MOMENTUM_BUFFER", "MOMENTUM_STEP", "NUMEL", "HYPERPARAM_SLOT", "ALIGNED")
PARAM, GRAD, MOMENTUM_BUFFER, MOMENTUM_STEP, NUMEL, HYPERPARAM_SLOT, ALIGNED = range(len(TENSOR_COLUMN_NAMES))
TENSOR_COLUMNS = len(TENSOR_COLUMN_NAMES)

# Columns of the chunk table.
CHUNK_COLUMN_NAMES = ("CHUNK_TENSOR", "CHUNK_START")
CHUNK_TENSOR, CHUNK_START = range(len(CHUNK_COLUMN_NAMES))
CHUNK_COLUMNS = len(CHUNK_COLUMN_NAMES)

# Columns of the hyper-parameter table.
HYPERPARAM_COLUMN_NAMES = ("LR", "MOMENTUM", "ONE_MINUS_DAMPENING", "WEIGHT_DECAY", "NESTEROV", "MAXIMIZE")
LR, MOMENTUM, ONE_MINUS_DAMPENING, WEIGHT_DECAY, NESTEROV, MAXIMIZE = range(len(HYPERPARAM_COLUMN_NAMES))
HYPERPARAM_COLUMNS = len(HYPERPARAM_COLUMN_NAMES)

# The history tensors in the one order every backend's history kernel takes them.
HISTORY_FIELDS = (
    "step", "norm_window", "window_max", "skipped_steps", "grad_norm", "lr_scale", "step_applied",
    "grad_multiplier", "warmup_steps",
)

# The byte alignment of a tensor's start that lets the kernels use 128-bit loads; chunk sizes are
# multiples of 16 elements, so every chunk of an aligned tensor starts aligned too.
VECTOR_ALIGNMENT = 16
