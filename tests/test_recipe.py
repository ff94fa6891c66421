"""The recipe schema: shipped recipes validate; every broken recipe names its keys, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ftune.errors import RecipeError
from ftune.recipe import Recipe, apply_overrides, load_recipe, parse_bytes
from tests.conftest import QUICKSTART, REPO

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert QUICKSTART in SHIPPED and len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.data.source


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_opens_with_a_header(path):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ") and len(header) > 20


def write(tmp_path: Path, data: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def quickstart_dict() -> dict:
    data = yaml.safe_load(QUICKSTART.read_text())
    # absolute paths, so that copies in tmp_path resolve the same files
    data["model"]["tokenizer"] = str(REPO / "data" / "quickstart" / "tokenizer")
    data["data"]["source"] = str(REPO / "data" / "quickstart" / "sft.jsonl")
    return data


def problems_of(tmp_path: Path, data: dict) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, data))
    return dict(caught.value.problems)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    data = quickstart_dict()
    data["lora"]["rank"] = 8
    problems = problems_of(tmp_path, data)
    assert "lora.rank" in problems
    assert "did you mean 'r'" in problems["lora.rank"]


def test_unknown_section(tmp_path):
    data = quickstart_dict()
    data["optimiser"] = {"lr": 1}
    assert "optimiser" in problems_of(tmp_path, data)


def test_wrong_type_names_key_and_value(tmp_path):
    data = quickstart_dict()
    data["training"]["batch_size"] = "four"
    problems = problems_of(tmp_path, data)
    assert "'four'" in problems["training.batch_size"]


def test_bad_mode_lists_the_modes(tmp_path):
    data = quickstart_dict()
    data["checkpointing"]["mode"] = "offload"
    message = problems_of(tmp_path, data)["checkpointing.mode"]
    for mode in ("none", "true", "unsloth", "smart"):
        assert mode in message


def test_yaml_booleans_are_modes(tmp_path):
    for value, mode in ((True, "true"), (False, "none"), (None, "none")):
        data = quickstart_dict()
        data["checkpointing"]["mode"] = value
        assert load_recipe(write(tmp_path, data)).checkpointing.mode == mode


def test_missing_model_path(tmp_path):
    data = quickstart_dict()
    del data["model"]["preset"]
    data["model"]["name_or_path"] = "./models/not-here"
    message = problems_of(tmp_path, data)["model.name_or_path"]
    assert "does not exist" in message and "not-here" in message


def test_all_problems_at_once(tmp_path):
    data = quickstart_dict()
    data["lora"]["rank"] = 8
    data["training"]["learning_rate"] = -1
    data["checkpointing"]["mode"] = "sometimes"
    data["data"].pop("source")
    problems = problems_of(tmp_path, data)
    assert {"lora.rank", "training.learning_rate", "checkpointing.mode", "data.source"} <= set(problems)


def test_combinations(tmp_path):
    data = quickstart_dict()
    data["model"]["name_or_path"] = "meta-llama/Llama-3.1-8B"  # and a preset: exactly one is allowed
    data["checkpointing"]["budget"] = "24GiB"  # budget without smart
    data["training"]["epochs"] = 2  # with max_steps
    problems = problems_of(tmp_path, data)
    assert {"model", "checkpointing.budget", "training.epochs"} <= set(problems)


def test_unknown_preset_suggests_the_close_one(tmp_path):
    data = quickstart_dict()
    data["model"]["preset"] = "llama-3.1-8"
    assert "llama-3.1-8b" in problems_of(tmp_path, data)["model.preset"]


def test_malformed_yaml_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  preset: tiny-llama\n data: [\n")
    with pytest.raises(RecipeError, match="line"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError):
        load_recipe(path)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, quickstart_dict())
    recipe = load_recipe(path, ["training.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "checkpointing.mode=none"])
    assert recipe.training.max_steps == 7
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.checkpointing.mode == "none"
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, ["training.max_stepz=7"])
    assert "training.max_stepz" in dict(caught.value.problems)
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(path, ["training.max_steps"])
    with pytest.raises(RecipeError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.first=1"], source="r")


def test_relative_inputs_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(QUICKSTART)
    assert Path(recipe.resolve_input(recipe.data.source)) == REPO / "data" / "quickstart" / "sft.jsonl"
    assert recipe.resolve_input("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("16 GB") == 16 * 10**9
    assert parse_bytes("20000MiB") == 20000 * 2**20
    assert parse_bytes("12") == 12 * 2**30
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes("lots")


def test_docs_list_every_recipe_key():
    """docs/recipes.md is generated from the schema; regenerate it when a key changes."""
    from ftune.docgen import recipe_reference

    assert (REPO / "docs" / "recipes.md").read_text() == recipe_reference(), (
        "docs/recipes.md is out of date: run `python -m ftune.docgen > docs/recipes.md`"
    )


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(QUICKSTART)
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again.model_dump() == recipe.model_dump()
    assert "dpo" not in yaml.safe_load(recipe.to_yaml())


def test_fsdp_combinations_that_are_not_supported_name_the_key(tmp_path):
    data = quickstart_dict()
    data["distributed"] = {"strategy": "fsdp"}
    data["checkpointing"]["mode"] = "smart"
    assert "smart planner" in problems_of(tmp_path, data)["distributed.strategy"]
    data["checkpointing"]["mode"] = "unsloth"
    data["workflow"] = "dpo"
    data["data"]["format"] = "preference"
    assert "sft workflow only" in problems_of(tmp_path, data)["distributed.strategy"]
    data["workflow"], data["data"]["format"] = "sft", "text"
    data["training"]["optimizer"] = "adamw_8bit"
    assert "sharded parameters" in problems_of(tmp_path, data)["training.optimizer"]
    data["training"]["optimizer"] = "adamw_torch"
    assert load_recipe(write(tmp_path, data)).distributed.strategy == "fsdp"


def test_fsdp_recipe_gives_accelerates_fsdp2_plugin_under_several_processes(tmp_path, monkeypatch):
    """The recipe's strategy reaches TrainingArguments as accelerate's FSDP2 plugin: one unit per
    decoder layer, the adapter saved whole, ftune's engine (not FSDP's) checkpointing."""
    from transformers import TrainingArguments

    from ftune.model import build_model
    from ftune.workflows.common import trainer_arguments

    data = quickstart_dict()
    data["distributed"] = {"strategy": "fsdp"}
    data["training"]["output_dir"] = str(tmp_path / "out")
    recipe = load_recipe(write(tmp_path, data))
    built = build_model(recipe)
    # FSDP shards float parameters only: the packed 4-bit values sit in compute-dtype elements (uint8 otherwise)
    assert {p.dtype for p in built.model.parameters() if type(p).__name__ == "Params4bit"} == {torch.float32}
    assert trainer_arguments(recipe, built).get("fsdp") is None  # one process: nothing to shard

    monkeypatch.setenv("WORLD_SIZE", "2")
    arguments = trainer_arguments(recipe, built)
    monkeypatch.delenv("WORLD_SIZE")  # TrainingArguments itself would then set up a process group
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it; restored after
    plugin = TrainingArguments(**arguments).fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["activation_checkpointing"] is False and plugin["reshard_after_forward"] is True


def test_fsdp_on_gpus_loads_the_model_in_host_memory(tmp_path, monkeypatch):
    """Under fsdp with several GPU ranks the 4-bit model is loaded in host memory (FSDP moves it to
    the GPUs a layer at a time as it shards it), while the kernels and the engine are set up for the
    GPU it will train on. Runs without a GPU: nothing touches CUDA before the trainer shards."""
    from ftune.model import build_model

    data = quickstart_dict()
    data["model"]["dtype"] = "float32"
    data["distributed"] = {"strategy": "fsdp"}
    data["checkpointing"] = {"mode": "unsloth", "host_embeddings": False}  # pinning needs CUDA
    recipe = load_recipe(write(tmp_path, data))
    build_model(recipe, torch.device("cpu"))  # the preset's weights, built once on this machine
    threads = torch.get_num_threads()
    monkeypatch.setenv("WORLD_SIZE", "2")
    built = build_model(recipe, torch.device("cuda", 0))
    assert {p.device.type for p in built.model.parameters()} == {"cpu"}
    assert any(type(p).__name__ == "Params4bit" for p in built.model.parameters())
    assert built.engine.device == torch.device("cuda", 0) and built.engine.counts()["offload"] > 0
    assert built.kernels["rms_norm"] and built.kernels["swiglu"]
    assert torch.get_num_threads() == threads  # the loading's extra threads are given back


@pytest.mark.parametrize("fused_loss", [True, False])
def test_host_embeddings_move_the_lm_head_only_under_the_fused_loss(tmp_path, fused_loss):
    """The LM head leaves the GPU only where the fused loss frees it before the backward."""
    from torch import nn

    from ftune.engine.host_memory import HostEmbedding, HostLMHead
    from ftune.model import build_model

    data = quickstart_dict()
    data["model"]["dtype"] = "float32"
    data["checkpointing"] = {"mode": "unsloth", "host_embeddings": True}
    data["kernels"] = {"fused_cross_entropy": fused_loss}
    built = build_model(load_recipe(write(tmp_path, data)), torch.device("cpu"))
    embedding, head = built.model.get_input_embeddings(), built.model.get_output_embeddings()
    assert isinstance(embedding, HostEmbedding)
    assert type(head) is (HostLMHead if fused_loss else nn.Linear)
    table = embedding.host_weight.numel() * 4
    assert built.engine.host_embedding_bytes == (2 if fused_loss else 1) * table


def test_a_run_planned_for_long_inputs_streams_the_host_lm_head_through_the_loss(tmp_path, monkeypatch):
    """From STREAM_HEAD_MIN_TOKENS of max_length on, the run's fused loss reads the host head in
    blocks, for short batches and evaluation too, and the first layer never fetches it whole; the
    loss and the adapters' gradients are those of the whole head. A shorter run fetches it whole."""
    from ftune.engine import host_memory
    from ftune.memory.estimate import STREAM_HEAD_MIN_TOKENS
    from ftune.model import build_model

    data = quickstart_dict()
    data["model"]["dtype"] = "float32"
    data["checkpointing"] = {"mode": "unsloth", "host_embeddings": True}
    data["kernels"] = {"fused_cross_entropy": True}
    rows = data["training"].get("batch_size", 1)
    data["data"]["max_length"] = STREAM_HEAD_MIN_TOKENS // rows  # a batch of training rows reaches it
    built = build_model(load_recipe(write(tmp_path, data)), torch.device("cpu"))
    model, head = built.model, built.model.get_output_embeddings()
    assert head.streams_the_loss
    short = {**data, "data": {**data["data"], "max_length": STREAM_HEAD_MIN_TOKENS // rows - 1}}
    assert not build_model(load_recipe(write(tmp_path, short, "short.yaml")), torch.device("cpu")).model \
        .get_output_embeddings().streams_the_loss
    vocab = head.shape[0]
    head.rows_per_chunk = vocab // 3 + 1  # 3 blocks, the last partial
    reads = []
    fetch_whole, read_blocks = host_memory.HostLMHead.prefetch, host_memory.HostLMHead.chunks

    def counted_fetch(self):
        if self._on_device is None:
            reads.append("whole")
        fetch_whole(self)

    def counted_blocks(self):
        reads.append("blocks")
        yield from read_blocks(self)

    monkeypatch.setattr(host_memory.HostLMHead, "prefetch", counted_fetch)
    monkeypatch.setattr(host_memory.HostLMHead, "chunks", counted_blocks)
    ids = torch.randint(0, vocab, (1, 48), generator=torch.Generator().manual_seed(0))  # a short batch
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(streams):
        head.streams_the_loss = streams
        reads.clear()
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable], list(reads)

    whole_loss, whole_grads, whole_reads = step(False)
    streamed_loss, streamed_grads, streamed_reads = step(True)
    assert whole_reads == ["whole"] and streamed_reads == ["blocks"]
    torch.testing.assert_close(streamed_loss, whole_loss)
    for streamed, whole in zip(streamed_grads, whole_grads, strict=True):
        torch.testing.assert_close(streamed, whole)
    # an evaluation forward streams too, and leaves no whole head behind for the next step
    reads.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, whole_loss)
    assert reads == ["blocks"] and head._on_device is None


