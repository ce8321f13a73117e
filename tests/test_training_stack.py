"""ZenithFused inside a real training stack: GradScaler, clipping, tensor lr and schedulers,
torch.compile, CUDA graphs, checkpoints and logging."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import (
    assert_bit_identical,
    assert_history_equal,
    assert_params_close,
    backend_unavailable,
    random_grads,
    roundtrip,
    set_grads,
    snapshot,
    twin_optimizers,
)
from zenith_fused import ZenithFused


def cpu_backends(*names):
    """Backends on CPU tensors, each skipped with its reason when it cannot run here."""
    out = []
    for name in names:
        reason = backend_unavailable(name, "cpu")
        out.append(pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [], id=name))
    return out


ALL_CPU = cpu_backends("reference", "cpu", "triton")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


def batch(step, device="cpu"):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=gen).to(device)
    y = torch.randint(0, 4, (16,), generator=gen).to(device)
    return x, y


# ------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grad_scaler_matches_unscale_then_reference(backend, amp_dtype):
    """Fused: the scale goes into the kernels. Unfused: scaler.unscale_ writes unscaled gradients,
    then the reference steps. Steps 3 and 7 overflow (an inf gradient, as fp16 overflow makes)."""
    fused_model, ref_model = tiny_model(), tiny_model()
    fused = ZenithFused(fused_model.parameters(), window_size=3, backend=backend)
    ref = ZenithFused(ref_model.parameters(), window_size=3, backend="reference")
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    for step in range(10):
        x, y = batch(step)
        for model, opt, scaler, unfused in ((fused_model, fused, scalers[0], False), (ref_model, ref, scalers[1], True)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=amp_dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if step in (3, 7):
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            if unfused:
                scaler.unscale_(opt)
            before = snapshot(opt, list(model.parameters()))
            scaler.step(opt)
            scaler.update()
            if step in (3, 7):
                assert_bit_identical(before, snapshot(opt, list(model.parameters())))
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_history_equal(fused, ref)
    assert fused.skipped_steps.item() == 2
    # Gradients are float32 here, so unscaling inside the kernel is the same arithmetic as
    # unscale_ followed by the step: float32 tolerance.
    assert_params_close(list(fused_model.parameters()), list(ref_model.parameters()), fused, ref, torch.float32)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_fp16_parameters_overflow_leaves_state_bit_identical_and_continues(backend):
    """Pure fp16 training with GradScaler: the overflow step changes nothing; later steps go on as
    if it never happened (compared with a twin that never saw it)."""
    shapes = [(40,), (3, 7)]
    (opt, params), (twin, twin_params) = twin_optimizers(
        shapes, [{"index": [0, 1], "dampening": 0.2}], dtype=torch.float16, device="cpu", backend=backend, window_size=2
    )
    scale = torch.tensor(256.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        grads = random_grads(shapes, torch.float16, "cpu", gen, step)
        overflow = step in (0, 3)
        set_grads(params, [g * 256 for g in grads])
        if overflow:
            params[1].grad.view(-1)[2] = float("inf")
        opt.grad_scale, opt.found_inf = scale, torch.tensor(float(overflow))
        before = snapshot(opt, params)
        opt.step()
        del opt.grad_scale, opt.found_inf
        if overflow:
            assert_bit_identical(before, snapshot(opt, params))
            continue
        set_grads(twin_params, grads)
        twin.step()
        assert_history_equal(opt, twin, skipped=False)
    assert opt.skipped_steps.item() == 2
    for p, q in zip(params, twin_params):  # fp16 storage: one fp16 ulp
        torch.testing.assert_close(p, q, atol=2e-3, rtol=2**-10)


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("backend", ALL_CPU)
def test_clipping_matches_clip_grad_norm_then_sgd(backend):
    """Independent check with torch's own pieces: clip_grad_norm_ + torch.optim.SGD at lr * scale."""
    model, twin = tiny_model(), tiny_model()
    max_norm = 0.5
    opt = ZenithFused(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3, window_size=4,
                      max_grad_norm=max_norm, backend=backend)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    clipped_steps = 0
    for step in range(12):
        x, y = batch(step)
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            (nn.functional.cross_entropy(m(x), y) * (1 + step % 3)).backward()
        opt.step()
        total = nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        clipped_steps += int(total.item() > max_norm)
        torch.testing.assert_close(opt.grad_norm, total, atol=0, rtol=1e-6)
        sgd.param_groups[0]["lr"] = 0.2 * opt.lr_scale.item()
        sgd.step()
    assert clipped_steps >= 6  # the test exercises clipping, not only the pass-through
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_window_records_the_unclipped_norm():
    p = nn.Parameter(torch.zeros(2))
    opt = ZenithFused([p], lr=1.0, momentum=0.0, window_size=2, max_grad_norm=1.0, backend="reference")
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert opt.history.norm_window.tolist() == [5.0, 0.0]
    torch.testing.assert_close(p.detach(), -torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))


