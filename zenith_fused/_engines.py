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
from .reference import GroupHyperparams, StepInputs, ZenithHistory

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
    grad_multiplier: Tensor

    @classmethod
    def of(cls, history: ZenithHistory, device: torch.device) -> "StepView":
        values = (history.lr_scale, history.step, history.step_applied, history.grad_multiplier)
        if device == history.device:
            return cls(*values)
        # Only for optimizers whose parameters span devices; a copy to the CPU makes the host wait.
        return cls(*(t.to(device, non_blocking=device.type != "cpu") for t in values))


class ReferenceEngine:
    """Pure PyTorch, any device: the readable ground truth and the last-resort fallback."""

    name = "reference"

    def sq_norm_partials(self, bucket: Bucket) -> Tensor:
        return reference.squared_norm_partials(bucket.grads)

    def update_history(self, history: ZenithHistory, sq_norm_partials: Tensor, inputs: StepInputs = StepInputs()) -> None:
        reference.update_history(history, sq_norm_partials, inputs)

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
            grad_multiplier=view.grad_multiplier,
        )


def hyperparam_rows(hyperparams: list[GroupHyperparams]) -> list[tuple[float, ...]]:
    """The float32 hyper-parameter table the fused kernels read, one row per group:
    (lr, momentum, 1 - dampening, weight_decay, nesterov, maximize). A tensor lr is a 0 here and
    is copied in on the device (see :class:`HyperparamTables`)."""
    return [
        (
            0.0 if isinstance(hp.lr, Tensor) else hp.lr,
            hp.momentum, 1.0 - hp.dampening, hp.weight_decay, float(hp.nesterov), float(hp.maximize),
        )
        for hp in hyperparams
    ]


def upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without making the host wait for the device."""
    if device.type == "cpu":
        return host
    # Pinned memory makes the copy asynchronous; the caching host allocator keeps the staging
    # buffer alive until the copy has run.
    return host.pin_memory().to(device, non_blocking=True)


class HyperparamTables:
    """The float32 ``[G, 6]`` tables of the fused kernels, one per (device, dtype) bucket.

    A table is uploaded only when a group's hyper-parameters change (a scheduler writing a float
    lr costs one small asynchronous copy). A tensor lr is copied into its row on the device at
    every step, never read by the host, so such steps stay capturable in a CUDA graph.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[list, Tensor]] = {}

    def get(self, bucket: Bucket) -> Tensor:
        key = (bucket.device, bucket.dtype)
        rows = hyperparam_rows(bucket.hyperparams)
        cached = self._tables.get(key)
        if cached is None or cached[0] != rows:
            cached = (rows, upload(torch.tensor(rows, dtype=torch.float32), bucket.device))
            self._tables[key] = cached
        table = cached[1]
        for slot, hp in enumerate(bucket.hyperparams):
            if isinstance(hp.lr, Tensor):
                table[slot, 0].copy_(hp.lr.reshape(()), non_blocking=True)
        return table


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
        from . import _ext  # loads the compiled extension on first use

        return _ext.unavailable_reason(backend)
    raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")


def _compiled_engine(name: str) -> Callable[[], object]:
    def make():
        from . import _compiled_engines  # imports the compiled extension

        return {"cpu": _compiled_engines.CpuEngine, "cuda": _compiled_engines.CudaEngine}[name]()

    return make


def _triton_engine() -> object:
    from ._triton_engine import TritonEngine  # imports Triton

    return TritonEngine()


_ENGINE_FACTORIES: dict[str, Callable[[], object]] = {
    "reference": ReferenceEngine,
    "triton": _triton_engine,
    "cpu": _compiled_engine("cpu"),
    "cuda": _compiled_engine("cuda"),
}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on ``device``; raises RuntimeError if an explicit one can't.

    ``"auto"`` picks, in order: for CUDA tensors Triton when it imports, else the compiled "cuda"
    kernels when built; for CPU tensors the compiled "cpu" kernels when built; the reference
    otherwise.
    """
    if backend == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if _unavailable_reason(candidate, device) is None:
                    return candidate
        elif device.type == "cpu" and _unavailable_reason("cpu", device) is None:
            return "cpu"
        return "reference"
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"ZenithFused backend {backend!r} cannot run: {reason}")
    return backend


def make_engine(name: str):
    return _ENGINE_FACTORIES[name]()
