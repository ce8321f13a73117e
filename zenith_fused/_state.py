"""The ``"zenith"`` entry of a state dict: the optimizer-wide history, saved as float32/int64.

``history_entry`` writes it, ``check_zenith_entry`` validates it and ``load_history`` copies it into
a live history. A checkpoint is input: every field is checked before anything is loaded, so that a
corrupt or hand-edited entry raises ``ValueError`` naming the field instead of driving a kernel out
of bounds. ``{"version": 1, "window_size": W, "warmup_steps": K, "step": int64, "norm_window":
float32[W], "window_max": float32, "skipped_steps": int64, "grad_norm": float32, "lr_scale":
float32}``; an entry written before ``warmup_steps`` existed has no such key and means ``K = 0``.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor

from .reference import ZenithHistory

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


def history_entry(history: ZenithHistory, window_size: int, warmup_steps: int) -> dict[str, Any]:
    """The ``"zenith"`` entry of ``history`` (copies of its tensors)."""
    entry: dict[str, Any] = {"version": STATE_VERSION, "window_size": window_size, "warmup_steps": warmup_steps}
    for name in SAVED_HISTORY_FIELDS:
        entry[name] = getattr(history, name).clone()
    return entry


def load_history(history: ZenithHistory, zenith: dict[str, Any] | None) -> None:
    """Set ``history`` in place from a checked ``"zenith"`` entry, or to a fresh one for None
    (its window length and warmup stay as they are)."""
    fresh = ZenithHistory.zeros(history.window_size, history.device)
    for name in SAVED_HISTORY_FIELDS:
        target = getattr(fresh, name)
        if zenith is not None:
            target.copy_(zenith[name])
        getattr(history, name).copy_(target)
    history.step_applied.zero_()


# Optimizers whose history is being loaded by set_optimizer_state_dict, after torch's helper loads
# their per-parameter state: their momentum step counters stay as saved. Held weakly.
_HISTORY_FOLLOWS: "weakref.WeakSet[Any]" = weakref.WeakSet()


@contextlib.contextmanager
def history_follows(optimizer: Any) -> Iterator[None]:
    """While inside, ``optimizer.load_state_dict`` of a dict without ``"zenith"`` keeps the momentum
    step counters as saved: the history arrives right after."""
    _HISTORY_FOLLOWS.add(optimizer)
    try:
        yield
    finally:
        _HISTORY_FOLLOWS.discard(optimizer)


def history_is_following(optimizer: Any) -> bool:
    return optimizer in _HISTORY_FOLLOWS


def check_zenith_entry(zenith: dict[str, Any], window_size: int, warmup_steps: int) -> None:
    version = zenith.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"Unsupported ZenithFused state_dict version: {version}")
    saved_window = zenith.get("window_size")
    if saved_window != window_size:
        raise ValueError(
            f"loaded state dict has window_size {saved_window}, this optimizer has {window_size}"
        )
    saved_warmup = zenith.get("warmup_steps", 0)  # entries written before the option: K = 0
    if saved_warmup != warmup_steps:
        raise ValueError(
            f"loaded state dict has warmup_steps {saved_warmup}, this optimizer has {warmup_steps}"
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
