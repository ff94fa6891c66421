"""Model families as data: what ftune knows of each decoder family's layer.

Kernels, the checkpointing engine, the recipe's defaults and `ftune validate` read this table
instead of testing class names. A model whose `model_type` has no entry trains on the generic
path (peft's LoRA, transformers' modules, the engine's whole-layer recompute) with a one-line
notice naming what is off; it never fails for want of an entry.

Torch-free: `ftune validate` reads it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ftune's kernels, by the names of the recipe's kernels section (ftune/integrations/transformers.py applies them)
KERNEL_NAMES = ("rms_norm", "rope", "swiglu", "fused_cross_entropy", "fused_lora")
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
# Mixtral's and Qwen3-MoE's experts: gate_up_proj (experts, 2 x intermediate, hidden) and down_proj
# (experts, hidden, intermediate)
MOE_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass(frozen=True)
class Family:
    """One decoder family, as ftune's code needs to know it."""

    name: str
    model_types: tuple[str, ...]
    # RMSNorm: Gemma scales by (1 + weight) and casts its own way (kernels/rms_norm.py CASTING_MODES)
    norm_offset: float = 0.0
    norm_casting: str = "llama"
    norm_eps_attribute: str = "variance_epsilon"
    # The gated MLP's activation: silu (SwiGLU) or gelu_tanh (GeGLU); the `swiglu` kernel computes both
    activation: str = "silu"
    # The attention implementation a recipe's `auto` picks: sdpa, or ftune's own where sdpa would
    # drop part of the family's attention or run it slowly: Gemma-2's logit soft-capping runs on
    # FlashAttention 4 where installed, else FlexAttention (ftune_softcap,
    # ftune/kernels/softcap_attention.py), instead of eager's tokens x tokens scores; Gemma-3's and
    # Phi-3's sliding windows on the flash kernel's window (ftune_window,
    # ftune/kernels/window_attention.py) instead of sdpa's dense tokens x tokens mask
    attention: str = "sdpa"
    attention_projections: tuple[str, ...] = LLAMA_ATTENTION
    mlp_projections: tuple[str, ...] = GATED_MLP
    # The input embedding multiplies its rows by sqrt(hidden) (Gemma)
    scaled_embedding: bool = False
    # The layers' residual layout, which the engine runs as two halves with the MLP chunked over
    # tokens (ftune/engine/halves.py): "pre_norm" (`h = x + attn(norm(x)); y = h + mlp(norm(h))`),
    # "sandwich_norm" (Gemma 2 and 3: each branch's output normed again before its residual add), or
    # None: layers recomputed whole
    residual_halves: str | None = None
    # A mixture of experts' weights, as peft's `target_parameters` names them: 3D parameters (experts
    # first) in transformers 5, not linear layers. LoRA adapts each expert's slice through peft's
    # ParamWrapper; bitsandbytes quantizes nn.Linear only, so under 4-bit loading they stay in the
    # model's 16-bit dtype, as does the router (a parameter too). The router's logits feed the
    # load-balancing loss.
    expert_parameters: tuple[str, ...] = ()
    # ftune's kernels that apply to the family (ftune/integrations/transformers.py KERNELS)
    kernels: frozenset[str] = field(default_factory=frozenset)

    @property
    def lora_targets(self) -> list[str]:
        """Every linear projection of the family's layers: the default LoRA targets."""
        return [*self.attention_projections, *self.mlp_projections]

    @property
    def experts(self) -> bool:
        return bool(self.expert_parameters)


_ALL_KERNELS = frozenset(KERNEL_NAMES)
_LLAMA_LIKE = dict(residual_halves="pre_norm", kernels=_ALL_KERNELS)
_GEMMA_LIKE = dict(norm_offset=1.0, norm_casting="gemma", norm_eps_attribute="eps", activation="gelu_tanh",
                   scaled_embedding=True, kernels=_ALL_KERNELS)
_SANDWICH = dict(residual_halves="sandwich_norm", **_GEMMA_LIKE)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), **_LLAMA_LIKE),
    Family("mistral", ("mistral",), **_LLAMA_LIKE),
    Family("qwen2", ("qwen2",), **_LLAMA_LIKE),
    Family("qwen3", ("qwen3",), **_LLAMA_LIKE),
    Family("gemma", ("gemma",), residual_halves="pre_norm", **_GEMMA_LIKE),
    Family("gemma2", ("gemma2",), attention="ftune_softcap", **_SANDWICH),
    Family("gemma3", ("gemma3_text",), attention="ftune_window", **_SANDWICH),
    # Phi-3's projections are fused: qkv_proj, and gate_up_proj (no separate gate). Its layers are
    # pre-norm with a dropout on each branch, off (resid_pdrop 0) in the released models; a layer
    # whose dropout is on recomputes whole
    Family("phi3", ("phi3",), attention="ftune_window", attention_projections=("qkv_proj", "o_proj"),
           mlp_projections=("gate_up_proj", "down_proj"), residual_halves="pre_norm", kernels=_ALL_KERNELS),
    # No linear layer in the MLP: LoRA adapts the attention's projections and the experts'
    # parameters; the MoE block recomputes whole. The fused loss adds the router's load-balancing
    # loss as the class's forward does
    Family("mixtral", ("mixtral",), mlp_projections=(), expert_parameters=MOE_EXPERTS,
           kernels=frozenset({"rms_norm", "rope", "fused_cross_entropy", "fused_lora"})),
    Family("qwen3_moe", ("qwen3_moe",), mlp_projections=(), expert_parameters=MOE_EXPERTS,
           kernels=frozenset({"rms_norm", "rope", "fused_cross_entropy", "fused_lora"})),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(model_type: str | None) -> Family | None:
    """The family of a transformers `model_type`, or None for one ftune has no entry for."""
    return _BY_MODEL_TYPE.get(model_type or "")


def expert_model_types() -> tuple[str, ...]:
    """The model types whose experts are 3D parameters (quantized to 4 bits with the model)."""
    return tuple(model_type for family in FAMILIES if family.experts for model_type in family.model_types)


def known_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def models_table() -> str:
    """docs/models.md's table: what runs for each family (tests/test_families.py keeps it true)."""
    lines = [
        "| family | model types | LoRA targets (auto) | attention (auto) | kernels | layers recomputed | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        kernels = ", ".join(k for k in KERNEL_NAMES if k in family.kernels) or "none"
        halves = f"as two halves ({family.residual_halves}), the MLP in chunks" if family.residual_halves else "whole"
        notes = []
        if family.scaled_embedding:
            notes.append("scaled embedding (kept in host memory with its scale)")
        if family.activation != "silu":
            notes.append(f"{family.activation} MLP (GeGLU)")
        if family.experts:
            notes.append("experts (3D parameters) adapted through peft's target_parameters; under 4-bit loading "
                         "quantized as they load (ftune, through bitsandbytes) and dequantized a layer at a time, "
                         "the adapter's delta added (16-bit under FSDP); router loss with its gradient in every mode, "
                         "logged as aux_loss")
        targets = ", ".join(family.lora_targets)
        if family.expert_parameters:
            targets += f"; parameters {', '.join(family.expert_parameters)}"
        lines.append(f"| {family.name} | {', '.join(family.model_types)} | {targets} | "
                     f"{family.attention} | {kernels} | {halves} | {'; '.join(notes) or '-'} |")
    lines.append("| any other causal LM | - | all-linear | sdpa | none | whole | a one-line notice names what is off |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(models_table(), end="")
