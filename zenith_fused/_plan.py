"""The step plan: everything ``step()`` derives from the parameter groups, built once and reused.

A plan holds, per (device, dtype) bucket, the parameters that have a gradient, their gradients,
momentum buffers and step counters (local shards under FSDP2), the backend that runs them, the
tensor table and hyper-parameter table the fused kernels read, and the slice of one buffer its
squared-norm partials go to. Building it validates everything (layouts, hyper-parameters, state),
so that a step that raises has changed nothing.

While it holds, a step costs one identity comparison per gradient and one address comparison per
parameter (:meth:`StepPlan.holds`), a comparison of each group's hyper-parameters, and three
launches per bucket. Gradients replaced by new tensors of the same sizes and layouts
(``zero_grad(set_to_none=True)`` then backward) are taken in place: their addresses are patched
into the tables. The plan is rebuilt when a gradient appears or disappears, when a parameter's
storage changes (``.to()``, ``.double()``, ``p.data = ...``), when a group is added or its
momentum switches on or off, when its ``lr`` switches between a float and a tensor or to another
tensor, and after ``load_state_dict``. A float ``lr`` that a scheduler rewrites costs one small
asynchronous copy per bucket.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from . import _table
from ._engines import resolve_backend
from .reference import GroupHyperparams, compute_dtype

_grad_of = operator.attrgetter("grad")
_is_sparse = operator.attrgetter("is_sparse")
_address_of = Tensor.data_ptr


@dataclass
class StepView:
    """The history values the update reads, on the bucket's device."""

    lr_scale: Tensor
    step: Tensor
    step_applied: Tensor
    grad_multiplier: Tensor

    @classmethod
    def of(cls, history, device: torch.device) -> "StepView":
        """``history``'s values on ``device``: the history's own tensors there, else copies (only
        for optimizers whose parameters span devices; a copy to the CPU is a blocking one, since
        the CPU kernels read it at once)."""
        values = (history.lr_scale, history.step, history.step_applied, history.grad_multiplier)
        if device == history.device:
            return cls(*values)
        return cls(*(t.to(device, non_blocking=device.type == "cuda") for t in values))


