"""``ZenithFused``: the torch.optim.Optimizer users construct."""
from __future__ import annotations

import math
import types
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _distributed, _state, _traced
from ._engines import BackendTable
from ._plan import StepPlan, check_hyperparams, run_step
from .reference import StepInputs, ZenithHistory

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
        warmup_steps (int, keyword-only): :math:`K`, steps of linear warmup before the rule
            starts (default: 0, the paper's rule). Steps 1 to :math:`K` use
            :math:`\gamma\, t / K` and record no norm; from step :math:`K + 1` on the rule runs
            over the steps after :math:`K` only, so that the large early gradient norms of a
            transient never set :math:`M_t`. Use it where early norms are a transient, as in
            transformers; ``warmup_steps=window_size`` is a good start. Shared by all groups.
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
        warmup_steps: int = 0,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        process_group: Any = None,
    ) -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"Invalid window_size value: {window_size}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < 2**62:
            raise ValueError(f"Invalid warmup_steps value: {warmup_steps}")
        if isinstance(max_grad_norm, Tensor):
            if max_grad_norm.numel() != 1 or max_grad_norm.is_complex():
                raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (a tensor must hold one real number)")
            max_grad_norm = max_grad_norm.item()  # sync-ok: the constructor, not a step
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool) and 0 < max_grad_norm < math.inf
        ):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        backends = BackendTable(backend)  # raises ValueError for an unknown name
        _distributed.check_process_group(process_group)
        self.window_size = window_size
        self.warmup_steps = warmup_steps
        self.process_group = process_group
        self._sharding: _distributed.ShardingPlan | None = None
        self._sharding_groups = -1  # how many param groups the plan was made for
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.backend = backend
        self._backends = backends
        self._plan: StepPlan | None = None
        self._handle = _traced.register(self._traced_plan_step)
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
        self._history = ZenithHistory.zeros(
            window_size, torch.device("cpu") if first is None else first.device, warmup_steps
        )

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
                # Complex parameters run as their real views. The backend is chosen now, from what
                # each declares: an explicit backend that can't run this parameter raises here.
                self._backends.for_tensors(p.device, p.dtype.to_real() if p.is_complex() else p.dtype)
        super().add_param_group(param_group)
        self._plan = None
        self._all_params = [p for g in self.param_groups for p in g["params"]]
        self._sharding_plan()  # a parameter ZENITH cannot shard (a Partial DTensor) raises now

    # ------------------------------------------------------------------ public state
    @property
    def backends(self) -> Mapping[tuple[torch.device, torch.dtype], str]:
        """Read-only: the backend that runs each (device, dtype) of this optimizer's parameters."""
        return types.MappingProxyType(self._backends.by_bucket)

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

    def _build_plan(self) -> StepPlan:
        self._plan = None  # a build that raises leaves no plan behind
        plan = StepPlan(self.param_groups, self.state, self._backends, self._sharding_plan(), self._history.device)
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
            # One opaque op that runs the same plan step (see zenith_fused._traced); the tensors
            # it reads and writes are its arguments, so the graph orders it correctly.
            # Only a flat list of the parameters is read here, never param_groups: a float lr a
            # scheduler rewrites is then no guard (the op reads it at run time).
            sharding = self._sharding
            local = sharding.local if sharding is not None and sharding.has_dtensors else _same
            params = [local(p) for p in self._all_params if p.grad is not None]
            grads = [local(p.grad) for p in self._all_params if p.grad is not None]
            _traced.plan_step(self._handle, params, grads, self._history.kernel_tensors(),
                              getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
            return loss
        self._plan_step(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        return loss

    def _plan_step(self, grad_scale: Tensor | None, found_inf: Tensor | None,
                   traced_params: list[Tensor] | None = None) -> None:
        """The step itself, the same for an eager call and the traced step's custom op."""
        plan = self._plan
        if plan is None or not plan.holds(self.param_groups) or not plan.refresh_hyperparams(self.param_groups):
            plan = self._build_plan()
        if traced_params is not None and list(map(Tensor.data_ptr, traced_params)) != plan.addresses:
            # torch.compile hands a mutated input to a custom op in place; were it a copy, the
            # update would be lost. Checked, not assumed.
            plan.release_grads()
            raise RuntimeError(
                "ZenithFused under torch.compile: the traced step was handed copies of the parameters, so its "
                "update would be lost; please report this with your torch version"
            )
        sharding = self._sharding
        # A rank without local gradients still joins the other ranks' norm reduction.
        if not plan.buckets and (sharding is None or not sharding.communicates):
            return
        run_step(plan, self._history, self._step_inputs(grad_scale, found_inf), sharding, self.param_groups)

    def _traced_plan_step(self, params: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The body of the traced step's custom op (see :mod:`zenith_fused._traced`)."""
        self._plan_step(grad_scale, found_inf, traced_params=params)

    def _step_inputs(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> StepInputs:
        """GradScaler's tensors (set on the optimizer just for this step) and the clipping norm."""
        device = self._history.device
        return StepInputs(
            grad_scale=None if grad_scale is None else _scalar_on(grad_scale, device),
            found_inf=None if found_inf is None else _scalar_on(found_inf, device),
            max_grad_norm=self.max_grad_norm,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's layout plus a ``"zenith"`` entry holding the optimizer-wide history.

        ``"zenith"`` = ``{"version": 1, "window_size": W, "step": int64, "norm_window": float32[W],
        "window_max": float32, "skipped_steps": int64, "grad_norm": float32, "lr_scale": float32}``.
        Under FSDP2 the momentum buffers are DTensors; for ``torch.distributed.checkpoint`` use
        :func:`zenith_fused.get_optimizer_state_dict`.
        """
        state = super().state_dict()
        state["zenith"] = _state.history_entry(self._history, self.window_size, self.warmup_steps)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from any backend of ZenithFused, or a torch.optim.SGD one.

        A state dict without a ``"zenith"`` entry (``torch.optim.SGD``'s) keeps its momentum
        buffers and starts a fresh ZENITH history.
        """
        state_dict = dict(state_dict)
        zenith = state_dict.pop("zenith", None)
        if zenith is not None:
            _state.check_zenith_entry(zenith, self.window_size, self.warmup_steps)
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
                if zenith is None and not _state.history_is_following(self):
                    # The history starts afresh, so a buffer filled at any step before is marked
                    # "filled before this history began" (-1), never "first" again: the next step
                    # gives momentum * buf + d, not d.
                    filled_at = torch.where(filled_at != 0, -1, 0)
                self.state[p]["momentum_step"] = filled_at
        self._plan = None  # the buffers are new tensors; the step plan converts their layout
        _state.load_history(self._history, zenith)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            window_size=self.window_size, warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm,
            backend=self.backend, _history=self._history, process_group=self.process_group,
        )
        for transient in ("_plan", "_handle", "_backends", "_sharding", "_sharding_groups", "_all_params"):
            state.pop(transient, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Options added after the first release: old pickles load with their defaults.
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("warmup_steps", 0)
        self.__dict__.setdefault("backend", "auto")
        history = self.__dict__.get("_history")
        if history is not None and not hasattr(history, "warmup_steps"):  # pickled before the option
            history.warmup_steps = torch.zeros((), dtype=torch.int64, device=history.device)
        # torch's load_state_dict ends here too: keep what is set, make what a copy or pickle lacks
        # (backends are chosen again at the first step).
        if "_backends" not in self.__dict__:
            self._backends = BackendTable(self.backend)
        if "_handle" not in self.__dict__:
            self._handle = _traced.register(self._traced_plan_step)
        self._sharding, self._sharding_groups = None, -1
        self._sharding_plan()
        self._all_params = [p for g in self.param_groups for p in g["params"]]
        self._plan = None
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nesterov", False)
            group.setdefault("dampening", 0.0)


# Options of the whole optimizer, refused inside a parameter group.
_GLOBAL_OPTIONS = ("window_size", "warmup_steps", "max_grad_norm", "backend", "process_group")


def _same(t: Tensor) -> Tensor:
    return t


def _scalar_on(t: Tensor, device: torch.device) -> Tensor:
    """A 1-element tensor of any shape as a float32 0-dim tensor on ``device`` (no copy when it
    is one already)."""
    return t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
