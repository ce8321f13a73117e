"""``get_optimizer_state_dict`` / ``set_optimizer_state_dict``: torch's helpers of the same names
(``torch.distributed.checkpoint.state_dict``) plus ZENITH's history, which they would drop (they keep
only ``"state"`` and ``"param_groups"``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch import Tensor

from . import _distributed, _state
from ._plan import momentum_state
from .optimizer import ZenithFused

__all__ = ["get_optimizer_state_dict", "set_optimizer_state_dict"]


def _zenith_optimizer(optimizer: Any) -> ZenithFused:
    if not isinstance(optimizer, ZenithFused):
        raise TypeError(
            f"zenith_fused's state-dict helpers take one ZenithFused optimizer; got {type(optimizer).__name__} "
            "(for other optimizers use torch.distributed.checkpoint.state_dict directly)"
        )
    return optimizer


def _check_options(options: Any) -> None:
    if options is not None and getattr(options, "broadcast_from_rank0", False):
        raise ValueError(
            "StateDictOptions(broadcast_from_rank0=True) is not supported by zenith_fused's "
            "set_optimizer_state_dict; load a sharded checkpoint with torch.distributed.checkpoint instead"
        )


def _fill_momentum_state(optimizer: ZenithFused) -> None:
    """Give every trainable parameter of a momentum group its "never filled" momentum state, the
    state the first step would create. torch's helpers then find the optimizer initialised and do
    not run their zero-gradient ``step()`` (which would push a zero norm into ZENITH's history and
    mark the buffers filled), and a checkpoint holds the same keys whichever parameters have had a
    gradient, so a fresh optimizer's state dict is a template ``dcp.load`` can fill."""
    sharding = _distributed.sharding_plan(optimizer.param_groups, optimizer.process_group)
    for group in optimizer.param_groups:
        if group["momentum"] != 0:
            for p in group["params"]:
                if p.requires_grad:
                    momentum_state(optimizer.state[p], p, sharding)


@contextlib.contextmanager
def _history_kept(optimizer: ZenithFused) -> Iterator[None]:
    """Undo whatever torch's helpers do to the history. With momentum 0 there is no per-parameter
    state, and torch's ``_init_optim_state`` then calls ``step()`` on zero gradients at lr 0: the
    parameters stay as they are, but the history would count a step of norm 0."""
    history = optimizer.history
    saved = {f.name: getattr(history, f.name).clone() for f in dataclasses.fields(history)}
    try:
        yield
    finally:
        for name, value in saved.items():
            getattr(history, name).copy_(value)


def get_optimizer_state_dict(
    model: torch.nn.Module, optimizer: ZenithFused, *, options: Any = None
) -> dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` plus the ZENITH history.

    Returns torch's dict (parameters named by their fully qualified names, momentum buffers as
    DTensors under FSDP2) with ``"zenith"`` added: the optimizer-wide history of
    :meth:`ZenithFused.state_dict`, plain tensors that are the same on every rank (DCP saves one
    copy). Every trainable parameter of a momentum group gets its momentum state if it has none
    yet (zeros, marked never filled: the state the first step would create), so that the dict of a
    fresh optimizer is the template ``dcp.load`` fills. Call it on every rank.
    """
    from torch.distributed.checkpoint import state_dict as torch_state_dict

    optimizer = _zenith_optimizer(optimizer)
    _check_options(options)
    _fill_momentum_state(optimizer)
    with _history_kept(optimizer):
        state = torch_state_dict.get_optimizer_state_dict(model, optimizer, options=options)
    zenith = _state.history_entry(optimizer.history, optimizer.window_size, optimizer.warmup_steps)
    if options is not None and options.cpu_offload:
        zenith = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in zenith.items()}  # sync-ok: checkpoint helper, not the step path
    state["zenith"] = zenith
    return state


def set_optimizer_state_dict(
    model: torch.nn.Module, optimizer: ZenithFused, optim_state_dict: dict[str, Any], *, options: Any = None
) -> None:
    """``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` plus the ZENITH history.

    Loads what :func:`get_optimizer_state_dict` returned (after ``dcp.load`` filled it); a dict
    without ``"zenith"`` keeps its momentum buffers and starts a fresh history, as
    :meth:`ZenithFused.load_state_dict` does. Call it on every rank.
    """
    from torch.distributed.checkpoint import state_dict as torch_state_dict

    optimizer = _zenith_optimizer(optimizer)
    _check_options(options)
    state = dict(optim_state_dict)
    zenith = state.pop("zenith", None)
    if zenith is not None:
        _state.check_zenith_entry(zenith, optimizer.window_size, optimizer.warmup_steps)  # before anything changes
    _fill_momentum_state(optimizer)
    with _state.history_follows(optimizer) if zenith is not None else contextlib.nullcontext():
        torch_state_dict.set_optimizer_state_dict(model, optimizer, state, options=options)
    _state.load_history(optimizer.history, zenith)
