"""Mode smart: the plan keeps as many layers as the budget allows, and never exceeds it.

The planner's own predicted peak proves nothing about it. These tests hold it to figures it does
not compute: each policy's cost worked out by hand for a tiny shape, the estimator's figures for
whole modes (checked against the GPU in test_estimate.py), the GPU's measured peaks of the pure
plans (modes none, true and unsloth) and of the plans it chose."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ftune.errors import ModelError
from ftune.memory.estimate import GiB, Setting, Shape, estimate
from ftune.memory.policy import NoPlanFits, Policy, plan_peak, plan_smart
from ftune.model import build_model, run_plan
from ftune.presets import PRESETS
from ftune.recipe import load_recipe
from tests.conftest import QUICKSTART
from tests.test_estimate import FIXTURE, GRID

SHAPE = Shape.from_config(PRESETS["llama-3.1-8b"])
SETTING = Setting(mode="smart", seq=8192)
BF16 = 2


def peak_from_the_modes(shape: Shape, setting: Setting, keep: int, recompute: int) -> int:
    """A plan's peak from the estimator's figures for whole modes: the step of mode unsloth (of mode
    true where nothing is offloaded) without its layer inputs, plus, per kept layer, what mode none
    keeps of one layer, and per recomputed layer what mode true keeps of one."""
    per_mode = {mode: estimate(shape, replace(setting, mode=mode)) for mode in ("none", "true", "unsloth")}
    kept = per_mode["none"].checkpoints_gpu // shape.layers
    held = per_mode["true"].checkpoints_gpu // shape.layers
    rest = per_mode["unsloth" if keep + recompute < shape.layers else "true"]
    return rest.peak - rest.checkpoints_gpu + keep * kept + recompute * held


def test_each_policy_costs_what_its_layer_holds_on_the_gpu():
    """Worked by hand for a tiny shape, 2 x 32 = 64 tokens, hidden 64, 4 heads and 2 KV heads of
    16 (q 64, kv 32), intermediate 128, bf16 activations. A recomputed layer holds its input on the
    GPU, 64 x 64 x 2 = 8,192 bytes; an offloaded one holds it in host memory instead; a kept layer
    holds its activations, 64 x 2 x (4 x 64 + 2 x 64 + 2 x 32 + 3 x 128) = 106,496 bytes
    (estimate.keep_bytes_per_layer). Comparing plans that each offload a layer leaves the rest of
    the step alike."""
    tiny = Shape(model_type="llama", vocab=512, hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2,
                 head_dim=16, tied=False)
    setting = Setting(mode="smart", seq=32, batch=2, parked_attention=False)

    def plan(keep: int, recompute: int):
        return plan_peak(tiny, setting, keep, recompute)

    input_bytes, kept_bytes = 8_192, 106_496
    assert plan(1, 1).peak - plan(1, 0).peak == input_bytes, "a recomputed layer's input is on the GPU"
    assert plan(0, 3).peak - plan(0, 0).peak == 3 * input_bytes
    assert plan(2, 0).peak - plan(1, 0).peak == kept_bytes
    assert plan(2, 1).peak - plan(1, 1).peak == kept_bytes
    assert plan(1, 0).host - plan(1, 1).host == input_bytes  # an offloaded layer's input in host memory
    assert plan(0, 0).checkpoints_host == 4 * input_bytes and plan(0, 4).checkpoints_host == 0
    # The pure plans are the modes: every layer recomputed is mode true, every one kept mode none,
    # every one offloaded mode unsloth
    for keep, recompute, mode in ((0, 4, "true"), (4, 0, "none"), (0, 0, "unsloth")):
        assert plan(keep, recompute).peak == estimate(tiny, replace(setting, mode=mode)).peak, mode


def test_pure_plans_predict_the_measured_peaks_of_their_modes():
    """Every cell of the GPU grid (tests/fixtures/memory_grid.json) ran a pure plan: mode none keeps
    every layer, true recomputes every one with its input on the GPU, unsloth offloads every one.
    The planner's figure for that plan is within 5% of the measured peak (the estimator's bound)."""
    far = []
    for cell in GRID:
        shape = Shape.from_config(PRESETS[cell["preset"]])
        setting = Setting(mode="smart", seq=cell["seq"], batch=cell["batch"], fused_loss=cell["kernels"],
                          host_embeddings=cell["host_embeddings"], host_lm_head=cell["host_lm_head"],
                          parked_attention=cell.get("parked_attention", False),
                          streamed_head=cell.get("streamed_head", True),
                          host_memory=int(cell["host_gib"] * GiB) if "host_gib" in cell else None)
        keep, recompute = {"none": (shape.layers, 0), "true": (0, shape.layers), "unsloth": (0, 0)}[cell["mode"]]
        ratio = plan_peak(shape, setting, keep, recompute).peak / GiB / cell["measured_peak_gib"]
        if abs(ratio - 1) > 0.05:
            far.append((cell["preset"], cell["mode"], cell["batch"], cell["seq"], round(ratio, 3)))
    assert len(GRID) == 64 and not far, far


@pytest.mark.parametrize("budget_gib", [16, 24, 40, 80])
def test_plans_fit_their_budget_and_keep_more_with_more(budget_gib):
    plan = plan_smart(SHAPE, SETTING, budget_gib * GiB)
    counts = plan.counts()
    assert len(plan.policies) == 32 and counts["recompute"] == 0  # host RAM and link are no constraint
    assert peak_from_the_modes(SHAPE, SETTING, counts["keep"], 0) == plan.peak <= budget_gib * GiB
    smaller = plan_smart(SHAPE, SETTING, (budget_gib - 8) * GiB)
    assert smaller.counts()["keep"] <= counts["keep"]
    # one more kept layer would not fit: the plan is the fastest within the budget
    if counts["keep"] < 32:
        assert peak_from_the_modes(SHAPE, SETTING, counts["keep"] + 1, 0) > budget_gib * GiB


def test_tight_budget_offloads_everything_and_kept_layers_come_last():
    assert plan_smart(SHAPE, SETTING, 6 * GiB).counts() == {"keep": 0, "recompute": 0, "offload": 32}
    plan = plan_smart(SHAPE, SETTING, 24 * GiB)
    first_keep = plan.policies.index(Policy.KEEP)
    assert all(p is Policy.KEEP for p in plan.policies[first_keep:])


def test_short_host_ram_recomputes_on_the_gpu():
    """Room in host memory for 2 layer inputs: the other layers that are not kept recompute with
    their input on the GPU (64 MiB each at 8192 tokens), and the budget pays for those inputs."""
    one_layer_input = 8192 * 4096 * BF16
    plan = plan_smart(SHAPE, SETTING, 24 * GiB, host_available=2 * one_layer_input)
    counts = plan.counts()
    assert counts["offload"] == 2 and counts["recompute"] == 32 - 2 - counts["keep"] > 0
    assert peak_from_the_modes(SHAPE, SETTING, counts["keep"], counts["recompute"]) <= 24 * GiB
    # the inputs on the GPU cost kept layers: fewer than with room in host memory for every input
    roomy = plan_smart(SHAPE, SETTING, 24 * GiB).counts()["keep"]
    assert counts["keep"] < roomy
    assert peak_from_the_modes(SHAPE, SETTING, counts["keep"] + 1, counts["recompute"] - 1) > 24 * GiB


def test_slow_host_link_prefers_recompute_when_memory_allows():
    fast = plan_smart(SHAPE, SETTING, 24 * GiB, link_gbps=50.0)
    slow = plan_smart(SHAPE, SETTING, 24 * GiB, link_gbps=2.0)
    assert fast.counts()["recompute"] == 0 and slow.counts()["recompute"] > 0
    assert slow.counts()["keep"] == fast.counts()["keep"]


def test_nothing_fits_names_the_longest_sequence():
    with pytest.raises(NoPlanFits) as caught:
        plan_smart(SHAPE, Setting(mode="smart", seq=200_000), 12 * GiB)
    assert 0 < caught.value.longest < 200_000


def test_a_budget_the_whole_head_does_not_fit_streams_it_from_the_first_token():
    """Gemma-2-9B at 2048 tokens fetches its 1.75 GiB host head whole (inputs under
    STREAM_HEAD_MIN_TOKENS): 6.89 GiB with every layer offloaded. Where that does not fit and the
    head in blocks does, smart streams it rather than refuse; where it fits, the head stays whole."""
    shape, setting = Shape.from_config(PRESETS["gemma-2-9b"]), Setting(mode="smart", seq=2048)
    whole = plan_peak(shape, setting, 0, 0).peak
    streamed = plan_peak(shape, replace(setting, stream_head_from=0), 0, 0).peak
    assert streamed < whole - GiB
    plan = plan_smart(shape, setting, (whole + streamed) // 2)
    assert plan.streamed_head and plan.stream_head_from == 0 and plan.peak <= (whole + streamed) // 2
    assert "LM head streamed" in plan.describe()
    roomy = plan_smart(shape, setting, whole + GiB)
    assert not roomy.streamed_head and roomy.stream_head_from == setting.stream_head_from
    with pytest.raises(NoPlanFits):
        plan_smart(shape, setting, streamed - 1)
    # a head TRL reads whole (DPO's, GRPO's) is not streamed to fit
    with pytest.raises(NoPlanFits):
        plan_smart(shape, replace(setting, streamed_head=False), (whole + streamed) // 2)


def test_a_smart_recipe_that_needs_the_head_streamed_plans_it_for_the_run():
    """The plan's choice is the run's: RunPlan.setting, from which build_model streams the head
    (model.py passes head_streams(plan.setting) on; test_recipe.py checks the model that follows
    for a run that streams by its length)."""
    from ftune.memory.estimate import RESERVED_OVER_ALLOCATED, head_streams
    from ftune.model_config import local_model_config
    from ftune.plan import assumed_device, resolve

    overrides = ["model.preset=gemma-2-9b", "model.name_or_path=null", "checkpointing.mode=smart",
                 "checkpointing.host_embeddings=true", "data.max_length=2048", "training.batch_size=1"]

    def plan(budget: str):
        recipe = load_recipe(QUICKSTART, overrides + [f"checkpointing.budget={budget}"])
        return resolve(recipe, assumed_device(), config=local_model_config(recipe))

    roomy = plan("80GiB")
    assert not head_streams(roomy.setting)
    shape = Shape.from_config(roomy.config.values)
    whole = plan_peak(shape, roomy.setting, 0, 0).peak
    streamed = plan_peak(shape, replace(roomy.setting, stream_head_from=0), 0, 0).peak
    budget = int((whole + streamed) / 2 * RESERVED_OVER_ALLOCATED / GiB * 1000) / 1000
    tight = plan(f"{budget}GiB")
    assert head_streams(tight.setting) and tight.layers.streamed_head and tight.setting.stream_head_from == 0


def test_recipe_budget_below_the_weights_is_a_clear_error():
    recipe = load_recipe(QUICKSTART, ["checkpointing.mode=smart", "checkpointing.budget=10MiB"])
    with pytest.raises(ModelError, match="checkpointing.budget"):
        run_plan(recipe)


def test_smart_recipe_installs_its_plan():
    recipe = load_recipe(QUICKSTART, ["checkpointing.mode=smart", "checkpointing.budget=1GiB"])
    built = build_model(recipe)
    assert built.plan.layers is not None
    assert built.engine.policies == built.plan.layers.policies
    assert built.engine.mode == "smart"


def _kept_layer_gib(preset: str, seq: int, batch: int) -> float:
    """What keeping one more layer costs on the GPU, measured: mode none's peak less mode true's,
    per layer, is a kept layer's activations less the input a recomputed one holds (bf16)."""
    cells = {c["mode"]: c["measured_peak_gib"] for c in GRID
             if (c["preset"], c["seq"], c["batch"]) == (preset, seq, batch) and c["mode"] in ("none", "true")}
    shape = Shape.from_config(PRESETS[preset])
    return (cells["none"] - cells["true"]) / shape.layers + seq * batch * shape.hidden * BF16 / GiB


