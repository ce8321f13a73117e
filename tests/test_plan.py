"""The step plan: reused while it holds, rebuilt (correctly) when anything it was built from changes,
at most three launches per bucket, every Triton launch under its bucket's device guard."""
from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_history_equal, random_grads, set_grads, skip_if_unavailable

from zenith_fused import ZenithFused
from zenith_fused import _plan, optimizer as optimizer_module
from zenith_fused._plan import BucketPlan, _history_device
from zenith_fused.layout import GRAD

PLAN_BACKENDS = ["reference", "cpu", "triton"]
SHAPES = [(33,), (4, 5), (1,), (300,)]


@pytest.fixture
def plan_builds(monkeypatch):
    """How many step plans the optimizers have built so far."""
    builds = []

    class CountingPlan(_plan.StepPlan):
        def __init__(self, groups, *args, **kwargs):
            builds.append(groups)
            super().__init__(groups, *args, **kwargs)

    monkeypatch.setattr(optimizer_module, "StepPlan", CountingPlan)
    return builds


def _builds_of(builds, opt) -> int:
    """How many plans were built for ``opt`` (a plan is built from its param_groups list)."""
    return sum(groups is opt.param_groups for groups in builds)


def _twins(backend, groups, **kwargs):
    gen = torch.Generator().manual_seed(3)
    initial = [torch.randn(s, generator=gen) for s in SHAPES]
    twins = []
    for name in (backend, "reference"):
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        param_groups = [{**{k: v for k, v in g.items() if k != "index"}, "params": [params[i] for i in g["index"]]}
                        for g in groups]
        twins.append((ZenithFused(param_groups, backend=name, window_size=3, **kwargs), params))
    return twins


