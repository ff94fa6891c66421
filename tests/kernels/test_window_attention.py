"""Sliding-window attention (ftune/kernels/window_attention.py): the window's bounds, the mask
function, and tiny Gemma-3 and Phi-3 models running it through transformers' attention interface
against the same models on transformers' sdpa with its dense masks, padded and decoding included.
On the GPU: the flash kernel with the window against SDPA with the window's dense mask.

Tolerance: fp32 on CPU, where ftune_window runs transformers' sdpa with the window's mask (what
its mask function left out): equal to the last bit (measured), 1e-5 leaves room for another order.
"""

import types

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from ftune.integrations.transformers import WINDOW_ATTENTION, register_attention
from ftune.kernels import window_attention as window_module
from ftune.kernels.window_attention import (flash_backward, flash_forward, visible_keys, window_attention,
                                            window_attention_mask)
from tests.kernels.common import gpu

FP32 = dict(atol=1e-5, rtol=1e-5)
WINDOW = 4


def _sees(attend, tokens: int) -> torch.Tensor:
    """Which keys each query sees, read off an attention (batch, heads, tokens, head_dim) ->
    (batch, tokens, heads, head_dim): queries of zeros weigh every visible key alike, and key j's
    value is the j-th unit vector, so query i's output is nonzero where it sees a key."""
    query = torch.zeros(1, 2, tokens, tokens)
    key = torch.randn(1, 2, tokens, tokens, generator=torch.Generator().manual_seed(0))
    value = torch.eye(tokens).expand(1, 2, tokens, tokens).contiguous()
    output = attend(query, key, value)
    return output[0, :, 0] > 0


def test_a_query_sees_the_window_of_keys_up_to_itself():
    """transformers' sliding_window w: query i sees keys i - w + 1 to i; the key w back is hidden."""
    tokens = 12
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=1)

    def attend(query, key, value):
        return window_attention(module, query, key, value, None, scaling=1.0, sliding_window=WINDOW)[0]

    sees = _sees(attend, tokens)
    for query in range(tokens):
        assert sees[query].nonzero().flatten().tolist() == list(range(max(0, query - WINDOW + 1), query + 1)), query
    # the same visibility as transformers' mask for the window
    expected = sdpa_mask(1, tokens, tokens, mask_function=sliding_window_causal_mask_function(WINDOW),
                         allow_is_causal_skip=False)[0, 0]
    assert torch.equal(sees, expected) and torch.equal(visible_keys(tokens, WINDOW), expected)


def test_visible_keys_of_rows_stay_in_their_row():
    starts = torch.tensor([0, 3, 8], dtype=torch.int32)
    sees = visible_keys(8, window=2, starts=starts)
    assert sees[4].nonzero().flatten().tolist() == [3, 4]  # 2 back would be row 0's
    assert sees[3].nonzero().flatten().tolist() == [3]
    assert sees[7].nonzero().flatten().tolist() == [6, 7]


def test_the_mask_function_leaves_out_only_causal_attention_within_the_window():
    function = sliding_window_causal_mask_function(WINDOW)
    plain = dict(batch_size=2, q_length=10, kv_length=10, mask_function=function, local_size=WINDOW)
    assert window_attention_mask(**plain) is None
    assert window_attention_mask(**plain, attention_mask=torch.ones(2, 10, dtype=torch.bool)) is None
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, :3] = False
    masks = {
        "padding": dict(plain, attention_mask=padding),
        "packed rows": dict(plain, allow_is_causal_skip=False),  # transformers' sign of an added pattern
        "an extra mask function": dict(plain, use_vmap=True),
        "a cache": dict(plain, q_length=1, kv_length=10, q_offset=9),
    }
    for name, arguments in masks.items():
        expected = sdpa_mask(**arguments)
        got = window_attention_mask(**arguments)
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), name


CONFIGS = {
    # one sliding layer and one full layer; Gemma-3's query scaling
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(),  # every layer slides
}


