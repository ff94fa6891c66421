"""`ftune validate` (and so the start of `ftune train`) against the machine and the model: the
output folder, the seed's range, GRPO rewards, LoRA targets; and the warnings for legal values
that are almost surely wrong. Each is one message naming its key, never "a bug in ftune"."""

from __future__ import annotations

import json
import sys

import pytest

from ftune.checks import (environment_problems, model_modules, output_dir_problem, recipe_warnings,
                          reward_signature_problem)
from ftune.known_models import KNOWN_HUB_PRESETS, preset_for
from ftune.presets import PRESETS
from ftune.errors import RecipeError
from ftune.recipe import Recipe, validate_recipe
from tests.conftest import REPO
from tests.test_cli import run_cli
from tests.test_recipe import quickstart_dict, write


def validate(tmp_path, monkeypatch, capsys, data: dict, *args: str) -> tuple[int, str]:
    code, output = run_cli(monkeypatch, capsys, "validate", str(write(tmp_path, data)), *args)
    assert "bug in ftune" not in output and "Traceback" not in output
    return code or 0, output


def checked(data: dict, base_dir) -> Recipe:
    """The recipe with the checks against this machine and its model, as `ftune validate` makes them."""
    return validate_recipe(data, base_dir=base_dir, environment_checks=environment_problems)


def grpo_dict() -> dict:
    data = quickstart_dict()
    data["workflow"] = "grpo"
    data["data"]["format"] = "prompt"
    data["data"]["source"] = str(REPO / "data" / "quickstart" / "grpo.jsonl")
    return data


@pytest.mark.parametrize("command", ["validate", "train"])
def test_seed_outside_numpys_range_is_a_recipe_error(tmp_path, monkeypatch, capsys, command):
    data = quickstart_dict()
    data["training"]["seed"] = -1
    data["training"]["output_dir"] = str(tmp_path / "out")
    code, output = run_cli(monkeypatch, capsys, command, str(write(tmp_path, data)))
    assert code == 2 and "training.seed" in output and "4294967295" in output and "bug in ftune" not in output
    assert not (tmp_path / "out").exists()
    data["training"]["seed"] = 2**32 - 1
    assert validate(tmp_path, monkeypatch, capsys, data)[0] == 0


@pytest.mark.parametrize("where", ["proc", "file-in-the-way", "a-file"])
def test_output_dir_that_cannot_be_written(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "plain.txt").write_text("x")
    output_dir = {"proc": "/proc/ftune-run/out", "file-in-the-way": str(tmp_path / "plain.txt" / "run"),
                  "a-file": str(tmp_path / "plain.txt")}[where]
    data = quickstart_dict()
    data["training"]["output_dir"] = output_dir
    code, output = validate(tmp_path, monkeypatch, capsys, data)
    assert code == 2 and "training.output_dir" in output and output_dir in output
    assert (tmp_path / "plain.txt").read_text() == "x"


def test_writable_output_dir_leaves_nothing_behind(tmp_path):
    assert output_dir_problem(str(tmp_path / "new" / "run")) is None
    assert output_dir_problem(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []  # the probe folder is gone, and nothing was created


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def good(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n"
        "def no_kwargs(prompts, completions):\n    return [1.0] * len(completions)\n"
        "def positional(prompts, completions, /, **kwargs):\n    return []\n"
        "class Scorer:\n    def __init__(self, **kwargs):\n        pass\n"
        "VALUE = 3\n")
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("reward, expected", [
    ("os:getcwd", "**kwargs"),
    ("my_rewards:no_kwargs", "**kwargs"),
    ("my_rewards:positional", "by position only"),
    ("my_rewards:Scorer", "is a class"),
    ("my_rewards:VALUE", "not a function"),
    ("my_rewards:missing", "has no function 'missing'"),
    ("no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("broken_rewards:f", "RuntimeError: no GPU here"),
])
def test_reward_that_cannot_take_trls_call_is_named(tmp_path, monkeypatch, capsys, reward_module, reward, expected):
    data = grpo_dict()
    data["grpo"] = {"rewards": ["format", reward]}
    code, output = validate(tmp_path, monkeypatch, capsys, data)
    assert code == 2 and "grpo.rewards" in output and expected in output and reward.split(":")[0] in output


def test_reward_with_trls_keywords_validates(tmp_path, monkeypatch, capsys, reward_module):
    data = grpo_dict()
    data["grpo"] = {"rewards": ["my_rewards:good", "exact_answer"]}
    assert validate(tmp_path, monkeypatch, capsys, data)[0] == 0


def test_reward_signatures():
    assert reward_signature_problem(lambda prompts, completions, **kw: []) is None
    assert reward_signature_problem(lambda **kw: []) is None
    assert "no **kwargs" in reward_signature_problem(lambda prompts, completions, answer: [])
    assert reward_signature_problem(len) is not None  # a built-in: len(obj, /)


@pytest.mark.parametrize("targets, named", [
    (["lm_head"], "output layer"),
    (["q_proj", "not_a_module"], "'not_a_module' matches no module"),
    (["q_prj"], "did you mean 'q_proj'"),
    (["embed_tokens"], "not a linear layer"),
])
def test_lora_targets_are_checked_against_the_models_modules(tmp_path, monkeypatch, capsys, targets, named):
    data = quickstart_dict()
    data["lora"]["target_modules"] = targets
    code, output = validate(tmp_path, monkeypatch, capsys, data)
    assert code == 2 and "lora.target_modules" in output and named in output
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in output  # what the model has


def test_paged_generation_with_an_attention_it_has_no_paged_twin_of_is_named(tmp_path):
    """transformers' paged engine switches the model to paged|<attention>: Gemma-2's soft-capped
    attention has none (set_attn_implementation refuses it mid-run), so the recipe is refused first."""
    data = grpo_dict()
    del data["model"]["preset"]
    data["model"]["name_or_path"] = "google/gemma-2-9b"  # a well-known id: its preset's config, offline
    data["grpo"] = {**data.get("grpo", {}), "paged_generation": True}
    with pytest.raises(RecipeError, match="grpo.paged_generation") as caught:
        checked(data, tmp_path)
    assert "ftune_softcap" in str(caught.value) and "paged_generation: false" in str(caught.value)
    data["model"]["name_or_path"] = "meta-llama/Llama-3.1-8B"  # sdpa has its paged twin
    checked(data, tmp_path)


def test_lora_targets_match_as_peft_matches(tmp_path):
    data = quickstart_dict()
    for targets in (["self_attn.q_proj", "mlp.down_proj"], ["model.layers.0.self_attn.v_proj"], "all-linear"):
        data["lora"]["target_modules"] = targets
        checked(data, tmp_path)


def test_lora_targets_of_a_local_folder_and_of_a_hub_id(tmp_path):
    """A local config.json is read; a well-known hub id is its preset's shape; an unknown hub id
    offline is not checked (no message: loading the model reports what it finds)."""
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PRESETS["tiny-qwen2"]))
    data = quickstart_dict()
    del data["model"]["preset"]
    data["lora"]["target_modules"] = ["c_attn"]
    for name in (str(folder), "Qwen/Qwen2.5-7B-Instruct"):
        data["model"]["name_or_path"] = name
        with pytest.raises(Exception, match="'c_attn' matches no module") as caught:
            checked(data, tmp_path)
        assert "q_proj" in str(caught.value)
    data["model"]["name_or_path"] = "some-org/not-a-known-model"
    checked(data, tmp_path)


