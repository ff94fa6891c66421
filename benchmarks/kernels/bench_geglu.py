"""GeGLU, gelu_tanh(gate) * up, forward + backward, ftune vs eager (Gemma's act_fn(gate) * up).

The gate and up widths are Gemma's intermediate sizes, read from ftune's presets (Gemma-2-9B:
14336, Gemma-3-12B: 15360), which harness.py's Llama and Qwen shapes do not cover.

    python benchmarks/kernels/bench_geglu.py --out results/geglu.json
    python benchmarks/kernels/bench_geglu.py --out results/geglu.json --models gemma-2-9b --tokens 8192 16384
"""

from functools import partial

import torch
from harness import DTYPES, measure, parse_args, report  # first: puts the repository on sys.path

from ftune.kernels.swiglu import swiglu
from ftune.presets import PRESETS
from tests.kernels.test_swiglu import reference_geglu

GEGLU_PRESETS = [name for name, config in PRESETS.items() if config.get("hidden_activation") == "gelu_pytorch_tanh"]


def main() -> None:
    args = parse_args(__doc__, [2048, 4096, 8192, 16384], GEGLU_PRESETS, ["gemma-2-9b", "gemma-3-12b"])
    dtype = DTYPES[args.dtype]
    rows = []
    for preset in args.models:
        width = PRESETS[preset]["intermediate_size"]
        for tokens in args.tokens:
            gate = torch.randn(1, tokens, width, dtype=dtype, device="cuda", requires_grad=True)
            up = torch.randn(1, tokens, width, dtype=dtype, device="cuda", requires_grad=True)
            grad = torch.randn_like(gate)
            for impl, fn in (("ftune", partial(swiglu, activation="gelu_tanh")), ("eager", reference_geglu)):

                def step(fn=fn):
                    fn(gate, up).backward(grad)

                rows.append({"model": preset, "tokens": tokens, "impl": impl, **measure(step, [gate, up])})
            del gate, up, grad
    report("geglu", args, rows)


if __name__ == "__main__":
    main()
