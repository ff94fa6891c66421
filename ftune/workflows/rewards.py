"""Reward functions for GRPO, in TRL's calling convention: `f(prompts, completions, **columns)`
returns one float per completion. Completions are text, or a list of chat messages.

Built in: exact_answer, format, length_penalty. A recipe may also name its own as
`module:function`; ftune imports that module, which runs the user's code, and checks that the
function takes TRL's keywords (it needs a **kwargs). During the run its failures, and what it
returns that TRL cannot take, are RewardErrors naming it (checked_reward).
"""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Callable
from functools import partial

import torch
from trl.trainer.utils import get_callable_name, is_async_callable

from ftune.checks import REWARD_CALL, REWARD_SHAPE, import_reward
from ftune.errors import RecipeError, RewardError, first_line

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
            function = checked_reward(name, import_reward(name))  # the check `ftune validate` runs too
        if isinstance(function, partial):
            function.__name__ = name
        functions.append(function)
    return functions


def checked_reward(spec: str, function: Callable) -> Callable:
    """The user's reward `function` (grpo.rewards' `module:function` `spec`), as TRL calls it
    (synchronous or async, as the function is), whose failure is a RewardError naming it and the
    line that raised, and whose result is checked first as TRL reads it: one value per completion,
    each None (no reward for that completion, which TRL leaves out) or what torch turns into a
    float. It keeps the name TRL logs it by. A reward model (an nn.Module) is TRL's to call."""
    if isinstance(function, torch.nn.Module):
        return function

    def checked(rewards, completions) -> list:
        count = len(completions)
        try:
            if isinstance(rewards, (str, bytes, dict)):
                raise TypeError
            rewards = list(rewards)  # a generator is read once, here
        except TypeError:  # not iterable, or a 0-d tensor
            problem = f"returned a {type(rewards).__name__}, not one reward per completion"
        else:
            odd = next((r for r in rewards if r is not None and not _a_number(r)), None)
            problem = f"returned {len(rewards)} rewards for {count} completions" if len(rewards) != count else \
                f"returned {odd!r} ({type(odd).__name__}) among its rewards" if odd is not None else None
        if problem:
            raise RewardError(f"grpo.rewards: {spec} {problem}.",
                              hint=f"Return one float (or None) per completion, in their order: {REWARD_SHAPE}.")
        return rewards

    def failed(error: Exception) -> RewardError:
        return RewardError(f"grpo.rewards: {spec} raised {type(error).__name__}: {first_line(error)}, at "
                           f"{_where(error, function)}.",
                           hint=f"Fix the function; TRL calls it as {REWARD_CALL}.")

    if is_async_callable(function):
        async def reward(*args, **kwargs):
            try:
                rewards = _read(await function(*args, **kwargs))
            except Exception as error:
                raise failed(error) from None
            return checked(rewards, kwargs.get("completions", args[1] if len(args) > 1 else ()))
    else:
        def reward(*args, **kwargs):
            try:
                rewards = _read(function(*args, **kwargs))
            except Exception as error:
                raise failed(error) from None
            return checked(rewards, kwargs.get("completions", args[1] if len(args) > 1 else ()))
    reward.__name__ = reward.__qualname__ = get_callable_name(function)  # TRL's rewards/<name>/... logs
    reward.__doc__, reward.__wrapped__ = function.__doc__, function
    return reward


def _read(rewards):
    """A generator's rewards read here, where its own code runs and may raise; else as returned."""
    return list(rewards) if inspect.isgenerator(rewards) else rewards


def _a_number(value) -> bool:
    """Whether torch turns `value` into one float, as TRL turns each reward (torch.tensor)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    try:
        return torch.tensor(value, dtype=torch.float32).numel() == 1
    except (TypeError, ValueError, RuntimeError):
        return False


def _where(error: Exception, function: Callable) -> str:
    """file:line (function) where `error` was raised: in the reward's own file where the traceback
    passes through it, else the deepest frame."""
    frames = traceback.extract_tb(error.__traceback__)
    try:
        own = inspect.getsourcefile(inspect.unwrap(function))
    except TypeError:  # a builtin, or a callable class whose file is not known
        own = None
    frame = next((f for f in reversed(frames) if own and f.filename == own), frames[-1] if frames else None)
    return f"{frame.filename}:{frame.lineno} ({frame.name})" if frame else "its call"
