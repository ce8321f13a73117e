"""One plan for every way a step runs: eager, torch.compile, and a warmed-up (capturable) step.

Here: memory under torch.compile with the default zero_grad(), the ops a steady step makes
(recorded, not timed), no recompilation, and backend choice from the declared capabilities.
"""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_history_equal, skip_if_unavailable
from zenith_fused import ZenithFused
from zenith_fused import _engines

CPU_BACKENDS = ("reference", "cpu", "triton")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)


def _tensors_held(root: object) -> set[int]:
    """ids of every tensor reachable from ``root`` through Python references (not through other
    tensors' autograd graphs: a tensor's own referents are not followed)."""
    seen, found, stack = set(), set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.add(id(obj))
            continue
        if isinstance(obj, (type, type(gc), weakref.ref)) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        stack.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_keeps_no_gradient_alive(backend):
    """50 compiled steps with zero_grad(set_to_none=True): after zero_grad no earlier gradient is
    alive (weak references), and the optimizer holds no more tensors than after step 2."""
    skip_if_unavailable(backend)
    torch._dynamo.reset()
    model = _model()
    opt = ZenithFused(model.parameters(), lr=0.05, window_size=4, backend=backend)
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    old_grads: list[weakref.ref] = []
    held_after_two = None
    for i in range(50):
        x, y = _batch(i)
        opt.zero_grad()  # set_to_none=True, torch's default
        assert all(ref() is None for ref in old_grads), f"step {i}: an earlier gradient is still alive"
        nn.functional.cross_entropy(model(x), y).backward()
        old_grads = [weakref.ref(p.grad) for p in model.parameters()]
        step()
        if i == 1:
            held_after_two = len(_tensors_held(opt))
    opt.zero_grad()
    gc.collect()
    assert all(ref() is None for ref in old_grads)
    assert len(_tensors_held(opt)) <= held_after_two
    assert opt.history.step.item() == 50


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_never_recompiles(backend):
    """One graph from the first step: a float lr rewritten by a scheduler, gradients replaced by
    zero_grad(), and a changing scale are all read inside the op, never guarded on."""
    skip_if_unavailable(backend)
    torch._dynamo.reset()
    eager_model, compiled_model = _model(), _model()
    eager = ZenithFused(eager_model.parameters(), lr=0.1, window_size=3, backend=backend)
    compiled = ZenithFused(compiled_model.parameters(), lr=0.1, window_size=3, backend=backend)
    # Compiled before the schedulers wrap opt.step (torch's scheduler wrapper is not traceable).
    compiled_step = torch.compile(compiled.step, fullgraph=True, backend="eager")
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (eager, compiled)]
    for i in range(8):
        x, y = _batch(i)
        with torch._dynamo.config.patch(error_on_recompile=i >= 1):
            for model, opt, step_fn in ((eager_model, eager, eager.step), (compiled_model, compiled, compiled_step)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                step_fn()
        for s in schedulers:
            s.step()
    assert_history_equal(compiled, eager)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)  # the same plan and engines: the same bits


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), args))
        return func(*args, **(kwargs or {}))


def _not_capturable(ops: list[tuple[str, tuple]]) -> list[str]:
    """The ops a captured step could not replay as they ran: allocations, copies that cross
    devices or move more than a scalar, host reads. Allowed: the backend's own operators, torch's
    profiler markers, and the one in-device scalar copy that converts a tensor lr of another dtype
    into a table's lr cell (a view, then a 0-dim copy_ on one device)."""
    bad = []
    for name, args in ops:
        if name.startswith(("zenith_fused.", "profiler.")) or name == "aten.view.default":
            continue
        if name == "aten.copy_.default":
            dst, src = args[0], args[1]
            if dst.dim() == 0 and src.dim() == 0 and dst.device == src.device:
                continue
        bad.append(name)
    return bad


