"""The Triton backend: the launchers of ``zenith_fused.triton_kernels`` on a plan's bucket.

Eager steps call the launchers directly, each under its bucket's device guard; under
``torch.compile`` the optimizer reaches the same methods through the custom ops of
:mod:`zenith_fused._traced`. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ._table import device_guard
from .reference import StepInputs


class TritonEngine:
    name = "triton"
    uses_table = True
    # None: the launchers' per-architecture choice (``launch_config``); tests set a small value
    # so that small tensors span several chunks.
    chunk_elements: int | None = None

    def __init__(self) -> None:
        self._kernels = importlib.import_module("zenith_fused.triton_kernels")

    def chunk_size(self, device: torch.device) -> int:
        if self.chunk_elements is not None:
            return self.chunk_elements
        return self._kernels.launch_config(device).chunk_size

    def sq_norm_partials(self, bucket) -> None:
        with device_guard(bucket.device):
            self._kernels.sq_norm_partials(bucket.table, bucket.dtype, bucket.partials)

    def update_history(self, sq_norm_partials: Tensor, history: list[Tensor], inputs: StepInputs) -> None:
        with device_guard(sq_norm_partials.device):
            self._kernels.update_history(
                sq_norm_partials, history, inputs.grad_scale, inputs.found_inf, inputs.max_grad_norm
            )

    def momentum_update(self, bucket, view) -> None:
        with device_guard(bucket.device):
            self._kernels.momentum_update(
                bucket.table, bucket.dtype, bucket.hyperparams, bucket.lr_ptrs,
                view.lr_scale, view.step, view.step_applied, view.grad_multiplier,
            )
