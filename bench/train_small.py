"""Train a small MLP with ZenithFused on the CPU and watch ZENITH's scale settle.

    python bench/train_small.py [--backend auto|reference|triton|cpu] [--steps 300]

The task is a fixed random "teacher" network's labels, so the script needs no data set. Every
``--every`` steps it prints the loss, the global gradient norm and the learning-rate scale; those
reads are the only host synchronisations (the optimizer itself never waits for the device).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from zenith_fused import ZenithFused


def make_task(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(n, dim, generator=gen)
        y = teacher(x).argmax(dim=1)
    return x, y


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--window-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = make_task(4096, 32, 10, args.seed)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = ZenithFused(model.parameters(), lr=args.lr, window_size=args.window_size, backend=args.backend)
    print(f"backend per (device, dtype): {opt._bucket_backends}")
    print(f"{'step':>6} {'loss':>8} {'grad_norm':>10} {'lr_scale':>9} {'eff. lr':>9}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == 1:
            scale = opt.lr_scale.item()
            print(f"{step:>6} {loss.item():>8.4f} {opt.grad_norm.item():>10.4f} {scale:>9.4f} {args.lr * scale:>9.5f}")
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"train accuracy {accuracy:.3f} after {args.steps} steps in {time.perf_counter() - start:.1f} s")
    return accuracy


if __name__ == "__main__":
    main()
