"""One resolution of a recipe: every "auto" settled once, for one device, without torch.

`resolve(recipe, device)` decides the dtype, each kernel (with its reason), the attention
implementation, the LoRA targets, where the embedding tables and the LM head live, how SFT lays
out a batch's rows, the checkpointing and, for mode smart, the budget in bytes and each layer's
policy. Model building
(ftune.model.build_model), `train`, `compare`, `estimate-vram` and `validate` read the RunPlan;
none of them decides again.

The device is a handful of facts (`Device`): ftune.model.device_facts measures them on the machine
that trains (torch); `estimate-vram` and `validate` assume them from their flags
(`assumed_device`). What only the loaded model can tell (a kernel's module is missing, the LM head
is wrapped) is checked when the model is built (kernel_support), which refuses a kernel that the
plan turned on with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import psutil

from ftune.families import KERNEL_NAMES, Family, family_of, known_model_types
from ftune.memory.estimate import (PARKING_ATTENTION, GiB, Setting, Shape, allocatable, reference_ride_limit,
                                   short_steps_keep_up_to)
from ftune.memory.policy import LayerPlan, Policy, plan_smart
from ftune.memory.units import format_bytes
from ftune.model_config import ModelConfig, local_model_config
from ftune.recipe import Recipe, parse_bytes

OFFLOADING_MODES = ("unsloth", "smart")
# How SFT lays out a batch's rows (`batches`): padded to the batch's longest; end to end in one
# sequence (TRL's padding_free); whole rows packed into max_length sequences, end to end (packing)
BATCH_LAYOUTS = ("padded", "padding-free", "packed")
# Of the host memory available, what offloaded layer inputs may take: the rest is the process's own
HOST_SHARE_FOR_OFFLOAD = 0.8


@dataclass(frozen=True)
class Device:
    """What resolving a recipe needs to know of the machine it trains on."""

    kind: Literal["cuda", "cpu"] = "cuda"
    total_bytes: int | None = None  # the GPU's memory: measured, or a card's size (--vram)
    free_bytes: int | None = None  # the GPU's free memory, measured when the run starts
    host_available: int | None = None  # host RAM available now, for offloaded layer inputs
    link_gbps: float | None = None  # pinned host-to-GPU bandwidth, measured for mode smart
    bf16: bool = True  # whether the GPU computes in bfloat16
    triton: bool = True  # whether ftune's Triton kernels run: CUDA, or CPU under TRITON_INTERPRET=1
    ranks: int | None = None  # processes training together (WORLD_SIZE); None: as the recipe's strategy implies

    def describe(self) -> str:
        if self.kind == "cpu":
            return "CPU"
        return f"a CUDA GPU of {format_bytes(self.total_bytes)}" if self.total_bytes else "a CUDA GPU"


def assumed_device(*, cpu: bool = False, vram: int | None = None) -> Device:
    """The device that flags name, without torch: this machine's CPU, or a CUDA card of `vram` bytes."""
    if cpu:
        return Device(kind="cpu", host_available=psutil.virtual_memory().available, triton=False, ranks=1)
    return Device(kind="cuda", total_bytes=vram)


@dataclass(frozen=True)
class KernelChoice:
    on: bool
    reason: str