@dataclass
class BucketPlan:
    """The tensors of one (device, dtype) that have a gradient, and what their backend reads."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    engine: Any
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    momentum_buffers: list[Tensor | None] = field(default_factory=list)
    momentum_steps: list[Tensor | None] = field(default_factory=list)
    hyperparam_slots: list[int] = field(default_factory=list)  # per tensor: its row
    owners: list[Tensor] = field(default_factory=list)  # per tensor: the optimizer's parameter
    flat_indices: list[int] = field(default_factory=list)  # per tensor: its index in all_params
    params_contiguous: bool = True
    has_complex: bool = False
    group_indices: list[int] = field(default_factory=list)  # per row: its parameter group
    # Filled by StepPlan._prepare:
    group_hyperparams: list[GroupHyperparams] = field(default_factory=list)  # per row (reference)
    table: _table.TensorTable | None = None
    hyperparams: Tensor | None = None  # compute-dtype [rows, 6] (fused backends)
    lr_ptrs: Tensor | None = None
    lr_copies: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (table cell, tensor lr) per step
    partials: Tensor | None = None  # where sq_norm_partials writes (on this device)
    partials_destination: Tensor | None = None  # the slice of the history device's buffer, if elsewhere

    @property
    def hyperparams_per_tensor(self) -> list[GroupHyperparams]:
        return [self.group_hyperparams[s] for s in self.hyperparam_slots]

    @property
    def num_partials(self) -> int:
        return self.table.num_chunks if self.table is not None else len(self.params)


def kernel_view(t: Tensor | None) -> Tensor | None:
    """What the kernels update for ``t``: a complex tensor as its real view (``torch.optim.SGD``'s
    rule: the same momentum update per real component; the norm then counts ``|g|^2``)."""
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def bucket_backend(optimizer: Any, param: Tensor, grad: Tensor) -> str:
    """The backend that runs this tensor: its (device, dtype)'s, except that under ``"auto"`` a
    layout the fused kernels cannot walk (a non-dense view) goes through the reference."""
    backend = optimizer._backend_for(param.device, param.dtype)
    if backend != "reference" and not fusable_layout(param, grad):
        if optimizer.backend == "auto":
            return "reference"
        check_layout(param, grad)
    return backend


def kernel_entries(optimizer: Any, groups: list[dict], buckets: dict) -> Any:
    """Every parameter with a gradient, in group order, as the kernels see it: yields
    ``(group index, index among all parameters, parameter, its local shard, the tensor the
    kernels update, its gradient, its bucket)``, creating the bucket in ``buckets`` (keyed by
    device, dtype and backend) on first sight. Checks layouts for the fused backends on the way."""
    sharding = optimizer._sharding_plan()
    local = sharding is not None and sharding.has_dtensors
    flat = -1
    for gi, group in enumerate(groups):
        for p in group["params"]:
            flat += 1
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ZenithFused does not support sparse gradients")
            shard, grad = sharding.local_param_and_grad(p) if local else (p, p.grad)
            param, grad = kernel_view(shard), kernel_view(grad)
            backend = bucket_backend(optimizer, param, grad)
            key = (param.device, param.dtype, backend)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = BucketPlan(param.device, param.dtype, backend, optimizer._engine(backend))
            yield gi, flat, p, shard, param, grad, bucket


def check_hyperparams(group: dict[str, Any], *, check_tensor_values: bool = False) -> None:
    """torch.optim.SGD's checks. A tensor lr's value is checked only when asked (when a group is
    added), never at step time, where reading it would make the host wait for the device."""
    lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor; got {lr.dtype}")
        if check_tensor_values and not lr.item() >= 0.0:  # sync-ok: add_param_group, not a step
            raise ValueError(f"Invalid learning rate: {lr}")
    elif not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not momentum >= 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if group["nesterov"] and (momentum <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def group_hyperparams(group: dict[str, Any]) -> GroupHyperparams:
    lr = group["lr"]
    return GroupHyperparams(
        lr=lr if isinstance(lr, Tensor) else float(lr),
        momentum=float(group["momentum"]),
        dampening=float(group["dampening"]),
        weight_decay=float(group["weight_decay"]),
        nesterov=bool(group["nesterov"]),
        maximize=bool(group["maximize"]),
    )


def hyperparam_row(hp: GroupHyperparams) -> tuple[float, ...]:
    """One row of the fused kernels' hyper-parameter table (``_table`` columns). A tensor lr is a
    0 here: the kernels read it through ``lr_ptrs``."""
    return (
        0.0 if isinstance(hp.lr, Tensor) else hp.lr,
        hp.momentum, 1.0 - hp.dampening, hp.weight_decay, float(hp.nesterov), float(hp.maximize),
    )


def _structure(key: tuple) -> tuple:
    """What a plan is built for, per group, apart from the values of a float lr and the rest: a
    tensor lr (its identity) and whether momentum is on. A change means a rebuild."""
    lr = key[0]
    return (lr if isinstance(lr, Tensor) else None, key[1] != 0)


def _hyperparam_key(group: dict[str, Any]) -> tuple:
    return (group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
            group["maximize"])


def _same_key(a: tuple, b: tuple) -> bool:
    """Equal hyper-parameters; a tensor lr compares by identity (its value is the device's)."""
    if a[0] is not b[0] and (isinstance(a[0], Tensor) or isinstance(b[0], Tensor) or a[0] != b[0]):
        return False
    return a[1:] == b[1:]


class StepPlan:
    """What every step of one optimizer needs, for one set of tensors; see the module docstring."""

    def __init__(self, optimizer: Any, history_device: torch.device) -> None:
        groups = optimizer.param_groups
        sharding = optimizer._sharding_plan()
        local = sharding is not None and sharding.has_dtensors
        self.groups = [(g, g["params"], len(g["params"])) for g in groups]
        self.all_params = [p for g in groups for p in g["params"]]
        self.grads = list(map(_grad_of, self.all_params))
        # Validate everything before creating any state.
        for group in groups:
            check_hyperparams(group)
        self.keys = [_hyperparam_key(g) for g in groups]

        buckets: dict[tuple[torch.device, torch.dtype, str], BucketPlan] = {}
        slot_of: dict[tuple[tuple[torch.device, torch.dtype, str], int], int] = {}
        storage = []
        self.local = local
        self.sharding = sharding
        self.absent = [i for i, g in enumerate(self.grads) if g is None]  # parameters without one
        for gi, flat, p, shard, param, grad, bucket in kernel_entries(optimizer, groups, buckets):
            key = (bucket.device, bucket.dtype, bucket.backend)
            if (key, gi) not in slot_of:
                slot_of[(key, gi)] = len(bucket.group_indices)
                bucket.group_indices.append(gi)
            bucket.params.append(param)
            bucket.grads.append(grad)
            bucket.hyperparam_slots.append(slot_of[(key, gi)])
            bucket.momentum_buffers.append(None)
            bucket.momentum_steps.append(None)
            bucket.owners.append(p)
            bucket.flat_indices.append(flat)
            bucket.params_contiguous = bucket.params_contiguous and param.is_contiguous()
            bucket.has_complex = bucket.has_complex or p.is_complex()
            storage.append(shard)
        # Every check has passed: create or convert the momentum state now.
        self._fill_momentum_state(optimizer, buckets, local, sharding)
        self.storage = storage
        self.addresses = list(map(_address_of, storage))
        self.buckets = list(buckets.values())
        self.history_device = _history_device(self.buckets, history_device)
        for bucket in self.buckets:
            self._prepare(bucket, groups)
        self._place_partials()
        history_buckets = [b for b in self.buckets if b.device == self.history_device and b.backend != "reference"]
        history_buckets = history_buckets or [b for b in self.buckets if b.device == self.history_device]
        if history_buckets:
            self.history_engine = history_buckets[0].engine
        else:
            self.history_engine = optimizer._engine(resolve_backend("auto", self.history_device))

    # ------------------------------------------------------------------ building
    def _fill_momentum_state(self, optimizer, buckets, local, sharding) -> None:
        groups = optimizer.param_groups
        for bucket in buckets.values():
            for i, p in enumerate(bucket.owners):
                if groups[bucket.group_indices[bucket.hyperparam_slots[i]]]["momentum"] == 0:
                    continue
                buf, buf_step = optimizer._momentum_state(p)
                bucket.momentum_buffers[i] = kernel_view(sharding.local(buf) if local else buf)
                bucket.momentum_steps[i] = buf_step

    def _prepare(self, bucket: BucketPlan, groups: list[dict]) -> None:
        bucket.group_hyperparams = [group_hyperparams(groups[gi]) for gi in bucket.group_indices]
        if not getattr(bucket.engine, "uses_table", False):
            return
        bucket.table = _table.build_tensor_table(
            bucket.params, bucket.grads, bucket.momentum_buffers, bucket.momentum_steps, bucket.hyperparam_slots,
            chunk_size=bucket.engine.chunk_size(bucket.device),
            placeholder_step=torch.zeros((), dtype=torch.int64, device=bucket.device),
        )
        self._write_hyperparams(bucket, rebuild=True)

    def _write_hyperparams(self, bucket: BucketPlan, *, rebuild: bool = False) -> None:
        rows = [hyperparam_row(hp) for hp in bucket.group_hyperparams]
        dtype = compute_dtype(bucket.dtype)
        if rebuild:
            # A tensor lr the kernels can read as it is (the compute dtype, on the bucket's
            # device) is read through its address: no host work at any step. Another one is
            # copied into the table's lr cell at every step.
            readable = {
                slot: hp.lr.data_ptr() for slot, hp in enumerate(bucket.group_hyperparams)
                if isinstance(hp.lr, Tensor) and hp.lr.dtype == dtype and hp.lr.device == bucket.device
            }
            bucket.hyperparams, bucket.lr_ptrs = _table.hyperparam_table(rows, dtype, bucket.device, readable)
            bucket.lr_copies = [
                (bucket.hyperparams[slot, _table.LR], hp.lr) for slot, hp in enumerate(bucket.group_hyperparams)
                if isinstance(hp.lr, Tensor) and slot not in readable
            ]
        elif bucket.device.type == "cpu":
            bucket.hyperparams.copy_(torch.tensor(rows, dtype=dtype))
        else:
            # One small asynchronous copy; the pinned staging block is kept until it has run.
            bucket.hyperparams.copy_(torch.tensor(rows, dtype=dtype).pin_memory(), non_blocking=True)

    def _place_partials(self) -> None:
        """One float32 buffer on the history's device holds every bucket's partials, in bucket
        order; a bucket on another device writes its own and copies it into its slice."""
        total = sum(b.num_partials for b in self.buckets)
        # A step with no local gradient (a rank under FSDP) still folds a norm: a zero one.
        self.partials = torch.zeros(max(total, 1), dtype=torch.float32, device=self.history_device)
        offset = 0
        for b in self.buckets:
            n = b.num_partials
            destination = self.partials[offset: offset + n]
            offset += n
            if b.device == self.history_device:
                b.partials = destination
            else:
                b.partials = torch.empty(n, dtype=torch.float32, device=b.device)
                b.partials_destination = destination

    def bind_history(self, history) -> None:
        """The history this plan's steps fold into (on ``history_device``)."""
        self.history_tensors = history.kernel_tensors()
        # With every bucket on the history's device the views never change: made once.
        self.views = None
        if all(b.device == self.history_device for b in self.buckets):
            self.views = {self.history_device: StepView.of(history, self.history_device)}

    # ------------------------------------------------------------------ every step
    def holds(self, optimizer: Any) -> bool:
        """Whether this plan still describes the optimizer's tensors: one identity comparison per
        gradient, one address comparison per parameter, a length check per group. Gradients that
        are new tensors of the same sizes and layouts (``zero_grad(set_to_none=True)`` then
        backward) are taken in place: the tables get their new addresses, nothing is rebuilt."""
        groups = optimizer.param_groups
        if len(groups) != len(self.groups):
            return False
        for group, (cached, params, n) in zip(groups, self.groups):
            if group is not cached or group["params"] is not params or len(params) != n:
                return False
        if list(map(_address_of, self.storage)) != self.addresses:
            return False
        grads = list(map(_grad_of, self.all_params))
        if all(map(operator.is_, grads, self.grads)):
            return True
        return self._take_new_grads(grads)

    def _take_new_grads(self, grads: list) -> bool:
        """Swap in replaced gradients; False (rebuild) when any appeared, disappeared, or cannot be
        walked like the old one. Per bucket, C-level passes: gather, None test, strides test."""
        if self.absent:
            if [i for i, g in enumerate(grads) if g is None] != self.absent:
                return False
        elif any(map(operator.is_, grads, repeat(None))):
            return False
        for bucket in self.buckets:
            new = [grads[i] for i in bucket.flat_indices]
            if any(map(_is_sparse, new)):
                return False
            if self.local:
                # DTensor gradients (FSDP2 makes new ones at every step): their local shards, after
                # the same placement check a rebuild makes.
                new = [self.sharding.local_param_and_grad(self.all_params[i])[1] for i in bucket.flat_indices]
            if bucket.has_complex:
                new = [kernel_view(g) for g in new]
            # Contiguous parameters take contiguous gradients (the common case, one cheap call
            # each); otherwise the fused kernels need the parameter's own strides.
            if bucket.backend != "reference" and not (
                bucket.params_contiguous and all(map(Tensor.is_contiguous, new))
            ) and not all(map(fusable_layout, bucket.params, new)):
                return False
            bucket.grads = new
            if bucket.table is not None:
                bucket.table.set_grads(new)
        self.grads = grads
        return True

    def refresh_hyperparams(self, groups: list[dict]) -> bool:
        """Bring the hyper-parameter tables up to date; False when the plan must be rebuilt.

        Costs a comparison per group while nothing changed."""
        changed = None
        for gi, group in enumerate(groups):
            key = _hyperparam_key(group)
            if _same_key(key, self.keys[gi]):
                continue
            check_hyperparams(group)
            now, then = _structure(key), _structure(self.keys[gi])
            if now[0] is not then[0] or now[1] != then[1]:
                return False
            self.keys[gi] = key
            changed = set() if changed is None else changed
            changed.add(gi)
        if changed:
            for bucket in self.buckets:
                if changed.intersection(bucket.group_indices):
                    bucket.group_hyperparams = [group_hyperparams(groups[gi]) for gi in bucket.group_indices]
                    if bucket.hyperparams is not None:
                        self._write_hyperparams(bucket)
        return True

    def views_on_devices(self, history) -> dict[torch.device, StepView]:
        """The views of every bucket's device, made at each step when the buckets span devices."""
        return {device: StepView.of(history, device) for device in {b.device for b in self.buckets}}


def _history_device(buckets: list[BucketPlan], current: torch.device) -> torch.device:
    """Where the history lives: with the gradients it summarizes, on a CUDA device when any bucket
    is on one (so that no device value is ever read on the host), and where it is when that fits."""
    devices = [b.device for b in buckets]
    if not devices:
        return current
    accelerators = [d for d in devices if d.type != "cpu"]
    if current in devices and (current.type != "cpu" or not accelerators):
        return current
    return (accelerators or devices)[0]


def is_dense(t: Tensor) -> bool:
    """True when the elements fill ``t``'s storage span without gaps or overlap, in any order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def fusable_layout(p: Tensor, g: Tensor) -> bool:
    """The fused kernels walk storage linearly: parameter and gradient must share one dense layout."""
    if p.is_contiguous() and g.is_contiguous():  # the common case
        return True
    return p.numel() <= 1 or (g.stride() == p.stride() and is_dense(p))


def check_layout(p: Tensor, g: Tensor) -> None:
    if not fusable_layout(p, g):
        raise RuntimeError(
            f"ZenithFused's fused kernels need each parameter dense (contiguous or channels-last) "
            f"with a gradient of the same strides; got a parameter of shape {tuple(p.shape)}, "
            f"strides {p.stride()}, gradient strides {g.stride()}. Make the parameter "
            f"contiguous, or use backend='reference'"
        )
