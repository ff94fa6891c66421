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
import traceback

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


def _process_group():
    """torch.distributed while a process group is up (under torchrun), else None; a command that
    never imported torch has none."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _leave_process_group(code, *, wait: bool = True) -> None:
    """Under torchrun: with `wait`, wait for every rank (not after an error: the others may never
    get there), then exit without gloo's teardown (NCCL runs leave the usual way). That teardown can
    deadlock in torch 2.13: the process group's destructor joins gloo's worker thread with the GIL
    held, while that thread waits for the GIL to free a finished work launched in a backward (each
    keeps the backward's stashed contextvars). A rank that fails right after a backward meets the
    same race on its way out, so an error leaves this way too."""
    dist = _process_group()
    if dist is None:
        return
    if wait:
        try:
            dist.barrier()
        except Exception:  # a rank that is gone: this one leaves all the same
            pass
    if dist.get_backend() == "gloo":
        if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, exit 1
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if code is None else code if isinstance(code, int) else 1)
    if wait:
        dist.destroy_process_group()


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    command = next((argument for argument in sys.argv[1:] if not argument.startswith("-")), None)
    if command in LIBRARY_COMMANDS:
        _quiet_libraries()
    try:
        app()
    except SystemExit as finished:
        _leave_process_group(finished.code)
        raise
    except BaseException as error:
        code = _report(error, debug)
        _leave_process_group(code, wait=False)
        if code is None:  # --debug: the traceback, from the interpreter
            raise
        sys.exit(code)


def _report(error: BaseException, debug: bool) -> int | None:
    """Print what went wrong; the exit code, or None where the traceback is to be raised (--debug
    without a process group). Under one, --debug prints the traceback here and exits with 1: a gloo
    rank leaves without the interpreter's exit, which would have printed it."""
    if isinstance(error, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]")
        return 130
    if not isinstance(error, Exception):
        raise error  # GeneratorExit and the like: not ftune's to report
    if debug:
        if _process_group() is None:
            return None
        traceback.print_exc()
        return 1
    if isinstance(error, FtuneError):
        report_error(error)
        return error.exit_code
    # a bug: keep the message short unless asked
    err_console.print(
        f"[bold red]ftune failed:[/] {type(error).__name__}: {escape(str(error))}\n"
        "[dim]This looks like a bug in ftune. Run again with --debug for the traceback, and include it in a report.[/]",
        highlight=False,
    )
    return 1
