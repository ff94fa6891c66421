"""The training data of a recipe, through `datasets`, in the formats TRL's trainers take.

Formats (TRL's names): text ("text" column), prompt_completion ("prompt" + "completion"),
messages (a "messages" list of {role, content}). `data.fields` renames the user's columns to
these names; `format: auto` picks the format from the columns. Problems are reported before
any model is loaded, naming the field and the columns the data has.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetNotFoundError

from ftune.errors import DataError
from ftune.recipe import DATA_FILE_SUFFIXES, Recipe, looks_like_local_path

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def load_training_data(recipe: Recipe) -> tuple[Dataset, str]:
    """The dataset renamed to its format's columns, and that format."""
    data = recipe.data
    dataset = _load(recipe)
    renames = {column: name for name, column in data.fields.items() if column != name}
    missing = sorted(set(renames) - set(dataset.column_names))
    if missing:
        raise DataError(
            f"data.fields names column(s) {missing} that {data.source} does not have.",
            hint=f"Its columns are {dataset.column_names}.",
        )
    dataset = dataset.rename_columns(renames)
    data_format = detect_format(dataset.column_names, data.format, source=data.source)
    if data.limit is not None:
        dataset = dataset.select(range(min(data.limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"data.source {data.source} has no rows in split '{data.split}'.",
                        hint="Check the file and data.split.")
    extra = [c for c in dataset.column_names if c not in FORMAT_COLUMNS[data_format]]
    return dataset.remove_columns(extra), data_format


def detect_format(columns: list[str], requested: str, *, source: str) -> str:
    if requested != "auto":
        needed = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
        if needed:
            raise DataError(
                f"data.format is {requested}, but {source} has no {', '.join(repr(c) for c in needed)} column "
                f"(its columns: {columns}).",
                hint="Map your columns with data.fields, e.g. fields: {" + f"{needed[0]}: your_column" + "}.",
            )
        return requested
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    raise DataError(
        f"data.source {source} has columns {columns}, which match no format: a 'text' column, "
        "'prompt' and 'completion', or 'messages'.",
        hint="Map your columns with data.fields, e.g. fields: {text: body}, or set data.format.",
    )


def _load(recipe: Recipe) -> Dataset:
    data = recipe.data
    source = recipe.resolve_input(data.source)
    path = Path(source)
    try:
        if path.is_file():
            builder = DATA_FILE_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"data.source {path} is a {path.suffix or 'suffix-less'} file.",
                    hint=f"Use one of {', '.join(sorted(DATA_FILE_SUFFIXES))}, or a folder of them.",
                )
            loaded = load_dataset(builder, data_files={data.split: str(path)}, split=data.split)
        elif path.is_dir():
            loaded = load_dataset(str(path), split=data.split)
        elif looks_like_local_path(data.source):
            raise DataError(f"data.source: path does not exist: {path}",
                            hint="Relative paths are resolved against the recipe's folder.")
        else:
            loaded = load_dataset(source, split=data.split)
    except DataError:
        raise
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as error:
        raise DataError(
            f"data.source '{data.source}' could not be loaded: {_first_line(error)}",
            hint="Give a local .json/.jsonl/.parquet/.csv file or folder, or a hub dataset id while online.",
        ) from None
    except Exception as error:
        # datasets and pyarrow raise many types for malformed or empty files (even StopIteration):
        # whatever the reader raised, the file is what the user must look at.
        raise DataError(
            f"data.source '{data.source}' (split '{data.split}') could not be read: "
            f"{type(error).__name__}: {_first_line(error)}",
            hint="Check that the file is well-formed (one JSON object per line for .jsonl) and has rows.",
        ) from None
    if isinstance(loaded, DatasetDict):  # pragma: no cover - split= always gives a Dataset
        loaded = loaded[data.split]
    return loaded


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
