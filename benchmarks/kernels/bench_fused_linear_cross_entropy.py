"""LM head + causal-LM loss, forward + backward, ftune's fused kernel vs eager (F.linear and
transformers' ForCausalLMLoss on full logits) and, when TRL is installed, TRL's chunked
log-probabilities (the head SFTTrainer uses). The head is frozen, as under QLoRA; 10% of the
labels are ignored (a prompt).

`working_mib` is the peak memory above the inputs (hidden states, head, labels), the hidden
states' gradient included: that gradient (tokens x hidden x 2 bytes, 128 MiB at 16k tokens of
Llama-3.1-8B) is the loss's output, which every implementation must produce.

    python benchmarks/kernels/bench_fused_linear_cross_entropy.py --out results/flce.json
"""

import torch
from harness import DTYPES, MODELS, measure, parse_args, report  # first: puts the repository on sys.path

from ftune.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from tests.kernels.test_fused_linear_cross_entropy import reference_loss


def trl_loss(hidden, weight, labels):
    """TRL 1.16's SFT loss path: chunked log-probs of the labelled positions, mean of -log p."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != -100
    log_probs = ChunkedLogProbFunction.apply(
        hidden[mask], weight, None, labels[mask], 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",)
    )[0]
    return -log_probs.sum() / mask.sum()


def main() -> None:
    args = parse_args(__doc__, [2048, 4096, 8192, 16384])
    dtype = DTYPES[args.dtype]
    implementations = [("ftune", fused_linear_cross_entropy), ("eager", reference_loss)]
    try:
        import trl.kernels.chunked_logprob  # noqa: F401

        implementations.append(("trl", trl_loss))
    except ImportError:
        print("trl is not installed: its chunked head is left out")
    rows = []
    for model in args.models:
        shape = MODELS[model]
        weight = torch.randn(shape["vocab"], shape["hidden"], dtype=dtype, device="cuda") / shape["hidden"] ** 0.5
        for tokens in args.tokens:
            hidden = torch.randn(1, tokens, shape["hidden"], dtype=dtype, device="cuda", requires_grad=True)
            labels = torch.randint(0, shape["vocab"], (1, tokens), device="cuda")
            labels[:, : tokens // 10] = -100
            for impl, fn in implementations:

                def step(fn=fn):
                    fn(hidden, weight, labels).backward()

                timing = measure(step, [hidden], graph=False)
                rows.append({"model": model, "tokens": tokens, "impl": impl, **timing})
    report("fused_linear_cross_entropy", args, rows)


if __name__ == "__main__":
    main()