@dataclass(frozen=True)
class RunPlan:
    """Every decision of one run, taken once (see the module's docstring)."""

    device: Device
    config: ModelConfig | None  # None: the model's config is not on this machine
    family: Family | None
    dtype: str  # of the 16-bit modules and the compute: bfloat16, float16 or float32
    compute_dtype: str  # that 4-bit weights are dequantized to
    attention: str  # transformers' attn_implementation
    lora_targets: list[str] | str  # module names, or all-linear
    lora_parameters: list[str]  # parameters adapted through peft's target_parameters (a mixture of experts')
    kernels: dict[str, KernelChoice]
    checkpointing: str  # the mode: none, true, unsloth or smart
    host_embeddings: bool  # the frozen input embedding in host memory
    host_lm_head: bool  # and the LM head, fetched for each forward (with the fused loss)
    setting: Setting  # the memory model's view of all of the above
    batches: str = "padded"  # one of BATCH_LAYOUTS
    decode_graphs: bool = False  # GRPO's decode steps replayed as CUDA graphs (generation_plan)
    budget: int | None = None  # smart: the peak the plan must fit, in bytes
    layers: LayerPlan | None = None  # smart: each decoder layer's policy
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> Shape | None:
        return Shape.from_config(self.config.values) if self.config is not None else None

    def kernel_flags(self) -> dict[str, bool]:
        """Each kernel on or off, as ftune.kernels.apply_kernels takes them."""
        return {name: choice.on for name, choice in self.kernels.items()}

    def describe(self) -> str:
        """One line for the start of a run."""
        if self.layers is not None:
            return f"{self.layers.describe()}; {self.batches} batches"
        on = [name for name, choice in self.kernels.items() if choice.on]
        tables = ", embeddings in host RAM" if self.host_embeddings else ""
        return (f"plan: {self.dtype}, attention {self.attention}, checkpointing {self.checkpointing}{tables}, "
                f"kernels {', '.join(on) or 'none'}, {self.batches} batches")

    def describe_lines(self) -> list[str]:
        """A few lines for `ftune validate`: the model, kernels with reasons, LoRA, attention, checkpointing."""
        if self.config is None:
            model = "model: its config is not on this machine, so its shape and family are unknown (loading decides)"
        else:
            family = self.family.name if self.family is not None else "no ftune family: the generic path"
            shape = self.shape
            model = (f"model: {self.config.model_type} ({family}), {shape.layers} layers, hidden {shape.hidden}, "
                     f"vocab {shape.vocab}")
        targets = self.lora_targets if isinstance(self.lora_targets, str) else ", ".join(self.lora_targets)
        tables = "in host memory" if self.host_embeddings else "on the GPU" if self.device.kind == "cuda" else \
            "with the model"
        if self.host_embeddings:
            tables += ", the LM head too" if self.host_lm_head else ", the LM head on the GPU"
        lines = [f"plan for {self.device.describe()}: {self.dtype}, attention {self.attention}", model,
                 f"LoRA targets: {targets}"]
        if self.lora_parameters:
            lines.append(f"LoRA on parameters: {', '.join(self.lora_parameters)}")
        keeping = f" (steps of at most {self.setting.keep_up_to} tokens keep every layer's activations)" \
            if self.setting.keep_up_to else ""
        lines.append(f"checkpointing {self.checkpointing}{keeping}; embeddings {tables}")
        if self.setting.completion:
            graphs = ", decode steps replayed as CUDA graphs" if self.decode_graphs else ""
            lines.append(f"generation: {self.setting.generation_cache} KV cache{graphs}")
        if self.layers is not None:
            lines.append(self.layers.describe())
        lines += [f"kernel {name}: {'on' if choice.on else 'off'} ({choice.reason})"
                  for name, choice in self.kernels.items()]
        return lines + [f"note: {note}" for note in self.notes]


