"""The step as ``torch.compile`` sees it: one opaque custom op around the same step plan.

Eager steps call :func:`zenith_fused._plan.run_step` directly. A traced step cannot look inside
it: the plan compares tensor identities and addresses, and its tables hold raw addresses, none of
which tracing can see. So the traced step is one custom op whose arguments declare what the step
reads and writes (the parameters, their gradients, the history, GradScaler's tensors), with the
mutated ones marked, and whose body runs the optimizer's own plan step: the same plan, tables and
engines as an eager step. ``torch.compile(opt.step, fullgraph=True)`` records one op with no graph
break; a float ``lr`` that a scheduler changes is read inside the op, so it is never a guard and
never a recompilation.

An optimizer is reached through a handle (an int, a constant of the graph) that maps to a weak
reference to its step function: this module owns no tensor and keeps no optimizer alive.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

_STEPS: dict[int, tuple[weakref.ref, Callable[..., None]]] = {}
_handles = itertools.count()


def register(step: Callable[..., None]) -> int:
    """A handle for the bound method ``step(params, grad_scale, found_inf)``; its object is held
    weakly, and the entry goes when the object does (``weakref.finalize``, safe at exit)."""
    handle = next(_handles)
    owner = step.__self__
    _STEPS[handle] = (weakref.ref(owner), step.__func__)
    weakref.finalize(owner, _STEPS.pop, handle, None)
    return handle


@torch.library.custom_op("zenith_fused::plan_step", mutates_args=("params", "history"))
def plan_step(
    handle: int,
    params: list[Tensor],
    grads: list[Tensor],
    history: list[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
) -> None:
    owner_ref, step = _STEPS.get(handle, (None, None))
    owner = None if owner_ref is None else owner_ref()
    if owner is None:
        raise RuntimeError(f"zenith_fused::plan_step: the optimizer of handle {handle} no longer exists")
    step(owner, params, grad_scale, found_inf)


@plan_step.register_fake
def _(handle, params, grads, history, grad_scale, found_inf) -> None:
    return None
