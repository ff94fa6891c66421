"""The `ftune` command line: one Typer app, one module per command.

Errors caused by input (FtuneError) print one paragraph and exit with their code; anything else
is a bug and prints a short note, or the whole traceback with --debug.

Each command module imports torch and the libraries built on it inside its command, so that
`ftune --help`, `ftune validate`, `estimate-vram` and `presets` start without them
(tests/test_architecture.py checks validate's imports).
"""

from __future__ import annotations

import logging
import os
import sys

from rich.markup import escape

from ftune.errors import FtuneError

from ftune.cli import chat, compare, estimate, export, generate, presets, train, validate  # noqa: E402,F401  (register the commands)
from ftune.cli.app import app, err_console, report_error


# The commands that load models or data through transformers and datasets, whose logging is quieted first
LIBRARY_COMMANDS = ("train", "compare", "export", "generate", "chat")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # datasets and huggingface_hub print through handlers of their own: passed on to the root
    # handler as well, each of their lines appeared twice (the hub's retries offline, for one)
    for name in ("datasets", "huggingface_hub"):
        logging.getLogger(name).propagate = False
    # bitsandbytes, on a CPU with AVX512-BF16, tries the optional `kernels` package for its 4-bit
    # CPU matmul when it is imported, and warns on every run that it is missing; its own kernel
    # is used instead, and nothing is for the user to do
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NoKernelsPackageWarning) for f in cpu_ops.filters):
        cpu_ops.addFilter(_NoKernelsPackageWarning())


class _NoKernelsPackageWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _leave_process_group(code) -> None:
    """Under torchrun: wait for every rank, then exit without gloo's teardown (NCCL runs leave the
    usual way). That teardown can deadlock in torch 2.13: the process group's destructor joins
    gloo's worker thread with the GIL held, while that thread waits for the GIL to free a finished
    work launched in a backward (each keeps the backward's stashed contextvars)."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no process group
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if dist.get_backend() == "gloo":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0)
    dist.destroy_process_group()


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    command = next((argument for argument in sys.argv[1:] if not argument.startswith("-")), None)
    if command in LIBRARY_COMMANDS:
        _quiet_libraries()
    try:
        try:
            app()
        except SystemExit as finished:
            _leave_process_group(finished.code)
            raise
    except FtuneError as error:
        if debug:
            raise
        report_error(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as error:  # a bug: keep the message short unless asked
        if debug:
            raise
        err_console.print(
            f"[bold red]ftune failed:[/] {type(error).__name__}: {escape(str(error))}\n"
            "[dim]This looks like a bug in ftune. Run again with --debug for the traceback, and include it in a report.[/]",
            highlight=False,
        )
        sys.exit(1)