@pytest.mark.parametrize("cell", FIXTURE["smart_cells"], ids=lambda c: f"{c['budget_gib']:g}GiB")
def test_the_plans_chosen_keep_what_the_measured_plans_say_fits(cell):
    """The GPU ran a plan of `keep` layers at each budget (each cell names its results file). From
    its measured peak, and the measured cost of one more kept layer (about 1.05 GiB at 8192 tokens),
    the peak of the plan the planner chooses today follows: it must fit the budget; and every plan
    whose so-measured peak lies 6% under the budget (the planner predicts 1-6% high) must be
    chosen or beaten."""
    shape = Shape.from_config(PRESETS[cell["preset"]])
    setting = Setting(mode="smart", seq=cell["seq"], batch=cell["batch"], host_embeddings=cell["host_embeddings"],
                      host_lm_head=cell["host_lm_head"], streamed_head=cell.get("streamed_head", True))
    per_layer = _kept_layer_gib(cell["preset"], cell["seq"], cell["batch"])
    assert 1.0 < per_layer < 1.1, per_layer

    def measured(keep: int) -> float:
        return cell["measured_peak_gib"] + (keep - cell["plan"]["keep"]) * per_layer

    counts = plan_smart(shape, setting, int(cell["budget_gib"] * GiB)).counts()
    assert counts["recompute"] == 0
    assert measured(counts["keep"]) <= cell["budget_gib"], (counts, cell)
    roomy = [keep for keep in range(shape.layers + 1) if measured(keep) * 1.06 <= cell["budget_gib"]]
    assert counts["keep"] >= max(roomy, default=0), (counts, cell)
    # and the planner's figure for the measured plan was within 6% above its measured peak
    plan = cell["plan"]
    predicted = plan_peak(shape, setting, plan["keep"], plan["recompute"]).peak / GiB
    assert 1.0 <= predicted / cell["measured_peak_gib"] <= 1.06, (predicted, cell)


