"""The window / maximum / scale bookkeeping of ZENITH, on the device, in one program.

Implements steps 1-3 of ``zenith_fused/reference.py`` (``update_history``)::

    n_t        = sqrt(sum(sq_norm_partials)) * (1 / grad_scale)
    applied    = n_t is finite and found_inf == 0
    if applied:  window[t mod W] = n_t;  t += 1
                 m_t = sum(window) / min(t, W);  M_t = max(M_{t-1}, m_t)
                 scale_t = m_t / M_t  (1 when M_t == 0)
    else:        skipped_steps += 1
    grad_multiplier = (1 / grad_scale) * min(1, (1 / (n_t + 1e-6)) * max_grad_norm)

``t mod W`` is the non-negative remainder, so a corrupt negative ``step`` cannot write outside the
window. ``step_applied`` records whether the step was applied. Reciprocals, square root and
division are the correctly rounded ones (``div_rn``/``sqrt_rn``), whatever the GPU's fast-math
defaults, and the clipping factor is a reciprocal times ``max_grad_norm`` as torch computes the
reference's ``max_grad_norm / x``. The partials and the window are summed in a fixed order (lanes,
then a tree over the lanes): deterministic, but not torch.sum's order, so ``n_t`` and ``m_t`` may
differ from the reference, and between a GPU and the interpreter, in their last bits.
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import config as _config


# The partial and window counts change with the tensors and the window length: passing them as
# specialized ints would recompile whenever one of them becomes 1 or a multiple of 16. None of
# the pointers here is read as a vector, and plan-owned buffers may be slices at any offset, so
# none is specialized on alignment either.
@triton.jit(
    do_not_specialize=["num_partials", "window_size"],
    do_not_specialize_on_alignment=[
        "sq_norm_partials", "step_ptr", "norm_window", "window_max_ptr", "skipped_steps_ptr", "grad_norm_ptr",
        "lr_scale_ptr", "step_applied_ptr", "grad_multiplier_ptr", "grad_scale_ptr", "found_inf_ptr",
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
    grad_scale_ptr,
    found_inf_ptr,
    max_grad_norm,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, num_partials, BLOCK):
        index = offset + lanes
        acc += tl.load(sq_norm_partials + index, mask=index < num_partials, other=0.0)
    grad_norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.div_rn(1.0, tl.load(grad_scale_ptr).to(tl.float32))
        grad_norm = grad_norm * inv_scale
    finite = grad_norm < float("inf")  # false for inf and nan
    if HAS_FOUND_INF:
        finite = finite & (tl.load(found_inf_ptr) == 0)

    step = tl.load(step_ptr)
    slot = step % window_size
    slot = tl.where(slot < 0, slot + window_size, slot)  # % truncates toward zero
    new_step = step + tl.where(finite, 1, 0)
    # Scalar conditions become integers before they meet vectors (masks, index matches): that is
    # also what keeps Triton's CPU interpreter, which mistypes broadcast comparisons, exact.
    written_slot = tl.where(finite, slot, -1)

    # The window sum takes the new norm from registers rather than re-reading the slot after the
    # store, so no barrier between threads is needed.
    window_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, window_size, BLOCK):
        index = offset + lanes
        w = tl.load(norm_window + index, mask=index < window_size, other=0.0)
        window_acc += tl.where(index == written_slot, grad_norm, w)
    count = tl.minimum(tl.maximum(new_step, 1), window_size).to(tl.float32)
    mean = tl.div_rn(tl.sum(window_acc, axis=0), count)
    window_max = tl.load(window_max_ptr)
    new_max = tl.maximum(window_max, mean)
    has_max = new_max > 0
    scale = tl.where(has_max, tl.div_rn(mean, tl.where(has_max, new_max, 1.0)), 1.0)
    multiplier = inv_scale
    if CLIP:
        clip = tl.minimum(tl.div_rn(1.0, grad_norm + 1e-6) * max_grad_norm, 1.0)
        multiplier = multiplier * clip

    tl.store(norm_window + slot, grad_norm, mask=finite)
    tl.store(grad_norm_ptr, grad_norm)
    tl.store(step_ptr, new_step)
    tl.store(window_max_ptr, tl.where(finite, new_max, window_max))
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

    ``history``: the tensors in ``zenith_fused.reference.HISTORY_FIELDS`` order, on one device.
    ``grad_scale`` / ``found_inf``: GradScaler's float32 1-element tensors (any shape), or None;
    ``max_grad_norm``: a float turns clipping on. The formula is in this module's docstring.
    """
    step, norm_window, window_max, skipped_steps, grad_norm, lr_scale, step_applied, grad_multiplier = history
    config = _config.launch_config(norm_window.device)
    _update_history_kernel[(1,)](
        sq_norm_partials,
        sq_norm_partials.numel(),
        step,
        norm_window,
        norm_window.numel(),
        window_max,
        skipped_steps,
        grad_norm,
        lr_scale,
        step_applied,
        grad_multiplier,
        # Absent inputs get a valid stand-in address that the constexpr flags never read.
        grad_multiplier if grad_scale is None else grad_scale,
        grad_multiplier if found_inf is None else found_inf,
        0.0 if max_grad_norm is None else float(max_grad_norm),
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        CLIP=max_grad_norm is not None,
        BLOCK=config.history_block,
        num_warps=config.history_warps,
        enable_fp_fusion=False,
    )
