"""Contract tests of ftune's patches of transformers' Trainer and TRL's trainers: what each relies on
still holds. A failure names the module of ftune/integrations/ to check against the new version."""

from __future__ import annotations

import inspect
import io
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import transformers
import trl
from datasets import Dataset
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainerControl, TrainerState,
                          TrainingArguments)
from transformers.integrations import TensorBoardCallback, get_reporting_integration_callbacks
from transformers.optimization import get_scheduler
from transformers.trainer_utils import rotate_checkpoints

from ftune.integrations import transformers_trainer as trainer_patches
from ftune.integrations.transformers_trainer import (STAGING, BestCheckpoint, ContinueWithNewLearningRate,
                                                     EveryAdapterResumed, ParameterCountOnce, StagedCheckpoints,
                                                     run_trackers_last)
from ftune.integrations.peft import switch_without_grad_flags, switchable_layers
from ftune.integrations.trl import LossFromModel, ReferenceAdapterSwitch, ReferenceRidesTraining
from tests.conftest import REPO
from tests.helpers import assert_relatively_close

TRAINER_MOVED = (f"transformers {transformers.__version__} changed what ftune/integrations/transformers_trainer.py "
                 "relies on (checked against 5.17.0)")
TRL_MOVED = f"trl {trl.__version__} changed what ftune/integrations/trl.py relies on (checked against 1.16.0)"


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def _arguments(output_dir, **overrides) -> TrainingArguments:
    return TrainingArguments(**{"output_dir": str(output_dir), "use_cpu": True, "report_to": "none",
                                "disable_tqdm": True, **overrides})


class _Staged(StagedCheckpoints, Trainer):
    def checkpoint_staged(self, folder):
        self.staged = getattr(self, "staged", []) + [(folder, sorted(p.name for p in folder.iterdir()))]


def _staged_trainer(output_dir, **arguments) -> _Staged:
    trainer = _Staged(model=_tiny_model(), args=_arguments(output_dir, **arguments))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    return trainer


class _Resumed(EveryAdapterResumed, Trainer):
    pass


def test_a_checkpoint_with_a_second_adapter_resumes_the_trained_one(tmp_path):
    """peft saves `default` in the folder and `ref` in ref/ (as in every DPO checkpoint); resumed,
    both hold their saved weights and `default` trains. transformers' own load leaves `default` as
    the model had it: while it does, EveryAdapterResumed is needed."""
    from peft import LoraConfig, get_peft_model

    def peft_model():
        model = get_peft_model(_tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        model.add_adapter("ref", model.peft_config["default"])
        return model

    def weights(model, adapter):
        return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}

    trained = peft_model()
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5 if ".default." in name else -0.25)
    trained.save_pretrained(tmp_path, selected_adapters=["default", "ref"])
    assert (tmp_path / "ref").is_dir() and (tmp_path / "adapter_model.safetensors").is_file(), TRAINER_MOVED

    upstream = peft_model()
    Trainer(model=upstream, args=_arguments(tmp_path / "upstream"))._load_from_checkpoint(str(tmp_path))
    assert all(p.abs().sum() == 0 for n, p in weights(upstream, "default").items() if "lora_B" in n), \
        f"{TRAINER_MOVED}: it now resumes the adapter in the checkpoint's own folder; EveryAdapterResumed can go"
    resumed = peft_model()
    _Resumed(model=resumed, args=_arguments(tmp_path / "resumed"))._load_from_checkpoint(str(tmp_path))
    for adapter in ("default", "ref"):
        for name, value in weights(trained, adapter).items():
            torch.testing.assert_close(dict(resumed.named_parameters())[name], value, rtol=0, atol=0)
    assert resumed.active_adapters == ["default"]
    assert all(p.requires_grad == (".default." in n) for n, p in resumed.named_parameters() if "lora_" in n)


class _Counted(ParameterCountOnce, Trainer):
    pass


