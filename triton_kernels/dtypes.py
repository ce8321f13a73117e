"""Storage dtypes the kernels support, and the one rounding rule for every store."""
from __future__ import annotations

import torch
import triton
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


def triton_compute_dtype(dtype: torch.dtype):
    """``zenith_fused.reference.compute_dtype`` as a Triton dtype: float64 stays, the rest is float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """``x`` (float32, or float64 for a float64 ``DTYPE``) rounded to ``DTYPE`` to nearest-even.

    float16: the conversion itself rounds to nearest-even on a GPU (``cvt.rn.f16.f32``) and in the
    interpreter (numpy). bfloat16: Triton's CPU interpreter (3.6 and 3.7) truncates float32 ->
    bfloat16 whatever ``fp_downcast_rounding`` says, so the rounding is written out in integer
    arithmetic, as torch's ``c10::BFloat16`` does: add 0x7FFF plus the lowest kept bit, keep the
    high half. The same instructions then run on a GPU and in the interpreter, and give torch's
    bits for every non-NaN value (a carry into the exponent rounds up to the next binade or to inf,
    as it should). NaN becomes the quiet NaN 0x7FC0; torch's payload may differ.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE, fp_downcast_rounding="rtne")
