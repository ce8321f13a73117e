"""Every fused backend against the reference, on fresh random gradients, past the window's wrap."""
from __future__ import annotations

import pytest
import torch

from helpers import (
    assert_bit_identical,
    assert_history_equal,
    assert_params_close,
    copy_params_and_buffers,
    fused_cases,
    random_grads,
    set_grads,
    snapshot,
    twin_optimizers,
)

# Sizes 0, 1, odd, several chunks and blocks (with the small_chunks fixture), and a 3-d tensor.
SHAPES = [(1,), (7,), (1000,), (3, 5, 7), (0,), (300,), (2, 129)]
# Three groups covering every option: dampening + weight decay; plain SGD without momentum;
# nesterov + maximize at another learning rate.
GROUPS = [
    {"index": [0, 2, 4], "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"index": [1, 6], "momentum": 0.0, "weight_decay": 0.0, "lr": 0.2},
    {"index": [3, 5], "momentum": 0.5, "nesterov": True, "maximize": True, "lr": 0.05, "weight_decay": 0.02},
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_against_reference(backend, device, dtype, shapes, groups, window_size, steps, *, resync, seed=0):
    (opt, params), (ref, ref_params) = twin_optimizers(
        shapes, groups, dtype=dtype, device=device, backend=backend, window_size=window_size, seed=seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        grads = random_grads(shapes, dtype, device, gen, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_history_equal(opt, ref)
        if resync:
            assert_params_close(params, ref_params, opt, ref, dtype)
            copy_params_and_buffers(ref_params, ref, params, opt)
    assert_params_close(params, ref_params, opt, ref, dtype)
    return opt, ref


# Every dtype at windows 1 and 7; in float32 a long window of 70, longer than the interpreter's
# 64 history lanes (so the window sum loops), whose 142 steps are slow under the interpreter.
WINDOW_DTYPE = [(w, d) for w in (1, 7) for d in DTYPES] + [(70, torch.float32)]


@pytest.mark.parametrize("backend,device", fused_cases(slow_on_interpreter=True))
@pytest.mark.parametrize("window_size,dtype", WINDOW_DTYPE, ids=lambda v: str(v).replace("torch.", ""))
def test_every_option_matches_reference(backend, device, dtype, window_size, small_chunks):
    # float32 runs the whole trajectory free; half types are resynchronised after each step (see
    # helpers.TOLERANCES). The window wraps three times; the long one twice.
    steps = (3 if window_size < 70 else 2) * window_size + 2
    opt, ref = run_against_reference(
        backend, device, dtype, SHAPES, GROUPS, window_size, steps, resync=dtype != torch.float32
    )
    assert opt.history.step.item() == steps
    # The scale really moved: a test where it stayed at 1 would not test the window.
    if window_size > 1:
        assert 0.0 < ref.lr_scale.item() < 1.0


@pytest.mark.parametrize("backend,device", fused_cases(slow_on_interpreter=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_tensors(backend, device, dtype, small_chunks):
    gen = torch.Generator().manual_seed(5)
    # The interpreter runs each program in Python (~5 ms): it gets 200 tensors, the compiled
    # kernels 500, one launch either way; window 1.
    count = 200 if backend == "triton" and device == "cpu" else 500
    shapes = [(int(n),) for n in torch.randint(1, 40, (count,), generator=gen)] + [(700,)]
    groups = [
        {"index": list(range(0, count + 1, 2)), "momentum": 0.9, "weight_decay": 0.001},
        {"index": list(range(1, count + 1, 2)), "momentum": 0.8, "nesterov": True, "lr": 0.03},
    ]
    run_against_reference(backend, device, dtype, shapes, groups, 1, 4, resync=dtype != torch.float32)


@pytest.mark.parametrize("backend,device", fused_cases())
def test_parameters_of_several_dtypes_share_one_norm(backend, device, small_chunks):
    shapes = [(33,), (400,), (5, 5)]
    (opt, params), (ref, ref_params) = twin_optimizers(
        shapes, [{"index": [0, 1, 2]}], dtype=torch.float32, device=device, backend=backend, window_size=5
    )
    for ps in (params, ref_params):  # one float32, one bfloat16, one float16 parameter
        ps[1].data = ps[1].data.to(torch.bfloat16)
        ps[2].data = ps[2].data.to(torch.float16)
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        grads = [g.to(p.dtype) for g, p in zip(random_grads(shapes, torch.float32, device, gen, step), params)]
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_history_equal(opt, ref)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.float(), q.float(), atol=1.6e-2, rtol=2**-7)
        copy_params_and_buffers(ref_params, ref, params, opt)


@pytest.mark.parametrize("backend,device", fused_cases())
def test_norm_is_deterministic(backend, device, small_chunks):
    shapes = [(1000,), (77,), (3, 300)]
    twins = [twin_optimizers(shapes, [{"index": [0, 1, 2]}], dtype=torch.float32, device=device,
                             backend=backend, window_size=3)[0] for _ in range(2)]
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        grads = random_grads(shapes, torch.float32, device, gen, step)
        for opt, params in twins:
            set_grads(params, grads)
            opt.step()
        assert torch.equal(twins[0][0].grad_norm, twins[1][0].grad_norm)
    assert_bit_identical(snapshot(*twins[0]), snapshot(*twins[1]))


@pytest.mark.parametrize("backend,device", fused_cases() + [pytest.param("reference", "cpu", id="reference-cpu")])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")], ids=["inf", "nan", "-inf"])
def test_non_finite_gradient_skips_the_step(backend, device, bad, small_chunks):
    """A bad step changes nothing, and the run continues as if it never happened (even when the
    bad step is a buffer's very first, with dampening making the first step special)."""
    shapes = [(1,), (300,), (4, 9)]
    groups = [{"index": [0, 1], "momentum": 0.9, "dampening": 0.3}, {"index": [2], "momentum": 0.0}]
    (opt, params), (ref, ref_params) = twin_optimizers(
        shapes, groups, dtype=torch.float32, device=device, backend=backend, window_size=3
    )
    gen = torch.Generator().manual_seed(2)
    bad_steps = {0, 4, 5}
    for step in range(12):
        grads = random_grads(shapes, torch.float32, device, gen, step)
        if step in bad_steps:
            grads[step % 3].view(-1)[-1] = bad
            set_grads(params, grads)
            before = snapshot(opt, params)
            opt.step()
            assert_bit_identical(before, snapshot(opt, params))
            norm = opt.grad_norm.item()
            assert norm != norm or norm == float("inf")
            continue
        set_grads(params, grads)
        set_grads(ref_params, grads)  # the reference never sees the bad steps
        opt.step()
        ref.step()
        assert opt.history.step.item() == ref.history.step.item()
        assert_params_close(params, ref_params, opt, ref, torch.float32)
    assert opt.skipped_steps.item() == len(bad_steps)
    assert ref.skipped_steps.item() == 0
