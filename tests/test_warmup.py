"""``warmup_steps=K``: steps 1..K at ``lr * t / K`` recording nothing, then the paper's rule over
the steps after K; on every backend against the reference, with skipped steps inside and after
the warmup, through checkpoints, and validated like ``window_size``."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import (
    assert_history_equal, assert_params_close, copy_params_and_buffers, fused_cases, random_grads, roundtrip,
    set_grads, snapshot, twin_optimizers,
)
from zenith_fused import ZenithFused

SHAPES = [(1,), (37,), (600,), (3, 5, 7), (0,)]
GROUPS = [{"index": [0, 1, 2]}, {"index": [3, 4], "momentum": 0.5, "nesterov": True, "weight_decay": 0.01}]
K, W = 4, 3


def _skips(step: int) -> str | None:
    """Which steps are skipped: a non-finite gradient inside the warmup and after it, and a
    GradScaler overflow (found_inf) in both too."""
    return {1: "nan", 6: "inf", 2: "found_inf", 9: "found_inf"}.get(step)


def _step_both(opt, ref, params, ref_params, grads, skip) -> None:
    if skip in ("nan", "inf"):
        grads = [g.clone() for g in grads]
        grads[1][0] = float(skip)
    set_grads(params, grads)
    set_grads(ref_params, grads)
    for o in (opt, ref):
        device = o.history.device
        o.grad_scale = torch.tensor(2.0, device=device)  # as GradScaler hands them over
        o.found_inf = torch.tensor(1.0 if skip == "found_inf" else 0.0, device=device)
        o.step()
        del o.grad_scale, o.found_inf


@pytest.mark.parametrize("backend,device", fused_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_warmup_matches_the_reference_with_skips_inside_and_after(backend, device, dtype, small_chunks):
    (opt, params), (ref, ref_params) = twin_optimizers(
        SHAPES, GROUPS, dtype=dtype, device=device, backend=backend, window_size=W, warmup_steps=K, lr=0.1,
    )
    gen = torch.Generator().manual_seed(11)
    applied = 0
    for step in range(3 * K + 2 * W):
        skip = _skips(step)
        _step_both(opt, ref, params, ref_params, random_grads(SHAPES, dtype, device, gen, step), skip)
        applied += skip is None
        assert opt.history.step.item() == applied
        assert_history_equal(opt, ref)
        if applied <= K:
            # Inside the warmup: the rate ramps, nothing is recorded.
            assert opt.lr_scale.item() == pytest.approx(max(applied, 1) / K if applied else 1.0)
            assert opt.history.window_max.item() == 0 and not opt.history.norm_window.any()
        assert_params_close(params, ref_params, opt, ref, dtype)
        copy_params_and_buffers(ref_params, ref, params, opt)
    assert applied > K + W and opt.skipped_steps.item() == 4
    assert 0 < ref.lr_scale.item() <= 1 and ref.history.window_max.item() > 0


def test_the_rule_after_the_warmup_is_the_papers_over_the_later_steps():
    """K warmup steps, then exactly what a fresh optimizer without warmup does with the same later
    norms: the window and the maximum start empty at K."""
    norms = [50.0, 40.0, 30.0, 3.0, 2.0, 4.0, 1.0, 5.0]
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    warm = ZenithFused([p], lr=0.1, momentum=0.0, window_size=2, warmup_steps=3, backend="reference")
    plain = ZenithFused([q], lr=0.1, momentum=0.0, window_size=2, backend="reference")
    for t, n in enumerate(norms, start=1):
        p.grad = torch.tensor([n])
        warm.step()
        if t <= 3:
            assert warm.lr_scale.item() == pytest.approx(t / 3)
            continue
        q.grad = torch.tensor([n])
        plain.step()
        assert warm.lr_scale.item() == plain.lr_scale.item()
        assert warm.history.window_max.item() == plain.history.window_max.item()
    # Without the warmup the first norms (50, 40, 30) would have set the maximum.
    assert plain.history.window_max.item() < 30


@pytest.mark.parametrize("backend,device", fused_cases())
def test_warmup_zero_is_the_papers_rule(backend, device, small_chunks):
    """K = 0 against the rule written out in floats: m_t the mean of the last min(t, W) norms,
    M_t their running maximum, scale m_t / M_t."""
    p = nn.Parameter(torch.zeros(1, device=device))
    opt = ZenithFused([p], lr=0.1, window_size=3, warmup_steps=0, backend=backend)
    norms, maximum = [], 0.0
    for n in [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]:
        p.grad = torch.tensor([n], device=device)
        opt.step()
        norms.append(n)
        mean = sum(norms[-3:]) / len(norms[-3:])
        maximum = max(maximum, mean)
        assert opt.lr_scale.item() == pytest.approx(mean / maximum, rel=1e-6)


@pytest.mark.parametrize("backend,device", fused_cases())
@pytest.mark.parametrize("stop", [2, K + 3], ids=["inside", "after"])
def test_a_checkpoint_inside_or_after_the_warmup_resumes_identically(backend, device, stop, small_chunks):
    shapes, groups = SHAPES[:3], [{"index": [0, 1, 2]}]
    (run, run_params), _ = twin_optimizers(shapes, groups, dtype=torch.float32, device=device, backend=backend,
                                           window_size=W, warmup_steps=K)
    (straight, straight_params), _ = twin_optimizers(shapes, groups, dtype=torch.float32, device=device,
                                                     backend=backend, window_size=W, warmup_steps=K)
    gen = torch.Generator().manual_seed(4)
    grads = [random_grads(shapes, torch.float32, device, gen, s) for s in range(2 * K + W)]
    for step in range(stop):
        for opt, ps in ((run, run_params), (straight, straight_params)):
            set_grads(ps, grads[step])
            opt.step()
    saved = roundtrip({"model": [p.detach() for p in run_params], "optim": run.state_dict()})
    assert saved["optim"]["zenith"]["warmup_steps"] == K
    params = [p.clone().to(device).requires_grad_() for p in saved["model"]]
    resumed = ZenithFused(params, backend=backend, window_size=W, warmup_steps=K)
    resumed.load_state_dict(saved["optim"])
    for step in range(stop, len(grads)):
        for opt, ps in ((resumed, params), (straight, straight_params)):
            set_grads(ps, grads[step])
            opt.step()
    assert snapshot(resumed, params).keys() == snapshot(straight, straight_params).keys()
    for (k, a), b in zip(snapshot(resumed, params).items(), snapshot(straight, straight_params).values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("value", [-1, 1.5, True, "3", 2**62])
def test_invalid_warmup_steps_is_refused(value):
    with pytest.raises(ValueError, match=rf"Invalid warmup_steps value: {value}"):
        ZenithFused([nn.Parameter(torch.zeros(1))], warmup_steps=value)


def test_warmup_steps_is_global_not_per_group():
    opt = ZenithFused([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="warmup_steps is shared by all parameter groups"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "warmup_steps": 3})


def test_a_checkpoint_with_another_warmup_is_refused_and_an_old_one_loads_as_zero():
    ps = [nn.Parameter(torch.zeros(2))]
    saved = ZenithFused(ps, warmup_steps=5).state_dict()
    with pytest.raises(ValueError, match="loaded state dict has warmup_steps 5, this optimizer has 0"):
        ZenithFused(ps).load_state_dict(saved)
    old = ZenithFused(ps).state_dict()
    del old["zenith"]["warmup_steps"]  # written before the option existed
    ZenithFused(ps).load_state_dict(old)
    with pytest.raises(ValueError, match="loaded state dict has warmup_steps 0, this optimizer has 5"):
        ZenithFused(ps, warmup_steps=5).load_state_dict(old)


def test_warmup_lr_reads_t_over_k_in_the_effective_rate():
    p = nn.Parameter(torch.zeros(3))
    opt = ZenithFused([p], lr=0.2, momentum=0.0, warmup_steps=4, backend="reference")
    for t in range(1, 5):
        p.grad = torch.ones(3)
        before = p.detach().clone()
        opt.step()
        assert opt.stats()["lr"] == pytest.approx([0.2 * t / 4])
        assert torch.allclose(before - p.detach(), torch.full((3,), 0.2 * t / 4))
    assert math.isclose(opt.lr_scale.item(), 1.0)
