"""Peak VRAM of a training run with evaluation on and off (issue 24: the eval forward must not
raise the peak).

Both runs are `python -m ftune train recipes/qlora-llama3-8b.yaml` as shipped (NF4 double-quant,
bf16, LoRA r=16 on the seven projections, mode unsloth, kernels auto, 8-bit AdamW), retargeted at
a preset with random weights and the quickstart's chat data packed into --seq-token sequences,
each run in its own process. The rows are split once, --eval of them held out: both runs train on
the same rows in the same order, and `on` evaluates on the held-out file every --eval-steps and at
the end, so any difference in peak is the evaluation's (holding out inside the run would train
`on` on other packed sequences than `off`). Figures come from each run's summary.json: peak_memory_gib
(torch.cuda.max_memory_allocated from the first step to the end, evaluations included), eval_loss,
tokens/s steady.

  python benchmarks/bench_eval.py --preset llama-3.1-8b --seq 8192 --steps 6 --out results.json

Without CUDA it runs the tiny-llama preset as a smoke test (float32, adamw_torch; the peak is then
the process's largest RSS).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ftune.measure.results import card_name, result_path  # noqa: E402

RECIPE = REPO / "recipes" / "qlora-llama3-8b.yaml"
DATA = REPO / "data" / "quickstart"


def split_rows(out: Path, fraction: float) -> None:
    """The quickstart's rows as train.jsonl and eval.jsonl, `fraction` of them held out at random."""
    rows = (DATA / "sft.jsonl").read_text().splitlines()
    random.Random(0).shuffle(rows)
    held = int(len(rows) * fraction)
    if not 0 < held < len(rows):
        raise SystemExit(f"--eval {fraction} holds out {held} of {len(rows)} rows; give a fraction that leaves "
                         "rows on both sides, e.g. 0.2")
    (out / "eval.jsonl").write_text("\n".join(rows[:held]) + "\n")
    (out / "train.jsonl").write_text("\n".join(rows[held:]) + "\n")


def run(variant: str, args, out: Path, cuda: bool) -> dict:
    overrides = {
        "model.name_or_path": "null", "model.preset": args.preset, "model.tokenizer": str(DATA / "tokenizer"),
        "data.source": str(out / "train.jsonl"), "data.split": "train", "data.max_length": str(args.seq),
        "sft.packing": "true", "training.max_steps": str(args.steps), "training.grad_accum": "1",
        "training.logging_steps": "1", "training.save_steps": "null", "training.save_minutes": "0",
        "training.output_dir": str(out / variant),
    }
    if not cuda:
        overrides.update({"model.dtype": "auto", "quantization.compute_dtype": "auto",
                          "training.optimizer": "adamw_torch"})
    if variant == "on":
        overrides.update({"data.eval": str(out / "eval.jsonl"), "training.eval_steps": str(args.eval_steps)})
    command = [sys.executable, "-m", "ftune", "train", str(RECIPE)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    print("$", " ".join(command[2:]), flush=True)
    finished = subprocess.run(command, cwd=REPO)
    if finished.returncode:
        return {"variant": variant, "error": f"exit {finished.returncode}"}
    summary = json.loads((out / variant / "summary.json").read_text())
    return {"variant": variant, "device": summary["device"], "steps": summary["steps"],
            "peak_memory_gib": summary["peak_memory_gib"], "peak_memory_bytes": summary.get("peak_memory_bytes"),
            "final_loss": summary["final_loss"],
            "eval_loss": summary["eval_loss"], "eval_rows": summary["eval_rows"],
            "tokens_per_s_steady": summary["tokens_per_s_steady"], "tokens_per_s": summary["tokens_per_s"]}


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.1-8b" if cuda else "tiny-llama")
    parser.add_argument("--seq", type=int, default=8192 if cuda else 64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval", type=float, default=0.2, help="fraction held out (0.2: a full --seq sequence)")
    parser.add_argument("--eval-steps", type=int, default=2)
    parser.add_argument("--out", type=Path,
                        help="write the rows as JSON here (default benchmarks/results/<card>/<date>-eval-peak.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as folder:
        split_rows(Path(folder), args.eval)
        rows = [run(variant, args, Path(folder), cuda) for variant in ("off", "on")]
    device = next((row["device"] for row in rows if "device" in row), "cpu")
    out = args.out or result_path("eval-peak", card=card_name(device))
    out.write_text(json.dumps({"preset": args.preset, "seq": args.seq, "rows": rows}, indent=2))
    print(f"results: {out}")
    print(f"\n{args.preset}, {args.seq} tokens a sequence, {args.steps} steps")
    print(f"{'eval':<5} {'peak GiB':>9} {'eval loss':>10} {'final loss':>11} {'tok/s steady':>13}  device")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<5} {row['error']}")
            continue
        eval_loss = "-" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        print(f"{row['variant']:<5} {row['peak_memory_gib']:>9.3f} {eval_loss:>10} {row['final_loss']:>11.4f} "
              f"{row['tokens_per_s_steady'] or 0:>13,.0f}  {row['device']}")


if __name__ == "__main__":
    main()
