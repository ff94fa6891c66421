"""`ftune export`: a run's adapter merged into its base, as a transformers folder or a GGUF file.

merged  The adapter is merged into the base's original weights (the model's own files; for a
        preset, the folder ftune saved its random weights in) in 16 bits (or the base's stored
        dtype, or the one asked for), and saved with save_pretrained beside the tokenizer and its
        chat template: a folder any transformers-based server reads.

        Why not the dequantized 4-bit weights the adapter trained against: dequantizing NF4 gives
        back the base plus its quantization error (9% of the weights' norm on the quickstart's
        layers), and a model merged from it carries that error in every layer, adapted or not,
        at 16 bits' cost: the 4-bit model's quality at four times its size, and a worse start for
        any later quantization (GGUF), which would quantize the error a second time. Merged into
        the original weights, the model is the base as published plus the learned update, as with
        any LoRA. It differs from the 4-bit model that trained by the quantization error alone: on
        the quickstart (random weights, which amplify it) the logits of the 4-bit model with its
        adapter and of the merged one differ by 53% of their norm, as much as those of the 4-bit
        and the 16-bit bases without an adapter do (53%); the merge itself adds 1e-5.

gguf    The merged weights written with llama.cpp's `gguf` package, for the families whose tensors
        llama.cpp's own converter (convert_hf_to_gguf.py) maps one to one: Llama (and Mistral,
        which llama.cpp runs as Llama) with the rotary permutation of q and k, Qwen2 / Qwen2.5,
        Qwen3. The tokenizer (byte-level BPE, or Llama's byte-fallback BPE), its special tokens and
        chat template go into the file. Quantization: f16, bf16 and q8_0 are what the gguf package
        quantizes; q4_k_m needs llama.cpp's `llama-quantize` on the f16 file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftune.errors import ExportError, ModelError, first_line
from ftune.inference import RunFolder, base_model_source, check_host_memory, open_folder, weight_bytes

MERGED_DTYPES = ("auto", "bf16", "f16", "f32")
GGUF_QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
# transformers model_type -> llama.cpp architecture, for the families written here
GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_TORCH_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


@dataclass
class Exported:
    path: Path
    format: str
    precision: str
    bytes: int
    seconds: float
    notices: list[str] = field(default_factory=list)


def default_output(folder: RunFolder, fmt: str) -> Path:
    """Beside the run, not inside it: a run's folder holds only what a run writes (ftune.outputs)."""
    return (folder.run_dir or folder.path).parent / f"{folder.name}-{'merged' if fmt == 'merged' else 'gguf'}"


# -- the merged model --------------------------------------------------------------------------

def _family(folder: RunFolder) -> str:
    if folder.kind == "model":
        return json.loads((folder.path / "config.json").read_text()).get("model_type", "?")
    from ftune.memory.estimate import model_shape

    return model_shape(folder.recipe).model_type


def _stored_dtype(source: str) -> str:
    """The dtype a model's config says its weights are stored in (bfloat16 when it does not say)."""
    config = Path(source) / "config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        return values.get("dtype") or values.get("torch_dtype") or "bfloat16"
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        return str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch.")
    except (OSError, ValueError):
        return "bfloat16"


