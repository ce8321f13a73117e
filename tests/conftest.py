import os

import pytest
import torch

# Triton compiles for a GPU when there is one; elsewhere its interpreter runs the same kernels on
# CPU tensors. It reads the variable when kernels are decorated, so set it before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink the fused kernels' chunks so small test tensors span several chunks and blocks."""
    from zenith_fused._engines import resolve_backend
    from zenith_fused._triton_engine import TritonEngine

    monkeypatch.setattr(TritonEngine, "chunk_elements", 256)
    try:
        resolve_backend("cpu", torch.device("cpu"))
    except RuntimeError:
        return
    from zenith_fused._compiled_engines import CpuEngine

    monkeypatch.setattr(CpuEngine, "chunk_elements", 256)
