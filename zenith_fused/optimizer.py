"""``ZenithFused``: the torch.optim.Optimizer users construct."""
from __future__ import annotations

import math
import types
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _distributed, _table, _traced, reference
from ._engines import BACKENDS, make_engine, resolve_backend
from ._plan import (
    BucketPlan, StepPlan, StepView, check_hyperparams, group_hyperparams, hyperparam_row, is_dense, kernel_entries,
    kernel_view,
)
from ._state import SAVED_HISTORY_FIELDS, STATE_VERSION, check_zenith_entry
from .reference import StepInputs, ZenithHistory, compute_dtype

__all__ = ["ZenithFused"]


class ZenithFused(Optimizer):
    r"""Momentum SGD whose learning rate follows the gradient-norm history (ZENITH).

    .. math::
       \begin{aligned}
       &n_t = \lVert g_t \rVert_2 \quad\text{(all gradients, float32)}; \quad
        \text{if } n_t \notin \mathbb{R}: \text{skip the step} \\
       &m_t = \tfrac{1}{\min(t, W)} \textstyle\sum_{i=\max(1, t-W+1)}^{t} n_i, \quad
        M_t = \max(M_{t-1}, m_t), \quad s_t = m_t / M_t \\
       &d_t = \pm g_t + \lambda \theta_{t-1}, \quad
        b_t = \mu b_{t-1} + (1 - \tau) d_t \ (b_1 = d_1), \quad
        d_t \leftarrow d_t + \mu b_t \text{ (nesterov) or } b_t \\
       &\theta_t = \theta_{t-1} - \gamma\, s_t\, d_t
       \end{aligned}

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor): base learning rate :math:`\gamma` (default: 0.1). ``group["lr"]``
            stays the base rate, so learning-rate schedulers compose with ZENITH's scale. A
            1-element tensor on the parameters' device keeps ``step()`` free of Python floats
            (CUDA-graph capture, ``torch.compile``).
        momentum (float): momentum factor :math:`\mu` (default: 0.9).
        dampening (float): dampening :math:`\tau` for momentum (default: 0).
        weight_decay (float): L2 penalty :math:`\lambda` (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
        maximize (bool, keyword-only): maximize the objective (default: False).
        window_size (int, keyword-only): :math:`W`, the number of recent gradient norms averaged
            (default: 100). Shared by all parameter groups.
        max_grad_norm (float, keyword-only): if set, the update uses the gradients scaled by
            ``min(1, max_grad_norm / (n_t + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` would,
            at no extra pass over memory; the window records the unclipped ``n_t``
            (default: None, no clipping).
        backend (str, keyword-only): ``"auto"`` (for CUDA tensors Triton when it imports, else
            the compiled ``"cuda"`` kernels when built; for CPU tensors the compiled ``"cpu"``
            kernels when built; the reference otherwise), ``"triton"``, ``"cpu"`` or ``"cuda"``
            (the compiled kernels of ``csrc/``), or ``"reference"`` (readable PyTorch). An explicit
            backend that cannot run raises ``RuntimeError`` with the reason.
        process_group (ProcessGroup, keyword-only): for parameters sharded by the user, not by
            FSDP: the squared gradient norm of the plain-tensor (non-DTensor) parameters is summed
            over this group with ``dist.all_reduce``, as if each rank held a disjoint part of one
            model. Leave it None (default) for a single process and under DDP, whose ranks hold the
            whole gradient. DTensor parameters (FSDP2, HSDP) need no argument: their norm is summed
            over the mesh dimensions they are sharded on.

    After every ``step()``, ``grad_norm``, ``lr_scale`` and ``skipped_steps`` are 0-dim tensors on
    the first parameter's device; reading them as numbers (or :meth:`stats`) is the only moment the
    host waits.

    With ``torch.amp.GradScaler``, ``step()`` takes the scaler's scale and inf flag: the norm and
    the update see unscaled gradients, and an overflow step changes nothing, all on the device.

    Example:
        >>> opt = ZenithFused(model.parameters(), lr=0.1, momentum=0.9)
        >>> opt.zero_grad()
        >>> loss_fn(model(x), y).backward()
        >>> opt.step()

    Note:
        As in the paper, the history is global: one window and one maximum for the whole
        optimizer. The momentum update is exactly ``torch.optim.SGD``'s at ``lr * lr_scale``.
        Under FSDP2 every rank holds the same history and skips the same steps; checkpoint it with
        :func:`zenith_fused.get_optimizer_state_dict` / :func:`zenith_fused.set_optimizer_state_dict`
        (torch's helpers of those names drop the ``"zenith"`` entry).
    """

    # GradScaler hands over its scale and inf flag (``self.grad_scale`` / ``self.found_inf``)
    # instead of unscaling the gradients in a pass of its own.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        window_size: int = 100,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        process_group: Any = None,
    ) -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"Invalid window_size value: {window_size}")
        if isinstance(max_grad_norm, Tensor):
            if max_grad_norm.numel() != 1 or max_grad_norm.is_complex():
                raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (a tensor must hold one real number)")
            max_grad_norm = max_grad_norm.item()  # sync-ok: the constructor, not a step
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool) and 0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
        _distributed.check_process_group(process_group)
        self.window_size = window_size
        self.process_group = process_group
        self._sharding: _distributed.ShardingPlan | None = None
        self._sharding_groups = -1  # how many param groups the plan was made for
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self._engines: dict[str, Any] = {}
        self._bucket_backends: dict[tuple[torch.device, torch.dtype], str] = {}
        self._plan: StepPlan | None = None
        # Set by zenith_fused.set_optimizer_state_dict while torch's helper loads the per-parameter
        # state: the history arrives right after, so the momentum step counters stay as saved.
        self._history_follows = False
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        # The history moves to the gradients' device when a step plan is built (an optimizer
        # made before model.cuda() works); until then it sits with the first parameter.
        first = next((p for g in self.param_groups for p in g["params"]), None)
        self._history = ZenithHistory.zeros(window_size, torch.device("cpu") if first is None else first.device)
        self._sharding_plan()  # a parameter ZENITH cannot shard (a Partial DTensor) raises now

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for name in _GLOBAL_OPTIONS:
            if name in param_group:
                raise ValueError(
                    f"{name} is shared by all parameter groups (ZENITH keeps one history per "
                    f"optimizer); pass it to ZenithFused(), not in a parameter group"
                )
        group = {**self.defaults, **param_group}
        check_hyperparams(group, check_tensor_values=True)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"ZenithFused optimizes floating-point and complex parameters; got {p.dtype}")
        for p in params:
            if isinstance(p, Tensor):
                # Complex parameters run as their real views. An explicit backend that can't run
                # raises here.
                self._backend_for(p.device, p.dtype.to_real() if p.is_complex() else p.dtype)
        super().add_param_group(param_group)
        self._plan = None

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> str:
        key = (device, dtype)
        name = self._bucket_backends.get(key)
        if name is None:
            name = resolve_backend(self.backend, device)
            if name == "reference" and self.backend == "auto" and device.type == "cpu":
                _warn_reference_fallback()
            self._engine(name)  # created now, not inside a step that torch.compile may trace
            self._bucket_backends[key] = name
        return name

    def _engine(self, name: str):
        engine = self._engines.get(name)
        if engine is None:
            engine = self._engines[name] = make_engine(name)
        return engine

    # ------------------------------------------------------------------ public state
    @property
    def backends(self) -> Mapping[tuple[torch.device, torch.dtype], str]:
        """Read-only: the backend that runs each (device, dtype) of this optimizer's parameters."""
        return types.MappingProxyType(self._bucket_backends)

    @property
    def grad_norm(self) -> Tensor:
        """``n_t`` of the last step, float32 0-dim (inf or nan when that step was skipped)."""
        return self._history.grad_norm

    @property
    def lr_scale(self) -> Tensor:
        """``s_t = m_t / M_t`` of the last applied step, float32 0-dim (1 before the first)."""
        return self._history.lr_scale

    @property
    def skipped_steps(self) -> Tensor:
        """How many steps were skipped for a non-finite gradient norm, int64 0-dim."""
        return self._history.skipped_steps

    def stats(self) -> dict[str, Any]:
        """The numbers worth logging, read with one host synchronisation; call it every N steps.

        Returns ``{"step", "grad_norm", "lr_scale", "skipped_steps", "lr"}``, where ``"lr"`` is the
        effective learning rate ``group["lr"] * lr_scale`` of each parameter group.
        """
        h = self._history
        values = [h.step, h.grad_norm, h.lr_scale, h.skipped_steps]
        values += [g["lr"].reshape(()) for g in self.param_groups if isinstance(g["lr"], Tensor)]
        numbers = torch.stack([v.to(h.device, torch.float64) for v in values]).tolist()  # sync-ok: asked for
        step, grad_norm, lr_scale, skipped, *tensor_lrs = numbers
        tensor_lrs.reverse()
        lrs = [(tensor_lrs.pop() if isinstance(g["lr"], Tensor) else g["lr"]) * lr_scale for g in self.param_groups]
        return {"step": int(step), "grad_norm": grad_norm, "lr_scale": lr_scale,
                "skipped_steps": int(skipped), "lr": lrs}

    @property
    def history(self) -> ZenithHistory:
        """The optimizer-wide ZENITH state (window, maximum, step count, ...)."""
        return self._history

    # ------------------------------------------------------------------ step
    def _sharding_plan(self) -> _distributed.ShardingPlan | None:
        """None unless some parameter is a DTensor or a process_group was given; remade only when
        a parameter group is added."""
        if self._sharding_groups != len(self.param_groups):
            self._sharding = _distributed.sharding_plan(self.param_groups, self.process_group)
            self._sharding_groups = len(self.param_groups)
        return self._sharding

    def _momentum_state(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """``p``'s momentum buffer and step counter, created ("never filled") at its first step and
        converted whenever ``p``'s dtype, device or layout has changed since: state follows its
        parameter, as in torch.optim.SGD."""
        state = self.state[p]
        buf = state.get("momentum_buffer")
        buf_step = state.get("momentum_step")
        if buf is None:
            state["momentum_buffer"] = buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["momentum_step"] = torch.zeros((), dtype=torch.int64, device=p.device)
            return buf, state["momentum_step"]
        if self._sharding is not None and self._sharding.has_dtensors:
            self._sharding.check_momentum_buffer(p, buf)
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

    def _build_plan(self) -> StepPlan:
        self._plan = None  # a build that raises leaves no plan behind
        plan = StepPlan(self, self._history.device)
        if plan.history_device != self._history.device:
            self._history = self._history.to(plan.history_device)
        plan.bind_history(self._history)
        self._plan = plan
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one ZENITH step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
            return loss

        plan = self._plan
        if plan is None or not plan.holds(self) or not plan.refresh_hyperparams(self.param_groups):
            plan = self._build_plan()
        sharding = self._sharding
        # A rank without local gradients still joins the other ranks' norm reduction.
        if not plan.buckets and (sharding is None or not sharding.communicates):
            return loss

        for bucket in plan.buckets:
            bucket.engine.sq_norm_partials(bucket)
            if bucket.partials_destination is not None:
                bucket.partials_destination.copy_(bucket.partials, non_blocking=True)
        sq_norm_partials = plan.partials
        if sharding is not None:
            # Sum the shards' squares across ranks, on the device, before the history sees them.
            sq_norm_partials = sharding.reduce_sq_norm(sq_norm_partials, self.param_groups, plan.history_device)
        plan.history_engine.update_history(sq_norm_partials, plan.history_tensors, self._step_inputs())

        views = plan.views
        if views is None:
            views = plan.views_on_devices(self._history)
        for bucket in plan.buckets:
            for cell, lr in bucket.lr_copies:
                cell.copy_(lr.reshape(()), non_blocking=True)
            bucket.engine.momentum_update(bucket, views[bucket.device])
        return loss

    def _step_inputs(self) -> StepInputs:
        """GradScaler's tensors, set on the optimizer just for this step, and the clipping norm."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        device = self._history.device
        return StepInputs(
            grad_scale=None if grad_scale is None else _scalar_on(grad_scale, device),
            found_inf=None if found_inf is None else _scalar_on(found_inf, device),
            max_grad_norm=self.max_grad_norm,
        )

    def _traced_step(self) -> None:
        """The step as ``torch.compile`` traces it: the same engines, reached through custom ops
        that take the tensors themselves (:mod:`zenith_fused._traced`), no cached plan."""
        sharding = self._sharding_plan()
        local = sharding is not None and sharding.has_dtensors
        buckets: dict[tuple[torch.device, torch.dtype, str], BucketPlan] = {}
        for group in self.param_groups:
            check_hyperparams(group)
        hyperparams = [group_hyperparams(group) for group in self.param_groups]
        for gi, _, p, _, param, grad, bucket in kernel_entries(self, self.param_groups, buckets):
            hp = hyperparams[gi]
            if not bucket.group_hyperparams or bucket.group_hyperparams[-1] is not hp:
                bucket.group_hyperparams.append(hp)
            buf, buf_step = self._momentum_state(p) if hp.momentum != 0 else (None, None)
            bucket.params.append(param)
            bucket.grads.append(grad)
            bucket.momentum_buffers.append(kernel_view(sharding.local(buf) if local else buf))
            bucket.momentum_steps.append(buf_step)
            bucket.hyperparam_slots.append(len(bucket.group_hyperparams) - 1)
        if not buckets and (sharding is None or not sharding.communicates):
            return

        history = self._history
        partials = []
        for bucket in buckets.values():
            if bucket.backend == "reference":
                partials.append(reference.squared_norm_partials(bucket.grads).to(history.device))
            else:
                partials.append(_traced.sq_norm_partials(bucket.backend, *_op_lists(bucket)).to(history.device))
        sq_norm_partials = torch.cat(partials) if partials else torch.zeros(1, device=history.device)
        if sharding is not None:
            sq_norm_partials = sharding.reduce_sq_norm(sq_norm_partials, self.param_groups, history.device)
        inputs = self._step_inputs()
        history_backend = next((b.backend for b in buckets.values() if b.device == history.device), "reference")
        if history_backend == "reference":
            reference.update_history(history, sq_norm_partials, inputs)
        else:
            _traced.update_history(history_backend, sq_norm_partials, history.kernel_tensors(), inputs.grad_scale,
                                   inputs.found_inf, inputs.max_grad_norm)
        for bucket in buckets.values():
            view = StepView.of(history, bucket.device)
            if bucket.backend == "reference":
                reference.momentum_update(
                    bucket.params, bucket.grads, bucket.momentum_buffers, bucket.momentum_steps,
                    bucket.hyperparams_per_tensor, lr_scale=view.lr_scale, step=view.step,
                    step_applied=view.step_applied, grad_multiplier=view.grad_multiplier,
                )
                continue
            dtype = compute_dtype(bucket.dtype)
            table = torch.tensor([hyperparam_row(hp) for hp in bucket.group_hyperparams], dtype=dtype,
                                 device=bucket.device)
            for slot, hp in enumerate(bucket.group_hyperparams):
                if isinstance(hp.lr, Tensor):
                    table[slot, _table.LR] = hp.lr.reshape(()).to(dtype)
            _traced.momentum_update(bucket.backend, *_op_lists(bucket), table, view.lr_scale, view.step,
                                    view.step_applied, view.grad_multiplier)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's layout plus a ``"zenith"`` entry holding the optimizer-wide history.

        ``"zenith"`` = ``{"version": 1, "window_size": W, "step": int64, "norm_window": float32[W],
        "window_max": float32, "skipped_steps": int64, "grad_norm": float32, "lr_scale": float32}``.
        Under FSDP2 the momentum buffers are DTensors; for ``torch.distributed.checkpoint`` use
        :func:`zenith_fused.get_optimizer_state_dict`.
        """
        state = super().state_dict()
        state["zenith"] = self._history_entry()
        return state

    def _history_entry(self) -> dict[str, Any]:
        zenith = {"version": STATE_VERSION, "window_size": self.window_size}
        for name in SAVED_HISTORY_FIELDS:
            zenith[name] = getattr(self._history, name).clone()
        return zenith

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from any backend of ZenithFused, or a torch.optim.SGD one.

        A state dict without a ``"zenith"`` entry (``torch.optim.SGD``'s) keeps its momentum
        buffers and starts a fresh ZENITH history.
        """
        state_dict = dict(state_dict)
        zenith = state_dict.pop("zenith", None)
        if zenith is not None:
            check_zenith_entry(zenith, self.window_size)
        # torch casts every per-parameter state tensor to a floating parameter's dtype; a step
        # count in bfloat16 would stop being exact after 256 steps, so the counters bypass that.
        momentum_steps = {}
        state_dict["state"] = {index: dict(entry) for index, entry in state_dict["state"].items()}
        for index, entry in state_dict["state"].items():
            if "momentum_step" in entry:
                momentum_steps[index] = entry.pop("momentum_step")
        super().load_state_dict(state_dict)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for index, p in zip(saved_ids, params):
            if index in momentum_steps:
                filled_at = torch.as_tensor(momentum_steps[index]).to(p.device, torch.int64)
                if zenith is None and not self._history_follows:
                    # The history starts afresh, so a buffer filled at any step before is marked
                    # "filled before this history began" (-1), never "first" again: the next step
                    # gives momentum * buf + d, not d.
                    filled_at = torch.where(filled_at != 0, -1, 0)
                self.state[p]["momentum_step"] = filled_at
        self._plan = None  # the buffers are new tensors; the step plan converts their layout
        self._load_history(zenith)

    def _load_history(self, zenith: dict[str, Any] | None) -> None:
        """Set the history from a checked ``"zenith"`` entry, or to a fresh one for None."""
        fresh = ZenithHistory.zeros(self.window_size, self._history.device)
        for name in SAVED_HISTORY_FIELDS:
            target = getattr(fresh, name)
            if zenith is not None:
                target.copy_(zenith[name])
            getattr(self._history, name).copy_(target)
        self._history.step_applied.zero_()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            window_size=self.window_size, max_grad_norm=self.max_grad_norm, backend=self.backend,
            _history=self._history, process_group=self.process_group,
        )
        state.pop("_plan", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_engines", {})
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("_bucket_backends", {})
        self.__dict__.setdefault("process_group", None)
        self._sharding, self._sharding_groups = None, -1
        self._plan = None
        # torch's load_state_dict ends in __setstate__: keep what set_optimizer_state_dict set.
        self.__dict__.setdefault("_history_follows", False)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nesterov", False)
            group.setdefault("dampening", 0.0)


# Options of the whole optimizer, refused inside a parameter group.
_GLOBAL_OPTIONS = ("window_size", "max_grad_norm", "backend", "process_group")
_warned_fallback = False


def _warn_reference_fallback() -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    from . import _ext

    warnings.warn(
        "ZenithFused: the compiled CPU kernels are not available, so CPU parameters run on the "
        f"pure-PyTorch reference, 15-25x slower per step ({_ext.unavailable_reason('cpu')}). "
        "Install a C++ compiler and reinstall, or let zenith_fused compile them on first use "
        "(ZENITH_FUSED_BUILD_EXT unset, with ninja and a compiler present).",
        RuntimeWarning,
        stacklevel=4,
    )


def _scalar_on(t: Tensor, device: torch.device) -> Tensor:
    """A 1-element tensor of any shape as a float32 0-dim tensor on ``device`` (no copy when it
    is one already)."""
    return t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)


def _op_lists(bucket: BucketPlan) -> tuple:
    """A bucket as custom-op arguments: tensors with a momentum buffer are listed by index, since
    a custom op cannot mutate a list holding None."""
    buffered = [i for i, b in enumerate(bucket.momentum_buffers) if b is not None]
    return (
        bucket.params,
        bucket.grads,
        buffered,
        [bucket.momentum_buffers[i] for i in buffered],
        [bucket.momentum_steps[i] for i in buffered],
        bucket.hyperparam_slots,
    )
