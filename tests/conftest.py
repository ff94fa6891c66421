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

import torch  # noqa: E402

# Triton decides between compiling and interpreting when ftune.kernels is first imported (which
# ftune.model does): without a GPU, every test runs the kernels in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The fuzz tests draw the same examples on every run, so that a landing is not decided by chance;
# HYPOTHESIS_PROFILE=explore draws new ones (how the mixed text/chat row of test_data.py was found).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture
def repo() -> Path:
    return REPO
