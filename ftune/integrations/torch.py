"""PyTorch's pinned-memory allocator as ftune's offload uses it. Checked against torch 2.11 (CUDA)
and 2.13.

The engine's host buffers (ftune/engine/host_memory.py) are pinned so their copies run on a side
stream. PyTorch pins a new block with one cudaHostAlloc on the calling thread: on an H200 host
that ran at 0.7-2.0 GiB/s for blocks of 64-256 MiB, so a batch longer than any before (a
padding-free batch that outgrows the buffers, the first step) stalls for seconds. The allocator's
`pinned_use_cuda_host_register` option allocates with malloc and pins with cudaHostRegister on
`pinned_num_register_threads` threads: 4.1-7.1 GiB/s on the same host with 8 threads (2026-12-02,
docs/benchmarks.md). The option is read at each new pinned block, so setting it when the engine
starts is enough (the 2026-12-02 measurement set it so). It is the allocator-settings string of
PYTORCH_CUDA_ALLOC_CONF, set through `torch._C._accelerator_setAllocatorSettings` (torch 2.11 and
2.13, where 2.11 calls `torch.cuda.memory._set_allocator_settings` deprecated): private entry
points, hence this module and its contract test in tests/test_integrations.py. A pinning setting
of the user's own (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF) is left as it is, and a torch
that refuses the options pins the usual way.

Freed pinned blocks stay in PyTorch's cache for reuse; `torch._C._accelerator_emptyHostCache`
(torch 2.13; `_host_emptyCache` in 2.11, private too) gives those that no copy still uses back
to the system.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

REGISTER_THREADS = 8


def fast_pinned_allocation() -> bool:
    """Pin new host blocks with cudaHostRegister on several threads; whether the setting was made."""
    if any("pinned_" in os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return False  # the user chose how to pin
    threads = max(1, min(REGISTER_THREADS, os.cpu_count() or 1))
    settings = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{threads}"
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
        getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:
        logger.info("this torch has no allocator-settings entry point: pinned memory is allocated the usual way")
        return False
    try:
        setter(settings)
    except RuntimeError as error:  # options this torch's parser does not know
        logger.info("pinned memory is allocated the usual way: %s", str(error).splitlines()[0])
        return False
    return True


def return_pinned_memory() -> None:
    """Give the cached pinned blocks that no copy still uses back to the system."""
    empty = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
