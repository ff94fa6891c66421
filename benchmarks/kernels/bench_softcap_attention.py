"""Gemma-2's soft-capped attention, forward + backward, at Gemma-2-9B's heads (16 query heads, 8
key heads, 256 wide, cap 50, query scale 256^-0.5), batch 1, for a full layer and a sliding one
(window 4096):

- ftune:      ftune.kernels.softcap_attention, compiled FlexAttention, its own cached block mask
- eager:      transformers' gemma2 eager_attention_forward (what Gemma-2 runs today), with
              transformers' additive mask (bf16, tokens x tokens, made before timing)
- hf-flex:    transformers' flex_attention_forward (attn_implementation="flex_attention") with the
              same block mask: whether transformers' own flex path would do
- sdpa-nocap: transformers' sdpa_attention_forward without the cap (wrong for Gemma-2): the speed of
              the attention every other family gets; causal via is_causal, the window as a
              boolean mask (as transformers passes it)

    python benchmarks/kernels/bench_softcap_attention.py --out results/softcap_attention.json
    python benchmarks/kernels/bench_softcap_attention.py --out results/softcap_attention.json --tokens 8192

Peak memory is `working MiB` above the inputs (q, k, v, the output gradient, the masks).
"""

import types

import torch
from harness import DTYPES, measure, parse_args, report  # first: puts the repository on sys.path
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from ftune.kernels.softcap_attention import causal_block_mask, softcap_attention
from ftune.presets import PRESETS

SOFTCAP_PRESETS = [name for name, config in PRESETS.items() if config.get("attn_logit_softcapping")]


def main() -> None:
    args = parse_args(__doc__, [8192, 16384], SOFTCAP_PRESETS, ["gemma-2-9b"])
    dtype = DTYPES[args.dtype]
    rows = []
    for preset in args.models:
        config = PRESETS[preset]
        heads, kv_heads, head_dim = (config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
        softcap, window = config["attn_logit_softcapping"], config["sliding_window"]
        scaling = config["query_pre_attn_scalar"] ** -0.5
        # What eager_attention_forward and sdpa_attention_forward read from Gemma2Attention
        module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=True, head_dim=head_dim,
                                       is_causal=True)
        for tokens in args.tokens:
            # The projections' outputs as the attention module hands them on: [1, heads, tokens, 256]
            # views of [1, tokens, heads, 256]
            query = torch.randn(1, tokens, heads, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
            key = torch.randn(1, tokens, kv_heads, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
            value = torch.randn(1, tokens, kv_heads, head_dim, dtype=dtype, device="cuda").transpose(1, 2)
            inputs = [t.requires_grad_() for t in (query, key, value)]
            grad = torch.randn(1, tokens, heads, head_dim, dtype=dtype, device="cuda")
            for case, layer_window in (("full", None), ("sliding", window)):
                function = None if layer_window is None else sliding_window_causal_mask_function(layer_window)
                mask_kwargs = dict(batch_size=1, q_length=tokens, kv_length=tokens, device="cuda")
                if function is not None:
                    mask_kwargs["mask_function"] = function
                additive = eager_mask(dtype=dtype, **mask_kwargs)
                boolean = None if layer_window is None else sdpa_mask(allow_is_causal_skip=False, **mask_kwargs)
                block_mask = causal_block_mask(tokens, tokens, layer_window, torch.device("cuda"))
                impls = {
                    "ftune": lambda: softcap_attention(module, *inputs, None, scaling=scaling, softcap=softcap,
                                                       sliding_window=layer_window),
                    "eager": lambda: eager_attention_forward(module, *inputs, additive, scaling=scaling,
                                                             softcap=softcap),
                    "hf-flex": lambda: flex_attention_forward(module, *inputs, block_mask, scaling=scaling,
                                                              softcap=softcap),
                    "sdpa-nocap": lambda: sdpa_attention_forward(module, *inputs, boolean, scaling=scaling),
                }
                for impl, attend in impls.items():

                    def step(attend=attend):
                        output, _ = attend()
                        output.backward(grad)

                    try:
                        measured = measure(step, inputs, graph=False)
                    except torch.OutOfMemoryError:
                        print(f"{preset} {case} {tokens} tokens: {impl} ran out of memory")
                        continue
                    finally:
                        for tensor in inputs:
                            tensor.grad = None
                        torch.cuda.empty_cache()
                    rows.append({"model": preset, "case": case, "tokens": tokens, "impl": impl, **measured})
                del additive, boolean
            del query, key, value, inputs, grad
    report("softcap_attention", args, rows)


if __name__ == "__main__":
    main()