def test_the_table_stays_on_the_gpu_when_every_layer_is_kept():
    setting = Setting(mode="smart", seq=8192, host_embeddings=True)
    roomy = plan_smart(SHAPE, setting, 80 * GiB, embeddings_movable=True)
    assert roomy.counts()["keep"] == 32 and not roomy.host_embeddings
    tight = plan_smart(SHAPE, setting, 16 * GiB, embeddings_movable=True)
    assert tight.host_embeddings and tight.counts()["keep"] < 32
    assert "embeddings in host RAM" in tight.describe()
    # asked for explicitly (not auto), the table moves whatever the budget
    assert plan_smart(SHAPE, setting, 80 * GiB).host_embeddings


def test_a_budget_that_keeping_every_layer_fits_is_planned_on_small_shapes():
    """On a tiny shape the predicted peak is not monotonic in the kept layers (the copy buffers and
    the recompute's working set weigh as much as the activations): a budget that keeping every layer
    fits keeps every layer, though keeping one does not fit; below every plan, a clear refusal."""
    from ftune.memory.estimate import Shape
    from ftune.presets import PRESETS

    shape = Shape.from_config(PRESETS["tiny-llama"])
    setting = Setting(mode="smart", seq=64, batch=16, host_embeddings=False)
    peaks = [plan_peak(shape, setting, keep, 0).peak for keep in range(shape.layers + 1)]
    budget = peaks[-1]
    assert peaks[1] > budget  # a walk up from none kept would stop at none
    plan = plan_smart(shape, setting, budget)
    assert plan.counts()["keep"] == shape.layers and plan.peak == budget
    with pytest.raises(NoPlanFits):
        plan_smart(shape, setting, min(peaks) - 1)
