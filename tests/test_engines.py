"""Every backend's engine, call by call, against ``zenith_fused/reference.py``.

One harness for every backend: the same test bodies run the ``"reference"``, ``"cpu"`` (compiled
C++) and ``"triton"`` engines (CPU tensors under ``TRITON_INTERPRET=1``, which conftest sets where
there is no GPU; CUDA tensors on a GPU, where the ``"cuda"`` engine runs too). They go through the
interface the step plan uses (:class:`zenith_fused._engines.Engine`: ``sq_norm_partials(bucket)``,
``update_history(partials, history, inputs)``, ``momentum_update(bucket, view)``), on buckets built
as the plan builds them (``helpers.engine_bucket``), and compare with the reference functions run
on copies of the same random inputs:

* tensors of 0, 1, odd and several-chunk sizes, larger than a block and than the engine's own
  chunk, channels-last and transposed layouts, views at an odd offset (the scalar path) and a
  bucket mixing both (alignment is decided per tensor), many tensors in one bucket;
* float32, float16, bfloat16 and float64; NaN, infinities, signed zeros, denormals and the
  largest finite values; round-to-nearest-even stores;
* the momentum buffer's first step (never filled, filled before, filled before this history,
  filled at this step by another chunk), buckets without momentum, skipped steps;
* a tensor ``lr`` read through ``lr_ptrs`` (or copied into its cell) and changed in place;
* the history: the window's wrap, non-finite norms, GradScaler's ``grad_scale``/``found_inf``,
  clipping, a corrupt negative step, the linear warmup (``warmup_steps``), and ``K = 0`` as the
  paper's rule.

What is Triton's own (launch configuration, compilation count, a type check) is at the end;
what is the C++ operators' own (argument checks, instruction-set builds, thread counts) is in
``tests/test_cpu_kernels.py``; the optimizer end to end is ``tests/test_conformance.py``.

The interpreter runs every program in Python: its cases of the larger tests carry the ``slow``
marker (``pytest -m "not slow"`` is the quick run; CI runs everything).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from helpers import (
    assert_within_ulps,
    backend_unavailable,
    engine_bucket,
    engine_momentum_update,
    special_values,
    step_view,
)
from zenith_fused import _table, reference
from zenith_fused._engines import make_engine
from zenith_fused._plan import StepView, momentum_state
from zenith_fused.layout import ALIGNED, HISTORY_FIELDS, LR
from zenith_fused.reference import GroupHyperparams, StepInputs, ZenithHistory, compute_dtype

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF_AND_SINGLE = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ tolerances
@dataclass(frozen=True)
class Tolerance:
    # A stored parameter or buffer after one update from the same history values, against the
    # reference, in units in the last place of its dtype. Every engine computes in the reference's
    # compute dtype, rounds each operation on its own in the reference's order (no fused
    # multiply-add), and rounds to the storage type once, to nearest-even: bit for bit. (One known
    # exception, marked where it shows: the Triton interpreter reads bfloat16 denormals as zeros.)
    update_ulps: int
    # A chunk's squared norm against the float64 sum of its squares: each engine accumulates in
    # float32 lanes (float64 for float64) in its own order, then rounds once to float32.
    partial_rtol: float


TOLERANCE = {
    torch.float32: Tolerance(update_ulps=0, partial_rtol=1e-5),
    torch.float16: Tolerance(update_ulps=0, partial_rtol=1e-5),
    torch.bfloat16: Tolerance(update_ulps=0, partial_rtol=1e-5),
    torch.float64: Tolerance(update_ulps=0, partial_rtol=2**-22),  # an exact sum, one float32 rounding
}
# The history is float32 whatever the parameters' dtype. Fed the same partials, every engine sums
# them (and the window) in float64 and rounds once (zenith_fused.layout), then makes the
# reference's float32 operations with correctly rounded division and square root: bit for bit.
HISTORY_ULPS = 0


# ------------------------------------------------------------------ the engines
@dataclass(frozen=True)
class Case:
    """One engine on one device."""

    name: str
    device: torch.device

    def engine(self, chunk_size: int | None = None):
        """A fresh engine; ``chunk_size`` overrides its chunk (so small tensors span several)."""
        engine = make_engine(self.name)
        if chunk_size is not None and engine.uses_table:
            engine.chunk_elements = chunk_size
        return engine

    @property
    def uses_table(self) -> bool:
        return self.name != "reference"

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device.type == "cpu"

    @property
    def thread_counts(self) -> tuple:
        """The C++ CPU kernels spread chunks over ATen's threads: their results must not depend
        on how many there are."""
        return (1, 2) if self.name == "cpu" else (None,)


def engine_cases(*, slow_on_interpreter: bool = False, names=("reference", "cpu", "triton", "cuda")) -> list:
    """A ``pytest.param`` per engine that runs here, skipped with its reason where it can't; the
    interpreter's marked ``slow`` when asked."""
    cases = []
    for name in names:
        if name == "cuda" and not torch.cuda.is_available():
            continue  # as helpers.fused_cases: the compiled CUDA kernels only where a GPU is
        device = torch.device("cpu") if name == "cpu" else torch.device("cuda") if name == "cuda" else DEVICE
        case = Case(name, device)
        reason = backend_unavailable(name, device.type)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if case.interpreted and slow_on_interpreter:
            marks.append(pytest.mark.slow)
        cases.append(pytest.param(case, marks=marks, id="triton-interpreter" if case.interpreted else name))
    return cases


ENGINES = engine_cases()
FUSED = engine_cases(names=("cpu", "triton", "cuda"))


