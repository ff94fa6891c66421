"""A choice of ftune's DPO step, on at odd steps and off at even ones, in one run: paired step times.

On a host whose speed drifts within a run and from one run to the next (the H200 machines' step
times moved by 25-40% between calls, docs/benchmarks.md), two runs compared by their medians can
order two settings either way. Alternating the setting step by step within one run, and comparing
each step with the next, puts both under the same drift. The run is bench_workflows.py's ftune DPO
run (the shipped 8B recipe on a preset with random weights and the quickstart data); each
`training_step` (forward and backward, not the optimizer's step) is timed between CUDA
synchronizations from step 3 on, with each arm's peak memory over its training steps. Choices:

  ride  the reference's rows in the training forward (ftune.integrations.trl.ReferenceRidesTraining)
  park  offloaded layers parking their attention's output (ftune.engine.attention), for steps of
        any length (PARKING_MIN_TOKENS does not apply), against no parking
  fuse  ftune's fused LoRA paths (adapters inside the base GEMMs, ftune/kernels/lora.py) at any row
        count, against bitsandbytes' own 4-bit GEMM below FUSED_4BIT_MAX_TOKENS rows; the reference
        rides in neither (its row gate keeps the fused paths out), so both run TRL's reference pass
  bnb-gemm  bitsandbytes' fused 4-bit GEMM (one kernel, the nested scales read inside it) for
        every 4-bit forward below its 1536 rows, against its own choice, which on an H200 took
        dequantization and cuBLAS for every weight of the 8B shape at DPO's short rows: three to
        four launches, in a step the host bounds (CUDA only)
  keep  the plan's short steps keeping every layer's activations with the LM head streamed
        (CheckpointingEngine.keep_up_to, HostLMHead.stream_up_to), against every step in the
        recipe's mode with the head fetched whole; on a CPU, where the plan keeps nothing, every
        step keeps (the arms' peaks are a GPU's only)

  python benchmarks/bench_dpo_alternating.py --choice ride --steps 34
  python benchmarks/bench_dpo_alternating.py --choice keep --preset tiny-llama --layers 32 --steps 14   # CPU proxy
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_workflows  # noqa: E402  (puts the repository on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--choice", choices=("ride", "park", "fuse", "bnb-gemm", "keep"), required=True)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--steps", type=int, default=34)
    parser.add_argument("--dpo-repeat", type=int, default=1, help="repeat each DPO answer this many times (longer rows)")
    parser.add_argument("--layers", type=int, default=None,
                        help="the preset with this many decoder layers (on a CPU: tiny-llama with 32, the 8B shape's "
                             "module count, as a proxy of a step the host bounds)")
    args = parser.parse_args()
    if args.steps < 6:
        parser.error("--steps: at least 6 (two warm-up steps, then pairs)")
    cuda = torch.cuda.is_available()
    if args.choice == "bnb-gemm" and not cuda:
        parser.error("--choice bnb-gemm: bitsandbytes' CUDA kernels need a GPU")
    if args.layers is not None:
        from ftune.presets import PRESETS

        if args.preset not in PRESETS or args.layers < 1:
            parser.error(f"--layers: a known --preset and at least one layer, not {args.preset!r} with {args.layers}")
        variant = f"{args.preset}-{args.layers}-layers"  # this process's only: ftune trains in it
        PRESETS[variant] = {**PRESETS[args.preset], "num_hidden_layers": args.layers}
        args.preset = variant

    import ftune.engine.recompute as recompute
    import ftune.integrations.peft as lora_patches
    import ftune.integrations.trl as trl_patches
    import ftune.memory.estimate as estimate

    parks, ride_limit = recompute.parks, estimate.REFERENCE_RIDES_MAX_TOKENS
    fused_min = lora_patches.FUSED_4BIT_MAX_TOKENS
    keeping: dict[str, int] = {}  # the plan's keep_up_to, read at the first step
    if args.choice == "park":  # parking at every length, against none; the other choices run the shipped floor
        estimate.PARKING_MIN_TOKENS = 0
    if args.choice == "fuse":
        estimate.REFERENCE_RIDES_MAX_TOKENS = 0
    if args.choice == "bnb-gemm":
        import bitsandbytes.backends.cuda.ops as bnb_cuda  # read at each call of its gemm_4bit kernel

        bnb_choice = bnb_cuda._gemm_4bit_use_custom_fn
    times: dict[bool, list[float]] = {True: [], False: []}
    peaks: dict[bool, list[float]] = {True: [], False: []}
    step = {"n": 0}
    training_step = trl_patches.ReferenceRidesTraining.training_step

    def timed(self, model, inputs, num_items_in_batch=None):
        step["n"] += 1
        on = step["n"] % 2 == 1
        if args.choice == "ride":
            estimate.REFERENCE_RIDES_MAX_TOKENS = ride_limit if on else 0
        elif args.choice == "park":
            recompute.parks = parks if on else (lambda *a, **k: False)
        elif args.choice == "fuse":
            lora_patches.FUSED_4BIT_MAX_TOKENS = 0 if on else fused_min
        elif args.choice == "keep":
            engine = model._ftune_engine
            head = model.get_base_model().get_output_embeddings()
            tokens = keeping.setdefault("tokens", engine.keep_up_to or (0 if cuda else 1 << 30))
            engine.keep_up_to = tokens if on else 0
            if hasattr(head, "stream_up_to"):
                head.stream_up_to = tokens if on else 0
        else:
            bnb_cuda._gemm_4bit_use_custom_fn = (lambda *a: True) if on else bnb_choice
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = training_step(self, model, inputs, num_items_in_batch)
        if cuda:
            torch.cuda.synchronize()
        if step["n"] > 2:
            times[on].append(time.perf_counter() - start)
            if cuda:
                peaks[on].append(torch.cuda.max_memory_allocated() / 1024**3)
        return result

    trl_patches.ReferenceRidesTraining.training_step = timed
    workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_alternating-"))
    options = types.SimpleNamespace(preset=args.preset, steps=args.steps, dpo_repeat=args.dpo_repeat, set=[])
    overrides = bench_workflows.recipe_overrides("dpo", options, workdir, cuda, workdir / "ftune")
    bench_workflows.worker_materialize("dpo", overrides)
    bench_workflows.train_ftune_here("dpo", overrides)
    for on in (True, False):
        label = f"{args.choice} {'on' if on else 'off'}"
        peak = f", peak {max(peaks[on]):.2f} GiB" if peaks[on] else ""
        print(f"{label}: median {statistics.median(times[on]):.3f} s, mean {statistics.mean(times[on]):.3f} s{peak}, "
              f"{len(times[on])} steps: {[round(t, 3) for t in times[on]]}")
    pairs = [off / on for on, off in zip(times[True], times[False])]
    print(f"off / on, median of {len(pairs)} consecutive pairs: {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
