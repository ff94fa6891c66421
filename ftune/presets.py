"""Model shapes that ship with ftune, so a model can be built, measured and estimated offline.

Each preset is the config of a public model (the shape only: sizes, heads, rope, tying), or a
tiny shape for tests and the quickstart. `ftune.model` builds a preset with random weights; the
memory model reads the same numbers. Memory and speed depend on the shape, not on the values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers imports torch: the shapes are read by torch-free code (ftune validate)
    from transformers import PretrainedConfig


def _llama3(hidden, intermediate, layers, heads, *, tie, factor, head_dim=None):
    config = dict(
        model_type="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    )
    if head_dim is not None:
        config["head_dim"] = head_dim
    return config


def _qwen2(vocab, hidden, intermediate, layers, heads, kv_heads, *, tie):
    return dict(
        model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=tie, hidden_act="silu",
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    )


def _qwen3(hidden, intermediate, layers, heads, *, tie):
    return dict(
        model_type="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=tie, hidden_act="silu",
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    )


def _phi3(vocab, hidden, intermediate, layers, heads, kv_heads, *, context, rope_theta, sliding_window):
    # Phi-3 and Phi-4 (model_type phi3): fused qkv_proj and gate_up_proj, untied embeddings
    return dict(
        model_type="phi3", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, original_max_position_embeddings=context, rms_norm_eps=1e-5,
        tie_word_embeddings=False, hidden_act="silu", sliding_window=sliding_window,
        rope_parameters=dict(rope_type="default", rope_theta=rope_theta),
    )


def _gemma3(hidden, intermediate, layers, heads, kv_heads, head_dim, *, query_pre_attn_scalar):
    # Gemma 3 4b/12b/27b, the text model of the vision-language checkpoint: five sliding layers
    # (1024 tokens, rope 10k) to one full layer (rope 1M, linearly scaled 8x to 128k), no soft caps
    return dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=1024,
        rope_parameters=dict(
            full_attention=dict(rope_type="linear", rope_theta=1000000.0, factor=8.0),
            sliding_attention=dict(rope_type="default", rope_theta=10000.0),
        ),
    )


def _tiny(model_type: str, **extra: Any) -> dict[str, Any]:
    # vocab 512 matches the quickstart tokenizer (data/quickstart/tokenizer). Every projection's
    # input is whole 64-value quantization blocks and its output a multiple of 32: the shapes that
    # every bitsandbytes CPU kernel takes (ftune/integrations/bitsandbytes.py).
    config = dict(
        model_type=model_type, vocab_size=512, hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
        # Random weights at transformers' usual std of 0.02 cap the logits of a 128-wide model near
        # 2.6 (frozen head, frozen final norm), and the loss stalls at 4.3; at 0.1 it falls to ~1.1.
        initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    config.update(extra)
    return config


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny shapes: the quickstart and the tests train these on a CPU in seconds.
    "tiny-llama": _tiny("llama"),
    "tiny-qwen2": _tiny("qwen2"),
    "tiny-qwen3": _tiny("qwen3", head_dim=32),
    "tiny-mistral": _tiny("mistral", sliding_window=None),
    # Tiny mixtures of experts (4 experts, 2 a token, the router's loss on): 4-bit experts on a CPU
    "tiny-mixtral": _tiny("mixtral", sliding_window=None, num_local_experts=4, num_experts_per_tok=2,
                          output_router_logits=True, router_aux_loss_coef=0.02),
    "tiny-qwen3-moe": _tiny("qwen3_moe", head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                            output_router_logits=True, router_aux_loss_coef=0.001, norm_topk_prob=True),
    # Llama 3.x
    "llama-3.2-1b": _llama3(2048, 8192, 16, 32, tie=True, factor=32.0, head_dim=64),
    "llama-3.2-3b": _llama3(3072, 8192, 28, 24, tie=True, factor=32.0, head_dim=128),
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32, tie=False, factor=8.0),
    "llama-3.1-70b": _llama3(8192, 28672, 80, 64, tie=False, factor=8.0),
    # Qwen2.5
    "qwen2.5-0.5b": _qwen2(151936, 896, 4864, 24, 14, 2, tie=True),
    "qwen2.5-1.5b": _qwen2(151936, 1536, 8960, 28, 12, 2, tie=True),
    "qwen2.5-3b": _qwen2(151936, 2048, 11008, 36, 16, 2, tie=True),
    "qwen2.5-7b": _qwen2(152064, 3584, 18944, 28, 28, 4, tie=False),
    "qwen2.5-14b": _qwen2(152064, 5120, 13824, 48, 40, 8, tie=False),
    "qwen2.5-32b": _qwen2(152064, 5120, 27648, 64, 40, 8, tie=False),
    # Qwen3
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tie=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tie=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tie=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tie=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, tie=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, tie=False),
    # Mistral 7B v0.3
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    # Gemma 2
    "gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        query_pre_attn_scalar=256, sliding_window=4096,
    ),
    "gemma-2-9b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        query_pre_attn_scalar=256, sliding_window=4096,
    ),
    # Gemma 3 (text)
    "gemma-3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=512,
    ),
    "gemma-3-4b": _gemma3(2560, 10240, 34, 8, 4, 256, query_pre_attn_scalar=256),
    "gemma-3-12b": _gemma3(3840, 15360, 48, 16, 8, 256, query_pre_attn_scalar=256),
    # 27b scales queries by 168^-0.5 (hidden / heads), not by its head_dim of 128
    "gemma-3-27b": _gemma3(5376, 21504, 62, 32, 16, 128, query_pre_attn_scalar=168),
    # Phi-3 (the 4k-context models) and Phi-4
    "phi-3-mini": _phi3(32064, 3072, 8192, 32, 32, 32, context=4096, rope_theta=10000.0, sliding_window=2047),
    "phi-3-medium": _phi3(32064, 5120, 17920, 40, 40, 10, context=4096, rope_theta=10000.0, sliding_window=2047),
    "phi-4": _phi3(100352, 5120, 17920, 40, 40, 10, context=16384, rope_theta=250000.0, sliding_window=None),
    # Mixtures of experts: every layer's MLP is `experts` SwiGLU MLPs of moe_intermediate_size (Mixtral:
    # intermediate_size), of which a router picks `experts per token`
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        sliding_window=None, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        hidden_act="silu", num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}


def preset_config(name: str) -> PretrainedConfig:
    """The transformers config of a preset."""
    from transformers import AutoConfig

    values = dict(PRESETS[name])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)