def resolve(recipe: Recipe, device: Device, *, mode: str | None = None, config: ModelConfig | None = None) -> RunPlan:
    """The recipe's run on `device`, every "auto" settled.

    mode: plan another checkpointing mode than the recipe's (estimate-vram's columns).
    config: the model's config where the caller has fetched it (online); by default the one on
    this machine, if any (ftune.model_config.local_model_config).
    Raises ftune.memory.policy.NoPlanFits when mode smart finds no plan within its budget.
    """
    mode = mode or recipe.checkpointing.mode
    config = config or local_model_config(recipe)
    family = family_of(config.model_type) if config is not None else None
    dtype = choose_dtype(recipe.model.dtype, device)
    compute = recipe.quantization.compute_dtype
    kernels = {name: _kernel_choice(name, getattr(recipe.kernels, name), family, config, device)
               for name in KERNEL_NAMES}
    targets = lora_targets(recipe, family)
    parameters = lora_parameters(recipe, family)
    host_setting = recipe.checkpointing.host_embeddings
    host_embeddings = (device.kind == "cuda" and mode in OFFLOADING_MODES) if host_setting == "auto" else host_setting
    fused_loss = kernels["fused_cross_entropy"].on
    # A step holds at most batch x max_length tokens in every layout: padded rows are cut at
    # max_length, padding-free ones hold only their own tokens, packed sequences fill up to
    # max_length. Padding-free and packed steps are one sequence of those tokens; the layers'
    # memory is per token, so the memory model plans them as batch rows of max_length; under sdpa
    # (and ftune_window, which builds sdpa's masks there) their mask is not (dense_packed_mask).
    # Nor is that of several padded rows (padded_masks), nor sdpa's for sliding-window layers
    # (dense_window_mask, which ftune_window builds none of).
    attention = attention_implementation(recipe, family)
    phases = workflow_phases(recipe, config)
    decode_graphs = False
    if recipe.workflow == "grpo":
        phases["generation_cache"], decode_graphs = generation_plan(recipe, device, family, config)
    layout = batch_layout(recipe)
    sdpa_masks = attention in PARKING_ATTENTION
    setting = Setting(
        mode=mode, seq=recipe.data.max_length, batch=recipe.training.batch_size,
        quantized=recipe.quantization.method != "none", double_quant=recipe.quantization.double_quant,
        quantized_experts=quantizes_experts(recipe, device.ranks),
        lora_r=recipe.lora.r, lora_targets=_projections(targets), lora_parameters=tuple(parameters),
        fused_loss=fused_loss,
        host_embeddings=host_embeddings, host_lm_head=not sharded_by_fsdp(recipe, device.ranks),
        optimizer=recipe.training.optimizer, eval_tokens=eval_tokens(recipe, phases.get("rows_per_example", 1)),
        # only layers that run as halves park attention's output (engine/recompute.py): not the MoE
        # families', which recompute whole, nor a layer with a dropout (LoRA's), which would draw anew
        parked_attention=(attention in PARKING_ATTENTION and family is not None and family.residual_halves is not None
                          and not recipe.lora.dropout),
        dense_packed_mask=sdpa_masks and layout in ("padding-free", "packed"),
        padded_masks=sdpa_masks and layout == "padded", dense_window_mask=attention == "sdpa", **phases,
    )
    budget, layers, notes = None, None, expert_notes(recipe, family, parameters, dtype, device.ranks)
    if mode == "smart":
        budget = smart_budget(recipe, device)
        if config is None or budget is None:
            missing = "the model's shape" if config is None else "the GPU's memory (give --vram)"
            notes.append(f"smart's per-layer plan needs {missing}; `ftune train` plans it on the GPU")
        else:
            host = int(device.host_available * HOST_SHARE_FOR_OFFLOAD) if device.host_available is not None else None
            layers = plan_smart(Shape.from_config(config.values), setting, budget, host_available=host,
                                link_gbps=device.link_gbps, embeddings_movable=host_setting == "auto")
            host_embeddings = setting.host_embeddings = layers.host_embeddings
            setting.stream_head_from = layers.stream_head_from
    host_lm_head = host_embeddings and fused_loss and setting.host_lm_head
    setting.host_lm_head = host_lm_head
    # (a family ftune has an entry for: the memory model's Shape reads its sizes)
    # (smart: where its plan recomputes or offloads a layer, within its budget)
    if device.kind == "cuda" and family is not None and keeps_short_steps(recipe, mode, config, device.ranks) \
            and (mode != "smart" or layers is not None and any(p is not Policy.KEEP for p in layers.policies)):
        setting.keep_up_to = short_steps_keep_up_to(Shape.from_config(config.values), setting,
                                                    budget=budget if mode == "smart" else None)
    if host_embeddings and not host_lm_head and config is not None and _tied(config.values):
        host_embeddings = False  # a tied table is the head too: it stays on the GPU with it
    return RunPlan(device=device, config=config, family=family, dtype=dtype,
                   compute_dtype=dtype if compute == "auto" else compute,
                   attention=attention, lora_targets=targets,
                   lora_parameters=parameters, kernels=kernels,
                   checkpointing=mode, host_embeddings=host_embeddings, host_lm_head=host_lm_head, setting=setting,
                   batches=layout, decode_graphs=decode_graphs, budget=budget, layers=layers, notes=notes)


def _tied(values: dict) -> bool:
    """Whether a config ties its input embedding to its LM head (read as Shape reads it, without
    the sizes a family ftune has no entry for may name otherwise)."""
    return bool(values.get("text_config", values).get("tie_word_embeddings", False))


