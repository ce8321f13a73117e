"""What a torch.optim user relies on: ZenithFused accepts what torch.optim.SGD accepts, state follows
its parameter, a resume keeps the momentum, a checkpoint is validated, and nothing is lost silently.
Every CPU backend (Triton under its interpreter) against the reference or against torch's SGD."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import assert_bit_identical, roundtrip, skip_if_unavailable, snapshot

from zenith_fused import ZenithFused

CPU_BACKENDS = ["reference", "cpu", "triton"]


def _sgd_twin(params, **kwargs):
    return torch.optim.SGD([p for p in params], **kwargs)


# ------------------------------------------------------------------ float64
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_is_stepped_in_float64(backend):
    """The issue's example: float32 arithmetic would leave 1.0 and 0.10000000149011612."""
    skip_if_unavailable(backend)
    p = torch.nn.Parameter(torch.tensor([1.0, 0.1], dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = ZenithFused([p], lr=1.0, momentum=0.0, backend=backend)
    sgd = torch.optim.SGD([q], lr=1.0)
    p.grad = torch.full_like(p, 1e-9)
    q.grad = p.grad.clone()
    opt.step()
    sgd.step()
    assert p.tolist() == q.tolist() == [0.999999999, 0.099999999]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_momentum_matches_torch_sgd_in_the_first_step(backend):
    """At step 1 the scale is exactly 1, so ZENITH is SGD: every option, float64, to 1e-15."""
    skip_if_unavailable(backend)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(17,), (3, 4)]]
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init]
    options = dict(lr=0.3, momentum=0.9, weight_decay=0.01, nesterov=True, maximize=True)
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    qs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = ZenithFused(ps, backend=backend, **options)
    sgd = torch.optim.SGD(qs, **options)
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    sgd.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, atol=1e-15, rtol=1e-15)


# ------------------------------------------------------------------ complex and non-dense
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_complex_parameters_step_as_their_real_view(backend):
    skip_if_unavailable("reference" if backend == "auto" else backend)
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(6, 2, generator=gen)
    pc = torch.nn.Parameter(torch.view_as_complex(init.clone()))
    pr = torch.nn.Parameter(init.clone())
    opt = ZenithFused([pc], backend=backend, window_size=2, weight_decay=0.1)
    ref = ZenithFused([pr], backend="reference", window_size=2, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(6, 2, generator=gen)
        pc.grad = torch.view_as_complex(g.clone())
        pr.grad = g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(torch.view_as_real(pc.detach()), pr.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(opt.grad_norm, ref.grad_norm)  # the norm counts |g|^2
    assert opt.state[pc]["momentum_buffer"].dtype == torch.complex64


def test_non_dense_parameters_work_under_auto():
    strided = torch.nn.Parameter(torch.randn(10, 5, 2)[..., 0])  # a non-dense view, as in the issue
    dense = torch.nn.Parameter(torch.randn(7))
    twin = [torch.nn.Parameter(strided.detach().clone()), torch.nn.Parameter(dense.detach().clone())]
    opt = ZenithFused([strided, dense], window_size=2)
    ref = ZenithFused(twin, backend="reference", window_size=2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip([strided, dense], twin):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip([strided, dense], twin):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ shapes of 1-element tensors
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr_shape", [(), (1,), (1, 1)], ids=str)
def test_tensor_lr_of_any_one_element_shape(backend, lr_shape):
    skip_if_unavailable(backend)
    ps = [torch.nn.Parameter(torch.ones(())), torch.nn.Parameter(torch.ones(10))]
    opt = ZenithFused(ps, lr=torch.full(lr_shape, 0.5), momentum=0.0, backend=backend)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(torch.equal(p.detach(), torch.full_like(p, 0.5)) for p in ps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,)], ids=str)
def test_grad_scale_and_found_inf_of_any_one_element_shape(backend, shape):
    skip_if_unavailable(backend)
    p = torch.nn.Parameter(torch.ones(4))
    opt = ZenithFused([p], lr=1.0, momentum=0.0, backend=backend)
    p.grad = torch.full((4,), 8.0)
    opt.grad_scale, opt.found_inf = torch.full(shape, 4.0), torch.zeros(shape)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4,), -1.0))  # 1 - 1.0 * 8 / 4
    torch.testing.assert_close(opt.grad_norm, torch.tensor(4.0))
    opt.found_inf = torch.ones(shape)
    opt.step()
    assert opt.skipped_steps.item() == 1 and torch.equal(p.detach(), torch.full((4,), -1.0))


