"""ZenithFused under DDP and FSDP2: 2 processes on gloo (4 for HSDP), compared with one process.

Each spawned test runs several checks in one pair of workers (starting them costs seconds); a
failing assertion in a worker fails the test with the worker's traceback, and a worker that hangs
is killed after ``SPAWN_TIMEOUT_S``. The DDP/FSDP2 code is the blocks of docs/distributed.md,
executed here, so the docs show what is tested.

Tolerances: float32 throughout. The distributed runs differ from the single process only in the
order of float32 sums (the gradient averaged over two half-batches instead of one mean over the
batch, the norm summed shard by shard); that is ~1e-7 relative per step, and 1e-5 leaves room for
10 steps of momentum without hiding a wrong norm (a norm counted twice is off by a factor 1.41).
"""
from __future__ import annotations

import datetime
import math
import os
import re
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from helpers import backend_unavailable
from zenith_fused import ZenithFused, get_optimizer_state_dict, set_optimizer_state_dict

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD_SIZE = 2
SPAWN_TIMEOUT_S = 150  # a hung collective fails after COLLECTIVE_TIMEOUT_S first
COLLECTIVE_TIMEOUT_S = 60
STEPS = 10
WINDOW = 3  # wraps three times in STEPS
TOL = dict(atol=1e-5, rtol=1e-5)
README = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def backends() -> list:
    """The fused CPU kernels, the reference, and Triton where it runs on CPU tensors (its
    interpreter, which the workers inherit from conftest's TRITON_INTERPRET=1)."""
    return [
        pytest.param(b, marks=[pytest.mark.skip(reason=r)] if (r := backend_unavailable(b, "cpu")) else [])
        for b in ("cpu", "reference", "triton")
    ]


