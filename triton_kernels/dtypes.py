from __future__ import annotations

import torch
import triton.language as tl

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}

SUPPORTED_DTYPES = tuple(_TRITON_DTYPES)


def triton_dtype(dtype: torch.dtype):
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels support {SUPPORTED_DTYPES}, got {dtype}") from None
