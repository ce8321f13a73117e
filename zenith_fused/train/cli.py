"""Train a small convolutional network on a real offline dataset and compare optimizers.

    python -m zenith_fused.train                 # 8x8 digits from scikit-learn, every method
    python -m zenith_fused.train --quick         # the same, short (a smoke run)
    python -m zenith_fused.train --dataset mnist --data-dir ~/data/mnist --device cuda

Every method starts from the same initial weights and sees the same mini-batches in the same
order (per seed):

* ``zenith``: ``ZenithFused`` with its default hyper-parameters at ``--lr``;
* ``sgd``: ``torch.optim.SGD`` (momentum 0.9) at the constant ``--lr``;
* ``sgd-cosine``: the same with ``CosineAnnealingLR`` over every iteration of the run;
* ``sgd-plateau``: the same with ``ReduceLROnPlateau`` on the validation loss, once per epoch;
* ``prodigy`` or ``dadapt-sgd``: a learning-rate-free optimizer, when its package is installed
  (``pip install zenith-fused[train-extra]``); skipped, and said so, when it is not.

Writes ``results.json`` (every number), ``curves.png`` (training loss, test accuracy and effective
learning rate over steps) and ``table.md`` to ``--out``, and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zenith_fused import ZenithFused

from .data import DATASETS, Splits, load_dataset

__all__ = ["main", "run", "TrainConfig", "SmallConvNet", "METHODS", "train_run", "run_comparison"]

# Learning-rate-free optimizers in order of preference: (method name, module, class, package).
LR_FREE = (
    ("prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    ("dadapt-sgd", "dadaptation", "DAdaptSGD", "dadaptation"),
)
BASE_METHODS = ("zenith", "sgd", "sgd-cosine", "sgd-plateau")
METHODS = BASE_METHODS + tuple(name for name, *_ in LR_FREE)
SGD_MOMENTUM = 0.9  # the baselines use ZenithFused's default momentum
PLATEAU = dict(mode="min", factor=0.1, patience=3)

DEFAULT_EPOCHS = 30
QUICK_EPOCHS = 5
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
QUICK_SEEDS = (0,)
# --quick keeps MNIST/CIFAR-10 runs short too; digits (1437 training images) is under both caps.
QUICK_MAX_TRAIN = 4096
QUICK_MAX_TEST = 1024
EVAL_BATCH = 1024


@dataclass
class TrainConfig:
    dataset: str = "digits"
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 32
    lr: float = 0.1
    window_size: int = 100
    weight_decay: float = 0.0
    device: str = "cpu"
    backend: str = "auto"


class SmallConvNet(nn.Module):
    """Four 3x3 convolution + batch-norm + ReLU blocks, one 2x2 max-pool, global average pooling,
    a linear head.

    Global pooling makes it size-agnostic: 8x8 digits, 28x28 MNIST and 32x32 CIFAR-10 alike.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# ------------------------------------------------------------------------------------- methods
def lr_free_available() -> list[str]:
    """The learning-rate-free methods whose package imports here."""
    available = []
    for name, module, cls, _ in LR_FREE:
        try:
            getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):  # absent, or a version without the class
            continue
        available.append(name)
    return available


def default_methods() -> tuple[list[str], dict[str, str]]:
    """(methods to run, {skipped method: why}): the base four plus the first LR-free one found."""
    available = lr_free_available()
    if available:
        return list(BASE_METHODS) + available[:1], {}
    packages = " nor ".join(pkg for *_, pkg in LR_FREE)
    return list(BASE_METHODS), {
        "lr-free": f"neither {packages} is installed (pip install 'zenith-fused[train-extra]')"
    }


def make_optimizer(method: str, params, cfg: TrainConfig, total_steps: int):
    """(optimizer, scheduler or None) for ``method``."""
    params = list(params)
    if method == "zenith":
        return ZenithFused(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           window_size=cfg.window_size, backend=cfg.backend), None
    if method in ("sgd", "sgd-cosine", "sgd-plateau"):
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay)
        if method == "sgd-cosine":
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if method == "sgd-plateau":
            return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **PLATEAU)
        return opt, None
    for name, module, cls, package in LR_FREE:
        if method == name:
            if name not in lr_free_available():
                raise RuntimeError(f"method {name!r} needs {package}: pip install 'zenith-fused[train-extra]'")
            optimizer_cls = getattr(importlib.import_module(module), cls)
            # Both are used as their authors recommend: lr=1 (a multiplier on the estimated step).
            # Prodigy's weight decay is decoupled (AdamW-style), the others' is L2 in the gradient.
            kwargs = dict(lr=1.0, weight_decay=cfg.weight_decay)
            if name == "dadapt-sgd":
                kwargs["momentum"] = SGD_MOMENTUM
            return optimizer_cls(params, **kwargs), None
    raise ValueError(f"Unknown method: {method!r}; expected one of {METHODS}")


