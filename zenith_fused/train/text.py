"""Byte-level language modelling on the Python standard library's own source (``stdlib-text``).

The corpus is every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except installed
packages (``site-packages``, ``dist-packages``) and the test suites (``test``, ``tests``,
``idle_test``): the first are not the standard library, the second are a large share of
repetitive fixture code. Each file goes whole to train, validation or test by a hash of its path
relative to the root, so the split is the same for every seed and every run on one interpreter.

Bytes are the tokens (256 of them) and losses are reported in bits per byte.
"""
from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextCorpus", "TextTask", "TinyTransformer", "load_text_corpus", "source_files", "split_of"]

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SPLITS = ("train", "val", "test")
# A file whose path hashes below 0.8 trains, below 0.9 validates, and the rest test.
SPLIT_BOUNDS = (0.8, 0.9)
VOCAB = 256
EVAL_BATCH = 64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: str | Path) -> list[str]:
    """The ``.py`` files under ``root`` outside :data:`EXCLUDED_DIRS`, as sorted relative POSIX paths."""
    root = Path(root)
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        found += [(rel / name).as_posix() for name in files if name.endswith(".py")]
    return sorted(found)


def split_of(relative_path: str) -> str:
    """The split of one file: a function of its relative path alone."""
    fraction = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return SPLITS[sum(fraction >= bound for bound in SPLIT_BOUNDS)]


@dataclass
class TextCorpus:
    """Each split's files concatenated in path order, as ``uint8`` tensors."""

    root: str
    train: Tensor
    val: Tensor
    test: Tensor
    files: dict[str, int]

    def sizes(self) -> dict[str, int]:
        sizes = {f"{split}_bytes": len(getattr(self, split)) for split in SPLITS}
        sizes.update({f"{split}_files": self.files[split] for split in SPLITS})
        return sizes

    def fingerprint(self) -> str:
        """A digest of the three splits' bytes: equal exactly when the splits are."""
        digest = hashlib.sha256()
        for split in SPLITS:
            digest.update(getattr(self, split).numpy().tobytes())
            digest.update(b"\0split\0")
        return digest.hexdigest()[:16]


def load_text_corpus(root: str | Path | None = None, *, min_bytes: int = 0) -> TextCorpus:
    """The split corpus under ``root`` (default: this interpreter's standard library)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"text corpus folder {root} does not exist")
    chunks: dict[str, list[bytes]] = {split: [] for split in SPLITS}
    for rel in source_files(root):
        chunks[split_of(rel)].append((root / rel).read_bytes())
    data = {split: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8) if parts else
            torch.zeros(0, dtype=torch.uint8) for split, parts in chunks.items()}
    for split in SPLITS:
        if len(data[split]) < min_bytes:
            counts = ", ".join(f"{s} {len(data[s])}" for s in SPLITS)
            raise ValueError(f"the .py files under {root} give too little text: each split needs at least "
                             f"{min_bytes} bytes, got {counts}")
    return TextCorpus(root=str(root), files={s: len(p) for s, p in chunks.items()}, **data)


# ------------------------------------------------------------------------------------------ model
class _Block(nn.Module):
    """Pre-norm causal self-attention and a 4x GELU MLP, each added to the residual stream."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_mlp(x))


class TinyTransformer(nn.Module):
    """A GPT-style causal byte model: token and learned position embeddings, ``n_layers`` blocks,
    a final layer norm and a linear head over the 256 byte values."""

    def __init__(self, *, d_model: int = 128, n_layers: int = 3, n_heads: int = 4, context: int = 128) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.tokens = nn.Embedding(VOCAB, d_model)
        self.positions = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.Sequential(*(_Block(d_model, n_heads) for _ in range(n_layers)))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        # The usual small embedding scale: N(0, 1) tokens would swamp the residual stream.
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tokens(idx) + self.positions[: idx.shape[1]]
        return self.head(self.ln_out(self.blocks(x)))


# ------------------------------------------------------------------------------------------- task
@dataclass
class TextShape:
    """How big the model, the batches and the evaluation samples are."""

    context: int = 128
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    eval_every: int = 50
    val_windows: int = 128
    test_windows: int = 512


def fixed_windows(data: Tensor, count: int, length: int) -> Tensor:
    """``count`` windows of ``length`` bytes at evenly spaced offsets: the same sample every run."""
    offsets = torch.linspace(0, len(data) - length, count).long()
    return data[offsets[:, None] + torch.arange(length)].long()


class TextTask:
    """``steps`` batches of ``batch_size`` random training windows (drawn from the seed),
    evaluated every ``eval_every`` steps on a fixed sample of validation windows and at the end
    on a fixed sample of test windows."""

    metric = "final_test_bpb"
    higher_is_better = False

    def __init__(self, corpus: TextCorpus, *, steps: int, batch_size: int, shape: TextShape,
                 device: str | torch.device) -> None:
        self.name = "stdlib-text"
        self.corpus = corpus
        self.shape = shape
        self.batch_size = batch_size
        self.total_steps = steps
        self.eval_after = tuple(sorted({*range(shape.eval_every, steps, shape.eval_every), steps}))
        self.device = torch.device(device)
        self.train = corpus.train.to(self.device)
        window = shape.context + 1  # inputs and their next bytes
        self.val = fixed_windows(corpus.val, shape.val_windows, window).to(self.device)
        self.test = fixed_windows(corpus.test, shape.test_windows, window).to(self.device)

    def init_model(self) -> nn.Module:
        s = self.shape
        return TinyTransformer(d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, context=s.context)

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.Generator().manual_seed(seed)  # identical for every method
        span = torch.arange(self.shape.context + 1, device=self.device)
        for _ in range(self.total_steps):
            starts = torch.randint(0, len(self.train) - self.shape.context, (self.batch_size,), generator=order)
            chunk = self.train[starts.to(self.device)[:, None] + span].long()
            yield chunk[:, :-1], chunk[:, 1:]

    @torch.no_grad()
    def _loss(self, model: nn.Module, windows: Tensor) -> float:
        """Mean cross-entropy in nats over every predicted byte of ``windows``; one host read."""
        model.eval()
        total = torch.zeros((), device=windows.device)
        for i in range(0, len(windows), EVAL_BATCH):
            chunk = windows[i:i + EVAL_BATCH]
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1), reduction="sum")
        model.train()
        return total.item() / (windows.shape[0] * (windows.shape[1] - 1))  # sync-ok: once per evaluation

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        val_loss = self._loss(model, self.val)
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}

    def final_evaluation(self, model: nn.Module) -> dict[str, float]:
        return {"test_bpb": self._loss(model, self.test) / math.log(2)}

    def final_fields(self, evals: dict[str, list], final: dict[str, float]) -> dict[str, Any]:
        val = evals["val_bpb"][1:]
        return {"final_test_bpb": final["test_bpb"], "final_val_bpb": val[-1], "best_val_bpb": min(val),
                "final_train_bpb": evals["train_loss"][-1] / math.log(2)}

    def describe(self) -> dict[str, Any]:
        """What the JSON's ``dataset`` entry holds."""
        s = self.shape
        return {"name": self.name, "root": self.corpus.root, **self.corpus.sizes(),
                "fingerprint": self.corpus.fingerprint(), "excluded_dirs": sorted(EXCLUDED_DIRS),
                "split_bounds": list(SPLIT_BOUNDS),
                "val_eval_bytes": s.val_windows * s.context, "test_eval_bytes": s.test_windows * s.context,
                "model": {"d_model": s.d_model, "n_layers": s.n_layers, "n_heads": s.n_heads,
                          "context": s.context}}