def test_model_modules_of_a_preset():
    recipe = validate_recipe(quickstart_dict(), base_dir=".")
    modules = model_modules(recipe)
    assert modules.head == "lm_head" and modules.hidden == 128
    assert modules.linear_names() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_known_hub_ids_are_presets():
    assert set(KNOWN_HUB_PRESETS.values()) <= set(PRESETS)
    assert preset_for("meta-llama/Llama-3.1-8B") == "llama-3.1-8b" and preset_for("qwen/qwen2.5-7b") == "qwen2.5-7b"
    assert preset_for("mistralai/Mistral-7B-v0.3") == "mistral-7b" and preset_for("google/gemma-2-9b") == "gemma-2-9b"
    assert preset_for("someone/else") is None


WARNINGS = [
    ({"lora": {"r": 4096}}, "lora.r", "hidden size 128"),
    ({"lora": {"alpha": 1e30}}, "lora.alpha", "alpha / r"),
    ({"training": {"learning_rate": 1e10}}, "training.learning_rate", "NaN"),
    ({"training": {"max_grad_norm": 0, "learning_rate": 1e-2}}, "training.max_grad_norm", "clipping off"),
    ({"training": {"batch_size": 1_000_000}}, "training.batch_size", "64,000,000 tokens"),
    ({"training": {"warmup_steps": 250}}, "training.warmup_steps", "never reaches"),
    ({"training": {"warmup_steps": 5, "lr_scheduler": "constant"}}, "training.warmup_steps", "constant_with_warmup"),
    ({"data": {"max_length": 1}}, "data.max_length", "nothing to learn"),
]


@pytest.mark.parametrize("change, key, words", WARNINGS, ids=[f"{w[1]}-{i}" for i, w in enumerate(WARNINGS)])
def test_legal_but_surely_wrong_values_warn_and_validate(tmp_path, monkeypatch, capsys, change, key, words):
    data = quickstart_dict()
    for section, values in change.items():
        data[section].update(values)
    code, output = validate(tmp_path, monkeypatch, capsys, data)
    assert code == 0 and "✓" in output
    warning = next(line for line in output.splitlines() if line.startswith(f"warning: {key}:"))
    assert words in warning


def test_the_shipped_recipes_have_no_warnings(repo):
    from ftune.recipe import load_recipe

    for path in sorted((repo / "recipes").glob("*.yaml")):
        assert recipe_warnings(load_recipe(path, check_paths=False)) == [], path.name


@pytest.mark.parametrize("lines, named", [
    (['{"text": "ok"}', "", '{"text": oops}'], "line 3: not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', '{"promt": "c", "completion": "d"}'], "row 1 (line 2): no 'prompt'"),
    (['{"question": "a"}'], "the sft workflow needs"),
])
def test_validate_reads_a_local_json_file_for_its_lines_and_columns(tmp_path, monkeypatch, capsys, lines, named):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n")
    data = quickstart_dict()
    data["data"] = {"source": str(rows)}
    code, output = validate(tmp_path, monkeypatch, capsys, data)
    assert code == 2 and "data.source" in output and named in output and "rows.jsonl" in output


def test_validate_accepts_the_shipped_data_and_renamed_columns(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "a", "answer": "b"}\n')
    data = quickstart_dict()
    data["data"] = {"source": str(rows), "fields": {"prompt": "question", "completion": "answer"}}
    assert validate(tmp_path, monkeypatch, capsys, data)[0] == 0
