"""The compiled CPU backend ("cpu", csrc/cpu/): what is specific to it.

tests/test_conformance.py runs every backend, this one included, through the optimizer's options.
Here: the three operators one by one, called with the bucket tables of zenith_fused/_table.py
exactly as the step plan calls them, against zenith_fused/reference.py (bit for bit where the math
allows) on fresh random inputs; thread counts; the instruction-set builds; float64; corrupt
history; every argument-check message; then the optimizer end to end.

Tolerances (helpers.TOLERANCES, helpers.HISTORY_TOL) apply only where the optimizer runs end to
end: the update itself is bit-identical to the reference for an equal lr_scale
(test_update_is_bit_identical_to_reference), but the norm is summed in another order, so lr_scale
may differ in its last float32 bits. In float32 that stays far below (1e-5, 1e-5). In bfloat16 and
float16 it can flip the rounding of a stored value by one unit in the last place of the storage
type, hence one bfloat16 ulp (rtol 2**-7) and one float16 ulp (rtol 2**-10), with the twins
resynchronised after every step so that flips cannot accumulate.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from helpers import (
    HISTORY_TOL,
    TOLERANCES,
    assert_bit_identical,
    assert_params_close,
    assert_within_ulps,
    copy_params_and_buffers,
    random_grads,
    set_grads,
    snapshot,
    twin_optimizers,
)
from zenith_fused import ZenithFused, _ext, _table, reference
from zenith_fused.reference import HISTORY_FIELDS, GroupHyperparams, StepInputs, ZenithHistory, compute_dtype

REASON = _ext.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the compiled CPU kernels are unavailable: {REASON}")

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
DEFAULT_CHUNK = 32768  # CpuEngine.chunk_elements
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

    monkeypatch.setattr(CpuEngine, "chunk_elements", 64)


def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


def _rows(hyperparams):
    """hyperparam_table's rows: (lr, momentum, 1 - dampening, weight_decay, nesterov, maximize)."""
    return [
        (float(hp.lr), hp.momentum, 1 - hp.dampening, hp.weight_decay, float(hp.nesterov), float(hp.maximize))
        for hp in hyperparams
    ]


@dataclass
class Bucket:
    """One (device, dtype) bucket as the step plan hands it to the operators, with the tensors the
    tables point at (kept alive here)."""

    dtype: torch.dtype
    params: list
    grads: list
    buffers: list
    steps: list
    slots: list
    placeholder: torch.Tensor
    table: _table.TensorTable
    hyperparams: torch.Tensor
    lr_ptrs: torch.Tensor
    lrs: list  # the lr each group's lr_ptrs entry points at, as a tensor of the compute dtype

    def reference_hyperparams(self):
        # A tensor lr of the compute dtype: the reference rounds it to nothing else.
        return [GroupHyperparams(lr=self.lrs[k], momentum=HYPERPARAMS[k].momentum,
                                 dampening=HYPERPARAMS[k].dampening, weight_decay=HYPERPARAMS[k].weight_decay,
                                 nesterov=HYPERPARAMS[k].nesterov, maximize=HYPERPARAMS[k].maximize)
                for k in self.slots]


def _bucket(dtype, shapes, slots, *, filled_at=0, chunk_size=64, seed=0, tensor_lrs=False):
    """A bucket of random tensors; with ``tensor_lrs`` every group's lr_ptrs entry points at a
    separate tensor lr and the table's own lr column holds a wrong value, which no kernel may read."""
    gen = torch.Generator().manual_seed(seed)
    params = [_random(s, dtype, gen) for s in shapes]
    grads = [_random(s, dtype, gen) for s in shapes]
    buffers = [_random(s, dtype, gen) if HYPERPARAMS[k].momentum else None for s, k in zip(shapes, slots)]
    steps = [torch.tensor(filled_at) if HYPERPARAMS[k].momentum else None for k in slots]
    placeholder = torch.zeros((), dtype=torch.int64)
    table = _table.build_tensor_table(params, grads, buffers, steps, slots, chunk_size=chunk_size,
                                      placeholder_step=placeholder)
    compute = compute_dtype(dtype)
    rows = _rows(HYPERPARAMS)
    if tensor_lrs:
        rows = [(1e6,) + row[1:] for row in rows]
    hyperparams, lr_ptrs = _table.hyperparam_table(rows, compute, torch.device("cpu"))
    if tensor_lrs:
        lrs = [torch.tensor(hp.lr * 1.37, dtype=compute) for hp in HYPERPARAMS]
        lr_ptrs.copy_(torch.tensor([lr.data_ptr() for lr in lrs]))
    else:
        lrs = [hyperparams[k, _table.LR] for k in range(len(HYPERPARAMS))]
    return Bucket(dtype, params, grads, buffers, steps, slots, placeholder, table, hyperparams, lr_ptrs, lrs)


