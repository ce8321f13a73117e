import importlib.util
import os
import shutil
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

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's ninja build; where the extension is optional a failed build is a warning."""

        def build_extensions(self):
            try:
                super().build_extensions()
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


ext_modules, cmdclass = extension_build()

_TRAIN = ["numpy", "scikit-learn>=1.0", "matplotlib>=3.5", "tqdm>=4.60"]

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
        "triton": ["triton>=3.0"],
        "train": _TRAIN,
        "train-extra": _TRAIN + ["prodigyopt>=1.1.2"],
        "test": ["pytest>=8", "pytest-xdist", "triton>=3.0"] + _TRAIN,
    },
    entry_points={"console_scripts": ["zenith-train = zenith_fused.train:main"]},
)