def merged_model(folder: RunFolder, dtype: str = "auto"):
    """(merged model on the CPU, the torch dtype it holds, where its base came from)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if folder.kind == "model":
        source = str(folder.path)
        torch_dtype = getattr(torch, _TORCH_DTYPES[dtype]) if dtype != "auto" else getattr(torch, _stored_dtype(source))
        check_host_memory(weight_bytes(folder) * torch_dtype.itemsize // 2, f"Loading {source}",
                          hint="Export on a machine with more free RAM.")
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map={"": "cpu"}), torch_dtype, source
    recipe = folder.recipe
    source = base_model_source(folder)
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype] if dtype != "auto" else _stored_dtype(source))
    check_host_memory(weight_bytes(folder, quantized=False, dtype_bytes=torch_dtype.itemsize),
                      f"Merging {folder.path} into its {torch_dtype} base", hint=(
                          "Merging runs on the CPU from the base's 16-bit weights: export on a machine with that much "
                          "free RAM, or --dtype bf16 where the base is stored in float32."))
    try:
        base = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map={"": "cpu"}, revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"model.name_or_path: could not load the base '{source}' to merge into: {first_line(error)}",
                         hint="The run's recipe.yaml names its base; it must be reachable (a local folder, or a hub "
                         "id while online).") from None
    try:
        model = PeftModel.from_pretrained(base, str(folder.path))
        # adapter weights are added in float32 and rounded once into the base's dtype (peft's merge)
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as error:  # safe_merge: NaN in the merged weights
        raise ExportError(f"{folder.path}: merging the adapter failed: {first_line(error)}",
                          hint="The adapter holds NaN or infinite values; export an earlier checkpoint "
                          "(a checkpoint-N folder of the run).") from None
    return merged, torch_dtype, source


def _prepare_target(target: Path, overwrite: bool) -> None:
    if target.exists() and (target.is_file() or any(target.iterdir())) and not overwrite:
        raise ExportError(f"{target} already exists; ftune does not write over it.",
                          hint="Pass --out to write elsewhere, or --overwrite to replace it.")


def export_merged(path: str | Path, *, out: str | Path | None = None, dtype: str = "auto",
                  overwrite: bool = False) -> Exported:
    """Merge a run's adapter into its 16-bit base and save the folder (save_pretrained + tokenizer)."""
    from transformers import AutoTokenizer

    if dtype not in MERGED_DTYPES:
        raise ExportError(f"--dtype {dtype}: merged models are saved in {', '.join(MERGED_DTYPES)}.",
                          hint="auto keeps the base's own dtype; bf16 for GPUs that have it, f16 otherwise.")
    folder = open_folder(path)
    if folder.kind == "model" and dtype == "auto":
        raise ExportError(f"{folder.path} is already a merged model.",
                          hint="Pass a run's folder, or --format gguf to convert this one, or --dtype to cast it.")
    target = Path(out) if out is not None else default_output(folder, "merged")
    _prepare_target(target, overwrite)
    started = time.perf_counter()
    merged, torch_dtype, source = merged_model(folder, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder.tokenizer_dir()))
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    card = (folder.run_dir or folder.path) / "README.md"
    if card.is_file():
        (staging / "README.md").write_text(card.read_text() + _merged_note(source, torch_dtype))
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    return Exported(path=target, format="merged", precision=str(torch_dtype).removeprefix("torch."), bytes=size,
                    seconds=time.perf_counter() - started)


def _merged_note(source: str, dtype) -> str:
    return (f"\n## This folder\n\nThe adapter merged into the base's original weights ({source}) in "
            f"{str(dtype).removeprefix('torch.')} by `ftune export --format merged`; it loads with "
            "`AutoModelForCausalLM.from_pretrained(folder)`.\n")


# -- GGUF --------------------------------------------------------------------------------------

def quantizable(quant: str) -> bool:
    """Whether the installed gguf package can quantize to `quant` (its Python quantizers)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    kinds = {"f16": ["F16"], "bf16": ["BF16"], "q8_0": ["Q8_0"], "q4_k_m": ["Q4_K", "Q6_K"]}[quant]
    for kind in kinds:
        try:
            quants.quantize(np.zeros((1, 256), dtype=np.float32), GGMLQuantizationType[kind])
        except NotImplementedError:
            return False
    return True


def check_gguf_request(family: str, quant: str) -> None:
    """ExportError for a family or quantization this export cannot write, before any loading."""
    if family not in GGUF_FAMILIES:
        raise ExportError(
            f"--format gguf: ftune writes GGUF for the Llama, Mistral, Qwen2 / Qwen2.5 and Qwen3 families; this model "
            f"is {family}.",
            hint="Export it with --format merged, then convert that folder with llama.cpp's convert_hf_to_gguf.py, "
            "which knows many more architectures.",
        )
    if quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant}: choose one of {', '.join(GGUF_QUANTS)}.",
                          hint="f16 keeps every weight; q8_0 is about half its size.")
    try:
        import gguf
    except ImportError:
        raise ExportError("--format gguf needs llama.cpp's gguf package, which is not installed.",
                          hint="pip install 'ftune[export]' (or pip install gguf).") from None
    if not quantizable(quant):
        raise ExportError(
            f"--quant {quant}: the gguf package ({getattr(gguf, '__version__', 'installed')}) has no quantizer for "
            f"{quant.upper()}'s blocks in Python; it quantizes f16, bf16 and q8_0.",
            hint=f"Export --quant f16, then run llama.cpp's `llama-quantize MODEL-f16.gguf MODEL-{quant}.gguf "
            f"{quant.upper()}`.",
        )


def export_gguf(path: str | Path, *, out: str | Path | None = None, quant: str = "f16",
                overwrite: bool = False) -> Exported:
    """Write the merged model, its tokenizer and chat template to one GGUF file."""
    folder = open_folder(path)
    family = _family(folder)
    check_gguf_request(family, quant)
    target_dir = Path(out) if out is not None else default_output(folder, "gguf")
    if target_dir.suffix == ".gguf":
        target = target_dir
    else:
        target = target_dir / f"{folder.name}-{quant}.gguf"
    _prepare_target(target, overwrite)
    started = time.perf_counter()
    merged, _, _ = merged_model(folder, "auto")
    tokenizer_dir = folder.tokenizer_dir()
    notices: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write_gguf(merged, tokenizer_dir, staging, quant=quant, name=folder.name, notices=notices)
        os.replace(staging, target)
    finally:
        if staging.exists():
            staging.unlink()
    return Exported(path=target, format="gguf", precision=quant, bytes=target.stat().st_size,
                    seconds=time.perf_counter() - started, notices=notices)


def _permute(weights, heads: int):
    """llama.cpp's rotary layout for Llama's q and k rows (convert_hf_to_gguf.py, LlamaModel.permute):
    each head's two halves interleaved; transformers' GGUF loader undoes it."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_type(name: str, data, quant: str):
    from gguf import GGMLQuantizationType as Q

    if data.ndim <= 1 or name == "rope_freqs.weight":
        return Q.F32  # norms and biases stay in float32, as llama.cpp's converter keeps them
    if quant == "q8_0":
        return Q.Q8_0 if data.shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[quant]


