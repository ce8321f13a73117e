"""The baselines zenith-fused is measured against, in one place.

What a user would pick instead of ``ZenithFused``:

* ``torch.optim.SGD(momentum=0.9)`` as a for-loop over tensors, with ``foreach=True`` and with
  ``fused=True`` (the floor: plain momentum SGD, without ZENITH's norm or history);
* ZENITH written by hand in PyTorch the obvious way (:class:`ZenithHostSync`): the global norm
  read on the host with ``.item()``, the history kept in Python floats, then SGD's foreach update;
* the same ZENITH with its bookkeeping on the device (:func:`zenith_device_step`: ``torch.where``
  on 0-dim tensors, no host read) under ``torch.compile`` (:class:`ZenithCompiled`).

The two ZENITH peers implement the spec of ``zenith_fused/reference.py`` for the settings the
benchmark uses (``momentum > 0``, no dampening, weight decay, nesterov or maximize; every
parameter has a gradient at every step). :func:`compare_with_reference` checks that, against
``ZenithFused(backend="reference")``, so that every row of ``bench/step.py`` runs the same algorithm.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

LR = 0.1
MOMENTUM = 0.9
WINDOW_SIZE = 100

# (atol, rtol) of a peer's parameters against the reference after a few steps. float32: the same
# formulas up to FMA contraction and summation order. float16 / bfloat16: the rtol is one ulp of
# the storage type, allowed once per step and once more (compare_with_reference multiplies it by
# steps + 1): the twins are not resynchronised, and the host-sync peer rounds its momentum buffer
# twice per step (multiply, then add), as torch.optim.SGD's foreach path does, where the
# reference rounds once, so a parameter's last bit can flip at every step.
PEER_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2**-10),
    torch.bfloat16: (1.6e-2, 2**-7),
}


def _grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        raise ValueError("the ZENITH peers expect every parameter to have a gradient at every step")
    return grads


def _global_norm(grads: Sequence[Tensor]) -> Tensor:
    """``||g||_2`` over all gradients, accumulated in float32 (as clip_grad_norm_ would)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


class ZenithHostSync:
    """ZENITH over SGD's foreach kernels, with the norm read on the host: one sync per step."""

    def __init__(
        self, params: Sequence[Tensor], lr: float = LR, momentum: float = MOMENTUM, window_size: int = WINDOW_SIZE
    ) -> None:
        if not momentum > 0:
            raise ValueError(f"ZenithHostSync needs a momentum > 0; got {momentum}")
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.norm_window: deque[float] = deque(maxlen=window_size)
        self.window_max = 0.0
        self.skipped_steps = 0
        self.grad_norm = math.nan
        self.momentum_buffers: list[Tensor] | None = None

    @torch.no_grad()
    def step(self) -> None:
        grads = _grads_of(self.params)
        grad_norm = self.grad_norm = _global_norm(grads).item()
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1
            return
        self.norm_window.append(grad_norm)
        mean = sum(self.norm_window) / len(self.norm_window)
        self.window_max = max(self.window_max, mean)
        lr_scale = mean / self.window_max if self.window_max > 0 else 1.0

        if self.momentum_buffers is None:
            self.momentum_buffers = torch._foreach_mul(grads, 1.0)  # a copy, as SGD's first step
        else:
            torch._foreach_mul_(self.momentum_buffers, self.momentum)
            torch._foreach_add_(self.momentum_buffers, grads)
        torch._foreach_add_(self.params, self.momentum_buffers, alpha=-self.lr * lr_scale)


def zenith_device_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    step: Tensor,
    norm_window: Tensor,
    window_max: Tensor,
    lr_scale: Tensor,
    slots: Tensor,
    lr: float,
    momentum: float,
) -> Tensor:
    """One ZENITH step with every decision made on the device, so nothing waits for the host.

    The momentum buffers start at zero, which makes ``momentum * buf + g`` exactly ``g`` on the
    first step: no "first step" flag is needed. A non-finite norm keeps every tensor as it was.
    """
    grad_norm = _global_norm(grads)
    finite = torch.isfinite(grad_norm)
    window_size = norm_window.numel()
    written = finite & (slots == step % window_size)
    new_window = torch.where(written, grad_norm, norm_window)
    new_step = step + finite.to(step.dtype)
    mean = new_window.sum() / new_step.clamp(min=1, max=window_size).to(torch.float32)
    new_max = torch.maximum(window_max, mean)
    scale = torch.where(new_max > 0, mean / torch.where(new_max > 0, new_max, 1.0), 1.0)
    new_scale = torch.where(finite, scale, lr_scale)

    norm_window.copy_(new_window)
    step.copy_(new_step)
    window_max.copy_(torch.where(finite, new_max, window_max))
    lr_scale.copy_(new_scale)

    step_lr = lr * new_scale
    for p, g, buf in zip(params, grads, momentum_buffers):
        new_buf = momentum * buf.float() + g.float()
        buf.copy_(torch.where(finite, new_buf, buf.float()))
        p.copy_(torch.where(finite, p.float() - step_lr * new_buf, p.float()))
    return grad_norm


