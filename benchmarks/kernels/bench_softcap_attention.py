"""Gemma-2's soft-capped attention, forward + backward, at Gemma-2-9B's heads (16 query heads, 8
key heads, 256 wide, cap 50, query scale 256^-0.5), batch 1, for a full layer and a sliding one
(window 4096):

- ftune:      ftune.kernels.softcap_attention's FlexAttention path: compiled, given its own cached
              block mask (which keeps FlashAttention 4 out where it is installed)
- eager:      transformers' gemma2 eager_attention_forward (what Gemma-2 runs today), with
              transformers' additive mask (bf16, tokens x tokens, made before timing)
- hf-flex:    transformers' flex_attention_forward (attn_implementation="flex_attention") with the
              same block mask: whether transformers' own flex path would do
- sdpa-nocap: transformers' sdpa_attention_forward without the cap (wrong for Gemma-2): the speed of
              the attention every other family gets; causal via is_causal, the window as a
              boolean mask (as transformers passes it)
- fa4:        softcap_attention's FlashAttention 4 path (`attend_flash4`: its CuTe DSL kernels with
              their own soft cap, causal mask and window; `pip install 'ftune[fa4]'`, Hopper and
              Blackwell), `--impls fa4`, not run by default
- flex:NAME:  ftune's FlexAttention call with the kernel options KERNEL_OPTIONS[NAME] (tile sizes,
              warps, pipeline stages of its forward and backward kernels), `--kernel-options`
- autotune:   FlexAttention compiled with mode="max-autotune-no-cudagraphs" (`--autotune`): Inductor
              times its candidate tilings and prints the winners
- ftune/fwd, sdpa-nocap/fwd: the forward alone, what a recomputed layer pays again in backward

    python benchmarks/kernels/bench_softcap_attention.py --out results/softcap_attention.json
    python benchmarks/kernels/bench_softcap_attention.py --out results/softcap_attention.json --tokens 8192
    python benchmarks/kernels/bench_softcap_attention.py --out tilings.json --tokens 8192 --impls ftune \
        --kernel-options f+b64x64w8s1 f+b32x128w8s2

Peak memory is `working MiB` above the inputs (q, k, v, the output gradient, the masks).
"""

import functools
import types

import torch
from harness import DTYPES, measure, parse_args, report  # first: puts the repository on sys.path
from torch.nn.attention.flex_attention import flex_attention
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from ftune.kernels.softcap_attention import (FLEX_VARIANTS, HOPPER_HEAD_DIM_256, attend_flash4, causal_block_mask,
                                             flash4_takes, softcap_attention, softcap_score_mod)
from ftune.kernels.utils import compiled_with_variants
from ftune.presets import PRESETS

SOFTCAP_PRESETS = [name for name, config in PRESETS.items() if config.get("attn_logit_softcapping")]
HOPPER_FORWARD = {name: value for name, value in HOPPER_HEAD_DIM_256.items() if name.startswith("fwd_")}
BASE_IMPLS = ["ftune", "eager", "hf-flex", "sdpa-nocap"]
OPTIONAL_IMPLS = ["fa4"]
# Tilings of FlexAttention's forward (fwd_) and backward (bwd_) kernels to try at head_dim 256,
# within an H100/H200 SM's 227 KiB of shared memory. Inductor's default there: forward 64 x 32
# tiles, 4 warps, 3 stages; backward 64 x 64, 4 warps, 2 stages.
KERNEL_OPTIONS = {
    "inductor": {},  # Inductor's default tiling (the `ftune` row has ftune's on Hopper)
    "f128x64w8s2": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=8, fwd_num_stages=2),
    "f128x32w8s3": dict(fwd_BLOCK_M=128, fwd_BLOCK_N=32, fwd_num_warps=8, fwd_num_stages=3),
    "f64x64w4s2": dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=2),
    "b64x64w8s2": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64, bwd_num_warps=8,
                       bwd_num_stages=2),
    "b32x64w4s2": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32, bwd_num_warps=4,
                       bwd_num_stages=2),
    "b64x128w8s1": dict(bwd_BLOCK_M1=64, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64, bwd_num_warps=8,
                        bwd_num_stages=1),
    "tma": dict(USE_TMA=True),
    # backward tilings beside ftune's forward tiles, so that their rows differ in the backward alone
    **{f"f+b{m1}x{n1}w{warps}s{stages}": dict(HOPPER_FORWARD, bwd_BLOCK_M1=m1, bwd_BLOCK_N1=n1, bwd_BLOCK_M2=n1,
                                               bwd_BLOCK_N2=m1, bwd_num_warps=warps, bwd_num_stages=stages)
       for m1, n1, warps, stages in [(32, 128, 8, 2), (64, 64, 8, 1), (64, 64, 8, 3), (64, 128, 8, 2),
                                     (64, 64, 16, 2), (32, 64, 4, 3)]},
}