def _host_lr(method: str, opt: torch.optim.Optimizer) -> float:
    """The learning rate of the step just taken, from host values only (no device read).

    ZENITH's is this times its ``lr_scale`` tensor, logged separately; the LR-free optimizers keep
    their estimate ``d`` as a Python float, and step with ``d * lr``.
    """
    group = opt.param_groups[0]
    if method in ("prodigy", "dadapt-sgd"):
        return float(group["d"]) * float(group["lr"])
    return float(group["lr"])


# -------------------------------------------------------------------------------------- timing
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


# ------------------------------------------------------------------------------------ training
@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over ``x``; one host read."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(y), EVAL_BATCH):
        logits = model(x[i:i + EVAL_BATCH])
        loss_sum += F.cross_entropy(logits, y[i:i + EVAL_BATCH], reduction="sum")
        correct += (logits.argmax(dim=1) == y[i:i + EVAL_BATCH]).sum()
    model.train()
    both = torch.stack([loss_sum / len(y), correct.to(loss_sum.dtype) / len(y)]).tolist()  # sync-ok: once per evaluation
    return both[0], both[1]


StepCallback = Callable[[torch.optim.Optimizer, int], None]


def train_run(method: str, splits: Splits, cfg: TrainConfig, init_state: dict[str, Tensor], seed: int,
              *, progress: bool = True, step_callback: StepCallback | None = None) -> dict[str, Any]:
    """Train one method from ``init_state`` with ``seed``'s data order; return every number.

    ``step_callback(optimizer, step_index)`` runs right after each ``optimizer.step()``.
    """
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    model = SmallConvNet(splits.in_channels, splits.num_classes).to(device)
    model.load_state_dict(init_state)
    n_train = len(splits.y_train)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    opt, scheduler = make_optimizer(method, model.parameters(), cfg, total_steps)

    # Logged on the device and read once per epoch, so logging adds no per-step host wait.
    train_loss = torch.zeros(total_steps, device=device)
    lr_scale = torch.ones(total_steps, device=device)
    host_lr: list[float] = []
    order = torch.Generator().manual_seed(seed)  # the data order: identical for every method
    timer = StepTimer(device)

    test_loss, test_acc = evaluate(model, splits.x_test, splits.y_test)
    val_loss, _ = evaluate(model, splits.x_val, splits.y_val)
    epochs = {"epoch": [0], "step": [0], "test_loss": [test_loss], "test_accuracy": [test_acc],
              "val_loss": [val_loss], "train_loss": [float("nan")]}

    bar = tqdm(total=total_steps, desc=f"{method:<11} seed {seed}", unit="step", disable=not progress,
               leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n_train, generator=order).to(device)
        for first in range(0, n_train, cfg.batch_size):
            idx = perm[first:first + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(splits.x_train[idx]), splits.y_train[idx])
            loss.backward()
            timer.start()
            opt.step()
            timer.stop()
            train_loss[step] = loss.detach()
            host_lr.append(_host_lr(method, opt))
            if method == "zenith":
                lr_scale[step] = opt.lr_scale
            if step_callback is not None:
                step_callback(opt, step)
            if method == "sgd-cosine":
                scheduler.step()
            step += 1
            bar.update(1)
        test_loss, test_acc = evaluate(model, splits.x_test, splits.y_test)
        val_loss, _ = evaluate(model, splits.x_val, splits.y_val)
        if method == "sgd-plateau":
            scheduler.step(val_loss)
        epoch_loss = train_loss[step - steps_per_epoch:step].mean().item()  # sync-ok: once per epoch
        for key, value in (("epoch", epoch), ("step", step), ("test_loss", test_loss),
                           ("test_accuracy", test_acc), ("val_loss", val_loss), ("train_loss", epoch_loss)):
            epochs[key].append(value)
        bar.set_postfix(loss=f"{epoch_loss:.3f}", test_acc=f"{test_acc:.3f}", refresh=False)
        timer.total()  # the evaluation has waited for the device already: collect the events
    step_seconds = timer.total()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_seconds = time.perf_counter() - start
    bar.close()

    accs = epochs["test_accuracy"][1:]
    best = max(range(len(accs)), key=lambda i: accs[i])  # the first epoch reaching the best
    scales = lr_scale.tolist()  # sync-ok: after training
    result: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "optimizer": type(opt).__module__ + "." + type(opt).__qualname__,
        "steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "train_loss": train_loss.tolist(),  # sync-ok: after training
        "effective_lr": [lr * s for lr, s in zip(host_lr, scales)],
        "epochs": epochs,
        "final_test_accuracy": accs[-1],
        "best_test_accuracy": accs[best],
        "best_epoch": best + 1,
        "final_test_loss": epochs["test_loss"][-1],
        "wall_time_s": wall_seconds,
        "optimizer_step_time_s": step_seconds,
    }
    if method == "zenith":
        result["lr_scale"] = scales
        result["final_lr_scale"] = float(opt.lr_scale)
        result["skipped_steps"] = int(opt.skipped_steps)
        result["backend"] = cfg.backend
    return result


