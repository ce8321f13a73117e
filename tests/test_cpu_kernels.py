"""What is the compiled CPU operators' own (``torch.ops.zenith_fused.*``, csrc/cpu/).

Their math against the reference, with every other backend, is tests/test_engines.py. Here: the
instruction-set builds give the same bits; the results do not depend on the thread count; the
argument checks of each operator (shared with the CUDA bindings, csrc/tensor_checks.h) and their
messages, raised before anything is written; the step counter saturates; the operators pass
``torch.library.opcheck`` and trace under ``torch.compile``; ``"auto"`` picks them.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    assert_bit_identical,
    engine_bucket,
    random_grads,
    set_grads,
    snapshot,
    special_values,
    step_view,
    twin_optimizers,
)
from zenith_fused import ZenithFused, _ext
from zenith_fused._engines import make_engine, resolve_backend
from zenith_fused._plan import hyperparam_row
from zenith_fused.layout import CHUNK_START, CHUNK_TENSOR, HISTORY_FIELDS, HYPERPARAM_SLOT
from zenith_fused.reference import GroupHyperparams, StepInputs, ZenithHistory

REASON = _ext.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the compiled CPU kernels are unavailable: {REASON}")

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF_AND_SINGLE = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [
    GroupHyperparams(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False),
    GroupHyperparams(lr=0.2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    GroupHyperparams(lr=0.05, momentum=0.5, dampening=0.0, weight_decay=0.02, nesterov=True, maximize=True),
    GroupHyperparams(lr=0.03, momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=True),
]
# The optimizer-level twin of GROUPS, as helpers.twin_optimizers takes it.
OPTIMIZER_GROUPS = [
    {"index": [0, 4, 8], "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"index": [1, 5], "momentum": 0.0, "lr": 0.2},
    {"index": [2, 6, 9], "momentum": 0.5, "nesterov": True, "maximize": True, "lr": 0.05, "weight_decay": 0.02},
    {"index": [3, 7], "momentum": 0.8, "maximize": True, "lr": 0.03},
]


def ops():
    return torch.ops.zenith_fused


def cpu_bucket(dtype, sizes, *, chunk_size=64, filled_at=0, seed=0):
    """A "cpu" engine's bucket of random 1-d tensors, one group after the other (``GROUPS``)."""
    gen = torch.Generator().manual_seed(seed)
    slots = [i % len(GROUPS) for i in range(len(sizes))]
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    buffers = [torch.randn(n, generator=gen).to(dtype) if GROUPS[k].momentum else None for n, k in zip(sizes, slots)]
    steps = [torch.tensor(filled_at) if GROUPS[k].momentum else None for k in slots]
    engine = make_engine("cpu")
    engine.chunk_elements = chunk_size
    return engine_bucket(engine, "cpu", dtype, params, grads, buffers, steps, slots, GROUPS)


def clone_all(tensors):
    return [None if t is None else t.clone() for t in tensors]


