"""What the kernel benchmarks share: arguments, timing, peak memory, the JSON they write.

Each benchmark times forward + backward of ftune's kernel against the eager PyTorch reference
imported from the kernel's test file (never a copy), at the shapes of Llama-3.1-8B and of a second
family (Qwen2.5-7B), in bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# The references live in tests/kernels/: make the repository importable when run as a script
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Shapes of the two reference models (DESIGN.md, GPU.md)
MODELS = {
    "llama-3.1-8b": dict(
        hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, eps=1e-5
    ),
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064, eps=1e-6),
}


def parse_args(description: str, default_tokens: list[int], models: list[str] | None = None,
               default_models: list[str] | None = None,
               extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The benchmarks' arguments; `models`: the shapes a benchmark offers (harness's MODELS, or the
    names of ftune's presets for a family those two do not cover); `extra_arguments` adds a
    benchmark's own."""
    models = models if models is not None else list(MODELS)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write the results to")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=default_tokens, help="tokens per batch (batch 1 x sequence)"
    )
    parser.add_argument("--models", nargs="+", choices=models, default=default_models or models, help="shapes to run")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the benchmarks time compiled kernels on a CUDA GPU; none is available here")
    return args


def measure(fn: Callable[[], None], grad_to_none: list[torch.Tensor], graph: bool = True) -> dict[str, float]:
    """Median time of fn (forward + backward) and its peak memory above what existed before it.

    `ms` is what a training step sees when the GPU waits on Python (launch overhead included: it
    dominates the small shapes); `graph_ms`, replayed from a CUDA graph, is the GPU's own time.
    A function that syncs with the host (the fused loss counts its labels) can't be captured.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # compile and warm the allocator outside the memory measurement
    for tensor in grad_to_none:
        tensor.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for tensor in grad_to_none:
        tensor.grad = None
    median, p20, p80 = do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    result = {
        "ms": median,
        "ms_p20": p20,
        "ms_p80": p80,
        "peak_mib": peak / 2**20,
        "working_mib": (peak - before) / 2**20,
    }
    if graph:
        result["graph_ms"] = do_bench_cudagraph(fn, grad_to_none=grad_to_none, return_mode="median")
    return result


def environment() -> dict[str, str | None]:
    import transformers
    import triton

    from ftune.measure.results import installed_version

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "flash_attn_4": installed_version("flash-attn-4"),
    }


def report(kernel: str, args: argparse.Namespace, rows: list[dict]) -> None:
    """Write the JSON and print a table: one row per (model, tokens, implementation)."""
    # each row against ftune's row of its shape and pass: "x/fwd" (the forward alone) against "ftune/fwd"
    ours = {(r["model"], r["tokens"], r.get("case", ""), r["impl"].partition("/")[2]): r for r in rows
            if r["impl"].partition("/")[0] == "ftune" and "ms" in r}
    for row in rows:
        base = ours.get((row["model"], row["tokens"], row.get("case", ""), row["impl"].partition("/")[2]))
        # a row that failed, or whose ftune row did (out of memory), has no speed-up
        row["ftune_speedup"] = row["ms"] / base["ms"] if base and "ms" in row else None
        if base and "graph_ms" in row and "graph_ms" in base:
            row["ftune_graph_speedup"] = row["graph_ms"] / base["graph_ms"]
    payload = {"kernel": kernel, "dtype": args.dtype, **environment(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{kernel} on {payload['gpu']} ({args.dtype}); speedup = this row's time / ftune's")
    header = f"{'model':<14}{'case':<11}{'tokens':>7}  {'impl':<20}{'ms':>9}{'speedup':>9}"
    print(header + f"{'graph ms':>10}{'speedup':>9}{'working MiB':>13}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['model']:<14}{r.get('case', ''):<11}{r['tokens']:>7}  {r['impl']:<20}  {r.get('error', 'failed')}")
            continue
        speedup = f"{r['ftune_speedup']:>9.2f}" if r["ftune_speedup"] is not None else f"{'-':>9}"
        graph = f"{r['graph_ms']:>10.3f}{r['ftune_graph_speedup']:>9.2f}" if "ftune_graph_speedup" in r else " " * 19
        print(
            f"{r['model']:<14}{r.get('case', ''):<11}{r['tokens']:>7}  {r['impl']:<20}{r['ms']:>9.3f}"
            f"{speedup}{graph}{r['working_mib']:>13.1f}"
        )