def _clone_all(tensors):
    return [None if t is None else t.clone() for t in tensors]


def _step_scalars(*, lr_scale=0.7312345, step=5, applied=1, grad_multiplier=1.0):
    return dict(lr_scale=torch.tensor(lr_scale), step=torch.tensor(step),
                step_applied=torch.tensor(applied, dtype=torch.int32), grad_multiplier=torch.tensor(grad_multiplier))


def _run_update(b: Bucket, **scalars):
    s = _step_scalars(**scalars)
    ops().momentum_update(b.table.tensors, b.table.chunks, b.dtype, b.table.chunk_size, b.table.has_momentum,
                          b.hyperparams, b.lr_ptrs, s["lr_scale"], s["step"], s["step_applied"], s["grad_multiplier"])


def _run_reference_update(b: Bucket, params, buffers, steps, **scalars):
    reference.momentum_update(params, b.grads, buffers, steps, b.reference_hyperparams(), **_step_scalars(**scalars))


def _sq_norm_partials(b: Bucket):
    out = torch.full((b.table.num_chunks,), float("nan"))
    ops().sq_norm_partials(b.table.tensors, b.table.chunks, b.dtype, b.table.chunk_size, out)
    return out


def _update_history(history: ZenithHistory, partials, inputs: StepInputs = StepInputs()):
    ops().update_history(partials, history.kernel_tensors(), inputs.grad_scale, inputs.found_inf,
                         inputs.max_grad_norm)


