"""MNIST-1D: ten digit-like 1-D templates, padded, scaled, translated, sheared and noised into
signals of 40 values (Greydanus & Steinbach, https://github.com/greydanus/mnist1d).

The data are generated here by the ``mnist1d`` package's ``make_dataset`` from its built-in
templates (``get_templates``) with the paper's generation settings (``get_dataset_args``): its
download path is never used. Generation is seeded by those settings (seed 42), not by the
training seed, and so is the split: the generator's own train/test split (the first
``train_split`` of its shuffled samples train), then a stratified validation split carved from
the training samples with :data:`~zenith_fused.train.data.SPLIT_SEED`.

``make_dataset`` seeds numpy's and Python's global generators; they are restored afterwards, so
generating the data changes nothing else in the process. The arrays are cached in
``--data-dir`` or ``$XDG_CACHE_HOME/zenith-fused`` (``~/.cache/zenith-fused``), under a name
that hashes the settings and the package version.

The model (:class:`Conv1dNet`) has the layer shapes of the paper's CNN.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import NUM_CLASSES, Splits, fixed_split
from .images import ImageTask

__all__ = ["NUM_SAMPLES", "generation_args", "generate", "load_mnist1d", "Conv1dNet", "Mnist1dTask",
           "cache_dir"]

# 4000 training and 1000 test signals, the paper's size (get_dataset_args' num_samples).
NUM_SAMPLES = 5000


def generation_args(num_samples: int = NUM_SAMPLES) -> dict[str, Any]:
    """The paper's generation settings (``mnist1d.data.get_dataset_args``), ``num_samples`` apart;
    the download URL is dropped: nothing here downloads."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    args["num_samples"] = num_samples
    return args


def cache_dir(data_dir: str | Path | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zenith-fused"


def _cache_name(args: dict[str, Any]) -> str:
    from importlib.metadata import version

    key = json.dumps({"args": args, "mnist1d": version("mnist1d")}, sort_keys=True)
    return f"mnist1d-{args['num_samples']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def generate(num_samples: int = NUM_SAMPLES, data_dir: str | Path | None = None, *,
             use_cache: bool = True) -> dict[str, np.ndarray]:
    """``{"x", "y", "x_test", "y_test"}``: ``make_dataset`` with the paper's settings, from the
    package's templates, read from the cache when it is there."""
    from mnist1d.data import get_templates, make_dataset
    from mnist1d.utils import ObjectView

    args = generation_args(num_samples)
    path = cache_dir(data_dir) / _cache_name(args)
    keys = ("x", "y", "x_test", "y_test")
    if use_cache and path.is_file():
        with np.load(path) as cached:
            return {k: cached[k] for k in keys}
    saved_numpy, saved_python = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(ObjectView(dict(args)), template=get_templates())
    finally:
        np.random.set_state(saved_numpy)
        random.setstate(saved_python)
    arrays = {k: np.asarray(made[k]) for k in keys}
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)  # atomic: parallel runs never read half a file
        except OSError:
            pass  # a read-only cache folder costs a regeneration, nothing else
    return arrays


def load_mnist1d(data_dir: str | Path | None = None, *, num_samples: int = NUM_SAMPLES,
                 max_train: int | None = None, max_test: int | None = None,
                 use_cache: bool = True) -> Splits:
    """MNIST-1D as :class:`~zenith_fused.train.data.Splits` of shape ``[N, 1, 40]``, normalised
    with the training split's mean and std. ``max_train`` / ``max_test`` keep a fixed subset."""
    arrays = generate(num_samples, data_dir, use_cache=use_cache)
    x_train, y_train = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    x_test, y_test = arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64)
    x_train, y_train, x_val, y_val, x_test, y_test = fixed_split(x_train, y_train, x_test, y_test,
                                                                 max_train, max_test)
    mean, std = x_train.mean(), x_train.std() + 1e-6

    def signals(a: np.ndarray) -> Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32)[:, None, :])

    return Splits(name="mnist1d", x_train=signals(x_train), y_train=torch.from_numpy(y_train),
                  x_val=signals(x_val), y_val=torch.from_numpy(y_val), x_test=signals(x_test),
                  y_test=torch.from_numpy(y_test), num_classes=NUM_CLASSES)


class Conv1dNet(nn.Module):
    """The layer shapes of the MNIST-1D paper's CNN: three 1-D convolutions of ``channels``
    channels with stride 2 (kernel 5, then 3 and 3, padding 1) and ReLU, flattened into a linear
    head. A 40-value signal leaves the convolutions as 5 positions (5,210 parameters with 25
    channels)."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, length: int = 40, channels: int = 25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        for kernel in (5, 3, 3):  # the length after each strided convolution
            length = (length + 2 - kernel) // 2 + 1
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Mnist1dTask(ImageTask):
    """:class:`~zenith_fused.train.images.ImageTask` with :class:`Conv1dNet`: epochs of batches,
    evaluated after each epoch on the whole validation and test splits."""

    def __init__(self, splits: Splits, *, epochs: int, batch_size: int, device: str | torch.device,
                 num_samples: int = NUM_SAMPLES) -> None:
        super().__init__(splits, epochs=epochs, batch_size=batch_size, device=device)
        self.num_samples = num_samples

    def init_model(self) -> nn.Module:
        return Conv1dNet(self.splits.num_classes, length=self.splits.x_train.shape[-1])

    def describe(self) -> dict[str, Any]:
        """What the JSON's ``dataset`` entry holds: the sizes, the generation settings, the model."""
        parameters = sum(p.numel() for p in self.init_model().parameters())
        return {**super().describe(), "generation": generation_args(self.num_samples),
                "model": {"name": "Conv1dNet", "parameters": parameters}}
