"""The ZENITH algorithm in readable PyTorch: the ground truth every backend is tested against.

One history per optimizer, shared by all parameter groups. At every ``step()``:

1. ``n_t = ||g||_2`` over the concatenation of every raw gradient (before weight decay and before
   ``maximize`` flips the sign): squares accumulated in float32 (float64 for float64 gradients)
   per tensor or chunk, those partials summed in float64, rounded once to float32
   (:mod:`zenith_fused.layout` states this rule for every backend).
2. If ``n_t`` is not finite the step is skipped: no parameter, momentum buffer, step count, window
   or maximum changes, and ``skipped_steps`` grows by one.
3. Otherwise ``t += 1``. With ``K = warmup_steps`` (0 by default):

   * ``t <= K`` (warmup): ``scale_t = t / K``; ``n_t`` is not recorded, so the window and the
     maximum stay empty.
   * ``t > K``: with ``u = t - K``, ``n_t`` goes into a ring buffer of the last ``W`` norms (slot
     ``(u - 1) mod W``); ``m_t`` = mean of the last ``min(u, W)`` norms (summed in float64);
     ``M_t = max(M_{t-1}, m_t)`` with ``M_K = 0``; ``scale_t = m_t / M_t`` (1 when ``M_t == 0``).

   With ``K = 0`` this is the paper's rule.
4. Per group, torch.optim.SGD's momentum update with learning rate ``lr * scale_t``::

       d   = (-g if maximize else g) + weight_decay * p
       buf = d                                     on the buffer's first step
       buf = momentum * buf + (1 - dampening) * d  afterwards
       d   = d + momentum * buf if nesterov else buf     (only when momentum != 0)
       p  -= lr * scale_t * d

Every function here stays on the device: the skip is a ``torch.where`` on a 0-dim flag, never a
host branch, so the reference is also a usable (if slow) sync-free fallback.

State layout shared by every backend (see :class:`ZenithHistory`):

* history (:data:`zenith_fused.layout.HISTORY_FIELDS` order): ``step`` (int64), ``norm_window``
  (float32, ``W``), ``window_max`` (float32), ``skipped_steps`` (int64), ``grad_norm`` (float32),
  ``lr_scale`` (float32), the transient ``step_applied`` (int32, 1 when the last step was finite)
  and ``grad_multiplier`` (float32), and the constant ``warmup_steps`` (int64, ``K``).
Arithmetic is float32 for float32, float16 and bfloat16 tensors and float64 for float64 tensors
(:func:`compute_dtype`); every kernel follows the same rule.

* per parameter, when momentum != 0: ``momentum_buffer`` (parameter dtype) and
  ``momentum_step`` (int64 0-dim): 0 while the buffer has never been filled, else the history step
  ``t`` at which it was first filled (-1 when it was filled before the current history started,
  e.g. loaded from ``torch.optim.SGD``). It gives the "first step" of the buffer without a host read.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .layout import HISTORY_FIELDS

__all__ = [
    "HISTORY_FIELDS",
    "ZenithHistory",
    "compute_dtype",
    "GroupHyperparams",
    "StepInputs",
    "squared_norm_partials",
    "update_history",
    "momentum_update",
]




def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ZENITH's update computes in for tensors of ``dtype``: float64 stays float64,
    everything else is computed in float32 and rounded to its own dtype once, at the store."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class ZenithHistory:
    """The optimizer-wide state. All tensors live on one device (the first parameter's)."""

    step: Tensor  # int64 0-dim: t, the number of finite steps taken
    norm_window: Tensor  # float32 [W]: ring buffer of the last W finite norms, slot (t-1) % W
    window_max: Tensor  # float32 0-dim: M_t
    skipped_steps: Tensor  # int64 0-dim
    grad_norm: Tensor  # float32 0-dim: n_t of the last step (inf/nan when it was skipped)
    lr_scale: Tensor  # float32 0-dim: scale_t of the last finite step, 1 before any
    step_applied: Tensor  # int32 0-dim: 1 if the last step was finite, else 0
    grad_multiplier: Tensor  # float32 0-dim: what the update multiplies raw gradients by
    warmup_steps: Tensor  # int64 0-dim: K, the steps of linear warmup before the rule starts

    @classmethod
    def zeros(cls, window_size: int, device: torch.device, warmup_steps: int = 0) -> "ZenithHistory":
        return cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            norm_window=torch.zeros(window_size, dtype=torch.float32, device=device),
            window_max=torch.zeros((), dtype=torch.float32, device=device),
            skipped_steps=torch.zeros((), dtype=torch.int64, device=device),
            grad_norm=torch.zeros((), dtype=torch.float32, device=device),
            lr_scale=torch.ones((), dtype=torch.float32, device=device),
            step_applied=torch.zeros((), dtype=torch.int32, device=device),
            grad_multiplier=torch.ones((), dtype=torch.float32, device=device),
            warmup_steps=torch.full((), warmup_steps, dtype=torch.int64, device=device),
        )

    def kernel_tensors(self) -> list[Tensor]:
        """The history as the one list every backend's history kernel takes (``HISTORY_FIELDS``)."""
        return [getattr(self, name) for name in HISTORY_FIELDS]

    def to(self, device: torch.device) -> "ZenithHistory":
        """The same history on ``device`` (``self`` when it is there already)."""
        if device == self.device:
            return self
        return ZenithHistory(*(getattr(self, name).to(device) for name in HISTORY_FIELDS))

    @property
    def window_size(self) -> int:
        return self.norm_window.numel()

    @property
    def device(self) -> torch.device:
        return self.norm_window.device