@pytest.mark.parametrize("workflow,overrides", [("dpo", []), ("grpo", ["grpo.beta=0.04"])])
def test_trained_biases_with_a_reference_are_refused_by_key(workflow, overrides):
    """DPO's reference, and GRPO's with beta > 0, is the model as training starts: biases trained
    with the adapter would move it, and TRL's frozen copy of an adapter with biases fails in peft."""
    recipe = REPO / "recipes" / f"{workflow}-quickstart.yaml"
    with pytest.raises(RecipeError, match="lora.bias"):
        load_recipe(recipe, ["model.adapter=null", "lora.bias=all", *overrides])
    load_recipe(recipe, ["model.adapter=null", "lora.bias=none", *overrides])
    if workflow == "grpo":  # without a reference, biases may train
        load_recipe(recipe, ["model.adapter=null", "lora.bias=all", "grpo.beta=0"])


def test_dpo_loss_types_are_trls_and_a_bad_one_is_named_before_the_model_loads():
    """dpo.loss_type takes the losses TRL's DPOTrainer computes (checked against its source: a loss
    TRL adds or drops fails here), and exo_pair's need of a label smoothing is the recipe's error,
    not TRL's at the trainer's start."""
    import inspect
    import re
    from typing import get_args

    from trl import DPOTrainer

    from ftune.recipe import DPOLossType

    trls = set(re.findall(r'loss_type == "(\w+)"', inspect.getsource(DPOTrainer._compute_loss)))
    assert trls == set(get_args(DPOLossType)), f"TRL's DPO losses are now {sorted(trls)}: update ftune.recipe.DPOLossType"
    recipe = REPO / "recipes" / "dpo-quickstart.yaml"
    with pytest.raises(RecipeError, match="dpo.loss_type: got 'sigmod'") as caught:
        load_recipe(recipe, ["dpo.loss_type=sigmod"])
    assert "'sigmoid'" in str(caught.value)
    with pytest.raises(RecipeError, match="dpo.label_smoothing: the exo_pair loss"):
        load_recipe(recipe, ["dpo.loss_type=exo_pair"])
    assert load_recipe(recipe, ["dpo.loss_type=exo_pair", "dpo.label_smoothing=0.001"]).dpo.loss_type == "exo_pair"
