"""Useful tokens/s on rows of mixed lengths (issue 26): padding-free batches against padded ones and
against transformers + peft + TRL at TRL's best setting.

The mix: 400 rows whose lengths are min(8192, max(16, int(exp(gauss(log(1024), 0.8))))) drawn with
random.Random(0), token ids random in [3, 128000) (below the vocabulary of a smaller preset), in
that order, batches of 8 consecutive rows. Every run trains through TRL's SFTTrainer on the same
batches (sequential sampling), one process per run:

  ftune-packed   ftune's SFT trainer (ftune.workflows.sft), mode unsloth, kernels on, padding-free
  ftune-padded   the same with sft.padding_free: false (each batch padded to its longest row)
  trl            transformers + peft (prepare_model_for_kbit_training) + TRL's SFTTrainer,
                 padding_free on, gradient checkpointing on (non-reentrant), SDPA

QLoRA as the other benchmarks (ftune/measure/stacks.py preset_recipe): NF4 double-quant, bf16,
LoRA r=16 alpha=16 on the seven projections, a preset's random weights. Useful tokens are the
rows' own tokens, padding excluded; tokens/s is their sum over the timed steps (after the warm-up)
divided by those steps' time, each step timed between synchronizes from its start to its end. The
peak is torch.cuda.max_memory_allocated over the timed steps.

On the GPU (about 5 minutes on an H200, the 8B preset built once into the cache first):

  python benchmarks/bench_packing.py --preset llama-3.1-8b --steps 10 --out results.json

On a CPU, a smoke test of every run (float32, no quantization, rows cut at 128 tokens; the peak is
the largest RSS):

  python benchmarks/bench_packing.py --preset tiny-llama --rows 32 --steps 2 --longest 128 --out /tmp/packing.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ftune.measure.results import result_path
from ftune.measure.stacks import PRESET_SEED, preset_recipe
from ftune.measure.step import GiB

RUNS = ("ftune-packed", "ftune-padded", "trl")
MAX_LENGTH = 8192
# A tokenizer for TRL's pad token only: the rows are token ids already
TOKENIZER = REPO / "data" / "quickstart" / "tokenizer"


def mix(rows: int, vocab: int, longest: int = MAX_LENGTH) -> list[list[int]]:
    """The issue's fixed mix of row lengths (rows cut at `longest`), with random token ids."""
    draw = random.Random(0)
    lengths = [min(longest, max(16, int(math.exp(draw.gauss(math.log(1024), 0.8))))) for _ in range(rows)]
    top = min(128000, vocab)
    return [[draw.randrange(3, top) for _ in range(n)] for n in lengths]