def test_floating_point_ops_as_transformers_counts_them_with_one_parameter_count(tmp_path, monkeypatch):
    """The training loop still adds floating_point_ops(inputs) per step into total_flos, and ours is
    transformers' own figure, from one count of the parameters however many steps ask."""
    assert "self.floating_point_ops(inputs)" in inspect.getsource(Trainer._run_epoch), TRAINER_MOVED
    trainer = _Counted(model=_tiny_model(), args=_arguments(tmp_path))
    counts = []
    count_parameters = trainer.model.num_parameters
    monkeypatch.setattr(trainer.model, "num_parameters", lambda **kw: counts.append(kw) or count_parameters(**kw))
    for tokens in (5, 9, 9):
        inputs = {"input_ids": torch.zeros(2, tokens, dtype=torch.long)}
        assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs), TRAINER_MOVED
    assert len(counts) == 1 + 3  # ours once, transformers' at every call
    assert trainer.floating_point_ops({"labels": torch.zeros(2, 3)}) == 0  # no main input: no count, as upstream

    from peft import LoraConfig, get_peft_model  # a model whose adapters change: counted again

    trainer.model = get_peft_model(_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    counted = []
    for change in (lambda: None, lambda: trainer.model.add_adapter("other", LoraConfig(r=8, target_modules=["v_proj"])),
                   lambda: trainer.model.delete_adapter("other"),  # and added again, with other targets
                   lambda: trainer.model.add_adapter("other", LoraConfig(r=8, target_modules=["k_proj", "o_proj"]))):
        change()
        counted.append(trainer.floating_point_ops(inputs))
        assert counted[-1] == Trainer.floating_point_ops(trainer, inputs)
    assert counted[0] < counted[1] and counted[2] == counted[0] < counted[3]


def test_save_checkpoint_writes_into_output_dir_as_read_at_the_call(tmp_path):
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"], TRAINER_MOVED
    trainer = _staged_trainer(tmp_path, save_total_limit=2)
    for step in (1, 2, 3):
        trainer.state.global_step = step
        trainer._save_checkpoint(trainer.model, None)
    # each checkpoint was whole in the staging folder before its rename: StagedCheckpoints pointed
    # transformers' args.output_dir there for the write
    folder, files = trainer.staged[-1]
    assert folder == tmp_path / STAGING / "checkpoint-3", TRAINER_MOVED
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(files), TRAINER_MOVED
    # renamed into place, staging gone, rotated to save_total_limit in the real folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"], TRAINER_MOVED
    assert trainer.args.output_dir == str(tmp_path) and trainer.args.save_total_limit == 2


def test_no_checkpoint_when_it_is_not_wanted(tmp_path):
    trainer = _staged_trainer(tmp_path)
    trainer.checkpoint_wanted = lambda: False
    trainer.state.global_step = 1
    trainer._save_checkpoint(trainer.model, None)
    assert not list(tmp_path.iterdir())


def test_best_checkpoint_is_recorded_by_its_staging_path_then_pointed_at_the_renamed_folder(tmp_path):
    trainer = _staged_trainer(tmp_path, save_strategy="steps")
    best = BestCheckpoint(tmp_path, save_total_limit=2)
    control = TrainerControl()
    for step in (1, 2, 3):
        trainer.state.global_step = step
        trainer.state.best_global_step = 1  # the first checkpoint stays the best
        trainer._save_checkpoint(trainer.model, None)
        if step == 1:
            # transformers records the best checkpoint by the folder it just wrote it in
            assert trainer.state.best_model_checkpoint == os.path.join(tmp_path, STAGING, "checkpoint-1"), TRAINER_MOVED
        best.on_save(trainer.args, trainer.state, control)
        assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    # rotated to two, the best kept: transformers' rotate_checkpoints with best_model_checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"], TRAINER_MOVED


def test_rotate_checkpoints_takes_the_arguments_ftune_passes():
    parameters = inspect.signature(rotate_checkpoints).parameters
    assert {"output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"} <= set(parameters), TRAINER_MOVED


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
def test_a_resumed_schedule_continues_at_the_new_learning_rate(tmp_path, kind):
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lambdas = getattr(scheduler, "lr_lambdas", None)
    assert lambdas is not None and hasattr(scheduler, "_last_lr"), TRAINER_MOVED  # a LambdaLR
    factor = lambdas[0](scheduler.last_epoch)
    state = TrainerState(global_step=5)
    ContinueWithNewLearningRate().on_train_begin(_arguments(tmp_path, learning_rate=4e-4), state, TrainerControl(),
                                                 optimizer=optimizer, lr_scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * factor)
    assert scheduler.get_last_lr() == [pytest.approx(4e-4 * factor)], TRAINER_MOVED
    optimizer.step()
    scheduler.step()  # the next step follows the schedule from the new rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * lambdas[0](6)), TRAINER_MOVED


def test_optimizer_state_loads_at_a_cpu_rank_location():
    source = inspect.getsource(Trainer._load_optimizer_and_scheduler)
    assert "map_location = self.args.device if self.args.world_size > 1" in source, (
        f"{TRAINER_MOVED}: it no longer loads optimizer states at args.device under several processes; "
        "load_optimizer_state_on_cpu_ranks may no longer be needed")
    buffer = io.BytesIO()
    torch.save({"exp_avg": torch.ones(3)}, buffer)
    trainer_patches.load_optimizer_state_on_cpu_ranks()
    trainer_patches.load_optimizer_state_on_cpu_ranks()  # once per process, however often asked
    assert sum(entry[2] is trainer_patches._restore_indexed_cpu
               for entry in torch.serialization._package_registry) == 1
    buffer.seek(0)
    loaded = torch.load(buffer, map_location=torch.device("cpu", 1), weights_only=True)
    assert loaded["exp_avg"].device.type == "cpu"


def test_tensorboard_callback_keeps_a_logging_dir_set_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert get_reporting_integration_callbacks(["tensorboard"]) == [TensorBoardCallback], TRAINER_MOVED
    trainer = Trainer(model=_tiny_model(), args=_arguments(tmp_path / "run", report_to=["tensorboard"]))
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    run_trackers_last(trainer)
    callbacks = trainer.callback_handler.callbacks
    assert type(callbacks[-1]) is TensorBoardCallback and len(callbacks) == len(names)
    callback = callbacks[-1]
    assert callback.logging_dir == str(tmp_path / "run" / "tensorboard")
    callback.on_train_begin(trainer.args, TrainerState(), TrainerControl())
    assert callback.tb_writer.log_dir == str(tmp_path / "run" / "tensorboard"), TRAINER_MOVED
    callback.on_train_end(trainer.args, TrainerState(), TrainerControl())


class _SFT(LossFromModel, trl.SFTTrainer):
    pass


class _ModelComputingItsLoss(torch.nn.Module):
    """Stands for a model with ftune's fused loss: returns the loss and the sums TRL's metrics need."""

    training = True

    def forward(self, **inputs):
        self.inputs = inputs
        return SimpleNamespace(loss=torch.tensor(2.0), num_tokens=torch.tensor(4), entropy_sum=torch.tensor(6.0),
                               num_correct=torch.tensor(1))


def test_sft_metrics_come_from_the_model_computed_loss(tmp_path):
    parameters = list(inspect.signature(trl.SFTTrainer.compute_loss).parameters)
    assert parameters == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"], TRL_MOVED
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "quickstart" / "tokenizer")
    model = _tiny_model()
    model.resize_token_embeddings(len(tokenizer))
    trainer = _SFT(model=model, args=trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                    max_length=32),
                   train_dataset=Dataset.from_list([{"text": "one two three"}, {"text": "four five"}]),
                   processing_class=tokenizer)
    assert isinstance(trainer._metrics, dict) and set(trainer._metrics) == {"train", "eval"}, TRL_MOVED
    assert all(isinstance(m, defaultdict) for m in trainer._metrics.values()), TRL_MOVED
    assert trainer._total_train_tokens == 0, TRL_MOVED

    trainer.loss_from_model = True
    trainer.model.train()
    stand_in = _ModelComputingItsLoss()
    loss = trainer.compute_loss(stand_in, {"input_ids": torch.ones(1, 5, dtype=torch.long),
                                           "labels": torch.ones(1, 5, dtype=torch.long),
                                           "attention_mask": torch.ones(1, 5, dtype=torch.long)}, num_items_in_batch=4)
    assert loss.item() == 2.0 and stand_in.inputs["num_items_in_batch"] == 4 and stand_in.inputs["use_cache"] is False
    trainer.log({"loss": 2.0})
    logged = trainer.state.log_history[-1]
    # SFTTrainer.log averages each _metrics list into the log it writes
    assert logged.get("entropy") == pytest.approx(1.5), (TRL_MOVED, logged)
    assert logged.get("mean_token_accuracy") == pytest.approx(0.25), (TRL_MOVED, logged)
    assert logged.get("num_tokens") == 5, (TRL_MOVED, logged)
    # a padding-free batch has no attention mask: its tokens are its whole length, as TRL counts them
    trainer.compute_loss(stand_in, {"input_ids": torch.ones(1, 7, dtype=torch.long),
                                    "labels": torch.ones(1, 7, dtype=torch.long),
                                    "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}, num_items_in_batch=4)
    trainer.log({"loss": 2.0})
    assert trainer.state.log_history[-1].get("num_tokens") == 12


class _DPO(ReferenceAdapterSwitch, trl.DPOTrainer):
    pass


def _dpo_trainer(output_dir) -> tuple[_DPO, object]:
    """TRL's DPOTrainer with ftune's reference switch over a new LoRA adapter on the tiny model, two
    preference rows; and its peft model."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "quickstart" / "tokenizer")
    model = _tiny_model()
    model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    rows = [{"prompt": "one two", "chosen": " three four", "rejected": " five"},
            {"prompt": "six", "chosen": " seven", "rejected": " eight nine"}]
    trainer = _DPO(model=model, ref_model=None, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                   args=trl.DPOConfig(output_dir=str(output_dir), use_cpu=True, report_to="none", max_length=32,
                                      per_device_train_batch_size=2))
    return trainer, model


def test_dpo_reference_pass_switches_adapters_without_peft_walks(tmp_path, monkeypatch):
    """The loss with the quick switch is TRL's own, with a trained adapter unlike its frozen `ref`
    copy (a switch that missed a layer would mix the two); no tuner layer's set_adapter runs (peft's
    requires_grad walk); afterwards the trained adapter is active and trainable, `ref` frozen. With
    gradients on or inference_mode, peft's switch runs, and after it every later one in the context
    (so the trained adapter is marked trainable again); an adapter added between steps has its
    layers listed too."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert list(inspect.signature(trl.DPOTrainer._compute_loss).parameters) == \
        ["self", "model", "inputs", "return_outputs"], TRL_MOVED
    assert "use_adapter(" in inspect.getsource(trl.DPOTrainer._compute_loss), TRL_MOVED
    trainer, model = _dpo_trainer(tmp_path)
    assert "ref" in model.peft_config, TRL_MOVED  # TRL's frozen copy of the adapter being trained
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    switches = []
    peft_switch = BaseTunerLayer.set_adapter
    monkeypatch.setattr(BaseTunerLayer, "set_adapter", lambda *a, **kw: switches.append(a) or peft_switch(*a, **kw))
    loss = trainer._compute_loss(model, dict(inputs), False)  # first: no peft switch has run since TRL's setup
    assert switches == []
    assert model.active_adapter == "default" and "set_adapter" not in model.__dict__
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    assert layers and all(layer.active_adapters == ["default"] for layer in layers)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert parameter.requires_grad == (".default." in name), name
    expected = trl.DPOTrainer._compute_loss(trainer, model, dict(inputs), False)
    assert switches, TRL_MOVED  # TRL's own reference pass goes through peft's switch
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)

    switches.clear()
    with torch.enable_grad(), switch_without_grad_flags(model, switchable_layers(model)):
        model.set_adapter("ref")  # with gradients on: peft's own switch
        model.set_adapter("default")
    assert switches
    switches.clear()
    with torch.no_grad(), switch_without_grad_flags(model, switchable_layers(model)):
        model.set_adapter("ref", inference_mode=True)  # it freezes the adapter: peft's own switch,
        model.set_adapter("default")  # which froze "default" too: peft's switch back marks it again
    assert len(switches) == 2 * len(layers)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)

    # an adapter added between steps targets other modules: the switch lists its layers too
    model.add_adapter("extra", LoraConfig(r=4, target_modules=["k_proj"]))
    model.set_adapter("default")
    trainer._compute_loss(model, dict(inputs), False)
    assert set(trainer._switchable[2]) == set(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    assert len(trainer._switchable[2]) > len(layers)


def test_a_new_adapters_reference_pass_runs_with_the_adapters_off_without_peft_walks(tmp_path, monkeypatch):
    """A new adapter's frozen copy `ref` computes what the base model does: without it
    (use_base_as_reference) TRL's loss is the one it computes with it, once the trained adapter has
    moved. The reference pass turns the adapters off by their flags alone, no peft walk (its model
    status, its enable and disable of every layer); afterwards every layer's adapter is on and only
    the trained one trains. With gradients on, peft's own disable runs."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    from ftune.integrations.trl import use_base_as_reference

    assert "with model.disable_adapter():" in inspect.getsource(trl.trainer.utils.use_adapter), TRL_MOVED
    trainer, model = _dpo_trainer(tmp_path)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:  # training has moved the adapter away from its copy
                parameter.add_(torch.randn_like(parameter) * 0.5)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with_copy = trl.DPOTrainer._compute_loss(trainer, model, dict(inputs), False)

    assert use_base_as_reference(model) and "ref" not in model.peft_config and not use_base_as_reference(model)
    walks = []
    for owner, name in ((PeftModel, "get_model_status"), (BaseTuner, "disable_adapter_layers"),
                        (BaseTuner, "enable_adapter_layers"), (BaseTunerLayer, "enable_adapters")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _original=original, _name=name, **kw:
                            walks.append(_name) or _original(*a, **kw))
    loss = trainer._compute_loss(model, dict(inputs), False)
    assert walks == []
    torch.testing.assert_close(loss, with_copy, rtol=0, atol=1e-6)
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    assert layers and not any(layer.disable_adapters for layer in layers) and not model._adapters_disabled
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad(), switch_without_grad_flags(model, switchable_layers(model)):  # an error inside
        with pytest.raises(RuntimeError), model.disable_adapter():
            assert all(layer.disable_adapters for layer in layers) and model._adapters_disabled
            raise RuntimeError
    assert not any(layer.disable_adapters for layer in layers) and not model._adapters_disabled and walks == []
    with torch.enable_grad(), switch_without_grad_flags(model, switchable_layers(model)):
        with model.disable_adapter():
            assert all(layer.disable_adapters for layer in layers)
    assert walks and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


class _Riding(ReferenceAdapterSwitch, ReferenceRidesTraining, trl.DPOTrainer):
    pass


def _riding_trainer(output_dir, lora_dropout: float = 0.0, ftune_forward: bool = False, engine: str | None = None,
                    device: str = "cpu") -> tuple[_Riding, object]:
    """_dpo_trainer's run, with ftune's ride, the base model as reference and a moved adapter; with
    `engine`, on tests.helpers' tiny Llama whose layers run through ftune's checkpointing engine in
    that mode (and, on CUDA, ftune's LoRA forward and kernels in bf16)."""
    from peft import LoraConfig, get_peft_model

    from ftune.integrations.peft import install_lora_forward
    from ftune.integrations.trl import use_base_as_reference
    from tests.helpers import tiny_lora_model

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "quickstart" / "tokenizer")
    if engine is None:
        model = _tiny_model()
        model.resize_token_embeddings(len(tokenizer))
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=lora_dropout,
                                                 target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    else:
        model, _ = tiny_lora_model("tiny-llama", engine)
    on_gpu = device == "cuda"
    if on_gpu:
        from ftune.integrations.transformers import apply_kernels

        apply_kernels(model.to(device), fused_cross_entropy=False, fused_lora=True)
    elif ftune_forward:
        install_lora_forward(model)
    rows = [{"prompt": "one two", "chosen": " three four", "rejected": " five"},
            {"prompt": "six", "chosen": " seven", "rejected": " eight nine"}]
    trainer = _Riding(model=model, ref_model=None, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(rows),
                      args=trl.DPOConfig(output_dir=str(output_dir), use_cpu=not on_gpu, bf16=on_gpu,
                                         report_to="none", max_length=32, per_device_train_batch_size=2))
    use_base_as_reference(model)
    trainer.reference_may_ride = True
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:  # training has moved the adapter: the policy is not the reference
                parameter.add_(torch.randn_like(parameter) * 0.5)
    return trainer, model


def _counted_riding_trainer(output_dir, ride: bool, **setting):
    """_riding_trainer's, riding or not, with the shapes of every call of TRL's fused forward
    counted; and a batch of its data."""
    trainer, model = _riding_trainer(output_dir, **setting)
    trainer.reference_may_ride = ride
    base = model.get_base_model()
    fused, calls = base.forward, []
    base.forward = lambda *a, **kw: calls.append(kw["input_ids"].shape) or fused(*a, **kw)
    return trainer, model, calls, next(iter(trainer.get_train_dataloader()))


def _ride_against_trl(tmp_path, **setting) -> None:
    """With the reference's rows in the training forward, one forward runs where TRL runs two, over
    the batch twice; the loss, TRL's logged metrics and the adapter's gradients are those of TRL's
    own step, whose reference pass runs with the adapters off. Afterwards the adapters' dropouts,
    the model's forward and the trainer's reading of precomputed reference log-probabilities are
    TRL's and peft's again."""
    from torch import nn

    assert list(inspect.signature(trl.DPOTrainer.training_step).parameters)[:1] == ["self"], TRL_MOVED
    source = inspect.getsource(trl.DPOTrainer._compute_loss)
    policy_call = source.index("outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)")
    assert policy_call < source.index('inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]'), TRL_MOVED
    on_gpu = setting.get("device") == "cuda"
    results = {}
    for ride in (True, False):
        trainer, model, calls, inputs = _counted_riding_trainer(tmp_path / str(ride), ride, **setting)
        results[ride] = (*_one_step(trainer, model, inputs), calls)
        rows = inputs["input_ids"].shape[0]
        dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
        assert dropouts and all(isinstance(d, nn.Identity) for d in dropouts)
        assert model.get_base_model().forward.__name__ == "<lambda>" and not trainer.precompute_ref_logps
    (loss, grads, metrics, calls), (expected_loss, expected_grads, expected_metrics, expected_calls) = \
        results[True], results[False]
    assert [shape[0] for shape in expected_calls] == [rows, rows]  # TRL's: the policy, then the reference
    assert [shape[0] for shape in calls] == [2 * rows]
    assert metrics["rewards/margins"] != 0  # the policy is not the reference: the comparison can fail
    # bf16 GEMMs over four rows instead of two: the same sums, other tilings. These tolerances are
    # set ahead of a measurement (the test has not run on a GPU yet); a gate that failed would make
    # the margin 0, which the assertion above catches whatever they are.
    if on_gpu:
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=2e-3)
        assert_relatively_close(grads, expected_grads, 2e-2)
        assert metrics["rewards/margins"] == pytest.approx(expected_metrics["rewards/margins"], rel=5e-2, abs=1e-3)
        return
    _assert_the_same_step((loss, grads, metrics), (expected_loss, expected_grads, expected_metrics))


