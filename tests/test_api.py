"""Constructor checks, backend choice, state_dict, the no-sync promise, and a real training run."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import (
    assert_bit_identical,
    assert_history_equal,
    assert_params_close,
    fused_cases,
    random_grads,
    roundtrip,
    set_grads,
    snapshot,
    twin_optimizers,
)
from zenith_fused import ZenithFused
from zenith_fused._engines import resolve_backend


def params(n=2):
    return [torch.randn(3, requires_grad=True) for _ in range(n)]


# ------------------------------------------------------------------ invalid input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
        (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
        (dict(weight_decay=-1e-4), ValueError, "Invalid weight_decay value: -0.0001"),
        (dict(window_size=0), ValueError, "Invalid window_size value: 0"),
        (dict(window_size=2.5), ValueError, "Invalid window_size value: 2.5"),
        (dict(window_size=True), ValueError, "Invalid window_size value: True"),
        (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
        (dict(nesterov=True, dampening=0.1), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
        (dict(backend="fastest"), ValueError, "Invalid backend: 'fastest'"),
        (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
        (dict(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate: -0.1"),
        (dict(lr=torch.tensor(1)), ValueError, "Tensor lr must be a floating-point tensor; got torch.int64"),
        (dict(max_grad_norm=0.0), ValueError, "Invalid max_grad_norm value: 0.0"),
        (dict(max_grad_norm=-1), ValueError, "Invalid max_grad_norm value: -1"),
        (dict(max_grad_norm=float("inf")), ValueError, "Invalid max_grad_norm value: inf"),
        (dict(max_grad_norm=True), ValueError, "Invalid max_grad_norm value: True"),
        (dict(max_grad_norm=torch.tensor([1.0, 2.0])), ValueError, "a tensor must hold one real number"),
        (dict(max_grad_norm=torch.tensor(-2.0)), ValueError, "Invalid max_grad_norm value: -2.0"),
    ],
)
def test_invalid_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ZenithFused(params(), **kwargs)


def test_integer_parameters_are_rejected():
    with pytest.raises(ValueError, match="optimizes floating-point and complex parameters; got torch.int64"):
        ZenithFused([torch.zeros(2, dtype=torch.int64)])


def test_max_grad_norm_accepts_a_number_or_a_one_element_tensor():
    assert ZenithFused(params(), max_grad_norm=torch.tensor(1.5)).max_grad_norm == 1.5
    assert ZenithFused(params(), max_grad_norm=2).max_grad_norm == 2.0


@pytest.mark.parametrize(
    "group,match",
    [
        ({"window_size": 5}, "window_size is shared by all parameter groups"),
        ({"max_grad_norm": 1.0}, "max_grad_norm is shared by all parameter groups"),
        ({"backend": "reference"}, "backend is shared by all parameter groups"),
        ({"process_group": None}, "process_group is shared by all parameter groups"),
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"momentum": 0.0, "nesterov": True}, "Nesterov momentum requires"),
        ({"params": [torch.zeros(2, dtype=torch.int32)]}, "floating-point and complex parameters"),
    ],
)
def test_invalid_param_group_leaves_optimizer_unchanged(group, match):
    opt = ZenithFused(params())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": params(1), **group})
    assert len(opt.param_groups) == 1
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sparse_gradient_raises_and_changes_nothing(backend):
    ps = params(2)
    opt = ZenithFused(ps, backend=backend)
    ps[0].grad = torch.ones(3)
    ps[1].grad = torch.ones(3).to_sparse()
    before = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, ps))
    assert opt.history.step.item() == 0


def test_group_written_with_invalid_value_raises_at_step_and_changes_nothing():
    ps = params(2)
    opt = ZenithFused(ps)
    for p in ps:
        p.grad = torch.ones(3)
    opt.param_groups[0]["lr"] = -3.0
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match="Invalid learning rate: -3.0"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, ps))


def test_non_contiguous_parameter_on_a_fused_backend_raises_clearly():
    base = torch.randn(6, 4)
    p = torch.nn.Parameter(base.t())  # a transposed view is dense; a strided slice is not
    q = torch.nn.Parameter(torch.randn(8, 4)[::2])
    opt = ZenithFused([p, q], backend="triton")
    p.grad = torch.ones_like(p)
    q.grad = torch.ones(4, 4).t().contiguous().t()[:, :]  # same values, other strides
    before = snapshot(opt, [p, q])
    with pytest.raises(RuntimeError, match=r"need each parameter dense .* shape \(4, 4\)"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, [p, q]))


@pytest.mark.parametrize("backend,device", fused_cases())
def test_channels_last_and_transposed_parameters_work(backend, device, small_chunks):
    def build():
        torch.manual_seed(0)
        conv = torch.randn(8, 3, 5, 5).to(device).contiguous(memory_format=torch.channels_last)
        return [torch.nn.Parameter(conv), torch.nn.Parameter(torch.randn(7, 9, device=device).t())]

    ps, rs = build(), build()
    opt, ref = ZenithFused(ps, backend=backend, window_size=3), ZenithFused(rs, backend="reference", window_size=3)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        for p, r in zip(ps, rs):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad = torch.empty_like(p).copy_(g)  # same strides as the parameter, as autograd makes
            r.grad = torch.empty_like(r).copy_(g)
        opt.step()
        ref.step()
    assert ps[0].is_contiguous(memory_format=torch.channels_last)
    assert_params_close(ps, rs, opt, ref, torch.float32)


# ------------------------------------------------------------------ backend choice
def test_explicit_triton_backend_without_gpu_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run: backend 'triton' runs on cuda tensors \\(CPU tensors only under TRITON_INTERPRET=1\\)"):
        ZenithFused(params(), backend="triton")


def test_explicit_cuda_backend_on_cpu_parameters_raises():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: backend 'cuda' runs on cuda tensors"):
        ZenithFused(params(), backend="cuda")


def test_auto_never_picks_the_interpreter_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) in ("cpu", "reference")


# ------------------------------------------------------------------ behaviour
def test_parameters_without_gradient_are_untouched():
    ps = params(3)
    opt = ZenithFused(ps)
    ps[0].grad = torch.ones(3)
    untouched = ps[1].detach().clone()
    opt.step()
    assert torch.equal(ps[1], untouched)
    assert ps[1] not in opt.state and ps[2] not in opt.state
    assert not torch.equal(ps[0], untouched)


def test_step_without_any_gradient_does_nothing():
    ps = params(2)
    opt = ZenithFused(ps)
    before = snapshot(opt, ps)
    opt.step()
    assert_bit_identical(before, snapshot(opt, ps))


def test_closure_loss_is_returned():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    opt = ZenithFused([p], lr=0.1, momentum=0.0)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 4.0
    assert torch.allclose(p, torch.tensor([2.0 - 0.1 * 4.0]))  # first step: scale 1


def test_first_step_matches_torch_sgd():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    q = torch.nn.Parameter(p.detach().clone())
    opt = ZenithFused([p], lr=0.1, momentum=0.9, weight_decay=0.01, window_size=2)
    sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.randn(10)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    sgd.step()
    torch.testing.assert_close(p, q)
    assert opt.lr_scale.item() == 1.0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scale_follows_the_window_mean_over_its_maximum(backend):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ZenithFused([p], lr=0.0, momentum=0.0, window_size=2, backend=backend)
    # Norms 4, 1, 1, 6: window means 4, 2.5, 1, 3.5; maximum 4 throughout.
    for norm, scale in [(4.0, 1.0), (1.0, 0.625), (1.0, 0.25), (6.0, 0.875)]:
        p.grad = torch.tensor([0.0, norm, 0.0])
        opt.step()
        assert opt.grad_norm.item() == norm
        assert opt.lr_scale.item() == pytest.approx(scale, rel=1e-6)
    assert opt.history.window_max.item() == 4.0


def test_lr_scheduler_composes_with_the_scale():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5))]
    rs = [torch.nn.Parameter(ps[0].detach().clone())]
    opt = ZenithFused(ps, lr=1.0, window_size=3)
    ref = ZenithFused(rs, lr=1.0, window_size=3, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    for step in range(8):
        g = torch.randn(5)
        ps[0].grad, rs[0].grad = g.clone(), g.clone()
        ref.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        opt.step()
        ref.step()
        sched.step()
    torch.testing.assert_close(ps[0], rs[0])
    assert opt.param_groups[0]["lr"] == 1.0  # the base rate, never the scaled one


# ------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("source,target", [("triton", "reference"), ("reference", "triton"), ("triton", "triton")])
def test_state_dict_round_trip_across_backends_continues_identically(source, target, small_chunks):
    shapes = [(300,), (5, 7), (1,)]
    groups = [{"index": [0, 1], "momentum": 0.9, "dampening": 0.2}, {"index": [2], "momentum": 0.5, "nesterov": True}]
    (run, run_params), (straight, straight_params) = twin_optimizers(
        shapes, groups, dtype=torch.float32, device="cpu", backend=source, window_size=4
    )
    gen = torch.Generator().manual_seed(4)
    grads = [random_grads(shapes, torch.float32, "cpu", gen, s) for s in range(14)]
    for step in range(6):
        for opt, ps in ((run, run_params), (straight, straight_params)):
            set_grads(ps, grads[step])
            opt.step()
    saved = roundtrip(run.state_dict())
    assert saved["zenith"]["version"] == 1
    assert saved["zenith"]["norm_window"].dtype == torch.float32
    assert saved["zenith"]["step"].dtype == torch.int64

    resumed_params = [p.detach().clone().requires_grad_() for p in run_params]
    resumed = ZenithFused(
        [{"params": [resumed_params[i] for i in g["index"]], **{k: v for k, v in g.items() if k != "index"}}
         for g in groups],
        backend=target, window_size=4,
    )
    resumed.load_state_dict(saved)
    assert_history_equal(resumed, straight)
    for step in range(6, 14):
        for opt, ps in ((resumed, resumed_params), (straight, straight_params)):
            set_grads(ps, grads[step])
            opt.step()
    assert_history_equal(resumed, straight)
    assert_params_close(resumed_params, straight_params, resumed, straight, torch.float32)


def test_load_state_dict_with_other_window_size_raises():
    ps = params()
    saved = ZenithFused(ps, window_size=5).state_dict()
    with pytest.raises(ValueError, match="loaded state dict has window_size 5, this optimizer has 7"):
        ZenithFused(ps, window_size=7).load_state_dict(saved)


def test_torch_sgd_state_dict_loads_and_starts_a_fresh_history():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    q = torch.nn.Parameter(p.detach().clone())
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    for _ in range(3):
        p.grad = torch.randn(6)
        sgd.step()
    q.data.copy_(p.data)
    opt = ZenithFused([q], lr=0.1, momentum=0.9, dampening=0.5)
    opt.load_state_dict(roundtrip(sgd.state_dict()))
    g = torch.randn(6)
    p.grad, q.grad = g.clone(), g.clone()
    sgd.step()
    opt.step()  # first ZENITH step: scale 1, and the loaded buffer is not treated as fresh
    torch.testing.assert_close(q, p)
    assert opt.history.step.item() == 1


# ------------------------------------------------------------------ no host synchronisation
class _NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any read of a tensor value into Python (item, bool, float, int, tolist...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            raise AssertionError(f"host read of a tensor value on the step path: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_step_reads_no_tensor_value_on_the_host(backend, monkeypatch):
    from helpers import skip_if_unavailable

    skip_if_unavailable(backend)
    ps = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(3, 3))]
    # Every step-time input at once: a tensor lr, clipping, and GradScaler's two tensors.
    opt = ZenithFused(ps, lr=torch.tensor(0.1), backend=backend, window_size=2, dampening=0.1, max_grad_norm=1.0)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for bad in ("tolist", "numpy", "__array__"):
        monkeypatch.setattr(torch.Tensor, bad, lambda *a, **k: pytest.fail(f"Tensor.{bad} on the step path"))
    with _NoHostReads():
        for step in range(4):
            for p in ps:
                p.grad = torch.randn_like(p) * 1024
            opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(float(step == 2))
            opt.step()
    assert opt.skipped_steps.item() == 1


def test_the_no_sync_check_catches_a_host_read():
    x = torch.ones(())
    with pytest.raises(AssertionError, match="host read"):
        with _NoHostReads():
            float(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_does_not_synchronize():
    ps = [torch.nn.Parameter(torch.randn(1000, device="cuda")), torch.nn.Parameter(torch.randn(7, device="cuda"))]
    opt = ZenithFused(ps, window_size=3)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parameters_on_cpu_and_cuda_share_one_history():
    torch.manual_seed(0)
    a, b = torch.randn(50), torch.randn(30)
    ps = [torch.nn.Parameter(a.cuda()), torch.nn.Parameter(b.clone())]
    rs = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
    opt, ref = ZenithFused(ps, window_size=3), ZenithFused(rs, window_size=3, backend="reference")
    for _ in range(6):
        ga, gb = torch.randn(50), torch.randn(30)
        ps[0].grad, ps[1].grad = ga.cuda(), gb.clone()
        rs[0].grad, rs[1].grad = ga.clone(), gb.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ps[0].cpu(), rs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ps[1], rs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(opt.lr_scale.cpu(), ref.lr_scale)


# ------------------------------------------------------------------ a real model
@pytest.mark.parametrize("backend,device", fused_cases())
def test_small_model_trains_the_same_through_both_backends(backend, device):
    def run(name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
        opt = ZenithFused(model.parameters(), lr=0.1, window_size=5, backend=name)
        data = torch.Generator().manual_seed(1)
        x = torch.randn(64, 8, generator=data).to(device)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        losses = []
        for _ in range(25):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, opt

    fused_losses, fused = run(backend)
    ref_losses, ref = run("reference")
    assert fused_losses[-1] < 0.6 * fused_losses[0]
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    assert fused.lr_scale.item() == pytest.approx(ref.lr_scale.item(), rel=1e-5)
