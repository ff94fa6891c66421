"""The recipe: a typed schema for one fine-tuning run, and its loading from YAML.

Every key is a typed field with a description (docs/recipes.md is generated from them). Loading
reports every problem at once, each with its key path and a hint: YAML syntax, unknown keys,
wrong types, then the combinations that are invalid together. Nothing here loads a model.

Paths to inputs (model, tokenizer, data) are resolved against the recipe file's folder, so a
recipe works from any working directory; `training.output_dir` is relative to where you run.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftune.errors import RecipeError
from ftune.presets import PRESETS

DATA_FILE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
LARGEST_SEED = 2**32 - 1


class _Section(BaseModel):
    # Unknown keys are errors, never silently ignored defaults (nanoGPT's configurator does the same).
    # No key means anything by inf or nan (YAML's .inf, .nan): an infinite learning rate or epoch
    # count is a mistake, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(_Section):
    """Which model to fine-tune."""

    name_or_path: str | None = Field(
        None,
        description="A local model directory (config.json + weights) or a Hugging Face hub id. "
        "Exactly one of name_or_path and preset.",
    )
    preset: str | None = Field(
        None,
        description="A built-in model shape (see `ftune presets`), built from its config with random "
        "weights: for trying ftune and measuring memory without downloading weights.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer directory or hub id. Defaults to name_or_path; required with preset."
    )
    adapter: str | None = Field(
        None, description="A PEFT adapter folder to continue training (e.g. an earlier run's output_dir)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repository.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the modules kept in 16 bits (embeddings, LM head, norms) and of the "
        "compute: auto is bfloat16 on a GPU that supports it, float32 on CPU.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention implementation passed to transformers; auto: the model family's (sdpa, or "
        "ftune's own where sdpa would drop part of the attention, as Gemma-2's soft-capping, or run it slowly, as "
        "Gemma-3's and Phi-3's sliding windows: ftune/families.py).",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            close = difflib.get_close_matches(value, PRESETS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown preset '{value}'.{hint} Known presets: {', '.join(sorted(PRESETS))}")
        return value


class QuantizationSection(_Section):
    """How the frozen base weights are stored (bitsandbytes)."""

    method: Literal["nf4", "fp4", "none"] = Field(
        "nf4", description="4-bit NF4 or FP4 through bitsandbytes (QLoRA), or none for 16-bit LoRA."
    )
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves about 0.4 bit per weight)."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for each matmul; auto follows model.dtype."
    )


class LoraSection(_Section):
    """The LoRA adapter (peft)."""

    r: int = Field(16, gt=0, description="Rank of the adapter matrices.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto",
        description="Module names to adapt; auto: every linear projection of the model family's layers (Llama-like: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; `ftune validate` shows them), or all-linear "
        "for every linear layer but the LM head.",
    )
    target_parameters: list[str] | Literal["auto"] = Field(
        "auto",
        description="Parameters to adapt that are not linear layers: a mixture of experts' 3D expert weights, "
        "through peft's target_parameters (one adapter per expert). auto: the family's experts (Mixtral, Qwen3-MoE: "
        "mlp.experts.gate_up_proj, mlp.experts.down_proj) when target_modules is auto or all-linear and dropout is 0 "
        "(peft's parameter adapters take no dropout), else none; [] adapts no parameter. Adapting the experts costs "
        "memory: each layer's forward builds its experts' weights plus update (16-bit), which its backward keeps; "
        "under 4-bit loading it builds them from the dequantized experts and its backward builds them again.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilized LoRA).")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules is empty: name at least one module, e.g. [q_proj, v_proj]")
        return value

    @model_validator(mode="after")
    def _parameters_without_dropout(self) -> "LoraSection":
        if isinstance(self.target_parameters, list) and self.target_parameters and self.dropout:
            raise ValueError("target_parameters takes no dropout (peft's parameter adapters cannot drop their "
                             "input): set lora.dropout to 0, or lora.target_parameters to []")
        return self


class CheckpointingSection(_Section):
    """How activations are kept between forward and backward (the ftune engine)."""

    mode: Literal["none", "true", "unsloth", "smart"] = Field(
        "true",
        description="none keeps every activation (fastest, most memory); true recomputes each decoder "
        "layer in backward, its input kept on the GPU; unsloth also moves each layer input to pinned "
        "host memory on a side stream; smart plans keep/recompute/offload per layer to fit the budget.",
    )
    budget: str | None = Field(
        None,
        description="VRAM budget for smart, e.g. 24GiB or 20000MiB: the memory of the card to plan for (the "
        "allocator reserves 8% above the planned peak); default the card's free memory less a margin.",
    )
    host_embeddings: bool | Literal["auto"] = Field(
        "auto",
        description="Keep the frozen embedding tables in host memory (1 GiB each for an 8B Llama): the "
        "input embedding (the batch's rows are copied to the GPU) and, with the fused cross-entropy kernel, the "
        "LM head (copied to the GPU for each forward and dropped before the backward; in runs whose batches reach "
        "4096 tokens, or where mode smart needs it to fit the budget, the loss streams it in 64 MiB blocks instead); a "
        "tied table moves only with the head. auto: on "
        "with CUDA in modes unsloth and smart.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads `mode: true` as a boolean and `mode: none` as a string; accept both spellings.
        if value is True:
            return "true"
        if value is False or value is None:
            return "none"
        return value

    @field_validator("budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> Any:
        if value is None:
            return None
        parse_bytes(str(value))  # raises ValueError with the accepted forms
        return str(value)


class KernelsSection(_Section):
    """Triton kernels patched into the model. auto: on with CUDA, off on CPU."""

    rms_norm: bool | Literal["auto"] = Field("auto", description="Fused RMSNorm forward and backward.")
    rope: bool | Literal["auto"] = Field("auto", description="Rotary embedding of query and key in one kernel.")
    swiglu: bool | Literal["auto"] = Field("auto", description="Fused act(gate) * up: SwiGLU, or GeGLU for Gemma.")
    fused_cross_entropy: bool | Literal["auto"] = Field(
        "auto", description="LM head + cross-entropy in chunks: the full logits never exist."
    )
    fused_lora: bool | Literal["auto"] = Field(
        "auto", description="Each LoRA projection's update added inside one GEMM (no clone, scale and add passes)."
    )


class SFTSection(_Section):
    """Options of the sft workflow (TRL's SFTTrainer)."""

    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="Lay each batch's rows end to end in one sequence, with no padding (TRL's padding_free); rows "
        "never attend to each other and positions restart at each row. auto: on when a batch holds several rows. "
        "false: pad every row to the batch's longest.",
    )
    packing: bool = Field(
        False,
        description="Pack whole rows into sequences of data.max_length (TRL's packing, best-fit decreasing; padding-"
        "free); training.batch_size then counts packed sequences, not rows.",
    )
    completion_only_loss: bool | None = Field(
        None, description="Loss on the completion only (prompt/completion data); default: yes for such data."
    )
    assistant_only_loss: bool = Field(
        False, description="Loss on the assistant turns only (messages data; needs generation markers in the template)."
    )

    @model_validator(mode="after")
    def _packing_is_padding_free(self) -> SFTSection:
        if self.packing and self.padding_free is False:
            raise ValueError("packing lays the packed rows end to end without padding: set padding_free to auto "
                             "(or true), or packing to false")
        return self


