"""Triton kernels of zenith-fused, installed as ``zenith_fused.triton_kernels``.

One public launcher per kernel file; the optimizer calls launchers, never ``@triton.jit`` code.
The math each kernel implements is stated in its module docstring and lives in
``zenith_fused/reference.py``.
"""
from .dtypes import SUPPORTED_DTYPES
from .history import update_history
from .momentum import momentum_update
from .sq_norm import sq_norm_partials
from .table import TensorTable, build_tensor_table, table_key

__all__ = [
    "SUPPORTED_DTYPES",
    "TensorTable",
    "build_tensor_table",
    "table_key",
    "momentum_update",
    "sq_norm_partials",
    "update_history",
]
