"""A 4-bit weight dequantized a block of 32 MiB at a time, as the folded LoRA backward reads it:
ftune's one-launch NF4 kernel vs bitsandbytes (block copied out contiguous, scales expanded, then
dequantized: four launches). The 8B shape's projections, double-quantized NF4, bf16 out.

    python benchmarks/kernels/bench_nf4.py --out results/nf4.json
"""

import bitsandbytes.functional as bnb_functional
import torch
from harness import DTYPES, MODELS, measure, parse_args, report  # first: puts the repository on sys.path

from ftune.kernels.lora import DEQUANTIZED_BLOCK_BYTES, GEMM_TILE
from ftune.kernels.nf4 import dequantize_nf4
from tests.kernels.test_nf4 import bitsandbytes_columns


def main() -> None:
    args = parse_args(__doc__, [0])
    dtype = DTYPES[args.dtype]
    rows = []
    for model in args.models:
        shape = MODELS[model]
        for case, (out_features, in_features) in {
            "q_proj": (shape["hidden"], shape["hidden"]),
            "gate_proj": (shape["intermediate"], shape["hidden"]),
            "down_proj": (shape["hidden"], shape["intermediate"]),
        }.items():
            weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) * 0.02
            packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True,
                                                         quant_type="nf4")
            packed.quant_state = state
            del weight
            columns = DEQUANTIZED_BLOCK_BYTES // (out_features * 2) // GEMM_TILE * GEMM_TILE
            blocks = [(start, min(start + columns, in_features)) for start in range(0, in_features, columns)]

            def ftune(blocks=blocks, packed=packed):
                for start, stop in blocks:
                    dequantize_nf4(packed, dtype, columns=(start, stop))

            def bitsandbytes(blocks=blocks, packed=packed, state=state):
                for start, stop in blocks:
                    bitsandbytes_columns(packed, state, start, stop, dtype)

            for impl, fn in (("ftune", ftune), ("bnb", bitsandbytes)):
                rows.append({"model": model, "tokens": 0, "case": case, "impl": impl, "blocks": len(blocks),
                             **measure(fn, [])})
    report("nf4", args, rows)


if __name__ == "__main__":
    main()
