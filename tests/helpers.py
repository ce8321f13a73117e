"""Shared test harness: build twin optimizers, feed identical random gradients, compare state."""
from __future__ import annotations

import io

import pytest
import torch

from zenith_fused import ZenithFused
from zenith_fused._engines import resolve_backend

# (atol, rtol) for parameters and momentum buffers of a fused backend against the reference.
#  float32: identical float32 formulas; only the order of the norm's sums differs (~1e-7 relative
#    per step, through lr_scale), which stays far below 1e-5 over a few hundred steps.
#  float16 / bfloat16: one storage ulp, plus an absolute 2**-20. Each store rounds to the storage
#    type once, to nearest-even on every backend (the interpreter included); a last-bit difference
#    in the float32 value (from the norm's summation order, through lr_scale) can flip that
#    rounding by one ulp, and the tests that use these resynchronise the twins after every step so
#    flips cannot accumulate. In (atol, rtol) form one ulp is rtol = eps (one ulp of the value's
#    binade). The atol is for results that cancel to near zero (p close to lr * scale * d, both of
#    order 1 in these tests): there one float32 ulp of lr_scale (2**-24 relative) moves the exact
#    result by about 2**-24, many ulps of a tiny value; 2**-20 bounds that with room, and stays
#    far below one ulp (2**-8 to 2**-11) of the order-1 values everything else is. Where the
#    history is the same on both sides the kernel tests compare in ulps exactly
#    (``assert_within_ulps``): no allowance for cancellation is needed there.
TOLERANCES = {
    # float64: computed in float64; the only difference is lr_scale's last float32 bit (2**-24
    #   relative, times lr * |d| of order 0.1), so 1e-7 holds with room after a resync.
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2**-20, 2**-10),
    torch.bfloat16: (2**-20, 2**-7),
}
# The history is float32 whatever the parameter dtype; the norm is the same sum in another order
# (per chunk, then across chunks), a few float32 ulps apart for large half-precision gradients.
HISTORY_TOL = dict(atol=1e-6, rtol=1e-5)

FUSED_BACKENDS = ("triton", "cpu", "cuda")


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_unavailable(backend: str, device: str) -> str | None:
    try:
        resolve_backend(backend, torch.device(device))
    except RuntimeError as exc:
        return str(exc)
    return None


def skip_if_unavailable(backend: str, device: str = "cpu") -> None:
    """Skip the calling test, with the backend's own reason, where it cannot run here."""
    reason = backend_unavailable(backend, device)
    if reason:
        pytest.skip(reason)


