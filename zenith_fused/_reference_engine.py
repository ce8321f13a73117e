"""The reference backend: :mod:`zenith_fused.reference` run on a plan's bucket, any device.

The readable ground truth every fused backend is tested against, and the fallback where no fused
backend can run. Its partials are one per tensor (not per chunk).
"""
from __future__ import annotations

from torch import Tensor

from . import reference
from .reference import StepInputs


class ReferenceEngine:
    name = "reference"
    uses_table = False

    def sq_norm_partials(self, bucket) -> None:
        bucket.partials.copy_(reference.squared_norm_partials(bucket.grads))

    def update_history(self, sq_norm_partials: Tensor, history: list[Tensor], inputs: StepInputs) -> None:
        reference.update_history(reference.ZenithHistory(*history), sq_norm_partials, inputs)

    def momentum_update(self, bucket, view) -> None:
        reference.momentum_update(
            bucket.params,
            bucket.grads,
            bucket.momentum_buffers,
            bucket.momentum_steps,
            bucket.hyperparams_per_tensor,
            lr_scale=view.lr_scale,
            step=view.step,
            step_applied=view.step_applied,
            grad_multiplier=view.grad_multiplier,
        )