def assert_lists_equal(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None
            continue
        assert torch.equal(a, e), f"{what}[{i}] of shape {tuple(e.shape)} differs in {(a != e).sum().item()} elements"


# ------------------------------------------------------------------ instruction sets and threads
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


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_every_instruction_set_build_gives_the_same_bits(isa, tmp_path):
    here = ops().cpu_kernel_isa()
    if here not in _ISA_ORDER or _ISA_ORDER.index(isa) >= _ISA_ORDER.index(here):
        pytest.skip(f"this process runs the {here} build; {isa} is compared only against a wider one")
    sizes = [1, 31, 33, 64, 1000, 4099]
    buckets = {str(dtype): cpu_bucket(dtype, sizes, filled_at=1, seed=11) for dtype in ALL_DTYPES}
    gen = torch.Generator().manual_seed(12)
    for dtype in HALF_AND_SINGLE:  # NaN, infinities, denormals: the paths that leave the fast conversion
        b = buckets[f"{dtype} specials"] = cpu_bucket(dtype, sizes, filled_at=1)
        for tensor in (*b.params, *b.grads, *(t for t in b.momentum_buffers if t is not None)):
            tensor.copy_(special_values(dtype, tensor.numel(), gen) if tensor.numel() > 1 else tensor)
    rows = [hyperparam_row(hp) for hp in GROUPS]
    inputs = {name: (b.dtype, b.params, b.grads, b.momentum_buffers, b.momentum_steps, b.hyperparam_slots, rows)
              for name, b in buckets.items()}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
    result = subprocess.run([sys.executable, "-c", _ISA_CHILD, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["isa"] == isa

    for name, b in buckets.items():
        b.engine.sq_norm_partials(b)
        b.engine.momentum_update(b, step_view("cpu", lr_scale=0.75, step=2, grad_multiplier=0.5))
        assert torch.equal(b.partials, theirs["partials"][name]) or "specials" in name, \
            f"{name} partials: {here} != {isa}"
        assert_lists_equal(_bits(theirs["params"][name][0]), _bits(b.params), f"{name} params ({isa})")
        assert_lists_equal(_bits(theirs["params"][name][1]), _bits(b.momentum_buffers), f"{name} buffers ({isa})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_bits_for_any_thread_count_and_on_every_run(dtype, monkeypatch):
    """Whole steps through the optimizer, in chunks of 64 spread over 1 or 2 threads."""
    from zenith_fused._compiled_engines import CpuEngine

    monkeypatch.setattr(CpuEngine, "chunk_elements", 64)
    shapes = [(0,), (1,), (7,), (31,), (33,), (3, 5, 7), (2, 129), (1000,), (70001,), (4, 3000)]
    before = torch.get_num_threads()
    snapshots = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            (opt, params), _ = twin_optimizers(shapes, OPTIMIZER_GROUPS, dtype=dtype, device="cpu", backend="cpu",
                                               window_size=7)
            gen = torch.Generator().manual_seed(9)
            for step in range(10):
                set_grads(params, random_grads(shapes, dtype, "cpu", gen, step))
                opt.step()
            snapshots.append(snapshot(opt, params) | {"grad_norm": opt.grad_norm.clone()})
    finally:
        torch.set_num_threads(before)
    assert_bit_identical(snapshots[0], snapshots[1])
    assert_bit_identical(snapshots[1], snapshots[2])


# ------------------------------------------------------------------ the step counter
def test_the_largest_step_does_not_overflow():
    """The C++ history saturates ``step`` at its largest value instead of wrapping to a negative
    count (the reference's int64 addition wraps), and still writes inside the window."""
    guard = 8
    storage = torch.full((guard + 4 + guard,), float("nan"))
    history = ZenithHistory.zeros(4, torch.device("cpu"))
    history.norm_window = storage[guard:guard + 4]
    history.norm_window.fill_(1.0)
    history.window_max.fill_(1.0)
    history.step.fill_(2**63 - 1)
    make_engine("cpu").update_history(torch.tensor([9.0]), history.kernel_tensors(), StepInputs())
    assert history.step.item() == 2**63 - 1
    assert storage[:guard].isnan().all() and storage[guard + 4:].isnan().all()
    assert history.norm_window[(2**63 - 1) % 4].item() == 3.0
    assert 0.0 < history.lr_scale.item() <= 1.0


# ------------------------------------------------------------------ argument checks
def _update_args():
    b = cpu_bucket(torch.float32, [20, 20, 3], chunk_size=8)
    view = step_view("cpu")
    args = dict(tensors=b.table.tensors, chunks=b.table.chunks, dtype=b.dtype, chunk_size=8, has_momentum=True,
                hyperparams=b.hyperparams, lr_ptrs=b.lr_ptrs, lr_scale=view.lr_scale, step=view.step,
                step_applied=view.step_applied, grad_multiplier=view.grad_multiplier)
    return b, args


def _table_row(column, row, value):
    def change(t):
        t = t.clone()
        t[row, column] = value
        return t
    return change


UPDATE_ERRORS = {
    "tensors-dtype": (dict(tensors=lambda t: t.int()), RuntimeError,
                      r"tensors must be a contiguous int64 tensor of shape \[rows, 7\] on cpu; got Int"),
    "tensors-columns": (dict(tensors=lambda t: t[:, :6]), RuntimeError,
                        r"tensors must be a contiguous int64 tensor of shape \[rows, 7\]"),
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
    "slot": (dict(tensors=_table_row(HYPERPARAM_SLOT, 2, 7)), RuntimeError,
             r"tensors\[2\] has hyper-parameter slot 7, which is not a row of the 4-row hyperparams table"),
    "chunk-tensor": (dict(chunks=_table_row(CHUNK_TENSOR, 1, 9)), RuntimeError,
                     r"chunks\[1\] names tensor 9, which is not a row of the 3-row tensor table"),
    "chunk-start": (dict(chunks=_table_row(CHUNK_START, 6, 100)), RuntimeError,
                    r"chunks\[6\] starts at element 100 of tensor 2, which has 3 elements"),
}


@pytest.mark.parametrize("change,error,match", UPDATE_ERRORS.values(), ids=UPDATE_ERRORS.keys())
def test_momentum_update_checks_its_arguments_before_writing(change, error, match):
    b, args = _update_args()
    assert b.table.num_chunks == 7  # 3 + 3 + 1 chunks of 8
    for key, fn in change.items():
        args[key] = fn(args[key])
    before = (clone_all(b.params), clone_all(b.momentum_buffers), clone_all(b.momentum_steps))
    with pytest.raises(error, match=match):
        ops().momentum_update(**args)
    # A call that raises has changed nothing, also in the tensors before the faulty one.
    assert_lists_equal(b.params, before[0], "params")
    assert_lists_equal(b.momentum_buffers, before[1], "momentum_buffers")
    assert_lists_equal(b.momentum_steps, before[2], "momentum_steps")


def test_sq_norm_partials_checks_out_and_changes_nothing():
    b = cpu_bucket(torch.float32, [5, 100])
    out = torch.full((b.table.num_chunks + 1,), 7.0)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 tensor of shape \[3\] \(one partial "
                                           r"per chunk\) on cpu; got Float of shape \[4\]"):
        ops().sq_norm_partials(b.table.tensors, b.table.chunks, b.dtype, 64, out)
    bad_chunks = _table_row(CHUNK_TENSOR, 0, -1)(b.table.chunks)
    out = torch.full((b.table.num_chunks,), 7.0)
    with pytest.raises(RuntimeError, match=r"chunks\[0\] names tensor -1"):
        ops().sq_norm_partials(b.table.tensors, bad_chunks, b.dtype, 64, out)
    assert (out == 7.0).all()


def _history_list():
    return ZenithHistory.zeros(3, torch.device("cpu")).kernel_tensors()


def _replace(name, fn):
    index = HISTORY_FIELDS.index(name)

    def change(history):
        history = list(history)
        history[index] = fn(history[index])
        return history
    return change


HISTORY_ERRORS = {
    "length": (dict(history=lambda h: h[:-1]), "history must hold the 9 tensors of "
               r"zenith_fused.layout.HISTORY_FIELDS, in that order; got 8"),
    "window-shape": (dict(history=_replace("norm_window", lambda w: w.reshape(1, 3))),
                     r"norm_window must be a non-empty contiguous 1-D float32 tensor; got Float of shape \[1, 3\]"),
    "step-dtype": (dict(history=_replace("step", lambda t: t.int())), "step must be a one-element Long tensor"),
    "window-max-dtype": (dict(history=_replace("window_max", lambda t: t.double())),
                         "window_max must be a one-element Float"),
    "skipped-dtype": (dict(history=_replace("skipped_steps", lambda t: t.float())),
                      "skipped_steps must be a one-element Long"),
    "grad-norm-shape": (dict(history=_replace("grad_norm", lambda t: t.repeat(2))),
                        "grad_norm must be a one-element Float"),
    "lr-scale-dtype": (dict(history=_replace("lr_scale", lambda t: t.half())), "lr_scale must be a one-element Float"),
    "step-applied-dtype": (dict(history=_replace("step_applied", lambda t: t.long())),
                           "step_applied must be a one-element Int"),
    "multiplier-dtype": (dict(history=_replace("grad_multiplier", lambda t: t.double())),
                         "grad_multiplier must be a one-element Float"),
    "warmup-steps-dtype": (dict(history=_replace("warmup_steps", lambda t: t.int())),
                           r"warmup_steps must be a one-element Long tensor on cpu; got Int"),
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
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = ZenithFused([p])
    opt.step()
    assert dict(opt.backends) == {(torch.device("cpu"), torch.float32): "cpu"}


def test_operators_pass_torch_library_opcheck():
    b, args = _update_args()
    out = torch.empty(b.table.num_chunks)
    torch.library.opcheck(ops().sq_norm_partials.default, (b.table.tensors, b.table.chunks, b.dtype, 8, out))
    history = _history_list()
    torch.library.opcheck(ops().update_history.default, (torch.rand(3), history, None, None, None))
    torch.library.opcheck(ops().update_history.default,
                          (torch.rand(3), history, torch.tensor(8.0), torch.tensor(0.0), 1.5))
    torch.library.opcheck(ops().momentum_update.default, tuple(args.values()))


def test_norm_and_history_operators_run_under_torch_compile():
    def norm_and_history(tensors, chunks, partials, history):
        ops().sq_norm_partials(tensors, chunks, torch.float32, 64, partials)
        ops().update_history(partials, history, None, None, 1.0)

    compiled = torch.compile(norm_and_history, backend="aot_eager", fullgraph=True)
    b = cpu_bucket(torch.float32, [0, 1, 7, 33, 1000, 70001])
    eager_history, compiled_history = _history_list(), _history_list()
    for _ in range(3):
        norm_and_history(b.table.tensors, b.table.chunks, torch.empty(b.table.num_chunks), eager_history)
        compiled(b.table.tensors, b.table.chunks, torch.empty(b.table.num_chunks), compiled_history)
    for name, e, c in zip(HISTORY_FIELDS, eager_history, compiled_history):
        assert torch.equal(c, e), name
    assert compiled_history[0].item() == 3
