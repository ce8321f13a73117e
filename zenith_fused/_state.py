"""The ``"zenith"`` entry of a state dict: the optimizer-wide history, saved as float32/int64.

A checkpoint is input: every field is checked before anything is loaded, so that a corrupt or
hand-edited entry raises ``ValueError`` naming the field instead of driving a kernel out of bounds.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

STATE_VERSION = 1
# The history fields a checkpoint holds (the other two of reference.HISTORY_FIELDS are transient).
SAVED_HISTORY_FIELDS = ("step", "norm_window", "window_max", "skipped_steps", "grad_norm", "lr_scale")
# Step counters stay far from int64 overflow (2**62 steps would take longer than any run).
_MAX_COUNT = 2**62


def _number(zenith: dict[str, Any], name: str) -> float:
    value = zenith[name]
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"loaded state dict's 'zenith' entry: {name} must be a 1-element real tensor; "
                             f"got shape {tuple(value.shape)} and dtype {value.dtype}")
        return value.item()  # sync-ok: loading a checkpoint, not a step
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"loaded state dict's 'zenith' entry: {name} must be a number; got {type(value).__name__}")
    return value


def check_zenith_entry(zenith: dict[str, Any], window_size: int) -> None:
    version = zenith.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"Unsupported ZenithFused state_dict version: {version}")
    saved_window = zenith.get("window_size")
    if saved_window != window_size:
        raise ValueError(
            f"loaded state dict has window_size {saved_window}, this optimizer has {window_size}"
        )
    missing = [name for name in SAVED_HISTORY_FIELDS if name not in zenith]
    if missing:
        raise ValueError(f"loaded state dict's 'zenith' entry lacks {missing}")
    for name in ("step", "skipped_steps"):
        value = _number(zenith, name)
        if value != int(value) or not 0 <= value < _MAX_COUNT:
            raise ValueError(f"loaded state dict's 'zenith' entry: {name} must be an integer in [0, 2**62); got {value}")
    window = zenith["norm_window"]
    if not isinstance(window, Tensor) or tuple(window.shape) != (window_size,) or window.is_complex():
        raise ValueError(
            f"loaded state dict's 'zenith' entry: norm_window must be a real tensor of shape ({window_size},); got "
            f"{type(window).__name__ if not isinstance(window, Tensor) else tuple(window.shape)}"
        )
    window = window.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(window).all()) or bool((window < 0).any()):  # sync-ok: loading
        raise ValueError("loaded state dict's 'zenith' entry: norm_window must hold finite norms >= 0")
    window_max = _number(zenith, "window_max")
    if not (math.isfinite(window_max) and window_max >= 0):
        raise ValueError(f"loaded state dict's 'zenith' entry: window_max must be finite and >= 0; got {window_max}")
    lr_scale = _number(zenith, "lr_scale")
    if not 0 <= lr_scale <= 1:
        raise ValueError(f"loaded state dict's 'zenith' entry: lr_scale must be in [0, 1]; got {lr_scale}")
    _number(zenith, "grad_norm")  # any value: inf or nan after a skipped step
