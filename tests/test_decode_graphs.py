"""GRPO's decode steps as replayed CUDA graphs (ftune/engine/decode_graphs.py).

On the CPU the DecodeGraph runs each step eagerly on its static inputs (capture=False): what a
graph would see, the embeddings looked up before it, the cache's positions, the padded prompts'
mask, copied into fixed tensors. The greedy tokens must be transformers' own. On a GPU the graph is
captured and replayed, and must give the same tokens as eager decoding."""

from __future__ import annotations

import pytest
import torch

from ftune.engine import decode_graphs
from ftune.engine.decode_graphs import DecodeGraph, replay_decode_steps, replayable
from ftune.model import build_model
from ftune.recipe import load_recipe
from tests.conftest import QUICKSTART

PROMPTS = ["What is 12 + 7?", "Name a color."]  # of different lengths: the batch is left-padded


def built_quickstart(*overrides: str):
    recipe = load_recipe(QUICKSTART, ["checkpointing.mode=unsloth", "checkpointing.host_embeddings=true", *overrides])
    return build_model(recipe)


def greedy(model, tokenizer, **kwargs) -> torch.Tensor:
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              **kwargs)


@pytest.fixture
def made(monkeypatch) -> list[DecodeGraph]:
    """Every DecodeGraph made while the test runs."""
    graphs: list[DecodeGraph] = []
    init = DecodeGraph.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        graphs.append(self)

    monkeypatch.setattr(DecodeGraph, "__init__", recording)
    return graphs


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_decoding_through_static_inputs_gives_transformers_tokens(made, preset):
    """Qwen2's and Qwen3's configs name their layers' types: their masks come as a dict, one per
    kind of layer, which the static inputs hold too."""
    built = built_quickstart(f"model.preset={preset}")
    model, tokenizer = built.model, built.tokenizer
    model.train()  # as TRL generates: the policy in training mode (no dropout in this recipe)
    eager = greedy(model, tokenizer, cache_implementation="static")
    assert torch.equal(eager, greedy(model, tokenizer))  # the static cache decodes as the dynamic one
    replay_decode_steps(model, capture=False)
    routed = greedy(model, tokenizer, cache_implementation="static")
    assert torch.equal(routed, eager)
    assert len(made) == 1 and made[0].recordings == 1  # one recording, every later step a replay of it
    assert made[0].static["inputs_embeds"].shape[:2] == (2, 1)  # the embedding ran before the graph
    masks = made[0].static["attention_mask"]
    assert isinstance(masks, dict) == (preset != "tiny-llama") and not made[0].failures
    assert torch.equal(greedy(model, tokenizer, cache_implementation="static"), eager)
    assert len(made) == 2  # a graph per generate call: its cache is that call's
    assert torch.equal(greedy(model, tokenizer), eager) and len(made) == 2  # a dynamic cache decodes as before


def test_steps_asked_for_hidden_states_or_attentions_decode_eagerly(made):
    """A replay's outputs are overwritten by the next one: only the logits, which transformers
    copies, may come out of a graph."""
    built = built_quickstart()
    model, tokenizer = built.model, built.tokenizer
    expected = greedy(model, tokenizer, cache_implementation="static", output_hidden_states=True,
                      return_dict_in_generate=True)
    replay_decode_steps(model, capture=False)
    routed = greedy(model, tokenizer, cache_implementation="static", output_hidden_states=True,
                    return_dict_in_generate=True)
    assert torch.equal(routed.sequences, expected.sequences)
    assert len(made) == 1 and made[0].recordings == 0


def test_only_a_static_cache_of_full_layers_is_replayable():
    from transformers import AutoConfig
    from transformers.cache_utils import DynamicCache, StaticCache

    full = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    sliding = AutoConfig.for_model("mistral", num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                   sliding_window=8)
    assert replayable(StaticCache(config=full, max_cache_len=16))
    assert not replayable(StaticCache(config=sliding, max_cache_len=16))  # its length is a Python int
    assert not replayable(DynamicCache(config=full)) and not replayable(None)


def test_a_capture_that_fails_decodes_eagerly_and_says_why(monkeypatch, made, caplog):
    """Where a decode step cannot be captured the run goes on without graphs: the tokens are the
    same, the log says why once, and later calls do not try again."""
    built = built_quickstart()
    model, tokenizer = built.model, built.tokenizer
    expected = greedy(model, tokenizer, cache_implementation="static")

    class Uncapturable:  # stands in for torch.cuda's stream and graph on this CPU
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc):
            return False

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(decode_graphs.torch.cuda, "current_stream", lambda: Uncapturable())
    monkeypatch.setattr(decode_graphs, "side_stream", lambda device: Uncapturable())
    monkeypatch.setattr(decode_graphs.torch.cuda, "stream", lambda stream: torch.no_grad())
    monkeypatch.setattr(decode_graphs.torch.cuda, "CUDAGraph", Uncapturable)
    monkeypatch.setattr(decode_graphs.torch.cuda, "graph", lambda graph, **kwargs: Uncapturable())
    monkeypatch.setattr(decode_graphs, "captures_on", lambda model: True)
    replay_decode_steps(model, capture=True)
    with caplog.at_level("WARNING", logger="ftune.engine.decode_graphs"):
        assert torch.equal(greedy(model, tokenizer, cache_implementation="static"), expected)
        assert torch.equal(greedy(model, tokenizer, cache_implementation="static"), expected)
    assert "operation not permitted" in caplog.text and caplog.text.count("decoding without CUDA graphs") == 1
    # the failed call decodes eagerly; later calls are not routed to a DecodeGraph at all
    assert len(made) == 1 and not made[0].capture and made[0].recordings == 1


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_gpu_replayed_decode_steps_give_eager_tokens(made, preset):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    built = built_quickstart(f"model.preset={preset}", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16")
    model, tokenizer = built.model, built.tokenizer
    model.train()
    eager = greedy(model, tokenizer, cache_implementation="static")
    replay_decode_steps(model)
    assert torch.equal(greedy(model, tokenizer, cache_implementation="static"), eager)
    assert len(made) == 1 and made[0].graph is not None and not made[0].failures
    assert torch.equal(greedy(model, tokenizer, cache_implementation="static"), eager)  # a second call, recaptured
    # Nothing a call captured outlives it (its graph once dropped): GRPO calls generate every step
    made.clear()
    held = torch.cuda.memory_allocated()
    greedy(model, tokenizer, cache_implementation="static")
    made.clear()
    assert torch.cuda.memory_allocated() == held
