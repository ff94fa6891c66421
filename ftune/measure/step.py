"""Training steps of a built model, measured: what `ftune compare` and every script in benchmarks/
time and weigh, done one way.

One step is a forward with labels (under autocast when asked), the backward, gradient clipping when
asked, an optimizer step and zeroed gradients. `train_steps` runs one warm-up step and the timed
ones after it, as ../shared/GPU.md's "Timing honestly" asks: the clock read after a synchronize,
the peak from `torch.cuda.max_memory_allocated` reset after the warm-up (Triton's compiles, the
optimizer's states and the pinned pools are made there), the median of the timed steps. On a CPU
the peak is the process's largest resident set size, read after every step.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil
import torch

GiB = 1024**3


@dataclass
class StepsMeasured:
    """What `train_steps` measured; times and losses of every step, the warm-up's first."""

    device: str  # the card's name, or "cpu"
    tokens_per_step: int
    losses: list[float]
    step_times_s: list[float]
    grad_norms: list[float]  # empty when the steps did not clip
    peak_bytes: int  # peak allocated VRAM over the timed steps, or the largest RSS on a CPU
    reserved_bytes: int | None  # the allocator's peak reservation over the timed steps (GPU)
    held_after_forward_bytes: int | None  # what the last forward left allocated for its backward (GPU)
    cuda_mallocs: int | None  # cudaMalloc calls during the timed steps
    # Python's garbage collector during the timed steps, per generation: seconds and passes
    collector_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    collector_passes: list[int] = field(default_factory=lambda: [0, 0, 0])
    warmup: int = 1

    @property
    def on_gpu(self) -> bool:
        return self.reserved_bytes is not None

    @property
    def memory_kind(self) -> str:
        return "peak allocated VRAM" if self.on_gpu else "peak RSS (CPU)"

    @property
    def timed_s(self) -> list[float]:
        return self.step_times_s[self.warmup:] or self.step_times_s  # a warm-up alone still has a time

    @property
    def step_s(self) -> float:
        """The median timed step: the higher middle one of an even count, a step that was measured."""
        return statistics.median_high(self.timed_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, *,
               labels: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = torch.bfloat16,
               max_grad_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One training step on `ids`: forward_loss, the backward, optimizer_step. The loss and, with
    max_grad_norm, the gradient norm before clipping."""
    loss = forward_loss(model, ids, labels, autocast_dtype=autocast_dtype)
    loss.backward()
    return loss, optimizer_step(model, optimizer, max_grad_norm)


def forward_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                 autocast_dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """The forward with labels (the ids unless given), under autocast on a GPU; its loss."""
    labels = ids if labels is None else labels
    on_gpu = ids.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=autocast_dtype) if on_gpu and autocast_dtype else contextlib.nullcontext()
    with autocast:
        return model(input_ids=ids, labels=labels).loss


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   max_grad_norm: float | None = None) -> torch.Tensor | None:
    """After the backward: clip to max_grad_norm (math.inf: no clipping) and return the norm before
    it (None without max_grad_norm), step, zero the gradients."""
    norm = None
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                              max_grad_norm or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train_steps(model: torch.nn.Module, batches: Sequence[torch.Tensor], *,
                optimizer: torch.optim.Optimizer | None = None, learning_rate: float = 1e-5,
                autocast_dtype: torch.dtype | None = torch.bfloat16, pad_id: int | None = None,
                max_grad_norm: float | None = None,
                on_step: Callable[[int, float], None] | None = None) -> StepsMeasured:
    """Train one step per batch, the first a warm-up, and measure them.

    batches: token ids, one tensor (batch, seq) per step, moved to the model's device; labels are the
    ids with `pad_id` masked. optimizer: AdamW over the trainable parameters at `learning_rate` unless
    given. autocast_dtype: the GPU's autocast (on a CPU, or with None, the weights' dtype computes).
    max_grad_norm: clip to it and record the norms (math.inf records them without clipping); None
    neither. on_step(step, loss) after each.
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, norms, times = [], [], []
    held = mallocs = None
    rss_peak = 0
    collector = _CollectorClock()
    for step, ids in enumerate(batches):
        if step == 1:  # after the warm-up
            gc.callbacks.append(collector)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                mallocs = torch.cuda.memory_stats(device).get("segment.all.allocated", 0)
        ids = ids.to(device)
        labels = ids.masked_fill(ids == pad_id, -100) if pad_id is not None else ids
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        before = torch.cuda.memory_allocated(device) if cuda else 0
        loss = forward_loss(model, ids, labels, autocast_dtype=autocast_dtype)
        if cuda:
            held = torch.cuda.memory_allocated(device) - before
        loss.backward()
        norm = optimizer_step(model, optimizer, max_grad_norm)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if norm is not None:
            norms.append(norm.item())
        rss_peak = max(rss_peak, psutil.Process().memory_info().rss)
        del loss
        if on_step is not None:
            on_step(step + 1, losses[-1])
    if collector in gc.callbacks:
        gc.callbacks.remove(collector)
    if cuda and mallocs is not None:
        mallocs = torch.cuda.memory_stats(device).get("segment.all.allocated", 0) - mallocs
    return StepsMeasured(
        device=torch.cuda.get_device_name(device) if cuda else str(device),
        tokens_per_step=int(batches[0].numel()),
        losses=losses,
        step_times_s=times,
        grad_norms=norms,
        peak_bytes=torch.cuda.max_memory_allocated(device) if cuda else rss_peak,
        reserved_bytes=torch.cuda.max_memory_reserved(device) if cuda else None,
        held_after_forward_bytes=held,
        cuda_mallocs=mallocs,
        collector_s=collector.seconds,
        collector_passes=collector.passes,
    )


class _CollectorClock:
    """The time Python's garbage collector takes, per generation (a gc.callbacks entry)."""

    def __init__(self):
        self.seconds, self.passes, self._started = [0.0, 0.0, 0.0], [0, 0, 0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started
            self.passes[info["generation"]] += 1
