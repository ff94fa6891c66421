"""Data loading: local json/jsonl/parquet/csv, column renames, format detection, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ftune.data import load_training_data
from ftune.errors import DataError
from ftune.recipe import validate_recipe
from tests.test_recipe import quickstart_dict


def recipe_for(tmp_path, source, **data):
    raw = quickstart_dict()
    raw["data"] = {"source": str(source), **data}
    return validate_recipe(raw, base_dir=tmp_path)


ROWS = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(5)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_with_renamed_fields(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    recipe = recipe_for(tmp_path, path, fields={"prompt": "question", "completion": "answer"})
    dataset, data_format = load_training_data(recipe)
    assert data_format == "prompt_completion"
    assert dataset.column_names == ["prompt", "completion"]  # unused columns dropped
    assert dataset[3] == {"prompt": "q3", "completion": "a3"}


def test_formats_are_detected(tmp_path):
    cases = {
        "text": [{"text": "hello"}],
        "messages": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
        "prompt_completion": [{"prompt": "p", "completion": "c"}],
    }
    for expected, rows in cases.items():
        path = tmp_path / f"{expected}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        assert load_training_data(recipe_for(tmp_path, path))[1] == expected


def test_limit(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": str(i)}) for i in range(10)) + "\n")
    dataset, _ = load_training_data(recipe_for(tmp_path, path, limit=3))
    assert len(dataset) == 3


def test_unmatched_columns_name_the_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    pd.DataFrame(ROWS).to_json(path, orient="records", lines=True)
    with pytest.raises(DataError, match="question"):
        load_training_data(recipe_for(tmp_path, path))
    with pytest.raises(DataError, match="'completion'"):
        load_training_data(recipe_for(tmp_path, path, format="prompt_completion", fields={"prompt": "question"}))
    with pytest.raises(DataError, match="nope"):
        load_training_data(recipe_for(tmp_path, path, fields={"text": "nope"}))


def test_malformed_and_unsupported_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl"):
        load_training_data(recipe_for(tmp_path, bad))
    for text in ("", "\n  \n", "\ufeff\n"):
        empty = tmp_path / "empty.jsonl"
        empty.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match="empty.jsonl is empty: it holds no rows"):
            load_training_data(recipe_for(tmp_path, empty))


def test_hub_id_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not be loaded"):
        load_training_data(recipe_for(tmp_path, "some-org/some-dataset-that-is-not-cached"))


def _tokenizer():
    from ftune.model import load_tokenizer
    from ftune.recipe import load_recipe
    from tests.conftest import QUICKSTART

    return load_tokenizer(load_recipe(QUICKSTART))


def test_empty_rows_are_dropped_and_long_rows_counted(tmp_path):
    from ftune.data import check_rows

    path = tmp_path / "t.jsonl"
    rows = [{"text": "short"}, {"text": "   "}, {"text": "word " * 50}, {"text": None}, {"text": "fine too"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tokenizer = _tokenizer()
    for policy, kept in (("truncate", 3), ("drop", 2)):
        recipe = recipe_for(tmp_path, path, max_length=16, too_long=policy)
        dataset, data_format = load_training_data(recipe)
        checked, report = check_rows(dataset, data_format, tokenizer, recipe)
        assert (report.empty_dropped, report.too_long, len(checked)) == (2, 1, kept)
        assert report.longest > 16
    recipe = recipe_for(tmp_path, path, max_length=16, too_long="error")
    with pytest.raises(DataError, match="longer than data.max_length 16"):
        check_rows(*load_training_data(recipe), tokenizer, recipe)


def test_malformed_messages_name_the_row(tmp_path):
    from ftune.data import check_rows

    path = tmp_path / "m.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user", "content": 5}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = recipe_for(tmp_path, path)
    with pytest.raises(DataError, match="row 1"):
        check_rows(*load_training_data(recipe), _tokenizer(), recipe)


def test_prompt_completion_rows_are_text_or_chats_not_both(tmp_path):
    """A chat prompt-completion row is measured with the chat template; a row mixing a text prompt
    with a chat completion is a DataError naming the row and its columns (hypothesis found it as a
    TypeError traceback)."""
    from ftune.data import check_rows

    chat = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(chat) + "\n")
    recipe = recipe_for(tmp_path, path)
    checked, report = check_rows(*load_training_data(recipe), _tokenizer(), recipe)
    assert report.rows == 1 and report.longest > 0

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "say hi", "completion": chat["completion"]}) + "\n")
    recipe = recipe_for(tmp_path, mixed)
    with pytest.raises(DataError, match=r"row 0: 'prompt' is text, 'completion' is a chat"):
        check_rows(*load_training_data(recipe), _tokenizer(), recipe)


def test_broken_json_line_names_the_file_and_line_once(tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{not json\n{"text": "x"}\n')
    with pytest.raises(DataError) as caught:
        load_training_data(recipe_for(tmp_path, bad))
    assert "bad.jsonl" in caught.value.message and "line 4" in caught.value.message
    assert "not valid JSON" in caught.value.message and "{not json" in caught.value.message
    assert "Failed to load JSON" not in capfd.readouterr().err  # datasets' own log line is not printed


@pytest.mark.parametrize("text, where", [
    ('[{"text": "a"},\n {"text": b}]', "line 2, column 11"),
    ('{"text": "a"}\n[1, 2]\n', "line 2: a JSON list"),
])
def test_malformed_json_file_names_the_line(tmp_path, text, where):
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError, match=where):
        load_training_data(recipe_for(tmp_path, path))


def test_misspelt_field_is_named_not_dropped_as_empty(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "a", "completion": "b"}, {"promt": "c", "completion": "d"}, {"prompt": "e", "completion": "f"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as caught:
        load_training_data(recipe_for(tmp_path, path))
    message = caught.value.message
    assert "row 1 (line 2)" in message and "'promt'" in message and "'prompt' and 'completion'" in message
    # past data.limit the row is not read, and so not an error
    assert len(load_training_data(recipe_for(tmp_path, path, limit=1))[0]) == 1


def test_misspelt_field_in_every_row_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"promt": "c", "completion": "d"}) + "\n")
    with pytest.raises(DataError, match="'promt' looks like a misspelling of 'prompt'"):
        load_training_data(recipe_for(tmp_path, path))
