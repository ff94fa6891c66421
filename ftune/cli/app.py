"""The Typer app that every command module registers on, how errors are shown, and the options
that several commands share."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from ftune.errors import FtuneError, RecipeError
from ftune.recipe import parse_bytes

app = typer.Typer(
    name="ftune",
    help="Fine-tune LLMs with QLoRA (SFT, DPO or GRPO) from YAML recipes in far less GPU memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err_console = Console(stderr=True, soft_wrap=True)


def report_error(error: FtuneError) -> None:
    """One paragraph: what went wrong and where, then the fix in dim text."""
    # escaped: messages quote the user's values and paths, which may hold [brackets] rich would read as markup
    body = escape(error.message) + (f"\n[dim]{escape(error.hint)}[/]" if error.hint else "")
    if err_console.is_terminal:
        err_console.print(Panel(body, title=f"[bold red]{error.title}", border_style="red", expand=False), highlight=False)
    else:  # logs and pipes: unwrapped lines that grep finds whole
        err_console.print(f"[bold red]{error.title}:[/] {body}", highlight=False, markup=True)


def parse_vram(text: str | None) -> int | None:
    """--vram SIZE in bytes (None when not given); a RecipeError for what is not a card's size."""
    if text is None:
        return None
    try:
        budget = parse_bytes(text)
    except ValueError as error:
        raise RecipeError(f"--vram: {error}.", hint="For example --vram 24GiB.") from None
    if budget < 1:
        raise RecipeError(f"--vram {text}: a card's memory must be more than 0.", hint="For example --vram 24GiB.")
    return budget