def _tiny(model_type: str, attn_implementation: str, reference=None):
    register_attention(WINDOW_ATTENTION)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  sliding_window=WINDOW, max_position_embeddings=64, pad_token_id=0,
                                  **CONFIGS[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if reference is not None:
        model.load_state_dict(reference.state_dict())
    return model


@pytest.mark.parametrize("model_type", list(CONFIGS))
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_models_train_as_on_sdpa(model_type, padding):
    """The logits of every real token and the gradient of every weight equal sdpa's; with padding
    the mask function builds sdpa's own mask and the attention runs sdpa."""
    ids = torch.randint(1, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    if padding == "right":
        attention_mask[1, 9:] = 0
    elif padding == "left":
        attention_mask[1, :4] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    reference = _tiny(model_type, "sdpa")
    results = []
    for model in (reference, _tiny(model_type, WINDOW_ATTENTION, reference)):
        output = model(ids, attention_mask=attention_mask, labels=labels)
        output.loss.backward()
        results.append((output.logits[attention_mask.bool()].detach(), [p.grad for p in model.parameters()]))
    (expected_logits, expected_grads), (logits, grads) = results
    torch.testing.assert_close(logits, expected_logits, **FP32)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, **FP32)


@pytest.mark.parametrize("model_type", list(CONFIGS))
@pytest.mark.parametrize("padded", [False, True])
def test_generation_decodes_as_on_sdpa(model_type, padded):
    """Greedy decoding with a KV cache past the window (a prompt of 6, 8 new tokens), the second
    prompt left-padded or not: each step's queries are the last of the cached keys, which
    ftune_window leaves to sdpa and its mask."""
    prompt = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(prompt)
    if padded:
        attention_mask[1, :2] = 0
        prompt[1, :2] = 0
    reference = _tiny(model_type, "sdpa").eval()
    model = _tiny(model_type, WINDOW_ATTENTION, reference).eval()
    settings = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0, attention_mask=attention_mask)
    expected, got = reference.generate(prompt, **settings), model.generate(prompt, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    for logits, reference_logits in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(logits, reference_logits, **FP32)


def _truth_and_sdpa(query, key, value, grad, mask, scale, dtype):
    """SDPA with the dense mask in fp32 (the truth) and in `dtype`: output and gradients."""
    results = []
    for dtype in (torch.float32, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (query, key, value)]
        output = F.scaled_dot_product_attention(*inputs, attn_mask=mask, scale=scale,
                                                enable_gqa=query.shape[1] != key.shape[1])
        output.backward(grad.to(dtype))
        results.append([output.detach(), *(t.grad for t in inputs)])
    return results


def _assert_as_close_as_sdpa(ours, truth, sdpa):
    """Each tensor no further from the fp32 truth than SDPA's in the same dtype (as the largest
    error relative to the truth's largest value)."""
    for name, actual, reference, sdpa_result in zip(("output", "query", "key", "value"), ours, truth, sdpa,
                                                    strict=True):
        scale = reference.abs().max()
        ours_error = (actual.float() - reference).abs().max() / scale
        sdpa_error = (sdpa_result.float() - reference).abs().max() / scale
        assert ours_error <= 1.5 * sdpa_error + 1e-3, (name, ours_error.item(), sdpa_error.item())


GPU_SHAPES = [(32, 32, 96), (40, 10, 128), (8, 4, 256), (16, 16, 256)]  # Phi-3-mini, -medium; Gemma-3-4b; no GQA


@gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", GPU_SHAPES)
@pytest.mark.parametrize("window", [1024, 2047])
def test_gpu_flash_window_matches_sdpa_with_the_dense_mask(heads, kv_heads, head_dim, window, monkeypatch):
    """window_attention on CUDA (the flash kernel with the window, through its own derivative), and
    flash_forward / flash_backward as the parked path calls them, against SDPA with the dense mask
    of the window: 3000 tokens in bf16, batch 2."""
    tokens, dtype = 3000, torch.bfloat16
    generator = torch.Generator(device="cuda").manual_seed(0)
    query, key, value = (torch.randn(2, tokens, h, head_dim, device="cuda", generator=generator).transpose(1, 2)
                         for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(2, heads, tokens, head_dim, device="cuda", generator=generator)
    scale = head_dim ** -0.5
    truth, sdpa = _truth_and_sdpa(query, key, value, grad, visible_keys(tokens, window, device="cuda"), scale, dtype)

    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads)
    inputs = [t.to(dtype).requires_grad_() for t in (query, key, value)]
    monkeypatch.setattr(window_module, "sdpa_attention_forward", None)  # the flash kernel runs, not sdpa
    output, _ = window_attention(module, *inputs, None, scaling=scale, sliding_window=window)
    output.transpose(1, 2).backward(grad.to(dtype))
    _assert_as_close_as_sdpa([output.detach().transpose(1, 2), *(t.grad for t in inputs)], truth, sdpa)

    inputs = [t.to(dtype) for t in (query, key, value)]
    output, logsumexp, state = flash_forward(*inputs, scale, window)
    grads = flash_backward(grad.to(dtype), *inputs, output, logsumexp, state, scale, window)
    _assert_as_close_as_sdpa([output, *grads], truth, sdpa)


@gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", GPU_SHAPES[::2])
def test_gpu_flash_window_over_packed_rows_matches_sdpa(heads, kv_heads, head_dim):
    """Rows end to end (one shorter than the window, two longer), each attending within itself and
    within the window, against SDPA with the dense mask of both."""
    lengths, window, dtype = (1500, 300, 2200), 1024, torch.bfloat16
    tokens = sum(lengths)
    starts = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    generator = torch.Generator(device="cuda").manual_seed(1)
    query, key, value = (torch.randn(1, tokens, h, head_dim, device="cuda", generator=generator).transpose(1, 2)
                         for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, heads, tokens, head_dim, device="cuda", generator=generator)
    scale = head_dim ** -0.5
    mask = visible_keys(tokens, window, starts, device="cuda")
    truth, sdpa = _truth_and_sdpa(query, key, value, grad, mask, scale, dtype)
    inputs = [t.to(dtype) for t in (query, key, value)]
    output, logsumexp, state = flash_forward(*inputs, scale, window, starts, max(lengths))
    grads = flash_backward(grad.to(dtype), *inputs, output, logsumexp, state, scale, window, starts, max(lengths))
    _assert_as_close_as_sdpa([output, *grads], truth, sdpa)


@gpu
def test_gpu_window_edges(monkeypatch):
    """The flash kernel's bounds on the GPU: the key w - 1 back is seen, the key w back is not."""
    monkeypatch.setattr(window_module, "sdpa_attention_forward", None)  # the flash kernel runs, not sdpa
    tokens = 64
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=1)

    def attend(query, key, value):
        inputs = [t.to("cuda", torch.bfloat16) for t in (query, key, value)]
        return window_attention(module, *inputs, None, scaling=1.0, sliding_window=WINDOW)[0].float().cpu()

    sees = _sees(attend, tokens)
    assert torch.equal(sees, visible_keys(tokens, WINDOW))
