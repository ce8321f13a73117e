"""The tables one kernel launch walks: every fused backend (Triton, CUDA C++, CPU C++) reads these.

Built on the host by the step plan when the tensors change, copied once to the bucket's device, and
reused by every step while the tensors stay where they are. Their columns are defined in
:mod:`zenith_fused.layout` (the public contract the kernels read):

* ``tensors`` int64 ``[N, TENSOR_COLUMNS]``: per tensor, the addresses of the parameter, the
  gradient, the momentum buffer and the momentum step counter, its element count, the row of its
  parameter group in the hyper-parameter table, and whether all three of its streams start on a
  ``VECTOR_ALIGNMENT`` boundary (decided per tensor: one misaligned view does not make the rest
  of its bucket take the scalar path).
* ``chunks`` int64 ``[C, CHUNK_COLUMNS]``: per program (CUDA block, CPU work item), the tensor it
  works on and the first element of its chunk. Each tensor is cut into
  ``max(1, ceil(numel / chunk_size))`` chunks: an empty tensor still gets one (empty) chunk, so
  that its momentum step is recorded. The squared-norm partial of chunk ``c`` goes to slot ``c``.
* ``hyperparams`` ``[G, HYPERPARAM_COLUMNS]`` in the compute dtype: per parameter group, (lr,
  momentum, 1 - dampening, weight_decay, nesterov, maximize).
* ``lr_ptrs`` int64 ``[G]``: per group, the address of the scalar the kernels read as the group's
  ``lr``: its own ``hyperparams[g, LR]`` for a float lr (rewritten by an asynchronous copy when a
  scheduler changes it), or the user's tensor ``lr`` itself, which the kernels read at every step
  with no host work at all.

A tensor without a momentum buffer gets its own parameter as a stand-in buffer address and a
placeholder step counter: kernels never touch either (its group's momentum is 0), but every
address in the table stays valid.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .layout import ALIGNED, CHUNK_COLUMNS, GRAD, HYPERPARAM_COLUMNS, LR, TENSOR_COLUMNS, VECTOR_ALIGNMENT


@dataclass
class TensorTable:
    """The tables of one (device, dtype) bucket, on the bucket's device."""

    tensors: Tensor  # int64 [N, TENSOR_COLUMNS]
    chunks: Tensor  # int64 [C, CHUNK_COLUMNS]
    num_tensors: int
    num_chunks: int
    chunk_size: int
    has_momentum: bool  # some tensor has a momentum buffer
    host_tensors: Tensor  # the host copy of ``tensors``, for patching addresses
    # The stand-in step counter whose address the table holds for tensors without a buffer: kept
    # alive as long as the table is.
    placeholder_step: Tensor | None = None
    # Per tensor: its parameter and momentum buffer are aligned (the gradient's part of the
    # ALIGNED column is re-decided when gradients are replaced).
    others_aligned: list[bool] | None = None
    aligned_flags: list[bool] | None = None  # the ALIGNED column, as Python bools

    @property
    def aligned(self) -> bool:
        """Every tensor of the table takes the 128-bit path."""
        return all(self.aligned_flags)

    @property
    def any_aligned(self) -> bool:
        """Some tensor takes the 128-bit path (the kernels compile that path only then)."""
        return self._any_aligned

    def __post_init__(self) -> None:
        self._any_aligned = any(self.aligned_flags)

    def set_grads(self, grads: Sequence[Tensor]) -> None:
        """Point the table at new gradient tensors of the same sizes (after
        ``zero_grad(set_to_none=True)`` and backward): one small copy, no rebuild. Not for a
        CUDA-graph capture (a host-to-device copy): captured steps keep static gradients."""
        host = self.host_tensors
        addresses = list(map(Tensor.data_ptr, grads))
        host[:, GRAD] = torch.tensor(addresses, dtype=torch.int64)
        flags = [o and not a % VECTOR_ALIGNMENT for o, a in zip(self.others_aligned, addresses)]
        if flags != self.aligned_flags:  # rare: a gradient moved across a 16-byte boundary
            self.aligned_flags = flags
            self._any_aligned = any(flags)
            host[:, ALIGNED] = torch.tensor(flags, dtype=torch.int64)
        if self.tensors is not host:
            self.tensors.copy_(host.pin_memory(), non_blocking=True)


