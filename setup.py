import importlib.util
import os
import shutil
import sys
import time
import warnings

from setuptools import setup


def _load_extension_config():
    """csrc/extension.py, read by path: importing the package would need torch."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "extension.py")
    spec = importlib.util.spec_from_file_location("zenith_fused_extension_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_build():
    """(ext_modules, cmdclass) for ``zenith_fused._C``, or ([], {}) where it cannot be built.

    ZENITH_FUSED_BUILD_EXT: "0" never builds the extension; "1" requires it (a failure stops the
    install); unset builds it when torch imports and the compiler works, and otherwise installs the
    package without it (the optimizer then runs through the reference or Triton). The CUDA kernels
    are added when torch has CUDA and nvcc is found (torch's CUDA_HOME).
    """
    config = _load_extension_config()
    mode = os.environ.get(config.BUILD_ENV, "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"{config.BUILD_ENV} must be 0, 1 or unset; got {mode!r}")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if mode == "1":
            raise RuntimeError(
                f"{config.BUILD_ENV}=1 but torch cannot be imported at build time ({exc}); install "
                "torch first and build with `pip install --no-build-isolation -e .`"
            ) from exc
        warnings.warn(f"zenith_fused: building without the compiled kernels: torch not importable ({exc})")
        return [], {}

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None
        or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = make(
        name="zenith_fused._C",
        sources=config.sources(with_cuda, absolute=False),
        extra_compile_args={"cxx": config.cxx_flags(), "nvcc": config.nvcc_flags()},
        extra_link_args=config.link_flags(),
    )

    what = "C++ CPU and CUDA kernels" if with_cuda else "C++ CPU kernels"

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's ninja build, in a folder kept between installs; where the extension is optional a
        failed build is a warning."""

        def build_extensions(self):
            # setuptools builds an editable install in a new temporary folder each time, so ninja
            # would recompile every object of unchanged sources; a folder of the checkout lets it
            # skip them (ninja's depfiles still catch a changed header, torch's included).
            self.build_temp = _persistent_build_temp(torch.__version__)
            # pip shows this only with -v (it hides a build's output): the README says what pip prints.
            print(f"zenith-fused: building zenith_fused._C, the {what} (a first build compiles for 1-3 "
                  f"minutes on 2 cores; a reinstall of unchanged sources reuses the objects in {self.build_temp})",
                  file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                super().build_extensions()
                print(f"zenith-fused: built zenith_fused._C in {time.monotonic() - started:.0f} s",
                      file=sys.stderr, flush=True)
            except Exception as exc:  # compiler missing or failing: setuptools and ninja errors
                if mode == "1":
                    raise
                warnings.warn(
                    f"zenith_fused: building without the compiled kernels: {type(exc).__name__}: {exc}; "
                    f"set {config.BUILD_ENV}=1 to make this an error"
                )
                # Nothing to copy into the source tree or the wheel.
                self.extensions = []

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _persistent_build_temp(torch_version: str) -> str:
    """build/ of the checkout, one folder per Python and torch (objects built against other headers
    are never mixed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    tag = f"{sys.implementation.cache_tag}-torch{torch_version.replace('+', '-')}"
    return os.path.join(here, "build", f"zenith-fused-ext-{tag}")


ext_modules, cmdclass = extension_build()

# matplotlib 3.7: legends placed outside the panels (loc="outside ...").
_TRAIN = ["numpy", "scikit-learn>=1.0", "matplotlib>=3.7", "tqdm>=4.60", "mnist1d==0.0.2.post1"]
# The Triton releases the tests and bench/kernel_report.py have run (3.6 with torch 2.11, 3.7 with
# torch 2.13); its CPU interpreter (TRITON_INTERPRET=1, the tests without a GPU) imports numpy.
_TRITON = ["triton>=3.6,<3.8", "numpy"]

setup(
    name="zenith-fused",
    version="0.1.0",
    description="ZENITH: momentum SGD scaled by its gradient-norm history, as fused multi-tensor kernels",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["zenith_fused", "zenith_fused.train", "zenith_fused.triton_kernels", "zenith_fused.csrc"],
    # The top-level triton_kernels/ folder installs under our namespace: a bare
    # ``triton_kernels`` module already belongs to other projects. The C++/CUDA sources ship too,
    # as zenith_fused/csrc/, so that an install built without the extension (pip's default
    # isolated build has no torch to build against) compiles it on first use.
    package_dir={"zenith_fused.triton_kernels": "triton_kernels", "zenith_fused.csrc": "csrc"},
    package_data={"zenith_fused.csrc": ["*.h", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cu", "cuda/*.cpp", "*.cpp"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # ninja: torch.utils.cpp_extension compiles the kernels on first use with it.
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        "triton": _TRITON,
        "train": _TRAIN,
        "train-extra": _TRAIN + ["prodigyopt>=1.1.2"],
        "test": ["pytest>=8", "pytest-xdist"] + _TRITON + _TRAIN,
    },
    entry_points={"console_scripts": ["zenith-train = zenith_fused.train:main"]},
)