# ------------------------------------------------------------------ tensor lr and schedulers
@pytest.mark.parametrize("backend", ALL_CPU)
def test_tensor_lr_with_warmup_scheduler_matches_float_lr(backend):
    def run(lr):
        model = tiny_model()
        opt = ZenithFused(model.parameters(), lr=lr, window_size=3, backend=backend)
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
        effective = []
        for step in range(10):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            warmup.step()
            effective.append(opt.stats()["lr"][0])
        return model, opt, effective

    tensor_model, tensor_opt, tensor_lrs = run(torch.tensor(0.1))
    float_model, float_opt, float_lrs = run(0.1)
    assert isinstance(tensor_opt.param_groups[0]["lr"], torch.Tensor)
    assert tensor_lrs == pytest.approx(float_lrs, rel=1e-6)
    assert tensor_lrs[0] == pytest.approx(0.1 * 0.28, rel=1e-6)  # warmup factor after one step
    for p, q in zip(tensor_model.parameters(), float_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_stats_reads_everything_at_once():
    ps = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    opt = ZenithFused([{"params": [ps[0]]}, {"params": [ps[1]], "lr": torch.tensor(0.5)}], lr=0.1, window_size=2)
    for g in ([3.0, 4.0], [0.0, 1.0]):
        for p in ps:
            p.grad = torch.tensor(g)
        opt.step()
    stats = opt.stats()
    # Norms 5*sqrt(2) then sqrt(2): means 7.07 and 4.24, scale 0.6.
    assert stats["step"] == 2 and stats["skipped_steps"] == 0
    assert stats["grad_norm"] == pytest.approx(2**0.5, rel=1e-6)
    assert stats["lr_scale"] == pytest.approx(0.6, rel=1e-6)
    assert stats["lr"] == pytest.approx([0.06, 0.3], rel=1e-6)


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", ALL_CPU)
def test_compiled_step_equals_eager_without_graph_breaks(backend):
    """opt.step() compiled as one graph (fullgraph=True fails on any graph break), with a tensor
    lr so the changing scale is data, not a recompilation."""
    torch._dynamo.reset()
    eager_model, compiled_model = tiny_model(), tiny_model()
    eager = ZenithFused(eager_model.parameters(), lr=torch.tensor(0.1), window_size=3, backend=backend)
    compiled = ZenithFused(compiled_model.parameters(), lr=torch.tensor(0.1), window_size=3, backend=backend)
    # Inductor for the reference (its ops get fused); the fused backends are opaque ops already.
    compiled_step = torch.compile(compiled.step, fullgraph=True, backend="inductor" if backend == "reference" else "eager")
    for step in range(8):
        x, y = batch(step)
        # After the first two steps (the momentum buffers appear in the first), the changing
        # scale must not trigger a recompilation.
        with torch._dynamo.config.patch(error_on_recompile=step >= 2):
            for model, opt, step_fn in ((eager_model, eager, eager.step), (compiled_model, compiled, compiled_step)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                step_fn()
    assert_history_equal(compiled, eager)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert 0 < compiled.lr_scale.item() < 1


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resume_from_checkpoint_equals_uninterrupted_run(backend, dtype):
    shapes = [(50,), (4, 6)]
    groups = [{"index": [0], "dampening": 0.1}, {"index": [1], "momentum": 0.5, "nesterov": True}]
    (run, run_params), _ = twin_optimizers(shapes, groups, dtype=dtype, device="cpu", backend=backend, window_size=3)
    (straight, straight_params), _ = twin_optimizers(
        shapes, groups, dtype=dtype, device="cpu", backend=backend, window_size=3
    )
    gen = torch.Generator().manual_seed(8)
    grads = [random_grads(shapes, dtype, "cpu", gen, s) for s in range(10)]
    for step in range(5):
        for opt, ps in ((run, run_params), (straight, straight_params)):
            set_grads(ps, grads[step])
            opt.step()
    saved = roundtrip({"model": [p.detach() for p in run_params], "optim": run.state_dict()})
    zenith = saved["optim"]["zenith"]
    assert zenith["norm_window"].dtype == torch.float32 and zenith["lr_scale"].dtype == torch.float32
    assert zenith["step"].dtype == torch.int64 and zenith["skipped_steps"].dtype == torch.int64
    assert saved["optim"]["state"][0]["momentum_buffer"].dtype == dtype

    params = [p.clone().requires_grad_() for p in saved["model"]]
    resumed = ZenithFused(
        [{"params": [params[i] for i in g["index"]], **{k: v for k, v in g.items() if k != "index"}} for g in groups],
        backend=backend, window_size=3,
    )
    resumed.load_state_dict(saved["optim"])
    assert resumed.history.norm_window.dtype == torch.float32
    assert resumed.state[params[0]]["momentum_step"].dtype == torch.int64
    for step in range(5, 10):
        for opt, ps in ((resumed, params), (straight, straight_params)):
            set_grads(ps, grads[step])
            opt.step()
    assert_history_equal(resumed, straight)
    for p, q in zip(params, straight_params):  # same backend, same inputs: the same bits
        assert torch.equal(p, q)


def test_unknown_state_dict_version_is_rejected_with_the_fix():
    ps = [nn.Parameter(torch.zeros(2))]
    saved = ZenithFused(ps, window_size=2).state_dict()
    saved["zenith"]["version"] = 99
    with pytest.raises(ValueError, match="Unsupported ZenithFused state_dict version: 99"):
        ZenithFused(ps, window_size=2).load_state_dict(saved)


# ------------------------------------------------------------------ CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_equals_eager(backend):
    reason = backend_unavailable(backend, "cuda")
    if reason:
        pytest.skip(reason)
    shapes = [(1000,), (33, 7), (1,)]
    (opt, params), (eager, eager_params) = twin_optimizers(
        shapes, [{"index": [0, 1, 2]}], dtype=torch.float32, device="cuda", backend=backend, window_size=3,
        lr=torch.tensor(0.1, device="cuda"),
    )
    static_grads = [torch.zeros(s, device="cuda") for s in shapes]
    for p, g in zip(params, static_grads):
        p.grad = g
    gen = torch.Generator().manual_seed(0)
    grads = [random_grads(shapes, torch.float32, "cuda", gen, s) for s in range(8)]
    # Warm up on a side stream (tables, buffers), as torch's capture recipe does.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for g, new in zip(static_grads, grads[0]):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    set_grads(eager_params, grads[0])
    eager.step()
    for step in range(1, 8):
        for g, new in zip(static_grads, grads[step]):
            g.copy_(new)
        graph.replay()
        set_grads(eager_params, grads[step])
        eager.step()
    torch.cuda.synchronize()
    assert_history_equal(opt, eager)
    assert_params_close(params, eager_params, opt, eager, torch.float32)
