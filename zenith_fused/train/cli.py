"""The command line of ``python -m zenith_fused.train`` (see the package docstring for the modes).

    python -m zenith_fused.train                              # digits, every method, 5 seeds
    python -m zenith_fused.train --quick                      # the same, short (a smoke run)
    python -m zenith_fused.train --dataset stdlib-text        # a byte-level transformer LM
    python -m zenith_fused.train --dataset mnist1d            # a 1-D CNN on generated MNIST-1D
    python -m zenith_fused.train --warmup-steps 100           # every method warms up over 100 steps
    python -m zenith_fused.train --lr-sweep 0.01 0.1 1.0      # final test metric against η0
    python -m zenith_fused.train --window-sweep 10 100 1000   # ... against ZENITH's window W
    python -m zenith_fused.train --dataset mnist --data-dir ~/data/mnist --device cuda

For each seed every method starts from the same initial weights and sees the same batches in the
same order. Writes ``results.json`` (every number), a picture (``curves.png``, ``lr_sweep.png`` or
``window_sweep.png``) and ``table.md`` to ``--out``, and prints the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from zenith_fused import ZenithFused

from . import install_hint, missing_extras
from .data import DATASETS as IMAGE_DATASETS
from .loop import RunSpec, run_all, with_value
from .methods import (ADAMW_WARMUP_FRACTION, LR_FREE, METHODS, PLATEAU, SGD_MOMENTUM, WARMUP_CONSTANT, TrainConfig,
                      default_methods, depends_on, lr_free_available, lr_free_install_hint)

__all__ = ["run", "build_parser", "Mode", "MODES"]

DATASETS = IMAGE_DATASETS + ("stdlib-text", "mnist1d")
# --quick keeps MNIST/CIFAR-10 runs short too; digits (1437 training images) is under both caps.
QUICK_MAX_TRAIN = 4096
QUICK_MAX_TEST = 1024
SWEEPS = {"lr": "--lr-sweep", "window_size": "--window-sweep"}
PLOTS = {None: "curves.png", "lr": "lr_sweep.png", "window_size": "window_sweep.png"}


# ---------------------------------------------------------------- argparse types for numeric options
# Each is an argparse ``type=``: a bad value ends in argparse's one-line error and exit status 2,
# before anything runs or any folder is made. The message names the value and what was expected.
def _parsed(convert, text: str, expected: str, ok) -> Any:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    return _parsed(float, text, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, momentum)."""
    return _parsed(float, text, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def positive_int(text: str) -> int:
    """An integer >= 1 (a window, a count of epochs, steps, threads)."""
    return _parsed(int, text, "an integer >= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a number of warmup steps)."""
    return _parsed(int, text, "an integer >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class Mode:
    """The defaults of one kind of run; ``quick_*`` apply with ``--quick``."""

    length: int  # epochs (image data sets) or steps (stdlib-text)
    quick_length: int
    seeds: tuple[int, ...]
    quick_seeds: tuple[int, ...]
    methods: tuple[str, ...] | None  # None: the four SGD/ZENITH methods and one LR-free optimizer
    lr: float = 0.1
    batch_size: int = 32
    quick_batch_size: int = 32


_SWEEP_METHODS = ("zenith", "sgd", "sgd-cosine")
_TEXT_METHODS = ("zenith", "sgd", "sgd-cosine", "adamw")
MODES = {
    # (data kind, sweep): images count epochs, text counts steps.
    ("image", None): Mode(30, 5, (0, 1, 2, 3, 4), (0,), None),
    # --quick stays under a minute on 2 shared cores (load average 7 measured): a sweep's quick runs
    # are shorter, since it makes 4 to 10 of them.
    ("image", "lr"): Mode(15, 3, (0, 1), (0,), _SWEEP_METHODS),
    ("image", "window_size"): Mode(15, 3, (0, 1), (0,), _SWEEP_METHODS),
    ("text", None): Mode(300, 20, (0,), (0,), _TEXT_METHODS, batch_size=16, quick_batch_size=8),
    ("text", "lr"): Mode(300, 10, (0,), (0,), _TEXT_METHODS, batch_size=16, quick_batch_size=8),
    ("text", "window_size"): Mode(300, 10, (0,), (0,), _TEXT_METHODS, batch_size=16, quick_batch_size=8),
    # MNIST-1D: 50 epochs of 113 steps, 30 in a sweep, over 3 seeds (the seed-to-seed spread is
    # several points here); its epochs are 2.75 times digits', so --quick runs fewer of them.
    ("mnist1d", None): Mode(50, 3, (0, 1, 2, 3, 4), (0,), None),
    ("mnist1d", "lr"): Mode(30, 2, (0, 1, 2), (0,), _SWEEP_METHODS),
    ("mnist1d", "window_size"): Mode(30, 2, (0, 1, 2), (0,), _SWEEP_METHODS),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zenith_fused.train",
        description="Train a small CNN (image data) or a small transformer (stdlib-text) with ZENITH and "
                    "baseline optimizers, or sweep η0 or W; write a table, a plot and a JSON of every number.",
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 digits (default); mnist / cifar10: files in --data-dir; "
                        "stdlib-text: the .py files of this interpreter's standard library, byte by byte; "
                        "mnist1d: MNIST-1D generated by the mnist1d package from its templates")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="MNIST idx files or CIFAR-10 python batches (never downloaded); for stdlib-text another "
                        "folder of .py files instead of the standard library; for mnist1d where the generated "
                        "arrays are cached (default ~/.cache/zenith-fused)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, under a minute in every mode: few epochs or steps, one seed, at most "
                        f"{QUICK_MAX_TRAIN} training and {QUICK_MAX_TEST} test images")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="image data sets: epochs per run (default 30, 15 in a sweep, 5 with --quick, 3 in a quick "
                        "sweep; mnist1d 50, 30 in a sweep, 3 with --quick, 2 in a quick sweep)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="stdlib-text: optimizer steps per run (default 300, 20 with --quick, 10 in a quick sweep)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="default 32 (stdlib-text: 16 windows of 128 bytes, 8 with --quick)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="η0, the base learning rate of ZENITH and the SGD methods (default 0.1)")
    p.add_argument("--adamw-lr", type=positive_float, default=TrainConfig.adamw_lr,
                   help=f"AdamW's peak learning rate (default {TrainConfig.adamw_lr}; linear warmup over "
                        f"{ADAMW_WARMUP_FRACTION:.0%}% of the steps, then cosine to 0)")
    p.add_argument("--window-size", type=positive_int, default=TrainConfig.window_size, help="ZENITH's window W")
    p.add_argument("--warmup-steps", type=non_negative_int, default=TrainConfig.warmup_steps, metavar="K",
                   help="ZENITH's warmup_steps K (default 0: none); every other method but sgd then ramps its "
                        f"rate linearly over the same K steps, and {WARMUP_CONSTANT} (SGD, warmup, then the "
                        "constant rate) joins the default methods")
    p.add_argument("--weight-decay", type=non_negative_float, default=TrainConfig.weight_decay,
                   help="L2 weight decay of ZENITH, SGD and the LR-free methods (AdamW keeps its decoupled 0.01)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--lr-sweep", type=positive_float, nargs="+", metavar="LR",
                       help="run the methods at each η0 and plot the final test metric against it")
    sweep.add_argument("--window-sweep", type=positive_int, nargs="+", metavar="W",
                       help="run ZENITH at each window W (the other methods once, as a reference) and plot the "
                            "final test metric against it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu")
    p.add_argument("--backend", default=TrainConfig.backend, help="ZenithFused backend (default auto)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one run of every method (and sweep point) per seed; several print mean ± std "
                        "(default 0 1 2 3 4 for digits and mnist1d, 0 1 in a digits sweep, 0 1 2 in an mnist1d "
                        "sweep, 0 for stdlib-text and --quick)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="subset to run (default: digits and mnist1d the four SGD/ZENITH methods and one LR-free "
                        "optimizer if installed; stdlib-text zenith sgd sgd-cosine adamw; a sweep zenith sgd "
                        f"sgd-cosine, plus adamw for stdlib-text; {WARMUP_CONSTANT} after sgd with --warmup-steps)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/train-<dataset>[-<sweep>]-<time>)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1 on the CPU, in every mode: on a shared machine two "
                        "threads that wait for each other's core are several times slower; torch's default "
                        "with --device cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_device(name: str, parser: argparse.ArgumentParser) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    return name


def _check_backend(cfg: TrainConfig, parser: argparse.ArgumentParser) -> None:
    """Fail before training when ZenithFused cannot run ``--backend`` on ``--device``."""
    probe = torch.zeros(1, device=cfg.device, requires_grad=True)
    try:
        ZenithFused([probe], backend=cfg.backend)
    except (ValueError, RuntimeError) as err:
        parser.error(f"--backend {cfg.backend} on {cfg.device}: {err}")
    if cfg.warmup_steps:
        try:
            ZenithFused([probe], backend=cfg.backend, warmup_steps=cfg.warmup_steps)
        except TypeError as err:  # a release of the optimizer before the option
            parser.error(f"--warmup-steps {cfg.warmup_steps}: this ZenithFused has no warmup_steps ({err})")


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


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the comparison or sweep, write the outputs; returns what ``results.json`` holds."""
    from . import report

    parser = build_parser()
    args = parser.parse_args(argv)
    text = args.dataset == "stdlib-text"
    if not text and args.data_dir is None and args.dataset not in ("digits", "mnist1d"):
        parser.error(f"--dataset {args.dataset} needs --data-dir (files already on disk; nothing is downloaded)")
    if not text and missing_extras(("sklearn",)):
        parser.error(f"--dataset {args.dataset} needs scikit-learn, which the [train] extra installs: "
                     f"{install_hint(['sklearn'])}")
    if args.dataset == "mnist1d" and missing_extras(("mnist1d",)):
        parser.error(f"--dataset mnist1d needs mnist1d, which the [train] extra installs: {install_hint(['mnist1d'])}")
    if text and args.epochs is not None:
        parser.error("--epochs counts passes over an image data set; stdlib-text runs --steps")
    if not text and args.steps is not None:
        parser.error(f"--steps is for stdlib-text; --dataset {args.dataset} runs --epochs")
    sweep = "lr" if args.lr_sweep else "window_size" if args.window_sweep else None
    mode = MODES[("text" if text else "mnist1d" if args.dataset == "mnist1d" else "image", sweep)]
    length = args.steps if text else args.epochs
    if length is None:
        length = mode.quick_length if args.quick else mode.length
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = mode.quick_batch_size if args.quick else mode.batch_size
    cfg = TrainConfig(dataset=args.dataset, epochs=0 if text else length, steps=length if text else 0,
                      batch_size=batch_size, lr=args.lr if args.lr is not None else mode.lr,
                      adamw_lr=args.adamw_lr, window_size=args.window_size, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, device=_resolve_device(args.device, parser),
                      backend=args.backend)
    _check_backend(cfg, parser)

    seeds = list(args.seeds) if args.seeds is not None else list(mode.quick_seeds if args.quick else mode.seeds)
    threads = args.threads
    if threads is None and cfg.device == "cpu":
        threads = 1

    skipped: dict[str, str] = {}
    if args.methods is not None:
        methods = list(dict.fromkeys(args.methods))
        lr_free = {name for name, *_ in LR_FREE}
        missing = [m for m in methods if m in lr_free and m not in lr_free_available()]
        if missing:
            parser.error(f"--methods {' '.join(missing)}: not installed ({lr_free_install_hint(missing)})")
    elif mode.methods is None:
        methods, skipped = default_methods()
    else:
        methods = list(mode.methods)
    if cfg.warmup_steps and args.methods is None:
        methods.insert(methods.index("sgd") + 1 if "sgd" in methods else len(methods), WARMUP_CONSTANT)
    if WARMUP_CONSTANT in methods and not cfg.warmup_steps:
        parser.error(f"--methods {WARMUP_CONSTANT} needs --warmup-steps K > 0 (without a warmup it is sgd)")
    for method, why in skipped.items():
        print(f"skipped {method}: {why}", file=sys.stderr)

    task = _make_task(args, cfg, parser)
    grid = args.lr_sweep or args.window_sweep
    specs = _specs(methods, seeds, cfg, sweep, grid)
    out = args.out or Path("runs") / "-".join(
        ["train", args.dataset, *([sweep.replace("_size", "")] if sweep else []), f"{_dt.datetime.now():%Y%m%d-%H%M%S}"])
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: exists and is not a folder")

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        # A sweep's per-step logs would be most of its JSON and are not plotted.
        runs = run_all(task, specs, progress=not args.no_progress, per_step=sweep is None)
        total_seconds = time.perf_counter() - started
        env = environment(cfg.device)
    finally:
        torch.set_num_threads(previous_threads)  # run() may run inside a longer process (tests)

    command_args = list(argv) if argv is not None else sys.argv[1:]
    config = {**asdict(cfg), "seeds": seeds, "quick": args.quick, "methods": methods,
              "sgd_momentum": SGD_MOMENTUM, "plateau": PLATEAU, "adamw_warmup_fraction": ADAMW_WARMUP_FRACTION}
    if text:
        del config["epochs"]
    else:
        del config["steps"]
    results: dict[str, Any] = {
        "command": " ".join(["python -m zenith_fused.train", *command_args]),
        "config": config,
        "dataset": task.describe(),
        "environment": env,
        "skipped_methods": skipped,
        "total_time_s": total_seconds,
        "metric": task.metric,
        "runs": {method: [r for r in runs if r["method"] == method] for method in methods},
    }
    if sweep is None:
        results["summary"] = report.summarize(results["runs"])
    else:
        for r, spec in zip(runs, specs):
            r[sweep] = getattr(spec.cfg, sweep) if depends_on(spec.method, sweep) else None
        results["sweep"] = report.summarize_sweep(results["runs"], sweep, list(grid), task.metric)
    table = report.format_results(results)
    print(table)
    plot = out / PLOTS[sweep]
    # The folder is made only now that there is something to put in it: a run that fails or is
    # interrupted leaves none behind, and one that fails while writing removes what it made.
    made = _first_missing(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report.write_outputs(results, table, out, plot)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    print(f"wrote {out / 'results.json'}, {plot}, {out / 'table.md'}; {total_seconds:.0f} s in all")
    return results


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (what ``mkdir(parents=True)``
    creates), or None when ``folder`` exists."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _make_task(args: argparse.Namespace, cfg: TrainConfig, parser: argparse.ArgumentParser):
    if args.dataset == "stdlib-text":
        from .text import TextShape, TextTask, load_text_corpus

        shape = TextShape(eval_every=10, val_windows=32, test_windows=64) if args.quick else TextShape()
        try:
            corpus = load_text_corpus(args.data_dir, min_bytes=shape.context + 2)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"--dataset stdlib-text: {err}")
        return TextTask(corpus, steps=cfg.steps, batch_size=cfg.batch_size, shape=shape, device=cfg.device)

    from .data import load_dataset
    from .images import ImageTask

    limits = dict(max_train=QUICK_MAX_TRAIN, max_test=QUICK_MAX_TEST) if args.quick else {}
    if args.dataset == "mnist1d":
        from .mnist1d import Mnist1dTask, load_mnist1d

        splits = load_mnist1d(args.data_dir, **limits)
        return Mnist1dTask(splits, epochs=cfg.epochs, batch_size=cfg.batch_size, device=cfg.device)
    splits = load_dataset(args.dataset, args.data_dir, **limits)
    return ImageTask(splits, epochs=cfg.epochs, batch_size=cfg.batch_size, device=cfg.device)


def _specs(methods: Sequence[str], seeds: Sequence[int], cfg: TrainConfig, sweep: str | None,
           grid: Sequence[float] | None) -> list[RunSpec]:
    """Every run, seed by seed (so that a seed's initial weights are made once).

    In a sweep, a method that does not depend on the swept parameter runs once per seed.
    """
    specs = []
    for seed in seeds:
        for method in methods:
            if sweep is None or not depends_on(method, sweep):
                specs.append(RunSpec(method, seed, cfg))
                continue
            for value in grid:
                name = "η0" if sweep == "lr" else "W"
                specs.append(RunSpec(method, seed, with_value(cfg, sweep, value), label=f"{name} {value:g}"))
    return specs
