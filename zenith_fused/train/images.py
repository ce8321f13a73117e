"""Image classification: a small CNN on digits, MNIST or CIFAR-10 (see :mod:`.data`)."""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Splits

__all__ = ["SmallConvNet", "ImageTask", "evaluate"]

EVAL_BATCH = 1024


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


class ImageTask:
    """``epochs`` passes over the training images in ``batch_size`` batches, evaluated after each
    epoch on the whole validation and test splits."""

    metric = "final_test_accuracy"
    higher_is_better = True

    def __init__(self, splits: Splits, *, epochs: int, batch_size: int, device: str | torch.device) -> None:
        self.name = splits.name
        self.splits = splits.to(device)
        self.batch_size = batch_size
        self.steps_per_epoch = math.ceil(len(splits.y_train) / batch_size)
        self.total_steps = self.steps_per_epoch * epochs
        self.eval_after = tuple(self.steps_per_epoch * e for e in range(1, epochs + 1))

    def init_model(self) -> nn.Module:
        return SmallConvNet(self.splits.in_channels, self.splits.num_classes)

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        s = self.splits
        n_train = len(s.y_train)
        order = torch.Generator().manual_seed(seed)  # the data order: identical for every method
        for _ in range(self.total_steps // self.steps_per_epoch):
            perm = torch.randperm(n_train, generator=order).to(s.x_train.device)
            for first in range(0, n_train, self.batch_size):
                idx = perm[first:first + self.batch_size]
                yield s.x_train[idx], s.y_train[idx]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        s = self.splits
        test_loss, test_acc = evaluate(model, s.x_test, s.y_test)
        val_loss, _ = evaluate(model, s.x_val, s.y_val)
        return {"test_loss": test_loss, "test_accuracy": test_acc, "val_loss": val_loss}

    def final_evaluation(self, model: nn.Module) -> dict[str, float]:
        return {}  # the last epoch's evaluation is the final one

    def final_fields(self, evals: dict[str, list], final: dict[str, float]) -> dict[str, Any]:
        accs = evals["test_accuracy"][1:]
        best = max(range(len(accs)), key=lambda i: accs[i])  # the first epoch reaching the best
        return {"steps_per_epoch": self.steps_per_epoch, "final_test_accuracy": accs[-1],
                "best_test_accuracy": accs[best], "best_epoch": best + 1,
                "final_test_loss": evals["test_loss"][-1]}

    def describe(self) -> dict[str, Any]:
        """What the JSON's ``dataset`` entry holds."""
        return {"name": self.name, **self.splits.sizes(), "fingerprint": self.splits.fingerprint()}
