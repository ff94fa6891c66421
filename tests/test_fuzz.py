"""Property-based: mutated recipes and corrupted datasets end in a clear error or a successful
validation, never in an unexpected exception (which the CLI would show as a bug)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftune.data import check_rows, load_training_data
from ftune.errors import DataError, RecipeError
from ftune.recipe import load_recipe, validate_recipe
from tests.conftest import REPO
from tests.test_data import _tokenizer
from tests.test_recipe import quickstart_dict

SCALARS = st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.floats() | st.text(max_size=12)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=5)
KEYS = st.sampled_from(["model", "lora", "data", "training", "checkpointing", "quantization", "kernels", "sft"])


@st.composite
def mutated_recipes(draw) -> dict:
    data = quickstart_dict()
    for _ in range(draw(st.integers(1, 4))):
        section = draw(KEYS)
        operation = draw(st.sampled_from(["replace-value", "delete-key", "add-key", "replace-section"]))
        node = data.setdefault(section, {})
        if operation == "replace-section" or not isinstance(node, dict):
            data[section] = draw(VALUES)
            continue
        keys = list(node)
        if operation == "delete-key" and keys:
            del node[draw(st.sampled_from(keys))]
        elif operation == "replace-value" and keys:
            node[draw(st.sampled_from(keys))] = draw(VALUES)
        else:
            node[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
    return data


@given(mutated_recipes())
@settings(max_examples=200, deadline=None)
def test_mutated_recipes_validate_or_fail_with_key_paths(raw):
    try:
        validate_recipe(raw, base_dir=REPO / "recipes")
    except RecipeError as error:
        assert error.problems, error.message
        for key, message in error.problems:
            assert isinstance(key, str) and key and message


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
@settings(max_examples=100, deadline=None)
def test_arbitrary_text_files_are_recipes_or_recipe_errors(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            load_recipe(path)
        except RecipeError:
            pass


ROW = st.dictionaries(st.sampled_from(["text", "prompt", "completion", "messages", "other"]),
                      VALUES | st.just([{"role": "user", "content": "hi"}]), max_size=3)
LINE = ROW.map(json.dumps) | st.text(max_size=30)


@given(st.lists(LINE, max_size=8), st.sampled_from(["auto", "text", "messages", "prompt_completion"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_datasets_load_or_fail_with_a_data_error(lines, data_format):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_text("\n".join(lines) + "\n")
        raw = quickstart_dict()
        raw["data"] = {"source": str(path), "format": data_format, "max_length": 32}
        recipe = validate_recipe(raw, base_dir=Path(folder))
        try:
            dataset, found_format = load_training_data(recipe)
            check_rows(dataset, found_format, _TOKENIZER, recipe)
        except DataError as error:
            assert "data" in error.message


_TOKENIZER = _tokenizer()


def test_yaml_of_a_mutation_round_trips_through_the_file_loader(tmp_path):
    """The file path (YAML text) and the dict path agree on one mutation."""
    raw = quickstart_dict()
    raw["lora"]["rank"] = 4
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        load_recipe(path)
    except RecipeError as error:
        assert "lora.rank" in dict(error.problems)