def _one_step(trainer, model, inputs) -> tuple:
    """TRL's training step on `inputs` as its training loop runs it: the loss, the gradients and
    the metrics it logged."""
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # as the training loop sets it
    loss = trainer.training_step(model, inputs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_the_same_step(step: tuple, expected: tuple) -> None:
    """_one_step's results equal on CPU in fp32: other summation orders only."""
    (loss, grads, metrics), (expected_loss, expected_grads, expected_metrics) = step, expected
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert metrics.keys() == expected_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("setting", [{}, {"ftune_forward": True}, {"engine": "unsloth"}, {"engine": "true"}],
                         ids=["peft-forward", "ftune-forward", "engine-unsloth", "engine-true"])
def test_a_base_references_rows_ride_the_training_forward(tmp_path, setting):
    _ride_against_trl(tmp_path, **setting)


@pytest.mark.gpu
def test_a_base_references_rows_ride_the_training_forward_on_the_gpu(tmp_path):
    """The same through ftune's engine (unsloth: offloaded inputs, recomputed layers), its LoRA
    forward and kernels, in bf16 on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _ride_against_trl(tmp_path, engine="unsloth", device="cuda")


@pytest.mark.parametrize("ride", [False, True], ids=["reference-pass", "reference-rides"])
def test_trls_fused_head_reads_a_streaming_host_head_in_blocks(tmp_path, ride):
    """DPO's step with the LM head in host memory, read by TRL's fused head a block at a time
    (integrations.trl.stream_the_fused_head): the loss, TRL's logged metrics and the adapter's
    gradients are those of TRL's own kernel over the whole head; the head is never fetched whole,
    and the blocks are read once in the forward and once in the backward of each loss."""
    from ftune.engine.host_memory import HostLMHead, move_tables_to_host
    from ftune.integrations.trl import FUSED_HEAD_SETTINGS, stream_the_fused_head

    results = {}
    for streamed in (True, False):
        trainer, model = _riding_trainer(tmp_path / str(streamed))
        trainer.reference_may_ride = ride
        reads = []
        if streamed:
            move_tables_to_host(model, torch.device("cpu"), lm_head=True, stream_head=True)
            head = model.get_base_model().get_output_embeddings()
            assert isinstance(head, HostLMHead)
            head.rows_per_chunk = 100  # blocks of uneven size: 512 rows in six
            chunks = head.chunks
            head.chunks = lambda: reads.append(head.on_device) or chunks()
            assert stream_the_fused_head(model), f"TRL's fused head no longer holds {FUSED_HEAD_SETTINGS}"
        results[streamed] = _one_step(trainer, model, next(iter(trainer.get_train_dataloader())))
        results[streamed, "reads"] = reads
    # the policy's loss and, without the ride, TRL's reference pass (no backward): one read each, and one more
    assert results[True, "reads"] == [False] * (2 if ride else 3)
    assert results[True][2]["rewards/margins"] != 0
    _assert_the_same_step(results[True], results[False])


def test_a_base_references_rows_ride_the_evaluation_forward(tmp_path):
    """An evaluation step rides as a training step does: one forward without gradients over the
    batch twice, TRL's loss and logged metrics."""
    results = {}
    for ride in (True, False):
        trainer, model, calls, inputs = _counted_riding_trainer(tmp_path / str(ride), ride, engine="unsloth")
        model.eval()
        loss, _, _ = trainer.prediction_step(model, inputs, prediction_loss_only=True)
        results[ride] = (loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}, calls)
    (loss, metrics, calls), (expected_loss, expected_metrics, expected_calls) = results[True], results[False]
    rows = inputs["input_ids"].shape[0]
    assert [c[0] for c in calls] == [2 * rows] and [c[0] for c in expected_calls] == [rows, rows]
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    assert metrics.keys() == expected_metrics.keys() and metrics["rewards/margins"] != 0
    for key in metrics:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-6), key