class ZenithDeviceSide:
    """:func:`zenith_device_step` run eagerly: one kernel per operation, no host sync."""

    step_fn: Callable = staticmethod(zenith_device_step)

    def __init__(
        self, params: Sequence[Tensor], lr: float = LR, momentum: float = MOMENTUM, window_size: int = WINDOW_SIZE
    ) -> None:
        if not momentum > 0:
            raise ValueError(f"{type(self).__name__} needs a momentum > 0; got {momentum}")
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        device = self.params[0].device
        self.momentum_buffers = [torch.zeros_like(p) for p in self.params]
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        self.norm_window = torch.zeros(window_size, dtype=torch.float32, device=device)
        self.window_max = torch.zeros((), dtype=torch.float32, device=device)
        self.lr_scale = torch.ones((), dtype=torch.float32, device=device)
        self.slots = torch.arange(window_size, device=device)
        self.grad_norm = torch.full((), math.nan, device=device)

    @torch.no_grad()
    def step(self) -> None:
        self.grad_norm = self.step_fn(
            self.params, _grads_of(self.params), self.momentum_buffers, self.step_count,
            self.norm_window, self.window_max, self.lr_scale, self.slots, self.lr, self.momentum,
        )


_compiled_step: Callable | None = None


def reset_compiled() -> None:
    """Forget compiled graphs: each parameter set is a new graph, and Dynamo stops recompiling
    (silently falling back to eager) after a handful of shapes for one function."""
    global _compiled_step
    torch._dynamo.reset()
    _compiled_step = None


class ZenithCompiled(ZenithDeviceSide):
    """:func:`zenith_device_step` under ``torch.compile``: Inductor fuses each tensor's update into
    one kernel and the norm into a few reductions. The first step pays the compile."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        global _compiled_step
        if _compiled_step is None:
            _compiled_step = torch.compile(zenith_device_step, dynamic=False)
        self.step_fn = _compiled_step


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Peer:
    name: str
    family: str  # "sgd" or "zenith": which algorithm, hence how many bytes a step must move
    make: Callable[..., object]  # (parameters with .grad set, window_size) -> object with .step()
    description: str
    compiled: bool = False

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this peer cannot run on (device, dtype), found by one step on a tiny tensor."""
        if not self.name.startswith("sgd-"):
            return None
        p = torch.zeros(3, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        try:
            self.make([p]).step()
        except (RuntimeError, NotImplementedError) as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return None


def _sgd(**impl) -> Callable[..., torch.optim.SGD]:
    return lambda params, window_size=None: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **impl)


PEERS: tuple[Peer, ...] = (
    Peer("sgd-for-loop", "sgd", _sgd(foreach=False), "torch.optim.SGD, one tensor at a time"),
    Peer("sgd-foreach", "sgd", _sgd(foreach=True), "torch.optim.SGD(foreach=True)"),
    Peer("sgd-fused", "sgd", _sgd(fused=True), "torch.optim.SGD(fused=True)"),
    Peer("zenith-host-sync", "zenith", lambda ps, window_size=WINDOW_SIZE: ZenithHostSync(ps, window_size=window_size),
         "hand-written ZENITH: norm .item() on the host, then SGD's foreach update"),
    Peer("zenith-compiled", "zenith", lambda ps, window_size=WINDOW_SIZE: ZenithCompiled(ps, window_size=window_size),
         "hand-written ZENITH, bookkeeping on the device, under torch.compile", compiled=True),
)

# The eager twin of zenith-compiled: checked against the reference, not timed by default.
DEVICE_SIDE_EAGER = Peer("zenith-device-eager", "zenith", lambda ps, window_size=WINDOW_SIZE: ZenithDeviceSide(ps, window_size=window_size),
                         "zenith-compiled's function without torch.compile")


