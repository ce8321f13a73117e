"""The compiled operators of zenith_fused (``torch.ops.zenith_fused``), loaded on first use.

``setup.py`` builds them as the extension ``zenith_fused._C`` from ``csrc/`` when torch and a C++
compiler are present at install time (the CUDA kernels too when torch has CUDA and nvcc is
found). A plain ``pip install .`` builds in an isolated environment without torch, so there the
extension is missing: it is then compiled on first use from the sources the package ships
(``zenith_fused/csrc``, torch.utils.cpp_extension.load with ninja, cached by torch), with one line
on stderr when, and only when, that compiles. ``ZENITH_FUSED_BUILD_EXT=0`` turns that off; where neither works the "cpu"
and "cuda" backends report why, and ``"auto"`` uses Triton or the reference.

This module also registers the operators' fake implementations, so that they trace under
``torch.compile``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading

import torch

__all__ = ["cpu_kernels_available", "cuda_kernels_available", "unavailable_reason"]

_lock = threading.Lock()
_loaded = False
_load_error: str | None = None


def _extension_config():
    """The shipped sources' extension.py (``zenith_fused/csrc``, or the checkout's ``csrc/``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "csrc", "extension.py"), os.path.join(os.path.dirname(here), "csrc", "extension.py")]
    path = next((c for c in candidates if os.path.exists(c)), None)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("zenith_fused_extension_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_build() -> None:
    from torch.utils import cpp_extension

    config = _extension_config()
    if config is None:
        raise RuntimeError("the package's csrc/ sources are missing")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    _load_library(
        "zenith_fused_jit",
        config.CSRC,
        [os.path.relpath(source, config.CSRC) for source in config.sources(with_cuda, absolute=True)],
        cflags=config.cxx_flags(),
        cuda_cflags=config.nvcc_flags(),
        ldflags=config.link_flags(),
        what=f"the {'CPU and CUDA' if with_cuda else 'CPU'} kernels",
    )


# What the mirror of a source tree copies: every file a compile can read.
_SOURCE_SUFFIXES = (".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu")


def _load_library(name: str, root: str, sources: list[str], *, cflags: list[str], cuda_cflags: list[str],
                  ldflags: list[str], what: str) -> None:
    """``cpp_extension.load`` of the library ``name`` from ``sources`` (paths relative to ``root``) into
    ``torch.ops``, saying so on stderr only when it compiles.

    torch keeps the build in a folder of its cache (``TORCH_EXTENSIONS_DIR``) and runs ninja there at
    every load; ninja compiles what is older than its sources. The sources are compiled from a copy in
    that folder whose files are rewritten only when their bytes change, so a reinstall that writes
    the same sources again (new files, new times) compiles nothing either.
    """
    from torch.utils import cpp_extension

    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    mirror = os.path.join(build_dir, "sources")
    _mirror_sources(root, mirror)
    paths = [os.path.join(mirror, source) for source in sources]
    if _compile_pending(build_dir, paths, cflags):
        print(f"zenith_fused: compiling {what} (once, 1-3 minutes; torch caches the build in {build_dir})",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name,
        sources=paths,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_ldflags=ldflags,
        build_directory=build_dir,
        is_python_module=False,  # loads the library into torch.ops; no Python module needed
    )


def _mirror_sources(root: str, mirror: str) -> None:
    """Copy the source files under ``root`` to ``mirror``, writing only those whose bytes differ (each
    by an atomic rename: a concurrent compile never reads half a file)."""
    for folder, _, files in os.walk(root):
        for file in files:
            if not file.endswith(_SOURCE_SUFFIXES):
                continue
            source = os.path.join(folder, file)
            copy = os.path.join(mirror, os.path.relpath(source, root))
            with open(source, "rb") as f:
                data = f.read()
            if os.path.exists(copy):
                with open(copy, "rb") as f:
                    if f.read() == data:
                        continue
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            partial = f"{copy}.{os.getpid()}.partial"
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, copy)


def _compile_pending(build_dir: str, sources: list[str], cflags: list[str]) -> bool:
    """Whether loading from ``build_dir`` will compile: no build there yet, a build of other sources
    or flags, or one that ninja finds out of date (a dry run, ``ninja -n``, which changes nothing)."""
    ninja_file = os.path.join(build_dir, "build.ninja")
    ninja = shutil.which("ninja")
    if ninja is None or not os.path.exists(ninja_file):
        return True
    with open(ninja_file, encoding="utf-8") as f:
        recipe = f.read()
    # torch rewrites build.ninja before building; these are what it would change in it.
    if any(source not in recipe for source in sources) or any(flag not in recipe for flag in cflags):
        return True
    dry_run = subprocess.run([ninja, "-n"], cwd=build_dir, capture_output=True, text=True)
    return dry_run.returncode != 0 or "no work to do" not in dry_run.stdout


def _load() -> str | None:
    """Load the operators once; None when they are registered, else the reason they are not."""
    global _loaded, _load_error
    with _lock:
        if _loaded:
            return _load_error
        try:
            importlib.import_module("zenith_fused._C")
        except ImportError as exc:
            build = os.environ.get("ZENITH_FUSED_BUILD_EXT")
            if build != "0":
                try:
                    _jit_build()
                except Exception as jit_exc:  # compiler errors come as RuntimeError, subprocess errors
                    _load_error = (
                        f"the compiled extension zenith_fused._C is not built ({exc}), and compiling it "
                        f"on first use failed: {type(jit_exc).__name__}: {jit_exc}"
                    )
            else:
                _load_error = (
                    f"the compiled extension zenith_fused._C is not built ({exc}), and "
                    "ZENITH_FUSED_BUILD_EXT=0 turns off compiling it on first use. Reinstall with torch "
                    "importable and a C++ compiler (`pip install --no-build-isolation .`), or unset "
                    "ZENITH_FUSED_BUILD_EXT"
                )
        if _load_error is None:
            _register_fakes()
        _loaded = True
        return _load_error


def unavailable_reason(backend: str) -> str | None:
    """Why the compiled ``backend`` ("cpu" or "cuda") cannot run here, or None when it can."""
    reason = _load()
    if reason is not None:
        return reason
    if backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "zenith_fused::momentum_update", "CUDA"
    ):
        return (
            "the compiled extension was built without its CUDA kernels (at build time torch had no "
            "CUDA or nvcc was not found)"
        )
    return None


def cpu_kernels_available() -> bool:
    return unavailable_reason("cpu") is None


def cuda_kernels_available() -> bool:
    return unavailable_reason("cuda") is None


def _register_fakes() -> None:
    """The operators' fake implementations, so that they trace (torch.compile, meta tensors).

    All three only write into their arguments: the history list and ``out`` by schema, and the
    tensors a table points at by address (callers that trace ``momentum_update`` wrap it in an
    operator of their own that declares those).
    """

    @torch.library.register_fake("zenith_fused::sq_norm_partials")
    def _(tensors, chunks, dtype, chunk_size, out):
        return None

    @torch.library.register_fake("zenith_fused::update_history")
    def _(sq_norm_partials, history, grad_scale, found_inf, max_grad_norm):
        return None

    @torch.library.register_fake("zenith_fused::momentum_update")
    def _(tensors, chunks, dtype, chunk_size, has_momentum, hyperparams, lr_ptrs, lr_scale, step, step_applied,
          grad_multiplier):
        return None
