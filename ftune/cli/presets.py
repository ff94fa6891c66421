"""`ftune presets`: the model shapes that ship with ftune."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ftune.cli.app import app
from ftune.presets import PRESETS


@app.command()
def presets() -> None:
    """List the built-in model shapes (usable as `model: {preset: NAME}`)."""
    table = Table(title="ftune presets (random weights, the shape of a public model)")
    for column in ("preset", "family", "layers", "hidden", "intermediate", "heads / kv", "vocab", "tied"):
        table.add_column(column, no_wrap=column == "preset")
    for name, shape in PRESETS.items():
        table.add_row(
            name, shape["model_type"], str(shape["num_hidden_layers"]), str(shape["hidden_size"]),
            str(shape["intermediate_size"]), f"{shape['num_attention_heads']} / {shape['num_key_value_heads']}",
            str(shape["vocab_size"]), "yes" if shape.get("tie_word_embeddings") else "no",
        )
    Console().print(table)
