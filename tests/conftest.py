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

import bitsandbytes.functional as bnb_functional  # noqa: E402
import bitsandbytes.nn.modules as bnb_modules  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# bitsandbytes picks its CPU path for 4-bit layers from the CPU's AVX512-BF16 flag, once per layer
# (ftune/integrations/bitsandbytes.py). The suite must not depend on which CPU runs it: every layer
# built in a test sees the flag off, and the tests of that path force it on with the
# `bitsandbytes_avx512bf16` fixture (ftune's own models must behave alike either way).
CPU_HAS_AVX512BF16 = bool(bnb_functional.has_avx512bf16())  # the real check (this file may be imported twice)
bnb_modules.has_avx512bf16 = lambda: False

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


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The SFT quickstart as shipped (250 steps, a log every 50), trained once per session: (recipe,
    run). tests/test_train.py checks the run; the DPO and GRPO quickstarts continue its adapter."""
    from ftune.recipe import load_recipe
    from ftune.runner import train

    out = tmp_path_factory.mktemp("runs") / "quickstart"
    recipe = load_recipe(QUICKSTART, [f"training.output_dir={out}", "training.logging_steps=50"])
    return recipe, train(recipe)


@pytest.fixture(params=[False, True], ids=["cpu-without-avx512bf16", "cpu-with-avx512bf16"])
def bitsandbytes_avx512bf16(request, monkeypatch) -> bool:
    """bitsandbytes' CPU feature check forced off, then on, for the 4-bit layers built in the test."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param
