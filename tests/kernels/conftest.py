"""Kernel tests run compiled on CUDA when there is a GPU, else under Triton's interpreter (set in
the root conftest, before anything imports ftune.kernels)."""
