"""Host memory for the GPU: layer inputs parked between forward and backward, and the frozen
embedding tables kept there for good.

Layer inputs. A `HostStash` holds one tensor in host memory. On CUDA the copy out (forward) and
the copy back (backward) run on a side stream, so the compute stream never waits for the host
link: the forward enqueues the copy and moves on, and the backward asks for a stash one layer
before it is needed (`prefetch`), so the copy overlaps the recompute of the layer after it. Host
buffers come from a `HostBufferPool` and go back to it as soon as their copy back is enqueued:
both copies of a buffer run on the same side stream, so the stream's order is what keeps a buffer
from being overwritten before it is read. After the first step no buffer is allocated (pinned
allocation costs milliseconds and can synchronize the device); a step longer than any before pins
the pieces it adds as its first offloaded layer starts, in a few large blocks. Without CUDA the same code runs
with plain CPU buffers and synchronous copies, so the CPU tests exercise the pool and the
prefetch chain.

Embedding tables. An 8B Llama's input embedding is 128256 x 4096 bf16: 1 GiB of VRAM for what
is, in a LoRA run, a frozen row lookup. `HostEmbedding` keeps the table in pinned host memory,
gathers the batch's rows on the CPU and copies them to the GPU (64 MiB at 8192 tokens: about 1 ms
on a 55 GB/s link). The LM head is the same size and, with the fused cross-entropy, needed only
once per training step: the loss computes the hidden states' gradient in the forward pass, so the
backward never reads the head. `HostLMHead` keeps it in pinned host memory. In a run planned for
long inputs (ftune.memory.estimate.head_streams), the loss reads it a block of rows at a time
(`chunks`), each block's copy on a side stream behind the loss's matmuls on the block before, so
the whole head is never on the GPU. In a run of short inputs, whose loss is too short to hide the
copies, the head is copied whole as the first decoder layer starts (1 GiB, about 20 ms, beside the
layers' compute) and dropped once the loss is done with it, so the layers' backward runs without
it. A tied table (Gemma, the small Llamas and Qwens) is both:
one pinned copy serves the lookups and the head's fetches, and leaves the GPU only when both
can (frozen, the fused loss on): Gemma-2-9B's 256000 x 3584 table is 1.7 GiB.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ftune.integrations.torch import fast_pinned_allocation, return_pinned_memory
from ftune.memory.estimate import stream_block_rows

logger = logging.getLogger(__name__)

# Buffers are at least this size.
_GRANULE = 2 * 1024 * 1024
# A tensor larger than a piece is held in pieces of this size, cut from large pinned blocks. A
# longer batch than any before then pins only the pieces it adds, where one buffer per tensor is
# replaced by a larger one and pinned again: the packing benchmark's first 16,710-token batch
# pinned 24 GiB that way, a 7.5 s step on an H200 host (docs/benchmarks.md). A piece is at most
# 16 MiB of a tensor's tail unused, and a 64 MiB layer input (8192 tokens of a 4096-wide model)
# four whole pieces.
PIECE = 16 * 1024 * 1024
# Host memory left free for the rest of the system when deciding whether an offload fits.
_HOST_RESERVE_MIN = 2 * 1024**3
_HOST_RESERVE_FRACTION = 0.05


def buffer_size(nbytes: int) -> int:
    """The host bytes the pool holds for a tensor of nbytes: whole pieces above a piece, below it
    the next power of two (at least a granule).

    PyTorch's pinned-memory allocator hands out powers of two whatever size is asked
    (at::CachingHostAllocator in torch 2.13), so asking for them costs no host memory, and lengths
    within one power of two share a buffer; the pieces' blocks are powers of two too.
    """
    if nbytes > PIECE:
        return pieces_for(nbytes) * PIECE
    return max(_GRANULE, 1 << (nbytes - 1).bit_length())


def pieces_for(nbytes: int) -> int:
    """The pieces a tensor of nbytes (above a piece) takes."""
    return -(-nbytes // PIECE)


@dataclass
class PoolStats:
    buffers: int = 0  # pinned blocks: small buffers and the blocks pieces are cut from
    bytes_total: int = 0
    bytes_in_use: int = 0
    peak_in_use: int = 0
    pinned: bool = True


class HostBufferPool:
    """Reusable host memory (pinned when the device is CUDA): a tensor gets a list of buffers, one
    power of two up to a piece, whole pieces above.

    The pool only grows when more bytes are parked at once than ever before; a run of fixed
    shapes allocates during its first step and never again. `reserve` pins what a step will need
    before its first layer asks, in as few blocks as the sizes allow.
    """

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self._free: list[torch.Tensor] = []  # buffers of a piece or less, each its own block
        self._free_pieces: list[torch.Tensor] = []
        self._blocks: list[torch.Tensor] = []  # the blocks pieces are cut from
        self.stats = PoolStats(pinned=pin_memory)
        self._warned: set[str] = set()
        # Called when a required buffer does not fit: frees host memory elsewhere, True if it did.
        self.make_room: Callable[[], bool] | None = None

    def acquire(self, nbytes: int, keep_free: int = 0, optional: bool = False) -> list[torch.Tensor] | None:
        """uint8 host buffers holding at least nbytes in order, or None when host memory is too
        short (with `keep_free` bytes more left available, when new memory is needed); an optional
        request that does not fit is refused without a warning."""
        if nbytes > PIECE:
            buffers = self._take_pieces(pieces_for(nbytes), keep_free, optional)
        else:
            buffer = self._take_small(nbytes, keep_free, optional)
            buffers = None if buffer is None else [buffer]
        if buffers is None:
            if not optional:
                self._warn_once(
                    "host-full",
                    f"host memory is short ({psutil.virtual_memory().available / 2**30:.1f} GiB available): "
                    "layer inputs that do not fit stay on the GPU. Free host memory or use "
                    "checkpointing.mode: true.",
                )
            return None
        self.stats.bytes_in_use += sum(buffer.numel() for buffer in buffers)
        self.stats.peak_in_use = max(self.stats.peak_in_use, self.stats.bytes_in_use)
        return buffers

    def release(self, buffers: list[torch.Tensor]) -> None:
        for buffer in buffers:
            self.stats.bytes_in_use -= buffer.numel()
            (self._free_pieces if buffer.numel() == PIECE and self._is_piece(buffer) else self._free).append(buffer)

    def reserve(self, sizes: list[int], keep_free: int = 0) -> None:
        """Have tensors of these sizes fit without pinning between layers: the pieces missing are
        pinned now, in blocks as large as their number allows (PyTorch pins a large block faster
        per byte than many small ones). Short host memory pins fewer; `acquire` then decides
        tensor by tensor."""
        wanted = sum(pieces_for(nbytes) for nbytes in sizes if nbytes > PIECE)
        self._add_pieces(wanted - len(self._free_pieces), keep_free)

    def trim(self) -> int:
        """Free the memory no stash holds; the bytes freed."""
        freed = self._drop(lambda buffer: True)
        held = {piece.data_ptr() for piece in self._free_pieces}
        idle = [block for block in self._blocks
                if all(block.data_ptr() + offset in held for offset in range(0, block.numel(), PIECE))]
        for block in idle:
            end = block.data_ptr() + block.numel()
            self._free_pieces = [p for p in self._free_pieces if not block.data_ptr() <= p.data_ptr() < end]
            self._blocks = [b for b in self._blocks if b is not block]
            self._forget(block)
            freed += block.numel()
        return freed

    def _is_piece(self, buffer: torch.Tensor) -> bool:
        return any(block.data_ptr() <= buffer.data_ptr() < block.data_ptr() + block.numel() for block in self._blocks)

    def _take_pieces(self, count: int, keep_free: int, optional: bool) -> list[torch.Tensor] | None:
        missing = count - len(self._free_pieces)
        if missing > 0 and not self._add_pieces(missing, keep_free):
            if optional or self.make_room is None or not self.make_room() or not self._add_pieces(
                    count - len(self._free_pieces), keep_free):
                return None
        taken, self._free_pieces = self._free_pieces[:count], self._free_pieces[count:]
        return taken

    def _add_pieces(self, count: int, keep_free: int) -> bool:
        """Pin `count` more pieces, in blocks of a power of two pieces each (largest first);
        whether all were pinned."""
        while count > 0:
            block_pieces = 1 << (count.bit_length() - 1)
            block = self._allocate(block_pieces * PIECE, keep_free)
            if block is None:
                return False
            self._blocks.append(block)
            self._free_pieces.extend(block.view(block_pieces, PIECE).unbind(0))
            count -= block_pieces
        return True

    def _take_small(self, nbytes: int, keep_free: int, optional: bool) -> torch.Tensor | None:
        best = None
        for index, buffer in enumerate(self._free):
            if buffer.numel() >= nbytes and (best is None or buffer.numel() < self._free[best].numel()):
                best = index
        if best is not None:
            return self._free.pop(best)
        size = buffer_size(nbytes)
        self._drop_smaller_than(size)
        buffer = self._allocate(size, keep_free)
        if buffer is None and not optional and self.make_room is not None and self.make_room():
            buffer = self._allocate(size, keep_free)
        return buffer

    def _drop_smaller_than(self, size: int) -> None:
        """A batch longer than any before needs larger buffers, which from then on also serve every
        request the idle smaller ones served: those go back to the system rather than stay pinned."""
        if self._drop(lambda buffer: buffer.numel() < size) and self.pin_memory:
            return_pinned_memory()

    def _drop(self, dropped: Callable[[torch.Tensor], bool]) -> int:
        """Let the idle buffers (not pieces) `dropped` picks go; the bytes freed."""
        going = [buffer for buffer in self._free if dropped(buffer)]
        self._free = [buffer for buffer in self._free if not dropped(buffer)]
        for buffer in going:
            self._forget(buffer)
        return sum(buffer.numel() for buffer in going)

    def _forget(self, block: torch.Tensor) -> None:
        self.stats.buffers -= 1
        self.stats.bytes_total -= block.numel()

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
        if device.type == "cuda":
            fast_pinned_allocation()
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
        if self.parking_pool.pin_memory:
            return_pinned_memory()
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
        self._buffers = pool.acquire(self.nbytes, keep_free, optional)
        if self._buffers is None:
            if not optional:
                self._device_tensor = tensor  # no host room: keep it on the device
            return
        source = tensor.detach().contiguous().view(-1).view(torch.uint8)
        if stream is None:
            self._copy_pieces(source, to_host=True)
        else:
            # The side stream starts after the compute that produced the tensor; the allocator is told
            # the side stream still reads it, so its memory is not reused before the copy is done.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._copy_pieces(source, to_host=True)
            source.record_stream(stream)
        # Return the buffers to the pool if the graph is dropped without a backward.
        self._finalizer = weakref.finalize(self, pool.release, self._buffers)

    def _copy_pieces(self, device_bytes: torch.Tensor, to_host: bool) -> None:
        """Copy the tensor's bytes between the device and the host buffers, buffer by buffer."""
        start = 0
        for buffer in self._buffers:
            length = min(buffer.numel(), self.nbytes - start)
            host, device = buffer[:length], device_bytes[start: start + length]
            (host if to_host else device).copy_(device if to_host else host, non_blocking=True)
            start += length

    @property
    def on_host(self) -> bool:
        return self._buffers is not None

    def prefetch(self) -> None:
        """Start the copy back to the device (no wait); `fetch` later returns it."""
        if self._device_tensor is not None or self._buffers is None:
            return
        target = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        stream = self._stream
        if stream is None:
            self._copy_pieces(target, to_host=False)
        else:
            # The target was allocated on the compute stream: the side stream writes it only after
            # the compute work queued so far, which may still be using that memory's previous owner.
            compute = torch.cuda.current_stream(self.device)
            stream.wait_stream(compute)
            with torch.cuda.stream(stream):
                self._copy_pieces(target, to_host=False)
                self._ready = torch.cuda.Event()
                self._ready.record(stream)
        self._device_tensor = target.view(self.dtype).view(self.shape)
        # The next copy into these buffers is queued on the same stream, after this one.
        self._finalizer()
        self._buffers = None

    def fetch(self) -> torch.Tensor:
        """The tensor on the device, waiting (on the compute stream only) for its copy."""
        if self._device_tensor is None and self._buffers is None:
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