def crossed(cases: list, values: dict, *, keep=lambda case, value: True, quick=lambda value: True) -> list:
    """Every engine case with every entry of ``values`` (id: a tuple of further arguments), as
    ``pytest.param``s that keep the case's marks; the interpreter's are marked ``slow`` where
    ``quick(value)`` is false (the quick run keeps a few representatives)."""
    params = []
    for c in cases:
        case = c.values[0]
        for name, value in values.items():
            if keep(case, value):
                slow = [pytest.mark.slow] if case.interpreted and not quick(value) else []
                params.append(pytest.param(case, *value, id=f"{c.id}-{name}", marks=[*c.marks, *slow]))
    return params


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture
def threads():
    """Restores the thread count a test sets (``with_threads``)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def with_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


# ------------------------------------------------------------------ inputs
# A tensor is given by its shape (contiguous) or by (storage shape, permutation): a dense layout
# that is not contiguous, which the fused kernels walk in storage order.
CHANNELS_LAST = ((2, 4, 5, 3), (0, 3, 1, 2))  # a [2, 3, 4, 5] NCHW tensor stored NHWC
TRANSPOSED = ((9, 7), (1, 0))  # a [7, 9] tensor stored as its transpose
# Sizes 0, 1, below / at / above the C++ vector block and its 32 norm lanes, odd, several small
# chunks and interpreter blocks (128), and the two dense non-contiguous layouts.
SHAPES = [(0,), (1,), (7,), (31,), (32,), (33,), (3, 5, 7), (2, 129), (1000,), CHANNELS_LAST, TRANSPOSED]
# Per group: dampening and weight decay; no momentum; nesterov, maximize and weight decay; maximize.
GROUPS = [
    GroupHyperparams(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False),
    GroupHyperparams(lr=0.2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    GroupHyperparams(lr=0.05, momentum=0.5, dampening=0.0, weight_decay=0.02, nesterov=True, maximize=True),
    GroupHyperparams(lr=0.03, momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=True),
]
# The step at which each buffer was first filled, cycled over the buffers; the update runs at
# step 5: never filled (its first step), filled at step 3 (not first), filled before this history
# began (-1, not first), filled at this very step by another chunk of its tensor (first).
BUFFER_STEPS = (0, 3, -1, 5)


def random_tensor(spec, dtype, device, gen, *, offset: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A random tensor of ``spec``, starting ``offset`` elements into its own storage (1: not
    16-byte aligned, the kernels' scalar path)."""
    storage, perm = spec if spec and isinstance(spec[0], tuple) else (spec, None)
    flat = torch.zeros(math.prod(storage) + offset, dtype=dtype, device=device)
    t = flat[offset:].view(storage)
    if perm is not None:
        t = t.permute(perm)
    t.copy_((scale * torch.randn(t.shape, generator=gen)).to(dtype))
    return t


@dataclass
class State:
    """What an update reads and writes, and which group each tensor belongs to."""

    params: list
    grads: list
    buffers: list
    steps: list
    slots: list

    def clone(self) -> "State":
        """Copies of what an update writes (the gradients and groups are shared)."""
        return State(_clones(self.params), self.grads, _clones(self.buffers), _clones(self.steps), self.slots)


def _clones(tensors: list) -> list:
    return [None if t is None else t.clone(memory_format=torch.preserve_format) for t in tensors]


def random_state(dtype, device, specs, *, groups=GROUPS, seed=0, offsets=0, buffer_steps=BUFFER_STEPS) -> State:
    """Parameters, gradients and buffers of ``specs``; ``offsets`` (one int, or per tensor a
    ``(param, grad, buffer)`` triple) places them in their storage."""
    gen = torch.Generator().manual_seed(seed)
    slots = [i % len(groups) for i in range(len(specs))]
    state = State([], [], [], [], slots)
    for i, (spec, slot) in enumerate(zip(specs, slots)):
        off = offsets[i] if isinstance(offsets, list) else (offsets,) * 3
        state.params.append(random_tensor(spec, dtype, device, gen, offset=off[0]))
        state.grads.append(random_tensor(spec, dtype, device, gen, offset=off[1], scale=2.0))
        if groups[slot].momentum == 0:
            state.buffers.append(None)
            state.steps.append(None)
            continue
        if off[2] == 0:
            # Created as the optimizer creates it: it keeps its parameter's layout.
            buf, buf_step = momentum_state({}, state.params[-1])
            assert buf.stride() == state.params[-1].stride()
            buf.copy_(torch.randn(buf.shape, generator=gen).to(dtype))
        else:
            buf = random_tensor(spec, dtype, device, gen, offset=off[2])
            buf_step = torch.zeros((), dtype=torch.int64, device=device)
        buf_step.fill_(buffer_steps[sum(b is not None for b in state.buffers) % len(buffer_steps)])
        state.buffers.append(buf)
        state.steps.append(buf_step)
    return state


def bucket_of(case: Case, dtype, state: State, groups=GROUPS, *, chunk_size=None):
    return engine_bucket(case.engine(chunk_size), case.device, dtype, state.params, state.grads, state.buffers,
                         state.steps, state.slots, groups)


def reference_update(state: State, groups, view) -> None:
    reference.momentum_update(
        state.params, state.grads, state.buffers, state.steps, [groups[s] for s in state.slots],
        lr_scale=view.lr_scale, step=view.step, step_applied=view.step_applied, grad_multiplier=view.grad_multiplier,
    )


def assert_states_match(actual: State, expected: State, ulps: int, what: str = "") -> None:
    for name in ("params", "buffers", "steps"):
        for i, (a, e) in enumerate(zip(getattr(actual, name), getattr(expected, name))):
            if e is None:
                assert a is None, f"{what} {name}[{i}]"
            elif name == "steps":
                assert torch.equal(a, e), f"{what} momentum_steps[{i}]: {a.item()} != {e.item()}"
            else:
                assert_within_ulps(a, e, ulps, msg=f"{what} {name}[{i}] {tuple(e.shape)}")


