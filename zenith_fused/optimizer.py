"""``ZenithFused``: the torch.optim.Optimizer users construct."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _distributed
from ._engines import BACKENDS, Bucket, StepView, make_engine, resolve_backend
from .reference import GroupHyperparams, StepInputs, ZenithHistory

__all__ = ["ZenithFused"]

STATE_VERSION = 1
_HISTORY_FIELDS = ("step", "norm_window", "window_max", "skipped_steps", "grad_norm", "lr_scale")


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
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
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
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        first = self.param_groups[0]["params"][0]
        self._history = ZenithHistory.zeros(window_size, first.device)
        self._sharding_plan()  # a parameter ZENITH cannot shard (a Partial DTensor) raises now

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "window_size" in param_group:
            raise ValueError(
                "window_size is shared by all parameter groups (ZENITH keeps one history per "
                "optimizer); pass it to ZenithFused(), not in a parameter group"
            )
        group = {**self.defaults, **param_group}
        _check_hyperparams(group, check_tensor_values=True)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(
                    f"ZenithFused does not support complex parameters (got {p.dtype}); "
                    "optimize torch.view_as_real(p) instead"
                )
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise ValueError(f"ZenithFused optimizes floating-point parameters; got {p.dtype}")
        for p in params:
            if isinstance(p, Tensor):
                self._backend_for(p.device, p.dtype)  # an explicit backend that can't run raises here
        super().add_param_group(param_group)

    def _backend_for(self, device: torch.device, dtype: torch.dtype) -> str:
        key = (device, dtype)
        name = self._bucket_backends.get(key)
        if name is None:
            name = resolve_backend(self.backend, device)
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

    def _checked_groups(
        self, sharding: _distributed.ShardingPlan | None
    ) -> list[tuple[GroupHyperparams, list[Tensor]]]:
        """Each group's hyper-parameters and its parameters with a gradient, all validated first,
        so that a step that raises has changed nothing."""
        local = sharding is not None and sharding.has_dtensors
        checked = []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.is_sparse:
                    raise RuntimeError("ZenithFused does not support sparse gradients")
                # The kernels see a DTensor's local shard, so its layout is the one to check.
                param, grad = sharding.local_param_and_grad(p) if local else (p, p.grad)
                if self._backend_for(p.device, p.dtype) != "reference":
                    _check_layout(param, grad)
            checked.append((_group_hyperparams(group), with_grad))
        return checked

    def _gather_buckets(
        self, sharding: _distributed.ShardingPlan | None
    ) -> dict[tuple[torch.device, torch.dtype], Bucket]:
        buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
        local = sharding is not None and sharding.has_dtensors
        for hyperparams, params in self._checked_groups(sharding):
            slot_of_bucket: dict[tuple[torch.device, torch.dtype], int] = {}
            for p in params:
                key = (p.device, p.dtype)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(device=p.device, dtype=p.dtype)
                if key not in slot_of_bucket:
                    slot_of_bucket[key] = len(bucket.hyperparams)
                    bucket.hyperparams.append(hyperparams)
                grad = p.grad
                buf, buf_step = self._momentum_state(p) if hyperparams.momentum != 0 else (None, None)
                if local:  # the kernels update a DTensor's shard in place, through its local tensor
                    p, grad, buf = sharding.local(p), sharding.local(grad), sharding.local(buf)
                bucket.params.append(p)
                bucket.grads.append(grad)
                bucket.hyperparam_slots.append(slot_of_bucket[key])
                bucket.momentum_buffers.append(buf)
                bucket.momentum_steps.append(buf_step)
        return buckets

    def _momentum_state(self, p: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[p]
        buf = state.get("momentum_buffer")
        buf_step = state.get("momentum_step")
        if buf_step is not None and buf is not None and self._sharding is None:
            return buf, buf_step  # every step after the first: nothing to create or check
        if buf is None:
            # A zero buffer marked "never filled": the first applied step sets it to d.
            state["momentum_buffer"] = buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["momentum_step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        else:
            if self._sharding is not None and self._sharding.has_dtensors:
                self._sharding.check_momentum_buffer(p, buf)
            if buf.stride() != p.stride():
                # The fused kernels index parameter and buffer alike (a loaded buffer may differ).
                state["momentum_buffer"] = buf = torch.empty_like(p).copy_(buf)
            if "momentum_step" not in state:
                # A buffer from elsewhere (torch.optim.SGD): filled before this history began.
                state["momentum_step"] = torch.full((), -1, dtype=torch.int64, device=p.device)
        return buf, state["momentum_step"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one ZENITH step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        sharding = self._sharding_plan()
        buckets = self._gather_buckets(sharding)
        # A rank without local gradients still joins the other ranks' norm reduction.
        if not buckets and (sharding is None or not sharding.communicates):
            return loss

        history = self._history
        if sharding is not None and sharding.shared is None:
            sq_norm_partials = sharding.global_sq_norm_by_groups(self.param_groups, history.device)
        else:
            partials = []
            for key, bucket in buckets.items():
                engine = self._engine(self._backend_for(*key))
                partials.append(engine.sq_norm_partials(bucket).to(history.device, non_blocking=True))
            if not partials:
                partials.append(torch.zeros(1, dtype=torch.float32, device=history.device))
            sq_norm_partials = partials[0] if len(partials) == 1 else torch.cat(partials)
            if sharding is not None and sharding.shared:
                # Sum the shards' squares across ranks, on the device, before the history sees them.
                sq_norm_partials = sharding.global_sq_norm(sq_norm_partials)

        self._engine(self._history_backend(buckets)).update_history(history, sq_norm_partials, self._step_inputs())

        for key, bucket in buckets.items():
            engine = self._engine(self._backend_for(*key))
            engine.momentum_update(bucket, StepView.of(history, bucket.device))
        return loss

    def _step_inputs(self) -> StepInputs:
        """GradScaler's tensors, set on the optimizer just for this step, and the clipping norm."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        device = self._history.device
        return StepInputs(
            grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
            found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
            max_grad_norm=self.max_grad_norm,
        )

    def _history_backend(self, buckets: dict) -> str:
        for (device, dtype) in buckets:
            if device == self._history.device:
                return self._backend_for(device, dtype)
        return resolve_backend("auto", self._history.device)

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
        for name in _HISTORY_FIELDS:
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
            _check_zenith_entry(zenith, self.window_size)
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
                self.state[p]["momentum_step"] = torch.as_tensor(momentum_steps[index]).to(p.device, torch.int64)
            buf = self.state[p].get("momentum_buffer") if p in self.state else None
            if buf is not None and buf.stride() != p.stride():
                # The fused kernels index parameter and buffer alike; a saved buffer may differ.
                self.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)
        self._load_history(zenith)

    def _load_history(self, zenith: dict[str, Any] | None) -> None:
        """Set the history from a checked ``"zenith"`` entry, or to a fresh one for None."""
        fresh = ZenithHistory.zeros(self.window_size, self._history.device)
        for name in _HISTORY_FIELDS:
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
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_engines", {})
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("_bucket_backends", {})
        self.__dict__.setdefault("process_group", None)
        self._sharding, self._sharding_groups = None, -1
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nesterov", False)
            group.setdefault("dampening", 0.0)