def upload(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without making the host wait for the device."""
    if device.type == "cpu":
        return host
    # Pinned memory makes the copy asynchronous; the caching host allocator keeps the staging
    # buffer alive until the copy has run.
    return host.pin_memory().to(device, non_blocking=True)


def build_tensor_table(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    momentum_steps: Sequence[Tensor | None],
    hyperparam_slots: Sequence[int],
    *,
    chunk_size: int,
    placeholder_step: Tensor,
) -> TensorTable:
    """The tables for one (device, dtype) bucket; the caller keeps the tensors alive (the table
    keeps ``placeholder_step``)."""
    device = placeholder_step.device
    rows = []
    chunk_rows = []
    others_aligned = []
    for index, (p, g, buf, buf_step, slot) in enumerate(
        zip(params, grads, momentum_buffers, momentum_steps, hyperparam_slots)
    ):
        numel = p.numel()
        buf_ptr = p.data_ptr() if buf is None else buf.data_ptr()
        others = (p.data_ptr() | buf_ptr) % VECTOR_ALIGNMENT == 0
        others_aligned.append(others)
        rows.append((
            p.data_ptr(),
            g.data_ptr(),
            buf_ptr,
            placeholder_step.data_ptr() if buf_step is None else buf_step.data_ptr(),
            numel,
            slot,
            int(others and g.data_ptr() % VECTOR_ALIGNMENT == 0),
        ))
        chunk_rows.extend((index, start) for start in range(0, max(numel, 1), chunk_size))
    host_tensors = torch.tensor(rows, dtype=torch.int64).reshape(-1, TENSOR_COLUMNS)
    host_chunks = torch.tensor(chunk_rows, dtype=torch.int64).reshape(-1, CHUNK_COLUMNS)
    return TensorTable(
        tensors=upload(host_tensors, device),
        chunks=upload(host_chunks, device),
        num_tensors=len(rows),
        num_chunks=len(chunk_rows),
        chunk_size=chunk_size,
        has_momentum=any(b is not None for b in momentum_buffers),
        host_tensors=host_tensors,
        others_aligned=others_aligned,
        aligned_flags=[bool(r[ALIGNED]) for r in rows],
        placeholder_step=placeholder_step,
    )


def hyperparam_table(
    rows: Sequence[Sequence[float]],
    dtype: torch.dtype,
    device: torch.device,
    lr_addresses: Mapping[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(hyperparams, lr_ptrs)`` on ``device`` for ``rows`` of (lr, momentum, 1 - dampening,
    weight_decay, nesterov, maximize), one per group. ``dtype`` is the compute dtype (float32 or
    float64). ``lr_ptrs[g]`` points at ``lr_addresses[g]`` where given (a tensor ``lr`` of that
    dtype on that device, which the caller keeps alive), else at the table's own ``[g, LR]``.
    """
    host = torch.tensor([list(r) for r in rows], dtype=dtype).reshape(-1, HYPERPARAM_COLUMNS)
    hyperparams = upload(host, device)
    lr_addresses = lr_addresses or {}
    ptrs = [lr_addresses.get(g, own) for g, own in enumerate(lr_cell_addresses(hyperparams))]
    return hyperparams, upload(torch.tensor(ptrs, dtype=torch.int64), device)


def lr_cell_addresses(hyperparams: Tensor) -> list[int]:
    """The address of every ``hyperparams[g, LR]``, in row order."""
    row_bytes = hyperparams.stride(0) * hyperparams.element_size()
    base = hyperparams.data_ptr() + LR * hyperparams.stride(1) * hyperparams.element_size()
    return [base + g * row_bytes for g in range(hyperparams.shape[0])]


def device_guard(device: torch.device):
    """Make ``device`` current for a launch, as ``at::cuda::CUDAGuard`` does in C++: Triton
    launches on the current device and its current stream, not on the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
