"""One training run of one method on one task, and a list of runs under one progress bar.

A task (:class:`~zenith_fused.train.images.ImageTask`, :class:`~zenith_fused.train.text.TextTask`)
supplies the model, the batches of a seed, the evaluation and the numbers a run reports; this
module owns what every task shares: the optimizer and its scheduler, the per-step logs, the
timing, and the order of runs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .methods import PlateauAfterWarmup, TrainConfig, host_lr, make_optimizer

__all__ = ["Task", "RunSpec", "StepTimer", "train_run", "run_all"]


class Task(Protocol):
    name: str
    total_steps: int  # optimizer steps of one run
    eval_after: tuple[int, ...]  # step counts after which to evaluate; the last is total_steps
    metric: str  # the final number a sweep reports, a key of final_fields()
    higher_is_better: bool

    def init_model(self) -> nn.Module: ...  # from torch's global generator, seeded by the caller
    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]: ...  # total_steps of them
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...  # has "val_loss"
    def final_evaluation(self, model: nn.Module) -> dict[str, float]: ...
    def final_fields(self, evals: dict[str, list], final: dict[str, float]) -> dict[str, Any]: ...


@dataclass
class RunSpec:
    """One run: ``method`` from ``seed``'s initial weights and batches, with ``cfg``."""

    method: str
    seed: int
    cfg: TrainConfig
    label: str = ""  # what distinguishes it in a sweep, for the progress bar


class StepTimer:
    """Accumulates the time spent inside ``optimizer.step()``.

    On the CPU it is host wall time; on CUDA a pair of events per step measured on the device
    timeline and summed by :meth:`total` (which waits once), so timing adds no per-step sync.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start

    def total(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events.clear()
        return self._seconds


StepCallback = Callable[[torch.optim.Optimizer, int], None]


def train_run(method: str, task: Task, cfg: TrainConfig, init_state: dict[str, Tensor], seed: int, *,
              step_callback: StepCallback | None = None,
              advance: Callable[[int, dict[str, float]], None] | None = None,
              per_step: bool = True) -> dict[str, Any]:
    """Train ``method`` from ``init_state`` on ``seed``'s batches; return every number.

    ``step_callback(optimizer, step_index)`` runs right after each ``optimizer.step()``;
    ``advance(steps, last_evaluation)`` after each evaluation (the progress bar). ``per_step=False``
    leaves the per-step loss and learning rate out of the result (sweeps keep it small).
    """
    device = torch.device(cfg.device)
    model = task.init_model().to(device)
    model.load_state_dict(init_state)
    total_steps = task.total_steps
    opt, scheduler = make_optimizer(method, model.parameters(), cfg, total_steps)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    # Logged on the device and read once per evaluation, so logging adds no per-step host wait.
    train_loss = torch.zeros(total_steps, device=device)
    lr_scale = torch.ones(total_steps, device=device)
    lrs: list[float] = []
    timer = StepTimer(device)

    evals: dict[str, list] = {"step": [0], "train_loss": [float("nan")], **_listed(task.evaluate(model))}
    start = time.perf_counter()
    eval_after = set(task.eval_after)
    last_eval = 0
    for step, (x, y) in enumerate(task.batches(seed)):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        timer.start()
        opt.step()
        timer.stop()
        train_loss[step] = loss.detach()
        lrs.append(host_lr(method, opt))
        if method == "zenith":
            lr_scale[step] = opt.lr_scale
        if step_callback is not None:
            step_callback(opt, step)
        if scheduler is not None and not plateau:
            scheduler.step()
        elif isinstance(scheduler, PlateauAfterWarmup):
            scheduler.warmup_step()
        done = step + 1
        if done in eval_after:
            measured = task.evaluate(model)
            if plateau:
                scheduler.step(measured["val_loss"])
            mean_loss = train_loss[last_eval:done].mean().item()  # sync-ok: once per evaluation
            for key, value in (("step", done), ("train_loss", mean_loss), *measured.items()):
                evals[key].append(value)
            timer.total()  # the evaluation has waited for the device already: collect the events
            if advance is not None:
                advance(done - last_eval, {"train_loss": mean_loss, **measured})
            last_eval = done
    final = task.final_evaluation(model)
    step_seconds = timer.total()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_seconds = time.perf_counter() - start

    scales = lr_scale.tolist()  # sync-ok: after training
    result: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "optimizer": type(opt).__module__ + "." + type(opt).__qualname__,
        "steps": total_steps,
        "evals": evals,
        **task.final_fields(evals, final),
        "wall_time_s": wall_seconds,
        "optimizer_step_time_s": step_seconds,
        "final_lr": lrs[-1] * scales[-1],
    }
    if per_step:
        result["train_loss"] = train_loss.tolist()  # sync-ok: after training
        result["effective_lr"] = [lr * s for lr, s in zip(lrs, scales)]
    if method == "zenith":
        stats = opt.stats()  # sync-ok: after training
        if per_step:
            result["lr_scale"] = scales
        result["final_lr_scale"] = stats["lr_scale"]
        result["skipped_steps"] = stats["skipped_steps"]
        result["backend"] = cfg.backend
    return result


def _listed(numbers: dict[str, float]) -> dict[str, list[float]]:
    return {key: [value] for key, value in numbers.items()}


def run_all(task: Task, specs: Sequence[RunSpec], *, progress: bool = True,
            per_step: bool = True) -> list[dict[str, Any]]:
    """Every run of ``specs`` in order, under one progress bar over all their steps.

    Runs of the same seed start from the same initial weights and see the same batches.
    """
    from tqdm.auto import tqdm

    init_states: dict[int, dict[str, Tensor]] = {}
    results = []
    bar = tqdm(total=len(specs) * task.total_steps, unit="step", disable=not progress, dynamic_ncols=True,
               smoothing=0.05)
    try:
        for k, spec in enumerate(specs, 1):
            if spec.seed not in init_states:
                torch.manual_seed(spec.seed)
                init_states[spec.seed] = {name: t.detach().clone().to(spec.cfg.device)
                                          for name, t in task.init_model().state_dict().items()}
            label = f" {spec.label}" if spec.label else ""
            bar.set_description(f"run {k}/{len(specs)}: {spec.method} seed {spec.seed}{label}", refresh=False)

            def advance(steps: int, measured: dict[str, float]) -> None:
                bar.set_postfix({key: f"{value:.3g}" for key, value in measured.items()
                                 if math.isfinite(value)}, refresh=False)
                bar.update(steps)

            result = train_run(spec.method, task, spec.cfg, init_states[spec.seed], spec.seed,
                               advance=advance, per_step=per_step)
            result["label"] = spec.label
            results.append(result)
    finally:
        bar.close()
    return results


def with_value(cfg: TrainConfig, parameter: str, value: float | int) -> TrainConfig:
    """``cfg`` with one field replaced (a sweep's point)."""
    return replace(cfg, **{parameter: value})
