"""Mode smart: the plan keeps as many layers as the budget allows, and never exceeds it."""

from __future__ import annotations

import pytest

from ftune.engine import Policy
from ftune.engine.planner import NoPlanFits, plan_peak, plan_smart
from ftune.errors import ModelError
from ftune.memory.estimate import GiB, Setting, Shape
from ftune.model import build_model, smart_plan
from ftune.presets import PRESETS
from ftune.recipe import load_recipe
from tests.conftest import QUICKSTART
from tests.test_estimate import FIXTURE

SHAPE = Shape.from_config(PRESETS["llama-3.1-8b"])
SETTING = Setting(mode="smart", seq=8192)


@pytest.mark.parametrize("budget_gib", [16, 24, 40, 80])
def test_plans_fit_their_budget_and_keep_more_with_more(budget_gib):
    plan = plan_smart(SHAPE, SETTING, budget_gib * GiB)
    assert plan.peak <= budget_gib * GiB
    assert len(plan.policies) == 32
    smaller = plan_smart(SHAPE, SETTING, (budget_gib - 8) * GiB)
    assert smaller.counts()["keep"] <= plan.counts()["keep"]
    # one more kept layer would not fit: the plan is the fastest within the budget
    keep = plan.counts()["keep"]
    if keep < 32:
        assert plan_peak(SHAPE, SETTING, keep + 1, 0).peak > budget_gib * GiB


def test_tight_budget_offloads_everything_and_kept_layers_come_last():
    assert plan_smart(SHAPE, SETTING, 6 * GiB).counts() == {"keep": 0, "recompute": 0, "offload": 32}
    plan = plan_smart(SHAPE, SETTING, 24 * GiB)
    first_keep = plan.policies.index(Policy.KEEP)
    assert all(p is Policy.KEEP for p in plan.policies[first_keep:])


def test_short_host_ram_recomputes_on_the_gpu():
    one_layer_input = 8192 * 4096 * 2
    plan = plan_smart(SHAPE, SETTING, 24 * GiB, host_available=10 * one_layer_input)
    counts = plan.counts()
    assert counts["offload"] <= 10 and counts["recompute"] > 0 and plan.peak <= 24 * GiB


def test_slow_host_link_prefers_recompute_when_memory_allows():
    fast = plan_smart(SHAPE, SETTING, 24 * GiB, link_gbps=50.0)
    slow = plan_smart(SHAPE, SETTING, 24 * GiB, link_gbps=2.0)
    assert fast.counts()["recompute"] == 0 and slow.counts()["recompute"] > 0
    assert slow.counts()["keep"] == fast.counts()["keep"]


def test_nothing_fits_names_the_longest_sequence():
    with pytest.raises(NoPlanFits) as caught:
        plan_smart(SHAPE, Setting(mode="smart", seq=200_000), 12 * GiB)
    assert 0 < caught.value.longest < 200_000


def test_recipe_budget_below_the_weights_is_a_clear_error():
    recipe = load_recipe(QUICKSTART, ["checkpointing.mode=smart", "checkpointing.budget=10MiB"])
    with pytest.raises(ModelError, match="checkpointing.budget"):
        smart_plan(recipe)


def test_smart_recipe_installs_its_plan():
    recipe = load_recipe(QUICKSTART, ["checkpointing.mode=smart", "checkpointing.budget=1GiB"])
    built = build_model(recipe)
    assert built.plan is not None
    assert built.engine.policies == built.plan.policies
    assert built.engine.mode == "smart"


@pytest.mark.parametrize("cell", FIXTURE["smart_cells"], ids=lambda c: f"{c['budget_gib']:g}GiB")
def test_measured_smart_plans_stayed_under_budget_and_their_prediction(cell):
    """The plans run on the GPU (each cell names its results file): each measured peak is under
    its budget, and the planner's prediction for it is within 5% above the measurement (the
    planner never predicts low, so a plan that fits on paper fits on the card)."""
    setting = Setting(mode="smart", seq=cell["seq"], batch=cell["batch"], host_embeddings=cell["host_embeddings"],
                      host_lm_head=cell["host_lm_head"])
    plan = cell["plan"]
    predicted = plan_peak(Shape.from_config(PRESETS[cell["preset"]]), setting, plan["keep"], plan["recompute"]).peak
    assert cell["measured_peak_gib"] <= cell["budget_gib"]
    assert 1.0 <= predicted / GiB / cell["measured_peak_gib"] <= 1.06, (predicted / GiB, cell)


def test_the_table_stays_on_the_gpu_when_every_layer_is_kept():
    setting = Setting(mode="smart", seq=8192, host_embeddings=True)
    roomy = plan_smart(SHAPE, setting, 80 * GiB, embeddings_movable=True)
    assert roomy.counts()["keep"] == 32 and not roomy.host_embeddings
    tight = plan_smart(SHAPE, setting, 16 * GiB, embeddings_movable=True)
    assert tight.host_embeddings and tight.counts()["keep"] < 32
    assert "embeddings in host RAM" in tight.describe()
    # asked for explicitly (not auto), the table moves whatever the budget
    assert plan_smart(SHAPE, setting, 80 * GiB).host_embeddings