def write_gguf(model, tokenizer_dir: Path, path: Path, *, quant: str, name: str, notices: list[str]) -> None:
    """The GGUF file of a (merged, unquantized) transformers model of a family in GGUF_FAMILIES."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    arch_name = GGUF_FAMILIES[config.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ExportError(f"--format gguf: this model's rope_type is {rope_type}, which ftune does not write to GGUF.",
                          hint="Export --format merged and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer_dir, config, notices)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors: list[tuple[str, Any]] = []
    if rope_type == "llama3":
        tensors.append(("rope_freqs.weight", _llama3_rope_factors(rope, head_dim)))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        data = tensor.detach().to(torch.float32)
        if arch_name == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, heads)
        elif arch_name == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, kv_heads)
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"--format gguf: no GGUF name for the tensor {hf_name} of this {config.model_type} model.",
                              hint="Export --format merged and convert that folder with llama.cpp's "
                              "convert_hf_to_gguf.py.")
        tensors.append((new_name, data.numpy()))
    for new_name, data in tensors:
        kind = _tensor_type(new_name, data, quant)
        writer.add_tensor(new_name, gguf.quants.quantize(np.ascontiguousarray(data), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int):
    """Llama 3's per-frequency rope scaling as llama.cpp reads it: the tensor rope_freqs.weight."""
    import numpy as np

    base = rope.get("rope_theta", 10000.0)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _pre_tokenizer(config) -> str | None:
    """llama.cpp's name for the pre-tokenizer of the family's own tokenizer (its converter identifies
    it by hashing the tokens of a test text; these are the names it finds for these families)."""
    if config.model_type == "llama" and config.vocab_size == 128256:
        return "llama-bpe"
    if config.model_type in ("qwen2", "qwen3"):
        return "qwen2"
    return None


def _add_tokenizer(writer, tokenizer_dir: Path, config, notices: list[str]) -> None:
    """Tokens, their types, merges, special tokens and the chat template, as llama.cpp's converter
    writes them for byte-level BPE (Llama 3, Qwen) and byte-fallback BPE (Llama 2, Mistral)."""
    import gguf
    from transformers import AutoTokenizer

    spec_file = tokenizer_dir / "tokenizer.json"
    if not spec_file.is_file():
        raise ExportError(f"--format gguf: {tokenizer_dir} has no tokenizer.json (a fast tokenizer), which the GGUF "
                          "file's vocabulary is made from.",
                          hint="Save the tokenizer with a tokenizers-backed (fast) class, or convert with llama.cpp's "
                          "convert_hf_to_gguf.py.")
    model_spec = json.loads(spec_file.read_text())["model"]
    if model_spec.get("type") != "BPE":
        raise ExportError(f"--format gguf: the tokenizer is a {model_spec.get('type')} model; ftune writes BPE "
                          "tokenizers only.", hint="Convert with llama.cpp's convert_hf_to_gguf.py.")
    vocab_size = config.vocab_size
    if model_spec.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(tokenizer_dir)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        _pad(tokens, types, vocab_size, scores)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(tokenizer_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    pre = _pre_tokenizer(config)
    if pre is None:
        notices.append("the tokenizer is not a Llama 3 or Qwen one: llama.cpp will split text before BPE with its "
                       "default pre-tokenizer, which may tokenize some text differently from transformers")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _pad(tokens: list, types: list, size: int, scores: list | None = None) -> None:
    import gguf

    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