class HostEmbedding(nn.Module):
    """Drop-in for a frozen nn.Embedding whose table lives in host memory.

    The table is a plain attribute, not a parameter or buffer: `model.to()`, `model.device` and
    the state dict (an adapter never holds it) do not see it, so the rest of the model stays on
    the GPU and reports the GPU as its device.
    """

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        if embedding.weight.requires_grad:
            raise ValueError("HostEmbedding is for frozen embeddings; this one is trainable")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        # Gemma's embedding multiplies its rows by sqrt(hidden), rounded to the table's dtype as its
        # own forward rounds it (transformers' *ScaledWordEmbedding)
        scale = getattr(embedding, "embed_scale", None)
        self.scale = None if scale is None else torch.as_tensor(scale).to(embedding.weight.dtype).item()
        self.device = device
        pin = device.type == "cuda"
        self.host_weight = embedding.weight.detach().to("cpu").contiguous()
        if pin:
            self.host_weight = self.host_weight.pin_memory()
        self._staging: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.host_weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1).to("cpu")
        count = ids.numel()
        if self.device.type != "cuda":
            return self._scaled(F.embedding(ids, self.host_weight).view(*input_ids.shape, self.embedding_dim))
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of the staging buffer is done
        if self._staging is None or self._staging.shape[0] < count:
            self._staging = torch.empty((count, self.embedding_dim), dtype=self.host_weight.dtype, pin_memory=True)
        rows = self._staging[:count]
        torch.index_select(self.host_weight, 0, ids, out=rows)
        on_device = rows.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return self._scaled(on_device.view(*input_ids.shape, self.embedding_dim))

    def _scaled(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.scale is None else rows * self.scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory"


class HostLMHead(nn.Module):
    """Drop-in for a frozen nn.Linear LM head whose weight lives in host memory.

    `weight` is a copy on the device, made on demand (or ahead, by `prefetch`) and dropped by
    `release`: by a forward of this module with gradients (autograd keeps what the backward
    needs), by ftune's fused loss once it has its gradient, and otherwise when the backward
    reaches the decoder's output, past whatever loss read the head (TRL's own chunked heads for
    DPO and GRPO read `weight` directly). A forward without gradients (evaluation, generation)
    keeps it, so decoding does not copy the head for every token. With `streams_the_loss`, the
    first layer does not fetch it and the fused loss reads `chunks` instead
    (fused_linear_cross_entropy's WeightInChunks), whatever the batch's length: the run's memory
    plan counted it so, and a shorter batch holding the whole head beside its forward could peak
    above a longer one.
    """

    def __init__(self, head: nn.Linear, device: torch.device, host_weight: torch.Tensor | None = None,
                 streams_the_loss: bool = False, stream_up_to: int = 0):
        """`host_weight`: the table already in host memory (a tied head shares its input embedding's);
        `stream_up_to`: the most tokens of a forward that streams the head though the run does not
        (a step that keeps its layers: CheckpointingEngine.keep_up_to)."""
        super().__init__()
        if head.weight.requires_grad:
            raise ValueError("HostLMHead is for a frozen LM head; this one is trainable")
        self.out_features, self.in_features = head.weight.shape
        self.device = device
        self.bias = head.bias  # small: it stays with the model, wherever the model goes
        self._stream = None
        if host_weight is None:
            host_weight = head.weight.detach().to("cpu").contiguous()
            if device.type == "cuda":
                host_weight = host_weight.pin_memory()
        self.host_weight = host_weight
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
        self._on_device: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self.streams_the_loss = streams_the_loss
        self.stream_up_to = stream_up_to
        self.rows_per_chunk = stream_block_rows(self.in_features, self.dtype.itemsize)

    @property
    def shape(self) -> torch.Size:
        return self.host_weight.shape

    @property
    def on_device(self) -> bool:
        """Whether the weight is on the device whole (fetched, or fetching), rather than in blocks."""
        return self._on_device is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.host_weight.dtype

    def prefetch_for_the_forward(self, tokens: int | None) -> None:
        """The first decoder layer's start (a recompute's too), in a forward of `tokens` tokens (None:
        not known): fetch the head whole unless the loss streams it, in the run or in this step. A
        training step that streams it lets go of a whole head that generation left on the device:
        beside its kept layers the two would pass the planned peak."""
        if self.streams_the_loss:
            return
        if tokens is None or tokens > self.stream_up_to:
            self.prefetch()
        elif torch.is_grad_enabled():
            self.release()

    def for_the_loss(self) -> torch.Tensor | HostLMHead:
        """What ftune's fused loss reads: this module's `chunks` where the head is not on the device
        (a run or a step that streams it), else `weight`. A head already on the device (fetched for
        generation) is read whole, as is one whose bias trains (the streamed loss computes no bias
        gradient)."""
        trains_bias = self.bias is not None and self.bias.requires_grad
        return self if self._on_device is None and not trains_bias else self.weight

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The weight `rows_per_chunk` rows at a time on the device, in order (WeightInChunks). Each
        block's copy runs on the side stream while the caller works on the block before it: two
        blocks are on the device at once, when the caller drops each block before asking for the next."""
        vocab, rows = self.out_features, self.rows_per_chunk
        if self._on_device is not None or self._stream is None:
            whole = self.weight if self._on_device is not None else self.host_weight
            for first in range(0, vocab, rows):
                yield first, whole[first : first + rows]
            return
        compute = torch.cuda.current_stream(self.device)
        # a block may take the memory of the one before the last, which queued work still reads:
        # its copy waits for that work
        pending = self._copy_on_the_side(self.host_weight[:rows])
        for first in range(0, vocab, rows):
            block, ready = pending
            compute.wait_event(ready)
            following = first + rows
            pending = self._copy_on_the_side(self.host_weight[following : following + rows]) if following < vocab \
                else None
            yield first, block
            del block

    def prefetch(self) -> None:
        """Start copying the weight to the device on the side stream (no wait)."""
        if self._on_device is not None:
            return
        if self._stream is None:
            self._on_device = self.host_weight
            return
        self._on_device, self._ready = self._copy_on_the_side(self.host_weight)

    def _copy_on_the_side(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """A device copy of `rows` (pinned) queued on the side stream, and the event of its end."""
        # Allocated on the compute stream, which frees it: the side stream writes it only after the
        # compute work queued so far, which may still use that memory's previous owner. A normal
        # tensor even when fetched under inference mode (generation): the training forward that
        # reuses it may save it for backward.
        with torch.inference_mode(False):
            target = torch.empty_like(rows, device=self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                target.copy_(rows, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            target.record_stream(self._stream)  # dropped mid-copy, its memory waits for the copy
        return target, ready

    @property
    def weight(self) -> torch.Tensor:
        self.prefetch()
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None
        return self._on_device

    def release(self) -> None:
        """Drop the device copy (its memory returns to the allocator once no one else holds it)."""
        if self._ready is not None:  # fetched but never read: its copy must end before the memory is reused
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None
        self._on_device = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)
        if torch.is_grad_enabled():
            self.release()
        return logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, in host memory"


def move_tables_to_host(model: nn.Module, device: torch.device, lm_head: bool, stream_head: bool = False,
                        stream_up_to: int = 0) -> int:
    """Put the frozen input embedding in host memory (a HostEmbedding) and, with `lm_head`, the
    frozen LM head (a HostLMHead, fetched as the first decoder layer starts and dropped before the
    layers' backward, or with `stream_head`, and in forwards of at most `stream_up_to` tokens, read
    by the loss in blocks); the bytes freed on the
    device. A tied table moves only when both can: it serves both from one pinned copy, and on the
    GPU it would stay for the one that could not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    # an embedding with a forward of its own that HostEmbedding would not reproduce stays
    embedding_moves = (isinstance(embedding, nn.Embedding) and not embedding.weight.requires_grad
                       and (type(embedding) is nn.Embedding or _scaled_embedding(embedding)))
    head_moves = lm_head and type(head) is nn.Linear and not head.weight.requires_grad
    tied = (head is not None and getattr(embedding, "weight", None) is not None
            and head.weight.data_ptr() == embedding.weight.data_ptr())
    if tied and not (embedding_moves and head_moves):
        return 0
    freed, shared = 0, None
    if embedding_moves:
        freed += embedding.weight.numel() * embedding.weight.element_size()
        host_embedding = HostEmbedding(embedding, device)
        base.set_input_embeddings(host_embedding)
        shared = host_embedding.host_weight if tied else None
    if head_moves:
        freed += 0 if tied else head.weight.numel() * head.weight.element_size()
        _host_lm_head(base, HostLMHead(head, device, host_weight=shared, streams_the_loss=stream_head,
                                       stream_up_to=stream_up_to))
    return freed


def _scaled_embedding(embedding: nn.Module) -> bool:
    """transformers' scaled word embeddings (Gemma): an nn.Embedding whose forward multiplies by
    `embed_scale` and does nothing else."""
    return type(embedding).__name__.endswith("ScaledWordEmbedding") and hasattr(embedding, "embed_scale")


def _tokens(args: tuple, kwargs: dict) -> int | None:
    """Tokens of a decoder layer's (or the backbone's) input: its hidden states, input ids or
    embeddings; None where none is a tensor."""
    for value in (*args[:1], kwargs.get("hidden_states"), kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.numel():
            return value.numel() // value.shape[-1] if value.dim() > 2 or value.is_floating_point() else value.numel()
    return None


def _host_lm_head(base: nn.Module, host_head: HostLMHead) -> None:
    base.set_output_embeddings(host_head)
    # The copy starts with the first decoder layer and runs beside the layers. Not earlier: queued
    # ahead of the input embedding's rows (a host-to-device copy too), the rows would wait for it.
    backbone = getattr(base, base.base_model_prefix)
    layers = [m for m in backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    (layers[0] if layers else backbone).register_forward_pre_hook(
        lambda module, args, kwargs: host_head.prefetch_for_the_forward(_tokens(args, kwargs)), with_kwargs=True)

    def release_when_the_layers_backward_starts(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if torch.is_grad_enabled() and hidden.requires_grad:
            # the gradient of the decoder's output is complete: every loss that read the head is done
            hidden.register_hook(lambda grad: host_head.release())

    backbone.register_forward_hook(release_when_the_layers_backward_starts)