@functools.cache
def compiled_flex_attention(**compile_options):
    # Every tiling is one more compiled variant of flex_attention; past dynamo's recompile limit (8)
    # a call would run FlexAttention's dense reference instead of a kernel, and its row would time that
    return compiled_with_variants(flex_attention, FLEX_VARIANTS, **compile_options)


def flash4_call(inputs, scaling: float, softcap: float, window: int | None):
    output = attend_flash4(*inputs, scaling, softcap, window)
    if output is None:  # refused: the warning says why, the row records it
        raise RuntimeError("FlashAttention 4 refused the call")
    return output, None


def extra_arguments(parser) -> None:
    parser.add_argument("--kernel-options", nargs="*", choices=list(KERNEL_OPTIONS), default=[],
                        help="FlexAttention tilings to time beside the default one")
    parser.add_argument("--autotune", action="store_true", help="also time FlexAttention autotuned by Inductor")
    parser.add_argument("--impls", nargs="*", choices=BASE_IMPLS + OPTIONAL_IMPLS, default=BASE_IMPLS,
                        help="which of the implementations above to time (all by default)")


def main() -> None:
    args = parse_args(__doc__, [8192, 16384], SOFTCAP_PRESETS, ["gemma-2-9b"], extra_arguments)
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
                    "ftune": lambda: softcap_attention(module, *inputs, block_mask, scaling=scaling,
                                                       softcap=softcap, sliding_window=layer_window),
                    "eager": lambda: eager_attention_forward(module, *inputs, additive, scaling=scaling,
                                                             softcap=softcap),
                    "hf-flex": lambda: flex_attention_forward(module, *inputs, block_mask, scaling=scaling,
                                                              softcap=softcap),
                    "sdpa-nocap": lambda: sdpa_attention_forward(module, *inputs, boolean, scaling=scaling),
                }

                def flex_call(options=None, compiled=None):
                    attention = compiled or compiled_flex_attention()
                    # [batch, heads, tokens, head_dim] -> [batch, tokens, heads, head_dim], as the others
                    return lambda: (attention(*inputs, score_mod=softcap_score_mod(softcap), block_mask=block_mask,
                                              scale=scaling, enable_gqa=True,
                                              kernel_options=options).transpose(1, 2), None)

                if "fa4" in args.impls:
                    if not flash4_takes(*inputs):
                        raise SystemExit("--impls fa4: FlashAttention 4 is not installed, or does not run on this "
                                         "GPU (pip install 'ftune[fa4]'; Hopper or Blackwell)")
                    impls["fa4"] = functools.partial(flash4_call, inputs, scaling, softcap, layer_window)
                impls = {name: impls[name] for name in args.impls}
                for name in args.kernel_options:
                    impls[f"flex:{name}"] = flex_call(KERNEL_OPTIONS[name])
                if args.autotune:
                    impls["autotune"] = flex_call(compiled=compiled_flex_attention(mode="max-autotune-no-cudagraphs"))
                forward_only = {f"{impl}/fwd": impls[impl] for impl in ("ftune", "sdpa-nocap", "fa4") if impl in impls}
                for impl, attend in {**impls, **forward_only}.items():

                    def step(attend=attend, backward=not impl.endswith("/fwd")):
                        if backward:
                            output, _ = attend()
                            output.backward(grad)
                        else:
                            with torch.no_grad():
                                attend()

                    try:
                        measured = measure(step, inputs, graph=False)
                    except torch.OutOfMemoryError:
                        print(f"{preset} {case} {tokens} tokens: {impl} ran out of memory")
                        rows.append({"model": preset, "case": case, "tokens": tokens, "impl": impl,
                                     "error": "out of memory"})
                        continue
                    except Exception as error:  # a tiling that does not compile (shared memory) is a result too
                        print(f"{preset} {case} {tokens} tokens: {impl} failed: {str(error)[:200]}")
                        rows.append({"model": preset, "case": case, "tokens": tokens, "impl": impl,
                                     "error": str(error)[:300]})
                        continue
                    finally:
                        for tensor in inputs:
                            tensor.grad = None
                        torch.cuda.empty_cache()
                    rows.append({"model": preset, "case": case, "tokens": tokens, "impl": impl, **measured})
                    print(f"{preset} {case} {tokens} tokens: {impl} {measured['ms']:.3f} ms, "
                          f"{measured['working_mib']:.0f} MiB", flush=True)
                del additive, boolean
            del query, key, value, inputs, grad
    report("softcap_attention", args, rows)


if __name__ == "__main__":
    main()