def choose_dtype(setting: str, device: Device) -> str:
    """model.dtype; auto: bfloat16 where the GPU has it, else float16 on a GPU, float32 on CPU."""
    if setting != "auto":
        return setting
    if device.kind == "cuda":
        return "bfloat16" if device.bf16 else "float16"
    return "float32"


def attention_implementation(recipe: Recipe, family: Family | None) -> str:
    """model.attn_implementation; auto: the family's (sdpa for a family ftune has no entry for, and
    for ftune_window where GRPO generates on transformers' paged engine, which runs paged|sdpa and
    has no paged twin of ftune's)."""
    if recipe.model.attn_implementation != "auto":
        return recipe.model.attn_implementation
    if family is None:
        return "sdpa"
    if family.attention == "ftune_window" and recipe.workflow == "grpo" and recipe.grpo.paged_generation:
        return "sdpa"
    return family.attention


def batch_layout(recipe: Recipe) -> str:
    """How SFT lays out a batch (BATCH_LAYOUTS): packed with sft.packing; else padding-free with
    sft.padding_free, auto: when a batch holds several rows (one row has no padding to drop);
    padded otherwise and in the other workflows."""
    sft = recipe.sft
    if recipe.workflow != "sft":
        return "padded"
    if sft.packing:
        return "packed"
    several = recipe.training.batch_size > 1
    return "padding-free" if sft.padding_free is True or (sft.padding_free == "auto" and several) else "padded"


def eval_tokens(recipe: Recipe, rows_per_example: int) -> int:
    """Tokens of an evaluation's forward: eval batch x rows per example x max_length with data.eval
    (SFT and DPO; GRPO's evaluation generates, which its generation phase counts), else 0."""
    if recipe.data.eval is None or recipe.workflow == "grpo":
        return 0
    training = recipe.training
    return (training.eval_batch_size or training.batch_size) * rows_per_example * recipe.data.max_length


def workflow_phases(recipe: Recipe, config: ModelConfig | None = None) -> dict:
    """The memory model's view of what DPO and GRPO add to a step (TRL 1.16's trainers): DPO trains
    each example as two rows (chosen and rejected) after a reference pass over them; GRPO generates
    training.batch_size x steps_per_generation completions at once (its generation batch), trains on
    rows of prompt (data.max_length) and completion, and runs a forward without gradients first
    with beta > 0 (the reference) or when a generation serves steps of another optimizer step (the
    old log-probabilities: grad_accum not a multiple of steps_per_generation). Its KV cache depends
    on the device and the model: generation_plan. Both losses are TRL's fused heads, which read the
    LM head whole, but in a DPO step that keeps its layers (keeps_short_steps). A reference held as
    TRL's copy of the adapter (DPO, and GRPO with beta > 0, continuing model.adapter) holds the
    adapter's parameters twice; a new adapter has
    none (integrations.trl.use_base_as_reference), and in DPO's short steps its reference's rows ride
    the training forward (integrations.trl.ReferenceRidesTraining, which needs no adapter dropout),
    up to a length that the model's MLP width (`config`, where known) can bound."""
    if recipe.workflow == "dpo":
        text = config.values.get("text_config", config.values) if config is not None else {}
        # beside TRL's router loss the reference does not ride
        rides = recipe.model.adapter is None and recipe.lora.dropout == 0 and not trl_router_loss(config)
        return {"rows_per_example": 2, "reference_pass": True, "streamed_head": False,
                "reference_adapter": recipe.model.adapter is not None,
                "reference_rides_up_to": reference_ride_limit(text.get("intermediate_size")) if rides else 0}
    if recipe.workflow != "grpo":
        return {}
    grpo, training = recipe.grpo, recipe.training
    steps = grpo.steps_per_generation or training.grad_accum
    return {"completion": grpo.max_completion_length, "generation_steps": steps, "streamed_head": False,
            "top_p": grpo.top_p, "reference_pass": grpo.beta > 0 or training.grad_accum % steps != 0,
            "reference_adapter": grpo.beta > 0 and recipe.model.adapter is not None}