# ---------------------------------------------------------------------- the README's code
def readme_code() -> dict:
    """docs/distributed.md's code blocks, executed (``__main__`` guard not taken)."""
    text = README.read_text()
    section = text[text.index("<!-- distributed:start -->"):text.index("<!-- distributed:end -->")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace = {"__name__": "readme_distributed"}
    exec(compile("\n".join(blocks), f"{README}:distributed", "exec"), namespace)
    return namespace


def test_readme_blocks_define_what_the_workers_run():
    code = readme_code()
    for name in ("with_ddp", "with_fsdp2", "train", "save_checkpoint", "load_checkpoint"):
        assert callable(code[name]), name


# ---------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(check: str, tmp_path: Path, *args, world_size: int = WORLD_SIZE) -> None:
    """Run ``CHECKS[check](rank, tmp_path, *args)`` on spawned ranks; fail with the workers'
    tracebacks if one raises, dies or does not finish within ``SPAWN_TIMEOUT_S``."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _worker, args=(check, _free_port(), world_size, str(tmp_path), args), nprocs=world_size,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not finished within {SPAWN_TIMEOUT_S} s")
    except Exception as exc:  # a worker exited with an error, or the time is up
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
        tracebacks = "".join(
            f"\n--- rank {rank}:\n{path.read_text()}"
            for rank in range(world_size) if (path := tmp_path / f"rank{rank}-traceback.txt").exists()
        )
        pytest.fail(f"distributed check {check!r} failed: {exc}{tracebacks}", pytrace=False)


def _worker(rank: int, check: str, port: int, world_size: int, tmp_path: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if any(name == "lo" for _, name in socket.if_nameindex()):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs on loopback too
    torch.set_num_threads(1)  # the ranks share two cores
    status = 0
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        )
        CHECKS[check](rank, Path(tmp_path), *args)
        dist.destroy_process_group()
    except BaseException:
        (Path(tmp_path) / f"rank{rank}-traceback.txt").write_text(traceback.format_exc())
        status = 1
    # Skip the interpreter's teardown: with torch 2.13 on gloo it hangs or aborts ("terminate
    # called without an active exception") in about one run in five once torch._dynamo is
    # imported, with torch.optim.SGD as much as with ZenithFused, after all the work is done.
    os._exit(status)


# ---------------------------------------------------------------------- shared pieces
def make_model(seed: int = 0) -> torch.nn.Module:
    # Odd widths: FSDP2 gives the ranks uneven shards, and the last layer's bias (1 row) leaves
    # rank 1 an empty shard.
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 15), torch.nn.Tanh(), torch.nn.Linear(15, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def global_batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(steps)]


def share(batches, rank: int):
    """This rank's part of each global batch (equal parts: the mean of their means is the mean)."""
    n = batches[0][0].shape[0] // dist.get_world_size()
    return [(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) for x, y in batches]


class StepRecorder:
    """``(grad_norm, lr_scale)`` after every ``step()`` of any optimizer, through torch's global hook."""

    def __enter__(self):
        self.norms, self.scales = [], []

        def record(opt, args, kwargs):
            self.norms.append(opt.grad_norm.clone())
            self.scales.append(opt.lr_scale.clone())

        self._handle = register_optimizer_step_post_hook(record)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def single_process_run(code: dict, backend: str, batches) -> tuple[StepRecorder, torch.nn.Module]:
    """The same training on the whole global batch in this process, with no communication."""
    model = make_model()
    opt = ZenithFused(model.parameters(), lr=0.1, window_size=WINDOW, backend=backend)
    with StepRecorder() as record:
        code["train"](model, opt, batches, torch.nn.functional.mse_loss)
    return record, model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def assert_same_on_every_rank(t: torch.Tensor, what: str) -> None:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    for g in gathered[1:]:
        torch.testing.assert_close(g, gathered[0], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what} differs across ranks {gathered}: {m}")


def assert_history_same_on_every_rank(opt: ZenithFused) -> None:
    h = opt.history
    for name in ("step", "norm_window", "window_max", "skipped_steps", "grad_norm", "lr_scale"):
        assert_same_on_every_rank(getattr(h, name).reshape(-1), f"history.{name}")


def assert_matches_single_process(record, model, expected_record, expected_model, what: str) -> None:
    assert len(record.norms) == len(expected_record.norms) == STEPS
    torch.testing.assert_close(torch.stack(record.norms), torch.stack(expected_record.norms), **TOL,
                               msg=lambda m: f"{what} grad_norm per step: {m}")
    torch.testing.assert_close(torch.stack(record.scales), torch.stack(expected_record.scales), **TOL,
                               msg=lambda m: f"{what} lr_scale per step: {m}")
    assert min(s.item() for s in expected_record.scales) < 0.95  # the scale did move
    for (name, p), q in zip(model.named_parameters(), expected_model.parameters()):
        torch.testing.assert_close(full(p.detach()), q.detach(), **TOL, msg=lambda m: f"{what} {name}: {m}")


def snapshot(model: torch.nn.Module, opt: ZenithFused) -> dict[str, torch.Tensor]:
    """This rank's parameters, momentum state and history, cloned."""
    out = {f"param.{n}": local(p.detach()).clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            out[f"state.{n}.{k}"] = local(v).clone()
    for name in ("step", "norm_window", "window_max", "skipped_steps", "lr_scale"):
        out[f"history.{name}"] = getattr(opt.history, name).clone()
    return out


def assert_bit_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def non_finite_step_skips_everywhere(rank: int, model, opt, x, y, *, poison_grad: bool) -> None:
    """One step where only rank 1 has a non-finite gradient: every rank must skip it.

    ``poison_grad``: write inf into rank 1's gradient after backward() (FSDP2: the local shard;
    the other rank's shard is finite, so only the reduced norm can tell it). Otherwise rank 1's
    input holds a nan, and DDP's all-reduce in backward() spreads it.
    """
    from test_api import _NoHostReads

    before = snapshot(model, opt)
    skipped = opt.skipped_steps.item()
    opt.zero_grad()
    if not poison_grad and rank == 1:
        x = x.clone()
        x[0, 0] = float("nan")
    torch.nn.functional.mse_loss(model(x), y).backward()
    if poison_grad and rank == 1:
        grad = next(local(p.grad) for p in model.parameters() if local(p.grad).numel() > 0)
        grad.view(-1)[0] = float("inf")
    with _NoHostReads():  # the reduction reads nothing on the host either
        opt.step()
    assert opt.skipped_steps.item() == skipped + 1
    assert not math.isfinite(opt.grad_norm.item())
    after = snapshot(model, opt)
    del before["history.skipped_steps"], after["history.skipped_steps"]  # the one thing that changes
    assert_bit_identical(before, after, "a skipped step changed state")
    assert_history_same_on_every_rank(opt)


# ---------------------------------------------------------------------- DDP, FSDP2, DCP
def check_ddp_fsdp2_and_checkpoint(rank: int, tmp_path: Path, backend: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    code = readme_code()
    batches = global_batches(STEPS + 5)
    mine = share(batches, rank)
    expected_record, expected_model = single_process_run(code, backend, batches[:STEPS])
    loss_fn = torch.nn.functional.mse_loss
    args = dict(lr=0.1, window_size=WINDOW, backend=backend)

    # DDP: every rank holds the averaged gradient; nothing is reduced by the optimizer.
    model, opt = code["with_ddp"](make_model(), **args)
    with StepRecorder() as record:
        code["train"](model, opt, mine[:STEPS], loss_fn)
    assert_matches_single_process(record, model.module, expected_record, expected_model, "DDP")
    assert_history_same_on_every_rank(opt)
    non_finite_step_skips_everywhere(rank, model, opt, *mine[STEPS], poison_grad=False)

    # FSDP2: DTensor parameters, the kernels on local shards, the norm summed across ranks.
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model, opt = code["with_fsdp2"](make_model(), mesh=mesh, **args)
    with StepRecorder() as record:
        code["train"](model, opt, mine[:STEPS], loss_fn)
    assert_matches_single_process(record, model, expected_record, expected_model, "FSDP2")
    assert_history_same_on_every_rank(opt)
    for name, p in model.named_parameters():
        state = opt.state[p]
        buf = state["momentum_buffer"]
        assert isinstance(buf, DTensor) and buf.placements == p.placements, name
        assert buf.to_local().shape == p.to_local().shape, name
        assert type(state["momentum_step"]) is torch.Tensor and state["momentum_step"].dtype == torch.int64
    non_finite_step_skips_everywhere(rank, model, opt, *mine[STEPS], poison_grad=True)

    # DCP: save (the skipped step included), keep training; a fresh model and optimizer loaded
    # from the checkpoint must take the same steps bit for bit.
    code["save_checkpoint"](model, opt, str(tmp_path / "checkpoint"))
    saved = snapshot(model, opt)
    code["train"](model, opt, mine[STEPS + 1:], loss_fn)
    straight = snapshot(model, opt)

    resumed_model, resumed_opt = code["with_fsdp2"](make_model(seed=7), mesh=mesh, **args)
    code["load_checkpoint"](resumed_model, resumed_opt, str(tmp_path / "checkpoint"))
    assert_bit_identical(saved, snapshot(resumed_model, resumed_opt), "loaded state")
    assert resumed_opt.history.step.item() == STEPS and resumed_opt.skipped_steps.item() == 1
    code["train"](resumed_model, resumed_opt, mine[STEPS + 1:], loss_fn)
    assert_bit_identical(straight, snapshot(resumed_model, resumed_opt), "resumed run")
    assert resumed_opt.history.step.item() == STEPS + 4


@pytest.mark.parametrize("backend", backends())
def test_ddp_fsdp2_and_dcp_checkpoint_match_one_process(backend, tmp_path):
    run_workers("ddp_fsdp2_and_checkpoint", tmp_path, backend)


# ---------------------------------------------------------------------- other shardings
def check_other_shardings(rank: int, tmp_path: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    code = readme_code()
    for backend in [b for b in ("cpu", "reference") if backend_unavailable(b, "cpu") is None]:
        args = dict(lr=0.1, window_size=WINDOW, backend=backend)

        # HSDP on a (replicate=2, shard=1) mesh: the replicas' gradients are copies. Summing over
        # the replicate dimension would make every norm sqrt(2) times too large.
        batches = global_batches(STEPS)
        expected_record, expected_model = single_process_run(code, backend, batches)
        mesh = init_device_mesh("cpu", (WORLD_SIZE, 1), mesh_dim_names=("replicate", "shard"))
        model, opt = code["with_fsdp2"](make_model(), mesh=mesh, **args)
        assert next(model.parameters()).placements == (Replicate(), Shard(0))
        with StepRecorder() as record:
            code["train"](model, opt, share(batches, rank), torch.nn.functional.mse_loss)
        assert_matches_single_process(record, model, expected_record, expected_model, "HSDP")
        assert_history_same_on_every_rank(opt)

        # Shard, Replicate and plain parameters in one optimizer, against one process holding
        # the whole tensors. Shapes: uneven shards (5 rows over 2 ranks) and an empty one (1 row).
        mesh1 = init_device_mesh("cpu", (WORLD_SIZE,))
        layouts = [((5, 3), [Shard(0)]), ((1, 4), [Shard(0)]), ((4,), [Replicate()]), ((3,), None)]
        gen = torch.Generator().manual_seed(3)
        initial = [torch.randn(shape, generator=gen) for shape, _ in layouts]

        def place(t, placements):
            return t.clone() if placements is None else distribute_tensor(t, mesh1, placements, src_data_rank=None)

        params = [torch.nn.Parameter(place(t, pl)) for t, (_, pl) in zip(initial, layouts)]
        whole = [torch.nn.Parameter(t.clone()) for t in initial]
        # Clipping uses the global norm too (the gradients' norms here are 5 to 20).
        opt = ZenithFused(params, momentum=0.9, dampening=0.1, max_grad_norm=2.0, **args)
        ref = ZenithFused(whole, momentum=0.9, dampening=0.1, max_grad_norm=2.0, **args)
        for step in range(STEPS):
            grads = [(1 + step % 4) * torch.randn(shape, generator=gen) for shape, _ in layouts]
            for p, q, g, (_, pl) in zip(params, whole, grads, layouts):
                p.grad, q.grad = place(g, pl), g.clone()
            opt.step()
            ref.step()
            torch.testing.assert_close(opt.grad_norm, ref.grad_norm, **TOL)
            torch.testing.assert_close(opt.lr_scale, ref.lr_scale, **TOL)
        for i, (p, q) in enumerate(zip(params, whole)):
            torch.testing.assert_close(full(p.detach()), q.detach(), **TOL,
                                       msg=lambda m, i=i: f"mixed param {i}: {m}")
        assert_history_same_on_every_rank(opt)

        # process_group=: each rank owns a disjoint slice of one plain vector.
        full_vector = torch.randn(9, generator=gen)
        bounds = [(0, 5), (5, 9)]
        lo, hi = bounds[rank]
        mine = torch.nn.Parameter(full_vector[lo:hi].clone())
        whole = torch.nn.Parameter(full_vector.clone())
        opt = ZenithFused([mine], process_group=dist.group.WORLD, **args)
        ref = ZenithFused([whole], **args)
        for step in range(STEPS):
            g = (1 + step % 3) * torch.randn(9, generator=gen)
            mine.grad, whole.grad = g[lo:hi].clone(), g.clone()
            opt.step()
            ref.step()
            torch.testing.assert_close(opt.grad_norm, ref.grad_norm, **TOL)
        torch.testing.assert_close(mine.detach(), whole.detach()[lo:hi], **TOL)
        before = mine.detach().clone()
        mine.grad = torch.full_like(mine, float("inf") if rank == 1 else 1.0)
        opt.step()
        assert opt.skipped_steps.item() == 1 and torch.equal(mine.detach(), before)
        # A rank without a gradient still joins the reduction (else rank 0 would wait for it).
        mine.grad = torch.ones_like(mine) if rank == 0 else None
        opt.step()
        assert opt.grad_norm.item() == pytest.approx(math.sqrt(5), rel=1e-6)
        assert_history_same_on_every_rank(opt)

    # Errors that need DTensors.
    mesh1 = init_device_mesh("cpu", (WORLD_SIZE,))
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh1, [Shard(0)], src_data_rank=None))
    opt = ZenithFused([p], backend="reference")
    p.grad = distribute_tensor(torch.ones(4, 2), mesh1, [Replicate()], src_data_rank=None)
    with pytest.raises(RuntimeError, match=r"gradient of a DTensor parameter .* same mesh and placements; "
                                           r"got a DTensor with placements \(Replicate\(\),\)"):
        opt.step()
    assert opt.history.step.item() == 0 and p not in opt.state
    p.grad = distribute_tensor(torch.ones(4, 2), mesh1, [Shard(0)], src_data_rank=None)
    opt.state[p]["momentum_buffer"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match=r"momentum buffer of a parameter of shape \(4, 2\) is a plain tensor "
                                           r"but the parameter is a DTensor"):
        opt.step()
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh1, [Partial()]))
    with pytest.raises(ValueError, match=r"DTensor parameter with placements \(Partial\(sum\),\)"):
        ZenithFused([partial])

    # torch's optimizer-state helpers would step an optimizer without per-parameter state
    # (momentum 0) on zero gradients; zenith_fused's keep the history as it was.
    model, opt = code["with_fsdp2"](make_model(), mesh=mesh1, lr=0.1, momentum=0.0, window_size=WINDOW)
    code["train"](model, opt, share(global_batches(2), rank), torch.nn.functional.mse_loss)
    opt.zero_grad()
    history = snapshot(model, opt)
    state = get_optimizer_state_dict(model, opt)
    assert_bit_identical(history, snapshot(model, opt), "get_optimizer_state_dict changed the optimizer")
    assert state["zenith"]["step"].item() == 2
    set_optimizer_state_dict(model, opt, state)
    assert_bit_identical(history, snapshot(model, opt), "set_optimizer_state_dict of its own state")


    # A trainable parameter that never gets a gradient has no momentum state in training; the
    # helpers give it its never-filled state, so the checkpoint has the keys a fresh optimizer's
    # template asks dcp.load for.
    model, opt = code["with_fsdp2"](PartlyUsed(), mesh=mesh1, lr=0.1, window_size=WINDOW)
    code["train"](model, opt, share(global_batches(2), rank), torch.nn.functional.mse_loss)
    assert model.unused.weight not in opt.state
    code["save_checkpoint"](model, opt, str(tmp_path / "partly-used"))
    assert opt.state[model.unused.weight]["momentum_step"].item() == 0
    saved = snapshot(model, opt)
    resumed_model, resumed_opt = code["with_fsdp2"](PartlyUsed(), mesh=mesh1, lr=0.1, window_size=WINDOW)
    code["load_checkpoint"](resumed_model, resumed_opt, str(tmp_path / "partly-used"))
    assert_bit_identical(saved, snapshot(resumed_model, resumed_opt), "loaded state")


