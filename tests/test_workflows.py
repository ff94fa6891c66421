"""DPO and GRPO end to end on CPU: every checkpointing mode runs and gives mode none's losses and
gradients, the adapters load with plain PEFT, DPO's reward margin grows, GRPO's mean reward rises
on the shipped task."""

from __future__ import annotations

import json
import types

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ftune.data import load_training_data
from ftune.errors import DataError
from ftune.model import quantization_config
from ftune.recipe import load_recipe
from ftune.runner import train
from tests.conftest import QUICKSTART, REPO

pytestmark = pytest.mark.slow
DPO = REPO / "recipes" / "dpo-quickstart.yaml"
GRPO = REPO / "recipes" / "grpo-quickstart.yaml"


@pytest.fixture(scope="module")
def sft_adapter(quickstart_run):
    """The SFT quickstart that the DPO and GRPO quickstarts continue (trained once per session, in
    tests/conftest.py)."""
    _, run = quickstart_run
    return run.summary["output_dir"]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_reward_margin_grows(sft_adapter, tmp_path):
    out = tmp_path / "dpo"
    run = train(load_recipe(DPO, [f"model.adapter={sft_adapter}", f"training.output_dir={out}"]))
    margins = [record["rewards/margins"] for record in metrics(out)]
    assert len(margins) == 12
    assert sum(margins[-4:]) / 4 > sum(margins[:2]) / 2 + 0.2, margins
    assert run.summary["workflow"] == "dpo"


def test_grpo_mean_reward_rises(sft_adapter, tmp_path):
    """The GRPO quickstart learns, from the SFT policy's mean reward (the first log, steps 1-2) to
    the last five logs (steps 32-40). Measured with the recipe's settings over 12 runs (this CPU's
    AVX512 numerics and AVX2's, each with 6 draws of the samples): first log 0.12 to 0.31, last
    five 0.78 to 0.97, a rise of 0.49 at least. At the old temperature 0.8 without the KL term, 6 of
    those 12 ended at a mean reward of 0 (stray tokens, or empty completions)."""
    out = tmp_path / "grpo"
    train(load_recipe(GRPO, [f"model.adapter={sft_adapter}", f"training.output_dir={out}"]))
    rewards = [record["reward"] for record in metrics(out)]
    assert len(rewards) == 20
    first, last = rewards[0], sum(rewards[-5:]) / 5
    assert last > 0.6 and last > first + 0.3, rewards


# Two steps of each workflow from a new adapter, every step logged. GRPO's reward is
# length_penalty, which differs between the tiny model's completions (exact_answer and format give
# each of them 0 there: no advantage, a loss and gradients of exactly 0 in every mode); a KL term
# (beta) makes step 2's loss depend on step 1's update (on-policy, the advantage term sums to 0);
# LoRA dropout makes the engine replay the forward's RNG in its recompute, and the sampling that
# follows must not notice. (TRL's DPO turns dropout off: DPO runs the engine's path without it.)
TWO_STEPS = {DPO: [],
             GRPO: ["lora.dropout=0.1", "grpo.rewards=[length_penalty]", "grpo.beta=0.04", "training.batch_size=8"]}
_two_step_metrics: dict[tuple[str, str], list[dict]] = {}  # (recipe file, mode): metrics.jsonl


def train_two_steps(recipe, mode, out):
    overrides = ["model.adapter=null", f"checkpointing.mode={mode}", "training.max_steps=2",
                 f"training.output_dir={out}", "training.logging_steps=1", *TWO_STEPS[recipe]]
    loaded_recipe = load_recipe(recipe, overrides)
    run = train(loaded_recipe)
    _two_step_metrics[(recipe.name, mode)] = metrics(out)
    return loaded_recipe, run


def two_step_metrics(recipe, mode, tmp_path_factory) -> list[dict]:
    """The metrics of train_two_steps, trained once per test session."""
    if (recipe.name, mode) not in _two_step_metrics:
        train_two_steps(recipe, mode, tmp_path_factory.mktemp(f"{recipe.stem}-{mode}") / "run")
    return _two_step_metrics[(recipe.name, mode)]


