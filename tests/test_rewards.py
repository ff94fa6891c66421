"""GRPO's built-in rewards, and a user's own reward named module:function."""

from __future__ import annotations

import sys

import pytest
import torch

from ftune.errors import RecipeError
from ftune.workflows.rewards import exact_answer, format_reward, length_penalty, reward_functions


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_exact_answer_on_text_chat_and_worked_solutions():
    completions = ["12 + 7 = 19", chat("The total is 19."), "12 + 7 = 91", "", chat("nineteen")]
    answers = ["19", "so 12 + 7 #### 19", "19", "19", "19"]
    assert exact_answer(None, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_answer_without_the_column_is_a_recipe_error():
    with pytest.raises(RecipeError, match="answer"):
        exact_answer(None, ["1"])


def test_format_and_length():
    assert format_reward(None, ["1 + 2 = 3", "1 + 2 = x"], pattern=r"^\d+ \+ \d+ = \d+$") == [1.0, 0.0]
    short, long = length_penalty(None, ["ab", "x" * 1000], max_length=16)
    assert -0.1 < short < 0 and long == -1.0


def test_user_reward_module_and_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    functions = reward_functions(["my_rewards:shout", "format"], format_pattern="x", max_length=8)
    assert functions[0](None, ["a", "b"]) == [1.0, 1.0]
    assert functions[1].__name__ == "format"
    with pytest.raises(RecipeError, match="cannot import module 'no_such_module'"):
        reward_functions(["no_such_module:f"], format_pattern="x", max_length=8)
    with pytest.raises(RecipeError, match="has no function 'missing'"):
        reward_functions(["my_rewards:missing"], format_pattern="x", max_length=8)
    sys.modules.pop("my_rewards", None)


USER_REWARDS = '''\
import decimal
import functools
import json

import numpy
import torch

def fine(prompts, completions, **kwargs):
    return [None if c == "skip" else len(c) for c in completions]

def as_array(prompts, completions, **kwargs):
    return numpy.ones(len(completions))

def as_column(prompts, completions, **kwargs):
    return torch.ones(len(completions), 1)

def as_generator(prompts, completions, **kwargs):
    return (decimal.Decimal("0.5") if c else numpy.bool_(True) for c in completions)

def broken(prompts, completions, **kwargs):
    scores = {}
    return [scores["missing"] for c in completions]

def short(prompts, completions, **kwargs):
    return [1.0]

def words(prompts, completions, **kwargs):
    return ["good" for c in completions]

def one(prompts, completions, **kwargs):
    return torch.tensor(1.0)

def parses(prompts, completions, **kwargs):
    return [json.loads(c) for c in completions]

class Judge:
    def __call__(self, prompts, completions, **kwargs):
        return [0.0 for c in completions]

judge = Judge()

def scaled(prompts, completions, scale=1.0, **kwargs):
    return [scale for c in completions]

halved = functools.partial(scaled, scale=0.5)

async def later(prompts, completions, **kwargs):
    return [0.5 for c in completions]

async def later_broken(prompts, completions, **kwargs):
    raise RuntimeError("the judge is down")

reward_model = torch.nn.Linear(1, 1)

def lazy_broken(prompts, completions, **kwargs):
    return (int(c) for c in completions)
'''


def test_a_user_rewards_failure_names_it_and_its_line(tmp_path, monkeypatch):
    """A user's reward that raises, or returns what TRL cannot use as one reward per completion,
    is a RewardError naming grpo.rewards, the function and (raised) the line of the user's file it
    raised from: not a bug report for ftune. What TRL takes (numbers, None, numpy values, tensors,
    a generator; async functions) passes, under the name TRL logs it by; a reward model is TRL's."""
    import asyncio

    from trl.trainer.utils import is_async_callable

    from ftune.errors import RewardError

    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["fine", "as_array", "as_column", "as_generator", "broken", "short", "words", "one", "parses", "judge",
             "halved", "later", "later_broken", "reward_model", "lazy_broken"]
    rewards = dict(zip(names, reward_functions([f"user_rewards:{name}" for name in names], format_pattern="x",
                                                max_length=8)))
    call = {"prompts": ["p", "p"], "completions": ["ab", "skip"], "completion_ids": [[1], [2]]}
    assert rewards["fine"](**call) == [2, None] and rewards["fine"].__name__ == "fine"
    assert len(rewards["as_array"](**call)) == len(rewards["as_column"](**call)) == 2
    assert [float(r) for r in rewards["as_generator"](**call)] == [0.5, 0.5]
    assert (rewards["judge"].__name__, rewards["halved"].__name__) == ("Judge", "scaled")  # TRL's own names
    assert rewards["halved"](**call) == [0.5, 0.5]
    assert isinstance(rewards["reward_model"], torch.nn.Module)
    failures = {"broken": r"raised KeyError: 'missing', at .*user_rewards.py:22 ",
                "parses": r"raised JSONDecodeError: Expecting value.*, at .*user_rewards.py:34 ",  # not json's line
                "short": "returned 1 rewards for 2 completions",
                "words": r"returned 'good' \(str\) among its rewards",
                "one": "returned a Tensor, not one reward per completion",
                "lazy_broken": r"raised ValueError: invalid literal .*, at .*user_rewards.py:56 "}  # in its generator
    for name, message in failures.items():
        with pytest.raises(RewardError, match=f"grpo.rewards: user_rewards:{name} {message}"):
            rewards[name](**call)
    assert is_async_callable(rewards["later"]) and is_async_callable(rewards["later_broken"])  # TRL gathers them
    assert asyncio.run(rewards["later"](**call)) == [0.5, 0.5]
    with pytest.raises(RewardError, match="later_broken raised RuntimeError: the judge is down, at .*user_rewards.py:51"):
        asyncio.run(rewards["later_broken"](**call))
    sys.modules.pop("user_rewards", None)