def assert_unchanged(actual: State, before: State, what: str = "") -> None:
    for name in ("params", "buffers", "steps"):
        for i, (a, b) in enumerate(zip(getattr(actual, name), getattr(before, name))):
            assert (a is None and b is None) or torch.equal(a, b), f"{what} {name}[{i}] changed"


def assert_aligned_column(bucket, state: State, aligned: bool) -> None:
    """The table's ALIGNED column says ``aligned`` for every tensor that has elements (an empty
    one has no address to align)."""
    column = bucket.table.host_tensors[:, ALIGNED].tolist()
    assert [a for a, p in zip(column, state.params) if p.numel()] == [int(aligned)] * sum(
        p.numel() > 0 for p in state.params)


def chunk_sums(grads, dtype, chunk_size: int | None) -> torch.Tensor:
    """The squared norm of every chunk (of every tensor when ``chunk_size`` is None), summed in
    float64 from the values the kernels square; an empty tensor's one chunk is 0."""
    compute = compute_dtype(dtype)
    out = []
    for g in grads:
        flat = g.detach().cpu().permute(*_storage_order(g)).reshape(-1).to(compute).double()
        pieces = flat.split(chunk_size) if chunk_size and flat.numel() else [flat]
        out.extend(piece.square().sum() for piece in pieces)
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def _storage_order(t: torch.Tensor) -> list[int]:
    """The permutation that lists ``t``'s dimensions in storage order (outermost first)."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


# ------------------------------------------------------------------ squared-norm partials
# (chunk size, dtype, aligned). The reference has no chunks: it runs once per dtype and layout. The
# interpreter's quick cases: float32 aligned and bfloat16 at an odd offset, in its own chunks.
CHUNKED = crossed(
    ENGINES,
    {f"{'chunk' + str(chunk) if chunk else 'default-chunk'}-{dtype_id(dtype)}-{'aligned' if aligned else 'offset1'}":
     (chunk, dtype, aligned) for chunk in (64, None) for dtype in DTYPES for aligned in (True, False)},
    keep=lambda case, value: case.uses_table or value[0] is None,
    quick=lambda value: value in ((None, torch.float32, True), (None, torch.bfloat16, False)),
)


def default_chunk_shapes(case: Case) -> list:
    """SHAPES plus a tensor of two and a bit of the engine's own chunks."""
    if not case.uses_table:
        return SHAPES
    return SHAPES + [(2 * case.engine().chunk_size(case.device) + 5,)]


@pytest.mark.parametrize("case,chunk_size,dtype,aligned", CHUNKED)
def test_sq_norm_partials(case, chunk_size, dtype, aligned, threads):
    """One partial per chunk (per tensor on the reference), written into its slice of a larger
    buffer only; the same bits on every run and for any thread count."""
    state = random_state(dtype, case.device, default_chunk_shapes(case), offsets=0 if aligned else 1, seed=3)
    bucket = bucket_of(case, dtype, state, chunk_size=chunk_size)
    if case.uses_table:
        assert_aligned_column(bucket, state, aligned)
    n = bucket.num_partials
    expected = chunk_sums(state.grads, dtype, bucket.table.chunk_size if case.uses_table else None)
    assert expected.shape == (n,)
    results = []
    for n_threads in case.thread_counts + case.thread_counts[-1:]:
        with_threads(n_threads)
        buffer = torch.full((n + 5,), -7.0, device=case.device)
        bucket.partials = buffer[3:3 + n]  # the plan's partials are a slice of one buffer
        bucket.engine.sq_norm_partials(bucket)
        assert (buffer[:3] == -7).all() and (buffer[3 + n:] == -7).all()
        results.append(bucket.partials.cpu())
    partials = results[0]
    assert partials.dtype == torch.float32
    torch.testing.assert_close(partials.double(), expected, rtol=TOLERANCE[dtype].partial_rtol, atol=0)
    for other in results[1:]:
        assert torch.equal(other, partials)