def _assert_twins_equal(opt, params, ref, ref_params):
    assert_history_equal(opt, ref)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=lambda m: f"param {i}: {m}")
        if "momentum_buffer" in ref.state.get(q, {}):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                       atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_plan_is_reused_while_nothing_changes(backend, plan_builds, small_chunks):
    skip_if_unavailable(backend)
    (opt, params), _ = _twins(backend, [{"index": [0, 1, 2, 3]}])
    gen = torch.Generator().manual_seed(0)
    set_grads(params, random_grads(SHAPES, torch.float32, "cpu", gen, 0))
    for step in range(4):
        with torch.no_grad():  # new values in the same gradient tensors, as backward() accumulates
            for p, g in zip(params, random_grads(SHAPES, torch.float32, "cpu", gen, step)):
                p.grad.copy_(g)
        opt.step()
    assert len(plan_builds) == 1
    opt.zero_grad(set_to_none=False)  # zeroes in place: still the same tensors
    opt.step()
    assert len(plan_builds) == 1


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_plan_follows_every_change_and_stays_exact(backend, plan_builds, small_chunks):
    """Each event below must rebuild the plan, or (for gradients that are merely new tensors)
    re-point its tables at them, and the twins must stay equal after it."""
    skip_if_unavailable(backend)
    groups = [{"index": [0, 1]}, {"index": [2], "momentum": 0.5, "dampening": 0.2}]
    (opt, params), (ref, ref_params) = _twins(backend, groups)
    gen = torch.Generator().manual_seed(1)
    step = 0

    def step_both(grads, expect: str):
        nonlocal step
        before = _builds_of(plan_builds, opt)
        for o, ps in ((opt, params), (ref, ref_params)):
            set_grads(ps, grads)
            o.step()
        step += 1
        if expect == "rebuild":
            assert _builds_of(plan_builds, opt) == before + 1, "the plan should have been rebuilt"
        else:  # new gradient tensors of the same sizes: the same plan, pointing at them
            assert _builds_of(plan_builds, opt) == before, "the plan should have been kept"
            plan = opt._plan
            assert [ref() for ref in plan.grad_refs] == [p.grad for p in plan.all_params]
            for bucket in plan.buckets:
                assert bucket.grads is None  # the plan keeps no gradient alive between steps
                if bucket.table is not None:
                    assert bucket.table.tensors[:, GRAD].tolist() == [p.grad.data_ptr() for p in bucket.owners]
        _assert_twins_equal(opt, params, ref, ref_params)

    def grads_for(present):
        fresh = random_grads(SHAPES, torch.float32, "cpu", gen, step)
        return [g if i in present else None for i, g in enumerate(fresh)]

    step_both(grads_for({0, 1, 2}), "rebuild")  # first step
    step_both(grads_for({0, 2}), "rebuild")  # a gradient disappears (set_to_none)
    step_both(grads_for({0, 1, 2}), "rebuild")  # and reappears
    # Reallocated gradients (zero_grad(set_to_none=True) then backward): new tensors, same sizes.
    step_both(grads_for({0, 1, 2}), "re-point")
    step_both(grads_for({0, 1, 2}), "re-point")
    # A parameter's storage changes under it (p.data = ...), in both twins.
    for ps in (params, ref_params):
        ps[1].data = ps[1].data.clone()
    step_both(grads_for({0, 1, 2}), "rebuild")
    # A new parameter group.
    for o, ps in ((opt, params), (ref, ref_params)):
        o.add_param_group({"params": [ps[3]], "lr": 0.03, "momentum": 0.0})
    step_both(grads_for({0, 1, 2, 3}), "rebuild")
    step_both(grads_for({0, 1, 2, 3}), "re-point")
    # A new gradient whose strides the fused kernels cannot pair with the parameter's: rebuilt
    # (under an explicit fused backend that step raises instead; see test_contracts).
    if backend == "reference":
        grads = grads_for({0, 1, 2, 3})
        grads[1] = grads[1].t().contiguous().t()
        step_both(grads, "re-point")


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_scheduler_lr_updates_the_table_without_a_rebuild(backend, plan_builds, monkeypatch, small_chunks):
    skip_if_unavailable(backend)
    (opt, params), (ref, ref_params) = _twins(backend, [{"index": [0, 1]}, {"index": [2, 3], "lr": 0.05}])
    writes = []
    original = _plan.StepPlan._write_hyperparams
    monkeypatch.setattr(_plan.StepPlan, "_write_hyperparams",
                        lambda self, bucket, **kw: (writes.append(kw), original(self, bucket, **kw))[1])
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in (opt, ref)]
    gen = torch.Generator().manual_seed(2)
    grads = random_grads(SHAPES, torch.float32, "cpu", gen, 0)
    set_grads(params, grads)
    set_grads(ref_params, grads)
    for step in range(4):
        fresh = random_grads(SHAPES, torch.float32, "cpu", gen, step)
        with torch.no_grad():
            for ps in (params, ref_params):
                for p, g in zip(ps, fresh):
                    p.grad.copy_(g)
        opt.step()
        ref.step()
        for s in schedulers:
            s.step()
        _assert_twins_equal(opt, params, ref, ref_params)
    assert _builds_of(plan_builds, opt) == 1
    if backend != "reference":
        # One table write per bucket per lr change (3 changes reach a step), none on a rebuild.
        assert [w for w in writes if not w.get("rebuild")] == [{}] * 3


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_tensor_lr_costs_no_host_work(backend, plan_builds, monkeypatch):
    skip_if_unavailable(backend)
    lr = torch.tensor(0.1)
    (opt, params), (ref, ref_params) = _twins(backend, [{"index": [0, 1, 2, 3]}], lr=lr)
    gen = torch.Generator().manual_seed(4)
    grads = random_grads(SHAPES, torch.float32, "cpu", gen, 0)
    set_grads(params, grads)
    set_grads(ref_params, grads)
    opt.step()
    ref.step()
    monkeypatch.setattr(_plan.StepPlan, "_write_hyperparams", lambda *a, **k: pytest.fail("table written"))
    for value in (0.05, 0.0, 0.2):
        lr.fill_(value)  # what torch's schedulers do to a tensor lr
        opt.step()
        ref.step()
        _assert_twins_equal(opt, params, ref, ref_params)
    assert _builds_of(plan_builds, opt) == 1
    if backend != "reference":
        assert opt._plan.buckets[0].lr_copies == []


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_lr_switching_between_float_and_tensor_is_never_stale(backend):
    """Two groups, one float lr and one tensor lr, then each switched to the other kind and to 0."""
    skip_if_unavailable(backend)
    groups = [{"index": [0, 1], "lr": 0.1}, {"index": [2, 3], "lr": torch.tensor(0.2)}]
    (opt, params), (ref, ref_params) = _twins(backend, groups)
    gen = torch.Generator().manual_seed(5)
    changes = [
        lambda g: None,
        lambda g: g[0].__setitem__("lr", torch.tensor(0.3)),
        lambda g: g[1].__setitem__("lr", 0.0),
        lambda g: g[0].__setitem__("lr", 0.0),
        lambda g: g[1].__setitem__("lr", torch.tensor(0.4, dtype=torch.float64)),
    ]
    for step, change in enumerate(changes):
        change(opt.param_groups)
        change(ref.param_groups)
        grads = random_grads(SHAPES, torch.float32, "cpu", gen, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        before = [p.detach().clone() for p in params]
        opt.step()
        ref.step()
        _assert_twins_equal(opt, params, ref, ref_params)
    # lr 0 for group 0 at the last steps: its parameters stood still.
    assert all(torch.equal(p, b) for p, b in zip(params[:2], before[:2]))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_at_most_three_launches_per_bucket(backend, monkeypatch):
    """Hooks the launchers (Triton) or the compiled operators (the "cpu" engine; the "cuda" engine
    is the same class over the same three operators): a step of two buckets of many tensors
    makes 2 + 1 + 2 calls, whatever the number of tensors."""
    skip_if_unavailable(backend)
    calls = []
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(40)]
    params += [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(30)]
    opt = ZenithFused([{"params": params[:50]}, {"params": params[50:], "lr": 0.01}], backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    if backend == "triton":
        import zenith_fused.triton_kernels as kernels

        for name in ("sq_norm_partials", "update_history", "momentum_update"):
            original = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, _n=name, _f=original, **k: (calls.append(_n), _f(*a, **k)))
    else:
        engine = opt._backends.engine("cpu")
        for name in ("_sq_norm_partials", "_update_history", "_momentum_update"):
            original = getattr(engine, name)
            monkeypatch.setattr(engine, name, lambda *a, _n=name, _f=original, **k: (calls.append(_n), _f(*a, **k)))
    opt.step()
    buckets = 2
    assert len(calls) <= 3 * buckets
    assert sum("sq_norm" in c for c in calls) == buckets
    assert sum("momentum" in c for c in calls) == buckets
    assert sum("history" in c for c in calls) == 1


