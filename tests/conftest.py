"""Shared test set-up: offline, a private preset cache, small helpers to build tiny models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Tests never reach the network, and never write presets into the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FTUNE_CACHE", tempfile.mkdtemp(prefix="ftune-test-cache-"))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture
def repo() -> Path:
    return REPO
