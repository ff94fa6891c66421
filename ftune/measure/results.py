"""Where benchmark results go: benchmarks/results/<card>/<date>-<topic>.json, the card and the day
of the measurement read from the path (h200/2026-12-02-engine.json; 2xh100/... for two cards)."""

from __future__ import annotations

import importlib.metadata
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def card_name(device_name: str | None = None, count: int = 1) -> str:
    """The card as result folders name it: `NVIDIA H100 80GB HBM3` is h100, two of them 2xh100;
    without CUDA, cpu."""
    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    lowered = re.sub(r"\b(nvidia|geforce)\b", "", device_name.lower())
    model = re.search(r"\b[a-z]+\d+[a-z]*\b", lowered)
    card = model.group(0) if model else re.sub(r"[^a-z0-9]+", "-", lowered).strip("-")
    return f"{count}x{card}" if count > 1 else card


def result_path(topic: str, *, card: str | None = None, ext: str = "json") -> Path:
    """benchmarks/results/<card>/<today>-<topic>.<ext>, its folder made."""
    folder = RESULTS / (card or card_name())
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y-%m-%d')}-{topic}.{ext}"


def installed_version(distribution: str) -> str | None:
    """The installed version of an optional package that changes which kernels a result ran
    (flash-attn-4: Gemma-2's soft-capped attention), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