def _check_hyperparams(group: dict[str, Any], *, check_tensor_values: bool = False) -> None:
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


def _group_hyperparams(group: dict[str, Any]) -> GroupHyperparams:
    _check_hyperparams(group)  # a scheduler or user may have written the group since
    lr = group["lr"]
    return GroupHyperparams(
        lr=lr if isinstance(lr, Tensor) else float(lr),
        momentum=float(group["momentum"]),
        dampening=float(group["dampening"]),
        weight_decay=float(group["weight_decay"]),
        nesterov=bool(group["nesterov"]),
        maximize=bool(group["maximize"]),
    )


def _is_dense(t: Tensor) -> bool:
    """True when the elements fill ``t``'s storage span without gaps or overlap, in any order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _check_layout(p: Tensor, g: Tensor) -> None:
    """The fused kernels walk storage linearly: parameter and gradient must share one layout."""
    if p.is_contiguous() and g.is_contiguous():  # the common case, cheap enough for every step
        return
    if p.numel() > 1 and not (g.stride() == p.stride() and _is_dense(p)):
        raise RuntimeError(
            f"ZenithFused's fused kernels need each parameter dense (contiguous or channels-last) "
            f"with a gradient of the same strides; got a parameter of shape {tuple(p.shape)}, "
            f"strides {p.stride()}, gradient strides {g.stride()}. Make the parameter "
            f"contiguous, or use backend='reference'"
        )


def _check_zenith_entry(zenith: dict[str, Any], window_size: int) -> None:
    version = zenith.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"Unsupported ZenithFused state_dict version: {version}")
    saved_window = zenith.get("window_size")
    if saved_window != window_size:
        raise ValueError(
            f"loaded state dict has window_size {saved_window}, this optimizer has {window_size}"
        )
    missing = [name for name in _HISTORY_FIELDS if name not in zenith]
    if missing:
        raise ValueError(f"loaded state dict's 'zenith' entry lacks {missing}")
