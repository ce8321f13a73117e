from setuptools import setup

setup(
    name="zenith-fused",
    version="0.1.0",
    description="ZENITH: momentum SGD scaled by its gradient-norm history, as fused multi-tensor kernels",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["zenith_fused", "zenith_fused.triton_kernels"],
    # The top-level triton_kernels/ folder installs under our namespace: a bare
    # ``triton_kernels`` module already belongs to other projects.
    package_dir={"zenith_fused.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "triton>=3.0", "numpy"],
    },
)
