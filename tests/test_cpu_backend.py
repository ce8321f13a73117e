"""The compiled CPU backend ("cpu", csrc/cpu/): what is specific to it.

tests/test_conformance.py runs every backend, this one included, through the optimizer's options.
Here: the operators one by one against zenith_fused/reference.py (bit for bit where the math
allows), thread counts, the instruction-set builds, layouts, many tensors, error messages, and
the operators under torch.compile.

Tolerances (helpers.TOLERANCES, helpers.HISTORY_TOL) apply only where the optimizer runs end to
end: the update itself is bit-identical to the reference for an equal lr_scale
(test_update_is_bit_identical_to_reference), but the norm is summed in another order, so lr_scale
may differ in its last float32 bits. In float32 that stays far below (1e-5, 1e-5). In bfloat16 and
float16 it can flip the rounding of a stored value by one unit in the last place of the storage
type, hence one bfloat16 ulp (rtol 2**-7) and one float16 ulp (rtol 2**-10), with the twins
resynchronised after every step so that flips cannot accumulate.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    HISTORY_TOL,
    TOLERANCES,
    assert_bit_identical,
    assert_params_close,
    copy_params_and_buffers,
    random_grads,
    set_grads,
    snapshot,
    twin_optimizers,
)
from zenith_fused import ZenithFused, _ext, reference
from zenith_fused._engines import hyperparam_rows, resolve_backend
from zenith_fused.reference import GroupHyperparams, StepInputs, ZenithHistory

REASON = _ext.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the compiled CPU kernels are unavailable: {REASON}")

DEFAULT_CHUNK = 32768  # CpuEngine.chunk_size
# Sizes 0, 1, below / at / above one vector block and the 32 norm lanes, odd, several chunks of 64.
SHAPES = [(0,), (1,), (7,), (31,), (32,), (33,), (3, 5, 7), (2, 129), (1000,)]
HYPERPARAMS = [
    GroupHyperparams(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False),
    GroupHyperparams(lr=0.2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    GroupHyperparams(lr=0.05, momentum=0.5, dampening=0.0, weight_decay=0.02, nesterov=True, maximize=True),
    GroupHyperparams(lr=0.03, momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=True),
]
# The optimizer-level twin of HYPERPARAMS, as helpers.twin_optimizers takes it.
GROUPS = [
    {"index": [0, 4, 8], "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"index": [1, 5], "momentum": 0.0, "lr": 0.2},
    {"index": [2, 6, 9], "momentum": 0.5, "nesterov": True, "maximize": True, "lr": 0.05, "weight_decay": 0.02},
    {"index": [3, 7], "momentum": 0.8, "maximize": True, "lr": 0.03},
]
GROUP_SHAPES = SHAPES + [(70001,)]  # one tensor of several default-size chunks
# The history against the reference's: HISTORY_TOL, except that the reference's own norm of a
# float16 / bfloat16 gradient (torch.linalg.vector_norm(g, dtype=torch.float32)) is off by up to
# ~3e-6 relative on 70k elements, while the kernels' (32 float32 lanes per chunk, chunks summed in
# float64) stays near 1e-7.
HISTORY_RTOL = {torch.float32: HISTORY_TOL["rtol"], torch.float16: 1e-5, torch.bfloat16: 1e-5}
TOLERANCES_ABS_REL = {dtype: dict(atol=atol, rtol=rtol) for dtype, (atol, rtol) in TOLERANCES.items()}
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF_AND_SINGLE = [torch.float32, torch.float16, torch.bfloat16]


def ops():
    return torch.ops.zenith_fused


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def small_cpu_chunks(monkeypatch):
    """Chunks of 64 elements, so that small tensors span several chunks and threads."""
    from zenith_fused._compiled_engines import CpuEngine

    monkeypatch.setattr(CpuEngine, "chunk_size", 64)


def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


def _update_inputs(dtype, shapes, slots, *, filled_at: int, seed: int = 0):
    """params, grads, momentum buffers and steps, as the optimizer would pass them."""
    gen = torch.Generator().manual_seed(seed)
    params = [_random(s, dtype, gen) for s in shapes]
    grads = [_random(s, dtype, gen) for s in shapes]
    buffers = [_random(s, dtype, gen) if HYPERPARAMS[k].momentum else None for s, k in zip(shapes, slots)]
    steps = [torch.tensor(filled_at) if HYPERPARAMS[k].momentum else None for k in slots]
    return params, grads, buffers, steps


def _clone_all(tensors):
    return [None if t is None else t.clone() for t in tensors]


def _run_update(params, grads, buffers, steps, slots, *, lr_scale, step, applied, chunk_size, grad_multiplier=1.0):
    table = torch.tensor(hyperparam_rows(HYPERPARAMS), dtype=torch.float32)
    ops().momentum_update(
        params, grads, buffers, steps, table, slots, torch.tensor(lr_scale), torch.tensor(step),
        torch.tensor(applied, dtype=torch.int32), torch.tensor(grad_multiplier), chunk_size,
    )


def _update_history(history: ZenithHistory, partials, inputs: StepInputs = StepInputs()):
    ops().update_history(
        partials, history.step, history.norm_window, history.window_max, history.skipped_steps,
        history.grad_norm, history.lr_scale, history.step_applied, history.grad_multiplier,
        inputs.grad_scale, inputs.found_inf, inputs.max_grad_norm,
    )


def _assert_lists_equal(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None
            continue
        assert torch.equal(a, e), f"{what}[{i}] of shape {tuple(e.shape)} differs in {(a != e).sum().item()} elements"


# ------------------------------------------------------------------ the operators, bit for bit
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("filled_at", [0, 5, 3], ids=["never-filled", "filled-this-step", "filled-before"])
@pytest.mark.parametrize("chunk_size", [64, DEFAULT_CHUNK])
@pytest.mark.parametrize("grad_multiplier", [1.0, 0.0123457], ids=["plain", "unscaled-clipped"])
def test_update_is_bit_identical_to_reference(dtype, filled_at, chunk_size, grad_multiplier, threads):
    shapes = GROUP_SHAPES
    slots = [i % len(HYPERPARAMS) for i in range(len(shapes))]
    params, grads, buffers, steps = _update_inputs(dtype, shapes, slots, filled_at=filled_at)
    ref_params, ref_buffers, ref_steps = _clone_all(params), _clone_all(buffers), _clone_all(steps)

    _run_update(params, grads, buffers, steps, slots, lr_scale=0.7312345, step=5, applied=1, chunk_size=chunk_size,
                grad_multiplier=grad_multiplier)
    reference.momentum_update(
        ref_params, grads, ref_buffers, ref_steps, [HYPERPARAMS[k] for k in slots],
        lr_scale=torch.tensor(0.7312345), step=torch.tensor(5), step_applied=torch.tensor(1, dtype=torch.int32),
        grad_multiplier=torch.tensor(grad_multiplier),
    )
    _assert_lists_equal(params, ref_params, "params")
    _assert_lists_equal(buffers, ref_buffers, "momentum_buffers")
    _assert_lists_equal(steps, ref_steps, "momentum_steps")
    # The test would be empty if nothing moved.
    assert not torch.equal(params[-1], _update_inputs(dtype, shapes, slots, filled_at=filled_at)[0][-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skipped_step_changes_nothing(dtype):
    shapes = GROUP_SHAPES
    slots = [i % len(HYPERPARAMS) for i in range(len(shapes))]
    params, grads, buffers, steps = _update_inputs(dtype, shapes, slots, filled_at=0)
    before = (_clone_all(params), _clone_all(buffers), _clone_all(steps))
    _run_update(params, grads, buffers, steps, slots, lr_scale=0.5, step=4, applied=0, chunk_size=64)
    _assert_lists_equal(params, before[0], "params")
    _assert_lists_equal(buffers, before[1], "momentum_buffers")
    _assert_lists_equal(steps, before[2], "momentum_steps")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [64, DEFAULT_CHUNK])
def test_sq_norm_partials_are_per_chunk_and_thread_independent(dtype, chunk_size):
    gen = torch.Generator().manual_seed(3)
    sizes = [0, 1, 31, 32, 33, 1000, 3 * chunk_size + 5, 70001]
    grads = [_random(n, dtype, gen) for n in sizes]
    results = {}
    before = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            results.setdefault(n_threads, []).append(ops().sq_norm_partials(grads, chunk_size))
    finally:
        torch.set_num_threads(before)

    # In float64, of the float32 values the kernels square (float64 gradients are rounded first).
    expected = torch.cat([
        torch.stack([chunk.sum() for chunk in g.float().double().square().split(chunk_size)])
        for g in grads if g.numel()
    ])
    partials = results[1][0]
    assert partials.dtype == torch.float32 and partials.shape == expected.shape
    torch.testing.assert_close(partials.double(), expected, rtol=1e-5, atol=0)
    # Fixed chunks reduced in a fixed order: the same bits on every run and for any thread count.
    for other in results[2]:
        assert torch.equal(other, partials)


@pytest.mark.parametrize("window_size", [1, 7])
@pytest.mark.parametrize(
    "inputs",
    [
        StepInputs(),
        StepInputs(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0)),
        StepInputs(max_grad_norm=0.8),
        StepInputs(grad_scale=torch.tensor(3.0), max_grad_norm=2.5),
    ],
    ids=["plain", "grad-scaler", "clipped", "scaled-and-clipped"],
)
def test_update_history_matches_reference(window_size, inputs):
    gen = torch.Generator().manual_seed(window_size)
    ours = ZenithHistory.zeros(window_size, torch.device("cpu"))
    ref = ZenithHistory.zeros(window_size, torch.device("cpu"))
    steps = 3 * window_size + 4
    level = 1.0 if inputs.grad_scale is None else inputs.grad_scale.item() ** 2
    clipped = 0
    for k in range(steps):
        partials = level * torch.rand(5, generator=gen) * (1.0 + 0.9 * torch.sin(torch.tensor(k * 0.37)))
        if k in (2, steps - 2):
            partials[1] = float("inf")
        if k == 3:
            partials[0] = float("nan")
        _update_history(ours, partials, inputs)
        reference.update_history(ref, partials, inputs)
        assert ours.step.item() == ref.step.item() and ours.skipped_steps.item() == ref.skipped_steps.item()
        assert ours.step_applied.item() == ref.step_applied.item()
        for name in ("grad_norm", "lr_scale", "window_max", "norm_window", "grad_multiplier"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **HISTORY_TOL, equal_nan=True,
                                       msg=lambda m, name=name, k=k: f"step {k}, {name}: {m}")
        clipped += ref.grad_multiplier.item() < 0.999 / level**0.5
    assert ours.skipped_steps.item() == 3
    if inputs.max_grad_norm is not None:
        assert clipped > 0  # the clipping really happened


def test_found_inf_skips_the_step():
    ours = ZenithHistory.zeros(3, torch.device("cpu"))
    for found_inf, applied in ((0.0, 1), (1.0, 0), (0.0, 1)):
        _update_history(ours, torch.tensor([4.0, 5.0]), StepInputs(found_inf=torch.tensor(found_inf)))
        assert ours.step_applied.item() == applied
    assert ours.step.item() == 2 and ours.skipped_steps.item() == 1
    assert ours.norm_window.tolist() == [3.0, 3.0, 0.0]


# Run in a fresh process: ATen reads ATEN_CPU_CAPABILITY once, at its first dispatch.
_ISA_CHILD = r"""
import sys, torch
import zenith_fused._ext as ext
assert ext.unavailable_reason("cpu") is None
inputs = torch.load(sys.argv[1])
out = {"isa": torch.ops.zenith_fused.cpu_kernel_isa(), "partials": {}, "params": {}}
for name, grads in inputs["grads"].items():
    out["partials"][name] = torch.ops.zenith_fused.sq_norm_partials(grads, 64)
