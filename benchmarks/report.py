"""Chart of bench_engine.py results: peak VRAM and tokens/s per stack and mode, by sequence length.

  python benchmarks/report.py benchmarks/results/h100/2026-11-25-engine-run2.json --out docs/benchmarks-engine.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [r for path in args.results for r in json.loads(path.read_text()) if r["status"] == "ok"]
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(f"{row['stack']} {row['mode']}", []).append(row)
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in sorted(series.items()):
        points.sort(key=lambda r: r["seq"])
        seqs = [r["seq"] for r in points]
        memory.plot(seqs, [r["peak_gib"] for r in points], marker="o", label=label)
        speed.plot(seqs, [r["tokens_per_s"] for r in points], marker="o", label=label)
    gpu = rows[0]["gpu"] if rows else "?"
    for axis, title in ((memory, "peak allocated VRAM (GiB)"), (speed, "tokens/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (batch 1)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    memory.legend(fontsize=8)
    figure.suptitle(f"Llama-3.1-8B shape, NF4 QLoRA r=16 on 7 projections, {gpu}")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
