"""RMSNorm forward + backward, ftune vs eager (LlamaRMSNorm's code), frozen and trainable weight.

    python benchmarks/kernels/bench_rms_norm.py --out results/rms_norm.json
"""

import torch
from harness import DTYPES, MODELS, measure, parse_args, report  # first: puts the repository on sys.path

from ftune.kernels.rms_norm import rms_norm
from tests.kernels.test_rms_norm import reference_rms_norm


def main() -> None:
    args = parse_args(__doc__, [2048, 4096, 8192, 16384])
    dtype = DTYPES[args.dtype]
    rows = []
    for model in args.models:
        shape = MODELS[model]
        for tokens in args.tokens:
            for case in ("frozen", "trainable"):
                x = torch.randn(1, tokens, shape["hidden"], dtype=dtype, device="cuda", requires_grad=True)
                weight = torch.randn(shape["hidden"], dtype=dtype, device="cuda", requires_grad=case == "trainable")
                grad = torch.randn_like(x)
                leaves = [x, weight] if weight.requires_grad else [x]
                for impl, fn in (("ftune", rms_norm), ("eager", reference_rms_norm)):

                    def step(fn=fn):
                        fn(x, weight, shape["eps"]).backward(grad)

                    rows.append({"model": model, "case": case, "tokens": tokens, "impl": impl, **measure(step, leaves)})
    report("rms_norm", args, rows)


if __name__ == "__main__":
    main()
