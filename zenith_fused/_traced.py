"""The fused backends as torch custom ops, for ``torch.compile`` only.

Eager steps run the plan's tables straight through the engines (:mod:`zenith_fused._plan`). A
traced step cannot: the tables hold raw addresses, which tracing cannot see. Here each engine call
is an opaque custom op whose arguments are the tensors themselves, with the mutated ones declared,
so that ``torch.compile(opt.step, fullgraph=True)`` records three ops per bucket with no graph
break, and a changing scale is data, never a recompilation. Inside, an op finds (or builds, when
a tensor moved) the bucket's tables and calls the same engine method an eager step calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _table
from ._engines import make_engine
from ._plan import BucketPlan, StepView
from .reference import StepInputs

_ENGINES: dict[str, object] = {}
_BUCKETS: dict[tuple, BucketPlan] = {}


def _engine(backend: str):
    engine = _ENGINES.get(backend)
    if engine is None:
        engine = _ENGINES[backend] = make_engine(backend)
    return engine


def _aligned(n: int, buffered: list[int], values: list[Tensor]) -> list[Optional[Tensor]]:
    out: list[Optional[Tensor]] = [None] * n
    for i, v in zip(buffered, values):
        out[i] = v
    return out


def _bucket(backend, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots) -> BucketPlan:
    """The bucket with its tensor table, rebuilt only when one of its tensors moved."""
    key = (
        backend,
        tuple(t.data_ptr() for t in params),
        tuple(t.data_ptr() for t in grads),
        tuple(buffered),
        tuple(t.data_ptr() for t in momentum_buffers),
        tuple(t.data_ptr() for t in momentum_steps),
        tuple(hyperparam_slots),
    )
    bucket = _BUCKETS.get(key)
    if bucket is None:
        engine = _engine(backend)
        n = len(params)
        device, dtype = params[0].device, params[0].dtype
        bucket = BucketPlan(device, dtype, backend, engine, list(params), list(grads),
                            _aligned(n, buffered, momentum_buffers), _aligned(n, buffered, momentum_steps),
                            list(hyperparam_slots))
        bucket.table = _table.build_tensor_table(
            bucket.params, bucket.grads, bucket.momentum_buffers, bucket.momentum_steps, bucket.hyperparam_slots,
            chunk_size=engine.chunk_size(device), placeholder_step=torch.zeros((), dtype=torch.int64, device=device),
        )
        if len(_BUCKETS) > 64:  # tensors that moved leave stale entries behind
            _BUCKETS.clear()
        _BUCKETS[key] = bucket
    return bucket


def _lr_ptrs(hyperparams: Tensor) -> Tensor:
    """Every group's lr read from the table's own lr column (a traced step writes tensor lrs in)."""
    host = torch.tensor(_table.lr_cell_addresses(hyperparams), dtype=torch.int64)
    return _table.upload(host, hyperparams.device)


@torch.library.custom_op("zenith_fused::traced_sq_norm_partials", mutates_args=())
def sq_norm_partials(
    backend: str,
    params: list[Tensor],
    grads: list[Tensor],
    buffered: list[int],
    momentum_buffers: list[Tensor],
    momentum_steps: list[Tensor],
    hyperparam_slots: list[int],
) -> Tensor:
    bucket = _bucket(backend, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots)
    bucket.partials = torch.empty(bucket.table.num_chunks, dtype=torch.float32, device=bucket.device)
    bucket.engine.sq_norm_partials(bucket)
    return bucket.partials


@sq_norm_partials.register_fake
def _(backend, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots):
    chunk_size = _engine(backend).chunk_size(params[0].device)
    return params[0].new_empty(_table.num_chunks([p.numel() for p in params], chunk_size), dtype=torch.float32)


@torch.library.custom_op("zenith_fused::traced_update_history", mutates_args=("history",))
def update_history(
    backend: str,
    sq_norm_partials: Tensor,
    history: list[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    max_grad_norm: Optional[float],
) -> None:
    _engine(backend).update_history(sq_norm_partials, history, StepInputs(grad_scale, found_inf, max_grad_norm))


@update_history.register_fake
def _(*args) -> None:
    return None


@torch.library.custom_op(
    "zenith_fused::traced_momentum_update", mutates_args=("params", "momentum_buffers", "momentum_steps")
)
def momentum_update(
    backend: str,
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
) -> None:
    bucket = _bucket(backend, params, grads, buffered, momentum_buffers, momentum_steps, hyperparam_slots)
    bucket.hyperparams = hyperparams.contiguous()
    bucket.lr_ptrs = _lr_ptrs(bucket.hyperparams)
    bucket.engine.momentum_update(bucket, StepView(lr_scale, step, step_applied, grad_multiplier))


@momentum_update.register_fake
def _(*args) -> None:
    return None

