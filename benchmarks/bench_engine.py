"""Memory and speed of one QLoRA training step, per stack, checkpointing mode and sequence length.

Stacks (each in its own process, so memory numbers are clean and an OOM ends only that row):
  hf        transformers + peft as usually set up: prepare_model_for_kbit_training (norms,
            embeddings and LM head upcast to fp32), LoRA, transformers' own non-reentrant
            checkpointing for mode `true`; the baseline of ../shared/GPU.md
  ftune     ftune's model building and engine, kernels off
  ftune+k   ftune with its Triton kernels on
  ftune+k+fold  and the LoRA backward that folds the adapter's input gradient into the 4-bit
            base's (ftune/kernels/lora.py, FOLD_ADAPTER_INPUT_GRADIENT)
  ftune+k+gpuhead  with the LM head kept on the GPU where the mode moves the embedding tables
            to host memory (as before ftune/engine/embedding.py's HostLMHead)
  ftune+k+wholemlp  with the recomputed MLP's down projection run forward too (as before
            ftune/kernels/lora.py's output_unread)
  ftune+k+perchunk  with the recomputed MLP's 4-bit weights dequantized for every chunk (as
            before ftune/kernels/lora.py's dequantized_once)
  ftune+k+attnrecompute  with offloaded layers recomputing attention's forward rather than
            parking its output (as before ftune/engine/attention.py)

Setup as GPU.md: a preset shape with random weights, NF4 double-quant 4-bit, bf16 compute, LoRA
r=16 alpha=16 on the seven projections, batch 1, AdamW, labels = inputs, random token ids, bf16
autocast; peak = torch.cuda.max_memory_allocated over the timed steps (reset after the warm-up);
the median of the timed steps. "held" is what the forward leaves allocated for the backward
(checkpoints and saved activations), measured right after the forward.

  python benchmarks/bench_engine.py --preset llama-3.1-8b --seqs 2048,8192,16384 \
      --runs hf:none,hf:true,ftune:none,ftune:true,ftune:unsloth --out results.json

A run is stack:mode, or ftune[+k]:smart@GIB for the smart mode planning to a budget of GIB GiB.
--batches 1,4 measures each sequence at each batch size (the memory-model grid of issue 5); a
cell that runs out of memory skips the longer sequences of its batch size.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1024**3
# the recipes' default seed: every benchmark (and `ftune train` on a preset) then shares one cached preset
PRESET_SEED = 42
HOST_EMBEDDINGS = {"auto": "auto", "on": True, "off": False}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ftune_recipe(preset: str, mode: str, kernels: bool, budget_gib: float | None = None, host_embeddings="auto"):
    from ftune.kernels import KERNELS
    from ftune.recipe import validate_recipe

    checkpointing = {"mode": mode, "host_embeddings": host_embeddings}
    if budget_gib is not None:
        checkpointing["budget"] = f"{budget_gib}GiB"
    raw = {
        "model": {"preset": preset, "tokenizer": "(none: random token ids)", "dtype": "bfloat16"},
        "quantization": {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": PROJECTIONS},
        "checkpointing": checkpointing,
        "kernels": dict.fromkeys(KERNELS, kernels),
        "data": {"source": "(none: random token ids)"},
        "training": {"seed": PRESET_SEED},
    }
    return validate_recipe(raw, base_dir=REPO, check_paths=False)


class HFStack:
    """transformers + peft, set up as their docs and GPU.md describe."""

    def __init__(self, preset: str):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from ftune.model import materialize_preset

        path = materialize_preset(preset, seed=PRESET_SEED, dtype=torch.bfloat16, device=torch.device("cuda"))
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0}, attn_implementation="sdpa")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.config.use_cache = False
        self.model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
        self.host_bytes = lambda: 0

    def set_mode(self, mode: str) -> None:
        if mode == "none":
            self.model.gradient_checkpointing_disable()
        elif mode == "true":
            self.model.enable_input_require_grads()
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise SystemExit(f"the hf stack has modes none and true, not {mode}")


class FtuneStack:
    """ftune's own model building (model.py) for one mode, as `ftune train` builds it."""

    def __init__(self, preset: str, kernels: bool, mode: str, budget_gib: float | None, seq: int, batch: int,
                 host_embeddings="auto"):
        from ftune.model import build_model

        recipe = ftune_recipe(preset, mode, kernels, budget_gib, host_embeddings)
        # smart plans for the recipe's sequence and batch, as `ftune train` does for its data
        recipe.data.max_length, recipe.training.batch_size = seq, batch
        self.built = build_model(recipe, with_tokenizer=False)
        if self.built.plan is not None:
            print(self.built.plan.describe(), flush=True)
        self.model = self.built.model
        self.engine = self.built.engine
        self.host_bytes = lambda: self.engine.host_bytes()

    def set_mode(self, mode: str) -> None:
        assert mode == self.built.engine.mode