def run_comparison(methods: Sequence[str], seeds: Sequence[int], splits: Splits, cfg: TrainConfig, *,
                   progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Every method for every seed: ``{method: [result per seed]}``."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    device = torch.device(cfg.device)
    on_device = splits.to(device)
    for seed in seeds:
        torch.manual_seed(seed)
        init_state = copy.deepcopy(SmallConvNet(splits.in_channels, splits.num_classes).state_dict())
        init_state = {k: v.to(device) for k, v in init_state.items()}
        for method in methods:
            runs[method].append(train_run(method, on_device, cfg, init_state, seed, progress=progress))
    return runs


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zenith_fused.train",
        description="Train a small CNN on an offline dataset with ZENITH and baseline optimizers; "
                    "write a table, a plot and a JSON of every number.",
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 digits (default); mnist / cifar10: files in --data-dir")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder holding the MNIST idx files or the CIFAR-10 python batches (never downloaded)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_EPOCHS} epochs (unless --epochs), at most {QUICK_MAX_TRAIN} "
                        f"training and {QUICK_MAX_TEST} test images")
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS} ({QUICK_EPOCHS} with --quick)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help="base learning rate of ZENITH and the SGD baselines (default 0.1)")
    p.add_argument("--window-size", type=int, default=TrainConfig.window_size, help="ZENITH's window W")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--backend", default=TrainConfig.backend, help="ZenithFused backend (default auto)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"one run of every method per seed; several print mean ± std "
                        f"(default {' '.join(map(str, DEFAULT_SEEDS))}; {QUICK_SEEDS[0]} with --quick)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="subset to run (default: the four SGD/ZENITH methods and one LR-free optimizer "
                        "if installed)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/train-<dataset>-<time>)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for digits, whose 8x8 images are too small to "
                        "share between threads; torch's default otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _resolve_device(name: str, parser: argparse.ArgumentParser) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return name


def _check_backend(cfg: TrainConfig, parser: argparse.ArgumentParser) -> str:
    """Fail before training when ZenithFused cannot run ``--backend`` on ``--device``; else return
    the backend it runs (what ``auto`` chose), for the record."""
    from zenith_fused._engines import resolve_backend

    probe = torch.zeros(1, device=cfg.device, requires_grad=True)
    try:
        ZenithFused([probe], backend=cfg.backend)
    except (ValueError, RuntimeError) as err:
        parser.error(f"--backend {cfg.backend} on {cfg.device}: {err}")
    return resolve_backend(cfg.backend, probe.device)


def environment(device: str) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (``python -m zenith_fused.train``, ``zenith-train``); returns 0."""
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the comparison, write the outputs; returns what ``results.json`` holds."""
    from . import report

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} needs --data-dir (files already on disk; nothing is downloaded)")
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    if epochs < 1:
        parser.error(f"--epochs must be at least 1, got {epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    cfg = TrainConfig(dataset=args.dataset, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                      window_size=args.window_size, weight_decay=args.weight_decay,
                      device=_resolve_device(args.device, parser), backend=args.backend)
    zenith_backend = _check_backend(cfg, parser)

    seeds = list(args.seeds) if args.seeds is not None else list(QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    threads = args.threads
    if threads is None and args.dataset == "digits":
        threads = 1
    if threads is not None and threads < 1:
        parser.error(f"--threads must be at least 1, got {threads}")

    if args.methods is None:
        methods, skipped = default_methods()
    else:
        methods = list(dict.fromkeys(args.methods))
        lr_free = {name for name, *_ in LR_FREE}
        missing = [m for m in methods if m in lr_free and m not in lr_free_available()]
        if missing:
            parser.error(f"--methods {' '.join(missing)}: not installed (pip install 'zenith-fused[train-extra]')")
        skipped = {}
    for method, why in skipped.items():
        print(f"skipped {method}: {why}", file=sys.stderr)

    limits = dict(max_train=QUICK_MAX_TRAIN, max_test=QUICK_MAX_TEST) if args.quick else {}
    splits = load_dataset(args.dataset, args.data_dir, **limits)
    out = args.out or Path("runs") / f"train-{args.dataset}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        runs = run_comparison(methods, seeds, splits, cfg, progress=not args.no_progress)
        total_seconds = time.perf_counter() - started
        env = environment(cfg.device)
    finally:
        torch.set_num_threads(previous_threads)  # main() may run inside a longer process (tests)

    command_args = list(argv) if argv is not None else sys.argv[1:]
    results = {
        "command": " ".join(["python -m zenith_fused.train", *command_args]),
        "config": {**asdict(cfg), "seeds": seeds, "quick": args.quick, "methods": methods,
                   "zenith_backend": zenith_backend, "sgd_momentum": SGD_MOMENTUM,
                   "plateau": PLATEAU},
        "dataset": {"name": args.dataset, **splits.sizes()},
        "environment": env,
        "skipped_methods": skipped,
        "total_time_s": total_seconds,
        "summary": report.summarize(runs),
        "runs": runs,
    }
    table = report.format_table(results["summary"], seeds=len(seeds))
    print(table)
    report.write_outputs(results, table, out)
    print(f"wrote {out / 'results.json'}, {out / 'curves.png'}, {out / 'table.md'}")
    return results