def _assert_lists_equal(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None
            continue
        assert torch.equal(a, e), f"{what}[{i}] of shape {tuple(e.shape)} differs in {(a != e).sum().item()} elements"


def _slots(n):
    return [i % len(HYPERPARAMS) for i in range(n)]


# ------------------------------------------------------------------ the operators, bit for bit
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("filled_at", [0, 5, 3], ids=["never-filled", "filled-this-step", "filled-before"])
@pytest.mark.parametrize("chunk_size", [64, DEFAULT_CHUNK])
@pytest.mark.parametrize("grad_multiplier", [1.0, 0.0123457], ids=["plain", "unscaled-clipped"])
def test_update_is_bit_identical_to_reference(dtype, filled_at, chunk_size, grad_multiplier, threads):
    b = _bucket(dtype, GROUP_SHAPES, _slots(len(GROUP_SHAPES)), filled_at=filled_at, chunk_size=chunk_size,
                seed=filled_at + chunk_size)
    initial = _clone_all(b.params)
    ref_params, ref_buffers, ref_steps = _clone_all(b.params), _clone_all(b.buffers), _clone_all(b.steps)

    _run_update(b, grad_multiplier=grad_multiplier)
    _run_reference_update(b, ref_params, ref_buffers, ref_steps, grad_multiplier=grad_multiplier)
    _assert_lists_equal(b.params, ref_params, "params")
    _assert_lists_equal(b.buffers, ref_buffers, "momentum_buffers")
    _assert_lists_equal(b.steps, ref_steps, "momentum_steps")
    # The test would be empty if nothing moved.
    assert not torch.equal(b.params[-1], initial[-1])


def _special_values(dtype, n, gen):
    """n values of ``dtype``: random normal ones, with NaNs of either sign and of several payloads,
    infinities, zeros of both signs, denormals and the largest finite values at random places,
    and whole stretches (one vector block and more) without any of them."""
    info = torch.finfo(dtype)
    bits_dtype = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    nans = torch.tensor([0x7FC0, 0x7F81, 0xFFC1, 0x7FFF] if dtype == torch.bfloat16 else
                        [0x7E00, 0x7C01, 0xFE01, 0x7FFF] if dtype == torch.float16 else
                        [0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FFFFFFF], dtype=torch.int64)
    nans = torch.where(nans >= 2 ** (info.bits - 1), nans - 2**info.bits, nans).to(bits_dtype).view(dtype)
    tiny = info.smallest_normal
    specials = torch.cat([nans, torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, tiny / 2, -tiny / 4, tiny / 64,
                                              tiny * 0.999, info.max, -info.max], dtype=dtype)])
    values = torch.randn(n, generator=gen).to(dtype)
    where = torch.randint(0, n // 2, (3 * len(specials),), generator=gen)  # the second half stays normal
    values[where] = specials.repeat(3)
    return values


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=str)
def test_update_special_values_match_the_reference(dtype):
    """NaN, infinities, signed zeros, denormals and the largest finite values, in parameters,
    gradients and momentum buffers: every stored value is the reference's, 0 ulps apart (NaN only
    has to meet NaN: torch does not fix a NaN's payload). Values near the largest finite one step to
    infinity; denormals stay denormal."""
    gen = torch.Generator().manual_seed(17)
    shapes = [(200,), (1000,), (3000,)]
    b = _bucket(dtype, shapes, [0, 0, 2], filled_at=1, seed=5)
    for tensors in (b.params, b.grads, b.buffers):
        for t in tensors:
            t.copy_(_special_values(dtype, t.numel(), gen))
    # A stretch of denormal parameters with no gradient and no momentum: they stay denormal.
    tiny = torch.finfo(dtype).smallest_normal
    b.params[1][96:160] = tiny * torch.randint(1, 16, (64,), generator=gen).to(dtype) / -32
    b.grads[1][96:160] = 0
    b.buffers[1][96:160] = 0
    ref_params, ref_buffers, ref_steps = _clone_all(b.params), _clone_all(b.buffers), _clone_all(b.steps)
    _run_update(b, lr_scale=0.75, step=2)
    _run_reference_update(b, ref_params, ref_buffers, ref_steps, lr_scale=0.75, step=2)
    for name, ours, theirs in (("params", b.params, ref_params), ("momentum_buffers", b.buffers, ref_buffers)):
        for i, (a, e) in enumerate(zip(ours, theirs)):
            assert_within_ulps(a, e, ulps=0, msg=f"{name}[{i}]")
    # The cases this test is about did occur.
    results = torch.cat(ref_params + ref_buffers).float()
    denormal = (results != 0) & (results.abs() < tiny)
    assert results.isnan().any() and results.isinf().any() and denormal.sum() >= 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lr_is_read_through_lr_ptrs(dtype):
    """The table's own lr column holds 1e6; each group's lr_ptrs entry points at a tensor lr."""
    b = _bucket(dtype, GROUP_SHAPES, _slots(len(GROUP_SHAPES)), tensor_lrs=True)
    ref_params, ref_buffers, ref_steps = _clone_all(b.params), _clone_all(b.buffers), _clone_all(b.steps)
    _run_update(b)
    _run_reference_update(b, ref_params, ref_buffers, ref_steps)
    _assert_lists_equal(b.params, ref_params, "params")
    # A scheduler writing the tensor lr in place is seen by the next call, with no new table.
    for lr in b.lrs:
        lr.mul_(0.5)
    _run_update(b, step=6)
    _run_reference_update(b, ref_params, ref_buffers, ref_steps, step=6)
    _assert_lists_equal(b.params, ref_params, "params")
    _assert_lists_equal(b.buffers, ref_buffers, "momentum_buffers")


def test_bucket_without_momentum_never_touches_the_stand_in_buffers():
    shapes = [(5,), (300,), (0,)]
    b = _bucket(torch.float32, shapes, [1, 1, 1])  # group 1 has momentum 0
    assert not b.table.has_momentum
    ref_params = _clone_all(b.params)
    placeholder_before = b.placeholder.clone()
    _run_update(b)
    reference.momentum_update(ref_params, b.grads, b.buffers, b.steps, b.reference_hyperparams(),
                              **_step_scalars())
    _assert_lists_equal(b.params, ref_params, "params")  # a write through the stand-in would show here
    assert torch.equal(b.placeholder, placeholder_before)