def train_step(model, optimizer, ids: torch.Tensor) -> torch.Tensor:
    """One step as every benchmark here runs it: bf16 autocast, labels = inputs; returns the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


class CollectorClock:
    """The time Python's garbage collector takes during the timed steps, per generation."""

    def __init__(self):
        self.seconds, self.passes, self._started = [0.0, 0.0, 0.0], [0, 0, 0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started
            self.passes[info["generation"]] += 1


def measure(stack, seq: int, batch: int, steps: int, vocab: int, hidden: int, layers: int) -> dict:
    model = stack.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), device=next(model.parameters()).device)
    gc.collect()
    torch.cuda.empty_cache()
    times, held, loss_value = [], 0, None
    torch.cuda.reset_peak_memory_stats()
    clock = CollectorClock()
    for step in range(1 + steps):
        if step == 1:
            torch.cuda.reset_peak_memory_stats()
            gc.callbacks.append(clock)
            mallocs = torch.cuda.memory_stats().get("segment.all.allocated", 0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        loss_value = loss.item()
        del loss
    if clock in gc.callbacks:
        gc.callbacks.remove(clock)
    timed = sorted(times[1:] or times)  # --longest runs one step: it only asks whether one fits
    median = timed[len(timed) // 2]
    return {
        "seq": seq,
        "batch": batch,
        "status": "ok",
        "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
        "reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3),
        "held_after_forward_gib": round(held / GiB, 3),
        "layer_inputs_gib": round(layers * batch * seq * hidden * 2 / GiB, 3),
        "host_pinned_gib": round(stack.host_bytes() / GiB, 3),
        "step_s": round(median, 4),
        "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": round(batch * seq / median, 1),
        "loss": round(loss_value, 4),
        # where step times spread: collector pauses and cudaMalloc calls over the timed steps
        "collector_s_per_generation": [round(s, 4) for s in clock.seconds],
        "collector_passes_per_generation": clock.passes,
        "cuda_mallocs": torch.cuda.memory_stats().get("segment.all.allocated", 0) - mallocs if steps else None,
    }


def worker(args) -> None:
    from ftune.presets import preset_config

    if args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GiB / total)
    config = preset_config(args.preset)
    name, _, mode = args.worker.partition(":")
    if name.endswith("+fold"):  # ftune's LoRA backward that folds the adapter's input gradient (kernels/lora.py)
        from ftune.kernels import lora

        lora.FOLD_ADAPTER_INPUT_GRADIENT = True
    if name.endswith("+wholemlp"):
        import contextlib

        from ftune.kernels import lora

        lora.output_unread = lambda layer: contextlib.nullcontext()
    if name.endswith("+perchunk"):
        import contextlib

        from ftune.kernels import lora

        lora.dequantized_once = contextlib.nullcontext
    if name.endswith("+attnrecompute"):
        from ftune.engine import checkpoint

        checkpoint._LayerUnit.park = lambda unit, residual, attended: False
    if name.endswith("+gpuhead"):
        import ftune.model

        ftune.model.move_lm_head_to_host = lambda model, device: 0
    mode, _, budget = mode.partition("@")
    budget_gib = float(budget) if budget else None
    seqs = [int(s) for s in args.seqs.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.longest:
        seqs = _growing(seqs[0], args.longest_limit)
    if name == "hf":
        stack = HFStack(args.preset)
    else:
        stack = FtuneStack(args.preset, kernels=name.startswith("ftune+k"), mode=mode, budget_gib=budget_gib,
                           seq=seqs[0], batch=batches[0], host_embeddings=HOST_EMBEDDINGS[args.host_embeddings])
    stack.set_mode(mode)
    label = f"{mode}@{budget}" if budget else mode
    for batch in batches:
        last_ok = None
        for seq in seqs:
            try:
                steps = 0 if args.longest else _timed_steps(args.steps, batch * seq)
                row = measure(stack, seq, batch, steps, config.vocab_size, config.hidden_size, config.num_hidden_layers)
                last_ok = seq
            except torch.OutOfMemoryError:
                row = {"seq": seq, "batch": batch, "status": "oom"}
            row.update(stack=name, mode=label, preset=args.preset, cap_gib=args.cap_gib, budget_gib=budget_gib,
                       host_embeddings=args.host_embeddings)
            if budget_gib is not None and row["status"] == "ok":
                row["plan"] = stack.built.plan.counts()
                row["plan_peak_gib"] = round(stack.built.plan.peak / GiB, 3)
            print("RESULT " + json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            if row["status"] == "oom":
                if args.longest and last_ok is not None:
                    print("RESULT " + json.dumps({"stack": name, "mode": label, "preset": args.preset,
                                                  "cap_gib": args.cap_gib, "longest_ok": last_ok,
                                                  "first_oom": seq, "status": "longest"}), flush=True)
                break  # the longer sequences of this batch size would not fit either


def _timed_steps(asked: int, tokens: int) -> int:
    """At least --steps; more for short steps, whose times spread by 30% from step to step (an H100
    at 2048 tokens: 0.28-0.40 s), so that the median of about 20k tokens settles."""
    return max(asked, -(-20480 // tokens)) if asked else 0


def _growing(start: int, limit: int) -> list[int]:
    """Sequence lengths from start, growing by a quarter, rounded to 1024, up to limit."""
    seqs, seq = [], start
    while seq <= limit:
        seqs.append(seq)
        seq = int(seq * 1.25) // 1024 * 1024
    return seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--seqs", default="2048,8192,16384")
    parser.add_argument("--runs", default="hf:none,hf:true,ftune:none,ftune:true,ftune:unsloth",
                        help="stack:mode pairs; stacks hf, ftune, ftune+k (kernels), ftune+k+fold (and the folded "
                             "LoRA backward)")
    parser.add_argument("--batches", default="1", help="batch sizes, each measured at every sequence length")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--longest", action="store_true", help="grow the sequence from --seqs' first until OOM")
    parser.add_argument("--longest-limit", type=int, default=262144)
    parser.add_argument("--cap-gib", type=float, default=None, help="cap this process's GPU memory (a smaller card)")
    parser.add_argument("--out", type=Path, default=None, help="append JSON results here")
    parser.add_argument("--host-embeddings", choices=sorted(HOST_EMBEDDINGS), default="auto",
                        help="ftune stacks: the input embedding table in host RAM (auto: as the mode decides)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench_engine.py measures GPU memory and speed: run it on a CUDA machine")

    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "preset": args.preset,
            "date": time.strftime("%Y-%m-%d")}
    for run in args.runs.split(","):
        command = [sys.executable, __file__, "--worker", run, "--preset", args.preset, "--seqs", args.seqs,
                   "--batches", args.batches, "--steps", str(args.steps), "--longest-limit", str(args.longest_limit),
                   "--host-embeddings", args.host_embeddings]
        if args.longest:
            command.append("--longest")
        if args.cap_gib:
            command += ["--cap-gib", str(args.cap_gib)]
        started = time.perf_counter()
        process = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        rows = [json.loads(line[7:]) for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode != 0:
            rows.append({"stack": run.split(":")[0], "mode": run.split(":")[1], "status": "error",
                         "error": process.stderr.strip().splitlines()[-1:] })
            print(process.stderr[-3000:], file=sys.stderr)
        for line in process.stdout.splitlines():
            if line.startswith("smart plan"):
                print(line, flush=True)
        for row in rows:
            row.update(meta)
            print(_line(row), flush=True)
        print(f"  ({run}: {time.perf_counter() - started:.0f} s)", flush=True)
        if args.out:  # after every run, so that a call cut short keeps what it measured
            existing = json.loads(args.out.read_text()) if args.out.exists() else []
            args.out.write_text(json.dumps(existing + rows, indent=1))


def _line(row: dict) -> str:
    if row["status"] == "ok":
        return (f"{row['stack']:8s} {row['mode']:10s} b{row['batch']} seq {row['seq']:6d}: peak {row['peak_gib']:6.2f} GiB "
                f"(reserved {row['reserved_gib']:6.2f}, held {row['held_after_forward_gib']:6.2f}, "
                f"host {row['host_pinned_gib']:5.2f})  {row['tokens_per_s']:8.0f} tok/s  loss {row['loss']}")
    if row["status"] == "longest":
        return f"{row['stack']:8s} {row['mode']:8s} longest that trains: {row['longest_ok']} (OOM at {row['first_oom']})"
    return f"{row.get('stack')} {row.get('mode')} b{row.get('batch')} seq {row.get('seq')}: {row['status']} {row.get('error', '')}"


if __name__ == "__main__":
    main()