def trl_router_loss(config: ModelConfig | None) -> bool:
    """Whether TRL's DPO and GRPO trainers add a mixture of experts' router loss: a config with
    experts, whose router_aux_loss_coef (nonzero by default in transformers' configs) is not 0."""
    text = config.values.get("text_config", config.values) if config is not None else {}
    return bool(text.get("num_local_experts") or text.get("num_experts")) and text.get("router_aux_loss_coef") != 0


def keeps_short_steps(recipe: Recipe, mode: str, config: ModelConfig, ranks: int) -> bool:
    """Whether the run's short steps may keep their layers in checkpointing `mode` (true, unsloth,
    or smart within its budget; memory.estimate.keeps_layers), which needs a host LM head to stream
    through the step's loss: ftune's loss (SFT) streams it, and TRL's DPO loss does through
    integrations.trl.stream_the_fused_head, but not beside a router loss. GRPO's head stays on the
    GPU from the generation to the backward, and FSDP shards the layers under its own plan: neither
    keeps."""
    if mode not in ("true", "unsloth", "smart") or sharded_by_fsdp(recipe, ranks):
        return False
    return recipe.workflow == "sft" or recipe.workflow == "dpo" and not trl_router_loss(config)


def generation_plan(recipe: Recipe, device: Device, family: Family | None,
                    config: ModelConfig | None) -> tuple[str, bool]:
    """GRPO's KV cache (the memory model's generation_cache) and whether its decode steps replay as
    CUDA graphs (ftune/engine/decode_graphs.py). They do with grpo.cuda_graphs on a GPU, over the
    static cache, for a dense family ftune has an entry for whose layers slide no window (a sliding
    layer of the static cache counts its length in Python, which a graph would freeze; a mixture
    of experts routes its tokens with data-dependent shapes) and whose rotary frequencies stay
    fixed (dynamic and longrope scaling pick them in Python from the longest position so far).
    auto: the static cache where they do (it holds its full size from the start, as the dynamic
    one does by the last token), else the dynamic one; the paged engine keeps its own. Without a
    GPU the offloaded cache is the dynamic one: it is in host memory already, and transformers'
    offloaded cache needs CUDA's streams."""
    grpo = recipe.grpo
    if grpo.paged_generation:
        return "paged", False
    # a family with an entry has Llama-sized keys for its Shape (gpt2's n_embd has none)
    replayable = (device.kind == "cuda" and grpo.cuda_graphs and family is not None and config is not None
                  and not family.expert_parameters and not Shape.from_config(config.values).sliding_layers
                  and not rope_follows_length(config.values))
    cache = grpo.cache_implementation
    if cache == "auto":
        cache = "static" if replayable else "dynamic"
    elif cache == "offloaded" and device.kind != "cuda":
        cache = "dynamic"
    return cache, replayable and cache == "static"


def rope_follows_length(values: dict) -> bool:
    """Whether a config's rotary scaling changes its frequencies with the sequence's length
    (transformers' `dynamic_rope_update`: the dynamic types and longrope), in any layer type."""
    parameters = values.get("rope_parameters") or values.get("rope_scaling") or {}
    # one scaling ({"rope_type": ...}), or one per layer type ({"sliding_attention": {...}, ...})
    per_layer_type = bool(parameters) and all(isinstance(item, dict) for item in parameters.values())
    scalings = list(parameters.values()) if per_layer_type else [parameters]
    types = [str(scaling.get("rope_type") or scaling.get("type") or "") for scaling in scalings]
    return any("dynamic" in name or name == "longrope" for name in types)


def lora_targets(recipe: Recipe, family: Family | None) -> list[str] | str:
    """The modules the adapter goes on; auto: the family's linear projections, all-linear for a
    family ftune has no entry for."""
    targets = recipe.lora.target_modules
    if targets != "auto":
        return targets
    return family.lora_targets if family is not None else "all-linear"


def lora_parameters(recipe: Recipe, family: Family | None) -> list[str]:
    """The parameters the adapter goes on through peft's target_parameters; auto: the family's
    experts where lora.target_modules adapts the whole layer (auto or all-linear), unless
    lora.dropout is set (peft's parameter adapters take none)."""
    parameters = recipe.lora.target_parameters
    if parameters != "auto":
        return parameters
    if family is None or isinstance(recipe.lora.target_modules, list) or recipe.lora.dropout:
        return []
    return list(family.expert_parameters)


