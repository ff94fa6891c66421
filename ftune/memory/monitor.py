"""Live memory readings: the GPU's allocator on CUDA, the process RSS on CPU, and the host
memory that the checkpointing engine holds for offloaded layer inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

from ftune.memory.units import GiB, format_bytes


@dataclass
class MemorySnapshot:
    device: str
    allocated: int | None = None
    reserved: int | None = None
    peak: int | None = None
    total: int | None = None
    rss: int = 0
    host_offload: int = 0

    def as_metrics(self) -> dict[str, float]:
        """GiB values with metric names, for metrics.jsonl."""
        return {f"mem_{k}_gib": round(v / GiB, 4) for k, v in asdict(self).items() if isinstance(v, int)}

    def headline(self) -> str:
        if self.allocated is None:
            text = f"RSS {format_bytes(self.rss)}"
        else:
            text = (f"alloc {format_bytes(self.allocated)} · reserved {format_bytes(self.reserved)} · "
                    f"peak {format_bytes(self.peak)} / {format_bytes(self.total)}")
        if self.host_offload:
            text += f" · host offload {format_bytes(self.host_offload)}"
        return text


def snapshot(device: torch.device, host_offload: int = 0) -> MemorySnapshot:
    rss = psutil.Process().memory_info().rss
    if device.type != "cuda":
        return MemorySnapshot(device=str(device), rss=rss, host_offload=host_offload)
    return MemorySnapshot(
        device=torch.cuda.get_device_name(device),
        allocated=torch.cuda.memory_allocated(device),
        reserved=torch.cuda.memory_reserved(device),
        peak=torch.cuda.max_memory_allocated(device),
        total=torch.cuda.get_device_properties(device).total_memory,
        rss=rss,
        host_offload=host_offload,
    )
