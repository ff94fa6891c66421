"""The analytical memory model: peak VRAM (and host memory) of a training step, from the model's
shape and the recipe alone — no weights, no GPU.

Peak = weights (4-bit blocks + quantization constants + the modules kept in 16 bits)
     + LoRA parameters, gradients and optimizer states
     + the checkpoints kept on the GPU (every layer's activations for `none`, its input for `true`)
     + the working set of the step's busiest moment (a layer's recompute and backward, or the loss)

The busiest moment is usually a layer's backward. With the embedding tables in host memory and the
fused loss, the LM head is on the GPU only for the forward and the loss, or, from
STREAM_HEAD_MIN_TOKENS, only two blocks of it in the loss; that phase is counted on its own
(`loss`: what it needs beyond the layers' working set, zero when less).

The first three are counted exactly from the shape. The working set is measured: it is a number
of hidden-state-sized tensors (batch x tokens x hidden, 2 bytes) plus a constant, fitted per mode
on the GPU; mode `none`'s kept activations are counted from the shape (keep_bytes_per_layer). The
grid in tests/fixtures/memory_grid.json (modes none/true/unsloth, the Llama-3.1-8B and Qwen2.5-7B
shapes, batch 1 and 4, 2048-32768 tokens, kernels on; unsloth with the LM head on the GPU and in
host memory, and with attention's output parked at batch 1) holds every estimate within 5% of its
measurement (worst 4.0%; tests/test_estimate.py). Host memory counts what must fit (layer inputs,
embedding tables) apart from what offloaded layers park where there is room (`parked_host`).
Shapes and settings outside that grid are extrapolated by their sizes, and `calibrated` says so.

A mixture of experts (Mixtral, Qwen3-MoE) is counted from its shape: every expert's weights, in 4
bits under 4-bit loading (ftune quantizes the 3D experts as they load, ftune/integrations/experts.py;
in 16 bits under FSDP, which ftune leaves them in; the router stays 16-bit), their adapters where
LoRA adapts them, and the MoE block's activations, which are those of the routed rows (tokens x
experts per token). What the block saves for its backward is counted on CPU with saved-tensor
hooks (transformers 5.17's grouped_mm experts, 16-bit and 4-bit): moe_saved_bytes is within 2% of
it, experts adapted or not (tests/test_estimate.py). 4-bit experts are dequantized one layer at a
time and built again in its backward rather than saved: one layer's 16-bit experts (with their
update where adapted) are in the working set of the layer that runs, in no layer's saved
activations. The block's peak over its forward and backward (moe_block_peak_bytes) was measured on
CPU at the Qwen3-30B-A3B block's size, and the whole shape's step on an H200 (within 4% at 1024 to
16384 tokens).

DPO and GRPO train on more rows than their examples (DPO: chosen and rejected, concatenated; GRPO:
each prompt with its completion) and add phases of their own to a step, each counted as the loss's
phase is, by what it needs beyond the training's busiest moment: GRPO's generation (the KV cache of
its generation batch, the prefill, the sampling's logits) and a forward without gradients over the
training rows (DPO's reference pass; GRPO's with beta > 0, the adapter off). Both are counted from
the shape and TRL 1.16's and transformers 5.17's code (GRPOTrainer._generate_single_turn, DynamicCache),
and checked against bench_workflows' runs of the 8B shape on an H200: GRPO +3.7% and -6.8% (64- and
2048-token completions), DPO +1.4% (docs/benchmarks.md, 2026-12-02).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from math import ceil
from typing import Any

import psutil

from ftune.families import family_of
from ftune.memory.units import GiB
from ftune.model_config import model_config
from ftune.recipe import Recipe

BF16 = 2
# bitsandbytes NF4/FP4: two weights per byte, one absmax per 64 weights (fp32, or uint8 plus an
# fp32 per 256 absmax with double quantization).
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
# Optimizer bytes per trainable fp32 parameter: the parameter, its gradient, and AdamW's two
# moments (fp32), or one byte per moment for the 8-bit optimizers.
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}

# Working set in hidden-state tensors (batch * tokens * hidden * 2 bytes) and a constant, fitted on
# an H100 (docs/benchmarks.md, 2026-11-25; Llama-3.1-8B shape, batch 1, kernels on):
#   true:    6.81 / 8.95 / 11.49 GiB at 2048 / 8192 / 16384 tokens
#   unsloth: 5.51 / 6.24 / 6.91 GiB at 2048 / 8192 / 16384, 22.17 GiB at 151552 (the prefetched
#            layer input and flash attention's fp32 accumulators at long context raise its count)
WORKING_SET = {"true": (10.66, 0.266 * GiB), "unsloth": (14.64, 0.279 * GiB)}
# With the tables in host memory and the fused loss, the LM head is fetched when the first layer
# starts and dropped once the loss is done with it: it sits beside every layer's forward, not
# beside any layer's backward. That
# moment's working set besides the head, in hidden-state tensors and a constant, fitted on an H200
# (docs/benchmarks.md, 2026-11-26; Llama-3.1-8B shape, batch 1, unsloth, kernels on): peak 5.22 /
# 5.46 GiB at 2048 / 8192 tokens, where it is the step's peak; at 16384 (5.93 GiB) the layers'
# backward is, as before.
FORWARD_WITH_HEAD = (5.1, 0.184 * GiB)
# Offloaded layers that park their attention half (ftune/engine/attention.py) add two hidden-state
# tensors to the forward (the layer output is a new tensor beside the parked residual, and
# attention's output waits for its copy to host memory) and none to the backward's busiest moment.
# Fitted on an H200 (2026-11-26, h200/2026-11-26-grid-parked-residual-freed.json; the 8B and Qwen2.5-7B
# shapes, batch 1, 2048-32768 tokens): every cell within 2.7%.
PARKED_EXTRA_HIDDEN = {"working_set": 0.0, "forward_with_head": 2.0}
# The attention half's backward holds the projections' queries, keys and values and the rotated
# queries and keys: 576 of the 3.94 GiB peak of Phi-3-mini at 16384 tokens (H200, 2026-12-03,
# h200/2026-12-03-phi3-peak-16384.json). WORKING_SET was fitted on the Llama shape, whose keys and
# values are each a quarter of the hidden width (8 of 32 heads); a shape with wider ones holds three
# tensors of that extra width more (keys and values projected, keys rotated). Phi-3-mini (32 of 32
# heads) measured 5.1% and 4.5% over the estimate without this at 8192 and 16384 tokens.
FITTED_KV_WIDTH = 0.25
KV_SIZED_TENSORS_IN_ATTENTION_BACKWARD = 3
# A sandwich-norm layer (Gemma 2 and 3) whose recompute reruns attention (it does not park: Gemma-2's
# soft-capped attention) holds the rerun attention half's graph, with its two extra norms' outputs,
# through the MLP's backward: this many hidden-state tensors and bytes beyond WORKING_SET's fit.
# Fitted on one shape, Gemma-2-9B on an H200: 6.365 GiB at 8192 tokens with the LM head streamed,
# where the Llama fit says 5.937, and at most 7.36 GiB at 16384 (the whole-head run's peak, which
# its backward stays under). h200/2026-12-03-streamed-head-probe.json: the peak is in a layer's MLP
# backward, beside the attention half's q, k, v, rotated q and k, attention output and norm outputs.
SANDWICH_UNPARKED_EXTRA = (2.0, 0.319 * GiB)
# With the adapters inside the 4-bit base GEMMs (ftune/kernels/lora.py), the forward dequantizes
# gate and up together into one matrix: one MLP weight more (112 MiB for the 8B shape) beside the
# fetched LM head. It sets the 8B shape's peak at 8192 tokens (5.80 GiB on an H100 and an H200);
# the backward-bound peaks at longer sequences do not see it (docs/benchmarks.md).
AUGMENTED_MLP_TARGETS = {"gate_proj", "up_proj", "down_proj"}
# Without the fused loss, transformers' loss holds the logits in bf16, their fp32 copy and the fp32
# gradient: 11.2 bytes per logit (ftune true with and without kernels: +2.5 / 10.8 / 22.1 GiB at
# 2048 / 8192 / 16384 tokens of a 128256 vocabulary).
UNFUSED_LOSS_BYTES_PER_LOGIT = 11.2
# What the caching allocator reserves over the allocated peak, which is what runs out on a card:
# 24.00 GiB reserved for a 22.17 GiB peak at 151,552 tokens in a 24 GiB cap, where 172,032 tokens
# (estimated 23.47 GiB allocated) ran out (docs/benchmarks.md).
RESERVED_OVER_ALLOCATED = 1.08
# What a MoE block saves for its backward, per routed row (token x chosen expert), in 16-bit
# values of the expert intermediate size I and of hidden H: the gate and up projections' output
# (2I), the activation's output (I) and the routed rows' output that the routing weights scale
# (H). An adapted expert parameter needs a gradient, so its GEMM also saves its input: the gathered
# rows (H) for gate_up_proj, the gated product (I) for down_proj. Counted on CPU with saved-tensor
# hooks (hidden 256, intermediate 384, 6 experts, 2 per token, 1000 tokens; transformers 5.17's
# grouped_mm): exactly these tensors, and the router's and the routing's below.
MOE_SAVED_PER_ROUTED_ROW = (3, 1)  # (times I, times H); each adapted expert GEMM adds its input features
# The router's softmax (fp32, per token and expert); per routed row four int64 indices (the sort's
# order, the experts' ids, the gather's rows), its fp32 routing weight and masks: 43 bytes
ROUTER_SAVED_BYTES_PER_EXPERT = 4
ROUTING_BYTES_PER_ROUTED_ROW = 43
# The load-balancing loss keeps each layer's router logits (16-bit, returned by the layer) and
# their softmax (saved for the loss's backward) until the backward of the loss
AUX_LOSS_BYTES_PER_EXPERT = 2 * BF16
# Generation (TRL's GRPOTrainer generates its whole generation batch in one `generate` call): the KV
# cache holds, per token of every sequence, each layer's key and value in the model's dtype
# (transformers' DynamicCache: one [sequences, kv_heads, tokens, head_dim] tensor of each per layer).
# It grows by torch.cat, so one layer's keys exist twice for a moment; a static cache holds its whole
# size from the prefill on; the offloaded cache keeps it in host memory, with the layer that runs
# and the one being fetched on the GPU.
OFFLOADED_CACHE_LAYERS_ON_GPU = 2
# Sampling a token keeps, per sequence and vocabulary entry of the last position: the model's 16-bit
# logits, their fp32 copy, the processors' scores and the probabilities (transformers' _sample)...
SAMPLING_BYTES_PER_LOGIT = 2 + 4 + 4 + 4
# ... and top_p sorts the scores: the sorted values, their int64 order and their running sum
TOP_P_BYTES_PER_LOGIT = 4 + 8 + 4
# TRL's paged (continuous-batching) generation: ftune sizes transformers' pool of KV blocks to the
# generation batch (grpo.paged_generation) and lets a forward take this many tokens at once
PAGED_BLOCK_TOKENS = 256
PAGED_BATCH_TOKENS = 2048
# TRL's fused LM head (trl/kernels/chunked_logprob.py) projects tiles of 4096 tokens by this many
# vocabulary entries, in fp32, instead of the logits
TRL_HEAD_TILE = (4096, 4096)
# (model_type, hidden, layers) of the shapes the grid measured: Llama-3.1-8B and Qwen2.5-7B
MEASURED_SHAPES = {("llama", 4096, 32), ("qwen2", 3584, 28)}
# ... those measured with the LM head streamed through the loss (4-bit, unsloth with kernels, batch
# 1, 8192 tokens, on an H200: tests/fixtures/family_peaks.json): Llama-3.1-8B, Qwen3-8B, Mistral-7B
# and Gemma-2-9B
STREAMED_HEAD_MEASURED_SHAPES = {("llama", 4096, 32), ("qwen3", 4096, 36), ("mistral", 4096, 32),
                                 ("gemma2", 3584, 42)}
# ... and of other families' shapes measured on an H200 in 4 bits (the MoE's experts too), mode
# unsloth with kernels, batch 1, at 8192 and 16384 tokens (tests/fixtures/family_peaks.json):
# Gemma-2-9B, Gemma-3-4B, Phi-3-mini and Qwen3-30B-A3B
UNSLOTH_MEASURED_SHAPES = {("gemma2", 3584, 42), ("gemma3_text", 2560, 34), ("phi3", 3072, 32),
                           ("qwen3_moe", 2048, 48)}
# Where a config names no layer_types, transformers slides the window on all layers but one in
# every `sliding_window_pattern` (Gemma-2: 2, Gemma-3: 6), on every layer elsewhere (Phi-3, Mistral)
SLIDING_WINDOW_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6}
# Families whose config names a window that counts only with use_sliding_window: true (its default: false)
OPT_IN_SLIDING_WINDOW = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
# The attention implementations whose offloaded layers park their attention half
# (ftune/engine/attention.py): transformers' sdpa, and ftune's sliding-window attention
# (ftune/kernels/window_attention.py), which builds sdpa's masks where it builds any
PARKING_ATTENTION = ("sdpa", "ftune_window")

# Largest MLP intermediate (one tensor) that a recomputed layer's chunk creates (ftune/engine/halves.py);
# 128 MiB is 4608 tokens of an 8B Llama's 14336-wide MLP in bf16, large enough that the chunk's
# matmuls run at full speed.
MLP_CHUNK_BYTES = 128 * 1024**2
# DPO's reference rows ride the training forward (ftune/integrations/trl.py, ReferenceRidesTraining)
# in steps of at most this many training tokens. There the step is bound by the host's Python, not
# by the GPU (an 8B step on an H200 took the same time at 60 and at 960 tokens, docs/benchmarks.md),
# so the extra rows cost GPU time the host leaves idle and spare the reference's own forward.
REFERENCE_RIDES_MAX_TOKENS = 1024


def reference_ride_limit(intermediate: int | None) -> int:
    """The most training tokens (a DPO step's chosen and rejected rows) at which the rows of a
    reference that is the base model ride the training forward: REFERENCE_RIDES_MAX_TOKENS, and
    the doubled rows' MLP (`intermediate` wide; None: not known) in one of the engine's chunks even
    in fp32 (MLP_CHUNK_BYTES), where LoRA's row gate (integrations/peft.py, `adapters_on_first_rows`)
    sees whole rows. Gemma-3-27B's 21,504-wide MLP: 780 tokens."""
    if intermediate is None:
        return REFERENCE_RIDES_MAX_TOKENS
    return min(REFERENCE_RIDES_MAX_TOKENS, MLP_CHUNK_BYTES // (2 * 4 * intermediate))


def reference_rides(tokens: int, intermediate: int | None = None) -> bool:
    """Whether a DPO step of `tokens` training tokens runs its reference's rows in its training
    forward (`reference_ride_limit`)."""
    return tokens <= reference_ride_limit(intermediate)


# The fused loss's logits per chunk: MAX_CHUNK_LOGITS_BYTES of ftune/kernels/fused_linear_cross_entropy.py,
# which imports nothing of ftune (tests/test_estimate.py checks that the two agree)
LOSS_LOGITS_BYTES = 256 * 1024**2
# A host LM head (ftune/engine/host_memory.py's HostLMHead) streams through the loss, a block of
# rows at a time, in runs whose training rows reach this many tokens (head_streams); runs of shorter
# ones fetch it whole beside the forward's layers, where the copy hides. A block's copy from pinned
# memory takes about 1.3 ms at the H200's 50 GB/s; its two matmuls take about 1.8 ms at 8192
# tokens, 0.9 ms at 4096 and 0.45 ms at 2048 (computed from the card's bf16 rate, not timed). At
# 8192 tokens the streamed head measured within 2% of the whole head's speed on four shapes
# (docs/benchmarks.md, 2026-12-03); 4096 was not timed.
STREAM_HEAD_MIN_TOKENS = 4096
# The block (HostLMHead.rows_per_chunk): 9344 rows of Gemma-2's 3584-wide head, 8192 of Llama-3's;
# two are on the GPU at once (the one in use and the next, in flight).
STREAM_HEAD_BLOCK_BYTES = 64 * 1024**2

# When a step parks (ftune/engine/attention.py). Parking is a speed-up that takes twice the layer
# inputs' host memory: a step parks only while its inputs and parked halves take at most this share
# of the host's memory...
PARKING_HOST_SHARE = 0.5
# ... and it has at most this many tokens. With parking, 150,528 tokens of the 8B shape ran out of
# GPU memory in a 24 GiB cap on an H200 where 159,744 trained without it; 32768 tokens at batch 1
# are the longest step measured parked (docs/benchmarks.md).
PARKING_MAX_TOKENS = 32768
# ... and at least this many. A shorter step is bound by the host, not the GPU (an 8B DPO step took
# the same time at 60 and at 960 tokens, H200): the attention forward parking spares costs the GPU
# next to nothing there, while its copies and their bookkeeping cost the host. At about 120 tokens
# an 8B DPO step's training ran 5% faster without parking (steps alternating in one run, H200,
# docs/benchmarks.md).
PARKING_MIN_TOKENS = 1024


@dataclass(frozen=True)
class Shape:
    """What memory depends on: the sizes of a decoder-only transformer."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False
    # A mixture of experts: routed experts per layer (0: a dense MLP), the experts each token goes
    # through, and each expert's intermediate size
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    # Layers that see only the last `sliding_window` keys (Gemma-3: 5 in 6, Phi-3: all); 0: none
    sliding_window: int = 0
    sliding_layers: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Shape":
        text = config.get("text_config", config)
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        experts = text.get("num_local_experts") or text.get("num_experts") or 0  # Mixtral's name, Qwen3-MoE's
        return cls(
            model_type=text.get("model_type", config.get("model_type", "?")),
            vocab=text["vocab_size"], hidden=text["hidden_size"], intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"], heads=heads, kv_heads=text.get("num_key_value_heads", heads),
            head_dim=head_dim, tied=bool(text.get("tie_word_embeddings", False)),
            qkv_bias=text.get("model_type") == "qwen2" or bool(text.get("attention_bias", False)),
            experts=experts, experts_per_token=text.get("num_experts_per_tok", 0) if experts else 0,
            expert_intermediate=(text.get("moe_intermediate_size") or text["intermediate_size"]) if experts else 0,
            **_sliding_window(text),
        )

    @property
    def sandwich_norms(self) -> bool:
        """Each branch's output normed again before its residual add (Gemma 2 and 3: ftune.families)."""
        family = family_of(self.model_type)
        return family is not None and family.residual_halves == "sandwich_norm"

    @property
    def mask_kinds(self) -> int:
        """The masks transformers builds per forward: one per kind of layer (full, sliding)."""
        return 1 + (0 < self.sliding_layers < self.layers)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer (a mixture of experts has
        no linear layer in its MLP: see expert_parameters)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                     "o_proj": (q, self.hidden)}
        if self.experts:
            return attention
        return {**attention, "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    def expert_parameters(self) -> dict[str, tuple[int, int, int]]:
        """(experts, in, out) of each 3D expert parameter of one decoder layer, by its name in
        transformers (mlp.experts.<name>); none for a dense MLP."""
        if not self.experts:
            return {}
        inner = self.expert_intermediate
        return {"gate_up_proj": (self.experts, self.hidden, 2 * inner), "down_proj": (self.experts, inner, self.hidden)}

    def adapted_expert_parameters(self, names: tuple[str, ...]) -> list[tuple[int, int, int]]:
        """The expert parameters that LoRA's target_parameters names (matched by their last part,
        as peft matches them)."""
        parameters = self.expert_parameters()
        return [parameters[key] for key in {name.rpartition(".")[2] for name in names} if key in parameters]

    def fused_projections(self) -> dict[str, tuple[int, int]]:
        """The same projections fused as some families name them (Phi-3's qkv_proj and gate_up_proj)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"qkv_proj": (self.hidden, q + 2 * kv), "gate_up_proj": (self.hidden, 2 * self.intermediate)}


def _sliding_window(text: dict[str, Any]) -> dict[str, int]:
    """Shape's sliding_window and sliding_layers from a config, as transformers reads it."""
    window = text.get("sliding_window")
    if not window or not text.get("use_sliding_window", text.get("model_type") not in OPT_IN_SLIDING_WINDOW):
        return {}
    layers = text["num_hidden_layers"]
    if text.get("layer_types"):
        sliding = sum(kind == "sliding_attention" for kind in text["layer_types"])
    else:
        pattern = text.get("sliding_window_pattern") or SLIDING_WINDOW_PATTERNS.get(text.get("model_type"))
        sliding = layers - layers // pattern if pattern else layers
    return {"sliding_window": int(window), "sliding_layers": sliding} if sliding else {}


@dataclass
class Setting:
    """The choices that memory depends on (ftune.plan.RunPlan.setting: a resolved recipe's)."""

    mode: str = "unsloth"
    seq: int = 2048
    batch: int = 1
    quantized: bool = True
    double_quant: bool = True
    # Under 4-bit loading, a mixture of experts' 3D experts in 4 bits too (all but FSDP: ftune.plan.quantizes_experts)
    quantized_experts: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Parameters adapted through peft's target_parameters (a mixture of experts' weights)
    lora_parameters: tuple[str, ...] = ()
    fused_loss: bool = True
    host_embeddings: bool = True
    # With the tables in host memory and the fused loss, the LM head too: on the GPU for the forward
    # and the loss, not for the layers' backward (ftune.engine.host_memory.HostLMHead) ...
    host_lm_head: bool = True
    # ... or, in a run whose training rows reach `stream_head_from` tokens, only two blocks of it at
    # a time, in ftune's loss (head_streams; False: TRL's fused heads for DPO and GRPO, which read it
    # whole; measurements made before the loss could stream it). Mode smart streams it from the
    # first token where nothing fits otherwise (ftune.memory.policy.plan_smart).
    streamed_head: bool = True
    stream_head_from: int = STREAM_HEAD_MIN_TOKENS
    # Offloaded layers park their attention half beside their input, where the engine's rule allows
    # (`parks`: tokens and a share of host memory; attention through sdpa or ftune_window:
    # PARKING_ATTENTION) ...
    parked_attention: bool = True
    # ... of this much host memory (None: this machine's)
    host_memory: int | None = None
    optimizer: str = "adamw_torch"
    # The rows each example trains as: DPO's chosen and rejected, which TRL's DPOTrainer concatenates
    rows_per_example: int = 1
    # GRPO: tokens generated after each prompt of `seq` tokens (a training row holds both) ...
    completion: int = 0
    # ... for this many batches at once (TRL's steps_per_generation: its generation batch is batch x
    # generation_steps sequences); 0: the step generates nothing
    generation_steps: int = 0
    # transformers' KV cache: dynamic (grows), static (whole from the prefill), offloaded (in host
    # memory, a layer at a time on the GPU), paged (TRL's continuous batching, blocks)
    generation_cache: str = "dynamic"
    top_p: float = 1.0
    # A forward without gradients over the training rows before the training forward: DPO's
    # reference, GRPO's reference (beta > 0) or its old log-probabilities
    reference_pass: bool = False
    # TRL's frozen fp32 copy of the adapter, `ref`, the reference of a run that continues an adapter
    # (DPO, and GRPO with beta > 0, with model.adapter)
    reference_adapter: bool = False
    # DPO with a new adapter, whose reference is the base model: in steps of at most this many
    # training tokens (reference_ride_limit, for the model's MLP width) the reference's rows ride
    # the training forward, beside the chosen and rejected ones, and the reference pass does not
    # run; 0: they never ride
    reference_rides_up_to: int = 0
    # Tokens of an evaluation forward (data.eval: eval batch x rows per example x max_length); 0: none
    eval_tokens: int = 0
    # Modes true, unsloth and smart: a step of at most this many training tokens keeps every
    # layer's activations, as mode none does, and streams a host LM head through its loss
    # (keeps_layers; ftune.plan sets it, short_steps_keep_up_to); 0: every step runs the mode
    keep_up_to: int = 0
    # transformers' boolean masks under sdpa (and ftune_window where it falls back to sdpa's), one
    # byte per query and key, which the layers' recompute keeps to the end of the step (mask_bytes).
    # The batch's rows end to end in one sequence (padding-free or packed): a dense mask of tokens x
    # tokens from the position ids (block-diagonal causal) per kind of layer. 16k tokens: 256 MiB;
    # 64k: 4 GiB.
    dense_packed_mask: bool = False
    # Several padded rows: padding puts every row's mask in full, row x tokens x tokens per kind
    padded_masks: bool = False
    # Sliding-window layers under sdpa: a dense mask of tokens x tokens where a row is longer than
    # the window (ftune_window builds none)
    dense_window_mask: bool = False

    @property
    def reference_riding(self) -> bool:
        """Whether the reference's rows ride the training forward at this length."""
        return self.reference_pass and \
            self.batch * self.rows_per_example * (self.seq + self.completion) <= self.reference_rides_up_to

    @property
    def evaluation_tokens(self) -> int:
        """Tokens of an evaluation forward: eval_tokens, twice over where the reference rides it."""
        rides = self.reference_pass and self.eval_tokens <= self.reference_rides_up_to
        return self.eval_tokens * (2 if rides else 1)

    @property
    def training_rows(self) -> int:
        """Rows of the training forward: batch x rows per example, twice over with the reference's riding."""
        return self.batch * self.rows_per_example * (2 if self.reference_riding else 1)

    @property
    def training_tokens(self) -> int:
        """Tokens of the training forward: its rows x (prompt or row + completion)."""
        return self.training_rows * (self.seq + self.completion)

    @property
    def generations(self) -> int:
        """Sequences generated at once (TRL's generation_batch_size)."""
        return self.batch * self.generation_steps


@dataclass
class Estimate:
    """Bytes per part of a training step's peak, and whether the model was fitted for this case."""

    quantized_weights: int = 0
    quant_constants: int = 0
    weights_16bit: int = 0
    lora_parameters: int = 0
    lora_gradients: int = 0
    optimizer_states: int = 0
    checkpoints_gpu: int = 0
    working_set: int = 0
    loss: int = 0
    # What GRPO's generation, the forward without gradients (DPO's reference pass) and an
    # evaluation's forward need beyond the training's busiest moment (zero when less): phases of
    # the step, as `loss` is
    generation: int = 0
    reference: int = 0
    evaluation: int = 0
    # The generation's KV cache on the GPU at its fullest, part of `generation`'s phase (for the table)
    kv_cache: int = 0
    checkpoints_host: int = 0
    embedding_host: int = 0
    # What offloaded layers park beside their input when host memory has room for it (the residual
    # after attention, attention's output and log-sum-exp: ftune/engine/attention.py); optional
    parked_host: int = 0
    calibrated: bool = True
    notes: list[str] = field(default_factory=list)

    GPU_PARTS = ("quantized_weights", "quant_constants", "weights_16bit", "lora_parameters", "lora_gradients",
                 "optimizer_states", "checkpoints_gpu", "working_set", "loss", "generation", "reference", "evaluation")

    @property
    def peak(self) -> int:
        return sum(getattr(self, part) for part in self.GPU_PARTS)

    @property
    def host(self) -> int:
        """Host memory the step uses where there is room for everything it parks."""
        return self.required_host + self.parked_host

    @property
    def required_host(self) -> int:
        """Host memory without which layer inputs or embedding tables stay on the GPU."""
        return self.checkpoints_host + self.embedding_host

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(peak=self.peak, host=self.host)
        return data


def estimate(shape: Shape, setting: Setting) -> Estimate:
    """Predicted peak allocated VRAM of one training step (and the host memory it uses)."""
    check_setting(setting)
    result = Estimate()
    tokens = setting.training_tokens
    hidden_tensor = tokens * shape.hidden * BF16
    linear = sum(i * o for i, o in shape.projections().values()) * shape.layers
    # a mixture of experts' experts (3D parameters, 4-bit where ftune quantizes them) and router (16-bit)
    stacks = sum(e * i * o for e, i, o in shape.expert_parameters().values()) * shape.layers
    result.weights_16bit += shape.experts * shape.hidden * shape.layers * BF16
    if stacks and setting.quantized and not dequantized_experts(setting):
        result.weights_16bit += stacks * BF16
        result.notes.append(f"the experts' weights ({stacks * BF16 / GiB:.1f} GiB) stay 16-bit under 4-bit loading "
                            "with FSDP")
    elif stacks and not setting.quantized:
        result.weights_16bit += stacks * BF16
    if setting.quantized:
        quantized = linear + (stacks if dequantized_experts(setting) else 0)
        result.quantized_weights = quantized // 2
        absmax = quantized // QUANT_BLOCK
        result.quant_constants = absmax + absmax // DOUBLE_QUANT_BLOCK * 4 if setting.double_quant else absmax * 4
    else:
        result.weights_16bit += linear * BF16
    embedding = shape.vocab * shape.hidden * BF16
    norms = (2 * shape.layers + 1) * shape.hidden * BF16
    biases = (shape.heads + 2 * shape.kv_heads) * shape.head_dim * BF16 * shape.layers if shape.qkv_bias else 0
    host_head = lm_head_fetched(setting)
    # a tied table leaves the GPU only with the head (ftune.engine.host_memory.move_tables_to_host)
    host_embedding = setting.host_embeddings and (host_head or not shape.tied)
    result.weights_16bit += norms + biases + (0 if host_head or shape.tied else embedding) + \
        (0 if host_embedding else embedding)
    result.embedding_host = (1 if shape.tied or not host_head else 2) * embedding if host_embedding else 0

    projections = {**shape.projections(), **shape.fused_projections()}
    lora = sum(setting.lora_r * sum(projections[t]) for t in setting.lora_targets if t in projections) * shape.layers
    # one rank-r adapter per expert (peft's ParamWrapper: A is r x experts by in, B out by r x experts)
    lora += sum(setting.lora_r * e * (i + o) for e, i, o in shape.adapted_expert_parameters(setting.lora_parameters)) \
        * shape.layers
    result.lora_parameters = lora * 4 * (2 if setting.reference_adapter else 1)
    result.lora_gradients = lora * 4
    result.optimizer_states = lora * OPTIMIZER_STATE_BYTES.get(setting.optimizer, 8)

    mode = "none" if keeps_layers(setting) else setting.mode
    if mode == "smart":
        raise ValueError("estimate a smart plan through plan_smart(), which picks the policies")
    if mode != setting.mode:
        result.notes.append(f"a step of at most {setting.keep_up_to} tokens keeps every layer's activations, as "
                            "mode none does (nothing recomputed or offloaded), and streams the LM head through its "
                            "loss: it peaks no higher than the run's longest step")
    count, constant = WORKING_SET["true" if mode == "none" else mode]
    parked = mode == "unsloth" and setting.parked_attention and parks_attention(shape, tokens, setting.host_memory)
    if parked:
        count += PARKED_EXTRA_HIDDEN["working_set"]
    if shape.sandwich_norms and mode != "none" and not parked:
        count, constant = count + SANDWICH_UNPARKED_EXTRA[0], constant + SANDWICH_UNPARKED_EXTRA[1]
    result.working_set = int(count * hidden_tensor + constant) + wider_attention_bytes(shape, tokens)
    if shape.experts:  # the MoE block at its busiest (what it saved is among the checkpoints in mode none)
        dequantized = dequantized_experts(setting)
        if dequantized:
            result.working_set += moe_block_peak_bytes(shape, tokens, setting.lora_parameters,
                                                       with_saved=mode != "none")
        else:
            result.working_set += moe_backward_bytes(shape, tokens, setting.lora_parameters) + \
                (0 if mode == "none" else moe_saved_bytes(shape, tokens, setting.lora_parameters))
    result.checkpoints_gpu = aux_loss_bytes(shape, tokens) + \
        mask_bytes(shape, setting, setting.training_rows, setting.seq + setting.completion)
    if mode == "true":
        result.checkpoints_gpu += shape.layers * hidden_tensor
    elif mode == "unsloth":
        result.checkpoints_host = shape.layers * hidden_tensor
        result.parked_host = shape.layers * parked_bytes_per_layer(shape, tokens) if parked else 0
    else:  # none: every activation of every layer stays
        result.checkpoints_gpu += shape.layers * keep_bytes_per_layer(shape, tokens, setting.lora_parameters,
                                                                      dequantized_experts(setting))
    if not setting.fused_loss:
        result.loss = int(UNFUSED_LOSS_BYTES_PER_LOGIT * tokens * shape.vocab)
    elif host_head:
        # The head is on the GPU for the forward and the loss only: the step peaks there when the
        # head outweighs what the busiest layer's backward adds over its forward (shorter sequences).
        # A streamed head is not beside the forward's layers, only two blocks of it beside the loss.
        count, constant = FORWARD_WITH_HEAD
        if parked:
            count += PARKED_EXTRA_HIDDEN["forward_with_head"]
        forward = int(count * hidden_tensor + constant)
        if setting.quantized and AUGMENTED_MLP_TARGETS <= set(setting.lora_targets):
            forward += shape.intermediate * shape.hidden * BF16
        if head_streams(setting):
            forward_with_head = max(forward, streamed_loss_bytes(shape, tokens))
        else:
            forward_with_head = embedding + forward
        result.loss = max(0, forward_with_head - result.working_set)
    settle_phases(shape, setting, result)
    if setting.generations or setting.reference_pass:
        result.calibrated = False
        result.notes.append("the generation and the reference pass are counted from the shape and TRL's code "
                            "(within 7% of the 8B shape's GPU peaks)")
    key = (shape.model_type, shape.hidden, shape.layers)
    measured = (key in MEASURED_SHAPES and setting.batch <= 4 and tokens <= 4 * 32768) or \
        (key in UNSLOTH_MEASURED_SHAPES and mode == "unsloth" and setting.batch == 1 and 8192 <= tokens <= 16384
         and setting.quantized and (not shape.experts or dequantized_experts(setting)))
    if head_streams(setting):
        if not (key in STREAMED_HEAD_MEASURED_SHAPES and mode == "unsloth" and setting.batch == 1 and tokens == 8192
                and setting.quantized):
            result.calibrated = False
            result.notes.append("with the LM head streamed through the loss, measured on the Llama-3.1-8B, Qwen3-8B, "
                                "Mistral-7B and Gemma-2-9B shapes only (4-bit, unsloth, batch 1, 8192 tokens); this "
                                "setting is extrapolated by its sizes")
    elif not measured or not setting.fused_loss:
        result.calibrated = False
        result.notes.append("measured on the Llama-3.1-8B and Qwen2.5-7B shapes (batch 1-4, up to 32768 tokens, "
                            "kernels on) and on Gemma-2-9B, Gemma-3-4B, Phi-3-mini and Qwen3-30B-A3B (4-bit, unsloth, "
                            "batch 1, 8192 to 16384 tokens); this setting is extrapolated by its sizes")
    return result


def check_setting(setting: Setting) -> None:
    """A ValueError for sizes no step can have (a negative batch would give a negative peak)."""
    for name in ("seq", "batch", "lora_r", "rows_per_example"):
        value = getattr(setting, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive whole number, not {value!r}")
    for name in ("completion", "generation_steps"):
        value = getattr(setting, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number of at least 0, not {value!r}")
    if setting.generation_cache not in GENERATION_CACHES:
        raise ValueError(f"generation_cache is one of {', '.join(GENERATION_CACHES)}, not {setting.generation_cache!r}")


GENERATION_CACHES = ("dynamic", "static", "offloaded", "paged")


def lm_head_fetched(setting: Setting) -> bool:
    """Whether the LM head lives in host memory and is fetched to the GPU for each forward (and kept
    through generation and forwards without gradients: ftune.engine.host_memory.HostLMHead)."""
    return setting.host_embeddings and setting.host_lm_head and setting.fused_loss


def head_streams(setting: Setting) -> bool:
    """Whether the step's loss reads the host LM head in blocks (HostLMHead), in its training and
    its evaluation forwards alike: in a run whose training rows reach `setting.stream_head_from`
    tokens (HostLMHead.streams_the_loss: decided once for the run, not per batch, so that a shorter
    batch never peaks above the planned one with the whole head beside its forward; a short
    batch's matmuls then leave the blocks' copies exposed, Gemma-2-9B's 1.75 GiB head: about 35 ms
    at 50 GB/s, computed, not timed), and in a step that keeps its layers (keeps_layers)."""
    return lm_head_fetched(setting) and (keeps_layers(setting) or setting.streamed_head and
                                         setting.training_tokens >= setting.stream_head_from)


def keeps_layers(setting: Setting) -> bool:
    """Whether this step keeps every layer's activations, as mode none does, in mode true, unsloth
    or smart: at most `setting.keep_up_to` training tokens."""
    return setting.mode in ("true", "unsloth", "smart") and setting.training_tokens <= setting.keep_up_to


def short_steps_keep_up_to(shape: Shape, setting: Setting, budget: int | None = None) -> int:
    """The most training tokens of a step that keeps every layer's activations (keeps_layers) and
    still peaks no higher than `budget` (mode smart's), or than the run's longest step
    (`setting.seq`) in its own mode: 0 where no step can. Recomputing a layer costs what its
    forward costs, and in a short step that is the host's Python and launches, not the GPU's
    arithmetic: the 8B shape's 120-token DPO step ran 1.33x faster keeping its layers (the head
    streamed) than in mode unsloth, at a 0.33 GiB lower peak (H200, bench_dpo_alternating.py
    --choice keep)."""
    if setting.mode not in ("true", "unsloth", "smart") or setting.mode == "smart" and budget is None:
        return 0
    planned = budget if budget is not None else estimate(shape, replace(setting, keep_up_to=0)).peak

    def keeping(seq: int) -> Setting:
        step = replace(setting, seq=seq)
        return replace(step, keep_up_to=step.training_tokens)

    def fits(seq: int) -> bool:
        return estimate(shape, keeping(seq)).peak <= planned

    if not fits(1):
        return 0
    low, high = 1, setting.seq  # fits(low); the largest such seq, the peak rising with it
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return keeping(low).training_tokens


def stream_block_rows(hidden: int, itemsize: int = BF16) -> int:
    """Rows of a streamed head per block (HostLMHead.rows_per_chunk): within STREAM_HEAD_BLOCK_BYTES,
    whole 128-row tiles for the loss's matmuls."""
    return max(128, STREAM_HEAD_BLOCK_BYTES // (hidden * itemsize) // 128 * 128)


def streamed_loss_bytes(shape: Shape, tokens: int) -> int:
    """The fused loss reading a streamed head (ftune/kernels/fused_linear_cross_entropy.py): two
    blocks of the head, a chunk of logits against one block, and per token and hidden unit the
    fp32 gradient being accumulated, the labels' rows of the head, the hidden states and their
    gradient (bf16). A head of at most one block's rows is one block, of its own size."""
    block_rows = min(stream_block_rows(shape.hidden), shape.vocab)
    blocks = 1 if block_rows == shape.vocab else 2
    logits = min(tokens * block_rows * BF16, LOSS_LOGITS_BYTES)
    return blocks * block_rows * shape.hidden * BF16 + logits + tokens * shape.hidden * (4 + 3 * BF16)


def settle_phases(shape: Shape, setting: Setting, result: Estimate) -> None:
    """Generation and the forward without gradients as phases of the step: what each needs beyond
    the training's busiest moment (its gradients, checkpoints, working set and loss), zero when less.
    Both see the weights and optimizer states; the LoRA gradients do not exist yet (the optimizer
    sets them to None) and the fetched LM head stays on the GPU from generation (and TRL's
    reference pass) to the training's backward. Called again when the checkpoints change
    (ftune.memory.policy.plan_peak)."""
    training = result.lora_gradients + result.checkpoints_gpu + result.working_set + result.loss
    head = shape.vocab * shape.hidden * BF16 if lm_head_fetched(setting) else 0
    generation = head + generation_bytes(shape, setting) if setting.generations else 0
    reference = 0
    if setting.reference_pass and not setting.reference_riding:
        reference = head + no_grad_forward_bytes(shape, setting.training_tokens, setting.quantized) + \
            trl_head_bytes(setting.training_tokens)
    # An evaluation's forward runs between optimizer steps, as the generation does: beside the
    # weights and optimizer states only (no LoRA gradients, no checkpoints), its MLP in chunks as
    # the training's recompute, its head streamed through the loss where the training's is
    evaluation = 0
    eval_tokens = setting.evaluation_tokens
    if eval_tokens:
        forward = no_grad_forward_bytes(shape, eval_tokens, setting.quantized, chunked_mlp=True)
        if head_streams(setting):
            evaluation = max(forward, streamed_loss_bytes(shape, eval_tokens))
        else:
            evaluation = head + forward
        evaluation += mask_bytes(shape, setting, max(1, eval_tokens // setting.seq), setting.seq)
    result.kv_cache = kv_cache_on_gpu(shape, setting) if setting.generations else 0
    result.generation = max(0, generation - training)
    result.reference = max(0, reference - training - result.generation)
    result.evaluation = max(0, evaluation - training - result.generation - result.reference)


def kv_cache_bytes(shape: Shape, tokens: int) -> int:
    """The keys and values of `tokens` tokens in every layer (16-bit)."""
    return tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim * BF16


def cache_tokens(setting: Setting) -> int:
    """Tokens the KV cache holds at its fullest: every sequence's prompt and completion (the paged
    pool: whole blocks per sequence)."""
    length = setting.seq + setting.completion
    if setting.generation_cache == "paged":
        length = ceil(length / PAGED_BLOCK_TOKENS) * PAGED_BLOCK_TOKENS
    return setting.generations * length


def kv_cache_on_gpu(shape: Shape, setting: Setting) -> int:
    """The generation's KV cache on the GPU at its fullest."""
    full = kv_cache_bytes(shape, cache_tokens(setting))
    if setting.generation_cache == "offloaded":
        return full * OFFLOADED_CACHE_LAYERS_ON_GPU // shape.layers
    return full


def generation_bytes(shape: Shape, setting: Setting) -> int:
    """What generating the generation batch holds at its busiest, the LM head aside: the prefill
    (the prompts' forward beside their cache, or the whole static or paged cache) or the last token
    (the full cache, a layer's keys twice while the dynamic cache grows, and the sampling's logits)."""
    sequences, cache = setting.generations, setting.generation_cache
    full = kv_cache_on_gpu(shape, setting)
    prefill_tokens = sequences * setting.seq
    if cache == "paged":  # transformers' forward takes PAGED_BATCH_TOKENS, its logits in fp32 (its own count)
        prefill_tokens = min(prefill_tokens, PAGED_BATCH_TOKENS)
        at_prefill = full + no_grad_forward_bytes(shape, prefill_tokens, setting.quantized) + \
            prefill_tokens * shape.vocab * 4
    else:
        prompts_cache = full if cache == "static" else kv_cache_on_gpu(shape, replace(setting, completion=0))
        at_prefill = prompts_cache + no_grad_forward_bytes(shape, prefill_tokens, setting.quantized)
    growing = kv_cache_bytes(shape, cache_tokens(setting)) // (2 * shape.layers) if cache == "dynamic" else 0
    per_logit = SAMPLING_BYTES_PER_LOGIT + (TOP_P_BYTES_PER_LOGIT if setting.top_p < 1 else 0)
    at_last_token = full + growing + sequences * shape.vocab * per_logit
    return max(at_prefill, at_last_token)


def no_grad_forward_bytes(shape: Shape, tokens: int, quantized: bool, chunked_mlp: bool = False) -> int:
    """A decoder layer's busiest moment in a forward without gradients (the prefill, a reference
    pass; the engine stands aside): the residual stream and the normed input beside the MLP's gate,
    up and product (a MoE block's routed rows), or attention's query, key, value and output where
    larger; and with 4-bit weights gate and up dequantized together for the GEMM. `chunked_mlp`:
    a dense MLP runs in chunks of tokens, as the engine runs an evaluation's forward
    (MLP_CHUNK_BYTES per intermediate; a MoE block runs whole)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if shape.experts:
        mlp = tokens * (shape.experts_per_token * 3 * shape.expert_intermediate + shape.hidden)
    else:
        rows = min(tokens, max(1, MLP_CHUNK_BYTES // (BF16 * shape.intermediate))) if chunked_mlp else tokens
        mlp = rows * 3 * shape.intermediate
    attention = tokens * (2 * q + 2 * kv + shape.hidden)
    dequantized = 2 * shape.intermediate * shape.hidden if quantized else 0
    return BF16 * (2 * tokens * shape.hidden + max(mlp, attention) + dequantized)


def mask_bytes(shape: Shape, setting: Setting, rows: int, length: int) -> int:
    """The dense boolean masks of a forward over `rows` rows of `length` tokens (Setting's
    dense_packed_mask, padded_masks, dense_window_mask): the rows end to end, one mask over all
    their tokens per kind of layer; several padded rows, one per row and kind; else, under sdpa,
    the sliding layers' where a row is longer than their window."""
    if setting.dense_packed_mask:
        return shape.mask_kinds * (rows * length) ** 2
    if setting.padded_masks and rows > 1:
        return shape.mask_kinds * rows * length ** 2
    if setting.dense_window_mask and shape.sliding_layers and length > shape.sliding_window:
        return length ** 2
    return 0


def trl_head_bytes(tokens: int) -> int:
    """TRL's fused LM head (fused_lm_head=True): one fp32 tile of logits and the per-token log-probs."""
    rows, columns = TRL_HEAD_TILE
    return min(tokens, rows) * columns * 4 + tokens * 4


def wider_attention_bytes(shape: Shape, tokens: int) -> int:
    """What the attention half's backward holds beyond WORKING_SET's fit, for keys and values wider
    than the Llama shape's (FITTED_KV_WIDTH of the hidden width each)."""
    kv_width = shape.kv_heads * shape.head_dim / shape.hidden
    extra = max(0.0, kv_width - FITTED_KV_WIDTH) * KV_SIZED_TENSORS_IN_ATTENTION_BACKWARD
    return int(extra * tokens * shape.hidden * BF16)


def parks(tokens: int, step_bytes: int, host_memory: int | None = None) -> bool:
    """Whether a step of this many tokens, whose layer inputs and parked halves take `step_bytes`,
    parks its offloaded layers' attention halves (PARKING_MIN_TOKENS to PARKING_MAX_TOKENS,
    PARKING_HOST_SHARE of `host_memory`, by default this machine's): the rule of the engine and of
    this model both."""
    if host_memory is None:
        host_memory = psutil.virtual_memory().total
    return PARKING_MIN_TOKENS <= tokens <= PARKING_MAX_TOKENS and step_bytes <= PARKING_HOST_SHARE * host_memory


def parks_attention(shape: Shape, tokens: int, host_memory: int | None = None) -> bool:
    """Whether offloaded layers park their attention half in a step of this many tokens."""
    return parks(tokens, shape.layers * (tokens * shape.hidden * BF16 + parked_bytes_per_layer(shape, tokens)),
                 host_memory)


def parked_bytes_per_layer(shape: Shape, tokens: int) -> int:
    """What an offloaded layer parks besides its input: the residual after attention and attention's
    output (bf16), and its log-sum-exp (fp32, one per token and head)."""
    return tokens * (BF16 * (shape.hidden + shape.heads * shape.head_dim) + 4 * shape.heads)


def keep_bytes_per_layer(shape: Shape, tokens: int, lora_parameters: tuple[str, ...] = (),
                         dequantized: bool = False) -> int:
    """Activations one decoder layer keeps for backward when nothing is recomputed (bf16, kernels on).

    Per token: the layer input, both norm outputs and the residual sum (4 x hidden), the rotated
    query and its attention output (2 x q), key and value (2 x kv), and the MLP's gate, up and
    product (3 x intermediate), or what a MoE block saves (moe_saved_bytes). Mode none's grid cells
    come out 0.1-1.0% above their measurements.
    """
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = tokens * BF16 * (4 * shape.hidden + 2 * q + 2 * kv)
    if shape.experts:
        return attention + moe_saved_bytes(shape, tokens, lora_parameters, dequantized)
    return attention + tokens * BF16 * 3 * shape.intermediate


def dequantized_experts(setting: Setting) -> bool:
    """Whether a mixture of experts' experts are 4-bit, dequantized a layer at a time as it runs."""
    return setting.quantized and setting.quantized_experts


def moe_saved_bytes(shape: Shape, tokens: int, lora_parameters: tuple[str, ...] = (), dequantized: bool = False) -> int:
    """What one MoE block saves for its backward: its routed rows' intermediates
    (MOE_SAVED_PER_ROUTED_ROW), the router's softmax and the routing, and the adapted experts'
    weights with their update, which peft builds as a new 16-bit tensor each forward and the experts'
    GEMMs save. 4-bit experts (`dequantized`) save no weight: their backward builds them again."""
    adapted = shape.adapted_expert_parameters(lora_parameters)
    inner, hidden = MOE_SAVED_PER_ROUTED_ROW
    per_row = BF16 * (inner * shape.expert_intermediate + hidden * shape.hidden + sum(i for _, i, _ in adapted))
    rows = tokens * shape.experts_per_token
    return (rows * (per_row + ROUTING_BYTES_PER_ROUTED_ROW) + tokens * shape.experts * ROUTER_SAVED_BYTES_PER_EXPERT
            + (0 if dequantized else sum(e * i * o for e, i, o in adapted) * BF16))


def moe_backward_bytes(shape: Shape, tokens: int, lora_parameters: tuple[str, ...] = ()) -> int:
    """What a MoE block of 16-bit experts adds at its backward's busiest, counted from its operations
    (not measured): the gradients of the gate and up projections' output and of their input rows,
    and with adapted experts the gradient of the largest expert weight, through which peft's
    adapters get theirs."""
    rows = tokens * shape.experts_per_token
    weight_gradient = max((e * i * o for e, i, o in shape.adapted_expert_parameters(lora_parameters)), default=0)
    return BF16 * (rows * (2 * shape.expert_intermediate + shape.hidden) + weight_gradient)


def moe_block_peak_bytes(shape: Shape, tokens: int, lora_parameters: tuple[str, ...] = (),
                         with_saved: bool = True) -> int:
    """The peak of a MoE block of 4-bit experts over its forward and backward (ftune's path: each
    stack dequantized, with its update where adapted, and built again in the backward), beyond its
    input: the largest of three moments, each holding every stack in 16 bits
      the forward's end: what the block saves, and per routed row the gate and up projections'
        output and two hidden-wide rows (the experts' output and its weighted copy);
      down_proj's backward: its gradient where adapted, and per row the gate and up output (saved)
        and the gradient of the rows' output;
      gate_up_proj's backward: its gradient where adapted, and per row the gradient of its output,
        its input rows and their gradient.
    Measured on CPU for one block of the Qwen3-30B-A3B shape (bf16, transformers 5.17's grouped_mm,
    peft's LoRA r=16 on both stacks at 256 to 8192 tokens, on down_proj alone or on neither at 1024
    and 4096; the profiler's allocations): every case within 2.6%. `with_saved`: the block's saved
    tensors are its own (a recomputed layer), else they are counted among the checkpoints (mode none)."""
    rows = tokens * shape.experts_per_token
    inner, hidden = shape.expert_intermediate, shape.hidden
    stacks = {name: BF16 * e * i * o for name, (e, i, o) in shape.expert_parameters().items()}
    adapted = {name.rsplit(".", 1)[-1] for name in lora_parameters}
    gradient = {name: size if name in adapted else 0 for name, size in stacks.items()}
    saved = moe_saved_bytes(shape, tokens, lora_parameters, dequantized=True) if with_saved else 0
    forward_end = saved + BF16 * rows * (2 * inner + 2 * hidden)
    down_backward = gradient.get("down_proj", 0) + BF16 * rows * (2 * inner + hidden)
    gate_up_backward = gradient.get("gate_up_proj", 0) + BF16 * rows * (2 * inner + 2 * hidden)
    return sum(stacks.values()) + max(forward_end, down_backward, gate_up_backward)


def aux_loss_bytes(shape: Shape, tokens: int) -> int:
    """What the router's load-balancing loss keeps until its backward: every layer's router logits
    and their softmax (none for a dense model)."""
    return shape.layers * tokens * shape.experts * AUX_LOSS_BYTES_PER_EXPERT


def allocatable(card_bytes: int) -> int:
    """The allocated peak that a card (or a memory cap) of this size holds, the allocator's reserve aside."""
    return int(card_bytes / RESERVED_OVER_ALLOCATED)


def _most_that_fits(fits, split: int, last: int) -> int:
    """The largest n in [1, last] with fits(n), where fits holds up to some n on each side of
    `split` (the first n at which the run streams its LM head, and its peak drops: Gemma-2-9B's,
    6.99 GiB at 4095 tokens, 5.51 at 4096); 0 if none. One search across the step can stop below
    it and miss every n above; each side is searched on its own, the upper one first."""

    def most_within(first: int, end: int) -> int:  # the largest n in [first, end] that fits, else first - 1
        low, high = first - 1, end
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low

    split = min(max(1, split), last + 1)
    most = most_within(split, last)
    return max(0, most if most >= split else most_within(1, split - 1))


def longest_sequence(shape: Shape, setting: Setting, budget: int, *, step: int = 256, limit: int = 1 << 21) -> int:
    """The longest sequence (a multiple of `step`) whose estimated peak fits the budget; 0 if none
    (Gemma-2-9B in 5.6 GiB at batch 3: 1536 tokens, where one search across the head's step found
    none)."""
    rows = setting.batch * setting.rows_per_example
    first_streamed = -(-setting.stream_head_from // rows) - setting.completion  # the shortest sequence that streams
    return step * _most_that_fits(lambda n: estimate(shape, replace(setting, seq=n * step)).peak <= budget,
                                  -(-first_streamed // step), limit // step)


def largest_batch(shape: Shape, setting: Setting, budget: int, *, limit: int = 1024) -> int:
    """The largest batch whose estimated peak fits the budget; 0 if none (Gemma-2-9B at 2048 tokens
    in 6 GiB: 4, where batch 1 does not fit and batch 2 streams the head)."""
    row_tokens = setting.rows_per_example * (setting.seq + setting.completion)
    return _most_that_fits(lambda n: estimate(shape, replace(setting, batch=n)).peak <= budget,
                           -(-setting.stream_head_from // row_tokens), limit)


def model_shape(recipe: Recipe) -> Shape:
    """The recipe's model shape from its config (ftune.model_config: on this machine, else the hub); no weights."""
    return Shape.from_config(model_config(recipe).values)