def test_float64_is_computed_in_float64():
    """Issue 12's example: float32 arithmetic would leave 1.0 and 0.10000000149011612."""
    p = torch.tensor([1.0, 0.1], dtype=torch.float64)
    g = torch.full((2,), 1e-9, dtype=torch.float64)
    placeholder = torch.zeros((), dtype=torch.int64)
    table = _table.build_tensor_table([p], [g], [None], [None], [0], chunk_size=64, placeholder_step=placeholder)
    hyperparams, lr_ptrs = _table.hyperparam_table([(1.0, 0.0, 1.0, 0.0, 0.0, 0.0)], torch.float64,
                                                   torch.device("cpu"))
    s = _step_scalars(lr_scale=1.0)
    ops().momentum_update(table.tensors, table.chunks, torch.float64, 64, False, hyperparams, lr_ptrs,
                          s["lr_scale"], s["step"], s["step_applied"], s["grad_multiplier"])
    assert p.tolist() == [1.0 - 1e-9, 0.1 - 1e-9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_skipped_step_changes_nothing(dtype):
    b = _bucket(dtype, GROUP_SHAPES, _slots(len(GROUP_SHAPES)), filled_at=0)
    before = (_clone_all(b.params), _clone_all(b.buffers), _clone_all(b.steps))
    _run_update(b, lr_scale=0.5, step=4, applied=0)
    _assert_lists_equal(b.params, before[0], "params")
    _assert_lists_equal(b.buffers, before[1], "momentum_buffers")
    _assert_lists_equal(b.steps, before[2], "momentum_steps")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [64, DEFAULT_CHUNK])
def test_sq_norm_partials_are_per_chunk_and_thread_independent(dtype, chunk_size):
    sizes = [0, 1, 31, 32, 33, 1000, 3 * chunk_size + 5, 70001]
    b = _bucket(dtype, [(n,) for n in sizes], [1] * len(sizes), chunk_size=chunk_size, seed=3)
    results = {}
    before = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            results.setdefault(n_threads, []).append(_sq_norm_partials(b))
    finally:
        torch.set_num_threads(before)

    # In float64, of the values the kernels square (float32 for half types, float64 for float64);
    # an empty tensor's one chunk has partial 0.
    expected = torch.cat([
        torch.stack([chunk.sum() for chunk in g.to(compute_dtype(dtype)).double().square().split(chunk_size)])
        if g.numel() else torch.zeros(1, dtype=torch.float64)
        for g in b.grads
    ])
    partials = results[1][0]
    assert partials.dtype == torch.float32 and partials.shape == expected.shape == (b.table.num_chunks,)
    rtol = 2**-22 if dtype == torch.float64 else 1e-5  # float64: exact sum, one float32 rounding
    torch.testing.assert_close(partials.double(), expected, rtol=rtol, atol=0)
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
        StepInputs(grad_scale=torch.tensor([3.0]), max_grad_norm=2.5),
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
        reference.update_history(ref, partials, StepInputs(
            grad_scale=None if inputs.grad_scale is None else inputs.grad_scale.reshape(()),
            found_inf=inputs.found_inf, max_grad_norm=inputs.max_grad_norm))
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
        _update_history(ours, torch.tensor([4.0, 5.0]), StepInputs(found_inf=torch.tensor([[found_inf]])))
        assert ours.step_applied.item() == applied
    assert ours.step.item() == 2 and ours.skipped_steps.item() == 1
    assert ours.norm_window.tolist() == [3.0, 3.0, 0.0]


def _guarded_history(window_size, step, guard=8):
    """A history whose window sits between two guard regions of NaN, to catch stray writes."""
    storage = torch.full((guard + window_size + guard,), float("nan"))
    history = ZenithHistory.zeros(window_size, torch.device("cpu"))
    history.norm_window = storage[guard:guard + window_size]
    history.norm_window.fill_(1.0)
    history.window_max.fill_(1.0)
    history.step.fill_(step)
    return history, storage, guard


