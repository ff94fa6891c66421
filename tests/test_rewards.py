"""GRPO's built-in rewards, and a user's own reward named module:function."""

from __future__ import annotations

import sys

import pytest

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
