"""Triton kernels, one file each, and the one function that patches a model with them.

The functional ops live in their modules (`from ftune.kernels.rms_norm import rms_norm`); they are
not re-exported here, where their names would hide the modules of the same name.
"""

from ftune.kernels.patch import KERNELS, CausalLMOutputWithStats, apply_kernels, kernel_support

__all__ = ["KERNELS", "CausalLMOutputWithStats", "apply_kernels", "kernel_support"]