def test_ftunes_lora_forward_gates_the_adapters_product_not_a_copy_of_its_input(tmp_path):
    """Under the ride's gate, the projections that read one input (q and v here) save that input
    once for their backward, as without the gate, and r values a token more each: a short step
    that keeps its layers (memory.estimate's keep_bytes_per_layer) holds no gated copy of it per
    projection, which peft's own forward, gating the input, saves. The outputs are the same, bit
    for bit."""
    from ftune.integrations.peft import adapters_on_first_rows, install_lora_forward, row_gateable_layers

    trainer, model = _riding_trainer(tmp_path)
    layers = row_gateable_layers(model)
    attention = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(4, 8, attention.q_proj.in_features, requires_grad=True)

    def saved_bytes() -> tuple[int, torch.Tensor]:
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = torch.cat([attention.q_proj(x), attention.v_proj(x)], dim=-1)
        return sum(storages.values()), output

    with adapters_on_first_rows(layers, 2, 4, 8):
        peft_bytes, expected = saved_bytes()
    install_lora_forward(model)
    plain, _ = saved_bytes()
    with adapters_on_first_rows(layers, 2, 4, 8):
        gated, output = saved_bytes()
    assert torch.equal(output, expected)
    rank = attention.q_proj.lora_A["default"].weight.shape[0]
    assert gated - plain <= 2 * (4 * 8 * rank * 4 + 64)  # each gated product, and the mask
    assert peft_bytes - plain >= x.numel() * 4  # a second gated copy of the input