for name, (params, grads, buffers, steps, table, slots) in inputs["update"].items():
    torch.ops.zenith_fused.momentum_update(params, grads, buffers, steps, table, slots, torch.tensor(0.75),
                                           torch.tensor(2), torch.tensor(1, dtype=torch.int32), torch.tensor(0.5),
                                           64)
    out["params"][name] = (params, buffers)
torch.save(out, sys.argv[2])
"""
_ISA_ORDER = ["DEFAULT", "AVX2", "AVX512"]


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2"])
def test_every_instruction_set_build_gives_the_same_bits(isa, tmp_path):
    here = ops().cpu_kernel_isa()
    if here not in _ISA_ORDER or _ISA_ORDER.index(isa) >= _ISA_ORDER.index(here):
        pytest.skip(f"this process runs the {here} build; {isa} is compared only against a wider one")
    gen = torch.Generator().manual_seed(11)
    sizes = [1, 31, 33, 64, 1000, 4099]
    inputs = {"grads": {}, "update": {}}
    for dtype in ALL_DTYPES:
        inputs["grads"][str(dtype)] = [_random(n, dtype, gen) for n in sizes]
        slots = [i % len(HYPERPARAMS) for i in range(len(sizes))]
        params, grads, buffers, steps = _update_inputs(dtype, [(n,) for n in sizes], slots, filled_at=1)
        table = torch.tensor(hyperparam_rows(HYPERPARAMS), dtype=torch.float32)
        inputs["update"][str(dtype)] = (params, grads, buffers, steps, table, slots)
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
    result = subprocess.run([sys.executable, "-c", _ISA_CHILD, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["isa"] == isa

    ours = {"isa": here, "partials": {}, "params": {}}
    for name, grads in inputs["grads"].items():
        ours["partials"][name] = ops().sq_norm_partials(grads, 64)
    for name, (params, grads, buffers, steps, table, slots) in inputs["update"].items():
        _run_update(params, grads, buffers, steps, slots, lr_scale=0.75, step=2, applied=1, chunk_size=64,
                    grad_multiplier=0.5)
        ours["params"][name] = (params, buffers)
    for name in ours["partials"]:
        assert torch.equal(ours["partials"][name], theirs["partials"][name]), f"{name} partials: {here} != {isa}"
        _assert_lists_equal(theirs["params"][name][0], ours["params"][name][0], f"{name} params ({isa})")
        _assert_lists_equal(theirs["params"][name][1], ours["params"][name][1], f"{name} buffers ({isa})")


# ------------------------------------------------------------------ the optimizer end to end
def assert_history_close(opt, ref, dtype=torch.float32) -> None:
    a, b = opt.history, ref.history
    assert a.step.item() == b.step.item() and a.skipped_steps.item() == b.skipped_steps.item()
    for name in ("grad_norm", "lr_scale", "window_max", "norm_window"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=HISTORY_TOL["atol"],
                                   rtol=HISTORY_RTOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


def _run_twins(dtype, shapes, groups, window_size, steps, *, seed=0):
    (opt, params), (ref, ref_params) = twin_optimizers(
        shapes, groups, dtype=dtype, device="cpu", backend="cpu", window_size=window_size, seed=seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    resync = dtype != torch.float32
    for step in range(steps):
        grads = random_grads(shapes, dtype, "cpu", gen, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        assert_history_close(opt, ref, dtype)
        if resync:
            assert_params_close(params, ref_params, opt, ref, dtype)
            copy_params_and_buffers(ref_params, ref, params, opt)
    assert_params_close(params, ref_params, opt, ref, dtype)
    return opt, ref


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=str)
@pytest.mark.parametrize("window_size", [1, 7])
def test_optimizer_matches_reference(dtype, window_size, threads, small_cpu_chunks):
    steps = 3 * window_size + 2
    opt, ref = _run_twins(dtype, GROUP_SHAPES, GROUPS, window_size, steps)
    assert opt._backend_for(torch.device("cpu"), dtype) == "cpu"
    assert opt.history.step.item() == steps
    if window_size > 1:
        assert 0.0 < ref.lr_scale.item() < 1.0  # the scale moved, so the window was exercised


def test_optimizer_matches_reference_with_a_long_window():
    shapes = [(5,), (300,), (2, 33)]
    groups = [{"index": [0, 2], "momentum": 0.9, "weight_decay": 0.01}, {"index": [1], "nesterov": True}]
    opt, ref = _run_twins(torch.float32, shapes, groups, window_size=100, steps=302)
    assert 0.0 < ref.lr_scale.item() < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_tensors(dtype, threads, small_cpu_chunks):
    gen = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 40, (600,), generator=gen)] + [(700,), (5000,)]
    groups = [
        {"index": list(range(0, 602, 2)), "momentum": 0.9, "weight_decay": 0.001},
        {"index": list(range(1, 602, 2)), "momentum": 0.8, "nesterov": True, "lr": 0.03},
    ]
    _run_twins(dtype, shapes, groups, window_size=7, steps=21)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_bits_for_any_thread_count_and_on_every_run(dtype, small_cpu_chunks):
    shapes = GROUP_SHAPES + [(4, 3000)]
    before = torch.get_num_threads()
    snapshots = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            (opt, params), _ = twin_optimizers(shapes, GROUPS, dtype=dtype, device="cpu", backend="cpu", window_size=7)
            gen = torch.Generator().manual_seed(9)
            for step in range(10):
                set_grads(params, random_grads(shapes, dtype, "cpu", gen, step))
                opt.step()
            snapshots.append(snapshot(opt, params) | {"grad_norm": opt.grad_norm.clone()})
    finally:
        torch.set_num_threads(before)
    assert_bit_identical(snapshots[0], snapshots[1])
    assert_bit_identical(snapshots[1], snapshots[2])


def _conv_params(memory_format):
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(8, 3, 5, 5, generator=gen), torch.randn(16, 8, 3, 3, generator=gen)]
    return [w.to(memory_format=memory_format).requires_grad_() for w in weights]


def _conv_loss(weights, x):
    return torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, weights[0]), weights[1]).square().mean()


def test_channels_last_parameters_work(threads):
    ours, theirs = _conv_params(torch.channels_last), _conv_params(torch.contiguous_format)
    opt = ZenithFused(ours, lr=0.01, momentum=0.9, weight_decay=0.01, window_size=3, backend="cpu")
    ref = ZenithFused(theirs, lr=0.01, momentum=0.9, weight_decay=0.01, window_size=3, backend="reference")
    gen = torch.Generator().manual_seed(4)
    for _ in range(8):
        x = torch.randn(2, 3, 12, 12, generator=gen).contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        _conv_loss(ours, x).backward()  # autograd gives channels-last parameters channels-last grads
        for w, v in zip(ours, theirs):
            assert w.grad.stride() == w.stride()
            v.grad = w.grad.contiguous()
        opt.step()
        ref.step()
    assert torch.isfinite(opt.grad_norm) and opt.history.step.item() == 8
    for w, v in zip(ours, theirs):
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        assert opt.state[w]["momentum_buffer"].stride() == w.stride()
        torch.testing.assert_close(w, v, **TOLERANCES_ABS_REL[torch.float32])
    assert_history_close(opt, ref)


def test_dense_non_contiguous_parameters_work():
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    ours = torch.nn.Parameter(base.clone().t())  # dense, transposed strides
    theirs = torch.nn.Parameter(base.clone().t())
    opt = ZenithFused([ours], lr=0.1, momentum=0.9, window_size=2, backend="cpu")
    ref = ZenithFused([theirs], lr=0.1, momentum=0.9, window_size=2, backend="reference")
    for k in range(4):
        grad = torch.randn(6, 10, generator=torch.Generator().manual_seed(10 + k)).t()
        ours.grad, theirs.grad = grad.clone(memory_format=torch.preserve_format), grad.clone()
        opt.step()
        ref.step()
    assert ours.stride() == (1, 10)
    torch.testing.assert_close(ours, theirs, **TOLERANCES_ABS_REL[torch.float32])


def test_non_dense_parameter_raises_a_clear_error():
    p = torch.nn.Parameter(torch.randn(8, 6)[:, :3])  # a view with gaps between rows
    p.grad = torch.randn(8, 3)
    opt = ZenithFused([p], backend="cpu")
    with pytest.raises(RuntimeError, match="need each parameter dense"):
        opt.step()


# ------------------------------------------------------------------ errors raised by the operators
def _valid_update_args(n=3):
    slots = [0] * n
    params, grads, buffers, steps = _update_inputs(torch.float32, [(5, 4)] * n, slots, filled_at=0)
    table = torch.tensor(hyperparam_rows(HYPERPARAMS), dtype=torch.float32)
    return dict(params=params, grads=grads, momentum_buffers=buffers, momentum_steps=steps, hyperparams=table,
                hyperparam_slots=slots, lr_scale=torch.tensor(1.0), step=torch.tensor(1),
                step_applied=torch.tensor(1, dtype=torch.int32), grad_multiplier=torch.tensor(1.0), chunk_size=64)


def _broken(**changes):
    def make():
        args = _valid_update_args()
        for key, change in changes.items():
            args[key] = change(args[key])
        return args
    return make


def _replace_last(make_tensor):
    return lambda tensors: tensors[:-1] + [make_tensor(tensors[-1])]


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (_broken(grads=_replace_last(lambda g: g.t().contiguous().t())), RuntimeError,
         r"grads\[2\] has strides \[1, 5\] but params\[2\] has strides \[4, 1\]"),
        (_broken(params=_replace_last(lambda p: p[:, :2])), RuntimeError, r"params\[2\] .* is not dense"),
        (_broken(grads=_replace_last(lambda g: g.double())), TypeError, r"grads\[2\] has dtype Double, expected Float"),
        (_broken(hyperparam_slots=lambda s: s[:-1] + [7]), RuntimeError,
         r"hyperparam_slots\[2\] = 7 is not a row of the 4-row hyperparams table"),
        (_broken(momentum_buffers=lambda b: b[:-1] + [None]), RuntimeError,
         r"params\[2\] belongs to a group with momentum but has no momentum buffer"),
        (_broken(grads=lambda g: g[:-1]), RuntimeError, "must have one entry per tensor; got 3, 2"),
        (_broken(lr_scale=lambda t: t.double()), RuntimeError, "lr_scale must be a one-element Float tensor"),
        (_broken(chunk_size=lambda c: 0), RuntimeError, "chunk_size must be positive; got 0"),
        (_broken(momentum_steps=_replace_last(lambda s: s.int())), RuntimeError,
         r"momentum_steps\[2\] must be a one-element int64 CPU tensor"),
        (_broken(params=lambda ps: [p.int() for p in ps], grads=lambda gs: [g.int() for g in gs]), TypeError,
         "the fused kernels support float32, float16, bfloat16 and float64 tensors; got Int"),
    ],
    ids=["grad-strides", "param-not-dense", "grad-dtype", "slot", "missing-buffer", "lengths", "lr-scale-dtype",
         "chunk-size", "momentum-step-dtype", "int-params"],
)
def test_momentum_update_checks_its_arguments_before_writing(make_args, error, match):
    args = make_args()
    steps_before = _clone_all(args["momentum_steps"])
    params_before = _clone_all(args["params"])
    with pytest.raises(error, match=match):
        ops().momentum_update(**args)
    # A call that raises has changed nothing, also in the tensors before the faulty one.
    _assert_lists_equal(args["momentum_steps"], steps_before, "momentum_steps")
    _assert_lists_equal(args["params"], params_before, "params")


@pytest.mark.parametrize(
    "grads,match",
    [
        ([torch.randn(3), torch.randn(3, dtype=torch.float64)], r"grads\[1\] has dtype Double, expected Float"),
        ([torch.randn(4, 6)[:, ::2]], r"grads\[0\] of shape \[4, 3\] and strides \[6, 2\] is not dense"),
    ],
    ids=["mixed-dtypes", "not-dense"],
)
def test_sq_norm_partials_checks_its_arguments(grads, match):
    with pytest.raises((RuntimeError, TypeError), match=match):
        ops().sq_norm_partials(grads, 64)


def test_update_history_checks_its_arguments():
    h = ZenithHistory.zeros(3, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="step_applied must be a one-element Int tensor"):
        ops().update_history(torch.ones(2), h.step, h.norm_window, h.window_max, h.skipped_steps, h.grad_norm,
                             h.lr_scale, h.step_applied.long(), h.grad_multiplier, None, None, None)
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element Float tensor"):
        _update_history(h, torch.ones(2), StepInputs(grad_scale=torch.tensor(2.0, dtype=torch.float64)))


# ------------------------------------------------------------------ selection and torch.compile
def test_auto_selects_the_compiled_cpu_kernels():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    p = torch.nn.Parameter(torch.randn(3))
    assert ZenithFused([p])._backend_for(p.device, p.dtype) == "cpu"


def _small_op_args():
    args = _valid_update_args(n=2)
    history = ZenithHistory.zeros(4, torch.device("cpu"))
    return args, history


def test_operators_pass_torch_library_opcheck():
    args, h = _small_op_args()
    torch.library.opcheck(ops().sq_norm_partials.default, (args["grads"], 64))
    history_args = (torch.rand(3), h.step, h.norm_window, h.window_max, h.skipped_steps, h.grad_norm, h.lr_scale,
                    h.step_applied, h.grad_multiplier)
    torch.library.opcheck(ops().update_history.default, history_args + (None, None, None))
    torch.library.opcheck(ops().update_history.default, history_args + (torch.tensor(8.0), torch.tensor(0.0), 1.5))
    torch.library.opcheck(ops().momentum_update.default, tuple(args.values()))


def test_operators_run_under_torch_compile():
    def step(params, grads, buffers, steps, table, slots, history):
        partials = ops().sq_norm_partials(grads, 64)
        ops().update_history(partials, history.step, history.norm_window, history.window_max,
                             history.skipped_steps, history.grad_norm, history.lr_scale, history.step_applied,
                             history.grad_multiplier, None, None, 1.0)
        ops().momentum_update(params, grads, buffers, steps, table, slots, history.lr_scale, history.step,
                              history.step_applied, history.grad_multiplier, 64)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_args, eager_history = _small_op_args()
    compiled_args, compiled_history = _small_op_args()
    keys = ("params", "grads", "momentum_buffers", "momentum_steps", "hyperparams", "hyperparam_slots")
    for _ in range(3):
        step(*(eager_args[k] for k in keys), eager_history)
        compiled(*(compiled_args[k] for k in keys), compiled_history)
    for k in ("params", "momentum_buffers", "momentum_steps"):
        _assert_lists_equal(compiled_args[k], eager_args[k], k)
    assert compiled_history.step.item() == eager_history.step.item() == 3
    assert torch.equal(compiled_history.norm_window, eager_history.norm_window)
