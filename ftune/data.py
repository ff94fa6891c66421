"""The training data of a recipe, through `datasets`, in the formats TRL's trainers take.

Formats (TRL's names): text ("text" column), prompt_completion ("prompt" + "completion"),
messages (a "messages" list of {role, content}). `data.fields` renames the user's columns to
these names; `format: auto` picks the format from the columns. Problems are reported before
any model is loaded, naming the field and the columns the data has.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetNotFoundError

from ftune.errors import DataError, first_line
from ftune.formats import FORMAT_COLUMNS, detect_format, json_file_problem
from ftune.recipe import DATA_FILE_SUFFIXES, Recipe, looks_like_local_path



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
    data_format = detect_format(dataset.column_names, data.format, source=data.source, workflow=recipe.workflow)
    check_misspelt_columns(dataset, data_format, recipe)
    if data.limit is not None:
        dataset = dataset.select(range(min(data.limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"data.source {data.source} has no rows in split '{data.split}'.",
                        hint="Check the file and data.split.")
    if data_format == "prompt":
        return dataset, data_format  # GRPO hands every column to the reward functions (e.g. `answer`)
    keep = FORMAT_COLUMNS[data_format] + (("prompt",) if data_format == "preference" else ())
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep]), data_format


def check_misspelt_columns(dataset: Dataset, data_format: str, recipe: Recipe) -> None:
    """A DataError for the first row that lacks a column its format needs but has one of a close
    name ('promt' for 'prompt'): a misspelt key, not an empty row to drop without a word."""
    needed = FORMAT_COLUMNS[data_format]
    others = [c for c in dataset.column_names if c not in needed and c not in ("prompt", "answer")]
    suspects = {name: [c for c in others if difflib.get_close_matches(name, [c], n=1, cutoff=0.6)] for name in needed}
    if not any(suspects.values()):
        return
    data = recipe.data
    table = dataset.data.table.slice(0, data.limit) if data.limit is not None else dataset.data.table
    for name, columns in suspects.items():
        for column in columns:
            # rows where the needed column is null and the close one holds a value
            hits = (table.column(name).is_null().to_pylist(), table.column(column).is_valid().to_pylist())
            rows = [i for i, (missing, present) in enumerate(zip(*hits)) if missing and present]
            if not rows:
                continue
            more = f" (and {len(rows) - 1} more row{'s' if len(rows) > 2 else ''})" if len(rows) > 1 else ""
            raise DataError(
                f"data.source {data.source}, {_row_name(recipe, rows[0])}{more}: no '{name}' but a column "
                f"'{column}' — a misspelling of '{name}'? {data_format} rows need "
                f"{' and '.join(repr(c) for c in needed)}.",
                hint=f"Rename '{column}' to '{name}' in those rows; a row without '{name}' would be dropped as empty.")


def _row_name(recipe: Recipe, index: int) -> str:
    """'row N', with its line in a .jsonl file (rows are its non-blank lines)."""
    path = Path(recipe.resolve_input(recipe.data.source))
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return f"row {index}"
    with path.open("rb") as lines:
        rows = (number for number, line in enumerate(lines, 1) if line.strip())
        line = next((number for row, number in enumerate(rows) if row == index), None)
    return f"row {index} (line {line})" if line is not None else f"row {index}"


@dataclass
class RowReport:
    """What checking the rows found: rows kept, empty rows dropped, rows over max_length."""

    rows: int
    empty_dropped: int
    too_long: int
    too_long_policy: str
    longest: int

    def describe(self, max_length: int) -> str:
        parts = [f"{self.rows} rows"]
        if self.empty_dropped:
            parts.append(f"{self.empty_dropped} empty dropped")
        if self.too_long:
            action = {"truncate": "truncated", "drop": "dropped"}[self.too_long_policy]
            parts.append(f"{self.too_long} longer than max_length {max_length} {action} (longest {self.longest})")
        return ", ".join(parts)


_MESSAGES_HINT = 'A chat value looks like [{"role": "user", "content": "..."}, ...].'


def _is_empty_value(value, column: str, index: int, source: str) -> bool:
    """Whether a text or chat value is empty; a value of any other type is a DataError."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        for turn in value:
            if not isinstance(turn, dict) or "role" not in turn or not isinstance(turn.get("content"), str):
                raise DataError(
                    f"data.source {source}, row {index}: '{column}' must be text or a list of {{role, content}} "
                    f"with text content; found {str(turn)[:80]!r}.", hint=_MESSAGES_HINT)
        return all(not turn["content"].strip() for turn in value)
    raise DataError(
        f"data.source {source}, row {index}: '{column}' must be text or a list of {{role, content}}, found "
        f"{type(value).__name__} {str(value)[:60]!r}.",
        hint=f"Convert that column, or map another column with data.fields. {_MESSAGES_HINT}")


