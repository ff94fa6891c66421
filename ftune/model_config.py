"""A recipe's model config (config.json as a dict), read without weights and without torch.

`ftune validate`, `estimate-vram`, the checks and ftune.plan.resolve read a model's type, sizes
and module names from it. Where it is found, in order: the preset, a local folder's config.json,
the hub's cache, the preset of a well-known hub id (ftune.known_models). `local_model_config`
never reaches the network; `model_config` asks the hub as a last resort (transformers, online).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.errors import ModelError, first_line
from ftune.known_models import TEXT_PART_ONLY, preset_for
from ftune.presets import PRESETS
from ftune.recipe import Recipe


@dataclass(frozen=True)
class ModelConfig:
    """A model's config, and where it came from."""

    label: str  # the preset or path it came from, for messages
    values: dict[str, Any]
    whole: bool = True  # False where it describes only the text part of a larger model

    @property
    def model_type(self) -> str | None:
        """transformers' model_type, which names the family (ftune.families)."""
        return self.values.get("model_type")


def local_model_config(recipe: Recipe) -> ModelConfig | None:
    """The recipe's model config when it is on this machine (or is a well-known id's preset), else None."""
    model = recipe.model
    if (model.preset is None) == (model.name_or_path is None):
        return None
    if model.preset is not None:
        return ModelConfig(model.preset, dict(PRESETS[model.preset]))
    source = recipe.resolve_input(model.name_or_path)
    local = Path(source) / "config.json"
    try:
        if local.is_file():
            return ModelConfig(source, json.loads(local.read_text()))
        if Path(source).exists():
            return None  # a folder without config.json: the path checks and loading report it
    except (OSError, ValueError):
        return None
    cached = _cached_hub_config(source, model.revision)
    if cached is not None:
        return ModelConfig(source, cached)
    preset = preset_for(source)
    if preset is not None:  # no hub request, and no retries for half a minute offline
        return ModelConfig(source, dict(PRESETS[preset]), whole=source.lower() not in TEXT_PART_ONLY)
    return None


def model_config(recipe: Recipe) -> ModelConfig:
    """The recipe's model config: on this machine, else from the hub (online); ModelError if neither."""
    found = local_model_config(recipe)
    if found is not None:
        return found
    model = recipe.model
    source = recipe.resolve_input(model.name_or_path or "")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"model.name_or_path: no config reachable for '{source}' ({first_line(error)}).",
            hint="Estimate offline with a preset of the same shape (--set model.name_or_path=null "
            "--set model.preset=llama-3.1-8b), or a local folder with config.json; `ftune presets` lists them.",
        ) from None
    return ModelConfig(source, config.to_dict())


def _cached_hub_config(repo_id: str, revision: str | None) -> dict[str, Any] | None:
    """A hub model's config.json from the local hub cache, never from the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        if isinstance(path, str):
            return json.loads(Path(path).read_text())
    except Exception:  # not a valid repo id, no cache: nothing known locally
        return None
    return None