class StepClock:
    """A TrainerCallback: each step's time (between synchronizes) and, from the collator, each
    batch's useful tokens; the peak over the steps after `warmup`."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        self.warmup, self.times, self.tokens, self.started, self.rss = warmup, [], [], 0.0, 0
        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == clock.warmup and torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                clock._sync()
                clock.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock._sync()
                clock.times.append(time.perf_counter() - clock.started)
                clock.rss = max(clock.rss, psutil.Process().memory_info().rss)

        self.callback = Callback()

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def counting(self, collator):
        """The collator, counting each batch's rows' tokens as it makes the batch (in step order)."""
        def collate(examples):
            self.tokens.append(sum(len(example["input_ids"]) for example in examples))
            return collator(examples)
        return collate

    def result(self) -> dict:
        timed = slice(self.warmup, len(self.times))
        seconds, tokens = sum(self.times[timed]), sum(self.tokens[timed])
        cuda = torch.cuda.is_available()
        return {
            "useful_tokens_per_s": round(tokens / seconds, 1),
            "peak_gib": round((torch.cuda.max_memory_allocated() if cuda else self.rss) / GiB, 3),
            "memory": "peak allocated VRAM" if cuda else "peak RSS (CPU)",
            "timed_steps": len(self.times[timed]),
            "useful_tokens": tokens,
            "step_times_s": [round(t, 3) for t in self.times],
            "step_useful_tokens": self.tokens[:len(self.times)],
        }


def _recipe(preset: str, padding_free: bool, steps: int, batch: int, output_dir: str):
    cuda = torch.cuda.is_available()
    recipe = preset_recipe(preset, "unsloth", kernels=cuda, seq=MAX_LENGTH, batch=batch)
    recipe.model.tokenizer = str(TOKENIZER)
    if not cuda:  # the smoke test: float32, no 4-bit
        recipe.model.dtype, recipe.quantization.method = "float32", "none"
    recipe.sft.padding_free = padding_free
    recipe.training.max_steps, recipe.training.output_dir = steps, output_dir
    recipe.training.logging_steps = 10**6
    return recipe


def run_ftune(preset: str, padding_free: bool, rows, steps: int, warmup: int, batch: int) -> dict:
    from datasets import Dataset

    from ftune.model import build_model
    from ftune.workflows.sft import make_trainer

    recipe = _recipe(preset, padding_free, warmup + steps, batch, tempfile.mkdtemp(prefix="bench-packing-"))
    built = build_model(recipe)
    clock = StepClock(warmup)
    trainer = make_trainer(recipe, built, Dataset.from_dict({"input_ids": rows}), [clock.callback])
    trainer.args.train_sampling_strategy = "sequential"
    trainer.args.save_strategy = "no"
    trainer.data_collator = clock.counting(trainer.data_collator)
    trainer.train()
    return {**clock.result(), "batches": built.plan.batches, "plan": built.plan.describe()}


def run_trl(preset: str, rows, steps: int, warmup: int, batch: int) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ftune.measure.stacks import hf_peft_model
    from ftune.model import materialize_preset

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    recipe = _recipe(preset, True, warmup + steps, batch, tempfile.mkdtemp(prefix="bench-packing-"))
    path = materialize_preset(preset, seed=PRESET_SEED, dtype=dtype, device=device)
    model = hf_peft_model(path, recipe, dtype=dtype, device=device, attn_implementation="sdpa",
                          prepare_for_checkpointing=True)
    clock = StepClock(warmup)
    config = SFTConfig(
        output_dir=recipe.training.output_dir, per_device_train_batch_size=batch, max_steps=warmup + steps,
        learning_rate=2e-4, padding_free=True, max_length=None, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=cuda, use_cpu=not cuda,
        train_sampling_strategy="sequential", save_strategy="no", logging_steps=10**6, report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=PRESET_SEED,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=AutoTokenizer.from_pretrained(TOKENIZER), callbacks=[clock.callback])
    trainer.data_collator = clock.counting(trainer.data_collator)
    trainer.train()
    return clock.result()


def one_run(args) -> dict:
    from ftune.presets import preset_config

    rows = mix(args.rows, preset_config(args.preset).vocab_size, args.longest)
    steps = min(args.steps, len(rows) // args.batch - args.warmup)
    if args.one == "trl":
        measured = run_trl(args.preset, rows, steps, args.warmup, args.batch)
    else:
        measured = run_ftune(args.preset, args.one == "ftune-packed", rows, steps, args.warmup, args.batch)
    return {"run": args.one, "preset": args.preset, "rows": args.rows, "longest": args.longest, "batch_rows": args.batch,
            "warmup_steps": args.warmup, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else "cpu", **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--rows", type=int, default=400, help="rows of the mix")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps at most (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--longest", type=int, default=MAX_LENGTH, help="rows cut at this length (the mix's: 8192)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"some of {', '.join(RUNS)}")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<card>/<date>-packing.json)")
    parser.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # a run in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args)))
        return
    results = []
    for run in args.runs.split(","):
        command = [sys.executable, __file__, "--one", run, "--preset", args.preset, "--rows", str(args.rows),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--longest", str(args.longest)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            row = {"run": run, "status": "failed", "error": done.stderr.strip().splitlines()[-20:]}
        else:
            row = {**json.loads(done.stdout.strip().splitlines()[-1]), "status": "ok"}
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("step_")}), flush=True)
        results.append(row)
    baseline = next((r for r in results if r["run"] == "trl" and r["status"] == "ok"), None)
    for row in results:
        if baseline is not None and row["status"] == "ok":
            row["speedup_over_trl"] = round(row["useful_tokens_per_s"] / baseline["useful_tokens_per_s"], 3)
    out = args.out or result_path("packing")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
