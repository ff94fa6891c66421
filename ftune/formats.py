"""The data formats TRL's trainers take, and a JSON data file read as rows: without `datasets`.

Formats (TRL's names): text ("text" column), prompt_completion ("prompt" + "completion"),
messages (a "messages" list of {role, content}), preference ("chosen" + "rejected", with or
without a "prompt") and prompt. `ftune.data` loads the data through `datasets`; `ftune validate`
(ftune.checks.data_problem) reads a local JSON file here, with the same rules, and imports neither
datasets nor torch.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path

from ftune.errors import DataError

# The columns each format needs (TRL's names); a preference row may also carry a prompt.
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "prompt": ("prompt",),
}
WORKFLOW_FORMATS = {"sft": ("messages", "prompt_completion", "text"), "dpo": ("preference",), "grpo": ("prompt",)}


def detect_format(columns: list[str], requested: str, *, source: str, workflow: str = "sft") -> str:
    """The data's format: the requested one (checked), or the first of the workflow's that matches."""
    if requested != "auto":
        needed = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
        if needed:
            raise DataError(
                f"data.format is {requested}, but {source} has no {', '.join(repr(c) for c in needed)} column "
                f"(its columns: {columns}).",
                hint="Map your columns with data.fields, e.g. fields: {" + f"{needed[0]}: your_column" + "}.",
            )
        return requested
    for name in WORKFLOW_FORMATS[workflow]:
        if all(c in columns for c in FORMAT_COLUMNS[name]):
            return name
    wanted = {"sft": "a 'text' column, 'prompt' and 'completion', or 'messages'",
              "dpo": "'chosen' and 'rejected' (and optionally 'prompt')", "grpo": "a 'prompt' column"}[workflow]
    names = sorted({c for name in WORKFLOW_FORMATS[workflow] for c in FORMAT_COLUMNS[name]})
    close = [(c, match[0]) for c in columns if c not in names
             for match in [difflib.get_close_matches(c, names, n=1, cutoff=0.6)] if match]
    misspelt = "".join(f" '{c}' looks like a misspelling of '{name}'." for c, name in close)
    raise DataError(
        f"data.source {source} has columns {columns}; the {workflow} workflow needs {wanted}.{misspelt}",
        hint="Map your columns with data.fields, e.g. fields: {chosen: good, rejected: bad}, or set data.format.",
    )


# --------------------------------------------------------------------------------------------
# A JSON data file's rows

LARGEST_SCANNED_DATA = 64 * 2**20  # the rows of larger files are checked when training loads them


Rows = list[tuple[int | None, frozenset[str]]]  # each row's line (None in an array) and columns with a value


def json_file_problem(path: Path) -> tuple[str, str] | None:
    """('line N', what is wrong) for the first place a JSON data file is not rows of JSON objects."""
    return read_json_rows(path)[0]


def read_json_rows(path: Path) -> tuple[tuple[str, str] | None, list[str], Rows]:
    """A JSON data file's first problem, columns and rows (scan_json), read once while the file is unchanged."""
    stat = path.stat()
    return scan_json(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def scan_json(path: str, size: int, mtime: int) -> tuple[tuple[str, str] | None, list[str], Rows]:
    """The first problem of a JSON data file, its columns, and each row's columns with a value: one
    JSON array of objects, or one object per line, as datasets reads .jsonl and most .json (a .json
    that is one object is datasets' to read: no rows known)."""
    file = Path(path)
    columns: dict[str, None] = {}
    rows: Rows = []

    keep = size <= LARGEST_SCANNED_DATA  # the rows of larger files are not checked, nor held

    def add(line: int | None, value: dict) -> None:
        columns.update(dict.fromkeys(value))
        if keep:
            rows.append((line, frozenset(key for key, item in value.items() if item is not None)))

    if file.suffix.lower() == ".json":
        text = file.read_bytes()
        try:
            whole = json.loads(text)
        except UnicodeDecodeError:
            return ("the file", "is not UTF-8 text"), [], []
        except json.JSONDecodeError as error:
            if text.lstrip()[:1] == b"[":
                return (f"line {error.lineno}, column {error.colno}", f"not valid JSON ({error.msg})"), [], []
            whole = None  # perhaps one object per line
        if isinstance(whole, list):
            for index, value in enumerate(whole):
                if not isinstance(value, dict):
                    return (f"item {index}", f"a JSON {type(value).__name__}, not an object of columns"), [], []
                add(None, value)
            return None, list(columns), rows
        if whole is not None:
            return None, [], []
    with file.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except UnicodeDecodeError:
                return (f"line {number}", "is not UTF-8 text"), [], []
            except json.JSONDecodeError as error:
                return (f"line {number}", f"not valid JSON ({error.msg} at column {error.colno}): "
                        f"{line.decode('utf-8', 'replace').strip()[:60]!r}"), [], []
            if not isinstance(value, dict):
                return (f"line {number}", f"a JSON {type(value).__name__}, not an object of columns"), [], []
            add(number, value)
    return None, list(columns), rows
