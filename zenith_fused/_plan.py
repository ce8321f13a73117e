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

One plan serves every way a step runs: :func:`run_step` is the step, called directly by an eager
``step()`` and, under ``torch.compile``, from inside the one custom op of
:mod:`zenith_fused._traced`. After a warm-up step with static gradients (the CUDA-graph recipe) a
step makes only the kernel calls: no allocation, no host-to-device copy, no synchronization.

The plan never keeps a gradient alive: it holds weak references to the gradients it was built or
patched for, and its buckets drop theirs when a step ends. ``zero_grad(set_to_none=True)`` frees
the gradients, as it does under ``torch.optim.SGD``.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from . import _table
from ._engines import ENGINES, BackendTable, auto_backend
from .layout import LR
from .reference import GroupHyperparams, StepInputs, compute_dtype

_grad_of = operator.attrgetter("grad")
_is_sparse = operator.attrgetter("is_sparse")
_address_of = Tensor.data_ptr


def _no_grad() -> None:
    """The weak reference of an absent gradient."""
    return None


def _weak(t: Tensor | None):
    return _no_grad if t is None else weakref.ref(t)


def _weak_refs(grads: list, absent: list[int]) -> list:
    """Weak references to ``grads`` (``_no_grad`` for an absent one); one C-level pass when none is."""
    return list(map(weakref.ref, grads)) if not absent else list(map(_weak, grads))


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
    # Filled for the length of a step only (the plan keeps no gradient alive between steps).
    grads: list[Tensor] | None = field(default_factory=list)
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


def bucket_backend(backends: BackendTable, param: Tensor, grad: Tensor) -> str:
    """The backend that runs this tensor: its (device, dtype)'s, except that under ``"auto"`` a
    layout the fused kernels cannot walk (a non-dense view) goes through the reference."""
    backend = backends.for_tensors(param.device, param.dtype)
    if ENGINES[backend].dense_only and not fusable_layout(param, grad):
        if backends.layout_fallback():
            return "reference"
        check_layout(param, grad)
    return backend


def kernel_entries(groups: list[dict], backends: BackendTable, sharding: Any, buckets: dict) -> Any:
    """Every parameter with a gradient, in group order, as the kernels see it: yields
    ``(group index, index among all parameters, parameter, its local shard, the tensor the
    kernels update, its gradient, its bucket)``, creating the bucket in ``buckets`` (keyed by
    device, dtype and backend) on first sight. Checks layouts for the fused backends on the way."""
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
            backend = bucket_backend(backends, param, grad)
            key = (param.device, param.dtype, backend)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = BucketPlan(param.device, param.dtype, backend, backends.engine(backend))
            yield gi, flat, p, shard, param, grad, bucket


