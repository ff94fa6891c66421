"""Well-known hub ids and the preset of the same shape, so that their shape is known offline.

`estimate-vram` and `ftune validate` read a model's sizes and module names from its config. For
these ids the config is one of ftune's presets (ftune/presets.py): no hub request, no retries
when offline. The mapping is by shape (sizes, heads, tying, module names); Llama 3 and 3.1 differ
only in their rope scaling, which neither memory nor module names depend on.
"""

from __future__ import annotations

_FAMILIES: dict[str, list[str]] = {
    "llama-3.2-1b": ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"],
    "llama-3.2-3b": ["meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"],
    "llama-3.1-8b": ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B",
                     "meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3-8B",
                     "meta-llama/Meta-Llama-3-8B-Instruct"],
    "llama-3.1-70b": ["meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct",
                      "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B-Instruct"],
    **{f"qwen2.5-{size.lower()}": [f"Qwen/Qwen2.5-{size}", f"Qwen/Qwen2.5-{size}-Instruct"]
       for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B")},
    **{f"qwen3-{size.lower()}": [f"Qwen/Qwen3-{size}", f"Qwen/Qwen3-{size}-Base"]
       for size in ("0.6B", "1.7B", "4B", "8B", "14B", "32B")},
    "mistral-7b": ["mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"],
    "gemma-2-2b": ["google/gemma-2-2b", "google/gemma-2-2b-it"],
    "gemma-2-9b": ["google/gemma-2-9b", "google/gemma-2-9b-it"],
    "gemma-3-1b": ["google/gemma-3-1b-pt", "google/gemma-3-1b-it"],
    # vision-language models whose text half is the preset: their sizes, not all their modules
    **{f"gemma-3-{size}": [f"google/gemma-3-{size}-pt", f"google/gemma-3-{size}-it"] for size in ("4b", "12b", "27b")},
    "phi-3-mini": ["microsoft/Phi-3-mini-4k-instruct"],
    "phi-3-medium": ["microsoft/Phi-3-medium-4k-instruct"],
    "phi-4": ["microsoft/phi-4"],
    "mixtral-8x7b": ["mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"],
    "qwen3-30b-a3b": ["Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Base"],
}

# Hub ids compare case-insensitively, as the hub resolves them.
KNOWN_HUB_PRESETS: dict[str, str] = {hub_id.lower(): preset for preset, ids in _FAMILIES.items() for hub_id in ids}
# Ids whose preset describes the text model only (the checkpoint has a vision tower besides).
TEXT_PART_ONLY = {hub_id.lower() for size in ("4b", "12b", "27b") for hub_id in _FAMILIES[f"gemma-3-{size}"]}


def preset_for(hub_id: str | None) -> str | None:
    """The preset of the same shape as a well-known hub id, or None."""
    return KNOWN_HUB_PRESETS.get(hub_id.strip().lower()) if hub_id else None
