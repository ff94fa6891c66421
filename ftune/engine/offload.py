"""Parking layer inputs in host memory between forward and backward.

A `HostStash` holds one tensor in host memory. On CUDA the copy out (forward) and the copy back
(backward) run on a side stream, so the compute stream never waits for the host link: the
forward enqueues the copy and moves on, and the backward asks for a stash one layer before it
is needed (`prefetch`), so the copy overlaps the recompute of the layer after it.

Host buffers come from a `HostBufferPool` and go back to it as soon as their copy back is
enqueued: both copies of a buffer run on the same side stream, so the stream's order is what
keeps a buffer from being overwritten before it is read. After the first step no buffer is
allocated (pinned allocation costs milliseconds and can synchronize the device).

Without CUDA the same code runs with plain CPU buffers and synchronous copies, so the CPU tests
exercise the pool and the prefetch chain.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import psutil
import torch

logger = logging.getLogger(__name__)

# Buffers are rounded up to this size so that slightly different sequence lengths share them.
_GRANULE = 2 * 1024 * 1024
# Host memory left free for the rest of the system when deciding whether an offload fits.
_HOST_RESERVE_MIN = 2 * 1024**3
_HOST_RESERVE_FRACTION = 0.05
def buffer_size(nbytes: int) -> int:
    """The size of the pool buffer that holds nbytes (rounded up to a granule)."""
    return -(-nbytes // _GRANULE) * _GRANULE


@dataclass
class PoolStats:
    buffers: int = 0
    bytes_total: int = 0
    bytes_in_use: int = 0
    peak_in_use: int = 0
    pinned: bool = True


class HostBufferPool:
    """Reusable host buffers (pinned when the device is CUDA), best fit by size.

    The pool only grows when more bytes are parked at once than ever before; a run of fixed
    shapes allocates during its first step and never again.
    """

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self._free: list[torch.Tensor] = []
        self.stats = PoolStats(pinned=pin_memory)
        self._warned: set[str] = set()
        # Called when a required buffer does not fit: frees host memory elsewhere, True if it did.
        self.make_room: Callable[[], bool] | None = None

    def acquire(self, nbytes: int, keep_free: int = 0, optional: bool = False) -> torch.Tensor | None:
        """A uint8 host buffer of at least nbytes, or None when host memory is too short (with
        `keep_free` bytes more left available, when a new buffer is needed); an optional buffer
        that does not fit is refused without a warning."""
        best = None
        for index, buffer in enumerate(self._free):
            if buffer.numel() >= nbytes and (best is None or buffer.numel() < self._free[best].numel()):
                best = index
        if best is not None:
            buffer = self._free.pop(best)
        else:
            size = buffer_size(nbytes)
            buffer = self._allocate(size, keep_free)
            if buffer is None and not optional and self.make_room is not None and self.make_room():
                buffer = self._allocate(size, keep_free)
            if buffer is None:
                if not optional:
                    self._warn_once(
                        "host-full",
                        f"host memory is short ({psutil.virtual_memory().available / 2**30:.1f} GiB available): "
                        "layer inputs that do not fit stay on the GPU. Free host memory or use "
                        "checkpointing.mode: true.",
                    )
                return None
        self.stats.bytes_in_use += buffer.numel()
        self.stats.peak_in_use = max(self.stats.peak_in_use, self.stats.bytes_in_use)
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        self.stats.bytes_in_use -= buffer.numel()
        self._free.append(buffer)

    def trim(self) -> int:
        """Free the buffers no stash holds; the bytes freed."""
        freed = sum(buffer.numel() for buffer in self._free)
        self.stats.buffers -= len(self._free)
        self.stats.bytes_total -= freed
        self._free.clear()
        return freed

    def _allocate(self, nbytes: int, keep_free: int) -> torch.Tensor | None:
        memory = psutil.virtual_memory()
        reserve = max(_HOST_RESERVE_MIN, int(memory.total * _HOST_RESERVE_FRACTION))
        if memory.available - nbytes - keep_free < reserve:
            return None
        # Allocated outside inference mode, so a buffer first used after a generate() under
        # torch.inference_mode() can still be written by training steps.
        with torch.inference_mode(False):
            if self.pin_memory:
                try:
                    buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                except RuntimeError as error:
                    self._warn_once(
                        "pin-failed",
                        f"could not pin host memory ({error}); using pageable memory, whose copies are "
                        "slower and not overlapped with compute.",
                    )
                    self.pin_memory = self.stats.pinned = False
                    buffer = torch.empty(nbytes, dtype=torch.uint8)
            else:
                buffer = torch.empty(nbytes, dtype=torch.uint8)
        self.stats.buffers += 1
        self.stats.bytes_total += nbytes
        return buffer

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


class HostCopier:
    """Moves tensors between the device and the pool, on a side stream when the device is CUDA."""

    def __init__(self, device: torch.device):
        self.pool = HostBufferPool(pin_memory=device.type == "cuda")
        # Buffers for what a layer parks besides its input (ftune/engine/attention.py). They are
        # optional, so they have a pool of their own: a layer input never waits for one of
        # theirs, and from the second step each kind reuses its own buffers.
        self.parking_pool = HostBufferPool(pin_memory=device.type == "cuda")
        # Parked buffers sized for earlier, shorter batches must not keep a longer batch's layer
        # inputs on the GPU: a layer input that does not fit frees the idle ones first
        self.pool.make_room = self._trim_parking
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _trim_parking(self) -> bool:
        if not self.parking_pool.trim():
            return False
        if self.parking_pool.pin_memory and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # PyTorch caches freed pinned memory; give it back to the system
        return True

    @property
    def pools(self) -> tuple[HostBufferPool, HostBufferPool]:
        return self.pool, self.parking_pool

    def stream_for(self, device: torch.device) -> torch.cuda.Stream | None:
        """The side stream of a CUDA device (None on CPU), made on first use, so a model moved to
        the GPU after the engine was installed still copies on a side stream."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            for pool in self.pools:
                pool.pin_memory = pool.stats.pinned = True
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def stash(self, tensor: torch.Tensor) -> "HostStash":
        return HostStash(self, tensor)

    def stash_if_room(self, tensor: torch.Tensor, keep_free: int) -> "HostStash | None":
        """The tensor in a parking-pool buffer, or None when that would leave less than `keep_free`
        bytes of host memory available (beyond the usual reserve)."""
        stash = HostStash(self, tensor, pool=self.parking_pool, keep_free=keep_free, optional=True)
        return stash if stash.on_host else None


