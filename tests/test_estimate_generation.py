"""The memory model's DPO and GRPO phases: generation's KV cache, the sampling's logits and the
forward without gradients, against counts by hand and a tiny model's own cache; the grpo keys that
size them, through to TRL's GRPOConfig."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from ftune.errors import RecipeError
from ftune.memory.estimate import (BF16, GiB, Setting, Shape, estimate, generation_bytes, kv_cache_bytes,
                                   no_grad_forward_bytes, streamed_loss_bytes, trl_head_bytes)
from ftune.memory.policy import NoPlanFits, plan_smart
from ftune.presets import PRESETS
from ftune.recipe import load_recipe
from tests.conftest import REPO

GRPO = REPO / "recipes" / "grpo-quickstart.yaml"
GRPO_8B = REPO / "recipes" / "grpo-llama3-8b.yaml"
# A small shape whose sizes all differ: 3 layers, 2 KV heads of 16, hidden 64, vocabulary 1000
SMALL = Shape(model_type="llama", vocab=1000, hidden=64, intermediate=160, layers=3, heads=4, kv_heads=2,
              head_dim=16, tied=False)


def test_generation_bytes_by_hand():
    """6 sequences (3 batches of 2) of 10 prompt and 20 completion tokens, dynamic cache, 4-bit."""
    setting = Setting(seq=10, batch=2, completion=20, generation_steps=3, top_p=0.9)
    per_token = 3 * 2 * 2 * 16 * 2  # layers x (key, value) x kv_heads x head_dim x 2 bytes
    assert kv_cache_bytes(SMALL, 1) == per_token == 384
    full = 6 * 30 * per_token
    # the last token: the full cache, one layer's keys twice (torch.cat), and per sequence and
    # vocabulary entry the bf16 logits, fp32 copy, scores, probabilities and top_p's sort
    logits = 6 * 1000 * (2 + 4 + 4 + 4 + 4 + 8 + 4)
    # the prefill: the prompts' cache, and 60 tokens through a layer (residual, normed input, gate,
    # up and product) beside gate and up dequantized
    forward = 2 * (2 * 60 * 64 + 3 * 60 * 160 + 2 * 160 * 64)
    prompts = 6 * 10 * per_token
    assert generation_bytes(SMALL, setting) == max(full + full // 6 + logits, prompts + forward)
    # static: the whole cache from the prefill on, and it does not grow
    assert generation_bytes(SMALL, replace(setting, generation_cache="static")) == full + max(forward, logits)
    # offloaded: two of the three layers' cache on the GPU
    assert generation_bytes(SMALL, replace(setting, generation_cache="offloaded")) == \
        max(full * 2 // 3 + logits, prompts * 2 // 3 + forward)
    # without top_p, no sort
    assert generation_bytes(SMALL, replace(setting, top_p=1.0)) == full + full // 6 + 6 * 1000 * 14


def test_generation_is_a_phase_beside_training():
    """The peak is the larger of the generation and the training, never their sum."""
    shape = Shape.from_config(PRESETS["llama-3.1-8b"])
    # GRPO's rows, read by TRL's fused head, which reads the LM head whole
    sft = Setting(seq=512, batch=8, completion=2048, host_memory=125 * GiB, streamed_head=False)
    grpo = replace(sft, generation_steps=4)
    training, with_generation = estimate(shape, sft), estimate(shape, grpo)
    assert with_generation.kv_cache == 32 * 2560 * 32 * 2 * 8 * 128 * BF16 == 10 * GiB
    assert with_generation.peak == training.peak + with_generation.generation
    # the generation's own phase: weights, optimizer states, the fetched LM head, its cache and the rest
    resident = training.peak - training.lora_gradients - training.checkpoints_gpu - training.working_set - \
        training.loss
    head = 128256 * 4096 * BF16
    assert with_generation.peak == resident + head + generation_bytes(shape, grpo)
    # a short completion: the training's busiest moment is the peak, the generation adds nothing
    short = estimate(shape, replace(grpo, completion=64, seq=32, batch=4, generation_steps=1))
    assert short.generation == 0 and short.kv_cache > 0


def test_dpo_trains_two_rows_after_a_reference_pass():
    shape = Shape.from_config(PRESETS["llama-3.1-8b"])
    one = Setting(seq=2048, batch=1, host_memory=125 * GiB)
    dpo = estimate(shape, replace(one, rows_per_example=2, reference_pass=True, streamed_head=False))
    assert dpo.checkpoints_host == 2 * estimate(shape, one).checkpoints_host
    # the reference pass over the 4096 tokens of both rows, beside the fetched LM head and TRL's
    # fused head's tile, counts as far as it exceeds the training's busiest moment
    training = dpo.lora_gradients + dpo.checkpoints_gpu + dpo.working_set + dpo.loss
    reference = 128256 * 4096 * BF16 + no_grad_forward_bytes(shape, 4096, True) + trl_head_bytes(4096)
    assert dpo.reference == max(0, reference - training) and dpo.generation == 0
    assert abs(reference / training - 1) < 0.05  # at 2048 tokens a row the two moments are alike


def test_a_short_dpo_steps_reference_rides_its_training_forward():
    """A new adapter's reference (the base model) rides the training forward in steps of at most
    REFERENCE_RIDES_MAX_TOKENS: the training counts the rows twice and no reference pass follows;
    a longer step, or a run continuing an adapter, has its reference pass as before."""
    from ftune.memory.estimate import REFERENCE_RIDES_MAX_TOKENS
    from ftune.plan import assumed_device, resolve

    shape = Shape.from_config(PRESETS["llama-3.1-8b"])
    dpo = Setting(seq=30, batch=1, rows_per_example=2, reference_pass=True,
                  reference_rides_up_to=REFERENCE_RIDES_MAX_TOKENS,
                  streamed_head=False, host_memory=125 * GiB)
    riding = estimate(shape, dpo)
    assert dpo.reference_riding and dpo.training_rows == 4 and dpo.training_tokens == 120
    assert riding.reference == 0
    doubled = estimate(shape, replace(dpo, batch=2, reference_pass=False))  # the same four rows, no reference
    assert riding.peak == doubled.peak
    longest = REFERENCE_RIDES_MAX_TOKENS // 2
    assert replace(dpo, seq=longest).reference_riding and not replace(dpo, seq=longest + 1).reference_riding
    assert not replace(dpo, reference_rides_up_to=0).reference_riding
    long = replace(dpo, seq=2048)
    assert long.training_rows == 2 and estimate(shape, long).peak == \
        estimate(shape, replace(long, reference_rides_up_to=0)).peak
    # an evaluation forward of short rows rides too: its tokens twice over
    evaluated = replace(dpo, eval_tokens=60)
    assert evaluated.evaluation_tokens == 120 and replace(dpo, eval_tokens=4096).evaluation_tokens == 4096
    assert replace(evaluated, reference_rides_up_to=0).evaluation_tokens == 60
    for adapter, rides in (("runs/sft", False), (None, True)):
        recipe = load_recipe(REPO / "recipes" / "dpo-quickstart.yaml", [f"model.adapter={adapter or 'null'}"])
        assert resolve(recipe, assumed_device(cpu=True)).setting.reference_rides_up_to == \
            (REFERENCE_RIDES_MAX_TOKENS if rides else 0)
    recipe = load_recipe(REPO / "recipes" / "dpo-quickstart.yaml", ["model.adapter=null", "lora.dropout=0.1"])
    assert not resolve(recipe, assumed_device(cpu=True)).setting.reference_rides_up_to  # the gate stands in for it


@pytest.mark.parametrize("preset,rides_up_to", [("llama-3.1-8b", 1024), ("gemma-3-27b", 780), ("qwen3-30b-a3b", 0)])
def test_the_plan_lets_the_reference_ride_as_far_as_the_run_does(preset, rides_up_to):
    """The memory model's ride (plan.workflow_phases) stops where the run's does
    (integrations.trl.ReferenceRidesTraining): where the doubled rows' MLP would be cut into
    chunks (Gemma-3-27B's, 21,504 wide), and never beside TRL's router loss (a mixture of experts)."""
    from ftune.memory.estimate import reference_rides
    from ftune.plan import assumed_device, resolve

    recipe = load_recipe(REPO / "recipes" / "dpo-quickstart.yaml",
                         ["model.adapter=null", f"model.preset={preset}", "model.name_or_path=null"])
    setting = resolve(recipe, assumed_device(cpu=True)).setting
    assert setting.reference_rides_up_to == rides_up_to
    if rides_up_to:
        intermediate = PRESETS[preset]["intermediate_size"]
        assert reference_rides(rides_up_to, intermediate) and not reference_rides(rides_up_to + 1, intermediate)
        rows = 2 * setting.batch
        assert replace(setting, seq=rides_up_to // rows).reference_riding
        assert not replace(setting, seq=rides_up_to // rows + 1).reference_riding


@pytest.mark.parametrize("workflow,adapter,beta,copy", [("dpo", "runs/sft", None, True), ("dpo", None, None, False),
                                                       ("grpo", "runs/sft", 0.04, True), ("grpo", None, 0.04, False),
                                                       ("grpo", "runs/sft", 0.0, False)])
def test_trls_copy_of_the_adapter_counts_where_the_run_holds_one(workflow, adapter, beta, copy):
    """TRL keeps the reference as a frozen fp32 copy of the adapter where DPO, or GRPO with
    beta > 0, continues one (test_reliability.py checks that DPO's checkpoints hold it, ref/, just
    there; test_workflows.py that a new adapter's run has none): its parameters count twice."""
    from ftune.plan import assumed_device, resolve

    overrides = [f"model.adapter={adapter or 'null'}"] + ([f"grpo.beta={beta}"] if beta is not None else [])
    recipe = load_recipe(REPO / "recipes" / f"{workflow}-quickstart.yaml", overrides)
    setting = resolve(recipe, assumed_device(cpu=True)).setting
    shape = Shape.from_config(PRESETS["tiny-llama"])
    adapter_bytes = estimate(shape, replace(setting, reference_adapter=False)).lora_parameters
    assert setting.reference_adapter == copy
    assert estimate(shape, setting).lora_parameters == (2 if copy else 1) * adapter_bytes


def test_smart_budget_includes_the_generation():
    shape = Shape.from_config(PRESETS["llama-3.1-8b"])
    grpo = Setting(seq=512, batch=8, completion=2048, generation_steps=4, host_memory=125 * GiB,
                   streamed_head=False)
    plan = plan_smart(shape, grpo, 20 * GiB)
    assert plan.peak <= 20 * GiB
    generation_phase = estimate(shape, replace(grpo, mode="unsloth"))
    with pytest.raises(NoPlanFits):  # the training alone fits, the generation does not
        plan_smart(shape, grpo, generation_phase.peak - GiB)
    plan_smart(shape, replace(grpo, generation_steps=0), generation_phase.peak - GiB)


def test_kv_cache_of_a_tiny_models_generate_is_the_formula():
    """transformers' own cache after `generate` (bf16, 3 sequences of 7 prompt and 5 new tokens):
    every token but the last, whose key and value no forward computed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=100, hidden_size=64, intermediate_size=160,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prompts = torch.randint(1, 100, (3, 7))
    out = model.generate(prompts, max_new_tokens=5, min_new_tokens=5, do_sample=True, return_dict_in_generate=True,
                         pad_token_id=0)
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == kv_cache_bytes(Shape.from_config(config.to_dict()), 3 * (7 + 5 - 1))


def test_grpo_keys_reach_grpo_config(tmp_path):
    import torch

    from ftune.workflows.common import trainer_arguments
    from ftune.workflows.grpo import grpo_config

    def config(*overrides, cache=None):
        recipe = load_recipe(GRPO, [f"training.output_dir={tmp_path}", *overrides], check_paths=False)
        built = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
        return grpo_config(recipe, trainer_arguments(recipe, built), cache=cache)[0]

    chosen = config("grpo.top_p=0.9", "grpo.steps_per_generation=2", "grpo.cache_implementation=offloaded",
                    "grpo.mask_truncated_completions=true", "grpo.max_completion_length=300")
    assert (chosen.top_p, chosen.steps_per_generation, chosen.generation_batch_size) == (0.9, 2, 32)
    assert chosen.cache_implementation == "offloaded" and chosen.mask_truncated_completions
    assert chosen.max_completion_length == 300 and not chosen.use_transformers_continuous_batching
    default = config()
    assert default.cache_implementation is None and default.steps_per_generation == 1  # training.grad_accum
    # the plan's cache where there is a plan (plan.generation_plan settles auto and the machine)
    assert config(cache="static").cache_implementation == "static"
    assert config("grpo.cache_implementation=offloaded", cache="dynamic").cache_implementation is None
    paged = config("grpo.paged_generation=true")
    # 16 sequences of 32 + 16 tokens: one 256-token block each
    assert paged.use_transformers_continuous_batching
    assert paged.transformers_continuous_batching_config == {"block_size": 256, "num_blocks": 16,
                                                              "max_batch_tokens": 2048}


@pytest.mark.parametrize("overrides, key", [
    (["grpo.steps_per_generation=1", "training.batch_size=6"], "grpo.steps_per_generation"),
    (["grpo.paged_generation=true", "grpo.cache_implementation=static"], "grpo.paged_generation"),
    (["grpo.top_p=0"], "grpo.top_p"),
    (["grpo.cache_implementation=quantized"], "grpo.cache_implementation"),
])
def test_bad_grpo_values_name_their_key(overrides, key):
    with pytest.raises(RecipeError) as caught:
        load_recipe(GRPO, overrides, check_paths=False)
    assert key in dict(caught.value.problems)


def test_estimate_vram_prints_the_generation_phase(monkeypatch, capsys):
    from tests.test_estimate import run_cli

    code, out, _ = run_cli(monkeypatch, capsys, "estimate-vram", str(GRPO_8B), "--vram", "24GiB", "--mode", "unsloth")
    assert code in (0, None)
    assert "beyond training: generation" in out and "KV cache" in out
    assert "32 sequences x (512 prompt + 2048 completion)" in " ".join(out.split())


def test_evaluation_is_a_phase_beside_training():
    """An evaluation's forward (no gradients, its MLP in chunks, the fetched LM head kept) adds to the
    peak only what it needs beyond the training's busiest moment."""
    from ftune.memory.estimate import MLP_CHUNK_BYTES

    shape = Shape.from_config(PRESETS["llama-3.1-8b"])
    training = Setting(seq=8192, batch=1, host_memory=125 * GiB, streamed_head=False)
    # measured on an H200 (docs/benchmarks.md, 2026-12-02), the head fetched whole for both: evaluation
    # rows like the training's left the 8B shape's peak at 8192 tokens where it was (5.570 GiB with,
    # 5.565 without)
    assert estimate(shape, replace(training, eval_tokens=8192)).evaluation == 0
    assert estimate(shape, replace(training, eval_tokens=8192)).peak == estimate(shape, training).peak
    # eight evaluation rows at once: their forward outgrows the training step's backward
    wide = estimate(shape, replace(training, eval_tokens=8 * 8192))
    assert wide.evaluation > 0 and wide.peak > estimate(shape, training).peak
    # its phase: the fetched head and the forward beside the weights and optimizer states, where the
    # training's has the LoRA gradients, the checkpoints, the busiest layer and the loss
    training_phase = wide.lora_gradients + wide.checkpoints_gpu + wide.working_set + wide.loss
    head = 128256 * 4096 * BF16
    assert wide.evaluation == head + no_grad_forward_bytes(shape, 8 * 8192, True, chunked_mlp=True) - training_phase
    # with the head streamed through the loss, the evaluation's forward holds no head, its loss two blocks
    streamed = estimate(shape, replace(training, eval_tokens=8 * 8192, streamed_head=True))
    streamed_training = streamed.lora_gradients + streamed.checkpoints_gpu + streamed.working_set + streamed.loss
    assert streamed.evaluation == max(no_grad_forward_bytes(shape, 8 * 8192, True, chunked_mlp=True),
                                      streamed_loss_bytes(shape, 8 * 8192)) - streamed_training
    assert streamed.peak < wide.peak - GiB // 2
    # by hand, in bf16 elements: the residual and normed input, then the larger of attention's q, k,
    # v and output and the MLP chunk's gate, up and product (4681 tokens: 3 x 128 MiB), then gate and
    # up dequantized
    tokens, q, kv = 8192, 32 * 128, 8 * 128
    chunk = MLP_CHUNK_BYTES // (2 * 14336) * 3 * 14336
    assert chunk > tokens * (2 * q + 2 * kv + 4096)
    assert no_grad_forward_bytes(shape, tokens, True, chunked_mlp=True) == \
        2 * (2 * tokens * 4096 + chunk + 2 * 14336 * 4096)
    # a MoE block runs whole, as in any forward without gradients
    moe = Shape.from_config(PRESETS["qwen3-30b-a3b"])
    assert no_grad_forward_bytes(moe, tokens, True, chunked_mlp=True) == no_grad_forward_bytes(moe, tokens, True)


def test_padding_free_batches_hold_a_dense_mask_under_sdpa():
    """transformers builds a tokens x tokens boolean mask from a padding-free batch's position ids
    for sdpa; the memory model counts it for the whole step."""
    shape = Shape.from_config(PRESETS["llama-3.1-8b"])
    padded = Setting(seq=2048, batch=8, host_memory=125 * GiB)
    packed = replace(padded, dense_packed_mask=True)
    assert estimate(shape, packed).checkpoints_gpu - estimate(shape, padded).checkpoints_gpu == (8 * 2048) ** 2


def test_the_plan_counts_evaluation_and_the_packed_mask():
    from ftune.plan import Device, resolve

    cuda = Device(kind="cuda")
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["data.eval=0.1", "training.eval_batch_size=3",
                                                               "training.batch_size=2", "sft.padding_free=true"])
    plan = resolve(recipe, cuda)
    assert plan.attention == "sdpa" and plan.batches == "padding-free"
    assert plan.setting.eval_tokens == 3 * recipe.data.max_length and plan.setting.dense_packed_mask
    padded = resolve(load_recipe(REPO / "recipes" / "quickstart.yaml", ["sft.padding_free=false"]), cuda)
    assert padded.setting.eval_tokens == 0 and not padded.setting.dense_packed_mask
