"""The host link's bandwidth, which mode smart's plan (ftune.memory.policy) weighs offload copies by."""

from __future__ import annotations


def measure_host_link(device) -> float | None:
    """Pinned host-to-device bandwidth in GB/s (one 256 MiB copy after a warm-up); None without CUDA."""
    import torch

    if device.type != "cuda":
        return None
    size = 256 * 1024**2
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    target.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return size / (start.elapsed_time(end) / 1000) / 1e9