@pytest.mark.parametrize("mode", ["none", "true", "unsloth"])
@pytest.mark.parametrize("recipe", [DPO, GRPO], ids=["dpo", "grpo"])
def test_each_mode_trains_and_the_adapter_loads_with_peft(recipe, mode, tmp_path):
    out = tmp_path / "run"
    loaded_recipe, run = train_two_steps(recipe, mode, out)
    assert run.summary["steps"] == 2 and run.built.engine.mode == mode
    base = AutoModelForCausalLM.from_pretrained(run.built.source, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config(loaded_recipe, torch.float32))
    loaded = PeftModel.from_pretrained(base, out).eval()
    trained = run.built.model.eval()
    # a new adapter's reference is the base model (GRPO's here with beta > 0): TRL's copy is gone
    assert "ref" not in trained.peft_config and not (out / "ref").exists()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# What each step logs that the engine could change: the loss and the gradient's norm (step 1's
# update decides step 2's loss); DPO's log-probabilities, GRPO's KL to the reference.
COMPARED = {DPO: ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"),
            GRPO: ("loss", "grad_norm", "kl")}


@pytest.mark.parametrize("mode", ["true", "unsloth"])
@pytest.mark.parametrize("recipe", [DPO, GRPO], ids=["dpo", "grpo"])
def test_each_mode_gives_the_losses_and_gradients_of_mode_none(recipe, mode, tmp_path_factory):
    """The same seed and batches give, step by step, mode none's loss and gradient norm. GRPO's
    completions are sampled: they must be the same too (generation runs under no_grad, outside the
    engine, and the engine must leave the RNG where mode none leaves it), which the rewards, exact
    functions of the text, show.

    Tolerance: the recomputed forward and the gradient sums may round differently in fp32.
    Measured on CPU against mode none: DPO 1.1e-7 relative at most (step 2's gradient norm); GRPO
    identical (without dropout, where the engine splits layers differently: 1.6e-6 at most, step 2's
    KL, and its loss, advantages that cancel to 0 plus the KL term, 1e-9 apart). rel 1e-5 and abs
    1e-8 leave room for other CPUs and thread counts; zeroing the gradient of the LoRA tensor with
    the smallest share of the norm (4e-4 of its square in a tiny model's step) moves the gradient
    norm by 2e-4."""
    expected, got = two_step_metrics(recipe, "none", tmp_path_factory), two_step_metrics(recipe, mode, tmp_path_factory)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2]
    assert expected[0]["grad_norm"] > 0 and expected[1]["grad_norm"] > 0  # gradients to compare
    for before, after in zip(expected, got):
        for key in COMPARED[recipe]:
            tolerance = dict(rel=1e-5, abs=1e-8)
            if key == "rewards/margins":
                # beta times a difference of log-probability sums that nearly cancel: its rounding is
                # that of the sums (with torch's AVX2 kernels on this CPU, 1.9e-7 on a margin of 2.6e-3
                # where the log-probabilities are about -86), so it is held relative to them
                tolerance["abs"] = 1e-6 * max(abs(before["logps/chosen"]), abs(before["logps/rejected"]))
            assert after[key] == pytest.approx(before[key], **tolerance), (after["step"], key)
        if recipe == GRPO:  # the same completions
            assert (after["reward"], after["reward_std"]) == (before["reward"], before["reward_std"])
            assert before["reward_std"] > 0


@pytest.mark.parametrize("recipe", [QUICKSTART, DPO, GRPO], ids=["sft", "dpo", "grpo"])
def test_tables_in_host_memory_under_the_fused_loss(recipe, tmp_path):
    """The input embedding and the LM head in host memory, the fused loss on: SFT's loss is ftune's,
    DPO's and GRPO's are TRL's own chunked heads, which read `lm_head.weight` themselves."""
    from ftune.engine.host_memory import HostEmbedding, HostLMHead

    out = tmp_path / "run"
    overrides = ["model.adapter=null", "checkpointing.mode=unsloth", "checkpointing.host_embeddings=true",
                 "kernels.fused_cross_entropy=true", "training.max_steps=2", f"training.output_dir={out}"]
    run = train(load_recipe(recipe, overrides))
    model = run.built.model
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert isinstance(model.get_output_embeddings(), HostLMHead)
    assert run.summary["steps"] == 2 and (out / "adapter_model.safetensors").is_file()


