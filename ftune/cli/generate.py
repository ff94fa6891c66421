"""`ftune generate RUN_DIR --prompt TEXT`: one completion, for scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ftune.cli.app import app, err_console


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A run's output_dir (the 4-bit base with the adapter), or an exported merged folder.")],
    prompt: Annotated[str, typer.Option(help="The user's message (or, with --raw, the text to continue).")],
    system: Annotated[str | None, typer.Option(help="A system prompt, where the chat template takes one.")] = None,
    raw: Annotated[bool, typer.Option(help="Continue the prompt as it is, without the chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest completion, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 picks the likeliest token (repeatable).")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling (with a temperature).")] = 0.9,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest tokens (0: all).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the completion and its figures as JSON.")] = False,
) -> None:
    """Generate one completion from a trained run and print it."""
    from ftune.inference import Sampling, complete, load_for_generation, open_folder, prompt_text

    folder = open_folder(run_dir)
    err_console.print(f"[bold]ftune[/] loading {folder.path}")
    loaded = load_for_generation(folder)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = prompt_text(loaded.tokenizer, messages, chat=not raw)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    result = complete(loaded, text, sampling, templated=not raw)
    if as_json:
        print(json.dumps({"prompt": prompt, **result.as_dict(), "model": loaded.source, "folder": str(folder.path),
                          "device": str(loaded.device)}))
    else:
        print(result.text)
