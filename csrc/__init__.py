"""The C++ and CUDA sources of zenith_fused's compiled kernels (see ``extension.py``), installed as
``zenith_fused.csrc`` so that an installed package can compile them on first use."""