class PartlyUsed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_model()
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_hsdp_mixed_placements_and_process_group_match_one_process(tmp_path):
    run_workers("other_shardings", tmp_path)


def check_hsdp_on_4_ranks(rank: int, tmp_path: Path) -> None:
    """HSDP on a (replicate=2, shard=2) mesh: the norm is summed over the shard dimension only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    code = readme_code()
    batches = global_batches(STEPS)
    expected_record, expected_model = single_process_run(code, "cpu", batches)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, opt = code["with_fsdp2"](make_model(), mesh=mesh, lr=0.1, window_size=WINDOW, backend="cpu")
    assert next(model.parameters()).placements == (Replicate(), Shard(0))
    with StepRecorder() as record:
        code["train"](model, opt, share(batches, rank), torch.nn.functional.mse_loss)
    assert_matches_single_process(record, model, expected_record, expected_model, "HSDP 2x2")
    assert_history_same_on_every_rank(opt)


@pytest.mark.skipif(backend_unavailable("cpu", "cpu") is not None, reason="needs the compiled 'cpu' backend")
def test_hsdp_on_a_2x2_mesh_matches_one_process(tmp_path):
    run_workers("hsdp_on_4_ranks", tmp_path, world_size=4)


CHECKS = {
    "ddp_fsdp2_and_checkpoint": check_ddp_fsdp2_and_checkpoint,
    "other_shardings": check_other_shardings,
    "hsdp_on_4_ranks": check_hsdp_on_4_ranks,
}


# ---------------------------------------------------------------------- single-process errors
def test_process_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup or None; got str"):
        ZenithFused([torch.nn.Parameter(torch.ones(2))], process_group="world")


def test_state_dict_helpers_reject_other_optimizers_and_broadcast():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="take one ZenithFused optimizer; got SGD"):
        get_optimizer_state_dict(model, sgd)
    opt = ZenithFused(model.parameters())
    with pytest.raises(ValueError, match=r"broadcast_from_rank0=True\) is not supported"):
        set_optimizer_state_dict(model, opt, {}, options=StateDictOptions(broadcast_from_rank0=True))
