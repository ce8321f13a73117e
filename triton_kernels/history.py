"""The window / maximum / scale bookkeeping of ZENITH, on the device, in one program.

Implements steps 1-3 of ``zenith_fused/reference.py`` (``update_history``), with ``K`` the
history's ``warmup_steps``::

    n_t        = sqrt(sum(sq_norm_partials)) * (1 / grad_scale)
    applied    = n_t is finite and found_inf == 0
    if applied:  t += 1
                 if t <= K:  scale_t = t / K                    (warmup: nothing recorded)
                 else:       u = t - K;  window[(u - 1) mod W] = n_t
                             m_t = sum(window) / min(u, W);  M_t = max(M_{t-1}, m_t)
                             scale_t = m_t / M_t  (1 when M_t == 0)
    else:        skipped_steps += 1
    grad_multiplier = (1 / grad_scale) * min(1, (1 / (n_t + 1e-6)) * max_grad_norm)

The partials and the window are summed in float64 and rounded once to float32, the rule of every
backend (``zenith_fused.layout``): the order of the sum (lanes, then a tree over the lanes) then
no longer shows in ``n_t`` or ``m_t`` except at rounding ties. ``mod`` is the non-negative
remainder, so a corrupt negative ``step`` cannot write outside the window. Reciprocals, square
root and division are the correctly rounded ones (``div_rn``/``sqrt_rn``), whatever the GPU's
fast-math defaults, and the clipping factor is a reciprocal times ``max_grad_norm`` as torch
computes the reference's ``max_grad_norm / x``. With ``K = 0`` the warmup branch is never taken.
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor
from zenith_fused.layout import HISTORY_FIELDS

from . import config as _config


# The partial and window counts change with the tensors and the window length: passing them as
# specialized ints would recompile whenever one of them becomes 1 or a multiple of 16. None of
# the pointers here is read as a vector, and plan-owned buffers may be slices at any offset, so
# none is specialized on alignment either.
@triton.jit(
    do_not_specialize=["num_partials", "window_size"],
    do_not_specialize_on_alignment=[
        "sq_norm_partials", "step_ptr", "norm_window", "window_max_ptr", "skipped_steps_ptr", "grad_norm_ptr",
        "lr_scale_ptr", "step_applied_ptr", "grad_multiplier_ptr", "warmup_steps_ptr", "grad_scale_ptr",
        "found_inf_ptr",
    ],
)
def _update_history_kernel(
    sq_norm_partials,
    num_partials,
    step_ptr,
    norm_window,
    window_size,
    window_max_ptr,
    skipped_steps_ptr,
    grad_norm_ptr,
    lr_scale_ptr,
    step_applied_ptr,
    grad_multiplier_ptr,
    warmup_steps_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    max_grad_norm,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for offset in range(0, num_partials, BLOCK):
        index = offset + lanes
        acc += tl.load(sq_norm_partials + index, mask=index < num_partials, other=0.0).to(tl.float64)
    grad_norm = tl.sqrt_rn(tl.sum(acc, axis=0).to(tl.float32))
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr).to(tl.float32))
        grad_norm = grad_norm * inv_scale
    finite = grad_norm < float("inf")  # false for inf and nan
    if HAS_FOUND_INF:
        finite = finite & (tl.load(found_inf_ptr) == 0)

    step = tl.load(step_ptr)
    warmup = tl.load(warmup_steps_ptr)
    new_step = step + tl.where(finite, 1, 0)
    past_warmup = new_step > warmup
    slot = (step - warmup) % window_size
    slot = tl.where(slot < 0, slot + window_size, slot)  # % truncates toward zero
    # Scalar conditions become integers before they meet vectors (masks, index matches): that is
    # also what keeps Triton's CPU interpreter, which mistypes broadcast comparisons, exact.
    record = finite & past_warmup
    written_slot = tl.where(record, slot, -1)

    # The window sum takes the new norm from registers rather than re-reading the slot after the
    # store, so no barrier between threads is needed.
    window_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for offset in range(0, window_size, BLOCK):
        index = offset + lanes
        w = tl.load(norm_window + index, mask=index < window_size, other=0.0)
        window_acc += tl.where(index == written_slot, grad_norm, w).to(tl.float64)
    count = tl.minimum(tl.maximum(new_step - warmup, 1), window_size).to(tl.float32)
    mean = tl.div_rn(tl.sum(window_acc, axis=0).to(tl.float32), count)
    window_max = tl.load(window_max_ptr)
    new_max = tl.maximum(window_max, mean)
    has_max = new_max > 0
    scale = tl.where(has_max, tl.div_rn(mean, tl.where(has_max, new_max, 1.0)), 1.0)
    warmup_scale = tl.div_rn(new_step.to(tl.float32), tl.maximum(warmup, 1).to(tl.float32))
    scale = tl.where(past_warmup, scale, warmup_scale)
    multiplier = inv_scale
    if CLIP:
        clip = tl.minimum(tl.div_rn(1.0, grad_norm + 1e-6) * max_grad_norm, 1.0)
        multiplier = multiplier * clip

    tl.store(norm_window + slot, grad_norm, mask=record)
    tl.store(grad_norm_ptr, grad_norm)
    tl.store(step_ptr, new_step)
    tl.store(window_max_ptr, tl.where(record, new_max, window_max))
    tl.store(lr_scale_ptr, tl.where(finite, scale, tl.load(lr_scale_ptr)))
    tl.store(skipped_steps_ptr, tl.load(skipped_steps_ptr) + tl.where(finite, 0, 1))
    tl.store(step_applied_ptr, tl.where(finite, 1, 0).to(tl.int32))
    tl.store(grad_multiplier_ptr, multiplier)


def update_history(
    sq_norm_partials: Tensor,
    history: Sequence[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    max_grad_norm: float | None,
) -> None:
    """Fold the norm whose squared partials are ``sq_norm_partials`` into ``history``, in place.

    ``history``: the tensors in ``zenith_fused.layout.HISTORY_FIELDS`` order, on one device.
    ``grad_scale`` / ``found_inf``: GradScaler's float32 1-element tensors (any shape), or None;
    ``max_grad_norm``: a float turns clipping on. The formula is in this module's docstring.
    """
    h = dict(zip(HISTORY_FIELDS, history, strict=True))
    norm_window = h["norm_window"]
    config = _config.launch_config(norm_window.device)
    _update_history_kernel[(1,)](
        sq_norm_partials,
        sq_norm_partials.numel(),
        h["step"],
        norm_window,
        norm_window.numel(),
        h["window_max"],
        h["skipped_steps"],
        h["grad_norm"],
        h["lr_scale"],
        h["step_applied"],
        h["grad_multiplier"],
        h["warmup_steps"],
        # Absent inputs get a valid stand-in address that the constexpr flags never read.
        h["grad_multiplier"] if grad_scale is None else grad_scale,
        h["grad_multiplier"] if found_inf is None else found_inf,
        0.0 if max_grad_norm is None else float(max_grad_norm),
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        CLIP=max_grad_norm is not None,
        BLOCK=config.history_block,
        num_warps=config.history_warps,
        enable_fp_fusion=False,
    )