# --------------------------------------------------------------------------- the check
@dataclass
class CheckResult:
    peer: str
    dtype: str
    steps: int
    window_size: int
    max_abs_diff: float
    worst_excess: float  # max over elements of |a - b| - (atol + rtol * magnitude); <= 0 passes
    passed: bool
    # Largest relative error of the global norm against float64, over the finite steps: tells
    # which side is off when a check fails (PyTorch's float32 CPU norm loses ~1e-3 on 10^7+ values).
    norm_rel_error: float | None = None
    reference_norm_rel_error: float | None = None


@torch.no_grad()
def compare_with_reference(
    make_peer: Callable[..., object],
    initial_params: Sequence[Tensor],
    *,
    name: str,
    steps: int = 3,
    window_size: int = WINDOW_SIZE,
    nonfinite_step: int | None = None,
    seed: int = 0,
) -> CheckResult:
    """Step a peer and ``ZenithFused(backend="reference")`` on identical fresh random gradients
    from copies of ``initial_params`` and compare the parameters (per-dtype allclose).

    ``nonfinite_step`` puts an inf into that step's gradients, which both must skip.
    """
    from zenith_fused import ZenithFused

    dtype = initial_params[0].dtype
    device = initial_params[0].device
    peer_params = [p.detach().clone().requires_grad_(True) for p in initial_params]
    ref_params = [p.detach().clone().requires_grad_(True) for p in initial_params]
    peer = make_peer(peer_params, window_size=window_size)
    reference = ZenithFused(ref_params, lr=LR, momentum=MOMENTUM, window_size=window_size, backend="reference")
    generator = torch.Generator(device=device).manual_seed(seed)
    norm_errors: dict[str, float] = {}
    for step in range(steps):
        # Norms that fall and rise, so that the mean drops below the maximum and the scale moves.
        grad_scale = (3.0, 1.0, 2.0)[step % 3]
        for a, b in zip(peer_params, ref_params):
            g = torch.randn(a.shape, generator=generator, device=device, dtype=torch.float32).mul_(grad_scale)
            a.grad = g.to(dtype)
            b.grad = g.to(dtype)
        if step == nonfinite_step:
            peer_params[0].grad.view(-1)[0] = float("inf")
            ref_params[0].grad.view(-1)[0] = float("inf")
        exact = math.sqrt(sum(torch.sum(p.grad.double().square()).item() for p in ref_params))
        peer.step()
        reference.step()
        if math.isfinite(exact) and exact > 0:
            for key, got in (("peer", _grad_norm_of(peer)), ("reference", float(reference.grad_norm))):
                if got is not None:
                    norm_errors[key] = max(norm_errors.get(key, 0.0), abs(got - exact) / exact)

    atol, rtol = PEER_TOLERANCES[dtype]
    if dtype != torch.float32:
        rtol *= steps + 1  # a flip per step, plus what the buffers' own rounding drift adds up to
    max_abs_diff = 0.0
    worst_excess = -math.inf
    for a, b, start in zip(peer_params, ref_params, initial_params):
        if a.numel() == 0:
            continue
        a32, b32 = a.float(), b.float()
        diff = (a32 - b32).abs()
        max_abs_diff = max(max_abs_diff, diff.max().item())
        # A last-bit flip at a step is an ulp of the value at that step; updates can then cancel
        # most of it (a parameter moving from 1.5 to 0.07), so scale by the larger of both ends.
        magnitude = torch.maximum(b32.abs(), start.float().abs())
        worst_excess = max(worst_excess, (diff - (atol + rtol * magnitude)).max().item())
        if not torch.isfinite(a32).all():
            worst_excess = math.inf
    return CheckResult(
        peer=name, dtype=str(dtype).removeprefix("torch."), steps=steps, window_size=window_size,
        max_abs_diff=max_abs_diff, worst_excess=worst_excess, passed=worst_excess <= 0,
        norm_rel_error=norm_errors.get("peer"), reference_norm_rel_error=norm_errors.get("reference"),
    )


def _grad_norm_of(optimizer) -> float | None:
    """The last global norm an implementation computed, where it exposes one (SGD does not)."""
    norm = getattr(optimizer, "grad_norm", None)
    return None if norm is None else float(norm)


def small_check_params(device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """Odd shapes, one element and one empty tensor: the quick check that wraps the window."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    shapes = [(7, 13), (1,), (0,), (33,), (4, 3, 3, 3), (1000,)]
    return [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]
