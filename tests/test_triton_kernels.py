"""The Triton launchers of ``zenith_fused.triton_kernels`` against ``zenith_fused.reference``.

Each launcher runs on fresh random inputs (CPU tensors under ``TRITON_INTERPRET=1``, set by
conftest, or CUDA tensors on a GPU) next to the reference function on copies of the same inputs:
tensors of 0, 1, odd and several-chunk sizes; float32, float16, bfloat16 and float64; aligned
tables and unaligned ones (views into a flat buffer at an odd offset), which take the two kernel
specializations; chunk sizes small enough that chunks have several blocks and a tail.

The update is compared per stored value in ulps: float32 and float64 must be bit-identical (the
kernel rounds every operation separately, in the reference's order), float16 and bfloat16 within
one ulp (in practice they are identical too: every store rounds to nearest-even).
"""
from __future__ import annotations

import pytest
import torch

from zenith_fused import _table
from zenith_fused import reference as R
from zenith_fused import triton_kernels as K
from zenith_fused.triton_kernels import config as kernel_config
from zenith_fused.triton_kernels import history as history_module
from zenith_fused.triton_kernels import momentum as momentum_module
from zenith_fused.triton_kernels import sq_norm as sq_norm_module

from helpers import HISTORY_TOL, assert_within_ulps

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NUMELS = (0, 1, 7, 300, 1000)
ULPS = {torch.float32: 0, torch.float64: 0, torch.float16: 1, torch.bfloat16: 1}


def ids(values):
    return [str(v).replace("torch.", "") for v in values]


def random_tensors(numels, dtype, gen, *, aligned: bool, scale: float = 1.0) -> list[torch.Tensor]:
    """Random tensors; unaligned ones are views into one flat buffer starting one element in."""
    if aligned:
        return [(scale * torch.randn(n, generator=gen)).to(DEVICE, dtype) for n in numels]
    flat = (scale * torch.randn(sum(numels) + 1, generator=gen)).to(DEVICE, dtype)
    return list(torch.split(flat[1:], list(numels)))


def build_table(params, grads, buffers, steps, slots, chunk_size):
    placeholder = torch.zeros((), dtype=torch.int64, device=DEVICE)
    return _table.build_tensor_table(params, grads, buffers, steps, slots, chunk_size=chunk_size,
                                     placeholder_step=placeholder), placeholder


# ------------------------------------------------------------------------------ squared norm
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
@pytest.mark.parametrize("chunk_size", [256, 48])
def test_sq_norm_partials(dtype, aligned, chunk_size):
    gen = torch.Generator().manual_seed(1)
    grads = random_tensors(NUMELS, dtype, gen, aligned=aligned, scale=3.0)
    table, _ = build_table(grads, grads, [None] * len(grads), [None] * len(grads), [0] * len(grads), chunk_size)
    assert table.aligned == aligned
    # The plan's partials are a slice of a larger buffer: the slots around it must stay untouched.
    buffer = torch.full((table.num_chunks + 5,), -7.0, device=DEVICE)
    out = buffer[3:3 + table.num_chunks]
    K.sq_norm_partials(table, dtype, out)

    chunks = [grads[t][s:s + chunk_size] for t, s in table.chunks.cpu().tolist()]
    expected = R.squared_norm_partials(chunks).to(DEVICE)
    # Per chunk the same sum in another order: a few float32 ulps (float64 gradients: one, at the
    # final rounding of a float64 sum).
    rtol = 2**-23 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, expected, rtol=rtol, atol=0)
    assert (buffer[:3] == -7).all() and (buffer[3 + table.num_chunks:] == -7).all()


def test_sq_norm_partials_of_nothing():
    table, _ = build_table([], [], [], [], [], 64)
    K.sq_norm_partials(table, torch.float32, torch.empty(0, device=DEVICE))  # no launch, no error


# ------------------------------------------------------------------------------ history
def random_history(window_size, gen, *, step: int) -> R.ZenithHistory:
    h = R.ZenithHistory.zeros(window_size, DEVICE)
    filled = min(max(step, 0), window_size)
    h.norm_window[:filled] = (torch.rand(filled, generator=gen) * 4 + 0.5).to(DEVICE)
    h.step.fill_(step)
    h.window_max.fill_(float(h.norm_window.max()) if filled else 0.0)
    h.skipped_steps.fill_(2)
    h.lr_scale.fill_(0.75)
    h.grad_norm.fill_(1.5)
    return h


def clone_history(h: R.ZenithHistory) -> R.ZenithHistory:
    return R.ZenithHistory(*(getattr(h, f).clone() for f in R.HISTORY_FIELDS))