def test_every_triton_launch_runs_under_its_bucket_device_guard(monkeypatch):
    """Triton launches on the current device: the engine must enter the bucket's device first.
    Fails if the guard around any launch is removed."""
    skip_if_unavailable("triton")
    import zenith_fused.triton_kernels as kernels
    from zenith_fused import _triton_engine

    current = []

    @contextlib.contextmanager
    def recording_guard(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    seen = []
    monkeypatch.setattr(_triton_engine, "device_guard", recording_guard)
    for name in ("sq_norm_partials", "update_history", "momentum_update"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _f=original, **k: (seen.append(current[-1] if current else None), _f(*a, **k)))
    params = [torch.nn.Parameter(torch.randn(9)), torch.nn.Parameter(torch.randn(4))]
    opt = ZenithFused(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert seen == [torch.device("cpu")] * 3


def _bucket(device: str) -> BucketPlan:
    return BucketPlan(torch.device(device), torch.float32, "reference", None)


def test_history_lives_with_the_gradients():
    """Chosen at each plan build: a CUDA device when any bucket is on one (no host reads), else
    where the history is when that holds gradients, else the first bucket's device."""
    cpu, cuda0, cuda1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert _history_device([_bucket("cuda:0")], cpu) == cuda0  # optimizer built before model.cuda()
    assert _history_device([_bucket("cpu"), _bucket("cuda:1")], cpu) == cuda1
    assert _history_device([_bucket("cuda:0"), _bucket("cuda:1")], cuda1) == cuda1
    assert _history_device([_bucket("cpu")], cuda0) == cpu  # model moved back to the CPU
    assert _history_device([], cuda0) == cuda0


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_dtype_change_after_the_first_step_converts_the_state(backend):
    """model.double() after a step: the momentum buffer follows its parameter (as in SGD), and the
    optimizer keeps matching the reference."""
    skip_if_unavailable(backend)
    (opt, params), (ref, ref_params) = _twins(backend, [{"index": [0, 1, 2, 3]}])
    gen = torch.Generator().manual_seed(6)
    for step in range(4):
        if step == 2:
            for ps in (params, ref_params):
                for p in ps:
                    p.data = p.data.double()
        dtype = params[0].dtype
        grads = random_grads(SHAPES, dtype, "cpu", gen, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        _assert_twins_equal(opt, params, ref, ref_params)
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float64


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_a_replaced_gradient_that_cannot_be_taken_in_place_rebuilds_and_raises(backend):
    """A new gradient that is sparse is not swapped into the tables: the rebuild raises, before
    anything changed."""
    skip_if_unavailable(backend)
    from helpers import assert_bit_identical, snapshot

    ps = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(3))]
    opt = ZenithFused(ps, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    ps[0].grad = torch.randn(6)
    ps[1].grad = torch.randn(3).to_sparse()
    before = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, ps))


def test_cuda_engine_makes_three_calls_per_bucket(monkeypatch):
    """The "cuda" engine (no GPU here) driven by a real plan, its three operators replaced by
    counters: one norm call and one update call per bucket, one history call per step, whatever
    the number of tensors. Each operator is one kernel launch (csrc/cuda/bindings_cuda.cpp)."""
    from zenith_fused._compiled_engines import CudaEngine

    engine = object.__new__(CudaEngine)  # its constructor would ask for the CUDA extension
    calls = []
    for name in ("_sq_norm_partials", "_update_history", "_momentum_update"):
        setattr(engine, name, lambda *a, _n=name: calls.append(_n))
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(40)]
    params += [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(30)]
    opt = ZenithFused(params, backend="reference")
    for key in list(opt._backends.by_bucket):
        opt._backends.by_bucket[key] = "cuda"
    opt._backends.engines["cuda"] = engine
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert [b.backend for b in opt._plan.buckets] == ["cuda", "cuda"]
    assert sorted(calls) == sorted(["_sq_norm_partials"] * 2 + ["_update_history"] + ["_momentum_update"] * 2)