def test_the_reference_rides_only_where_its_rows_are_the_base_models(tmp_path):
    """No ride with adapter dropout (the gate stands in for it), in a step longer than the rule
    allows, or without the trainer's leave; an input the gate cannot split into the batch's rows is
    refused, not gated wrongly."""
    from ftune.integrations.peft import adapters_on_first_rows, row_gateable_layers
    from ftune.memory.estimate import REFERENCE_RIDES_MAX_TOKENS, reference_rides

    trainer, model = _riding_trainer(tmp_path / "dropout", lora_dropout=0.1)
    assert row_gateable_layers(model) == []
    assert trainer._reference_ride({"input_ids": torch.ones(2, 8, dtype=torch.long)}) is None
    trainer, model = _riding_trainer(tmp_path / "plain")
    layers = row_gateable_layers(model)
    assert layers
    assert trainer._reference_ride({"input_ids": torch.ones(2, 8, dtype=torch.long)}) is not None
    long = REFERENCE_RIDES_MAX_TOKENS // 2 + 1
    assert trainer._reference_ride({"input_ids": torch.ones(2, long, dtype=torch.long)}) is None
    assert not reference_rides(REFERENCE_RIDES_MAX_TOKENS, intermediate=14336 * 4)  # its MLP would chunk
    trainer.reference_may_ride = False
    assert trainer._reference_ride({"input_ids": torch.ones(2, 8, dtype=torch.long)}) is None
    with adapters_on_first_rows(layers, 2, 4, 8):
        gate = layers[0].lora_dropout["default"]
        x = torch.ones(4, 8, 16)
        assert gate(x)[:2].eq(1).all() and gate(x)[2:].eq(0).all()
        assert gate(x.view(32, 16)).view(4, 8, 16).equal(gate(x))  # the engine's MLP: the rows' tokens flattened
        with pytest.raises(RuntimeError, match="rows"):
            gate(torch.ones(16, 16))  # a chunk of the tokens: which row is which is unknown