@pytest.mark.parametrize("window_size", [1, 4, 100])
@pytest.mark.parametrize("step", [-1, -5, -(2**63)], ids=["minus1", "minus5", "int64-min"])
def test_a_negative_step_writes_inside_the_window(window_size, step):
    ours, storage, guard = _guarded_history(window_size, step)
    ref, _, _ = _guarded_history(window_size, step)
    _update_history(ours, torch.tensor([9.0]))
    reference.update_history(ref, torch.tensor([9.0]))
    assert storage[:guard].isnan().all() and storage[guard + window_size:].isnan().all()
    slot = step % window_size  # Python's modulo: in [0, W)
    assert ours.norm_window[slot].item() == 3.0
    assert torch.equal(ours.norm_window, ref.norm_window)
    assert ours.step.item() == step + 1
    assert 0.0 < ours.lr_scale.item() <= 1.0 and math.isfinite(ours.window_max.item())


def test_the_largest_step_does_not_overflow():
    ours, storage, guard = _guarded_history(4, 2**63 - 1)
    _update_history(ours, torch.tensor([9.0]))
    assert ours.step.item() == 2**63 - 1  # saturates instead of wrapping to a negative count
    assert storage[:guard].isnan().all() and storage[guard + 4:].isnan().all()
    assert ours.norm_window[(2**63 - 1) % 4].item() == 3.0
    assert 0.0 < ours.lr_scale.item() <= 1.0


def test_common_h_repeats_the_python_constants():
    """csrc/common.h's column numbers and history order are _table's and reference's."""
    text = open(os.path.join(CSRC, "common.h")).read()

    def constants(namespace):
        body = re.search(rf"namespace {namespace} {{(.*?)}}", text, re.S).group(1)
        return {name: int(value) for name, value in re.findall(r"constexpr int (k\w+) = (\d+);", body)}

    def snake(name):
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name[1:]).upper()

    tensor = constants("tensor_column")
    assert tensor.pop("kColumns") == _table.TENSOR_COLUMNS
    assert {snake(k): v for k, v in tensor.items()} == {
        k: getattr(_table, k) for k in ("PARAM", "GRAD", "MOMENTUM_BUFFER", "MOMENTUM_STEP", "NUMEL", "HYPERPARAM_SLOT")
    }
    hyper = constants("hyperparam")
    assert hyper.pop("kColumns") == _table.HYPERPARAM_COLUMNS
    assert {snake(k): v for k, v in hyper.items()} == {
        k: getattr(_table, k) for k in ("LR", "MOMENTUM", "ONE_MINUS_DAMPENING", "WEIGHT_DECAY", "NESTEROV", "MAXIMIZE")
    }
    history = constants("history_field")
    assert history.pop("kCount") == len(HISTORY_FIELDS)
    assert {snake(k).lower(): v for k, v in history.items()} == {name: i for i, name in enumerate(HISTORY_FIELDS)}
    assert constants("chunk_column") == {"kTensor": 0, "kStart": 1, "kColumns": 2}


