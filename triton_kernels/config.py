"""Launch parameters per GPU architecture: one small table, and why each value.

Every streaming kernel here (squared-norm partials, momentum update) moves each byte once, so what
matters is bytes in flight per SM (Little's law: bandwidth x memory latency), not arithmetic. At
~600 ns latency an H100/H200 (3.3-4.8 TB/s over 132 SMs) needs ~15-22 KB in flight per SM, an A100
(1.6-2.0 TB/s, 108 SMs) ~10 KB. The update streams three tensors (gradient, parameter, buffer).

* ``block``: elements per loop iteration of one program. It is 8 elements per thread, so a thread
  issues two 128-bit loads per float32 tensor per iteration (one for 16-bit types; four 64-bit
  pairs for float64), enough independent loads to cover latency without the register cost of
  deeper unrolling (the update keeps ~3 x 8 values live). float64 uses half the block
  (``block_for``): the same bytes per thread, half the registers.
* ``num_warps``: threads per program. 8 warps (256 threads) on sm_90 gives 256 x 3 x 32 B = 24 KB
  of float32 loads in flight per resident program; with the register counts that
  ``bench/kernel_report.py`` reports (< 64 registers: at least 4 programs per SM) that is ~100 KB
  per SM, well above the 22 KB needed even for bfloat16. sm_80 needs less, and 4 warps halves the
  idle threads of the many programs that handle a small tensor's only (partial) chunk.
* ``chunk_size``: elements per program (a multiple of every ``block`` and of 16, so every chunk of
  an aligned tensor starts 16-byte aligned). 32768 amortizes a program's table and hyper-parameter
  loads (~10 scalar loads) over 16-32 iterations, and still cuts ResNet-50 (25.6 M parameters)
  into ~900 programs, ~7 per SM, which balances the tail of the grid. The squared-norm partials
  cost 4 bytes per chunk (0.01 % of the gradient bytes).
* ``history_block`` / ``history_warps``: the one-program history kernel sums a few thousand
  partials and a window of a few hundred norms; 1024 lanes over 4 warps does it in a few loop
  trips with a short reduction tree.

These values are reasoned, not yet measured: ``bench/gpu_checks.py bandwidth`` measures the
achieved bandwidth per kernel on the first GPU we are lent.

The CPU interpreter (``TRITON_INTERPRET=1``) runs each program in Python with numpy; small blocks
and chunks keep the test tensors spread over several chunks and blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    chunk_size: int  # elements per program (table chunk); multiple of 16 and of block
    block: int  # elements per loop iteration of the streaming kernels (a power of two)
    num_warps: int  # warps per program of the streaming kernels
    history_block: int  # lanes of the one-program history kernel (a power of two)
    history_warps: int


# Keyed by compute capability major version; ``None`` is every other CUDA GPU.
GPU_CONFIGS = {
    9: LaunchConfig(chunk_size=32768, block=2048, num_warps=8, history_block=1024, history_warps=4),
    8: LaunchConfig(chunk_size=32768, block=1024, num_warps=4, history_block=1024, history_warps=4),
    None: LaunchConfig(chunk_size=32768, block=1024, num_warps=4, history_block=1024, history_warps=4),
}
INTERPRETER_CONFIG = LaunchConfig(chunk_size=512, block=128, num_warps=1, history_block=64, history_warps=1)

_by_device: dict[torch.device, LaunchConfig] = {}


def config_for_arch(arch: int) -> LaunchConfig:
    """The configuration for compute capability ``arch`` (80, 86, 90, ...)."""
    return GPU_CONFIGS.get(arch // 10, GPU_CONFIGS[None])


def launch_config(device: torch.device) -> LaunchConfig:
    """The launch parameters for tensors on ``device`` (CPU tensors: the interpreter's)."""
    device = torch.device(device)
    config = _by_device.get(device)
    if config is None:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            config = config_for_arch(10 * major + minor)
        else:
            config = INTERPRETER_CONFIG
        _by_device[device] = config
    return config


def block_for(config: LaunchConfig, chunk_size: int, dtype: torch.dtype) -> int:
    """The streaming kernels' block for ``dtype`` tensors in chunks of ``chunk_size``.

    float64 gets half the block: the same bytes per thread (two 128-bit loads per tensor) instead
    of twice the registers (the update would need ~90, a quarter of the SM's warps). A block that
    does not divide the chunk size (tests build tables with small chunks) shrinks to the largest
    power of two that does.
    """
    block = config.block // 2 if dtype == torch.float64 else config.block
    while block > 1 and chunk_size % block:
        block //= 2
    return block