def momentum_state(state: dict, p: Tensor, sharding: Any = None) -> tuple[Tensor, Tensor]:
    """``p``'s momentum buffer and step counter in ``state`` (the optimizer's ``state[p]``),
    created ("never filled") at its first step and converted whenever ``p``'s dtype, device or
    layout has changed since: state follows its parameter, as in torch.optim.SGD."""
    buf = state.get("momentum_buffer")
    buf_step = state.get("momentum_step")
    if buf is None:
        state["momentum_buffer"] = buf = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["momentum_step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        return buf, state["momentum_step"]
    if sharding is not None and sharding.has_dtensors:
        sharding.check_momentum_buffer(p, buf)
    if buf.dtype != p.dtype or buf.device != p.device or buf.shape != p.shape or (
        buf.stride() != p.stride() and is_dense(p)
    ):
        # The fused kernels index parameter and buffer alike, in the parameter's dtype.
        state["momentum_buffer"] = buf = torch.empty_like(p).copy_(buf)
    if buf_step is None:
        # A buffer from elsewhere (torch.optim.SGD): filled before this history began.
        buf_step = torch.full((), -1, dtype=torch.int64, device=p.device)
    elif buf_step.device != p.device or buf_step.dtype != torch.int64:
        buf_step = buf_step.to(p.device, torch.int64)
    state["momentum_step"] = buf_step
    return buf, buf_step


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
    """What every step of one optimizer needs, for one set of tensors; see the module docstring.

    ``groups`` and ``state`` are the optimizer's ``param_groups`` and ``state``; ``backends`` its
    backend table; ``sharding`` its :class:`~zenith_fused._distributed.ShardingPlan` (or None);
    ``history_device`` where its history is now (the plan may choose another: ``history_device``).
    """

    def __init__(self, groups: list[dict], state: Any, backends: BackendTable, sharding: Any,
                 history_device: torch.device) -> None:
        local = sharding is not None and sharding.has_dtensors
        self.groups = [(g, g["params"], len(g["params"])) for g in groups]
        self.all_params = [p for g in groups for p in g["params"]]
        grads = list(map(_grad_of, self.all_params))
        # Validate everything before creating any state.
        for group in groups:
            check_hyperparams(group)
        self.keys = [_hyperparam_key(g) for g in groups]

        buckets: dict[tuple[torch.device, torch.dtype, str], BucketPlan] = {}
        slot_of: dict[tuple[tuple[torch.device, torch.dtype, str], int], int] = {}
        storage = []
        self.local = local
        self.sharding = sharding
        self.absent = [i for i, g in enumerate(grads) if g is None]  # parameters without one
        for gi, flat, p, shard, param, grad, bucket in kernel_entries(groups, backends, sharding, buckets):
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
        self._fill_momentum_state(groups, state, buckets, local, sharding)
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
            # A rank without local gradients: "auto"'s fused choice for its device, no warning.
            self.history_engine = backends.engine(auto_backend(self.history_device)[0])
        self.grad_refs = _weak_refs(grads, self.absent)
        # Buckets whose engine reads the gradients themselves, not the tables' addresses.
        self.untabled = [b for b in self.buckets if b.table is None]

    # ------------------------------------------------------------------ building
    def _fill_momentum_state(self, groups, state, buckets, local, sharding) -> None:
        for bucket in buckets.values():
            for i, p in enumerate(bucket.owners):
                if groups[bucket.group_indices[bucket.hyperparam_slots[i]]]["momentum"] == 0:
                    continue
                buf, buf_step = momentum_state(state[p], p, sharding)
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
                (bucket.hyperparams[slot, LR], hp.lr) for slot, hp in enumerate(bucket.group_hyperparams)
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
    def holds(self, groups: list[dict]) -> bool:
        """Whether this plan still describes the optimizer's tensors: one identity comparison per
        gradient, one address comparison per parameter, a length check per group. Gradients that
        are new tensors of the same sizes and layouts (``zero_grad(set_to_none=True)`` then
        backward) are taken in place: the tables get their new addresses, nothing is rebuilt."""
        if len(groups) != len(self.groups):
            return False
        for group, (cached, params, n) in zip(groups, self.groups):
            if group is not cached or group["params"] is not params or len(params) != n:
                return False
        if list(map(_address_of, self.storage)) != self.addresses:
            return False
        grads = list(map(_grad_of, self.all_params))
        # A gradient that died since (its weak reference now gives None) and is absent now looks
        # the same as one absent all along: the count of absent ones tells them apart.
        if all(map(operator.is_, grads, [ref() for ref in self.grad_refs])) and sum(
            map(operator.is_, grads, repeat(None))
        ) == len(self.absent):
            for bucket in self.untabled:
                bucket.grads = self._bucket_grads(bucket, grads)
            return True
        return self._take_new_grads(grads)

    def _bucket_grads(self, bucket: BucketPlan, grads: list) -> list[Tensor]:
        """The tensors ``bucket``'s kernels read as its gradients."""
        new = [grads[i] for i in bucket.flat_indices]
        if self.local:
            # DTensor gradients (FSDP2 makes new ones at every step): their local shards, after
            # the same placement check a rebuild makes.
            new = [self.sharding.local_param_and_grad(self.all_params[i])[1] for i in bucket.flat_indices]
        if bucket.has_complex:
            new = [kernel_view(g) for g in new]
        return new

    def _take_new_grads(self, grads: list) -> bool:
        """Swap in replaced gradients; False (rebuild) when any appeared, disappeared, or cannot be
        walked like the old one. Per bucket, C-level passes: gather, None test, strides test."""
        if self.absent:
            if [i for i, g in enumerate(grads) if g is None] != self.absent:
                return False
        elif any(map(operator.is_, grads, repeat(None))):
            return False
        present = [g for g in grads if g is not None] if self.absent else grads
        if any(map(_is_sparse, present)):
            return False
        replaced = []
        for bucket in self.buckets:
            new = self._bucket_grads(bucket, grads)
            # Contiguous parameters take contiguous gradients (the common case, one cheap call
            # each); otherwise the fused kernels need the parameter's own strides.
            if ENGINES[bucket.backend].dense_only and not (
                bucket.params_contiguous and all(map(Tensor.is_contiguous, new))
            ) and not all(map(fusable_layout, bucket.params, new)):
                return False
            replaced.append((bucket, new))
        for bucket, new in replaced:
            bucket.grads = new
            if bucket.table is not None:
                bucket.table.set_grads(new)
        self.grad_refs = _weak_refs(grads, self.absent)
        return True

    def release_grads(self) -> None:
        """Drop the buckets' gradients at the end of a step (weak references stay)."""
        for bucket in self.buckets:
            bucket.grads = None

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


def run_step(plan: StepPlan, history: Any, inputs: StepInputs, sharding: Any, groups: list[dict]) -> None:
    """One ZENITH step over a plan that holds: three engine calls per bucket. The eager step and
    the traced step's custom op both run exactly this."""
    try:
        for bucket in plan.buckets:
            bucket.engine.sq_norm_partials(bucket)
            if bucket.partials_destination is not None:
                bucket.partials_destination.copy_(bucket.partials, non_blocking=True)
        sq_norm_partials = plan.partials
        if sharding is not None:
            # Sum the shards' squares across ranks, on the device, before the history sees them.
            sq_norm_partials = sharding.reduce_sq_norm(sq_norm_partials, groups, plan.history_device)
        plan.history_engine.update_history(sq_norm_partials, plan.history_tensors, inputs)

        views = plan.views
        if views is None:
            views = plan.views_on_devices(history)
        for bucket in plan.buckets:
            for cell, lr in bucket.lr_copies:
                cell.copy_(lr.reshape(()), non_blocking=True)
            bucket.engine.momentum_update(bucket, views[bucket.device])
    finally:
        plan.release_grads()


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
