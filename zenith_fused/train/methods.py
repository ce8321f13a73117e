"""The optimizers the training command compares, built the same way for every task."""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

from zenith_fused import ZenithFused

__all__ = ["TrainConfig", "METHODS", "BASE_METHODS", "LR_FREE", "WARMUP_CONSTANT", "make_optimizer",
           "lr_free_available", "default_methods", "depends_on", "host_lr", "lr_free_install_hint",
           "linear_warmup", "PlateauAfterWarmup"]

# Learning-rate-free optimizers in order of preference: (method name, module, class, package).
LR_FREE = (
    ("prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    ("dadapt-sgd", "dadaptation", "DAdaptSGD", "dadaptation"),
)
BASE_METHODS = ("zenith", "sgd", "sgd-cosine", "sgd-plateau")
# SGD with momentum, a linear warmup over --warmup-steps, then the constant rate: ZENITH's warmup
# without its decay. It needs --warmup-steps (without, it is `sgd`), and joins the defaults with it.
WARMUP_CONSTANT = "warmup+constant"
METHODS = BASE_METHODS + (WARMUP_CONSTANT, "adamw") + tuple(name for name, *_ in LR_FREE)
SGD_MOMENTUM = 0.9  # the baselines use ZenithFused's default momentum
PLATEAU = dict(mode="min", factor=0.1, patience=3)
ADAMW_WARMUP_FRACTION = 0.05  # of all steps, then cosine to 0

# The methods whose run changes with each swept parameter; the others run once per seed and are
# drawn as a reference.
_DEPENDS = {
    "lr": frozenset({"zenith", "sgd", "sgd-cosine", "sgd-plateau", WARMUP_CONSTANT}),
    "window_size": frozenset({"zenith"}),
}


@dataclass
class TrainConfig:
    dataset: str = "digits"
    epochs: int = 30
    steps: int = 0  # stdlib-text: optimizer steps of one run (image data sets count epochs)
    batch_size: int = 32
    lr: float = 0.1
    adamw_lr: float = 3e-3
    adamw_weight_decay: float = 0.01  # torch's default; --weight-decay is the other methods' L2
    window_size: int = 100
    # K: ZENITH's warmup_steps, and a linear warmup over the same K steps for every other method
    # but `sgd` (the constant rate without warmup, to show what the warmup alone buys).
    warmup_steps: int = 0
    weight_decay: float = 0.0
    device: str = "cpu"
    backend: str = "auto"


def depends_on(method: str, parameter: str) -> bool:
    """Whether ``method``'s run changes with ``parameter`` (``"lr"`` or ``"window_size"``)."""
    return method in _DEPENDS[parameter]


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


def lr_free_install_hint(methods) -> str:
    """The pip command that installs the packages of the learning-rate-free ``methods``."""
    packages = [package for name, _, _, package in LR_FREE if name in methods]
    return f"pip install {' '.join(packages)}"


def default_methods() -> tuple[list[str], dict[str, str]]:
    """(methods to run, {skipped method: why}): the base four plus the first LR-free one found."""
    available = lr_free_available()
    if available:
        return list(BASE_METHODS) + available[:1], {}
    packages = " nor ".join(pkg for *_, pkg in LR_FREE)
    return list(BASE_METHODS), {
        "lr-free": f"neither {packages} is installed ({lr_free_install_hint([name for name, *_ in LR_FREE[:1]])})"
    }


def warmup_cosine(warmup: int, total: int):
    """The multiplier of ``LambdaLR`` at each step: linear from 1/warmup to 1, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def linear_warmup(warmup: int):
    """The multiplier of ``LambdaLR`` at each step: ``t / warmup`` at step ``t = 1 .. warmup``
    (ZENITH's warmup), then 1."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    return factor


class PlateauAfterWarmup(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """``ReduceLROnPlateau`` after a linear warmup over ``warmup`` steps.

    :meth:`warmup_step`, after every optimizer step, sets the rate of the next step as
    :func:`linear_warmup` does; :meth:`step` (the evaluations) counts only once the warmup is over,
    so a reduction never lands inside the ramp.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, **kwargs) -> None:
        self.warmup = warmup
        self.steps_taken = 0
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        self._set_warmup_lrs(optimizer)
        super().__init__(optimizer, **kwargs)

    def _set_warmup_lrs(self, optimizer: torch.optim.Optimizer) -> None:
        factor = linear_warmup(self.warmup)(self.steps_taken)
        for group, peak in zip(optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor

    def warmup_step(self) -> None:
        if self.steps_taken < self.warmup:
            self.steps_taken += 1
            self._set_warmup_lrs(self.optimizer)

    def step(self, metrics, epoch=None) -> None:  # type: ignore[override]
        if self.steps_taken >= self.warmup:
            super().step(metrics, epoch)


def make_optimizer(method: str, params, cfg: TrainConfig, total_steps: int):
    """(optimizer, scheduler or None) for ``method``.

    Every scheduler but ``ReduceLROnPlateau`` (stepped on the validation loss at each evaluation)
    is stepped after every optimizer step; :class:`PlateauAfterWarmup` is stepped at both.
    With ``cfg.warmup_steps = K > 0`` ZENITH gets ``warmup_steps=K`` and every other method but
    ``sgd`` a linear warmup over the same K steps: AdamW's replaces its 5 %, cosine decays over the
    steps after K, the plateau rule starts after K.
    """
    params = list(params)
    warmup = cfg.warmup_steps
    if method == "zenith":
        # K = 0 is the optimizer's default; passing it only when set keeps releases before the
        # option usable for every other run.
        extra = {"warmup_steps": warmup} if warmup else {}
        return ZenithFused(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           window_size=cfg.window_size, backend=cfg.backend, **extra), None
    if method in ("sgd", "sgd-cosine", "sgd-plateau", WARMUP_CONSTANT):
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay)
        if method == "sgd-cosine":
            if warmup:
                return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps))
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if method == "sgd-plateau":
            if warmup:
                return opt, PlateauAfterWarmup(opt, warmup, **PLATEAU)
            return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **PLATEAU)
        if method == WARMUP_CONSTANT:
            if not warmup:
                raise ValueError(f"method {WARMUP_CONSTANT!r} needs warmup_steps > 0 (without, it is 'sgd')")
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(warmup))
        return opt, None
    if method == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.adamw_lr, weight_decay=cfg.adamw_weight_decay)
        if not warmup:
            warmup = max(1, round(ADAMW_WARMUP_FRACTION * total_steps))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps))
    for name, module, cls, package in LR_FREE:
        if method == name:
            if name not in lr_free_available():
                raise RuntimeError(f"method {name!r} needs {package}: {lr_free_install_hint([name])}")
            optimizer_cls = getattr(importlib.import_module(module), cls)
            # Both are used as their authors recommend: lr=1 (a multiplier on the estimated step).
            # Prodigy's weight decay is decoupled (AdamW-style), the others' is L2 in the gradient.
            kwargs = dict(lr=1.0, weight_decay=cfg.weight_decay)
            if name == "dadapt-sgd":
                kwargs["momentum"] = SGD_MOMENTUM
            if not warmup:
                return optimizer_cls(params, **kwargs), None
            if name == "prodigy":
                kwargs["safeguard_warmup"] = True  # what Prodigy's authors advise with a warmup
            opt = optimizer_cls(params, **kwargs)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(warmup))
    raise ValueError(f"Unknown method: {method!r}; expected one of {METHODS}")


def host_lr(method: str, opt: torch.optim.Optimizer) -> float:
    """The learning rate of the step just taken, from host values only (no device read).

    ZENITH's is this times its ``lr_scale`` tensor, logged separately; the LR-free optimizers keep
    their estimate ``d`` as a Python float, and step with ``d * lr``.
    """
    group = opt.param_groups[0]
    if method in ("prodigy", "dadapt-sgd"):
        return float(group["d"]) * float(group["lr"])
    return float(group["lr"])
