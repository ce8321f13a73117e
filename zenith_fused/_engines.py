"""The backends: what each one declares it runs, the one rule that chooses among them, and the
interface (:class:`Engine`) every backend implements.

Each backend is one module whose engine runs the step plan's three calls on a bucket:
``sq_norm_partials(bucket)`` (into ``bucket.partials``), ``update_history(partials, history,
inputs)`` and ``momentum_update(bucket, view)``; none of them reads a device value on the host.

=============  ============================================  ===================  ===============
backend        module                                        devices              dtypes
=============  ============================================  ===================  ===============
``reference``  :mod:`zenith_fused._reference_engine`          any                  any floating
``triton``     :mod:`zenith_fused._triton_engine`             cuda (cpu under      float32, float16,
                                                             ``TRITON_INTERPRET``) bfloat16, float64
``cpu``        :mod:`zenith_fused._compiled_engines`          cpu                  the same four
``cuda``       :mod:`zenith_fused._compiled_engines`          cuda                 the same four
=============  ============================================  ===================  ===============

The fused backends walk dense layouts only (contiguous or any dense permutation, with the
gradient's strides equal to the parameter's); under ``"auto"`` any other layout goes to the
reference, tensor by tensor. The choice is made from these declarations when a parameter group is
added, not at the first step: an explicit backend that cannot run a parameter raises then.

To add a backend: write its engine module (the three calls, plus ``chunk_size``), declare it in
``ENGINES`` below, and list it in ``AUTO_ORDER`` if ``"auto"`` should pick it. To add a dtype to a
fused backend: teach its kernels the storage type and add the dtype to its declaration.

The engine modules import nothing from this one (no import circle); this module imports each of
them only when its backend is first used, so a missing Triton or extension costs nothing.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "cpu", "cuda", "reference")
FUSED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


class Engine(Protocol):
    """What a backend's engine implements; the step plan and the traced step call nothing else."""

    name: str
    uses_table: bool  # reads the plan's tensor and hyper-parameter tables (the fused backends)

    def chunk_size(self, device: torch.device) -> int: ...

    def sq_norm_partials(self, bucket: Any) -> None: ...

    def update_history(self, sq_norm_partials: Tensor, history: list[Tensor], inputs: Any) -> None: ...

    def momentum_update(self, bucket: Any, view: Any) -> None: ...


def _triton_unavailable(device: torch.device) -> str | None:
    try:
        importlib.import_module("zenith_fused.triton_kernels")
    except Exception as exc:  # ImportError, or Triton failing to initialise
        return f"Triton could not be imported ({type(exc).__name__}: {exc})"
    return None


