"""Parameter sets shaped like real models, written out so the benchmark needs no model library.

Each set is a list of tensor shapes in the order ``model.named_parameters()`` yields them.
"""
from __future__ import annotations

import math

# torchvision's resnet50(): conv1, bn1, then 16 bottlenecks (conv1/bn1, conv2/bn2, conv3/bn3,
# and on each stage's first block a downsample conv/bn), then fc. 161 tensors, 25,557,032 values.
RESNET50 = [
    (64, 3, 7, 7), (64,), (64,), (64, 64, 1, 1), (64,), (64,), (64, 64, 3, 3), (64,), (64,),
    (256, 64, 1, 1), (256,), (256,), (256, 64, 1, 1), (256,), (256,), (64, 256, 1, 1), (64,),
    (64,), (64, 64, 3, 3), (64,), (64,), (256, 64, 1, 1), (256,), (256,), (64, 256, 1, 1), (64,),
    (64,), (64, 64, 3, 3), (64,), (64,), (256, 64, 1, 1), (256,), (256,), (128, 256, 1, 1), (128,),
    (128,), (128, 128, 3, 3), (128,), (128,), (512, 128, 1, 1), (512,), (512,), (512, 256, 1, 1),
    (512,), (512,), (128, 512, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
    (512, 128, 1, 1), (512,), (512,), (128, 512, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,),
    (128,), (512, 128, 1, 1), (512,), (512,), (128, 512, 1, 1), (128,), (128,), (128, 128, 3, 3),
    (128,), (128,), (512, 128, 1, 1), (512,), (512,), (256, 512, 1, 1), (256,), (256,),
    (256, 256, 3, 3), (256,), (256,), (1024, 256, 1, 1), (1024,), (1024,), (1024, 512, 1, 1),
    (1024,), (1024,), (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
    (1024, 256, 1, 1), (1024,), (1024,), (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3),
    (256,), (256,), (1024, 256, 1, 1), (1024,), (1024,), (256, 1024, 1, 1), (256,), (256,),
    (256, 256, 3, 3), (256,), (256,), (1024, 256, 1, 1), (1024,), (1024,), (256, 1024, 1, 1),
    (256,), (256,), (256, 256, 3, 3), (256,), (256,), (1024, 256, 1, 1), (1024,), (1024,),
    (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,), (1024, 256, 1, 1),
    (1024,), (1024,), (512, 1024, 1, 1), (512,), (512,), (512, 512, 3, 3), (512,), (512,),
    (2048, 512, 1, 1), (2048,), (2048,), (2048, 1024, 1, 1), (2048,), (2048,), (512, 2048, 1, 1),
    (512,), (512,), (512, 512, 3, 3), (512,), (512,), (2048, 512, 1, 1), (2048,), (2048,),
    (512, 2048, 1, 1), (512,), (512,), (512, 512, 3, 3), (512,), (512,), (2048, 512, 1, 1),
    (2048,), (2048,), (1000, 2048), (1000,),
]


def gpt2_shapes(vocab: int, context: int, width: int, layers: int) -> list[tuple[int, ...]]:
    """Hugging Face GPT2LMHeadModel's parameters (the LM head is tied to the token embedding)."""
    block = [
        (width,), (width,),  # ln_1
        (width, 3 * width), (3 * width,),  # attn.c_attn (Conv1D: in x out)
        (width, width), (width,),  # attn.c_proj
        (width,), (width,),  # ln_2
        (width, 4 * width), (4 * width,),  # mlp.c_fc
        (4 * width, width), (width,),  # mlp.c_proj
    ]
    return [(vocab, width), (context, width)] + block * layers + [(width,), (width,)]


# GPT-2 small: 148 tensors, 124,439,808 values.
GPT2_SMALL = gpt2_shapes(vocab=50257, context=1024, width=768, layers=12)
# GPT-3 XL / GPT-Neo 1.3B widths in GPT-2's layout: 292 tensors, 1,315,723,264 values.
GPT_1_3B = gpt2_shapes(vocab=50257, context=2048, width=2048, layers=24)

# name -> (shapes, which devices it is meant for)
PARAM_SETS: dict[str, tuple[list[tuple[int, ...]], tuple[str, ...]]] = {
    "resnet50": (RESNET50, ("cpu", "cuda")),
    "gpt2-small": (GPT2_SMALL, ("cpu", "cuda")),
    "gpt-1.3b": (GPT_1_3B, ("cuda",)),
    "2000x64": ([(64,)] * 2000, ("cpu", "cuda")),
    # --quick: the stem and first stage of ResNet-50 (33 tensors), and many tiny tensors.
    "resnet50-layer1": (RESNET50[:33], ("cpu", "cuda")),
    "500x64": ([(64,)] * 500, ("cpu", "cuda")),
}
FULL_SETS = ("resnet50", "2000x64", "gpt2-small", "gpt-1.3b")
QUICK_SETS = ("resnet50-layer1", "500x64")


def numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)
