"""SwiGLU, silu(gate) * up, forward + backward, ftune vs eager (LlamaMLP's act_fn(gate) * up).

    python benchmarks/kernels/bench_swiglu.py --out results/swiglu.json
"""

import torch
from harness import DTYPES, MODELS, measure, parse_args, report  # first: puts the repository on sys.path

from ftune.kernels.swiglu import swiglu
from tests.kernels.test_swiglu import reference_swiglu


def main() -> None:
    args = parse_args(__doc__, [2048, 4096, 8192, 16384])
    dtype = DTYPES[args.dtype]
    rows = []
    for model in args.models:
        width = MODELS[model]["intermediate"]
        for tokens in args.tokens:
            gate = torch.randn(1, tokens, width, dtype=dtype, device="cuda", requires_grad=True)
            up = torch.randn(1, tokens, width, dtype=dtype, device="cuda", requires_grad=True)
            grad = torch.randn_like(gate)
            for impl, fn in (("ftune", swiglu), ("eager", reference_swiglu)):

                def step(fn=fn):
                    fn(gate, up).backward(grad)

                rows.append({"model": model, "tokens": tokens, "impl": impl, **measure(step, [gate, up])})
    report("swiglu", args, rows)


if __name__ == "__main__":
    main()