class HostStash:
    """One tensor parked in host memory: stash in forward, `prefetch` then `fetch` in backward.

    If the pool has no room, the tensor simply stays where it is (on the device), unless the
    stash is optional: then it holds nothing and `on_host` is False.
    """

    def __init__(self, copier: HostCopier, tensor: torch.Tensor, pool: HostBufferPool | None = None,
                 keep_free: int = 0, optional: bool = False):
        self._copier = copier
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self._device_tensor: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self._stream = stream = copier.stream_for(tensor.device)  # before acquire: it decides pinning
        pool = pool or copier.pool
        self._buffer = pool.acquire(self.nbytes, keep_free, optional)
        if self._buffer is None:
            if not optional:
                self._device_tensor = tensor  # no host room: keep it on the device
            return
        source = tensor.detach().contiguous().view(-1).view(torch.uint8)
        host = self._buffer[: self.nbytes]
        if stream is None:
            host.copy_(source)
        else:
            # The side stream starts after the compute that produced the tensor; the allocator is told
            # the side stream still reads it, so its memory is not reused before the copy is done.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                host.copy_(source, non_blocking=True)
            source.record_stream(stream)
        # Return the buffer to the pool if the graph is dropped without a backward.
        self._finalizer = weakref.finalize(self, pool.release, self._buffer)

    @property
    def on_host(self) -> bool:
        return self._buffer is not None

    def prefetch(self) -> None:
        """Start the copy back to the device (no wait); `fetch` later returns it."""
        if self._device_tensor is not None or self._buffer is None:
            return
        target = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        host = self._buffer[: self.nbytes]
        stream = self._stream
        if stream is None:
            target.copy_(host)
        else:
            # The target was allocated on the compute stream: the side stream writes it only after
            # the compute work queued so far, which may still be using that memory's previous owner.
            compute = torch.cuda.current_stream(self.device)
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                target.copy_(host, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record(stream)
        self._device_tensor = target.view(self.dtype).view(self.shape)
        # The next copy into this buffer is queued on the same stream, after this one.
        self._finalizer()
        self._buffer = None

    def fetch(self) -> torch.Tensor:
        """The tensor on the device, waiting (on the compute stream only) for its copy."""
        if self._device_tensor is None and self._buffer is None:
            raise RuntimeError(
                "this layer input was already consumed by a backward pass; ftune's offloaded "
                "checkpointing does not support backward through the same graph twice (retain_graph=True)."
            )
        self.prefetch()
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None
        tensor, self._device_tensor = self._device_tensor, None
        return tensor