@dataclass(frozen=True)
class StepInputs:
    """What mixed precision and clipping bring to a step; every field is optional.

    ``grad_scale``: float32 0-dim, GradScaler's scale; the gradients arrive multiplied by it, so the
    norm and the update use ``g / grad_scale``. ``found_inf``: float32 0-dim, nonzero when GradScaler
    saw an inf or nan; the step is then skipped. ``max_grad_norm``: clip the update's gradients to
    this global norm, ``g * min(1, max_grad_norm / (n_t + 1e-6))`` as torch.nn.utils.clip_grad_norm_
    does; the window still records the unclipped ``n_t``.
    """

    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    max_grad_norm: float | None = None


@dataclass(frozen=True)
class GroupHyperparams:
    lr: float | Tensor  # a Tensor lr (1 element, on the parameters' device) keeps steps capturable
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool


def squared_norm_partials(grads: Sequence[Tensor]) -> Tensor:
    """Per-gradient squared L2 norms in float32, as a 1-D tensor; their sum is ``n_t ** 2``."""
    if len(grads) == 0:
        return torch.zeros(0, dtype=torch.float32)
    # Accumulated in float32 (float64 gradients in their own width) by torch.sum, whose blocked
    # summation stays accurate on tensors of tens of millions of values; vector_norm's float32
    # path on the CPU does not (about 1e-3 relative on GPT-2's embedding).
    return torch.stack([
        g.to(torch.float64 if g.dtype == torch.float64 else torch.float32).square().sum().to(torch.float32)
        for g in grads
    ])


def _sum_as_float32(values: Tensor) -> Tensor:
    """``values`` summed in float64 and rounded once to float32 (:mod:`zenith_fused.layout`)."""
    wide = torch.float32 if values.device.type == "mps" else torch.float64  # MPS has no float64
    return values.to(wide).sum().to(torch.float32)


