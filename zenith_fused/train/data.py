"""Offline image-classification data for the training command: nothing here downloads.

* ``digits``: the 8x8 handwritten digits that ship inside scikit-learn (1797 images).
* ``mnist``: the standard idx files (``train-images-idx3-ubyte`` ... , optionally ``.gz``) in a
  folder the user already has.
* ``cifar10``: the CIFAR-10 "python version" pickle batches (``data_batch_1..5``, ``test_batch``)
  in a folder the user already has.

Every loader returns float32 images ``[N, C, H, W]`` normalised with the training split's
per-channel mean and std, and int64 labels; the train/validation/test split never depends on the
training seed, so every method and every seed sees the same held-out images.
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "Splits", "load_dataset", "read_idx", "read_cifar10_batch"]

DATASETS = ("digits", "mnist", "cifar10")

# The split is a property of the dataset, not of the run: fixed, whatever --seeds says.
SPLIT_SEED = 20261129
DIGITS_TEST_SIZE = 360
VAL_FRACTION = 0.1
NUM_CLASSES = 10  # all three datasets

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Splits:
    """Normalised train / validation / test tensors of one dataset."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    def to(self, device: torch.device | str) -> "Splits":
        moved = {k: getattr(self, k).to(device) for k in
                 ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return Splits(name=self.name, num_classes=self.num_classes, **moved)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def fingerprint(self) -> str:
        """A digest of every split's images and labels: equal exactly when the splits are."""
        digest = hashlib.sha256()
        for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            digest.update(getattr(self, key).cpu().contiguous().numpy().tobytes())  # sync-ok: data loading, not a step
        return digest.hexdigest()[:16]


def load_dataset(name: str, data_dir: str | Path | None = None, *,
                 max_train: int | None = None, max_test: int | None = None) -> Splits:
    """Load ``name`` (one of :data:`DATASETS`) from scikit-learn or from ``data_dir``.

    ``max_train`` / ``max_test`` keep a fixed random subset (``--quick`` uses them to make MNIST
    and CIFAR-10 smoke runs short); the validation split is carved from the kept training images.
    """
    if name == "digits":
        x, y = _digits()
        x_train, y_train, x_test, y_test = _stratified_split(x, y, DIGITS_TEST_SIZE)
    elif name in ("mnist", "cifar10"):
        if data_dir is None:
            raise ValueError(f"--dataset {name} reads files already on disk: pass --data-dir PATH")
        reader = _mnist if name == "mnist" else _cifar10
        x_train, y_train, x_test, y_test = reader(Path(data_dir))
    else:
        raise ValueError(f"Unknown dataset: {name!r}; expected one of {DATASETS}")

    x_train, y_train, x_val, y_val, x_test, y_test = fixed_split(x_train, y_train, x_test, y_test,
                                                                 max_train, max_test)

    x_train = x_train.astype(np.float32)
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6

    def norm(a: np.ndarray) -> Tensor:
        return torch.from_numpy(((a.astype(np.float32) - mean) / std).astype(np.float32))

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    for split, y in (("train", y_train), ("test", y_test)):
        if y.min() < 0 or y.max() >= NUM_CLASSES:
            raise ValueError(f"{name} {split} labels span [{y.min()}, {y.max()}], expected 0..{NUM_CLASSES - 1}")
    return Splits(name=name, x_train=norm(x_train), y_train=labels(y_train), x_val=norm(x_val),
                  y_val=labels(y_val), x_test=norm(x_test), y_test=labels(y_test),
                  num_classes=NUM_CLASSES)


def fixed_split(x_train, y_train, x_test, y_test, max_train: int | None, max_test: int | None) -> tuple:
    """``(x_train, y_train, x_val, y_val, x_test, y_test)``: fixed subsets of at most ``max_train``
    / ``max_test`` examples, then a stratified validation split held out of training; the same for
    every seed of a run (``SPLIT_SEED``)."""
    rng = np.random.default_rng(SPLIT_SEED)
    if max_train is not None and len(y_train) > max_train:
        keep = np.sort(rng.permutation(len(y_train))[:max_train])
        x_train, y_train = x_train[keep], y_train[keep]
    if max_test is not None and len(y_test) > max_test:
        keep = np.sort(rng.permutation(len(y_test))[:max_test])
        x_test, y_test = x_test[keep], y_test[keep]
    n_val = max(1, int(round(VAL_FRACTION * len(y_train))))
    x_train, y_train, x_val, y_val = _stratified_split(x_train, y_train, n_val)
    return x_train, y_train, x_val, y_val, x_test, y_test


def _stratified_split(x: np.ndarray, y: np.ndarray, n_held: int):
    """(x_kept, y_kept, x_held, y_held) with ``n_held`` held out in the class proportions."""
    from sklearn.model_selection import train_test_split

    x_keep, x_held, y_keep, y_held = train_test_split(
        x, y, test_size=n_held, random_state=SPLIT_SEED, stratify=_stratify_or_none(y, n_held)
    )
    return x_keep, y_keep, x_held, y_held


def _stratify_or_none(y: np.ndarray, n_held: int) -> np.ndarray | None:
    # Tiny test files can have a class with one image, which stratification refuses.
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if counts.min() < 2 or n_held < len(counts) or len(y) - n_held < len(counts):
        return None
    return y


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32)[:, None, :, :], digits.target.astype(np.int64)


# ---------------------------------------------------------------------------------------- MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (plain or ``.gz``): the format of the MNIST distribution files."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape}, {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(data_dir: Path, name: str, subdirs: tuple[str, ...]) -> Path:
    tried = []
    for sub in subdirs:
        for candidate in (name, name + ".gz"):
            path = data_dir / sub / candidate
            tried.append(str(path))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{name} not found; looked for: {', '.join(tried)}")


def _mnist(data_dir: Path):
    # torchvision keeps the same files under MNIST/raw.
    subdirs = (".", "MNIST/raw", "raw")
    arrays = {key: read_idx(_find(data_dir, fname, subdirs)) for key, fname in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
    return (arrays["train_images"][:, None].astype(np.float32), arrays["train_labels"].astype(np.int64),
            arrays["test_images"][:, None].astype(np.float32), arrays["test_labels"].astype(np.int64))


# ------------------------------------------------------------------------------------- CIFAR-10
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; allow only what they contain (numpy arrays, builtins), so a
    planted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which a data batch never needs")


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]``."""
    path = Path(path)
    with open(path, "rb") as f:
        batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: keys {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: data {data.shape} and {len(labels)} labels are not CIFAR-10's layout")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10(data_dir: Path):
    subdirs = (".", "cifar-10-batches-py")

    def find(name: str) -> Path:
        for sub in subdirs:
            if (data_dir / sub / name).is_file():
                return data_dir / sub / name
        raise FileNotFoundError(f"{name} not found under {data_dir} or {data_dir / subdirs[1]}")

    train = [read_cifar10_batch(find(name)) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = read_cifar10_batch(find(CIFAR10_TEST_BATCH))
    x_train = np.concatenate([x for x, _ in train]).astype(np.float32)
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test.astype(np.float32), y_test