def test_empty_first_group_works():
    no_decay: list = []
    decay = [torch.nn.Parameter(torch.ones(3))]
    opt = ZenithFused([{"params": no_decay}, {"params": decay, "weight_decay": 0.1}])
    decay[0].grad = torch.ones(3)
    opt.step()
    assert opt.history.step.item() == 1


# ------------------------------------------------------------------ state follows its parameter
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("change", ["double", "half", "channels_last"])
def test_state_follows_a_parameter_changed_after_the_first_step(backend, change):
    """As torch.optim.SGD: the optimizer keeps stepping correctly after the parameter's dtype or
    layout changed, compared with the reference given the same change."""
    skip_if_unavailable(backend)
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(2, 3, 4, 5, generator=gen)
    twins = []
    for name in (backend, "reference"):
        p = torch.nn.Parameter(init.clone())
        twins.append((ZenithFused([p], backend=name, window_size=2), p))
    for step in range(4):
        if step == 2:
            for _, p in twins:
                if change == "double":
                    p.data = p.data.double()
                elif change == "half":
                    p.data = p.data.half()
                else:
                    p.data = p.data.to(memory_format=torch.channels_last)
        g = torch.randn(init.shape, generator=gen)
        for opt, p in twins:
            p.grad = g.to(p.dtype).clone(memory_format=torch.preserve_format)
            if change == "channels_last" and step >= 2:
                p.grad = p.grad.to(memory_format=torch.channels_last)
            opt.step()
    (opt, p), (ref, q) = twins
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == p.dtype and buf.stride() == p.stride()
    tol = dict(atol=1e-3, rtol=1e-3) if p.dtype == torch.float16 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p.detach().float(), q.detach().float(), **tol)
    torch.testing.assert_close(buf.float(), ref.state[q]["momentum_buffer"].float(), **tol)


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loading_without_the_history_keeps_the_momentum(backend):
    """A state dict with momentum buffers but no "zenith" entry (torch's DCP helpers, or the
    history dropped on purpose): the next step gives momentum * buf + d, not d."""
    skip_if_unavailable(backend)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ZenithFused([p], lr=1.0, momentum=0.5, backend=backend)
    p.grad = torch.ones(3)
    for _ in range(2):
        opt.step()
    saved = roundtrip(opt.state_dict())
    del saved["zenith"]
    q = torch.nn.Parameter(p.detach().clone())
    resumed = ZenithFused([q], lr=1.0, momentum=0.5, backend=backend)
    resumed.load_state_dict(saved)
    buf = saved["state"][0]["momentum_buffer"].clone()  # 1.5 after two steps
    q.grad = torch.ones(3)
    resumed.step()  # a fresh history: scale 1
    torch.testing.assert_close(resumed.state[q]["momentum_buffer"], 0.5 * buf + 1)
    torch.testing.assert_close(q.detach(), p.detach() - (0.5 * buf + 1))


# ------------------------------------------------------------------ a checkpoint is input
def _saved(**history):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ZenithFused([p], window_size=4)
    state = opt.state_dict()
    state["zenith"].update(history)
    return p, state


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("step", torch.tensor(-1), "step must be an integer in"),
        ("step", torch.tensor(2**63 - 1), "step must be an integer in"),
        ("skipped_steps", torch.tensor(-3), "skipped_steps must be an integer in"),
        ("norm_window", torch.zeros(3), r"norm_window must be a real tensor of shape \(4,\)"),
        ("norm_window", torch.tensor([1.0, float("nan"), 0.0, 0.0]), "norm_window must hold finite norms"),
        ("norm_window", torch.tensor([1.0, -2.0, 0.0, 0.0]), "norm_window must hold finite norms"),
        ("window_max", torch.tensor(float("inf")), "window_max must be finite and >= 0"),
        ("window_max", torch.tensor(-1.0), "window_max must be finite and >= 0"),
        ("lr_scale", torch.tensor(-0.5), r"lr_scale must be in \[0, 1\]"),
        ("lr_scale", torch.tensor(float("nan")), r"lr_scale must be in \[0, 1\]"),
        ("step", "12", "step must be a number"),
        ("window_max", torch.ones(2), "window_max must be a 1-element real tensor"),
    ],
)
def test_a_corrupt_history_entry_is_refused_naming_the_field(field, value, match):
    p, state = _saved(**{field: value})
    opt = ZenithFused([p], window_size=4)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert_bit_identical(before, snapshot(opt, [p]))