def assert_history_matches(actual: R.ZenithHistory, expected: R.ZenithHistory, msg: str) -> None:
    for name in ("step", "skipped_steps", "step_applied"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), f"{msg}: {name}"
    for name in ("grad_norm", "norm_window", "window_max", "lr_scale", "grad_multiplier"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), **HISTORY_TOL,
                                   equal_nan=True, msg=lambda m, name=name: f"{msg}: {name}: {m}")


GRAD_SCALE_SHAPES = [None, (), (1,), (1, 1)]


@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("found_inf_shape", [None, (1,)], ids=["no_found_inf", "found_inf"])
@pytest.mark.parametrize("grad_scale_shape", GRAD_SCALE_SHAPES, ids=["no_scale", "scale0d", "scale1", "scale11"])
@pytest.mark.parametrize("window_size", [1, 3, 70])
def test_update_history(window_size, grad_scale_shape, found_inf_shape, clip):
    """Enough steps to wrap the window, with a non-finite norm and a GradScaler overflow among them."""
    gen = torch.Generator().manual_seed(window_size)
    kernel_history = random_history(window_size, gen, step=1)
    ref_history = clone_history(kernel_history)
    for i in range(2 * window_size + 3):
        partials = (torch.rand(int(torch.randint(0, 90, (1,), generator=gen)), generator=gen) * (1 + i % 4)).to(DEVICE)
        if i == 2:
            partials = torch.cat([partials, torch.tensor([float("inf")], device=DEVICE)])
        grad_scale = found_inf = None
        if grad_scale_shape is not None:
            grad_scale = torch.full(grad_scale_shape, 2.0 ** (i % 3 + 4), device=DEVICE)
        if found_inf_shape is not None:
            found_inf = torch.full(found_inf_shape, 1.0 if i == 4 else 0.0, device=DEVICE)
        K.update_history(partials, kernel_history.kernel_tensors(), grad_scale, found_inf, clip)
        # The reference takes GradScaler's 0-dim tensors; the kernel any 1-element shape.
        as_0dim = lambda t: None if t is None else t.reshape(())  # noqa: E731
        R.update_history(ref_history, partials, R.StepInputs(as_0dim(grad_scale), as_0dim(found_inf), clip))
        assert_history_matches(kernel_history, ref_history, f"step {i}")
        kernel_history = clone_history(ref_history)  # resynchronise: ulp differences must not accumulate
    assert int(ref_history.skipped_steps) == 2 + 1 + (found_inf_shape is not None)


@pytest.mark.parametrize("step", [-1, -5, -70])
def test_update_history_negative_step_stays_in_the_window(step):
    """A corrupt negative ``step`` writes slot ``step mod W`` (non-negative), never outside."""
    window_size = 3
    gen = torch.Generator().manual_seed(-step)
    kernel_history = random_history(window_size, gen, step=0)
    kernel_history.step.fill_(step)
    guarded = torch.full((window_size + 4,), 99.0, device=DEVICE)  # sentinels on both sides
    guarded[2:2 + window_size] = kernel_history.norm_window
    kernel_history.norm_window = guarded[2:2 + window_size]
    ref_history = clone_history(kernel_history)
    partials = torch.tensor([4.0, 5.0], device=DEVICE)
    K.update_history(partials, kernel_history.kernel_tensors(), None, None, None)
    R.update_history(ref_history, partials)
    assert_history_matches(kernel_history, ref_history, f"step {step}")
    assert kernel_history.norm_window[step % window_size] == 3.0
    assert (guarded[:2] == 99).all() and (guarded[2 + window_size:] == 99).all()


# ------------------------------------------------------------------------------ momentum update
# Two groups: (lr, momentum, dampening, weight_decay, nesterov, maximize).
GROUP_SETS = {
    "nesterov+plain": [(0.1, 0.9, 0.0, 0.01, True, False), (0.05, 0.0, 0.0, 0.0, False, True)],
    "dampening": [(0.3, 0.8, 0.25, 0.0, False, True), (0.02, 0.5, 0.0, 0.1, False, False)],
    "no_momentum": [(0.1, 0.0, 0.0, 0.01, False, False), (0.07, 0.0, 0.0, 0.0, False, True)],
}