def _is_empty(row: dict, data_format: str, index: int, source: str) -> bool:
    if data_format == "messages" and row["messages"] is not None and not isinstance(row["messages"], list):
        _is_empty_value(row["messages"], "messages", index, source)  # raises: a chat must be a list
    if data_format == "text" and row["text"] is not None and not isinstance(row["text"], str):
        raise DataError(f"data.source {source}, row {index}: column 'text' must hold text, found "
                        f"{type(row['text']).__name__} {str(row['text'])[:60]!r}.",
                        hint="Convert that column to strings, or map another column with data.fields.")
    columns = FORMAT_COLUMNS[data_format]
    empty = any(_is_empty_value(row[column], column, index, source) for column in columns)
    # TRL reads a row as text or as a chat, not both: a text prompt with a chat completion is neither
    parts = {c: row[c] for c in columns + (("prompt",) if data_format == "preference" else ()) if row.get(c)}
    if len({isinstance(value, list) for value in parts.values()}) > 1:
        kinds = ", ".join(f"'{c}' is {'a chat' if isinstance(v, list) else 'text'}" for c, v in parts.items())
        raise DataError(f"data.source {source}, row {index}: {kinds}; a row's columns must all be text or all "
                        "be chats.", hint=f"Convert the row's columns to one kind. {_MESSAGES_HINT}")
    return empty


def _length(value, tokenizer) -> int:
    if isinstance(value, list):
        return len(tokenizer.apply_chat_template(value, tokenize=True, return_dict=False))
    return len(tokenizer(value)["input_ids"])


def _token_length(row: dict, data_format: str, tokenizer) -> int:
    if data_format == "messages":
        return _length(row["messages"], tokenizer)
    if data_format == "prompt_completion":
        if isinstance(row["prompt"], list):  # a chat: the template, as TRL applies it
            return _length(row["prompt"] + row["completion"], tokenizer)
        return len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1
    if data_format == "preference":
        prompt = _length(row["prompt"], tokenizer) if row.get("prompt") else 0
        return prompt + max(_length(row["chosen"], tokenizer), _length(row["rejected"], tokenizer))
    if data_format == "prompt":
        return _length(row["prompt"], tokenizer)
    return len(tokenizer(row["text"])["input_ids"]) + 1  # TRL appends the end-of-sequence token


def check_rows(dataset: Dataset, data_format: str, tokenizer, recipe: Recipe) -> tuple[Dataset, RowReport]:
    """Drop empty rows, reject malformed ones, and apply data.too_long to rows over max_length."""
    data = recipe.data
    empty = [i for i, row in enumerate(dataset) if _is_empty(row, data_format, i, data.source)]
    if empty:
        keep = sorted(set(range(len(dataset))) - set(empty))
        dataset = dataset.select(keep)
    if len(dataset) == 0:
        raise DataError(f"data.source {data.source}: every row is empty.", hint="Check the file's columns and rows.")
    lengths = [_token_length(row, data_format, tokenizer) for row in dataset]
    over = [i for i, length in enumerate(lengths) if length > data.max_length]
    if over and data.too_long == "error":
        raise DataError(
            f"data.source {data.source}: {len(over)} of {len(dataset)} rows are longer than data.max_length "
            f"{data.max_length} tokens (the longest has {max(lengths)}; rows {over[:5]}...).",
            hint="Raise data.max_length, or set data.too_long to truncate or drop.",
        )
    if over and data.too_long == "drop":
        dataset = dataset.select(sorted(set(range(len(dataset))) - set(over)))
        if len(dataset) == 0:
            raise DataError(f"data.source {data.source}: every row is longer than data.max_length {data.max_length}.",
                            hint="Raise data.max_length.")
    report = RowReport(rows=len(dataset), empty_dropped=len(empty), too_long=len(over),
                       too_long_policy=data.too_long, longest=max(lengths))
    return dataset, report


def truncate_tokenized(dataset: Dataset, max_length: int) -> Dataset:
    """Tokenized rows (input_ids, labels) cut to their first max_length tokens, and rows left
    without a label dropped, as TRL's SFTTrainer does to the rows it pads. TRL leaves padding-free
    rows whole (it takes no max_length for them), so ftune cuts them here."""
    def cut(row):
        return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}

    dataset = dataset.map(cut, desc="Truncating to data.max_length")
    return dataset.filter(lambda row: any(label != -100 for label in row["labels"]))


