"""Triton kernels of zenith-fused, installed as ``zenith_fused.triton_kernels``.

One public launcher per kernel file; the step plan calls launchers, never ``@triton.jit`` code.
The math each kernel implements is stated in its module docstring and lives in
``zenith_fused/reference.py``. The tables the launchers walk are laid out as
:mod:`zenith_fused.layout`, the package's public contract, says.

    sq_norm_partials(table, dtype, out)
    update_history(sq_norm_partials, history, grad_scale, found_inf, max_grad_norm)
    momentum_update(table, dtype, hyperparams, lr_ptrs, lr_scale, step, step_applied, grad_multiplier)
    launch_config(device) -> LaunchConfig (.chunk_size, .block, .num_warps, ...)
"""
from .config import LaunchConfig, launch_config
from .dtypes import SUPPORTED_DTYPES
from .history import update_history
from .momentum import momentum_update
from .sq_norm import sq_norm_partials

__all__ = [
    "SUPPORTED_DTYPES",
    "LaunchConfig",
    "launch_config",
    "momentum_update",
    "sq_norm_partials",
    "update_history",
]
