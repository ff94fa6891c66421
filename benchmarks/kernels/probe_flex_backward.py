"""Whether FlexAttention's backward can run on its own, from a saved output and log-sum-exp: what
parking Gemma-2's soft-capped attention needs (an offloaded layer's backward would then skip
attention's forward, as the sdpa and window layers do, ftune/engine/attention.py).

A compiled function calls the backward higher-order op (`flex_attention_backward`) with the
soft cap as a plain function, for dynamo to derive its joint graph, at Gemma-2-9B's heads (16
query heads, 8 key heads, 256 wide, cap 50), batch 1, a full layer and a sliding one (window 4096).
Where it compiles, it prints each gradient against autograd's through the compiled forward, and the
times of the recompute path (forward + backward) and of the backward alone.

    python benchmarks/kernels/probe_flex_backward.py --tokens 8192
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch._higher_order_ops.flex_attention import flex_attention_backward
from torch.nn.attention.flex_attention import AuxRequest, _apply_kernel_options

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ftune.kernels.softcap_attention import (  # noqa: E402
    HOPPER_HEAD_DIM_256, _compiled_flex_attention, causal_block_mask, softcap_score_mod)

HEADS, KV_HEADS, HEAD_DIM, CAP, WINDOW = 16, 8, 256, 50.0, 4096
SCALE = HEAD_DIM ** -0.5


def backward(query, key, value, output, logsumexp, grad, block_mask, options):
    """Gradients of q, k and v from the forward's output and its log-sum-exp (base 2, as the
    Triton kernels keep it), without running the forward."""
    options = _apply_kernel_options(query, key, value, True, options)
    grad_query, grad_key, grad_value, _ = flex_attention_backward(
        query, key, value, output, logsumexp, grad, None, softcap_score_mod(CAP), None, block_mask, SCALE,
        options, (), ())
    return grad_query, grad_key, grad_value


def milliseconds(function, repeats: int = 5) -> float:
    function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("FlexAttention's backward compiles for CUDA only")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    flex = _compiled_flex_attention()
    compiled_backward = torch.compile(backward, fullgraph=True, dynamic=False)
    tokens, score_mod = args.tokens, softcap_score_mod(CAP)
    for window in (None, WINDOW):
        generator = torch.Generator("cuda").manual_seed(0)

        def make(heads):  # [1, heads, tokens, 256] views of [1, tokens, heads, 256], as the projections give them
            return torch.randn(1, tokens, heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda",
                               generator=generator).transpose(1, 2).requires_grad_()

        query, key, value = make(HEADS), make(KV_HEADS), make(KV_HEADS)
        grad = torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda", generator=generator)
        block_mask = causal_block_mask(tokens, tokens, window, torch.device("cuda"))

        def attend(**extra):
            return flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=SCALE, enable_gqa=True,
                        kernel_options=HOPPER_HEAD_DIM_256, **extra)

        expected = torch.autograd.grad(attend(), (query, key, value), grad)
        with torch.no_grad():
            output, aux = attend(return_aux=AuxRequest(lse=True))
        logsumexp = aux.lse / math.log(2.0)  # the API's natural log back to the kernels' base 2
        layer = "full" if window is None else f"sliding {window}"
        inputs = (query.detach(), key.detach(), value.detach(), output, logsumexp, grad, block_mask.as_tuple(),
                  HOPPER_HEAD_DIM_256)
        try:
            got = compiled_backward(*inputs)
        except Exception as error:  # the finding: this torch cannot compile it
            print(f"{layer}: the backward alone does not compile: {type(error).__name__}: "
                  f"{str(error).splitlines()[0]}", flush=True)
            continue
        for name, mine, theirs in zip("qkv", got, expected):
            print(f"{layer}: d{name} max abs difference {(mine.float() - theirs.float()).abs().max().item():.3e} "
                  f"(largest {theirs.abs().max().item():.3e})", flush=True)
        recompute = milliseconds(lambda: torch.autograd.grad(attend(), (query, key, value), grad))
        alone = milliseconds(lambda: compiled_backward(*inputs))
        print(f"{layer}: forward + backward {recompute:.2f} ms, backward alone {alone:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