def fused_cases(*, slow_on_interpreter: bool = False) -> list:
    """(backend, device) pairs for every fused backend, skipped with the reason when it can't run;
    with ``slow_on_interpreter`` the Triton-on-CPU case (the interpreter) carries the ``slow``
    marker (``pytest -m "not slow"`` leaves it out; CI runs everything)."""
    cases = []
    for device in devices():
        for backend in FUSED_BACKENDS:
            if backend in ("cpu", "cuda") and backend != device:
                continue
            reason = backend_unavailable(backend, device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            if slow_on_interpreter and backend == "triton" and device == "cpu":
                marks.append(pytest.mark.slow)
            cases.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return cases


def make_params(shapes, dtype, device, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def twin_optimizers(shapes, groups, *, dtype, device, backend, window_size, seed=0, **defaults):
    """The same parameters and groups in a ``backend`` optimizer and in a reference one.

    ``groups`` is a list of dicts with ``"index"`` (which shapes belong to the group) and any
    hyper-parameters of that group.
    """
    initial = make_params(shapes, dtype, device, seed)
    twins = []
    for name in (backend, "reference"):
        params = [p.clone().requires_grad_() for p in initial]
        param_groups = [
            {**{k: v for k, v in g.items() if k != "index"}, "params": [params[i] for i in g["index"]]}
            for g in groups
        ]
        opt = ZenithFused(param_groups, backend=name, window_size=window_size, **defaults)
        twins.append((opt, params))
    return twins


def random_grads(shapes, dtype, device, gen, step: int) -> list[torch.Tensor]:
    # The norm varies with the step so that the window, the maximum and the scale all move.
    level = 1.0 + 0.9 * torch.sin(torch.tensor(step * 0.37)).item()
    return [(level * torch.randn(s, generator=gen)).to(device=device, dtype=dtype) for s in shapes]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def assert_history_equal(opt, ref, *, skipped: bool = True) -> None:
    a, b = opt.history, ref.history
    assert a.step.item() == b.step.item()
    if skipped:
        assert a.skipped_steps.item() == b.skipped_steps.item()
    for name in ("grad_norm", "lr_scale", "window_max", "norm_window"):
        # A skipped step's grad_norm is the non-finite norm itself: nan meets nan.
        torch.testing.assert_close(getattr(a, name).cpu(), getattr(b, name).cpu(), **HISTORY_TOL, equal_nan=True,
                                   msg=name)


def assert_params_close(params, ref_params, opt, ref, dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p.detach().float().cpu(), q.detach().float().cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m, i=i: f"param {i} {tuple(p.shape)}: {m}")
        sa, sb = opt.state.get(p, {}), ref.state.get(q, {})
        assert sa.keys() == sb.keys(), f"param {i}: state keys {sa.keys()} != {sb.keys()}"
        if "momentum_buffer" in sa:
            torch.testing.assert_close(sa["momentum_buffer"].float().cpu(), sb["momentum_buffer"].float().cpu(),
                                       atol=atol, rtol=rtol, msg=lambda m, i=i: f"buffer {i}: {m}")
            assert sa["momentum_step"].item() == sb["momentum_step"].item()


def copy_params_and_buffers(src_params, src_opt, dst_params, dst_opt) -> None:
    """Make the twin equal to the reference again, in place (the fused tables stay valid)."""
    with torch.no_grad():
        for p, q in zip(src_params, dst_params):
            q.copy_(p)
            if "momentum_buffer" in src_opt.state.get(p, {}):
                dst_opt.state[q]["momentum_buffer"].copy_(src_opt.state[p]["momentum_buffer"])


def roundtrip(state_dict):
    """Save and load as a user would, ending on the CPU."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu")


def snapshot(opt, params) -> dict:
    """Every piece of state, cloned, for bit-exact comparisons.

    A momentum buffer created but never filled (zeros, ``momentum_step == 0``) is the same state
    as no buffer: the optimizer may create one on a step that then turns out to be skipped.
    """
    out = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        state = opt.state.get(p, {})
        if "momentum_step" in state and state["momentum_step"].item() == 0:
            assert not state["momentum_buffer"].any()
            continue
        for k, v in state.items():
            out[f"state{i}.{k}"] = v.clone()
    # grad_norm and skipped_steps are the two values a skipped step is meant to change.
    for name in ("step", "norm_window", "window_max", "lr_scale"):
        out[f"history.{name}"] = getattr(opt.history, name).clone()
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


_ORDERED_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                torch.float64: torch.int64}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits as int64 integers that are consecutive for consecutive floats (-0 == +0)."""
    bits = t.contiguous().view(_ORDERED_INT[t.dtype]).to(torch.int64)
    sign_bit = 1 << (8 * t.element_size() - 1)
    return torch.where(bits < 0, -(bits + sign_bit), bits)


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable values of their (common) dtype lie between them."""
    return (_ordered(actual) - _ordered(expected)).abs()


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1, msg: str = "") -> None:
    """``actual`` and ``expected`` (same dtype and shape) differ by at most ``ulps`` units in the last
    place per element; NaN must meet NaN. The message says how many elements differ, and where."""
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    distance = torch.where(nan_a | nan_e, 0, ulp_distance(actual, expected))
    bad = (distance > ulps) | (nan_a != nan_e)
    if bad.any():
        where = bad.nonzero().reshape(-1)[:5].tolist()
        shown = ", ".join(f"[{i}] {actual[i].item()!r} vs {expected[i].item()!r} ({distance[i].item()} ulps)"
                          for i in where)
        raise AssertionError(f"{msg}: {int(bad.sum())} of {actual.numel()} {actual.dtype} values differ by more "
                             f"than {ulps} ulp(s) (max {int(distance.max())}): {shown}")


# ------------------------------------------------------------------ op-level harness
# tests/test_engines.py and tests/test_cpu_kernels.py call the engines the way the step plan
# does (zenith_fused/_plan.py): a BucketPlan filled with the tensors, its tables built by
# zenith_fused._table for a table-reading engine, and the three engine calls.
def engine_bucket(engine, device, dtype, params, grads, buffers, steps, slots, group_hyperparams):
    """A ``BucketPlan`` of ``engine`` holding these tensors, as ``StepPlan._prepare`` fills one:
    for a fused engine the tensor table (chunks of ``engine.chunk_size(device)``), the
    hyper-parameter table and ``lr_ptrs`` (a tensor lr of the compute dtype on ``device`` is read
    through its address; another one is copied into its cell, see :func:`engine_momentum_update`),
    and a NaN-filled ``partials`` of one slot per chunk (per tensor for the reference). The bucket
    holds every tensor the tables point at."""
    from zenith_fused import _table
    from zenith_fused._plan import BucketPlan, hyperparam_row
    from zenith_fused.layout import LR
    from zenith_fused.reference import compute_dtype

    device = torch.device(device)
    bucket = BucketPlan(device, dtype, engine.name, engine)
    bucket.params, bucket.grads = list(params), list(grads)
    bucket.momentum_buffers, bucket.momentum_steps = list(buffers), list(steps)
    bucket.hyperparam_slots = list(slots)
    bucket.group_indices = list(range(len(group_hyperparams)))
    bucket.group_hyperparams = list(group_hyperparams)
    if engine.uses_table:
        bucket.table = _table.build_tensor_table(
            bucket.params, bucket.grads, bucket.momentum_buffers, bucket.momentum_steps, bucket.hyperparam_slots,
            chunk_size=engine.chunk_size(device),
            placeholder_step=torch.zeros((), dtype=torch.int64, device=device),
        )
        compute = compute_dtype(dtype)
        readable = {
            slot: hp.lr.data_ptr() for slot, hp in enumerate(group_hyperparams)
            if isinstance(hp.lr, torch.Tensor) and hp.lr.dtype == compute and hp.lr.device == device
        }
        rows = [hyperparam_row(hp) for hp in group_hyperparams]
        bucket.hyperparams, bucket.lr_ptrs = _table.hyperparam_table(rows, compute, device, readable)
        bucket.lr_copies = [
            (bucket.hyperparams[slot, LR], hp.lr) for slot, hp in enumerate(group_hyperparams)
            if isinstance(hp.lr, torch.Tensor) and slot not in readable
        ]
    bucket.partials = torch.full((bucket.num_partials,), float("nan"), device=device)
    return bucket


def step_view(device, *, lr_scale=0.7312345, step=5, applied=1, grad_multiplier=1.0):
    """The history values an update reads (``StepView``), as 0-dim tensors on ``device``."""
    from zenith_fused._plan import StepView

    return StepView(
        lr_scale=torch.tensor(lr_scale, dtype=torch.float32, device=device),
        step=torch.tensor(step, dtype=torch.int64, device=device),
        step_applied=torch.tensor(applied, dtype=torch.int32, device=device),
        grad_multiplier=torch.tensor(grad_multiplier, dtype=torch.float32, device=device),
    )


def engine_momentum_update(bucket, view) -> None:
    """The update as ``_plan.run_step`` makes it: tensor lrs the kernels cannot read in place
    copied into their cells, then the engine's call."""
    for cell, lr in bucket.lr_copies:
        cell.copy_(lr.reshape(()))
    bucket.engine.momentum_update(bucket, view)


def special_values(dtype, n, gen, *, denormals: bool = True) -> torch.Tensor:
    """n values of ``dtype``: random normal ones, with NaNs of either sign and of several payloads,
    infinities, zeros of both signs, denormals (unless told not to) and the largest finite values
    at random places in the first half, and the second half (one vector block and more) without
    any of them."""
    info = torch.finfo(dtype)
    bits_dtype = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    nans = torch.tensor([0x7FC0, 0x7F81, 0xFFC1, 0x7FFF] if dtype == torch.bfloat16 else
                        [0x7E00, 0x7C01, 0xFE01, 0x7FFF] if dtype == torch.float16 else
                        [0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FFFFFFF], dtype=torch.int64)
    nans = torch.where(nans >= 2 ** (info.bits - 1), nans - 2**info.bits, nans).to(bits_dtype).view(dtype)
    tiny = info.smallest_normal
    others = [float("inf"), -float("inf"), 0.0, -0.0, info.max, -info.max]
    if denormals:
        others += [tiny / 2, -tiny / 4, tiny / 64, tiny * 0.999]
    specials = torch.cat([nans, torch.tensor(others, dtype=dtype)])
    values = torch.randn(n, generator=gen).to(dtype)
    where = torch.randint(0, n // 2, (3 * len(specials),), generator=gen)
    values[where] = specials.repeat(3)
    return values