def update_history(history: ZenithHistory, sq_norm_partials: Tensor, inputs: StepInputs = StepInputs()) -> None:
    """Steps 1-3 of the algorithm: fold this step's norm into the history, in place.

    Also sets ``grad_multiplier``, the factor the update applies to the raw gradients:
    ``1 / grad_scale`` (unscaling) times the clipping coefficient.
    """
    raw_norm = _sum_as_float32(sq_norm_partials).sqrt()
    inv_scale = torch.ones((), dtype=torch.float32, device=raw_norm.device)
    if inputs.grad_scale is not None:
        inv_scale = inputs.grad_scale.to(torch.float32).reciprocal()
    grad_norm = raw_norm * inv_scale
    finite = torch.isfinite(grad_norm)
    if inputs.found_inf is not None:
        finite = finite & (inputs.found_inf == 0)
    window_size = history.window_size
    warmup = history.warmup_steps

    new_step = history.step + finite.to(torch.int64)
    # Steps after the warmup count from it: u = t - K. With K = 0 every finite step records.
    past_warmup = new_step > warmup
    record = finite & past_warmup
    slot = ((history.step - warmup) % window_size).reshape(1)  # a tensor index: no host read
    old_norm = history.norm_window.gather(0, slot)
    history.norm_window.scatter_(0, slot, torch.where(record, grad_norm, old_norm))
    # Unused slots still hold 0, so the sum over the whole ring is the sum of the last min(u, W).
    count = (new_step - warmup).clamp(min=1, max=window_size).to(torch.float32)
    mean = _sum_as_float32(history.norm_window) / count
    new_max = torch.maximum(history.window_max, mean)
    scale = torch.where(new_max > 0, mean / new_max, torch.ones_like(mean))
    # During the warmup: t / K (K > 0 there, so the division is only taken when it is defined).
    warmup_scale = new_step.to(torch.float32) / warmup.clamp(min=1).to(torch.float32)
    scale = torch.where(past_warmup, scale, warmup_scale)
    multiplier = inv_scale
    if inputs.max_grad_norm is not None:
        multiplier = multiplier * (inputs.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)

    history.grad_norm.copy_(grad_norm)
    history.step.copy_(new_step)
    history.window_max.copy_(torch.where(record, new_max, history.window_max))
    history.lr_scale.copy_(torch.where(finite, scale, history.lr_scale))
    history.skipped_steps.add_((~finite).to(torch.int64))
    history.step_applied.copy_(finite.to(torch.int32))
    history.grad_multiplier.copy_(multiplier)


def momentum_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    momentum_steps: Sequence[Tensor | None],
    hyperparams: Sequence[GroupHyperparams],
    *,
    lr_scale: Tensor,
    step: Tensor,
    step_applied: Tensor,
    grad_multiplier: Tensor,
) -> None:
    """Step 4: torch.optim.SGD's update at ``lr * lr_scale``, a no-op unless ``step_applied``.

    ``hyperparams[i]`` belongs to ``params[i]``; ``step`` is ``t`` after this step's increment;
    the gradients are used as ``g * grad_multiplier`` (unscaled and clipped).
    Arithmetic is in :func:`compute_dtype` (float32, or float64 for float64 tensors), with the
    hyper-parameters rounded to it, and each tensor is rounded to its own dtype once, at the store.
    """
    applied = step_applied.to(torch.bool)
    for p, g, buf, buf_step, hp in zip(params, grads, momentum_buffers, momentum_steps, hyperparams):
        dtype = compute_dtype(p.dtype)
        # lr in the compute dtype, times the float32 scale: one rounding, whatever lr's own type.
        lr = hp.lr if isinstance(hp.lr, Tensor) else torch.tensor(hp.lr, dtype=dtype)
        step_lr = lr.to(device=p.device, dtype=dtype).reshape(()) * lr_scale.to(dtype)
        d = g.to(dtype) * grad_multiplier.to(dtype)
        if hp.maximize:
            d = -d
        if hp.weight_decay != 0:
            d = d + _scalar(hp.weight_decay, dtype) * p.to(dtype)
        if hp.momentum != 0:
            first = (buf_step == 0) | (buf_step == step)
            new_buf = torch.where(
                first, d, _scalar(hp.momentum, dtype) * buf.to(dtype) + _scalar(1 - hp.dampening, dtype) * d
            )
            buf.copy_(torch.where(applied, new_buf, buf.to(dtype)))
            buf_step.copy_(torch.where(applied & (buf_step == 0), step, buf_step))
            d = d + _scalar(hp.momentum, dtype) * new_buf if hp.nesterov else new_buf
        new_p = p.to(dtype) - step_lr * d
        p.copy_(torch.where(applied, new_p, p.to(dtype)))


def _scalar(value: float, dtype: torch.dtype) -> float:
    """A hyper-parameter as the kernels hold it: rounded to float32 for float32 arithmetic."""
    return value if dtype == torch.float64 else struct.unpack("f", struct.pack("f", value))[0]