# ------------------------------------------------------------------ a step that raises
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_step_that_raises_has_changed_nothing(backend):
    """Every check runs before the first kernel: a parameter the explicit fused backend cannot
    walk, in the last group, stops the step before any history or parameter changes."""
    skip_if_unavailable(backend)
    good = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 3))]
    bad = torch.nn.Parameter(torch.randn(8, 4)[::2])
    opt = ZenithFused([{"params": good}, {"params": [bad], "lr": 0.01}], backend=backend, window_size=2)
    for p in good:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in good:
        p.grad = torch.randn_like(p)
    bad.grad = torch.randn(4, 4).t().contiguous().t()  # other strides than the parameter's view
    before = snapshot(opt, good + [bad])
    history = {k: v.clone() for k, v in vars(opt.history).items()}
    with pytest.raises(RuntimeError, match="need each parameter dense"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, good + [bad]))
    for name, value in history.items():
        assert torch.equal(getattr(opt.history, name), value), name


# ------------------------------------------------------------------ backends are visible
def test_backends_says_what_runs_each_bucket():
    ps = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = ZenithFused(ps, backend="reference")
    assert dict(opt.backends) == {(torch.device("cpu"), torch.float32): "reference",
                                  (torch.device("cpu"), torch.float64): "reference"}
    with pytest.raises(TypeError):
        opt.backends[(torch.device("cpu"), torch.float32)] = "cpu"


def test_auto_falling_back_to_the_reference_warns_once(monkeypatch):
    from zenith_fused import _engines

    monkeypatch.setattr(_engines, "_warned", set())
    from zenith_fused import _ext

    monkeypatch.setattr(_ext, "unavailable_reason", lambda backend: "not built (test)")
    with pytest.warns(RuntimeWarning, match=r"no fused backend runs torch.float32 parameters on cpu here, so they "
                                            r"run on the pure-PyTorch reference.*\(not built \(test\)\)"):
        opt = ZenithFused([torch.nn.Parameter(torch.randn(3))])
    assert dict(opt.backends) == {(torch.device("cpu"), torch.float32): "reference"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZenithFused([torch.nn.Parameter(torch.randn(3))])


@pytest.mark.skipif(os.environ.get("ZENITH_FUSED_BUILD_EXT") == "0",
                    reason="ZENITH_FUSED_BUILD_EXT=0: the compiled kernels are switched off on purpose")
def test_auto_runs_cpu_tensors_on_the_compiled_kernels():
    """Not skipped in CI: CI builds the extension (ZENITH_FUSED_BUILD_EXT=1), and a package
    without it compiles it on first use, so "auto" must have picked the compiled kernels here."""
    p = torch.nn.Parameter(torch.randn(3))
    assert dict(ZenithFused([p]).backends) == {(torch.device("cpu"), torch.float32): "cpu"}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_low_precision_tensor_lr_is_not_rounded_with_the_scale(backend):
    """A bfloat16 lr of shape [1] must not make lr * scale a bfloat16 product (type promotion
    would let the 1-d tensor win over the 0-dim scale): the reference and the kernels agree."""
    skip_if_unavailable(backend)
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(50, generator=gen)
    lr = torch.tensor([0.1], dtype=torch.bfloat16)
    twins = []
    for name in (backend, "reference"):
        p = torch.nn.Parameter(init.clone())
        twins.append((ZenithFused([p], lr=lr, backend=name, window_size=2), p))
    for step in range(6):
        g = torch.randn(50, generator=gen) / (1 + step)  # falling norms: the scale leaves 1
        for opt, p in twins:
            p.grad = g.clone()
            opt.step()
    (opt, p), (ref, q) = twins
    assert ref.lr_scale.item() < 1
    torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
