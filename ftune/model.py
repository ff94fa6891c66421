"""Build the model of a recipe: load (or build a preset), quantize, add LoRA, patch kernels,
install the checkpointing engine, each as the recipe's RunPlan (ftune.plan) decided. `train` and
`compare` come through here: there is one way to build a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from ftune.engine import CheckpointingEngine, install_checkpointing
from ftune.engine.host_memory import HostLMHead, move_tables_to_host
from ftune.engine.planner import measure_host_link
from ftune.errors import ModelError, first_line
from ftune.families import expert_model_types, family_of
from ftune.integrations.bitsandbytes import keep_4bit_layout
from ftune.integrations.experts import experts_in_4bit, has_4bit_experts, keep_placeholders_out_of_ddp
from ftune.integrations.transformers import (apply_kernels, generate_without_router_logits, kernel_support,
                                             register_attention)
from ftune.memory.estimate import head_streams
from ftune.memory.policy import NoPlanFits
from ftune.model_config import ModelConfig, local_model_config, model_config
from ftune.plan import (Device, KernelChoice, RunPlan, choose_dtype, expert_notes, lora_parameters, lora_targets,
                        quantizes_experts, resolve, sharded_by_fsdp)
from ftune.presets import PRESETS, preset_config
from ftune.recipe import Recipe

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class BuiltModel:
    """A model ready to train, and the plan it was built to."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase | None
    device: torch.device
    dtype: torch.dtype
    engine: CheckpointingEngine
    plan: RunPlan
    source: str = ""

    @property
    def kernels(self) -> dict[str, bool]:
        """Each kernel on or off, as the plan decided."""
        return self.plan.kernel_flags()

    def keep_no_short_steps(self) -> None:
        """Every step runs the checkpointing mode, and a host LM head streams only where the run
        streams it: where a step's loss cannot stream the head, keeping its layers beside the whole
        head would pass the planned peak."""
        self.engine.keep_up_to = 0
        self.plan.setting.keep_up_to = 0
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        head = base.get_output_embeddings()
        if isinstance(head, HostLMHead):
            # a run whose longest step kept its layers streamed the head for that alone
            head.stream_up_to, head.streams_the_loss = 0, head_streams(self.plan.setting)


# What a package missing at the model's loading asks the user to change, by the key it concerns
MISSING_PACKAGE_HINTS = {
    "model.attn_implementation": "Install it, or set model.attn_implementation to auto (the family's own), eager or "
                                 "sdpa.",
    "quantization.method": "Install it (pip install bitsandbytes), or set quantization.method: none for 16-bit LoRA.",
    "model.name_or_path": "Install the package the message names in this environment (pip install ...).",
}


def _missing_package_key(error: ImportError) -> str | None:
    """The recipe key a package missing at the model's loading concerns: an attention's
    (flash-attn, transformers' "FlashAttention2 ... doesn't seem to be installed"), the 4-bit
    quantizer's, or else the model's own (remote code's "requires the following packages that were
    not found"); None where the error says something else, such as a name a module lacks."""
    text, name = str(error).lower(), (getattr(error, "name", None) or "").lower()
    missing = isinstance(error, ModuleNotFoundError) or any(
        phrase in text for phrase in ("installed", "were not found", "requires the", "pip install"))
    if not missing:
        return None
    if "flash" in text or name.startswith("flash_attn"):
        return "model.attn_implementation"
    if "bitsandbytes" in text or name.startswith("bitsandbytes"):
        return "quantization.method"
    return "model.name_or_path"


