"""The device-side table of tensors that lets one launch walk many tensors.

Every multi-tensor kernel here takes the same two int64 tables, built once on the host, copied to
the device, and reused while the tensors stay where they are:

* ``tensors`` ``[N, 6]``: per tensor, the addresses of the parameter, gradient, momentum buffer
  and momentum step counter, its element count, and the slot of its hyper-parameters.
* ``chunks`` ``[C, 2]``: per program, the tensor it works on and the first element of its chunk.
  Each tensor is cut into ``max(1, ceil(numel / chunk_size))`` chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import triton.language as tl
from torch import Tensor

# Column numbers of ``tensors``; constexpr so the kernels can read them as constants.
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
MOMENTUM_BUFFER = tl.constexpr(2)
MOMENTUM_STEP = tl.constexpr(3)
NUMEL = tl.constexpr(4)
HYPERPARAM_SLOT = tl.constexpr(5)
TENSOR_COLUMNS = tl.constexpr(6)


@dataclass
class TensorTable:
    tensors: Tensor  # int64 [N, TENSOR_COLUMNS] on the device
    chunks: Tensor  # int64 [C, 2] on the device
    num_chunks: int
    chunk_size: int
    key: tuple  # what the table was built from; equal key means the table is still valid


def table_key(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    momentum_steps: Sequence[Tensor | None],
    hyperparam_slots: Sequence[int],
    chunk_size: int,
) -> tuple:
    """Everything the table depends on, read from tensor metadata only (no device access)."""
    return (
        chunk_size,
        tuple(p.data_ptr() for p in params),
        tuple(g.data_ptr() for g in grads),
        tuple(0 if b is None else b.data_ptr() for b in momentum_buffers),
        tuple(0 if s is None else s.data_ptr() for s in momentum_steps),
        tuple(p.numel() for p in params),
        tuple(hyperparam_slots),
    )


def build_tensor_table(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    momentum_steps: Sequence[Tensor | None],
    hyperparam_slots: Sequence[int],
    *,
    chunk_size: int,
    placeholder_step: Tensor,
    upload: Callable[[Tensor, torch.device], Tensor],
) -> TensorTable:
    """Build the table for one (device, dtype) group.

    A tensor without a momentum buffer gets its own parameter as a stand-in buffer address and
    ``placeholder_step`` as its step counter: the kernels never touch either (masked by
    ``momentum == 0``), but every address in the table stays valid. ``upload(host, device)``
    copies the host-built tables to the device without making the host wait.
    """
    device = params[0].device if params else placeholder_step.device
    key = table_key(params, grads, momentum_buffers, momentum_steps, hyperparam_slots, chunk_size)
    rows = []
    chunk_rows = []
    for index, (p, g, buf, buf_step, slot) in enumerate(
        zip(params, grads, momentum_buffers, momentum_steps, hyperparam_slots)
    ):
        numel = p.numel()
        rows.append(
            (
                p.data_ptr(),
                g.data_ptr(),
                p.data_ptr() if buf is None else buf.data_ptr(),
                placeholder_step.data_ptr() if buf_step is None else buf_step.data_ptr(),
                numel,
                slot,
            )
        )
        # An empty tensor still gets one (fully masked) chunk, so its momentum step is recorded.
        chunk_rows.extend((index, start) for start in range(0, max(numel, 1), chunk_size))
    host_tensors = torch.tensor(rows, dtype=torch.int64).reshape(-1, TENSOR_COLUMNS.value)
    host_chunks = torch.tensor(chunk_rows, dtype=torch.int64).reshape(-1, 2)
    return TensorTable(
        tensors=upload(host_tensors, device),
        chunks=upload(host_chunks, device),
        num_chunks=len(chunk_rows),
        chunk_size=chunk_size,
        key=key,
    )