def run_update(dtype, aligned, groups, chunk_size, *, lr_kind, step, step_applied, buffer_steps, seed=0):
    """Kernel and reference on copies of the same random state; returns both states."""
    gen = torch.Generator().manual_seed(seed)
    compute = R.compute_dtype(dtype)
    numels = NUMELS + (5, 129)
    slots = [i % len(groups) for i in range(len(numels))]
    params = random_tensors(numels, dtype, gen, aligned=aligned)
    grads = random_tensors(numels, dtype, gen, aligned=aligned, scale=2.0)
    with_buffer = [groups[s][1] != 0 for s in slots]
    buffer_pool = random_tensors(numels, dtype, gen, aligned=aligned)
    buffers = [b if w else None for b, w in zip(buffer_pool, with_buffer)]
    steps = [torch.tensor(buffer_steps[i % len(buffer_steps)], device=DEVICE) if w else None
             for i, w in enumerate(with_buffer)]
    lr_scale = torch.tensor(0.8125 - 0.1 * seed, device=DEVICE)
    grad_multiplier = torch.tensor(0.6, device=DEVICE)
    step_t = torch.tensor(step, device=DEVICE)
    applied = torch.tensor(step_applied, dtype=torch.int32, device=DEVICE)

    rows = [(lr, m, 1 - d, wd, float(n), float(mx)) for lr, m, d, wd, n, mx in groups]
    hyperparams, lr_ptrs = _table.hyperparam_table(rows, compute, DEVICE)
    user_lrs = []
    if lr_kind == "tensor":  # a user's tensor lr, read by the kernel through lr_ptrs
        user_lrs = [torch.tensor(lr * 1.5, dtype=compute, device=DEVICE) for lr, *_ in groups]
        lr_ptrs = torch.tensor([t.data_ptr() for t in user_lrs], dtype=torch.int64, device=DEVICE)
        hyperparams[:, _table.LR] = float("nan")  # must not be read
    lrs = user_lrs or [torch.tensor(lr, dtype=compute) for lr, *_ in groups]

    ref = ([p.clone() for p in params], [None if b is None else b.clone() for b in buffers],
           [None if s is None else s.clone() for s in steps])
    table, _ = build_table(params, grads, buffers, steps, slots, chunk_size)
    assert table.aligned == aligned and table.has_momentum == any(with_buffer)
    K.momentum_update(table, dtype, hyperparams, lr_ptrs, lr_scale, step_t, applied, grad_multiplier)

    hps = [R.GroupHyperparams(lr=lrs[s], momentum=groups[s][1], dampening=groups[s][2], weight_decay=groups[s][3],
                              nesterov=groups[s][4], maximize=groups[s][5]) for s in slots]
    R.momentum_update(*ref[:1], grads, *ref[1:], hps, lr_scale=lr_scale, step=step_t, step_applied=applied,
                      grad_multiplier=grad_multiplier)
    return (params, buffers, steps), ref


def assert_update_matches(kernel_state, ref_state, dtype, what=""):
    for name, actual, expected in zip(("param", "buffer", "momentum_step"), kernel_state, ref_state):
        for i, (a, e) in enumerate(zip(actual, expected)):
            if e is None:
                assert a is None
            elif name == "momentum_step":
                assert torch.equal(a, e), f"{what} {name} {i}: {a.item()} != {e.item()}"
            else:
                assert_within_ulps(a, e, ULPS[dtype], msg=f"{what} {name} {i} ({a.numel()} values)")


@pytest.mark.parametrize("lr_kind", ["table", "tensor"])
@pytest.mark.parametrize("group_set", list(GROUP_SETS))
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_momentum_update(dtype, aligned, group_set, lr_kind):
    # Buffer steps: never filled (first step), filled at step 3 (so not first at step 5), filled
    # before this history began (-1), and filled at this very step by another chunk (first).
    kernel_state, ref_state = run_update(dtype, aligned, GROUP_SETS[group_set], 256, lr_kind=lr_kind, step=5,
                                         step_applied=1, buffer_steps=[0, 3, -1, 5])
    assert_update_matches(kernel_state, ref_state, dtype)