# The losses TRL's DPOTrainer computes (DPOTrainer._compute_loss, trl 1.16.0)
DPOLossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class DPOSection(_Section):
    """Options of the dpo workflow (TRL's DPOTrainer). The reference model is the base model with
    the adapter disabled: no second copy of the weights."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    loss_type: DPOLossType = Field("sigmoid", description="TRL's DPO loss (sigmoid: the DPO paper's).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO's assumed label noise.")


BUILTIN_REWARDS = ("exact_answer", "format", "length_penalty")


class GRPOSection(_Section):
    """Options of the grpo workflow (TRL's GRPOTrainer)."""

    rewards: list[str] = Field(
        default_factory=lambda: ["exact_answer"],
        description="Reward functions: built-in exact_answer (the completion's last number or word equals the "
        "data's `answer` column), format (the completion matches format_pattern), length_penalty; or your "
        "own as module:function (this imports and runs your code).",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward (default: all 1).")
    format_pattern: str = Field(r"\S", description="Regular expression the format reward looks for.")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(64, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generations.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sample from the smallest set of tokens whose probabilities "
                         "sum to top_p (1: every token).")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference model (0: none, no reference pass).")
    steps_per_generation: int | None = Field(
        None, ge=1,
        description="Micro-batches (of training.batch_size completions) generated in one call; default "
        "training.grad_accum, one call per optimizer step. Fewer: a smaller KV cache (memory grows with "
        "batch_size x steps_per_generation x (data.max_length + max_completion_length)), more, shorter calls.",
    )
    cache_implementation: Literal["auto", "dynamic", "static", "offloaded"] = Field(
        "auto",
        description="transformers' KV cache for generation: dynamic grows with the completions; static holds its "
        "full size from the start; offloaded keeps it in host memory with a layer at a time on the GPU (long "
        "completions in little VRAM, slower); auto: static where the decode steps replay as CUDA graphs "
        "(cuda_graphs), else dynamic.",
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay each decode step of the generation as a CUDA graph (on a GPU, with the static cache, "
        "for a dense family whose layers slide no window): one launch a token instead of ~1,900 small ones.",
    )
    paged_generation: bool = Field(
        False,
        description="Generate with transformers' paged, continuous-batching engine (TRL's "
        "use_transformers_continuous_batching), its pool of KV blocks sized to the generation batch.",
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss (for long answers that "
        "a too-short limit would reward as if complete)."
    )

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one reward")
        for name in value:
            if name not in BUILTIN_REWARDS and not re.fullmatch(r"[\w.]+:\w+", name):
                raise ValueError(f"reward {name!r} is neither built in ({', '.join(BUILTIN_REWARDS)}) "
                                 "nor module:function")
        return value


class DataSection(_Section):
    """The training data (datasets)."""

    source: str = Field(
        ...,
        description="A local .json/.jsonl/.parquet/.csv file, a folder of them, or a hub dataset id.",
    )
    subset: str | None = Field(None, description="A hub dataset's configuration (subset), e.g. main for openai/gsm8k.")
    split: str = Field("train", description="Split to train on.")
    format: Literal["auto", "text", "prompt_completion", "messages", "preference", "prompt"] = Field(
        "auto",
        description="TRL dataset format: text, prompt_completion or messages (chat) for sft; preference "
        "(chosen/rejected, with or without a prompt) for dpo; prompt for grpo; auto detects it.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns to the format's names, e.g. {text: body} or {prompt: question, completion: answer}.",
    )
    max_length: int = Field(1024, gt=0, description="Longest tokenized example, in tokens.")
    too_long: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What happens to examples longer than max_length (each is counted and reported)."
    )
    limit: int | None = Field(None, gt=0, description="Use only the first N rows (for quick tries).")
    eval: float | str | None = Field(
        None,
        description="Evaluation data: a fraction between 0 and 1 of data.source held out from training (chosen "
        "with training.seed), or a source in the same format (a file, a folder or a hub dataset id, read like "
        "data.source). The eval loss (and the workflow's own eval metrics) is reported every training.eval_steps "
        "and at the end.",
    )
    eval_split: str | None = Field(None, description="Split of a hub eval source (default: data.split).")

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_fraction(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("give a fraction between 0 and 1 (e.g. 0.05) or an eval source, not true or false")
        if isinstance(value, (int, float)) and not 0 < value < 1:
            raise ValueError(f"a fraction of the data is between 0 and 1, e.g. 0.05 (got {value}); an eval file is "
                             "written as its path")
        return value

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        known = {"text", "prompt", "completion", "messages", "chosen", "rejected", "answer"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown field name(s) {unknown}; the names a format uses are {sorted(known)}")
        return value


class TrainingSection(_Section):
    """The optimization loop (transformers TrainingArguments underneath)."""

    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    epochs: float | None = Field(None, gt=0, description="Passes over the data (default 1 when max_steps is unset).")
    batch_size: int = Field(1, gt=0, description="Examples per device per forward.")
    grad_accum: int = Field(1, gt=0, description="Forwards accumulated into one optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw_torch", description="Optimizer (the 8-bit ones through bitsandbytes, CUDA only)."
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    seed: int = Field(42, description="Seed for weights of presets, LoRA init, data order and dropout "
                      "(0 to 2**32 - 1).")
    output_dir: str = Field("runs/ftune", description="Where the adapter, metrics and checkpoints go.")
    logging_steps: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    save_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N steps (besides save_minutes and the last step).")
    save_minutes: float | None = Field(
        10, ge=0, description="Save a checkpoint after every this many minutes of training, so that a crash loses at "
        "most that much (0 or null: only every save_steps and at the last step).",
    )
    save_total_limit: int | None = Field(2, gt=0, description="Keep only the newest N checkpoints.")
    nan_patience: int = Field(
        3, ge=0, description="Stop after this many logged losses in a row are NaN or infinite (0: never stop)."
    )
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate on data.eval every N optimizer steps, and at the end (default: ten times a "
        "run, every max_steps / 10 steps; once an epoch when training by epochs).",
    )
    eval_batch_size: int | None = Field(None, gt=0, description="Examples per evaluation forward (default: batch_size).")
    keep_best: bool = Field(
        False, description="Save a checkpoint at every evaluation and end with the adapter of the lowest eval loss "
        "(needs data.eval; save_steps, if set, a multiple of eval_steps).",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers, through transformers' own integrations, each offline-capable: tensorboard "
        "(event files in output_dir/tensorboard), wandb (offline in output_dir/wandb unless logged in or WANDB_MODE "
        "is set), mlflow (a local store in output_dir/mlruns unless MLFLOW_TRACKING_URI is set), trackio (in "
        "output_dir/trackio unless TRACKIO_DIR is set). ftune's figures (tokens/s, VRAM, "
        "host offload) are logged beside the trainer's under ftune/.",
    )
    push_to_hub: str | None = Field(
        None, description="A hub repository id (user/name): push the finished run's folder there (adapter, "
        "tokenizer, model card, recipe, metrics; no checkpoints). Needs HF_TOKEN with write access.",
    )
    hub_private: bool = Field(True, description="Create the push_to_hub repository as private.")

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int) -> int:
        # transformers.set_seed seeds numpy, whose seeds are unsigned 32-bit integers
        if not 0 <= value <= LARGEST_SEED:
            raise ValueError(f"a seed is an integer from 0 to 2**32 - 1 = {LARGEST_SEED} (numpy's range, which "
                             f"transformers.set_seed uses); got {value}")
        return value


class DistributedSection(_Section):
    """How several GPUs share a run launched with --gpus N, torchrun or accelerate launch."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: each GPU holds the whole 4-bit model and trains on its share of the batch; "
        "fsdp: FSDP2 shards the model (4-bit weights included) across the GPUs, each holding 1/N of it "
        "between the layers it runs (for a model that leaves too little room on one card); it loads the "
        "model in host memory and needs training.optimizer adamw_torch.",
    )


class Recipe(_Section):
    """One fine-tuning run."""

    name: str | None = Field(None, description="A name for the run, shown in reports.")
    model: ModelSection = Field(..., description="Which model to fine-tune.")
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    checkpointing: CheckpointingSection = Field(default_factory=CheckpointingSection)
    kernels: KernelsSection = Field(default_factory=KernelsSection)
    workflow: Literal["sft", "dpo", "grpo"] = Field("sft", description="The training workflow.")
    sft: SFTSection = Field(default_factory=SFTSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    data: DataSection = Field(..., description="The training data.")
    training: TrainingSection = Field(default_factory=TrainingSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    # Where relative input paths are resolved; not a recipe key.
    _base_dir: Path = Path(".")

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve_input(self, value: str) -> str:
        """A local path relative to the recipe's folder, or the value itself (a hub id)."""
        path = expand_user(value)
        if path.is_absolute():
            return str(path)
        candidate = self._base_dir / path
        if path_problem(candidate) is None or looks_like_local_path(value):
            return str(candidate.resolve())
        return value

    def resolved(self, *, absolute_inputs: bool = False) -> dict[str, Any]:
        """Every key with its value (defaults filled in), without the other workflows' sections;
        with absolute_inputs, local input paths made absolute (so the recipe reads the same inputs
        from any folder: a run's saved recipe.yaml)."""
        others = {"sft", "dpo", "grpo"} - {self.workflow}
        values = self.model_dump(mode="json", exclude=others)
        if absolute_inputs:
            for key, value in _input_paths(self) + _adapter_path(self):
                resolved = self.resolve_input(value)
                if Path(resolved).is_absolute():
                    section, name = key.split(".")
                    values[section][name] = resolved
        return values

    def to_yaml(self, *, absolute_inputs: bool = False) -> str:
        return yaml.safe_dump(self.resolved(absolute_inputs=absolute_inputs), sort_keys=False)


def looks_like_local_path(value: str) -> bool:
    """True for values that can only mean a file system path (a hub id is `org/name`)."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.count("/") > 1
        or Path(value).suffix.lower() in DATA_FILE_SUFFIXES
    )


_BYTES = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB' -> bytes. A bare number is GiB, the unit users think in for VRAM."""
    match = _BYTES.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a memory size; write it like 24GiB, 16GB or 20000MiB")
    number, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    return int(number * _UNITS[unit])


# --------------------------------------------------------------------------------------------
# Loading


Problem = tuple[str, str]  # (key path, what is wrong with it and the fix)


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_paths: bool = True,
                needs_tokenizer: bool = True, environment_checks: Callable[[Recipe], list[Problem]] | None = None
                ) -> Recipe:
    """Read, override and validate a recipe file; raise RecipeError listing every problem.

    check_paths: also check that the input paths exist.
    needs_tokenizer: False for what never tokenizes (estimate-vram): a preset may then have none.
    environment_checks: the recipe's problems against this machine and its model, reported with the
    schema's (ftune.checks.load_checked_recipe passes them: the output folder can be written, rewards
    import, LoRA targets exist).
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))
        listing = f"; the recipes in it: {', '.join(found)}" if found else "; it holds no .yaml file"
        raise RecipeError(f"{path} is a folder, not a recipe file{listing}.",
                          hint=f"Pass one recipe file, e.g. {path / found[0]}." if found else
                          "Pass the path of a YAML recipe, e.g. recipes/quickstart.yaml.")
    if not path.is_file():
        raise RecipeError(
            f"Recipe file not found: {path}",
            hint="Pass the path of a YAML recipe, e.g. recipes/quickstart.yaml.",
        )
    raw = _read_yaml(path)
    raw = apply_overrides(raw, overrides or [], source=str(path))
    return validate_recipe(raw, base_dir=path.parent.resolve(), source=str(path), check_paths=check_paths,
                           needs_tokenizer=needs_tokenizer, environment_checks=environment_checks)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError(
            f"{path} is not valid YAML{where}: {problem}.",
            hint="Check the indentation and that every 'key: value' has a space after the colon.",
        ) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file.", hint="A recipe is a UTF-8 YAML file.") from None
    if raw is None:
        raise RecipeError(f"{path} is empty.", hint="Start from recipes/quickstart.yaml.")
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path} must hold a mapping of sections (model:, data:, ...), not a {type(raw).__name__}.",
            hint="Start from recipes/quickstart.yaml.",
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], *, source: str) -> dict[str, Any]:
    """Apply `--set key.path=value` overrides; values are parsed as YAML (numbers, booleans, lists)."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(
                f"--set {item!r} is not of the form key.path=value.",
                hint="For example: --set training.max_steps=20 --set lora.r=8",
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(
                    f"--set {key}: '{where}' in {source} is a value, not a section.",
                    hint=f"Set '{where}' itself, e.g. --set {where}=...",
                )
            node = child
        node[parts[-1]] = value
    return result


def validate_recipe(
    raw: dict[str, Any], *, base_dir: Path, source: str = "recipe", check_paths: bool = True,
    needs_tokenizer: bool = True, environment_checks: Callable[[Recipe], list[Problem]] | None = None,
) -> Recipe:
    """A recipe from its YAML mapping (see load_recipe); raise RecipeError listing every problem."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(e, raw) for e in _union_errors(error.errors())]
        raise RecipeError.from_problems(source, list(dict.fromkeys(problems))) from None
    recipe._base_dir = base_dir
    problems = combination_problems(recipe, check_paths=check_paths, needs_tokenizer=needs_tokenizer)
    if environment_checks is not None:
        problems += environment_checks(recipe)
    if problems:
        raise RecipeError.from_problems(source, problems)
    return recipe


# Names from transformers, peft, TRL and other tools, mapped to ftune's key of the same meaning.
_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lr": "learning_rate", "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler", "optim": "optimizer", "max_seq_length": "max_length",
    "sequence_len": "max_length", "dataset": "source", "path": "source", "base_model": "name_or_path",
    "model_name_or_path": "name_or_path", "gradient_checkpointing": "mode", "bnb_4bit_quant_type": "method",
    "bnb_4bit_use_double_quant": "double_quant", "bnb_4bit_compute_dtype": "compute_dtype", "torch_dtype": "dtype",
}


_UNION_TAGS = {"bool", "int", "float", "str"}


def _is_union_tag(part: Any) -> bool:
    """pydantic's name of a union's member in an error's location: list[str], literal['auto'], bool."""
    return isinstance(part, str) and ("[" in part or part in _UNION_TAGS)


def _union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors with those of a union's members (`list[str] | Literal['all-linear']`,
    `bool | Literal['auto']`) reduced to the member the value was meant for: the list's for a list,
    else the literal's, which then names the other members too; member names left out of keys."""
    groups: dict[tuple, list[tuple[str, dict[str, Any]]]] = {}
    kept: list[dict[str, Any]] = []
    for error in errors:
        loc = tuple(error["loc"])
        tag = next((part for part in loc if _is_union_tag(part)), None)
        if tag is None:
            kept.append(error)
            continue
        base = loc[:loc.index(tag)]
        if base not in groups:
            groups[base] = []
            kept.append({"group": base})  # the group's place among the errors
        groups[base].append((tag, {**error, "loc": tuple(p for p in loc if not _is_union_tag(p))}))
    result = []
    for error in kept:
        if "group" not in error:
            result.append(error)
            continue
        members = groups[error["group"]]
        literal = next((e for tag, e in members if tag.startswith("literal") and e["type"] == "literal_error"), None)
        if literal is None:
            result += [e for _, e in members]
        elif isinstance(literal.get("input"), list):
            result += [e for tag, e in members if not tag.startswith("literal")]
        else:
            others = {tag.split("[")[0] for tag, _ in members if not tag.startswith("literal")}
            names = {"list": "a list of names", "bool": "true or false", "int": "a number", "float": "a number",
                     "str": "text"}
            result.append({**literal, "also": " or ".join(sorted(names.get(o, o) for o in others))})
    return result


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> tuple[str, str]:
    """One pydantic error as (key path, message with a hint)."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        known = _known_keys(parent)
        alias = _ALIASES.get(loc[-1])
        close = [alias] if alias in known else difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
        return key, f"unknown key; {hint}"
    if kind == "missing":
        return key, "required key is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        also = f", or {error['also']}" if error.get("also") else ""
        return key, f"got {error.get('input')!r}; expected one of {expected}{also}"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and kind not in ("value_error",) and not isinstance(error["input"], dict):
        message = f"{message} (got {error['input']!r})"
    return key, message


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def combination_problems(recipe: Recipe, *, check_paths: bool = True, needs_tokenizer: bool = True
                         ) -> list[Problem]:
    """Keys that are valid alone but not together, and local paths that do not exist."""
    problems: list[tuple[str, str]] = []
    model = recipe.model
    if (model.name_or_path is None) == (model.preset is None):
        problems.append(("model", "set exactly one of name_or_path (a directory or hub id) and preset"))
    if model.preset is not None and model.tokenizer is None and needs_tokenizer:
        problems.append(("model.tokenizer", "a preset has no tokenizer of its own; name a tokenizer directory or hub id"))
    if recipe.checkpointing.budget is not None and recipe.checkpointing.mode != "smart":
        problems.append(("checkpointing.budget", f"only the smart mode uses a budget (mode is {recipe.checkpointing.mode})"))
    training = recipe.training
    if training.max_steps is not None and training.epochs is not None:
        problems.append(("training.epochs", "set max_steps or epochs, not both"))
    if recipe.data.eval is None:
        for key in ("eval_steps", "eval_batch_size", "keep_best"):
            if key in training.model_fields_set and getattr(training, key):
                problems.append((f"training.{key}", "evaluation needs data: set data.eval (a fraction such as 0.05, "
                                 "or an eval file)"))
        if recipe.data.eval_split is not None:
            problems.append(("data.eval_split", "names the split of data.eval, which is not set"))
    if training.keep_best and training.save_steps is not None and training.eval_steps is not None \
            and training.save_steps % training.eval_steps:
        problems.append(("training.save_steps", f"keep_best compares the checkpoints of evaluations: save_steps "
                         f"{training.save_steps} must be a multiple of eval_steps {training.eval_steps}"))
    if training.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", training.push_to_hub):
        problems.append(("training.push_to_hub", f"{training.push_to_hub!r} is not a hub repository id; write "
                         "user/name or organization/name"))
    for section in ("sft", "dpo", "grpo"):
        if section != recipe.workflow and getattr(recipe, section).model_fields_set:
            problems.append((section, f"options of the {section} workflow, but workflow is {recipe.workflow}"))
    expected_formats = {"sft": ("text", "prompt_completion", "messages"), "dpo": ("preference",), "grpo": ("prompt",)}
    if recipe.data.format != "auto" and recipe.data.format not in expected_formats[recipe.workflow]:
        problems.append(("data.format", f"the {recipe.workflow} workflow takes "
                         f"{' or '.join(expected_formats[recipe.workflow])} data, not {recipe.data.format}"))
    if recipe.distributed.strategy == "fsdp":
        if recipe.workflow != "sft":
            problems.append(("distributed.strategy", f"fsdp is tested with the sft workflow only, not {recipe.workflow}; "
                             "use ddp (each GPU holds the whole 4-bit model)"))
        if recipe.checkpointing.mode == "smart":
            problems.append(("distributed.strategy", "the smart planner plans for a whole model on each GPU; "
                             "under fsdp use checkpointing.mode none, true or unsloth"))
        if recipe.training.optimizer != "adamw_torch":
            # bitsandbytes' optimizer kernels take plain tensors; FSDP2's parameters are DTensors
            # ("got mixed torch.Tensor and DTensor" at the first step)
            problems.append(("training.optimizer", f"{recipe.training.optimizer} (bitsandbytes) cannot update FSDP's "
                             "sharded parameters; under fsdp use adamw_torch (the LoRA adapter's fp32 moments are "
                             "small: about 0.3 GiB for an 8B model at r=16, split across the GPUs)"))
    if recipe.dpo.loss_type == "exo_pair" and recipe.dpo.label_smoothing == 0:
        problems.append(("dpo.label_smoothing", "the exo_pair loss needs a label_smoothing above 0 (the EXO paper "
                         "recommends 1e-3)"))
    weights = recipe.grpo.reward_weights
    if weights is not None and len(weights) != len(recipe.grpo.rewards):
        problems.append(("grpo.reward_weights", f"{len(weights)} weights for {len(recipe.grpo.rewards)} rewards"))
    grpo = recipe.grpo
    if recipe.workflow == "grpo" and grpo.steps_per_generation is not None \
            and (training.batch_size * grpo.steps_per_generation) % grpo.num_generations:
        problems.append(("grpo.steps_per_generation", f"a call generates training.batch_size x steps_per_generation "
                         f"({training.batch_size} x {grpo.steps_per_generation}) completions, which must be whole "
                         f"groups of num_generations {grpo.num_generations}"))
    if grpo.paged_generation and grpo.cache_implementation not in ("auto", "dynamic"):
        problems.append(("grpo.paged_generation", f"the paged engine keeps its own cache: leave "
                         f"grpo.cache_implementation at auto (it is {grpo.cache_implementation})"))
    holds_reference = recipe.workflow == "dpo" or (recipe.workflow == "grpo" and grpo.beta > 0)
    if holds_reference and recipe.lora.bias != "none":
        problems.append(("lora.bias", f"{recipe.lora.bias} trains the model's biases, which {recipe.workflow}'s "
                         "reference (the model as training starts) shares, so it would move with them; and TRL's "
                         "frozen copy of the adapter fails on an adapter with biases (peft holds one such adapter "
                         "per model). Set lora.bias to none"))
    if recipe.model.adapter is not None and "lora" in recipe.model_fields_set:
        problems.append(("lora", "model.adapter continues an existing adapter, whose own LoRA settings apply"))
    if recipe.sft.assistant_only_loss and recipe.data.format in ("text", "prompt_completion"):
        problems.append(("sft.assistant_only_loss", f"needs messages data, but data.format is {recipe.data.format}"))
    if recipe.sft.completion_only_loss and recipe.data.format in ("text", "messages"):
        problems.append(("sft.completion_only_loss", f"needs prompt_completion data, but data.format is {recipe.data.format}"))
    if check_paths:
        for key, value in _input_paths(recipe):
            resolved = recipe.resolve_input(value)
            if looks_like_local_path(value) or Path(resolved).is_absolute():
                problem = path_problem(Path(resolved))
                if problem:
                    problems.append((key, problem))
    return problems


def path_problem(path: Path) -> str | None:
    """Why a local input path cannot be read, or None when it exists."""
    try:
        if path.exists():
            return None
    except (OSError, ValueError) as error:  # a name too long, a NUL byte
        return f"not a usable path: {path} ({getattr(error, 'strerror', None) or error})"
    return f"path does not exist: {path} (relative paths are resolved against the recipe's folder)"


def expand_user(value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~name of a user this system does not know: a relative path, as written
        return Path(value)


def _input_paths(recipe: Recipe) -> list[tuple[str, str]]:
    paths = [("data.source", recipe.data.source)]
    if recipe.model.name_or_path:
        paths.append(("model.name_or_path", recipe.model.name_or_path))
    if recipe.model.tokenizer:
        paths.append(("model.tokenizer", recipe.model.tokenizer))
    # model.adapter is not checked here: it is often the output of a run that comes first (the DPO
    # and GRPO quickstarts continue the SFT quickstart); loading it reports a missing folder.
    return paths


def _adapter_path(recipe: Recipe) -> list[tuple[str, str]]:
    return [("model.adapter", recipe.model.adapter)] if recipe.model.adapter else []
