"""Padding-free batches: a batch of rows laid end to end by TRL's collator trains each row as if it
ran alone, through ftune's model building, in every checkpointing mode, kernels off and on.

The collator (TRL's `DataCollatorForLanguageModeling(padding_free=True)`) restarts the positions at
each row and gives each row's first label -100, so no row's last token learns the next row's first;
transformers builds a block-diagonal causal mask from the positions; the engine's parked attention
reads the rows from `cu_seq_lens_q`. A row that saw another or a label across a boundary changes
the row's loss and its LoRA gradients (checked: a parked mask that lets rows see each other fails
the unsloth cases, labels across boundaries fail every case). Positions that do not restart fail
where transformers' SDPA runs, since its mask is made from them; RoPE itself is relative, so within
a row's block an offset in every position changes nothing but rounding.

A sliding-window model (Phi-3, a window of 4 tokens over rows of 5, 11 and 7: ftune_window)
keeps each row within itself and within the window, where the parked path reads the window with
the rows.

Tolerance: fp32 on CPU. A packed row and the same row alone compute the same sums in another order
(one sequence of 23 tokens against one of 5, 11 or 7): measured at most 2.9e-6 of a tensor's norm
row by row, in every case, the kernels' too. 1e-4 leaves a thirtyfold margin; a parked attention
that lets rows see each other is off by 73 (row 1) and 4.6e4 (row 2).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ftune.engine import attention
from ftune.integrations.transformers import KERNELS
from ftune.model import build_model
from ftune.recipe import validate_recipe
from tests.conftest import REPO
from tests.helpers import assert_relatively_close, lora_grads

RELATIVE_TOLERANCE = 1e-4
LENGTHS = (5, 11, 7)  # tokens of each row; the packed batch holds 23
VOCAB = 512  # tiny-llama's
MODES = ("none", "true", "unsloth", "smart")
# The kernels that see where rows meet: RoPE reads the positions, the fused loss shifts the labels.
# The others work token by token (RMSNorm, SwiGLU) or on the weights (fused LoRA).
BOUNDARY_KERNELS = ("rope", "fused_cross_entropy")
# A tiny Phi-3 whose window of 4 tokens is shorter than two of the rows
WINDOWED = dict(model_type="phi3", vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=4,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)


def _rows() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, VOCAB, (n,), generator=generator).tolist()} for n in LENGTHS]


def _model(mode: str, kernels: tuple[str, ...], source: dict | None = None):
    """ftune's model of the tiny-llama preset, or of `source` (the recipe's model.name_or_path)."""
    source = source or {"preset": "tiny-llama"}
    raw = {"model": {**source, "tokenizer": "(none: token ids)", "dtype": "float32"},
           "quantization": {"method": "none"},
           "checkpointing": {"mode": mode, **({"budget": "64GiB"} if mode == "smart" else {})},
           "kernels": {name: name in kernels for name in KERNELS},
           "data": {"source": "(none: token ids)"}}
    recipe = validate_recipe(raw, base_dir=REPO, check_paths=False)
    built = build_model(recipe, torch.device("cpu"), with_tokenizer=False)
    for parameter in built.model.parameters():  # B non-zero, so that every LoRA gradient is exercised
        if parameter.requires_grad and parameter.dim() == 2 and not parameter.any():
            torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(parameter.numel()))
    built.model.train()
    return built


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def _only_row(batch: dict, row: int) -> dict:
    """The packed batch with the labels of every other row ignored."""
    labels = torch.full_like(batch["labels"], -100)
    start, end = batch["cu_seq_lens_q"][row], batch["cu_seq_lens_q"][row + 1]
    labels[:, start:end] = batch["labels"][:, start:end]
    return dict(batch, labels=labels)


def _count_packed_parking(monkeypatch) -> list[int]:
    """Calls of the parked path's forward for a padding-free batch's rows."""
    calls = [0]
    forward = attention._forward

    def counted(query, key, value, scale, rows=None, window=None):
        calls[0] += rows is not None
        return forward(query, key, value, scale, rows, window)

    monkeypatch.setattr(attention, "_forward", counted)
    return calls


CASES = [(mode, ()) for mode in MODES] + [("unsloth", BOUNDARY_KERNELS)]


@pytest.mark.parametrize("mode,kernels", CASES, ids=[f"{m}-kernels" if k else m for m, k in CASES])
def test_a_packed_batch_trains_each_row_as_if_it_ran_alone(mode, kernels, monkeypatch):
    built = _model(mode, kernels)
    assert {name for name, on in built.kernels.items() if on} == set(kernels)
    _assert_each_row_trains_alone(built, mode, monkeypatch)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory) -> str:
    values = dict(WINDOWED)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("windowed") / "phi3"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("mode", MODES)
def test_a_packed_batch_with_a_sliding_window_trains_each_row_as_if_it_ran_alone(mode, windowed, monkeypatch):
    built = _model(mode, (), {"name_or_path": windowed})
    assert built.plan.attention == "ftune_window"
    _assert_each_row_trains_alone(built, mode, monkeypatch)


def _assert_each_row_trains_alone(built, mode: str, monkeypatch) -> None:
    parked = _count_packed_parking(monkeypatch)
    rows = _rows()
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in packed
    alone = [_loss_and_grads(built.model, DataCollatorForLanguageModeling(pad_token_id=0)([row])) for row in rows]

    for row, (loss, grads) in enumerate(alone):
        got_loss, got_grads = _loss_and_grads(built.model, _only_row(packed, row))
        torch.testing.assert_close(got_loss, loss, rtol=RELATIVE_TOLERANCE, atol=0, msg=f"row {row}")
        assert_relatively_close(got_grads, grads, RELATIVE_TOLERANCE)

    # every row at once: the mean over the batch's labelled tokens, each row weighted by its own
    labelled = torch.tensor([n - 1 for n in LENGTHS], dtype=torch.float32)
    weights = labelled / labelled.sum()
    loss, grads = _loss_and_grads(built.model, packed)
    torch.testing.assert_close(loss, sum(w * l for w, (l, _) in zip(weights, alone)), rtol=RELATIVE_TOLERANCE, atol=0)
    expected = {name: sum(w * g[name] for w, (_, g) in zip(weights, alone)) for name in grads}
    assert_relatively_close(grads, expected, RELATIVE_TOLERANCE)

    if mode == "unsloth":  # offloaded layers parked the packed attention's output (one forward per layer per step)
        assert parked[0] == len(built.engine.layers) * (len(rows) + 1)


def test_the_collator_ignores_each_rows_first_label():
    """What makes a row's last token not learn the next row's first: the label after it is -100
    (the loss and the fused kernel shift labels by one within the one packed sequence)."""
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(_rows())
    starts = packed["cu_seq_lens_q"][:-1]
    assert (packed["labels"][0, starts] == -100).all()
    assert (packed["labels"] != -100).sum() == sum(LENGTHS) - len(LENGTHS)
    assert packed["position_ids"][0].tolist() == [p for n in LENGTHS for p in range(n)]


def _sft_recipe(tmp_path, **sft):
    raw = {"model": {"preset": "tiny-llama", "tokenizer": str(REPO / "data/quickstart/tokenizer"), "dtype": "float32"},
           "quantization": {"method": "none"}, "checkpointing": {"mode": "unsloth"},
           "kernels": dict.fromkeys(KERNELS, False), "sft": sft,
           "data": {"source": str(REPO / "data/quickstart/sft.jsonl"), "max_length": 12, "limit": 6},
           "training": {"batch_size": 3, "output_dir": str(tmp_path / "run")}}
    return validate_recipe(raw, base_dir=REPO)


@pytest.mark.parametrize("sft,layout", [({}, "padding-free"), ({"padding_free": False}, "padded"),
                                         ({"packing": True}, "packed")])
def test_sfts_batches_are_padding_free_unless_the_recipe_says_otherwise(tmp_path, sft, layout):
    from ftune.data import load_training_data
    from ftune.workflows.sft import make_trainer

    recipe = _sft_recipe(tmp_path, **sft)
    built = build_model(recipe, torch.device("cpu"))
    assert built.plan.batches == layout and f"{layout} batches" in built.plan.describe()
    dataset, _ = load_training_data(recipe)
    trainer = make_trainer(recipe, built, dataset, callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    if layout == "padded":
        assert "attention_mask" in batch and "position_ids" not in batch
        return
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    lengths = batch["cu_seq_lens_q"].diff()
    # three rows end to end, or three packed sequences of whole rows; the quickstart's rows are longer
    # than 12 tokens: cut to max_length by ftune (padding-free) or by TRL's packing
    assert len(lengths) == 3 if layout == "padding-free" else len(lengths) >= 3
    assert max(lengths) == recipe.data.max_length
    assert batch["position_ids"][0].tolist() == [p for n in lengths.tolist() for p in range(n)]


def test_packing_without_padding_free_is_refused():
    with pytest.raises(Exception, match="packing lays the packed rows end to end"):
        validate_recipe({"model": {"preset": "tiny-llama", "tokenizer": "(none)"}, "data": {"source": "(none)"},
                         "sft": {"packing": True, "padding_free": False}}, base_dir=REPO, check_paths=False)
