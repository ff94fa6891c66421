"""Reward functions for GRPO, in TRL's calling convention: `f(prompts, completions, **columns)`
returns one float per completion. Completions are text, or a list of chat messages.

Built in: exact_answer, format, length_penalty. A recipe may also name its own as
`module:function`; ftune imports that module, which runs the user's code, and checks that the
function takes TRL's keywords (it needs a **kwargs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from ftune.checks import import_reward
from ftune.errors import RecipeError

_LAST_TOKEN = re.compile(r"(-?\d+(?:\.\d+)?|[^\s.,!?]+)[\s.,!?]*$")


def completion_text(completion) -> str:
    if isinstance(completion, list):  # conversational: the assistant's message(s)
        return "".join(message.get("content", "") for message in completion)
    return completion


def last_token(text: str) -> str | None:
    """The last number (or word) of a text: '... so the total is 72.' -> '72', 'x #### 18' -> '18'."""
    match = _LAST_TOKEN.search(text.strip())
    return match.group(1) if match else None


def exact_answer(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 when the completion's last number (or word) equals the last one of the row's `answer`
    column (a bare answer, or a worked solution ending in it, as GSM8K's '#### 72'), else 0.0."""
    if answer is None:
        raise RecipeError("grpo.rewards: exact_answer needs an 'answer' column in the data.",
                          hint="Add it, or map yours with data.fields: {answer: your_column}.")
    rewards = []
    for completion, expected in zip(completions, answer):
        got = last_token(completion_text(completion))
        rewards.append(1.0 if got is not None and got == last_token(str(expected)) else 0.0)
    return rewards


def format_reward(prompts, completions, pattern: str = r"\S", **_) -> list[float]:
    """1.0 when the completion matches the recipe's grpo.format_pattern (a regular expression)."""
    compiled = re.compile(pattern)
    return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]


def length_penalty(prompts, completions, max_length: int = 64, **_) -> list[float]:
    """Minus the completion's length in characters over four times max_completion_length (about -1 at the cap)."""
    return [-min(1.0, len(completion_text(c)) / (4 * max_length)) for c in completions]


def reward_functions(names: list[str], *, format_pattern: str, max_length: int) -> list[Callable]:
    """The callables a recipe's grpo.rewards names, each with a __name__ for TRL's logs."""
    functions = []
    for name in names:
        if name == "exact_answer":
            function = exact_answer
        elif name == "format":
            function = partial(format_reward, pattern=format_pattern)
        elif name == "length_penalty":
            function = partial(length_penalty, max_length=max_length)
        else:
            function = import_reward(name)  # the check `ftune validate` runs too
        if isinstance(function, partial):
            function.__name__ = name
        functions.append(function)
    return functions