def _compiled_unavailable(backend: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        from . import _ext  # loads the compiled extension on first use

        return _ext.unavailable_reason(backend)

    return reason


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


@dataclass(frozen=True)
class EngineSpec:
    """One backend's declaration: where its engine lives and what it runs."""

    name: str
    module: str
    cls: str
    devices: Callable[[], tuple[str, ...]] | None  # device types; None: any
    dtypes: frozenset | None  # parameter dtypes (real: complex ones run as real views); None: any floating
    dense_only: bool  # walks storage linearly: dense layouts, gradient strides equal to the parameter's
    unavailable: Callable[[torch.device], str | None]  # why it can't run here (not built, not importable)

    def cannot_run(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run ``dtype`` parameters on ``device``, or None."""
        devices = None if self.devices is None else self.devices()
        if devices is not None and device.type not in devices:
            where = " or ".join(devices)
            hint = "" if self.name != "triton" else " (CPU tensors only under TRITON_INTERPRET=1)"
            return f"backend {self.name!r} runs on {where} tensors{hint}; got a parameter on {device}"
        if self.dtypes is not None and dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"backend {self.name!r} runs {names} parameters; got {dtype}"
        return self.unavailable(device)


ENGINES = {
    "reference": EngineSpec("reference", "zenith_fused._reference_engine", "ReferenceEngine", None, None, False,
                            lambda device: None),
    "triton": EngineSpec("triton", "zenith_fused._triton_engine", "TritonEngine", _triton_devices, FUSED_DTYPES,
                         True, _triton_unavailable),
    "cpu": EngineSpec("cpu", "zenith_fused._compiled_engines", "CpuEngine", lambda: ("cpu",), FUSED_DTYPES, True,
                      _compiled_unavailable("cpu")),
    "cuda": EngineSpec("cuda", "zenith_fused._compiled_engines", "CudaEngine", lambda: ("cuda",), FUSED_DTYPES, True,
                       _compiled_unavailable("cuda")),
}
# What "auto" tries, per device type, before the reference.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Why ``backend`` cannot run ``dtype`` tensors on ``device``, or None when it can."""
    if backend not in ENGINES:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
    return ENGINES[backend].cannot_run(device, dtype)


def auto_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[str, str | None]:
    """``"auto"``'s choice for ``dtype`` tensors on ``device``, and, when that is the reference
    although a fused backend covers the device type, why that one cannot run."""
    reason = None
    for candidate in AUTO_ORDER.get(device.type, ()):
        reason = unavailable_reason(candidate, device, dtype)
        if reason is None:
            return candidate, None
    return "reference", reason


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs ``dtype`` tensors on ``device``; raises RuntimeError if an explicit
    one can't.

    ``"auto"`` picks, in order: for CUDA tensors Triton when it imports, else the compiled "cuda"
    kernels when built; for CPU tensors the compiled "cpu" kernels when built; each only for the
    dtypes it declares. Everything else runs on the reference, with one warning per reason.
    """
    if backend == "auto":
        name, reason = auto_backend(device, dtype)
        if reason is not None:  # a device type no fused backend covers (e.g. MPS) is the reference's by design
            _warn_reference_fallback(device, dtype, reason)
        return name
    reason = unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise RuntimeError(f"ZenithFused backend {backend!r} cannot run: {reason}")
    return backend


_warned: set[str] = set()


def _warn_reference_fallback(device: torch.device, dtype: torch.dtype, reason: str) -> None:
    """One warning per reason and process: the fallback is a fact of the install, not of a step."""
    if reason in _warned:
        return
    _warned.add(reason)
    hint = ""
    if dtype in FUSED_DTYPES and device.type == "cpu":
        hint = (" Install a C++ compiler and reinstall, or let zenith_fused compile them on first use "
                "(ZENITH_FUSED_BUILD_EXT unset, with ninja and a compiler present).")
    warnings.warn(
        f"ZenithFused: no fused backend runs {dtype} parameters on {device.type} here, so they run on the "
        f"pure-PyTorch reference, 15-25x slower per step ({reason}).{hint}",
        RuntimeWarning,
        stacklevel=5,
    )


def make_engine(name: str) -> Engine:
    spec = ENGINES[name]
    return getattr(importlib.import_module(spec.module), spec.cls)()


class BackendTable:
    """The backend of each (device, dtype) of one optimizer, chosen once from the declarations,
    and one engine per backend."""

    def __init__(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
        self.requested = backend
        self.by_bucket: dict[tuple[torch.device, torch.dtype], str] = {}
        self.engines: dict[str, Engine] = {}

    def for_tensors(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend of ``dtype`` tensors on ``device`` (real dtypes: a complex parameter runs as
        its real view); chosen, and its engine made, the first time they are seen."""
        key = (device, dtype)
        name = self.by_bucket.get(key)
        if name is None:
            name = resolve_backend(self.requested, device, dtype)
            self.engine(name)  # made now, not inside a step that torch.compile may trace
            self.by_bucket[key] = name
        return name

    def engine(self, name: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None:
            engine = self.engines[name] = make_engine(name)
        return engine

    def layout_fallback(self) -> bool:
        """Whether a layout the fused kernels cannot walk goes to the reference (``"auto"``)
        rather than raising."""
        return self.requested == "auto"
