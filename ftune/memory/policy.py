"""Mode `smart`: a policy per decoder layer that fits a VRAM budget at the best speed. Torch-free:
`estimate-vram` and `ftune validate` plan here as `ftune train` does (ftune.plan.resolve).

What each policy costs, per layer:
  keep       its activations on the GPU (memory/estimate.keep_bytes_per_layer); no recompute
  recompute  its input on the GPU (one hidden-state tensor); one extra forward in backward
  offload    nothing on the GPU; the same extra forward, and a copy each way over the host link,
             hidden behind compute on a side stream (measured: 99-100% of `recompute`'s speed)

So the fastest plan keeps as many layers as the budget allows and offloads the rest; it recomputes
with the input on the GPU only where host RAM runs out, or where the host link is too slow for
its copies to hide behind a layer's compute. The kept layers are the last ones: their activations
are the first the backward needs.

GRPO's generation and DPO's reference pass are phases of the step (memory/estimate.settle_phases):
a plan fits when the larger of them and the training fits, so a generation that needs more than the
training leaves room for kept layers.

The input-embedding table goes to host RAM (1 GiB for the 8B shape) only when the budget needs
it: when every layer is kept anyway, the table stays on the GPU, where its lookup costs nothing
(measured on an H100 at 8192 tokens: all layers kept, 11,753 tok/s with the table in host RAM
against 11,970 for mode none with it on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from ftune.memory.estimate import (STREAM_HEAD_MIN_TOKENS, Estimate, Setting, Shape, aux_loss_bytes,
                                   dequantized_experts, estimate, head_streams, keep_bytes_per_layer,
                                   longest_sequence, settle_phases)
from ftune.memory.units import format_bytes


class Policy(str, Enum):
    """What one decoder layer keeps for its backward (ftune.engine installs it)."""

    KEEP = "keep"
    RECOMPUTE = "recompute"
    OFFLOAD = "offload"


# Copies at this host-link bandwidth or above hide behind compute (an H100 moves 55 GB/s pinned;
# one 8B layer input at 8192 tokens, 64 MiB, then takes 1.2 ms against ~30 ms of layer compute).
FAST_LINK_GBPS = 8.0


@dataclass
class LayerPlan:
    """Mode smart's policy for each decoder layer, and what the memory model predicts of it."""

    policies: list[Policy]
    peak: int
    host: int
    budget: int
    link_gbps: float | None = None
    host_embeddings: bool = False
    # the training tokens from which the run streams its host LM head through the loss
    # (Setting.stream_head_from), and whether this plan's run does
    stream_head_from: int = STREAM_HEAD_MIN_TOKENS
    streamed_head: bool = False

    def counts(self) -> dict[str, int]:
        return {policy.value: self.policies.count(policy) for policy in Policy}

    def describe(self) -> str:
        counts = ", ".join(f"{n} {p}" for p, n in self.counts().items() if n)
        link = f", host link {self.link_gbps:.1f} GB/s" if self.link_gbps else ""
        table = "; embeddings in host RAM" if self.host_embeddings else ""
        table += "; LM head streamed through the loss" if self.streamed_head else ""
        return (f"smart plan for a {format_bytes(self.budget)} budget: {counts}{table}; predicted peak "
                f"{format_bytes(self.peak)}, host {format_bytes(self.host)}{link}")


class NoPlanFits(ValueError):
    """No plan fits the budget: not every layer offloaded, nor any mix of kept layers."""

    def __init__(self, peak: int, budget: int, longest: int):
        super().__init__(f"the smallest predicted peak of any plan, {format_bytes(peak)}, exceeds the budget "
                         f"{format_bytes(budget)}")
        self.peak, self.budget, self.longest = peak, budget, longest


def plan_peak(shape: Shape, setting: Setting, keep: int, recompute: int) -> Estimate:
    """The estimate of a plan with `keep` kept, `recompute` recomputed and the rest offloaded layers."""
    offload = shape.layers - keep - recompute
    base = estimate(shape, replace(setting, mode="unsloth" if offload else "true"))
    tokens = setting.training_tokens
    hidden_tensor = tokens * shape.hidden * 2
    # keep_bytes_per_layer is fitted to mode none's grid (within 1%); a plan's predicted peak came out
    # 1-5% above the measured one at budgets 16-80 GiB, so it needs no further margin
    base.checkpoints_gpu = keep * keep_bytes_per_layer(shape, tokens, setting.lora_parameters,
                                                         dequantized_experts(setting)) + \
        recompute * hidden_tensor + aux_loss_bytes(shape, tokens)
    base.checkpoints_host = offload * hidden_tensor
    base.parked_host = base.parked_host * offload // shape.layers  # where the step parks at all
    # kept layers raise the training's peak, which generation and a reference pass may stay below
    settle_phases(shape, setting, base)
    return base