@pytest.mark.parametrize("chunk_size", [48, 16, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ids([torch.float32, torch.bfloat16]))
def test_momentum_update_chunk_sizes(dtype, chunk_size):
    """Many chunks per tensor (the first records the step while the others see "first" too), and
    one chunk bigger than every tensor."""
    for aligned in (True, False):
        kernel_state, ref_state = run_update(dtype, aligned, GROUP_SETS["nesterov+plain"], chunk_size,
                                             lr_kind="table", step=1, step_applied=1, buffer_steps=[0], seed=1)
        assert_update_matches(kernel_state, ref_state, dtype, f"aligned={aligned}")


@pytest.mark.parametrize("dtype", DTYPES, ids=ids(DTYPES))
def test_momentum_update_skipped_step_changes_nothing(dtype):
    for aligned in (True, False):
        kernel_state, ref_state = run_update(dtype, aligned, GROUP_SETS["dampening"], 256, lr_kind="table",
                                             step=4, step_applied=0, buffer_steps=[0, 2])
        assert_update_matches(kernel_state, ref_state, dtype, f"aligned={aligned}")
        # and the reference itself left everything as it was
        again, _ = run_update(dtype, aligned, GROUP_SETS["dampening"], 256, lr_kind="table",
                              step=4, step_applied=0, buffer_steps=[0, 2])
        for group_a, group_b in zip(kernel_state, again):
            for a, b in zip(group_a, group_b):
                assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_stores_round_to_nearest_even(dtype):
    """With p = 0, lr * lr_scale = -1 and no momentum the update stores g * grad_multiplier, rounded
    once. A multiplier of 1 + eps/2 puts the products on ties (1 -> 1, even), just above ties
    (1 + eps -> 1 + 2 eps, where truncation, the interpreter's own float32 -> bfloat16 cast, gives
    1 + eps) and on carries into the exponent (2 - eps -> 2)."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    eps = 2.0 ** -mantissa
    big = 2047.0 if dtype == torch.float16 else 3.0e38
    g = torch.tensor([1.0, 1 + eps, -(1 + eps), 2 - eps, 0.1, -0.3, 3.0, big, 1 + 3 * eps]).to(DEVICE, dtype)
    grad_multiplier = torch.tensor(1 + eps / 2, device=DEVICE)
    params = [torch.zeros(g.numel(), dtype=dtype, device=DEVICE)]
    hyperparams, lr_ptrs = _table.hyperparam_table([(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0)], torch.float32, DEVICE)
    table, _ = build_table(params, [g], [None], [None], [0], 64)
    K.momentum_update(table, dtype, hyperparams, lr_ptrs, torch.ones((), device=DEVICE), torch.tensor(1, device=DEVICE),
                      torch.tensor(1, dtype=torch.int32, device=DEVICE), grad_multiplier)
    expected = (g.float() * grad_multiplier).to(dtype)  # torch rounds to nearest-even
    assert_within_ulps(params[0], expected, 0, msg="round to nearest-even")
    truncated = ((g.float() * grad_multiplier).view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    if dtype == torch.bfloat16:  # the case the explicit rounding exists for
        assert not torch.equal(truncated, expected)


def test_momentum_update_rejects_hyperparams_in_the_wrong_dtype():
    table, _ = build_table([torch.zeros(3, device=DEVICE)], [torch.zeros(3, device=DEVICE)], [None], [None], [0], 64)
    hyperparams, lr_ptrs = _table.hyperparam_table([(0.1, 0, 1, 0, 0, 0)], torch.float32, DEVICE)
    h = R.ZenithHistory.zeros(2, DEVICE)
    with pytest.raises(TypeError, match="hyperparams for torch.float64 tensors must be in the compute dtype"):
        K.momentum_update(table, torch.float64, hyperparams, lr_ptrs, h.lr_scale, h.step, h.step_applied,
                          h.grad_multiplier)


def test_launch_config_chunk_size_is_a_multiple_of_16_and_of_every_block():
    configs = [kernel_config.launch_config(torch.device("cpu")), *kernel_config.GPU_CONFIGS.values()]
    for c in configs:
        assert c.chunk_size % 16 == 0 and c.chunk_size % c.block == 0
        for dtype in DTYPES:
            assert kernel_config.block_for(c, c.chunk_size, dtype) in (c.block, c.block // 2)
    assert kernel_config.block_for(configs[0], 48, torch.float32) == 16


# ------------------------------------------------------------------------------ recompilation
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


def test_no_recompilation_when_chunk_partial_or_window_counts_change(monkeypatch):
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
    spies = {}
    for module, name in ((sq_norm_module, "_sq_norm_partials_kernel"), (momentum_module, "_momentum_update_kernel"),
                         (history_module, "_update_history_kernel")):
        spies[name] = LaunchSpy(getattr(module, name))
        monkeypatch.setattr(module, name, spies[name])

    gen = torch.Generator().manual_seed(0)
    partials_buffer = torch.zeros(64, device=DEVICE)
    for count, offset in ((1, 0), (5, 1), (16, 3), (17, 2)):  # tensors, hence chunks and partials
        params = random_tensors((20,) * count, torch.float32, gen, aligned=True)
        grads = random_tensors((20,) * count, torch.float32, gen, aligned=True)
        buffers = random_tensors((20,) * count, torch.float32, gen, aligned=True)
        steps = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in range(count)]
        table, _ = build_table(params, grads, buffers, steps, [0] * count, 64)
        out = partials_buffer[offset:offset + table.num_chunks]
        K.sq_norm_partials(table, torch.float32, out)
        for window_size in (1, 3, 16):
            history = R.ZenithHistory.zeros(window_size, DEVICE)
            K.update_history(out, history.kernel_tensors(), None, None, None)
        hyperparams, lr_ptrs = _table.hyperparam_table([(0.1, 0.9, 1.0, 0.0, 0.0, 0.0)], torch.float32, DEVICE)
        K.momentum_update(table, torch.float32, hyperparams, lr_ptrs, history.lr_scale, history.step,
                          history.step_applied, history.grad_multiplier)

    for name, spy in spies.items():
        assert len(spy.launches) >= 4, name
        keys = gpu_cache_keys(spy.kernel, spy.launches)
        assert len(keys) == 1, f"{name}: {len(keys)} compilations for {len(spy.launches)} launches"
