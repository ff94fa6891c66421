"""`ftune export RUN_DIR`: the adapter merged into its 16-bit base (a transformers folder), or a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ftune.cli.app import app, err_console
from ftune.errors import ExportError

FORMATS = ("merged", "gguf")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run's output_dir (or a checkpoint-N in it).")],
    fmt: Annotated[str, typer.Option("--format", help="merged: a transformers folder; gguf: one file for llama.cpp.")]
    = "merged",
    dtype: Annotated[str | None, typer.Option(
        help="merged: auto (the base's own dtype), bf16, f16 or f32.")] = None,
    quant: Annotated[str | None, typer.Option(help="gguf: f16 (default), bf16 or q8_0 (q4_k_m: llama-quantize).")]
    = None,
    out: Annotated[Path | None, typer.Option(
        help="Where to write (default: RUN_DIR-merged/ or RUN_DIR-gguf/ beside the run).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace what --out already holds.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Merge a run's adapter into its original 16-bit base weights, or write a GGUF file."""
    from ftune.export import export_gguf, export_merged
    from ftune.memory.monitor import format_bytes

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose merged or gguf.",
                          hint="merged for transformers-based servers (vLLM, TGI, transformers); gguf for llama.cpp "
                          "and the tools on it (Ollama, LM Studio).")
    if fmt == "merged" and quant is not None:
        raise ExportError("--quant is for --format gguf; a merged folder is saved in 16 bits.",
                          hint="Use --dtype bf16 or f16 with --format merged, or --format gguf --quant q8_0.")
    if fmt == "gguf" and dtype is not None:
        raise ExportError("--dtype is for --format merged; a GGUF file's precision is --quant.",
                          hint="For example --format gguf --quant f16.")
    err_console.print(f"[bold]ftune[/] export {run_dir} as {fmt}")
    if fmt == "merged":
        result = export_merged(run_dir, out=out, dtype=dtype or "auto", overwrite=overwrite)
    else:
        result = export_gguf(run_dir, out=out, quant=quant or "f16", overwrite=overwrite)
    for notice in result.notices:
        err_console.print(f"[yellow]notice:[/] {notice}")
    if as_json:
        print(json.dumps({"path": str(result.path), "format": result.format, "precision": result.precision,
                          "bytes": result.bytes, "seconds": round(result.seconds, 2), "notices": result.notices}))
        return
    err_console.print(f"[bold]ftune[/] wrote {result.path} ({result.precision}, {format_bytes(result.bytes)} of "
                      f"weights) in {result.seconds:.1f} s")
    if fmt == "merged":
        err_console.print(f"  load it: AutoModelForCausalLM.from_pretrained('{result.path}'), or `ftune chat {result.path}`")
    else:
        err_console.print(f"  run it: llama-cli -m {result.path}")