def quantizes_experts(recipe: Recipe, ranks: int | None) -> bool:
    """Whether 4-bit loading quantizes a mixture of experts' 3D experts too, as they load
    (ftune/integrations/experts.py): yes, except under FSDP, which would shard (and so build whole)
    the zero-size placeholders that stand in for the 16-bit stacks."""
    return recipe.quantization.method != "none" and not sharded_by_fsdp(recipe, ranks)


def expert_notes(recipe: Recipe, family: Family | None, parameters: list[str], dtype: str,
                 ranks: int | None = None) -> list[str]:
    """What `validate` and `train` say of a mixture of experts: how its experts are stored, and
    whether they are adapted."""
    if family is None or not family.experts:
        return []
    notes = []
    whole_layers = not isinstance(recipe.lora.target_modules, list)
    if recipe.lora.target_parameters == "auto" and not parameters and whole_layers:
        notes.append("the experts are not adapted: peft's parameter adapters take no dropout (lora.dropout is "
                     f"{recipe.lora.dropout}); LoRA adapts the attention only")
    if quantizes_experts(recipe, ranks):
        adapted = "their LoRA delta added to the dequantized weights" if parameters else "not adapted"
        notes.append(f"the experts' weights load in 4 bits ({recipe.quantization.method}, one layer's 16-bit experts "
                     f"at a time while loading) and each layer's are dequantized to {dtype} as it runs, {adapted}: "
                     "`ftune estimate-vram` counts them so")
    elif recipe.quantization.method != "none":
        notes.append(f"the experts' weights stay {dtype} under 4-bit loading with FSDP (ftune quantizes them on one "
                     "GPU or under DDP): `ftune estimate-vram` counts them so")
    return notes


def smart_budget(recipe: Recipe, device: Device) -> int | None:
    """The peak mode smart plans for: checkpointing.budget (a card's size, less the allocator's
    reserve, as estimate-vram --vram); else the GPU's free memory less a margin, or a card of
    --vram; on CPU half the available RAM. None when the device's memory is not known."""
    if recipe.checkpointing.budget is not None:
        return allocatable(parse_bytes(recipe.checkpointing.budget))
    if device.kind == "cuda":
        if device.free_bytes is not None:  # less the CUDA context, the allocator's slack and other processes
            return device.free_bytes - max(GiB, device.free_bytes // 12)
        return allocatable(device.total_bytes) if device.total_bytes is not None else None
    return device.host_available // 2 if device.host_available is not None else None


def _kernel_choice(name: str, setting: bool | str, family: Family | None, config: ModelConfig | None,
                   device: Device) -> KernelChoice:
    if setting is True:
        runs = device.triton or name == "fused_lora"  # fused_lora is plain PyTorch
        where = "" if runs else " (Triton cannot run here: building the model refuses it)"
        return KernelChoice(True, f"kernels.{name}: true{where}")
    if setting is False:
        return KernelChoice(False, f"kernels.{name}: false")
    if device.kind != "cuda":
        return KernelChoice(False, "auto: on with CUDA only")
    if config is None:
        return KernelChoice(False, "auto: the model's type is not known before it loads")
    if family is None:
        return KernelChoice(False, f"auto: ftune has no entry for model type {config.model_type!r} "
                            f"(ftune/families.py knows {', '.join(known_model_types())})")
    if name not in family.kernels:
        return KernelChoice(False, f"auto: not (yet) for the {family.name} family")
    return KernelChoice(True, f"auto: on with CUDA for the {family.name} family")


def _projections(targets: list[str] | str) -> tuple[str, ...]:
    """The memory model's LoRA targets: all-linear is every projection of a layer."""
    return tuple(targets) if isinstance(targets, list) else Setting().lora_targets


def sharded_by_fsdp(recipe: Recipe, ranks: int | None) -> bool:
    """Whether FSDP shards the model (its LM head too) across `ranks` processes (None: as many as a
    recipe of strategy fsdp is launched on, which is several)."""
    return recipe.distributed.strategy == "fsdp" and (ranks is None or ranks >= 2)