def plan_smart(shape: Shape, setting: Setting, budget: int, *, host_available: int | None = None,
               link_gbps: float | None = None, embeddings_movable: bool = False) -> LayerPlan:
    """The fastest per-layer plan whose predicted peak fits the budget.

    With `embeddings_movable`, the setting's host_embeddings is a choice, not an order: the table
    stays on the GPU if every layer is kept that way.

    Where no plan fits and the run's host LM head would be fetched whole (inputs shorter than
    `setting.stream_head_from` tokens), the plan streams it through the loss from the first token
    (Gemma-2-9B: 1.6 GiB less at 2048 tokens). Its block copies then no longer hide behind a short
    batch's matmuls (about 35 ms a step for Gemma-2-9B's head, computed, not timed): the price of a
    run that fits at all, so it is the last resort. Hence a budget just large enough for the whole
    head can keep fewer layers than a smaller one that streams it (Gemma-2-9B at 2048 tokens: 4
    kept in 6.5 GiB, streamed; none in 6.9 GiB, whole); which of the two runs faster is not measured.
    """
    if embeddings_movable and setting.host_embeddings:
        try:
            on_gpu = plan_smart(shape, replace(setting, host_embeddings=False), budget,
                                host_available=host_available, link_gbps=link_gbps)
        except NoPlanFits:
            on_gpu = None
        if on_gpu is not None and on_gpu.counts()[Policy.KEEP.value] == shape.layers:
            return on_gpu
    layers = shape.layers
    slow_link = link_gbps is not None and link_gbps < FAST_LINK_GBPS
    tokens = setting.training_tokens
    hidden_tensor = tokens * shape.hidden * 2
    host_layers = layers if host_available is None else min(layers, host_available // max(hidden_tensor, 1))

    def recompute_needed(keep: int) -> int:  # layers that find no host room stay on the GPU
        return max(0, layers - keep - host_layers)

    def fits(keep: int, recompute: int) -> bool:
        return plan_peak(shape, setting, keep, recompute).peak <= budget

    # The most kept layers that fit. Not a walk up from none kept: on small shapes the offload's fixed
    # costs (copy buffers, the recompute's working set) can put offloading every layer above keeping
    # every one (a tiny Llama at 1024 tokens: 306 MB offloaded, 315 with half kept, 308 all kept)
    fitting = [keep for keep in range(layers + 1) if fits(keep, recompute_needed(keep))]
    if not fitting:
        if not head_streams(setting) and head_streams(replace(setting, stream_head_from=0)):
            return plan_smart(shape, replace(setting, stream_head_from=0), budget, host_available=host_available,
                              link_gbps=link_gbps)
        minimum = min(plan_peak(shape, setting, keep, recompute_needed(keep)).peak for keep in range(layers + 1))
        longest = longest_sequence(shape, replace(setting, mode="unsloth"), budget)
        raise NoPlanFits(minimum, budget, longest)
    keep = max(fitting)
    recompute = recompute_needed(keep)
    if slow_link:
        # Copies would not hide: move offloaded layers back to the GPU while the budget allows.
        while keep + recompute < layers and fits(keep, recompute + 1):
            recompute += 1
    offload = layers - keep - recompute
    # Recomputed and offloaded layers first, kept layers last (the backward reaches them first).
    policies = [Policy.OFFLOAD] * offload + [Policy.RECOMPUTE] * recompute + [Policy.KEEP] * keep
    chosen = plan_peak(shape, setting, keep, recompute)
    return LayerPlan(policies=policies, peak=chosen.peak, host=chosen.host, budget=budget, link_gbps=link_gbps,
                     host_embeddings=setting.host_embeddings, stream_head_from=setting.stream_head_from,
                     streamed_head=head_streams(setting))