def test_missing_preference_field_is_named_before_the_model_loads(tmp_path):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b"}\n')
    recipe = load_recipe(DPO, [f"data.source={rows}", "model.adapter=null"])
    with pytest.raises(DataError, match="'rejected'"):
        load_training_data(recipe)


def test_workflow_options_for_another_workflow_are_refused():
    from ftune.errors import RecipeError

    with pytest.raises(RecipeError) as caught:
        load_recipe(QUICKSTART, ["dpo.beta=0.2"])
    assert "dpo" in dict(caught.value.problems)


@pytest.mark.parametrize("streams", [True, False])
def test_dpos_short_steps_keep_their_layers_only_where_trls_head_streams(tmp_path, monkeypatch, streams):
    """Where the plan lets short steps keep their layers, DPO's trainer has TRL's fused head read a
    host LM head in blocks (integrations.trl.stream_the_fused_head); where that head cannot stream,
    every step runs the mode and the head is fetched whole, as the plan then counts."""
    import ftune.workflows.dpo as dpo
    from ftune.data import load_training_data
    from ftune.engine.host_memory import move_tables_to_host
    from ftune.model import build_model

    recipe = load_recipe(REPO / "recipes" / "dpo-quickstart.yaml",
                         ["model.adapter=null", f"training.output_dir={tmp_path / 'run'}"])
    built = build_model(recipe, torch.device("cpu"))
    built.plan.setting.keep_up_to = built.engine.keep_up_to = 4096  # as a GPU's plan sets them
    # the run's longest step keeps too: the head streams for every step, not only the short ones
    move_tables_to_host(built.model, torch.device("cpu"), lm_head=True, stream_head=True, stream_up_to=4096)
    if not streams:
        monkeypatch.setattr(dpo, "stream_the_fused_head", lambda model: False)
    dataset, _ = load_training_data(recipe)
    dpo.make_trainer(recipe, built, dataset, callbacks=[])
    base = built.model.get_base_model()
    head = base.get_output_embeddings()
    trls = base.forward.__wrapped__ if streams else base.forward  # ftune's forward around TRL's bound one
    assert isinstance(trls, types.MethodType) and trls.__func__.__code__.co_name == "_fused_forward"
    assert built.engine.keep_up_to == head.stream_up_to == built.plan.setting.keep_up_to == (4096 if streams else 0)
    assert head.streams_the_loss == streams  # where TRL's head cannot stream, it is fetched whole for every step


@pytest.mark.parametrize("host_embeddings", [True, False], ids=["host-embeddings", "embeddings-on-device"])
def test_grpos_paged_generation_keeps_the_adapter_in_float32(tmp_path, host_embeddings):
    """With grpo.paged_generation TRL casts the whole model to the run's dtype before every
    generation (under bf16, as on a GPU); transformers sizes its paged KV cache in the cast model's
    dtype, which with the embedding in host memory and a 4-bit base is an adapter's. The step
    generates and trains, and the adapter is float32 again after it
    (integrations.trl.restore_the_adapter_after_paged_generation)."""
    import ftune.workflows.grpo as grpo
    from ftune.model import build_model

    recipe = load_recipe(GRPO, ["model.adapter=null", "model.dtype=bfloat16", "grpo.paged_generation=true",
                                "grpo.rewards=[length_penalty]", f"checkpointing.host_embeddings={host_embeddings}",
                                "training.max_steps=1", f"training.output_dir={tmp_path / 'run'}"])
    built = build_model(recipe, torch.device("cpu"))
    dataset, _ = load_training_data(recipe)
    trainer = grpo.make_trainer(recipe, built, dataset, callbacks=[])
    trainer.args.bf16 = True  # as on a GPU in bf16: TRL reads it before each generation
    adapter = {name: p for name, p in built.model.named_parameters() if p.requires_grad}
    first = next(p for p in built.model.get_base_model().parameters() if p.is_floating_point())
    assert (first.requires_grad, first.dtype) == ((True, torch.float32) if host_embeddings else (False, torch.bfloat16))
    before = {name: p.detach().clone() for name, p in adapter.items()}
    trainer.train()
    assert {p.dtype for p in adapter.values()} == {torch.float32}
    assert any(not torch.equal(p.detach(), before[name]) for name, p in adapter.items())