@pytest.mark.parametrize("case", ENGINES)
def test_empty_bucket(case):
    """No tensor: no launch, no error, and a finite zero norm."""
    bucket = bucket_of(case, torch.float32, State([], [], [], [], []))
    assert bucket.num_partials == 0
    bucket.engine.sq_norm_partials(bucket)
    history = ZenithHistory.zeros(3, case.device)
    bucket.engine.update_history(bucket.partials, history.kernel_tensors(), StepInputs())
    assert history.step.item() == 1 and history.grad_norm.item() == 0.0
    engine_momentum_update(bucket, step_view(case.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", engine_cases(slow_on_interpreter=True))
def test_many_tensors_in_one_bucket(case, dtype):
    """More tensors (hence chunks and partials) than the interpreter's history lanes: 100 small
    ones and a larger one, in two groups; the norm and the update against the reference.
    (tests/test_conformance.py runs 500 through the optimizer.)"""
    gen = torch.Generator().manual_seed(5)
    specs = [(int(n),) for n in torch.randint(1, 40, (100,), generator=gen)] + [(700,)]
    groups = [GROUPS[0], GROUPS[2]]
    state = random_state(dtype, case.device, specs, groups=groups, seed=6)
    expected_state = state.clone()
    bucket = bucket_of(case, dtype, state, groups, chunk_size=64)
    bucket.engine.sq_norm_partials(bucket)
    expected = chunk_sums(state.grads, dtype, 64 if case.uses_table else None)
    torch.testing.assert_close(bucket.partials.cpu().double(), expected, rtol=TOLERANCE[dtype].partial_rtol, atol=0)
    view = step_view(case.device)
    engine_momentum_update(bucket, view)
    reference_update(expected_state, groups, view)
    assert_states_match(state, expected_state, TOLERANCE[dtype].update_ulps)


# ------------------------------------------------------------------ momentum update
# (chunk size, grad_multiplier, dtype, aligned): the multiplier (unscaling times clipping) varies
# with the chunk size. The interpreter's quick cases: float32 aligned, bfloat16 at an odd offset.
UPDATE_CASES = crossed(
    ENGINES,
    {f"{name}-{dtype_id(dtype)}-{'aligned' if aligned else 'offset1'}": (chunk, multiplier, dtype, aligned)
     for name, (chunk, multiplier) in {"chunk64": (64, 1.0), "default-chunk": (None, 0.0123457)}.items()
     for dtype in DTYPES for aligned in (True, False)},
    keep=lambda case, value: case.uses_table or value[0] is None,
    quick=lambda value: value[2:] in ((torch.float32, True), (torch.bfloat16, False)) and value[0] is None,
)


@pytest.mark.parametrize("case,chunk_size,grad_multiplier,dtype,aligned", UPDATE_CASES)
def test_momentum_update(case, chunk_size, grad_multiplier, dtype, aligned, threads):
    """Every stored value is the reference's. Chunks of 64 (one interpreter block each) and of
    the engine's own size (several blocks and a tail under the interpreter); a buffer whose first
    step this is, in a tensor of many chunks: the chunk that records the step and the others must
    all treat it as the first."""
    for n_threads in case.thread_counts:
        with_threads(n_threads)
        state = random_state(dtype, case.device, default_chunk_shapes(case), offsets=0 if aligned else 1, seed=1)
        expected = state.clone()
        initial = state.clone()
        bucket = bucket_of(case, dtype, state, chunk_size=chunk_size)
        if case.uses_table:
            assert_aligned_column(bucket, state, aligned)
        view = step_view(case.device, grad_multiplier=grad_multiplier)
        engine_momentum_update(bucket, view)
        reference_update(expected, GROUPS, view)
        assert_states_match(state, expected, TOLERANCE[dtype].update_ulps, f"threads={n_threads}")
        # Not an empty test: the tensors moved (a few elements may round back to where they were in
        # bfloat16), and each first-step buffer recorded step 5.
        assert all(not torch.equal(p, q) for p, q in zip(state.params, initial.params) if p.numel() > 100)
        assert [s.item() for s in state.steps if s is not None][:4] == [5, 3, -1, 5]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ENGINES)
def test_skipped_step_changes_nothing(case, dtype, aligned):
    state = random_state(dtype, case.device, SHAPES, offsets=0 if aligned else 1, seed=2, buffer_steps=(0, 2))
    before = state.clone()
    bucket = bucket_of(case, dtype, state)
    engine_momentum_update(bucket, step_view(case.device, lr_scale=0.5, step=4, applied=0))
    assert_unchanged(state, before)


@pytest.mark.parametrize("case", ENGINES)
def test_bucket_without_momentum_never_touches_the_stand_in_buffers(case):
    """The table points tensors without a buffer at their parameter and at a placeholder step:
    nothing may be written through either."""
    groups = [GROUPS[1]]  # momentum 0
    state = random_state(torch.float32, case.device, [(5,), (300,), (0,)], groups=groups)
    expected = state.clone()
    bucket = bucket_of(case, torch.float32, state, groups, chunk_size=64)
    if case.uses_table:
        assert not bucket.table.has_momentum
        placeholder = bucket.table.placeholder_step.clone()
    view = step_view(case.device)
    engine_momentum_update(bucket, view)
    reference_update(expected, groups, view)
    assert_states_match(state, expected, 0)  # a write through the stand-in buffer would show here
    if case.uses_table:
        assert torch.equal(bucket.table.placeholder_step, placeholder)


@pytest.mark.parametrize("lr_kind", ["readable", "copied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", ENGINES)
def test_tensor_lr(case, dtype, lr_kind):
    """A tensor lr of the compute dtype on the bucket's device is read through ``lr_ptrs`` (the
    table's own lr cells hold NaN, which no kernel may read); another one (float64 for a float32
    bucket, float32 for a float64 one) is copied into its cell at each update. A scheduler writing
    it in place is seen by the next update, with no new table."""
    compute = compute_dtype(dtype)
    lr_dtype = compute if lr_kind == "readable" else (torch.float64 if compute == torch.float32 else torch.float32)
    lrs = [torch.tensor(hp.lr * 1.37, dtype=lr_dtype, device=case.device) for hp in GROUPS]
    groups = [GroupHyperparams(lr, hp.momentum, hp.dampening, hp.weight_decay, hp.nesterov, hp.maximize)
              for lr, hp in zip(lrs, GROUPS)]
    state = random_state(dtype, case.device, [(300,), (7,), (33,), (1,)], seed=4)  # one tensor per group
    expected = state.clone()
    bucket = bucket_of(case, dtype, state, groups, chunk_size=64)
    if case.uses_table:
        read_from = _table.lr_cell_addresses(bucket.hyperparams) if lr_kind == "copied" else [
            lr.data_ptr() for lr in lrs]
        assert bucket.lr_ptrs.tolist() == read_from
        assert len(bucket.lr_copies) == (len(groups) if lr_kind == "copied" else 0)
        if lr_kind == "readable":
            bucket.hyperparams[:, LR] = float("nan")
    for step in (5, 6):
        view = step_view(case.device, step=step)
        engine_momentum_update(bucket, view)
        reference_update(expected, groups, view)
        assert_states_match(state, expected, 0, f"step {step}")
        for lr in lrs:
            lr.mul_(0.5)


@pytest.mark.parametrize("case", ENGINES)
def test_float64_is_computed_in_float64(case):
    """Issue 12's example: float32 arithmetic would leave 1.0 and 0.10000000149011612."""
    p = torch.tensor([1.0, 0.1], dtype=torch.float64, device=case.device)
    g = torch.full((2,), 1e-9, dtype=torch.float64, device=case.device)
    plain = GroupHyperparams(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    bucket = engine_bucket(case.engine(64), case.device, torch.float64, [p], [g], [None], [None], [0], [plain])
    engine_momentum_update(bucket, step_view(case.device, lr_scale=1.0))
    assert p.tolist() == [1.0 - 1e-9, 0.1 - 1e-9]


INTERPRETER_BF16_DENORMALS = (
    "Triton's interpreter (3.7) converts bfloat16 denormals to float32 as zeros "
    "(triton.runtime.interpreter._convert_float); a GPU converts them exactly")
SPECIAL_CASES = [
    pytest.param(c.values[0], dtype, denormals, id=f"{c.id}-{dtype_id(dtype)}-{kind}",
                 marks=c.marks + ([pytest.mark.xfail(strict=True, reason=INTERPRETER_BF16_DENORMALS)]
                                  if c.values[0].interpreted and dtype == torch.bfloat16 and denormals else []))
    for c in ENGINES for dtype in HALF_AND_SINGLE for denormals, kind in ((True, "all"), (False, "no-denormals"))
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, inside the interpreter: inf - inf and the like
@pytest.mark.parametrize("case,dtype,denormals", SPECIAL_CASES)
def test_update_special_values_match_the_reference(case, dtype, denormals):
    """NaN, infinities, signed zeros, denormals and the largest finite values, in parameters,
    gradients and momentum buffers: every stored value is the reference's, 0 ulps apart (NaN only
    has to meet NaN: torch does not fix a NaN's payload). Values near the largest finite one step to
    infinity; denormals stay denormal. The same without denormal inputs, for the one engine that
    cannot read them (the interpreter's bfloat16)."""
    gen = torch.Generator().manual_seed(17)
    groups = [GROUPS[0], GROUPS[2]]
    state = random_state(dtype, case.device, [(200,), (1000,), (600,)], groups=groups, seed=5, buffer_steps=(1,))
    for tensors in (state.params, state.grads, state.buffers):
        for t in tensors:
            t.copy_(special_values(dtype, t.numel(), gen, denormals=denormals))
    tiny = torch.finfo(dtype).smallest_normal
    if denormals:
        # A stretch of denormal parameters with no gradient and no momentum: they stay denormal.
        state.params[1][96:160] = (tiny * torch.randint(1, 16, (64,), generator=gen).to(dtype) / -32).to(case.device)
        state.grads[1][96:160] = 0
        state.buffers[1][96:160] = 0
    expected = state.clone()
    bucket = bucket_of(case, dtype, state, groups, chunk_size=256)
    view = step_view(case.device, lr_scale=0.75, step=2)
    engine_momentum_update(bucket, view)
    reference_update(expected, groups, view)
    assert_states_match(state, expected, 0)
    # The cases this test is about did occur.
    results = torch.cat(expected.params + expected.buffers).float().cpu()
    denormal = (results != 0) & (results.abs() < tiny)
    assert results.isnan().any() and results.isinf().any() and (denormal.sum() >= 64 or not denormals)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("case", ENGINES)
def test_stores_round_to_nearest_even(case, dtype):
    """With p = 0, lr * lr_scale = -1 and no momentum the update stores g * grad_multiplier, rounded
    once. A multiplier of 1 + eps/2 puts the products on ties (1 -> 1, even), just above ties
    (1 + eps -> 1 + 2 eps, where truncation, the interpreter's own float32 -> bfloat16 cast, gives
    1 + eps) and on carries into the exponent (2 - eps -> 2)."""
    eps = 2.0 ** -{torch.bfloat16: 7, torch.float16: 10}[dtype]
    big = 2047.0 if dtype == torch.float16 else 3.0e38
    g = torch.tensor([1.0, 1 + eps, -(1 + eps), 2 - eps, 0.1, -0.3, 3.0, big, 1 + 3 * eps]).to(case.device, dtype)
    p = torch.zeros(g.numel(), dtype=dtype, device=case.device)
    ascent = GroupHyperparams(lr=-1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    bucket = engine_bucket(case.engine(64), case.device, dtype, [p], [g], [None], [None], [0], [ascent])
    engine_momentum_update(bucket, step_view(case.device, lr_scale=1.0, step=1, grad_multiplier=1 + eps / 2))
    exact = g.float() * torch.tensor(1 + eps / 2, device=case.device)
    expected = exact.to(dtype)  # torch rounds to nearest-even
    assert_within_ulps(p, expected, 0, msg="round to nearest-even")
    if dtype == torch.bfloat16:  # the case the explicit rounding exists for
        truncated = (exact.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
        assert not torch.equal(truncated, expected)


# ------------------------------------------------------------------ alignment, per tensor
@pytest.mark.parametrize("odd", ["param", "grad", "buffer"])
@pytest.mark.parametrize("case", FUSED)
def test_mixed_bucket_alignment(case, odd, monkeypatch):
    """Aligned tensors plus one 1-element tensor whose ``odd`` stream is a view into a flat buffer
    at offset 1: the table's ALIGNED column is 1 for the aligned ones and 0 for the odd one, the
    kernels compile the 128-bit path for the bucket (Triton), and the results are the reference's."""
    specs = [(33,), (1000,), (1,), (300,)]
    odd_offsets = {"param": (1, 0, 0), "grad": (0, 1, 0), "buffer": (0, 0, 1)}[odd]
    offsets = [(0, 0, 0), (0, 0, 0), odd_offsets, (0, 0, 0)]
    groups = [GROUPS[0]]  # with momentum: every tensor has a buffer
    state = random_state(torch.float32, case.device, specs, groups=groups, seed=8, offsets=offsets)
    expected = state.clone()
    bucket = bucket_of(case, torch.float32, state, groups, chunk_size=64)
    assert bucket.table.host_tensors[:, ALIGNED].tolist() == [1, 1, 0, 1]
    assert bucket.table.any_aligned and not bucket.table.aligned
    spies = {}
    if case.name == "triton":  # record the launches, to see which variant they compile
        from zenith_fused.triton_kernels import momentum, sq_norm

        for module, name in ((sq_norm, "_sq_norm_partials_kernel"), (momentum, "_momentum_update_kernel")):
            spies[name] = LaunchSpy(getattr(module, name))
            monkeypatch.setattr(module, name, spies[name])
    bucket.engine.sq_norm_partials(bucket)
    view = step_view(case.device)
    engine_momentum_update(bucket, view)
    torch.testing.assert_close(bucket.partials.cpu().double(), chunk_sums(state.grads, torch.float32, 64),
                               rtol=TOLERANCE[torch.float32].partial_rtol, atol=0)
    reference_update(expected, groups, view)
    assert_states_match(state, expected, TOLERANCE[torch.float32].update_ulps)
    for name, spy in spies.items():
        assert [kwargs["VECTORIZE"] for _, kwargs in spy.launches] == [True], f"{name} left the 128-bit path out"


class LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel in its module: records each launch's arguments and
    launches the real kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


# ------------------------------------------------------------------ history
def history_on(device, window_size: int, *, warmup_steps: int = 0) -> ZenithHistory:
    return ZenithHistory.zeros(window_size, device, warmup_steps=warmup_steps)


def history_copy(h: ZenithHistory, device) -> ZenithHistory:
    return ZenithHistory(*(getattr(h, name).clone().to(device) for name in HISTORY_FIELDS))


def assert_history_matches(actual: ZenithHistory, expected: ZenithHistory, what: str) -> None:
    for name in HISTORY_FIELDS:
        a, e = getattr(actual, name).cpu(), getattr(expected, name).cpu()
        if a.is_floating_point():
            assert_within_ulps(a, e, HISTORY_ULPS, msg=f"{what}: {name}")
        else:
            assert torch.equal(a, e), f"{what}: {name} {a.tolist()} != {e.tolist()}"


def for_engine(case: Case, inputs: StepInputs) -> StepInputs:
    """What the engine gets: the optimizer hands every engine 0-dim tensors; the fused kernels
    take GradScaler's tensors of any one-element shape too, so they get them as they are."""
    if case.uses_table:
        return inputs
    return as_0dim(inputs)


def as_0dim(inputs: StepInputs) -> StepInputs:
    zero = lambda t: None if t is None else t.reshape(())  # noqa: E731
    return StepInputs(zero(inputs.grad_scale), zero(inputs.found_inf), inputs.max_grad_norm)


# GradScaler's tensors in every one-element shape, with and without clipping.
HISTORY_INPUTS = {
    "plain": dict(),
    "scaler-0d": dict(grad_scale=(), found_inf=()),
    "scaler-1-clipped": dict(grad_scale=(1,), found_inf=(1,), clip=0.5),
    "scaler-11": dict(grad_scale=(1, 1), found_inf=(1, 1)),
    "clipped": dict(clip=0.8),
}
# Windows of one, of a few, and of more than the interpreter's 64 history lanes.
HISTORY_CASES = crossed(ENGINES, {f"window{w}": (w,) for w in (1, 3, 70)})


@pytest.mark.parametrize("variant", list(HISTORY_INPUTS))
@pytest.mark.parametrize("case,window_size", HISTORY_CASES)
def test_update_history_matches_reference(case, window_size, variant):
    """From a history with a full window, enough steps to wrap it, with a non-finite norm (inf,
    then NaN) and a GradScaler overflow among them, and from 0 to 90 partials a step (more than
    the interpreter's lanes)."""
    spec = HISTORY_INPUTS[variant]
    gen = torch.Generator().manual_seed(window_size)
    start = ZenithHistory.zeros(window_size, torch.device("cpu"))
    start.norm_window.copy_(torch.rand(window_size, generator=gen) * 4 + 0.5)
    # Slot W - 3 next (for W > 3): five finite steps wrap the window.
    start.step.fill_(4 * window_size - 3)
    start.window_max.fill_(float(start.norm_window.max()) * 1.1)
    start.skipped_steps.fill_(2)
    start.lr_scale.fill_(0.75)
    ours, ref = history_copy(start, case.device), history_copy(start, case.device)
    engine = case.engine()
    clipped = skipped = 0
    for i in range(8):
        partials = torch.rand(int(torch.randint(0, 90, (1,), generator=gen)), generator=gen) * (1 + i % 4)
        if i == 1:
            partials = torch.cat([partials, torch.tensor([float("inf")])])
        if i == 3:
            partials = torch.cat([torch.tensor([float("nan")]), partials])
        grad_scale = found_inf = None
        if "grad_scale" in spec:
            grad_scale = torch.full(spec["grad_scale"], 2.0 ** (i % 3 + 4))
            partials = partials * grad_scale.item() ** 2
        if "found_inf" in spec:
            found_inf = torch.full(spec["found_inf"], 1.0 if i == 4 else 0.0)
        skipped += i in (1, 3) or (found_inf is not None and i == 4)
        on = lambda t: None if t is None else t.to(case.device)  # noqa: E731
        inputs = StepInputs(on(grad_scale), on(found_inf), spec.get("clip"))
        partials = partials.to(case.device)
        engine.update_history(partials, ours.kernel_tensors(), for_engine(case, inputs))
        reference.update_history(ref, partials, as_0dim(inputs))
        assert_history_matches(ours, ref, f"step {i}")
        clipped += spec.get("clip") is not None and ref.step_applied.item() and ref.grad_multiplier.item() < (
            0.999 if grad_scale is None else 0.999 / grad_scale.item())
    assert ref.skipped_steps.item() == 2 + skipped
    if "clip" in spec:
        assert clipped > 0  # the clipping really happened


@pytest.mark.parametrize("case", ENGINES)
def test_found_inf_skips_the_step(case):
    engine = case.engine()
    history = history_on(case.device, 3)
    for found_inf, applied in ((0.0, 1), (1.0, 0), (0.0, 1)):
        inputs = StepInputs(found_inf=torch.tensor([[found_inf]], device=case.device))
        engine.update_history(torch.tensor([4.0, 5.0], device=case.device), history.kernel_tensors(),
                              for_engine(case, inputs))
        assert history.step_applied.item() == applied
    assert history.step.item() == 2 and history.skipped_steps.item() == 1
    assert history.norm_window.tolist() == [3.0, 3.0, 0.0]


def _guarded_history(device, window_size, step, guard=8):
    """A history whose window sits between two guard regions of NaN, to catch stray writes."""
    storage = torch.full((guard + window_size + guard,), float("nan"), device=device)
    history = history_on(device, window_size)
    history.norm_window = storage[guard:guard + window_size]
    history.norm_window.fill_(1.0)
    history.window_max.fill_(1.0)
    history.step.fill_(step)
    return history, storage, guard


@pytest.mark.parametrize("step", [-1, -5, -70, -(2**63)], ids=["minus1", "minus5", "minus70", "int64-min"])
@pytest.mark.parametrize("window_size", [1, 4, 100])
@pytest.mark.parametrize("case", ENGINES)
def test_a_negative_step_writes_nothing_outside_the_window(case, window_size, step):
    """A corrupt negative ``step`` counts as a warmup step (``t <= K = 0``): nothing is recorded,
    and no slot outside the window is ever written; the rest is the reference's."""
    ours, storage, guard = _guarded_history(case.device, window_size, step)
    ref, _, _ = _guarded_history(case.device, window_size, step)
    partials = torch.tensor([9.0], device=case.device)
    case.engine().update_history(partials, ours.kernel_tensors(), StepInputs())
    reference.update_history(ref, partials)
    assert storage[:guard].isnan().all() and storage[guard + window_size:].isnan().all()
    assert (ours.norm_window == 1.0).all()
    assert_history_matches(ours, ref, f"step {step}")


# ------------------------------------------------------------------ warmup and the paper's rule
def paper_rule(norms, skipped, window_size: int, warmup_steps: int):
    """ZENITH's history in plain Python floats, step by step: ``(t, lr_scale, M, window)`` after
    each step. ``t <= K``: scale ``t / K``, nothing recorded. Then with ``u = t - K``: the norm goes
    to slot ``(u - 1) mod W``, ``m`` is the mean of the last ``min(u, W)``, ``M = max(M, m)``,
    ``scale = m / M``. A skipped step changes none of it."""
    t, scale, maximum, window = 0, 1.0, 0.0, [0.0] * window_size
    out = []
    for n, skip in zip(norms, skipped):
        if not skip:
            t += 1
            if t <= warmup_steps:
                scale = t / warmup_steps
            else:
                u = t - warmup_steps
                window[(u - 1) % window_size] = n
                mean = sum(window) / min(u, window_size)
                maximum = max(maximum, mean)
                scale = mean / maximum if maximum > 0 else 1.0
        out.append((t, scale, maximum, list(window)))
    return out


WARMUP_CASES = crossed(ENGINES, {f"K{k}-W{w}": (k, w) for k, w in ((0, 3), (3, 2), (4, 5))})


@pytest.mark.parametrize("case,warmup_steps,window_size", WARMUP_CASES)
def test_warmup_then_the_window_rule(case, warmup_steps, window_size):
    """K warmup steps scale by t / K and record nothing; then the paper's rule over u = t - K, the
    window wrapping. Skipped steps (a non-finite norm, a GradScaler overflow) inside and after the
    warmup change neither t nor the scale. K = 0 is the paper's rule. Against the reference, bit
    for bit, and against the rule written out in Python."""
    steps = max(3 * warmup_steps, 6) + 2 * window_size + 2
    k = warmup_steps
    # Skipped: a non-finite norm and a found_inf inside the warmup (when there is one) and after it.
    nonfinite = {1, 3 * k + 1} if k else {2, 7}
    overflow = {2, 3 * k + 3} if k else {4, 9}
    engine = case.engine()
    ours = history_on(case.device, window_size, warmup_steps=k)
    ref = history_on(case.device, window_size, warmup_steps=k)
    gen = torch.Generator().manual_seed(k + window_size)
    norms, skipped, skipped_at = [], [], []
    for i in range(steps):
        partials = torch.rand(5, generator=gen) * (1.0 + 0.9 * math.sin(i * 0.37))
        if i in nonfinite:
            partials[2] = float("inf") if i % 2 else float("nan")
        found_inf = torch.tensor(1.0 if i in overflow else 0.0, device=case.device)
        partials = partials.to(case.device)
        engine.update_history(partials, ours.kernel_tensors(), StepInputs(found_inf=found_inf))
        reference.update_history(ref, partials, StepInputs(found_inf=found_inf))
        assert_history_matches(ours, ref, f"step {i}")
        norms.append(math.sqrt(partials.double().sum().item()))
        skipped.append(i in nonfinite or i in overflow)
        if skipped[-1]:
            skipped_at.append(ours.step.item())
        t, scale, maximum, window = paper_rule(norms, skipped, window_size, k)[-1]
        assert ours.step.item() == t and ours.skipped_steps.item() == sum(skipped), f"step {i}"
        assert ours.step_applied.item() == (not skipped[-1])
        assert ours.lr_scale.item() == pytest.approx(scale, rel=1e-6), f"step {i}: lr_scale"
        assert ours.window_max.item() == pytest.approx(maximum, rel=1e-6), f"step {i}: window_max"
        assert ours.norm_window.tolist() == pytest.approx(window, rel=1e-6), f"step {i}: norm_window"
    # The cases this test is about did occur: skips inside and after the warmup, a wrapped window,
    # a scale below 1.
    assert min(skipped_at) < k < max(skipped_at) or k == 0
    assert ours.step.item() - k > window_size and 0.0 < ours.lr_scale.item() < 1.0


# ------------------------------------------------------------------ Triton's own
TRITON = engine_cases(names=("triton",))


@pytest.mark.parametrize("case", TRITON)
def test_triton_momentum_update_rejects_hyperparams_in_the_wrong_dtype(case):
    from zenith_fused import triton_kernels

    bucket = bucket_of(case, torch.float32, random_state(torch.float32, case.device, [(3,)], groups=[GROUPS[1]]),
                       [GROUPS[1]])
    view = step_view(case.device)
    with pytest.raises(TypeError, match="hyperparams for torch.float64 tensors must be in the compute dtype"):
        triton_kernels.momentum_update(bucket.table, torch.float64, bucket.hyperparams, bucket.lr_ptrs,
                                       view.lr_scale, view.step, view.step_applied, view.grad_multiplier)


@pytest.mark.parametrize("case", TRITON)
def test_triton_launch_config_chunk_size_is_a_multiple_of_16_and_of_every_block(case):
    from zenith_fused.triton_kernels import config

    configs = [config.launch_config(torch.device("cpu")), *config.GPU_CONFIGS.values()]
    for c in configs:
        assert c.chunk_size % 16 == 0 and c.chunk_size % c.block == 0
        for dtype in DTYPES:
            assert config.block_for(c, c.chunk_size, dtype) in (c.block, c.block // 2)
    assert config.block_for(configs[0], 48, torch.float32) == 16


def gpu_cache_keys(kernel, launches, arch=90) -> set:
    """The keys under which ``JITFunction.run`` would cache (and so compile) these launches on an
    sm_``arch`` GPU: one key per compilation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # the interpreter's stand-in keeps the decorator's arguments
        kernel = JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items()
                                           if k in ("do_not_specialize", "do_not_specialize_on_alignment")})
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    keys = set()
    for args, kwargs in launches:
        _, specialization, options = binder(*args, **kwargs)
        keys.add(compute_cache_key({}, specialization, options))
    return keys


@pytest.mark.parametrize("case", TRITON)
def test_triton_no_recompilation_when_chunk_partial_or_window_counts_change(case, monkeypatch):
    """A plan whose chunk count, partial count or window length changes must launch the kernels it
    has already compiled.

    Under the interpreter nothing is compiled, and on a CPU-only machine no ``JITFunction`` can
    launch, so the compilations are counted the way ``JITFunction.run`` decides them: each launch
    the launchers make (recorded by a spy, and executed) is bound by the binder Triton builds for a
    CUDA target, with the kernel's own ``do_not_specialize`` lists, and ``compute_cache_key`` gives
    the key of its kernel cache: a new key is a new compilation. This is what recompiled before
    (``num_partials`` and ``window_size`` specialized on == 1 and % 16, ``out`` slices on their
    16-byte alignment); without the ``do_not_specialize`` lists the test sees several keys.
    """
    from zenith_fused.triton_kernels import history, momentum, sq_norm

    spies = {}
    for module, name in ((sq_norm, "_sq_norm_partials_kernel"), (momentum, "_momentum_update_kernel"),
                         (history, "_update_history_kernel")):
        spies[name] = LaunchSpy(getattr(module, name))
        monkeypatch.setattr(module, name, spies[name])

    partials_buffer = torch.zeros(64, device=case.device)
    groups = [GROUPS[0]]
    for count, offset in ((1, 0), (5, 1), (16, 3), (17, 2)):  # tensors, hence chunks and partials
        state = random_state(torch.float32, case.device, [(20,)] * count, groups=groups, seed=count)
        bucket = bucket_of(case, torch.float32, state, groups, chunk_size=64)
        bucket.partials = partials_buffer[offset:offset + bucket.num_partials]
        bucket.engine.sq_norm_partials(bucket)
        for window_size in (1, 3, 16):
            h = history_on(case.device, window_size)
            bucket.engine.update_history(bucket.partials, h.kernel_tensors(), StepInputs())
        engine_momentum_update(bucket, StepView.of(h, h.device))

    for name, spy in spies.items():
        assert len(spy.launches) >= 4, name
        keys = gpu_cache_keys(spy.kernel, spy.launches)
        assert len(keys) == 1, f"{name}: {len(keys)} compilations for {len(spy.launches)} launches"

