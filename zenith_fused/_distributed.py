"""ZENITH under data parallelism: the global norm of sharded gradients, and DCP checkpoints.

ZENITH's history needs ``n_t``, the norm of the whole gradient. Under DDP every rank holds the
whole (all-reduced) gradient, so the local norm is already ``n_t`` and nothing here runs. Under
FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a DTensor and each rank holds one
shard of its gradient: the kernels run on the local shards (``to_local()``), and the squared norm
of those shards is summed with ``dist.all_reduce`` over the mesh dimensions the parameter is
*sharded* on (a replicated dimension holds copies, which must not be counted twice). The sum stays
on the device; the host never reads it. A non-finite shard on one rank makes the sum non-finite on
every rank, so every rank skips that step.

The checkpoint helpers for ``torch.distributed.checkpoint`` are in :mod:`zenith_fused._checkpoint`.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import reference

__all__ = ["ShardingPlan", "check_process_group", "sharding_plan"]


def _dtensor_class():
    """DTensor, or None when ``torch.distributed.tensor`` was never imported: then no parameter
    can be a DTensor, and a single-process user pays no import."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def check_process_group(process_group: Any) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            "process_group was given but torch.distributed is not available in this build of torch"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup or None; got {type(process_group).__name__}"
        )


def _reduction_groups(p: Tensor) -> tuple:
    """The process groups over which a DTensor parameter's local squared norm is summed: one per
    mesh dimension it is sharded on (of size > 1). Replicated dimensions hold copies: none."""
    mesh = p.device_mesh
    groups = []
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(
                f"ZenithFused cannot optimize a DTensor parameter with placements {tuple(p.placements)}: "
                "a Partial parameter has no value of its own; redistribute it to Shard or Replicate"
            )
        if placement.is_shard() and mesh.size(dim) > 1:
            groups.append(mesh.get_group(dim))
    return tuple(groups)


@dataclass(frozen=True)
class ShardingPlan:
    """How the local squared norms of an optimizer's parameters become the global one.

    Built once per set of parameter groups; it exists only when some parameter is a DTensor or a
    ``process_group`` was given (single-process optimizers have none and skip all of this).
    """

    dtensor: type | None  # the DTensor class when some parameter is one: run on local shards
    # parameter -> the process groups its squared norm is summed over (() = none)
    groups_of: dict = dataclasses.field(repr=False)
    reductions: tuple  # the distinct non-empty group tuples, in parameter order (same on every rank)
    shared: tuple | None  # the groups of every parameter when all share them, else None

    @property
    def has_dtensors(self) -> bool:
        return self.dtensor is not None

    @property
    def communicates(self) -> bool:
        """Whether ``step()`` runs a collective: then every rank must take part in every step,
        even one without local gradients."""
        return bool(self.reductions)

    def local(self, t: Tensor | None) -> Tensor | None:
        """The rank's own shard of ``t`` (``t`` itself when it is no DTensor)."""
        return t.to_local() if self.dtensor is not None and isinstance(t, self.dtensor) else t

    def local_param_and_grad(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """The local shards the kernels update, after checking that they line up."""
        g = p.grad
        if not isinstance(p, self.dtensor):
            return p, g
        if not isinstance(g, self.dtensor) or g.placements != p.placements or g.device_mesh != p.device_mesh:
            got = (f"a DTensor with placements {tuple(g.placements)} on {g.device_mesh}"
                   if isinstance(g, self.dtensor) else f"a {type(g).__name__}")
            raise RuntimeError(
                f"ZenithFused needs the gradient of a DTensor parameter (shape {tuple(p.shape)}, "
                f"placements {tuple(p.placements)} on {p.device_mesh}) to be a DTensor with the same "
                f"mesh and placements; got {got}"
            )
        return p.to_local(), g.to_local()

    def check_momentum_buffer(self, p: Tensor, buf: Tensor) -> None:
        """A loaded buffer must be sharded as its parameter, or the kernels would mix shards."""
        p_sharded, buf_sharded = isinstance(p, self.dtensor), isinstance(buf, self.dtensor)
        if p_sharded == buf_sharded and (
            not p_sharded or (buf.placements == p.placements and buf.device_mesh == p.device_mesh)
        ):
            return
        raise RuntimeError(
            f"ZenithFused: the momentum buffer of a parameter of shape {tuple(p.shape)} is "
            f"{_describe(buf)} but the parameter is {_describe(p)}; under FSDP2 load optimizer state "
            "with zenith_fused.set_optimizer_state_dict, which reshards it"
        )

    def reduce_sq_norm(self, local_sq_norm_partials: Tensor, param_groups: list[dict], device: torch.device) -> Tensor:
        """What the history folds in place of this rank's partials: ``n_t ** 2`` summed over the
        ranks that hold other shards (the partials themselves when nothing is sharded)."""
        if self.shared is None:
            return self.global_sq_norm_by_groups(param_groups, device)
        if self.shared:
            return self.global_sq_norm(local_sq_norm_partials)
        return local_sq_norm_partials

    def global_sq_norm(self, local_sq_norm_partials: Tensor) -> Tensor:
        """``n_t ** 2`` from this rank's partials, when every parameter shares its groups."""
        import torch.distributed as dist

        # Summed in float64, so that splitting the norm across ranks adds no float32 rounding.
        total = local_sq_norm_partials.sum(dtype=torch.float64).reshape(1)
        for group in self.shared:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total.to(torch.float32)

    def global_sq_norm_by_groups(self, param_groups: list[dict], device: torch.device) -> Tensor:
        """``n_t ** 2`` when parameters differ in their groups (say DTensors next to plain
        tensors, or tensor parallel next to FSDP): one sum and one reduction per kind, from
        :func:`reference.squared_norm_partials` since the fused partials mix the kinds."""
        import torch.distributed as dist

        grads: dict[tuple, list[Tensor]] = {}
        for group in param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads.setdefault(self.groups_of[p], []).append(self.local(p.grad))
        total = torch.zeros(1, dtype=torch.float64, device=device)
        # Every rank reduces every kind in the same order, with or without local gradients of it.
        for groups in ((),) + self.reductions:
            partials = reference.squared_norm_partials(grads.get(groups, []))
            part = partials.to(device).sum(dtype=torch.float64).reshape(1)
            for group in groups:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            total += part
        return total.to(torch.float32)


def _describe(t: Tensor) -> str:
    placements = getattr(t, "placements", None)
    return "a plain tensor" if placements is None else f"a DTensor with placements {tuple(placements)}"


def sharding_plan(param_groups: list[dict], process_group: Any) -> ShardingPlan | None:
    """None for a single-process optimizer (no DTensor parameter, no ``process_group``)."""
    params = [p for group in param_groups for p in group["params"]]
    dtensor = _dtensor_class()
    if dtensor is not None and not any(isinstance(p, dtensor) for p in params):
        dtensor = None
    if dtensor is None and process_group is None:
        return None
    plain = () if process_group is None else (process_group,)
    groups_of = {
        p: _reduction_groups(p) if dtensor is not None and isinstance(p, dtensor) else plain for p in params
    }
    reductions = tuple(dict.fromkeys(g for g in groups_of.values() if g))
    kinds = set(groups_of.values())
    shared = next(iter(kinds)) if len(kinds) == 1 else None
    return ShardingPlan(dtensor=dtensor, groups_of=groups_of, reductions=reductions, shared=shared)
