"""RoPE of query and key, forward + backward, ftune vs eager (transformers' apply_rotary_pos_emb).

q and k are what attention rotates: [1, heads, tokens, 128] views of the projections' output.

    python benchmarks/kernels/bench_rope.py --out results/rope.json
"""

import torch
from harness import DTYPES, MODELS, measure, parse_args, report  # first: puts the repository on sys.path

from ftune.kernels.rope import apply_rotary_pos_emb
from tests.kernels.test_rope import reference_rope


def main() -> None:
    args = parse_args(__doc__, [2048, 4096, 8192, 16384])
    dtype = DTYPES[args.dtype]
    rows = []
    for model in args.models:
        shape = MODELS[model]
        for tokens in args.tokens:
            head_dim = shape["head_dim"]
            q = torch.randn(1, tokens, shape["heads"], head_dim, dtype=dtype, device="cuda", requires_grad=True)
            k = torch.randn(1, tokens, shape["kv_heads"], head_dim, dtype=dtype, device="cuda", requires_grad=True)
            angles = torch.rand(1, tokens, head_dim // 2, device="cuda") * tokens
            emb = torch.cat((angles, angles), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            grad_q = torch.randn(1, shape["heads"], tokens, head_dim, dtype=dtype, device="cuda")
            grad_k = torch.randn(1, shape["kv_heads"], tokens, head_dim, dtype=dtype, device="cuda")
            for impl, fn in (("ftune", apply_rotary_pos_emb), ("eager", reference_rope)):

                def step(fn=fn):
                    q_embed, k_embed = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                    torch.autograd.backward((q_embed, k_embed), (grad_q, grad_k))

                rows.append({"model": model, "tokens": tokens, "impl": impl, **measure(step, [q, k])})
    report("rope", args, rows)


if __name__ == "__main__":
    main()