def eval_data(recipe: Recipe, dataset: Dataset, data_format: str, tokenizer
              ) -> tuple[Dataset, Dataset | None, RowReport | None]:
    """(training rows, evaluation rows or None, the eval source's row report or None) for data.eval:
    a fraction of the checked training rows held out with training.seed, or another source read and
    checked as data.source is (its split: data.eval_split, else data.split), in the same format."""
    held = recipe.data.eval
    if held is None:
        return dataset, None, None
    if isinstance(held, float):
        count = int(len(dataset) * held)
        if count < 1 or count >= len(dataset):
            raise DataError(f"data.eval {held}: {held:.0%} of the {len(dataset)} training rows is {count} rows, "
                            "which leaves no eval or no training rows.",
                            hint="Hold out a fraction that gives at least one row of each, or give an eval file.")
        split = dataset.train_test_split(test_size=count, seed=recipe.training.seed, shuffle=True)
        return split["train"], split["test"], None
    eval_recipe = recipe.model_copy(deep=True)
    eval_recipe.data.source = held
    eval_recipe.data.split = recipe.data.eval_split or recipe.data.split
    eval_recipe.data.eval = None
    evaluation, eval_format = load_training_data(eval_recipe)
    if eval_format != data_format:
        raise DataError(f"data.eval {held} is {eval_format} data, but data.source is {data_format}.",
                        hint="Evaluate on data of the training data's format (map its columns with data.fields, "
                        "which applies to both).")
    evaluation, report = check_rows(evaluation, data_format, tokenizer, eval_recipe)
    return dataset, evaluation, report


def _load(recipe: Recipe) -> Dataset:
    data = recipe.data
    source = recipe.resolve_input(data.source)
    path = Path(source)
    try:
        # nothing, blanks, or a byte-order mark alone
        if path.is_file() and path.stat().st_size < 4096 and not path.read_bytes().replace(b"\xef\xbb\xbf", b"").strip():
            raise DataError(f"data.source {path} is empty: it holds no rows.",
                            hint="Point data.source at the file that holds your data, e.g. one JSON object per "
                            'line for .jsonl: {"text": "..."}.')
        if path.is_file():
            builder = DATA_FILE_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"data.source {path} is a {path.suffix or 'suffix-less'} file.",
                    hint=f"Use one of {', '.join(sorted(DATA_FILE_SUFFIXES))}, or a folder of them.",
                )
            with _quiet_readers():
                loaded = load_dataset(builder, data_files={data.split: str(path)}, split=data.split)
        elif path.is_dir():
            with _quiet_readers():
                loaded = load_dataset(str(path), split=data.split)
        elif looks_like_local_path(data.source):
            raise DataError(f"data.source: path does not exist: {path}",
                            hint="Relative paths are resolved against the recipe's folder.")
        else:
            loaded = load_dataset(source, data.subset, split=data.split)
    except DataError:
        raise
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as error:
        raise DataError(
            f"data.source '{data.source}' could not be loaded: {first_line(error)}",
            hint="Give a local .json/.jsonl/.parquet/.csv file or folder, or a hub dataset id while online.",
        ) from None
    except Exception as error:
        # datasets and pyarrow raise many types for malformed or empty files (even StopIteration):
        # whatever the reader raised, the file is what the user must look at. A JSON file is read
        # again line by line to name the line; datasets' own error only says "An error occurred
        # while generating the dataset", its cause the row within a block.
        try:
            bad = _first_bad_json(path)
        except OSError:
            bad = None
        if bad is not None:
            file, where, problem = bad
            raise DataError(f"data.source {file}, {where}: {problem}.",
                            hint="Fix or delete that line: each line of a .jsonl file is one JSON object, "
                            'e.g. {"text": "..."}.' if where.startswith("line") else
                            "Fix the file: a .json file is one JSON array of objects, or one object per line.") from None
        cause = error.__cause__ or error.__context__ or error
        raise DataError(
            f"data.source '{data.source}' (split '{data.split}') could not be read: "
            f"{type(cause).__name__}: {first_line(cause)}",
            hint="Check that the file is well-formed (one JSON object per line for .jsonl) and has rows.",
        ) from None
    if isinstance(loaded, DatasetDict):  # pragma: no cover - split= always gives a Dataset
        loaded = loaded[data.split]
    return loaded


@contextlib.contextmanager
def _quiet_readers():
    """datasets' file readers log the error they then raise; ftune reports it once, with its line."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_bad_json(path: Path) -> tuple[Path, str, str] | None:
    """(file, 'line N', what is wrong) for the first line of a JSON data file (or of one in a folder)
    that is not a JSON object; None when every line is one, or the source is not JSON."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl")) if path.is_dir() else [path]
    for file in files:
        if file.suffix.lower() in (".json", ".jsonl") and file.is_file():
            problem = json_file_problem(file)
            if problem is not None:
                return file, *problem
    return None
