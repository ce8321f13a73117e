"""The Triton engine, its three calls registered as torch custom ops.

``torch.ops.zenith_fused.triton_sq_norm_partials`` / ``triton_update_history`` /
``triton_momentum_update`` run the launchers of ``zenith_fused.triton_kernels``. As custom ops
with fake implementations they are opaque to ``torch.compile``: it records one op each instead of
tracing the host-side table building, which reads tensor addresses and would break the graph.
The ops find their engine (and its cached tables) through an integer id.
"""
from __future__ import annotations

import importlib
import itertools
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._engines import Bucket, HyperparamTables, StepView, upload
from .reference import StepInputs, ZenithHistory

_ENGINES: "weakref.WeakValueDictionary[int, TritonEngine]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


class TritonEngine:
    """Multi-tensor Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    # Elements per program and per inner iteration. On the GPU a program streams 64 KiB of fp32
    # per chunk, enough to hide latency while leaving thousands of programs for large models.
    chunk_size = 16384
    block_size = 1024

    def __init__(self) -> None:
        self._kernels = importlib.import_module("zenith_fused.triton_kernels")
        self._tables: dict[tuple[torch.device, torch.dtype], object] = {}
        self._hyperparams = HyperparamTables()
        self._placeholder_steps: dict[torch.device, Tensor] = {}
        self.id = next(_NEXT_ID)
        _ENGINES[self.id] = self

    # ------------------------------------------------------------------ engine interface
    def sq_norm_partials(self, bucket: Bucket) -> Tensor:
        return torch.ops.zenith_fused.triton_sq_norm_partials(
            self.id, self.chunk_size, self.block_size, *_bucket_args(bucket)
        )

    def update_history(self, history: ZenithHistory, sq_norm_partials: Tensor, inputs: StepInputs = StepInputs()) -> None:
        torch.ops.zenith_fused.triton_update_history(
            sq_norm_partials,
            *history.kernel_tensors(),
            inputs.grad_scale,
            inputs.found_inf,
            inputs.max_grad_norm,
        )

    def momentum_update(self, bucket: Bucket, view: StepView) -> None:
        torch.ops.zenith_fused.triton_momentum_update(
            self.id,
            self.chunk_size,
            self.block_size,
            *_bucket_args(bucket),
            self._hyperparams.get(bucket),
            view.lr_scale,
            view.step,
            view.step_applied,
            view.grad_multiplier,
            bucket.has_momentum,
        )

    # ------------------------------------------------------------------ inside the ops
    def table(self, params, grads, momentum_buffers, momentum_steps, hyperparam_slots, chunk_size):
        """The device table for these tensors, rebuilt only when one of them moved."""
        device, dtype = params[0].device, params[0].dtype
        k = self._kernels
        wanted = k.table_key(params, grads, momentum_buffers, momentum_steps, hyperparam_slots, chunk_size)
        table = self._tables.get((device, dtype))
        if table is None or table.key != wanted:
            placeholder = self._placeholder_steps.get(device)
            if placeholder is None:
                placeholder = self._placeholder_steps[device] = torch.zeros((), dtype=torch.int64, device=device)
            table = k.build_tensor_table(
                params, grads, momentum_buffers, momentum_steps, hyperparam_slots,
                chunk_size=chunk_size, placeholder_step=placeholder, upload=upload,
            )
            self._tables[(device, dtype)] = table
        return table


def _bucket_args(bucket: Bucket) -> tuple:
    """The bucket as op arguments: tensors with a momentum buffer are listed by index, since a
    custom op cannot mutate a list holding None."""
    buffered = [i for i, b in enumerate(bucket.momentum_buffers) if b is not None]
    return (
        bucket.params,
        bucket.grads,
        buffered,
        [bucket.momentum_buffers[i] for i in buffered],
        [bucket.momentum_steps[i] for i in buffered],
        bucket.hyperparam_slots,
    )


def _aligned(n: int, buffered: Sequence[int], values: Sequence[Tensor]) -> list[Optional[Tensor]]:
    out: list[Optional[Tensor]] = [None] * n
    for i, v in zip(buffered, values):
        out[i] = v
    return out


def _table(engine, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots, chunk_size):
    n = len(params)
    return engine.table(
        params, grads, _aligned(n, buffered, momentum_buffers), _aligned(n, buffered, momentum_steps),
        hyperparam_slots, chunk_size,
    )


def _num_chunks(params: Sequence[Tensor], chunk_size: int) -> int:
    return sum(max(1, -(-p.numel() // chunk_size)) for p in params)


@torch.library.custom_op("zenith_fused::triton_sq_norm_partials", mutates_args=())
def _sq_norm_partials_op(
    engine: int,
    chunk_size: int,
    block_size: int,
    params: list[Tensor],
    grads: list[Tensor],
    buffered: list[int],
    momentum_buffers: list[Tensor],
    momentum_steps: list[Tensor],
    hyperparam_slots: list[int],
) -> Tensor:
    owner = _ENGINES[engine]
    table = _table(owner, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots, chunk_size)
    out = torch.empty(table.num_chunks, dtype=torch.float32, device=params[0].device)
    return owner._kernels.sq_norm_partials(table, params[0].dtype, out, block_size=block_size)


@_sq_norm_partials_op.register_fake
def _(engine, chunk_size, block_size, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots):
    return params[0].new_empty(_num_chunks(params, chunk_size), dtype=torch.float32)


_HISTORY_OUTPUTS = (
    "step", "norm_window", "window_max", "skipped_steps", "grad_norm", "lr_scale", "step_applied", "grad_multiplier",
)


@torch.library.custom_op("zenith_fused::triton_update_history", mutates_args=_HISTORY_OUTPUTS)
def _update_history_op(
    sq_norm_partials: Tensor,
    step: Tensor,
    norm_window: Tensor,
    window_max: Tensor,
    skipped_steps: Tensor,
    grad_norm: Tensor,
    lr_scale: Tensor,
    step_applied: Tensor,
    grad_multiplier: Tensor,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    max_grad_norm: Optional[float],
) -> None:
    from zenith_fused import triton_kernels

    triton_kernels.update_history(
        sq_norm_partials, step=step, norm_window=norm_window, window_max=window_max,
        skipped_steps=skipped_steps, grad_norm=grad_norm, lr_scale=lr_scale, step_applied=step_applied,
        grad_multiplier=grad_multiplier, grad_scale=grad_scale, found_inf=found_inf, max_grad_norm=max_grad_norm,
    )


@_update_history_op.register_fake
def _(*args) -> None:
    return None


@torch.library.custom_op(
    "zenith_fused::triton_momentum_update", mutates_args=("params", "momentum_buffers", "momentum_steps")
)
def _momentum_update_op(
    engine: int,
    chunk_size: int,
    block_size: int,
    params: list[Tensor],
    grads: list[Tensor],
    buffered: list[int],
    momentum_buffers: list[Tensor],
    momentum_steps: list[Tensor],
    hyperparam_slots: list[int],
    hyperparams: Tensor,
    lr_scale: Tensor,
    step: Tensor,
    step_applied: Tensor,
    grad_multiplier: Tensor,
    has_momentum: bool,
) -> None:
    owner = _ENGINES[engine]
    table = _table(owner, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots, chunk_size)
    owner._kernels.momentum_update(
        table, params[0].dtype, hyperparams, lr_scale=lr_scale, step=step, step_applied=step_applied,
        grad_multiplier=grad_multiplier, has_momentum=has_momentum, block_size=block_size,
    )


@_momentum_update_op.register_fake
def _(*args) -> None:
    return None
