"""`ftune chat RUN_DIR`: talk to a trained run, the answers streamed as they are generated."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ftune.cli.app import app, err_console


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A run's output_dir (the 4-bit base with the adapter), or an exported merged folder.")],
    system: Annotated[str | None, typer.Option(help="A system prompt, where the chat template takes one.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 picks the likeliest token.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling.")] = 0.9,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest tokens (0: all).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
) -> None:
    """Chat with a trained run: one line per turn (from the keyboard or a pipe), /reset, /exit."""
    from ftune.inference import ChatSession, Sampling, load_for_generation, open_folder

    folder = open_folder(run_dir)
    err_console.print(f"[bold]ftune[/] loading {folder.path}")
    loaded = load_for_generation(folder)
    if not getattr(loaded.tokenizer, "chat_template", None):
        err_console.print("[yellow]warning:[/] the tokenizer has no chat template: each line is continued as plain "
                          "text, without the earlier turns")
    session = ChatSession(loaded, Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                           top_k=top_k, seed=seed), system=system)
    interactive = sys.stdin.isatty()
    err_console.print(f"[bold]ftune[/] chat with {loaded.source} on {loaded.device}"
                      + (" · /reset starts over, /exit or Ctrl-D ends" if interactive else ""))
    while True:
        try:
            line = input("you › ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break  # end of the piped input
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            err_console.print("[dim]conversation cleared[/]")
            continue
        if interactive:
            sys.stdout.write("model › ")
        session.reply(text, out=sys.stdout)
