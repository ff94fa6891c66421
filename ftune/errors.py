"""Errors a user can meet, each with what went wrong, where, and how to fix it.

The CLI prints these as one paragraph and exits with the error's code; anything else is a bug
and shows a traceback only under --debug.
"""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message (its type when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


class FtuneError(Exception):
    """An error caused by the user's input or environment, with a hint for the fix."""

    exit_code = 1
    title = "Error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class RecipeError(FtuneError):
    """The recipe (or its overrides) is invalid; lists every problem with its key path."""

    exit_code = 2
    title = "Invalid recipe"

    def __init__(self, message: str, *, hint: str | None = None, problems: list[tuple[str, str]] | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems or []

    @classmethod
    def from_problems(cls, source: str, problems: list[tuple[str, str]]) -> "RecipeError":
        lines = [f"  {key}: {message}" for key, message in problems]
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        return cls(
            f"{source}: {count}\n" + "\n".join(lines),
            hint="Fix these keys in the recipe (or with --set key=value); docs/recipes.md lists every key.",
            problems=problems,
        )


class DataError(FtuneError):
    """The dataset cannot be read or lacks what the workflow needs."""

    exit_code = 3
    title = "Data problem"


class ModelError(FtuneError):
    """The model or tokenizer cannot be built or loaded."""

    exit_code = 3
    title = "Model problem"


class OutputDirError(FtuneError):
    """The output directory holds an earlier run that would be overwritten."""

    exit_code = 2
    title = "Output directory in use"


class OutOfMemory(FtuneError):
    """The GPU ran out of memory during training."""

    exit_code = 4
    title = "Out of GPU memory"


class NonFiniteLoss(FtuneError):
    """The loss became NaN or infinite and stayed so for the configured patience."""

    exit_code = 5
    title = "Loss is not finite"


class Interrupted(FtuneError):
    """Training was stopped by a signal after saving a checkpoint."""

    title = "Stopped"

    def __init__(self, message: str, *, hint: str | None = None, signal_number: int = 2):
        super().__init__(message, hint=hint)
        self.exit_code = 128 + signal_number  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


class NotARunError(FtuneError):
    """A folder given to export, generate or chat holds neither a run's adapter nor a model."""

    exit_code = 2
    title = "Not a run folder"


class ExportError(FtuneError):
    """An export that the model's family or the installed tools cannot make."""

    exit_code = 2
    title = "Cannot export"


class HostMemoryShortage(FtuneError):
    """A model too large for this machine's free RAM, for work that runs on the CPU."""

    exit_code = 4
    title = "Not enough host memory"


class HubError(FtuneError):
    """The Hugging Face hub could not be reached or refused a push; the run's files are kept."""

    exit_code = 6
    title = "Hub push failed"


class RewardError(FtuneError):
    """A reward function of the recipe's grpo.rewards (the user's own code) raised, or returned
    what TRL cannot take as one reward per completion."""

    exit_code = 3
    title = "Reward function failed"