@pytest.mark.parametrize("lr", ["tensor", "float"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_steady_step_only_calls_the_kernels(backend, lr, monkeypatch):
    """The CUDA-graph recipe on the CPU: after a warm-up step with static gradients, a step
    dispatches no allocation and no copy to or from the host, only the backend's kernels: the
    "cpu" engine's torch.ops.zenith_fused, or the Triton launchers (replaced by recorders here:
    the interpreter itself computes with torch tensors; on a GPU a launch dispatches nothing)."""
    skip_if_unavailable(backend)
    params = [nn.Parameter(torch.randn(s)) for s in [(300,), (7, 5), (1,), (0,)]]
    params.append(nn.Parameter(torch.randn(9, dtype=torch.float64)))
    lr_value = torch.tensor(0.1) if lr == "tensor" else 0.1
    opt = ZenithFused([{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.01}],
                      lr=lr_value, window_size=3, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)  # static: the same tensors at every step
    opt.step()  # warm-up: plan, tables, momentum buffers
    launches = []
    if backend == "triton":
        import zenith_fused.triton_kernels as kernels

        for name in ("sq_norm_partials", "update_history", "momentum_update"):
            monkeypatch.setattr(kernels, name, lambda *a, _n=name, **k: launches.append(_n))
    for _ in range(3):
        for p in params:
            p.grad.copy_(torch.randn_like(p))  # new values in place, as a captured graph's input copies
        with _RecordOps() as record:
            opt.step()
        assert _not_capturable(record.ops) == [], "a steady step dispatched these"
    calls = launches if backend == "triton" else [n for n, _ in record.ops if n.startswith("zenith_fused.")]
    assert len(calls) == (15 if backend == "triton" else 5)  # 2 buckets: 2 + 1 + 2 per step


def test_float8_runs_on_the_reference_under_auto_with_one_warning(monkeypatch):
    monkeypatch.setattr(_engines, "_warned", set())
    p = nn.Parameter(torch.randn(6).to(torch.float8_e4m3fn))
    q = nn.Parameter(torch.randn(6))
    with pytest.warns(RuntimeWarning, match="no fused backend runs torch.float8_e4m3fn parameters on cpu") as record:
        opt = ZenithFused([p, q], lr=0.1)
    assert len(record) == 1
    assert opt.backends[(torch.device("cpu"), torch.float8_e4m3fn)] == "reference"
    reference = ZenithFused([nn.Parameter(p.detach().clone())], lr=0.1, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZenithFused([nn.Parameter(torch.randn(2).to(torch.float8_e4m3fn))])  # said once already
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        g = torch.randn(6, generator=gen).to(torch.float8_e4m3fn)
        p.grad, q.grad = g.clone(), torch.zeros(6)
        reference.param_groups[0]["params"][0].grad = g.clone()
        opt.step()
        reference.step()
    assert torch.equal(p.view(torch.uint8), reference.param_groups[0]["params"][0].view(torch.uint8))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_an_explicit_fused_backend_refuses_float8_at_construction(backend):
    skip_if_unavailable(backend)
    p = nn.Parameter(torch.randn(6).to(torch.float8_e4m3fn))
    with pytest.raises(RuntimeError, match=rf"backend '{backend}' cannot run: backend '{backend}' runs bfloat16, "
                                           r"float16, float32, float64 parameters; got torch.float8_e4m3fn"):
        ZenithFused([p], backend=backend)
    opt = ZenithFused([nn.Parameter(torch.randn(2))], backend=backend)
    with pytest.raises(RuntimeError, match="got torch.float8_e4m3fn"):
        opt.add_param_group({"params": [p]})


def test_the_traced_step_op_keeps_no_optimizer_alive():
    from zenith_fused import _traced

    opt = ZenithFused([nn.Parameter(torch.randn(3))])
    handle = opt._handle
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert handle not in _traced._STEPS


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_gradient_freed_then_absent_is_not_taken_for_the_old_one(backend):
    """The plan holds gradients weakly: a gradient that was freed and is now None must not look
    like "unchanged" (a dead weak reference also gives None)."""
    skip_if_unavailable(backend)
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = ZenithFused([a, b], lr=0.1, momentum=0.0, window_size=2, backend=backend)
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((2,), 2.0)
    opt.step()
    a.grad, b.grad = torch.full((3,), 1.0), None  # b's old gradient is freed here
    before = b.detach().clone()
    opt.step()
    assert opt.grad_norm.item() == pytest.approx(3**0.5)
    assert torch.equal(b.detach(), before)
