"""Use what a run trained: find it in a folder, load it for generation, generate, chat.

A folder given to `ftune generate`, `chat` or `export` is one of:
  a run       a finished run's output_dir (adapter_config.json and ftune's recipe.yaml), or one of
              its checkpoint-N folders: loaded as it trained, the base through
              ftune.model.load_base_model (4-bit where the recipe says so) and the adapter on it;
  a model     a folder with config.json and weights, such as `ftune export --format merged` writes:
              loaded with AutoModelForCausalLM.from_pretrained as any transformers server would.
Anything else is a NotARunError naming what the folder lacks. On a machine without CUDA the
weights must fit in free RAM, checked before any loading (HostMemoryShortage).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import psutil
from transformers import TextStreamer

from ftune.errors import HostMemoryShortage, ModelError, NotARunError, first_line
from ftune.memory.monitor import GiB, format_bytes
from ftune.outputs import RECIPE_FILE, SUMMARY_FILE
from ftune.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
# Beyond the weights, generation holds the KV cache, activations and the libraries: on the
# quickstart about 0.5 GiB of RSS over its 20 MiB of weights.
_RUNTIME_RAM = int(0.75 * GiB)


@dataclass
class RunFolder:
    """A folder to generate from or export: a run (adapter + recipe) or a model (config + weights)."""

    path: Path
    kind: str  # "run" or "model"
    recipe: Recipe | None = None
    run_dir: Path | None = None  # a run's output_dir (a checkpoint's parent)

    @property
    def name(self) -> str:
        return self.path.name if self.kind == "model" or self.run_dir == self.path else \
            f"{self.run_dir.name}-{self.path.name}"

    def tokenizer_dir(self) -> Path:
        """Where the tokenizer was saved with the adapter (the run's folder for an old checkpoint)."""
        for folder in (self.path, self.run_dir):
            if folder is not None and (folder / "tokenizer_config.json").is_file():
                return folder
        return self.path


def open_folder(path: str | Path) -> RunFolder:
    """What a folder holds, or NotARunError naming what it lacks and what to pass instead."""
    path = Path(path)
    usage = ("Pass the training.output_dir of a finished run (`ftune train` writes the adapter there when it "
             "ends), a checkpoint-N folder inside it, or a folder written by `ftune export --format merged`.")
    if not path.exists():
        raise NotARunError(f"{path} does not exist.", hint=usage)
    if not path.is_dir():
        raise NotARunError(f"{path} is a file, not a run's folder.", hint=usage)
    if (path / ADAPTER_CONFIG).is_file():
        run_dir = path.parent if _CHECKPOINT.match(path.name) and not (path / RECIPE_FILE).is_file() else path
        if not (run_dir / RECIPE_FILE).is_file():
            raise NotARunError(
                f"{path} holds a LoRA adapter but no {RECIPE_FILE}: ftune cannot tell which base model it belongs "
                "to or how that base was loaded.",
                hint=f"Copy the {RECIPE_FILE} of the run that trained it beside it, or load it with "
                "PeftModel.from_pretrained(base, folder).",
            )
        recipe = load_recipe(run_dir / RECIPE_FILE, check_paths=False)
        return RunFolder(path=path, kind="run", recipe=recipe, run_dir=run_dir)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return RunFolder(path=path, kind="model")
    checkpoints = sorted((p for p in path.glob("checkpoint-*") if (p / ADAPTER_CONFIG).is_file()),
                         key=lambda p: int(p.name.split("-")[1]))
    if checkpoints and (path / RECIPE_FILE).is_file():
        raise NotARunError(
            f"{path} holds no adapter yet: the run has not finished (its newest checkpoint is {checkpoints[-1].name}).",
            hint=f"Pass {checkpoints[-1]} to use that checkpoint, or run the same `ftune train` command to finish "
            "the run.",
        )
    holds = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
    raise NotARunError(
        f"{path} holds no adapter ({ADAPTER_CONFIG}) and no model (config.json with .safetensors weights); "
        f"it holds {holds}.",
        hint=usage,
    )


def base_model_source(folder: RunFolder) -> str:
    """The base weights a run's adapter belongs to, as saved before quantization: the model's folder
    or hub id, or for a preset the folder ftune saved its random weights in (the one the run trained
    on, named in summary.json; rebuilt from the preset, seed and dtype where that is gone)."""
    recipe = folder.recipe
    if recipe.model.preset is None:
        return recipe.resolve_input(recipe.model.name_or_path)
    summary = folder.run_dir / SUMMARY_FILE
    if summary.is_file():
        trained_on = json.loads(summary.read_text()).get("model")
        if trained_on and (Path(trained_on) / "config.json").is_file():
            return trained_on
    from ftune.model import materialize_preset, pick_device, resolve_dtype

    device = pick_device()
    return str(materialize_preset(recipe.model.preset, seed=recipe.training.seed,
                                  dtype=resolve_dtype(recipe.model.dtype, device), device=device))


# -- memory ------------------------------------------------------------------------------------

def weight_bytes(folder: RunFolder, *, quantized: bool | None = None, dtype_bytes: int | None = None) -> int:
    """Bytes of the weights as they will be loaded: a model folder's files; a run's base from its
    shape (4-bit blocks and constants, the other modules in the dtype they load in on this machine)."""
    if folder.kind == "model":
        return sum(p.stat().st_size for p in folder.path.glob("*.safetensors"))
    from ftune.memory.estimate import model_shape

    recipe = folder.recipe
    shape = model_shape(recipe)
    if quantized is None:
        quantized = recipe.quantization.method != "none"
    if dtype_bytes is None:
        dtype_bytes = _load_dtype_bytes(recipe)
    linear = sum(i * o for i, o in shape.projections().values()) * shape.layers
    # 4-bit: half a byte a weight, and a constant per block of 64 (a byte, or with double
    # quantization off a float32)
    constants = linear // 64 if recipe.quantization.double_quant else linear // 16
    linear_bytes = linear // 2 + constants if quantized else linear * dtype_bytes
    embeddings = shape.vocab * shape.hidden * dtype_bytes * (1 if shape.tied else 2)
    norms = (2 * shape.layers + 1) * shape.hidden * dtype_bytes
    return linear_bytes + embeddings + norms


def _load_dtype_bytes(recipe: Recipe) -> int:
    from ftune.model import pick_device, resolve_dtype

    return resolve_dtype(recipe.model.dtype, pick_device()).itemsize


def check_host_memory(needed: int, what: str, *, hint: str) -> None:
    """HostMemoryShortage when `needed` bytes (plus the runtime's share) exceed the free RAM."""
    available = psutil.virtual_memory().available
    if needed + _RUNTIME_RAM > available:
        raise HostMemoryShortage(
            f"{what} needs about {format_bytes(needed + _RUNTIME_RAM)} of RAM ({format_bytes(needed)} of weights), "
            f"and this machine has {format_bytes(available)} free.",
            hint=hint,
        )


# -- loading -----------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A model ready to generate, its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    device: Any
    source: str
    folder: RunFolder


def load_for_generation(folder: RunFolder, device: torch.device | None = None) -> Loaded:
    """The run as it trained (the base through load_base_model, the adapter on it), or the model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.model import load_base_model, pick_device

    device = device or pick_device()
    if device.type != "cuda":
        what = f"{folder.path} (on the CPU: no CUDA GPU here)"
        check_host_memory(weight_bytes(folder), what, hint=(
            "Run it on a machine with a GPU or more free RAM; or export it (`ftune export "
            f"{folder.path} --format gguf --quant q8_0`) and run the file with llama.cpp, which needs about half "
            "the RAM of 16-bit weights."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder.tokenizer_dir()))
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder.path}: could not load the tokenizer saved with it: {first_line(error)}",
                         hint="A run's folder holds the tokenizer it trained with; copy it there again from "
                         "model.tokenizer.") from None
    if folder.kind == "run":
        from peft import PeftModel

        base, source, _ = load_base_model(folder.recipe, device)
        try:
            model = PeftModel.from_pretrained(base, str(folder.path))
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelError(f"{folder.path}: the adapter does not load onto {source}: {first_line(error)}",
                             hint="Pass the folder of the run that trained this adapter (its recipe.yaml names "
                             "the base).") from None
    else:
        source = str(folder.path)
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", device_map={"": device})
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model=model, tokenizer=tokenizer, device=device, source=source, folder=folder)


# -- generation --------------------------------------------------------------------------------

@dataclass
class Sampling:
    """How tokens are picked: greedy at temperature 0, else sampled."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                    "repetition_penalty": self.repetition_penalty, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k or None, "repetition_penalty": self.repetition_penalty}


def prompt_text(tokenizer, messages: list[dict[str, str]], *, chat: bool = True) -> str:
    """The conversation through the tokenizer's chat template (ready for the assistant's turn), or
    the last message as it is when there is no template or chat is off."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return messages[-1]["content"]


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish_reason: str  # "stop" (an end token) or "length" (max_new_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {"completion": self.text, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.new_tokens / self.seconds, 1) if self.seconds > 0 else None,
                "finish_reason": self.finish_reason}


def stop_token_ids(loaded: Loaded) -> list[int]:
    """The tokenizer's end token and the model's: a chat template ends turns with the former."""
    ids = [loaded.tokenizer.eos_token_id]
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def complete(loaded: Loaded, text: str, sampling: Sampling, *, templated: bool = True, streamer=None) -> Completion:
    """Generate after `text`; the new text without special tokens."""
    import torch

    tokenizer = loaded.tokenizer
    # a chat template's text already holds its special tokens (a BOS among them, where the model has one)
    templated = templated and bool(getattr(tokenizer, "chat_template", None))
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    inputs = {k: v.to(loaded.device) for k, v in inputs.items()}
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    stops = stop_token_ids(loaded)
    started = time.perf_counter()
    output = loaded.model.generate(**inputs, **sampling.generate_kwargs(), eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer)
    seconds = time.perf_counter() - started
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    finish = "stop" if new and new[-1] in stops else "length"
    return Completion(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=inputs["input_ids"].shape[1],
                      new_tokens=len(new), seconds=seconds, finish_reason=finish)


@dataclass
class ChatSession:
    """A conversation: the system prompt, then each user turn and the model's answer."""

    loaded: Loaded
    sampling: Sampling
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, out: TextIO | None = None) -> Completion:
        """The model's answer to one more user turn, streamed to `out` as it is generated."""
        self.messages.append({"role": "user", "content": text})
        streamer = _Streamer(self.loaded.tokenizer, out) if out is not None else None
        answer = complete(self.loaded, prompt_text(self.loaded.tokenizer, self.messages), self.sampling,
                          streamer=streamer)
        self.messages.append({"role": "assistant", "content": answer.text})
        return answer


class _Streamer(TextStreamer):
    """transformers' TextStreamer (the prompt skipped, special tokens left out), written to `out`."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()
