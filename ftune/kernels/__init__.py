"""Triton kernels and autograd Functions, one file each: pure ops on tensors.

They import nothing of ftune but `ftune.kernels.utils`; ftune/integrations/transformers.py patches
a model with them. The ops are not re-exported here, where their names would hide the modules of
the same name (`from ftune.kernels.rms_norm import rms_norm`).
"""
