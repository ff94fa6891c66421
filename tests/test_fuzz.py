"""Property-based: mutated recipes and corrupted datasets end in a clear error or a successful
validation, never in an unexpected exception (which the CLI would show as a bug)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftune.checks import environment_problems
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
        validate_recipe(raw, base_dir=REPO / "recipes", environment_checks=environment_problems)
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


# --------------------------------------------------------------------------------------------
# `ftune validate` on drawn recipe values: types, ranges, combinations and paths. Whatever is
# drawn, the command ends in a ✓ (exit 0, perhaps with warnings) or a recipe error (exit 2),
# never in "a bug in ftune" or a traceback. In-process, and validate loads no model: 500 draws
# take seconds.

EDGE_INTS = st.sampled_from([0, 1, -1, 7, 8, 64, 4096, 2**31, 2**32 - 1, 2**32, 2**63, -(2**63), 10**30])
NUMBERS = (st.integers(-(2**40), 2**40) | EDGE_INTS | st.floats()
           | st.sampled_from([0.0, 1e-30, 1e-2, 0.1, 1e30, -0.0, float("inf"), float("nan")]))
ANY = NUMBERS | SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(st.text(max_size=6), SCALARS, max_size=2)
PATHS = st.sampled_from([
    "/proc/ftune/out", "/proc", "/", "", ".", "..", "runs/x", "~/ftune-fuzz-never", "/nonexistent/deep/x",
    "a\x00b", "plain.txt", "plain.txt/run", "sub dir/ünï cödé", "x" * 300, "[bold]x[/]", "C:\\runs",
]) | st.text(max_size=20)
NAMES = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
                         "embed_tokens", "mlp", "self_attn.q_proj", "not_a_module", "", "*", "all-linear"])
# only modules safe to import in the test process (importing a module runs its code)
REWARDS = st.sampled_from(["exact_answer", "format", "length_penalty", "os:getcwd", "json:dumps", "math:sqrt",
                           "builtins:print", "no_such_module_x:f", "os.path:join", "ftune.workflows.rewards:exact_answer",
                           "ftune.workflows.rewards:format_reward", "ftune:nothing", "not a reward", ""])
FIELDS: dict[tuple[str, str], st.SearchStrategy] = {
    ("model", "preset"): st.sampled_from(["tiny-llama", "tiny-qwen2", "tiny-qwen3", "llama-3.1-8b", "llama-3.1-8",
                                          "", None]) | ANY,
    ("model", "name_or_path"): PATHS | st.sampled_from(["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "org/unknown",
                                                        None]),
    ("model", "tokenizer"): PATHS | st.none(),
    ("model", "adapter"): PATHS | st.none(),
    ("model", "trust_remote_code"): st.booleans() | ANY,
    ("model", "dtype"): st.sampled_from(["auto", "bfloat16", "float8"]) | ANY,
    ("quantization", "method"): st.sampled_from(["nf4", "fp4", "none", "int8"]) | ANY,
    ("lora", "r"): NUMBERS | ANY,
    ("lora", "alpha"): NUMBERS,
    ("lora", "dropout"): NUMBERS,
    ("lora", "use_rslora"): st.booleans(),
    ("lora", "target_modules"): st.lists(NAMES | st.text(max_size=10), max_size=4) | st.just("all-linear") | ANY,
    ("checkpointing", "mode"): st.sampled_from(["none", "true", "unsloth", "smart", True, False, None]) | ANY,
    ("checkpointing", "budget"): st.sampled_from(["24GiB", "0", "-1GiB", "lots", "1e400GiB"]) | ANY,
    ("workflow",): st.sampled_from(["sft", "dpo", "grpo"]) | ANY,
    ("grpo", "rewards"): st.lists(REWARDS, max_size=3) | ANY,
    ("grpo", "reward_weights"): st.lists(NUMBERS, max_size=3) | st.none(),
    ("grpo", "num_generations"): NUMBERS,
    ("data", "source"): PATHS,
    ("data", "format"): st.sampled_from(["auto", "text", "messages", "prompt", "preference"]) | ANY,
    ("data", "max_length"): NUMBERS,
    ("data", "fields"): st.dictionaries(st.sampled_from(["text", "prompt", "promt"]), st.text(max_size=5), max_size=2),
    ("data", "limit"): NUMBERS | st.none(),
    ("training", "seed"): NUMBERS,
    ("training", "learning_rate"): NUMBERS,
    ("training", "max_grad_norm"): NUMBERS,
    ("training", "batch_size"): NUMBERS,
    ("training", "grad_accum"): NUMBERS,
    ("training", "max_steps"): NUMBERS | st.none(),
    ("training", "epochs"): NUMBERS | st.none(),
    ("training", "warmup_steps"): NUMBERS,
    ("training", "lr_scheduler"): st.sampled_from(["constant", "cosine", "linear", "exponential"]),
    ("training", "output_dir"): PATHS,
    ("training", "save_steps"): NUMBERS | st.none(),
    ("distributed", "strategy"): st.sampled_from(["ddp", "fsdp", "zero3"]),
}
KEYS_DRAWN = sorted(FIELDS)
_QUICKSTART = quickstart_dict()  # parsed once: its YAML takes 14 ms to read
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's, where built: 10 ms less per draw


@st.composite
def recipe_files(draw) -> tuple[dict, str]:
    """A quickstart recipe with 1-6 values drawn, and how the recipe is named on the command line."""
    data = copy.deepcopy(_QUICKSTART)
    for key in draw(st.lists(st.sampled_from(KEYS_DRAWN), min_size=1, max_size=6)):  # a repeat draws anew
        value = draw(FIELDS[key])
        if len(key) == 1:
            data[key[0]] = value
        else:
            section = data.setdefault(key[0], {})
            if isinstance(section, dict):
                section[key[1]] = value
    return data, draw(st.sampled_from(["file"] * 18 + ["folder", "missing"]))


@lru_cache(maxsize=1)
def _ftune_command():
    """The click command typer builds from ftune's app, built once (typer rebuilds it on each call
    of the entry point, 12 ms that would triple the test's time)."""
    import typer

    from ftune.cli import _quiet_libraries, app

    _quiet_libraries()
    return typer.main.get_command(app)


@given(recipe_files())
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_validate_on_drawn_recipes_never_blames_ftune(drawn):
    """Run as the entry point runs it (ftune.cli.main), less its handler for unexpected errors: an
    exception other than typer's exit fails the test with its traceback (main would print it as "a
    bug in ftune")."""
    data, named_as = drawn
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "plain.txt").write_text("x")
        path = Path(folder) / "recipe.yaml"
        path.write_text(yaml.dump(data, Dumper=DUMPER, allow_unicode=True))
        argument = {"file": str(path), "folder": folder, "missing": str(Path(folder) / "no.yaml")}[named_as]
        output, cwd = io.StringIO(), os.getcwd()
        os.chdir(folder)  # relative output folders land in the draw's folder
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                code = _ftune_command().main(["validate", argument], prog_name="ftune", standalone_mode=False)
        finally:
            os.chdir(cwd)
    text = output.getvalue()
    assert "Traceback" not in text, text
    assert code in (None, 0, 2), (code, text)
    assert ("✓" in text) == (code in (None, 0)), text