# Run in a fresh process: ATen reads ATEN_CPU_CAPABILITY once, at its first dispatch. The tables
# hold addresses, so each process builds its own from the same tensors.
_ISA_CHILD = r"""
import sys, torch
import zenith_fused._ext as ext
from zenith_fused import _table
from zenith_fused.reference import compute_dtype
assert ext.unavailable_reason("cpu") is None
inputs = torch.load(sys.argv[1])
out = {"isa": torch.ops.zenith_fused.cpu_kernel_isa(), "partials": {}, "params": {}}
placeholder = torch.zeros((), dtype=torch.int64)
for name, (dtype, params, grads, buffers, steps, slots, rows) in inputs.items():
    table = _table.build_tensor_table(params, grads, buffers, steps, slots, chunk_size=64, placeholder_step=placeholder)
    partials = torch.empty(table.num_chunks)
    torch.ops.zenith_fused.sq_norm_partials(table.tensors, table.chunks, dtype, 64, partials)
    hyperparams, lr_ptrs = _table.hyperparam_table(rows, compute_dtype(dtype), torch.device("cpu"))
    torch.ops.zenith_fused.momentum_update(table.tensors, table.chunks, dtype, 64, table.has_momentum, hyperparams,
                                           lr_ptrs, torch.tensor(0.75), torch.tensor(2),
                                           torch.tensor(1, dtype=torch.int32), torch.tensor(0.5))
    out["partials"][name] = partials
    out["params"][name] = (params, buffers)
torch.save(out, sys.argv[2])
"""
_ISA_ORDER = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_every_instruction_set_build_gives_the_same_bits(isa, tmp_path):
    here = ops().cpu_kernel_isa()
    if here not in _ISA_ORDER or _ISA_ORDER.index(isa) >= _ISA_ORDER.index(here):
        pytest.skip(f"this process runs the {here} build; {isa} is compared only against a wider one")
    sizes = [1, 31, 33, 64, 1000, 4099]
    buckets = {str(dtype): _bucket(dtype, [(n,) for n in sizes], _slots(len(sizes)), filled_at=1, seed=11)
               for dtype in ALL_DTYPES}
    gen = torch.Generator().manual_seed(12)
    for dtype in HALF_AND_SINGLE:  # NaN, infinities, denormals: the paths that leave the fast conversion
        b = buckets[f"{dtype} specials"] = _bucket(dtype, [(n,) for n in sizes], _slots(len(sizes)), filled_at=1)
        for tensor in (*b.params, *b.grads, *(t for t in b.buffers if t is not None)):
            tensor.copy_(_special_values(dtype, tensor.numel(), gen) if tensor.numel() > 1 else tensor)
    inputs = {name: (b.dtype, b.params, b.grads, b.buffers, b.steps, b.slots, _rows(HYPERPARAMS))
              for name, b in buckets.items()}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
    result = subprocess.run([sys.executable, "-c", _ISA_CHILD, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["isa"] == isa

    for name, b in buckets.items():
        partials = _sq_norm_partials(b)
        _run_update(b, lr_scale=0.75, step=2, grad_multiplier=0.5)
        assert torch.equal(partials, theirs["partials"][name]) or "specials" in name, f"{name} partials: {here} != {isa}"
        _assert_lists_equal(_bits(theirs["params"][name][0]), _bits(b.params), f"{name} params ({isa})")
        _assert_lists_equal(_bits(theirs["params"][name][1]), _bits(b.buffers), f"{name} buffers ({isa})")


def _bits(tensors):
    """Each tensor's bits as integers (so -0.0 differs from 0.0), every NaN as one NaN pattern:
    which operand's payload an operation on two NaNs keeps is up to the instruction."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    out = []
    for t in tensors:
        if t is not None:
            t = torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(ints[t.element_size()])
        out.append(t)
    return out


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
def _update_args():
    b = _bucket(torch.float32, [(5, 4), (20,), (3,)], [0, 0, 2], filled_at=0, chunk_size=8)
    args = dict(tensors=b.table.tensors, chunks=b.table.chunks, dtype=b.dtype, chunk_size=8, has_momentum=True,
                hyperparams=b.hyperparams, lr_ptrs=b.lr_ptrs, **_step_scalars())
    return b, args


def _table_row(column, row, value):
    def change(t):
        t = t.clone()
        t[row, column] = value
        return t
    return change


UPDATE_ERRORS = {
    "tensors-dtype": (dict(tensors=lambda t: t.int()), RuntimeError,
                      r"tensors must be a contiguous int64 tensor of shape \[rows, 6\] on cpu; got Int"),
    "tensors-columns": (dict(tensors=lambda t: t[:, :5]), RuntimeError,
                        r"tensors must be a contiguous int64 tensor of shape \[rows, 6\]"),
    "chunks-shape": (dict(chunks=lambda t: t.reshape(-1)), RuntimeError,
                     r"chunks must be a contiguous int64 tensor of shape \[rows, 2\] on cpu; got Long of shape \[14\]"),
    "chunk-size": (dict(chunk_size=lambda c: 0), RuntimeError, "chunk_size must be positive; got 0"),
    "int-dtype": (dict(dtype=lambda d: torch.int32), TypeError,
                  "the fused kernels support float32, float16, bfloat16 and float64 tensors; got Int"),
    "hyperparams-dtype": (dict(hyperparams=lambda h: h.double()), RuntimeError,
                          r"hyperparams must be a contiguous Float tensor \(the compute dtype of Float\) of shape "
                          r"\[groups, 6\] on cpu; got Double"),
    "lr-ptrs-length": (dict(lr_ptrs=lambda t: t[:2]), RuntimeError,
                       r"lr_ptrs must be a contiguous int64 tensor of shape \[4\] \(one address per hyperparams row\)"),
    "lr-scale-dtype": (dict(lr_scale=lambda t: t.double()), RuntimeError,
                       r"lr_scale must be a one-element Float tensor on cpu; got Double of shape \[\]"),
    "step-dtype": (dict(step=lambda t: t.int()), RuntimeError, "step must be a one-element Long tensor"),
    "step-applied-shape": (dict(step_applied=lambda t: t.repeat(2)), RuntimeError,
                           r"step_applied must be a one-element Int tensor on cpu; got Int of shape \[2\]"),
    "grad-multiplier-dtype": (dict(grad_multiplier=lambda t: t.half()), RuntimeError,
                              "grad_multiplier must be a one-element Float tensor"),
    "slot": (dict(tensors=_table_row(_table.HYPERPARAM_SLOT, 2, 7)), RuntimeError,
             r"tensors\[2\] has hyper-parameter slot 7, which is not a row of the 4-row hyperparams table"),
    "chunk-tensor": (dict(chunks=_table_row(0, 1, 9)), RuntimeError,
                     r"chunks\[1\] names tensor 9, which is not a row of the 3-row tensor table"),
    "chunk-start": (dict(chunks=_table_row(1, 6, 100)), RuntimeError,
                    r"chunks\[6\] starts at element 100 of tensor 2, which has 3 elements"),
}


@pytest.mark.parametrize("change,error,match", UPDATE_ERRORS.values(), ids=UPDATE_ERRORS.keys())
def test_momentum_update_checks_its_arguments_before_writing(change, error, match):
    b, args = _update_args()
    assert b.table.num_chunks == 7  # 3 + 3 + 1 chunks of 8
    for key, fn in change.items():
        args[key] = fn(args[key])
    before = (_clone_all(b.params), _clone_all(b.buffers), _clone_all(b.steps))
    with pytest.raises(error, match=match):
        ops().momentum_update(**args)
    # A call that raises has changed nothing, also in the tensors before the faulty one.
    _assert_lists_equal(b.params, before[0], "params")
    _assert_lists_equal(b.buffers, before[1], "momentum_buffers")
    _assert_lists_equal(b.steps, before[2], "momentum_steps")


def test_sq_norm_partials_checks_out_and_changes_nothing():
    b = _bucket(torch.float32, [(5,), (100,)], [1, 1])
    out = torch.full((b.table.num_chunks + 1,), 7.0)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 tensor of shape \[3\] \(one partial "
                                           r"per chunk\) on cpu; got Float of shape \[4\]"):
        ops().sq_norm_partials(b.table.tensors, b.table.chunks, b.dtype, 64, out)
    bad_chunks = _table_row(0, 0, -1)(b.table.chunks)
    out = torch.full((b.table.num_chunks,), 7.0)
    with pytest.raises(RuntimeError, match=r"chunks\[0\] names tensor -1"):
        ops().sq_norm_partials(b.table.tensors, bad_chunks, b.dtype, 64, out)
    assert (out == 7.0).all()


def _history_list():
    return ZenithHistory.zeros(3, torch.device("cpu")).kernel_tensors()


def _replace(index, fn):
    def change(history):
        history = list(history)
        history[index] = fn(history[index])
        return history
    return change


HISTORY_ERRORS = {
    "length": (dict(history=lambda h: h[:-1]), "history must hold the 8 tensors of "
               r"zenith_fused.reference.HISTORY_FIELDS, in that order; got 7"),
    "window-shape": (dict(history=_replace(1, lambda w: w.reshape(1, 3))),
                     r"norm_window must be a non-empty contiguous 1-D float32 tensor; got Float of shape \[1, 3\]"),
    "step-dtype": (dict(history=_replace(0, lambda t: t.int())), "step must be a one-element Long tensor"),
    "window-max-dtype": (dict(history=_replace(2, lambda t: t.double())), "window_max must be a one-element Float"),
    "skipped-dtype": (dict(history=_replace(3, lambda t: t.float())), "skipped_steps must be a one-element Long"),
    "grad-norm-shape": (dict(history=_replace(4, lambda t: t.repeat(2))), "grad_norm must be a one-element Float"),
    "lr-scale-dtype": (dict(history=_replace(5, lambda t: t.half())), "lr_scale must be a one-element Float"),
    "step-applied-dtype": (dict(history=_replace(6, lambda t: t.long())), "step_applied must be a one-element Int"),
    "multiplier-dtype": (dict(history=_replace(7, lambda t: t.double())), "grad_multiplier must be a one-element Float"),
    "partials-dtype": (dict(partials=lambda t: t.double()), r"sq_norm_partials must be a contiguous 1-D float32 "
                       r"tensor on cpu \(the history's device\); got Double"),
    "grad-scale-dtype": (dict(grad_scale=lambda t: torch.tensor(2.0, dtype=torch.float64)),
                         "grad_scale must be a one-element Float tensor"),
    "found-inf-shape": (dict(found_inf=lambda t: torch.zeros(2)),
                        r"found_inf must be a one-element Float tensor on cpu; got Float of shape \[2\]"),
}


@pytest.mark.parametrize("change,match", HISTORY_ERRORS.values(), ids=HISTORY_ERRORS.keys())
def test_update_history_checks_its_arguments_before_writing(change, match):
    history = _history_list()
    args = dict(partials=torch.ones(2), history=history, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    for key, fn in change.items():
        args[key] = fn(args[key])
    before = [t.clone() for t in history]
    with pytest.raises(RuntimeError, match=match):
        ops().update_history(args["partials"], args["history"], args["grad_scale"], args["found_inf"], 1.0)
    for name, t, b in zip(HISTORY_FIELDS, history, before):
        assert torch.equal(t, b), f"{name} changed"


# ------------------------------------------------------------------ selection and torch.compile
def test_auto_selects_the_compiled_cpu_kernels():
    from zenith_fused._engines import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    p = torch.nn.Parameter(torch.randn(3))
    assert ZenithFused([p])._backend_for(p.device, p.dtype) == "cpu"


def test_operators_pass_torch_library_opcheck():
    b, args = _update_args()
    out = torch.empty(b.table.num_chunks)
    torch.library.opcheck(ops().sq_norm_partials.default, (b.table.tensors, b.table.chunks, b.dtype, 64, out))
    history = _history_list()
    torch.library.opcheck(ops().update_history.default, (torch.rand(3), history, None, None, None))
    torch.library.opcheck(ops().update_history.default,
                          (torch.rand(3), history, torch.tensor(8.0), torch.tensor(0.0), 1.5))
    torch.library.opcheck(ops().momentum_update.default, tuple(args.values()))


def test_norm_and_history_operators_run_under_torch_compile():
    def norm_and_history(b: Bucket, partials, history):
        ops().sq_norm_partials(b.table.tensors, b.table.chunks, b.dtype, b.table.chunk_size, partials)
        ops().update_history(partials, history, None, None, 1.0)

    compiled = torch.compile(norm_and_history, backend="aot_eager", fullgraph=True)
    b = _bucket(torch.float32, GROUP_SHAPES, _slots(len(GROUP_SHAPES)))
    eager_history, compiled_history = _history_list(), _history_list()
    for _ in range(3):
        norm_and_history(b, torch.empty(b.table.num_chunks), eager_history)
        compiled(b, torch.empty(b.table.num_chunks), compiled_history)
    for name, e, c in zip(HISTORY_FIELDS, eager_history, compiled_history):
        assert torch.equal(c, e), name
    assert compiled_history[0].item() == 3