def pick_device() -> torch.device:
    """This process's device: under torchrun/accelerate each rank takes the GPU of its LOCAL_RANK."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


def device_facts(device: torch.device, *, measure_link: bool = False) -> Device:
    """What ftune.plan.resolve needs to know of this machine, measured (the host link only when asked:
    it copies 256 MiB)."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    host = psutil.virtual_memory().available
    if device.type != "cuda":
        return Device(kind="cpu", host_available=host, triton=os.environ.get("TRITON_INTERPRET") == "1", ranks=ranks)
    if not torch.cuda.is_available():  # a GPU named for what is set up before it is used (tests of fsdp's loading)
        return Device(kind="cuda", host_available=host, ranks=ranks)
    free, total = torch.cuda.mem_get_info(device)
    return Device(kind="cuda", total_bytes=total, free_bytes=free, host_available=host,
                  link_gbps=measure_host_link(device) if measure_link else None, bf16=torch.cuda.is_bf16_supported(),
                  ranks=ranks)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a model.dtype setting on this device (ftune.plan.choose_dtype)."""
    return _DTYPES[choose_dtype(name, device_facts(device))]


def run_plan(recipe: Recipe, device: torch.device | None = None) -> RunPlan:
    """The recipe's plan on this machine, before any weights load: mode smart measures the host
    link and fails here, not after loading, when no plan fits its budget."""
    device = device or pick_device()
    smart = recipe.checkpointing.mode == "smart"
    # smart needs the shape now (from the hub, online, if need be); the other modes let loading
    # fetch the config, and are planned again with it (build_model)
    config = local_model_config(recipe) or (model_config(recipe) if smart else None)
    try:
        return resolve(recipe, device_facts(device, measure_link=smart), config=config)
    except NoPlanFits as error:
        longest = f"the longest sequence that would fit is about {error.longest:,} tokens" if error.longest else \
            "not even the weights and optimizer states fit"
        raise ModelError(
            f"checkpointing.budget: {error}; {longest}.",
            hint="Lower data.max_length or training.batch_size, raise checkpointing.budget, or use a larger card. "
            "`ftune estimate-vram RECIPE --vram SIZE` shows the breakdown.",
        ) from None


def cache_dir() -> Path:
    return Path(os.environ.get("FTUNE_CACHE", Path.home() / ".cache" / "ftune"))


def materialize_preset(name: str, *, seed: int, dtype: torch.dtype, device: torch.device) -> Path:
    """Save a preset with random weights once, so it then loads like any local model.

    Going through save_pretrained/from_pretrained means a preset takes the very path a user's
    model takes (the 4-bit quantization happens while loading). The folder is keyed by the
    preset's config, the seed and the dtype, and written aside then renamed, so a crash never
    leaves a half-written model behind.
    """
    config = preset_config(name)
    key = hashlib.sha256(json.dumps([PRESETS[name], seed, str(dtype)], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "presets" / f"{name}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("building preset %s with random weights (seed %d) in %s", name, seed, target)
    # Initialize on the GPU when it has room for the 16-bit weights (an 8B shape: seconds there,
    # minutes on CPU; 15 GiB, more than a 16 GB card has free). The RNG is forked so that a first
    # run (which builds the preset) and a later one (which finds it cached) leave the global RNG in
    # the same state: LoRA's initialization must not differ. (CPU and CUDA draw different numbers
    # from one seed; memory and speed, what presets are for, do not depend on them.)
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 1.2 * _parameter_bytes(config, dtype):
        device = torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(staging)
    del model
    try:
        os.replace(staging, target)
    except OSError:  # another rank of a distributed run finished it first
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _parameter_bytes(config, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quantization_compute_dtype(recipe: Recipe, dtype: torch.dtype) -> torch.dtype:
    """The dtype 4-bit matmuls compute in: the recipe's, or the model's under auto (as RunPlan.compute_dtype)."""
    return dtype if recipe.quantization.compute_dtype == "auto" else _DTYPES[recipe.quantization.compute_dtype]


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    quant = recipe.quantization
    if quant.method == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards only floating-point parameters, and needs one dtype per layer: the packed
        # 4-bit values are stored in the compute dtype's elements instead of bytes (same size).
        bnb_4bit_quant_storage=compute_dtype if recipe.distributed.strategy == "fsdp" else torch.uint8,
    )


def shards_with_fsdp(recipe: Recipe) -> bool:
    """Whether this process is one rank of several that shard the model with FSDP."""
    return sharded_by_fsdp(recipe, int(os.environ.get("WORLD_SIZE", "1")))


def loads_in_host_memory(recipe: Recipe, device: torch.device) -> bool:
    """Whether the base model is loaded (and quantized) in host memory instead of on the GPU.

    Under FSDP on GPUs the model is sharded because it may not fit one card: loaded onto the
    rank's GPU it would have to fit there whole before sharding. Loaded in host memory, it is
    moved to the GPU one FSDP unit (decoder layer) at a time as `fully_shard` wraps it, each rank
    keeping its shard; a GPU never holds more than one layer beyond its shards. The price is
    bitsandbytes' CPU quantization at load and the 4-bit model in each rank's host RAM until
    it is sharded.
    """
    return device.type == "cuda" and shards_with_fsdp(recipe)


def load_base_model(recipe: Recipe, device: torch.device | None = None, plan: RunPlan | None = None
                    ) -> tuple[PreTrainedModel, str, torch.dtype]:
    """The frozen base model of a recipe, 4-bit where asked, on the device (or in host memory,
    see loads_in_host_memory), in the plan's dtype and attention."""
    device = device or pick_device()
    plan = plan or run_plan(recipe, device)
    dtype, compute_dtype = _DTYPES[plan.dtype], _DTYPES[plan.compute_dtype]
    if recipe.model.preset is not None:
        source = str(materialize_preset(recipe.model.preset, seed=recipe.training.seed, dtype=dtype, device=device))
    else:
        source = recipe.resolve_input(recipe.model.name_or_path)
    on_host = loads_in_host_memory(recipe, device)
    threads = torch.get_num_threads()
    if on_host:
        # bitsandbytes quantizes on the CPU with torch's own ops, and torchrun starts every rank
        # with one thread (OMP_NUM_THREADS=1): the host's cores are shared out among the ranks
        torch.set_num_threads(max(threads, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    attention = plan.attention
    register_attention(attention)
    # a mixture of experts' 3D experts quantized as they load, beside the linear layers (ftune/integrations/experts.py)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    experts = experts_in_4bit(expert_model_types()) if quantizes_experts(recipe, ranks) else contextlib.nullcontext()
    try:
        with experts:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                revision=recipe.model.revision,
                trust_remote_code=recipe.model.trust_remote_code,
                dtype=dtype,
                quantization_config=quantization_config(recipe, compute_dtype),
                device_map={"": "cpu" if on_host else device},
                attn_implementation=attention,
            )
    except ImportError as error:
        key = _missing_package_key(error)
        if key is None:  # a name a module lacks (versions that do not match), or a bug: its own report
            raise
        raise ModelError(
            f"{key}: loading '{source}' needs a package this environment lacks: {first_line(error)}",
            hint=MISSING_PACKAGE_HINTS[key],
        ) from None
    except (OSError, ValueError) as error:
        if (Path(source) / "config.json").is_file():  # the folder is there: name what refused it
            key = "model.attn_implementation" if "attn" in str(error).lower() else "model.name_or_path"
            raise ModelError(
                f"{key}: transformers could not load '{source}' with attention {attention}: {first_line(error)}",
                hint="Set model.attn_implementation to auto (the family's own), eager or sdpa; with a model that needs "
                "its own code, model.trust_remote_code: true.",
            ) from None
        raise ModelError(
            f"model.name_or_path: could not load '{source}': {first_line(error)}",
            hint="Give a local directory with config.json and weights, or a hub id while online "
            "(set HF_TOKEN for gated models); `model: {preset: ...}` builds a shape with random weights offline.",
        ) from None
    finally:
        torch.set_num_threads(threads)
    keep_4bit_layout(model)  # one layout and one kernel in train and eval mode, on every CPU
    generate_without_router_logits(model)  # a mixture of experts' load-balancing loss fails in generation
    if quantizes_experts(recipe, ranks) and model.config.model_type in expert_model_types() \
            and not has_4bit_experts(model):  # a checkpoint quantized before (bitsandbytes left its experts 16-bit)
        logger.warning("the experts of %s stay %s: the checkpoint comes quantized, and ftune quantizes experts only "
                       "as 16-bit weights load; `ftune estimate-vram` counts them in 4 bits", source, dtype)
    model.config.use_cache = False  # training; generation turns it back on per call
    return model, source, dtype


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The recipe's tokenizer (model.tokenizer, else the model's own), loaded before the model."""
    name = recipe.resolve_input(recipe.model.tokenizer or recipe.model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=recipe.model.revision,
                                                  trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"model.tokenizer: could not load a tokenizer from '{name}': {first_line(error)}",
            hint="Point model.tokenizer at a folder with tokenizer.json / tokenizer_config.json, or a hub id while online.",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(recipe: Recipe, targets: list[str] | str | None = None, parameters: list[str] | None = None
                ) -> LoraConfig:
    """peft's LoraConfig of the recipe's lora section, on the plan's targets and parameters (by
    default those ftune.plan.lora_targets and lora_parameters give for the model's config on this
    machine)."""
    if targets is None or parameters is None:
        config = local_model_config(recipe)
        family = family_of(config.model_type) if config is not None else None
        targets = lora_targets(recipe, family) if targets is None else targets
        parameters = lora_parameters(recipe, family) if parameters is None else parameters
    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      target_parameters=parameters or None, bias=lora.bias, use_rslora=lora.use_rslora,
                      task_type="CAUSAL_LM")


def add_lora(model: PreTrainedModel, recipe: Recipe, targets: list[str] | str, parameters: list[str]) -> PeftModel:
    """A new LoRA adapter from the recipe, or the existing one that model.adapter names (trainable)."""
    if recipe.model.adapter is not None:
        path = recipe.resolve_input(recipe.model.adapter)
        try:
            return PeftModel.from_pretrained(model, path, is_trainable=True)
        except (OSError, ValueError) as error:
            raise ModelError(f"model.adapter: could not load a PEFT adapter from {path}: {first_line(error)}",
                             hint="Point it at a folder with adapter_config.json, such as an earlier run's output_dir "
                             "(the DPO and GRPO quickstarts continue `ftune train recipes/quickstart.yaml`).") from None
    names = [name for name, _ in model.named_parameters()]
    missing = [t for t in parameters if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:  # peft adapts the names it finds and passes over the others without a word
        experts = sorted({name.split(".layers.", 1)[-1].split(".", 1)[-1]
                          for name, parameter in model.named_parameters() if parameter.ndim == 3})
        raise ModelError(f"lora.target_parameters: {', '.join(missing)} names no parameter of this model "
                         f"({model.config.model_type}).",
                         hint=f"Its 3D expert parameters are {', '.join(experts)}." if experts else
                         "It has no 3D expert parameters: set lora.target_parameters to [] (or auto).")
    try:
        return get_peft_model(model, lora_config(recipe, targets, parameters))
    except ValueError as error:
        if "target_parameters" in str(error):
            raise ModelError(f"lora.target_parameters: {first_line(error)}",
                             hint="Name parameters that exist in this model, e.g. mlp.experts.gate_up_proj, "
                             "mlp.experts.down_proj for Mixtral and Qwen3-MoE, or [] for none.") from None
        raise ModelError(
            f"lora.target_modules: {first_line(error)}",
            hint="Name modules that exist in this model, e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
            "down_proj for Llama-like models, or all-linear.",
        ) from None


def build_model(recipe: Recipe, device: torch.device | None = None, *, tokenizer: PreTrainedTokenizerBase | None = None,
                with_tokenizer: bool = True, plan: RunPlan | None = None) -> BuiltModel:
    """The model of a recipe, ready for a trainer, built as its plan says (made here by run_plan
    unless given); benchmarks on random ids need no tokenizer."""
    device = device or pick_device()
    plan = plan or run_plan(recipe, device)
    if tokenizer is None and with_tokenizer:
        tokenizer = load_tokenizer(recipe)
    base, source, dtype = load_base_model(recipe, device, plan)
    if tokenizer is not None and len(tokenizer) > base.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{base.get_input_embeddings().num_embeddings} rows.",
            hint="Use the tokenizer that belongs to the model.",
        )
    if plan.config is None:  # its config came with the weights: plan again with it, as loaded
        loaded = ModelConfig(source, base.config.to_dict())
        plan = replace(resolve(recipe, plan.device, config=loaded), attention=plan.attention)
    if plan.family is None:
        logger.warning("ftune has no entry for model type %r: it trains on the generic path (no kernels, layers "
                       "recomputed whole, LoRA on all-linear by default); ftune/families.py lists the families",
                       base.config.model_type)
    for note in expert_notes(recipe, plan.family, plan.lora_parameters, plan.dtype, plan.device.ranks):
        logger.warning("%s", note)
    transformers.set_seed(recipe.training.seed)  # the adapter's initialization depends on the seed alone
    model = add_lora(base, recipe, plan.lora_targets, plan.lora_parameters)
    keep_placeholders_out_of_ddp(model)  # the 4-bit experts' placeholders, which DDP's start cannot copy into
    plan = patch_kernels(model, plan, device)
    host_embedding_bytes = 0
    if plan.host_embeddings:  # and the head with the fused loss, which leaves the layers' backward without it
        host_embedding_bytes = move_tables_to_host(model, device, lm_head=plan.host_lm_head,
                                                   stream_head=head_streams(plan.setting),
                                                   stream_up_to=plan.setting.keep_up_to)
    # the device it will train on: under fsdp the model is still in host memory here
    engine = install_checkpointing(model, plan.checkpointing, plan.layers.policies if plan.layers is not None else None,
                                   device=device, host_embedding_bytes=host_embedding_bytes,
                                   keep_up_to=plan.setting.keep_up_to)
    return BuiltModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, engine=engine, plan=plan,
                      source=source)


def patch_kernels(model: PeftModel, plan: RunPlan, device: torch.device) -> RunPlan:
    """Apply the kernels the plan turned on: one the recipe asked for that this model cannot take
    is a ModelError; one `auto` turned on goes off with a notice naming why. The plan as applied."""
    support = kernel_support(model)
    kernels = dict(plan.kernels)
    for name, choice in plan.kernels.items():
        if not choice.on or support[name] is None:
            continue
        if not choice.reason.startswith("auto"):
            raise ModelError(f"kernels.{name}: {support[name]}.", hint=f"Set kernels.{name}: auto or false.")
        logger.warning("kernels.%s is off: %s", name, support[name])
        kernels[name] = KernelChoice(False, f"auto: off, {support[name]}")
    plan = replace(plan, kernels=kernels)
    try:
        apply_kernels(model, **plan.kernel_flags(), device=device)  # under fsdp the model is still in host memory here
    except ValueError as error:  # e.g. asked for on CPU without Triton's interpreter
        raise ModelError(f"kernels: {error}", hint="Set the kernels to auto (on with CUDA) or false.") from None
    return plan