def test_grpos_reference_for_a_new_adapter_is_the_base_model_without_trls_copy(tmp_path):
    """With beta > 0 GRPOTrainer adds a frozen copy `ref` of the adapter; for a new one, whose zero B
    matrices make it the base model, TRL's reference log-probabilities without the copy (deleted by
    use_base_as_reference: the adapters off, TRL's own path where no `ref` exists) are the ones it
    computes with it, once the trained adapter has moved away from both."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import use_adapter

    from ftune.integrations.trl import use_base_as_reference

    source = inspect.getsource(trl.GRPOTrainer._generate_and_score_completions)
    assert 'use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)' in source, TRL_MOVED
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "quickstart" / "tokenizer")
    model = _tiny_model()
    model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))

    def constant_reward(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = trl.GRPOTrainer(model=model, reward_funcs=constant_reward, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": "one two"}, {"prompt": "six"}]),
                              args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", beta=0.04,
                                                  num_generations=2, per_device_train_batch_size=2,
                                                  max_completion_length=4))
    assert "ref" in model.peft_config, TRL_MOVED
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:  # training has moved the adapter away from its copy
                parameter.add_(torch.randn_like(parameter) * 0.5)
    ids = tokenizer(["one two three four five"], return_tensors="pt").input_ids
    mask = torch.ones_like(ids)

    def log_probabilities(adapter):
        with torch.no_grad(), use_adapter(model, adapter_name=adapter):
            return trainer._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep=3)[0]

    with_copy, trained = log_probabilities("ref"), log_probabilities("default")
    # the adapter has moved (the tiny model's log-probabilities by about 2e-4): the comparison can fail
    assert (trained - with_copy).abs().max() > 100 * 1e-6
    assert use_base_as_reference(model) and "ref" not in model.peft_config
    torch.testing.assert_close(log_probabilities(None), with_copy, rtol=0, atol=1e-6)


@pytest.mark.parametrize("guarded", [True, False], ids=["ftune", "trl-alone"])
def test_paged_grpo_generation_leaves_the_adapter_in_float32(tmp_path, guarded):
    """TRL's paged GRPO generation casts the whole model to bf16 before each generation, under bf16
    as on a GPU; ftune gives the float32 adapter back once each generation ends
    (restore_the_adapter_after_paged_generation), and it trains. Without that the step ends with a
    bf16 adapter: the case it is for."""
    from peft import LoraConfig, get_peft_model

    from ftune.integrations.trl import restore_the_adapter_after_paged_generation

    source = inspect.getsource(trl.GRPOTrainer._generate_single_turn)
    assert "unwrapped_model.to(torch.bfloat16)" in source, TRL_MOVED
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "quickstart" / "tokenizer")
    model = _tiny_model()
    model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model.to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    adapter = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in adapter.values()} == {torch.float32}  # peft's own choice beside a bf16 base
    before = {name: p.detach().clone() for name, p in adapter.items()}

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    trainer = trl.GRPOTrainer(model=model, reward_funcs=length_reward, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": "one two"}, {"prompt": "six"}] * 2),
                              args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True,
                                                  num_generations=2, per_device_train_batch_size=2, max_steps=1,
                                                  max_completion_length=4, learning_rate=1e-2,
                                                  use_transformers_continuous_batching=True,
                                                  transformers_continuous_batching_config={"block_size": 32,
                                                                                           "num_blocks": 8}))
    if guarded:
        restore_the_adapter_after_paged_generation(model, torch.bfloat16)
    trainer.train()
    assert {p.dtype for p in adapter.values()} == ({torch.float32} if guarded else {torch.bfloat16}), TRL_MOVED
    assert any(not torch.equal(p.detach().float(), before[name]) for name, p in adapter.items())


def test_quick_adapter_switch_leaves_auxiliary_modules_to_peft():
    """A LoRA model that also trains whole modules (modules_to_save) switches through peft: its
    wrappers hold per-adapter copies that peft's switch selects."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert switchable_layers(model) == []
    assert switchable_layers(_tiny_model()) == []  # not a peft model
