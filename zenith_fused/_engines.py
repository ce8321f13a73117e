"""Backends ("engines") that run ZENITH on one (device, dtype) bucket of tensors.

The optimizer gathers the tensors that have gradients into buckets, asks each bucket's engine for
its squared-norm partials, lets the engine of the history's device fold them into the history, then
asks every engine to apply the update. Engines never read a device value on the host.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import reference
from .reference import GroupHyperparams, ZenithHistory

BACKENDS = ("auto", "triton", "cpu", "cuda", "reference")


@dataclass
class Bucket:
    """The tensors of one (device, dtype) that have a gradient at this step."""

    device: torch.device
    dtype: torch.dtype
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    momentum_buffers: list[Tensor | None] = field(default_factory=list)
    momentum_steps: list[Tensor | None] = field(default_factory=list)
    hyperparam_slots: list[int] = field(default_factory=list)  # index into ``hyperparams``
    hyperparams: list[GroupHyperparams] = field(default_factory=list)

    @property
    def has_momentum(self) -> bool:
        return any(hp.momentum != 0 for hp in self.hyperparams)


@dataclass
class StepView:
    """The history values the update needs, on the bucket's device."""

    lr_scale: Tensor
    step: Tensor
    step_applied: Tensor

    @classmethod
    def of(cls, history: ZenithHistory, device: torch.device) -> "StepView":
        view = cls(history.lr_scale, history.step, history.step_applied)
        if device == history.device:
            return view
        # Only for optimizers whose parameters span devices; a copy to the CPU makes the host wait.
        return cls(*(t.to(device, non_blocking=device.type != "cpu") for t in (view.lr_scale, view.step, view.step_applied)))


class ReferenceEngine:
    """Pure PyTorch, any device: the readable ground truth and the last-resort fallback."""

    name = "reference"

    def sq_norm_partials(self, bucket: Bucket) -> Tensor:
        return reference.squared_norm_partials(bucket.grads)

    def update_history(self, history: ZenithHistory, sq_norm_partials: Tensor) -> None:
        reference.update_history(history, sq_norm_partials)

    def momentum_update(self, bucket: Bucket, view: StepView) -> None:
        reference.momentum_update(
            bucket.params,
            bucket.grads,
            bucket.momentum_buffers,
            bucket.momentum_steps,
            [bucket.hyperparams[s] for s in bucket.hyperparam_slots],
            lr_scale=view.lr_scale,
            step=view.step,
            step_applied=view.step_applied,
        )


def hyperparam_rows(hyperparams: list[GroupHyperparams]) -> list[tuple[float, ...]]:
    """The float32 hyper-parameter table the fused kernels read, one row per group."""
    return [
        (hp.lr, hp.momentum, 1.0 - hp.dampening, hp.weight_decay, float(hp.nesterov), float(hp.maximize))
        for hp in hyperparams
    ]


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
        self._hyperparams: dict[tuple[torch.device, torch.dtype], tuple[list, Tensor]] = {}
        self._partials: dict[torch.device, Tensor] = {}
        self._placeholder_steps: dict[torch.device, Tensor] = {}

    def _table(self, bucket: Bucket):
        key = (bucket.device, bucket.dtype)
        k = self._kernels
        wanted = k.table_key(
            bucket.params, bucket.grads, bucket.momentum_buffers, bucket.momentum_steps,
            bucket.hyperparam_slots, self.chunk_size,
        )
        table = self._tables.get(key)
        if table is None or table.key != wanted:
            placeholder = self._placeholder_steps.get(bucket.device)
            if placeholder is None:
                placeholder = torch.zeros((), dtype=torch.int64, device=bucket.device)
                self._placeholder_steps[bucket.device] = placeholder
            table = k.build_tensor_table(
                bucket.params, bucket.grads, bucket.momentum_buffers, bucket.momentum_steps,
                bucket.hyperparam_slots, chunk_size=self.chunk_size, placeholder_step=placeholder,
            )
            self._tables[key] = table
        return table

    def _hyperparam_table(self, bucket: Bucket) -> Tensor:
        key = (bucket.device, bucket.dtype)
        rows = hyperparam_rows(bucket.hyperparams)
        cached = self._hyperparams.get(key)
        if cached is None or cached[0] != rows:
            host = torch.tensor(rows, dtype=torch.float32)
            cached = (rows, self._kernels.table.to_device(host, bucket.device))
            self._hyperparams[key] = cached
        return cached[1]

    def sq_norm_partials(self, bucket: Bucket) -> Tensor:
        table = self._table(bucket)
        out = torch.empty(table.num_chunks, dtype=torch.float32, device=bucket.device)
        return self._kernels.sq_norm_partials(table, bucket.dtype, out, block_size=self.block_size)

    def update_history(self, history: ZenithHistory, sq_norm_partials: Tensor) -> None:
        self._kernels.update_history(
            sq_norm_partials,
            step=history.step,
            norm_window=history.norm_window,
            window_max=history.window_max,
            skipped_steps=history.skipped_steps,
            grad_norm=history.grad_norm,
            lr_scale=history.lr_scale,
            step_applied=history.step_applied,
        )

    def momentum_update(self, bucket: Bucket, view: StepView) -> None:
        self._kernels.momentum_update(
            self._table(bucket),
            bucket.dtype,
            self._hyperparam_table(bucket),
            lr_scale=view.lr_scale,
            step=view.step,
            step_applied=view.step_applied,
            has_momentum=bucket.has_momentum,
            block_size=self.block_size,
        )


def _triton_unavailable_reason(device: torch.device) -> str | None:
    try:
        importlib.import_module("zenith_fused.triton_kernels")
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"Triton could not be imported ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"the Triton kernels run on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1; "
        f"got a parameter on {device}"
    )


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_unavailable_reason(device)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"backend {backend!r} runs on {backend} tensors; got a parameter on {device}"
        return f"the compiled {backend} kernel of zenith_fused is not available in this build"
    raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


_ENGINE_FACTORIES: dict[str, Callable[[], object]] = {
    "reference": ReferenceEngine,
    "triton": TritonEngine,
}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on ``device``; raises RuntimeError if an explicit one can't.

    ``"auto"`` picks, in order: Triton for CUDA tensors when it imports; the reference otherwise.
    """
    if backend == "auto":
        if device.type == "cuda" and _triton_unavailable_reason(device) is None:
            return "triton"
        return "reference"
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"ZenithFused backend {backend!r} cannot run: {reason}")
    return backend


def make_engine(name: str):
    return _ENGINE_FACTORIES[name]()
