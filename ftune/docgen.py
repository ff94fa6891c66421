"""Generate docs/recipes.md from the recipe schema: `python -m ftune.docgen > docs/recipes.md`.

A test checks the file against this output, so the reference never drifts from the code.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ftune.recipe import Recipe

INTRO = """# Recipe reference

A recipe is a YAML file of sections. Every key is listed here with its type, default and meaning;
unknown keys are errors. Paths to inputs (model, tokenizer, data) are resolved against the recipe
file's folder; `training.output_dir` is relative to where you run `ftune`. Any key can be set
from the command line: `ftune train RECIPE --set training.max_steps=20 --set lora.r=8`.

This file is generated from `ftune/recipe.py` by `python -m ftune.docgen`.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return ""
    return f"`{value}`" if value is not None else "`null`"


def recipe_reference() -> str:
    lines = [INTRO]
    top = [(name, f) for name, f in Recipe.model_fields.items()
           if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))]
    lines += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in top:
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
    lines.append("")
    for name, field in Recipe.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            continue
        lines += [f"## `{name}`", "", (section.__doc__ or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, sub in section.model_fields.items():
            lines.append(f"| `{name}.{key}` | {_type_name(sub.annotation)} | {_default(sub)} | {sub.description or ''} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(recipe_reference(), end="")
