"""Soft-capped attention against Gemma-2's eager attention in transformers: the function alone
(both of its paths), and a tiny Gemma-2 model running it through transformers' attention
interface, the way ftune wires it."""

import types

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import (AttentionMaskInterface, causal_mask_function, eager_mask, sdpa_mask,
                                        sliding_window_causal_mask_function)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from ftune.kernels.softcap_attention import (attend_flex, causal_block_mask, flash4_takes, flex_kernel_options,
                                             softcap_attention, softcap_attention_mask)
from ftune.kernels.window_attention import hiding_window
from tests.kernels.common import gpu

# fp32 on CPU: the dense path is eager's arithmetic in another order (grouped heads instead of
# repeated keys, masked_fill instead of an added mask), measured within 5e-7 of it.
FP32 = dict(atol=1e-5, rtol=1e-5)
SCALING = 16 ** -0.5
# A cap this low bends scores of the size below (Gemma-2's 50 bends only logits of tens)
SOFTCAP = 2.0


def _module(heads, kv_heads):
    """What eager_attention_forward reads from a Gemma2Attention."""
    return types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, head_dim=16)


def _qkv(heads, kv_heads, q_len, kv_len=None, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    kv_len = kv_len or q_len
    query = (torch.randn(batch, heads, q_len, 16, generator=generator) * 2).requires_grad_()
    key = (torch.randn(batch, kv_heads, kv_len, 16, generator=generator) * 2).requires_grad_()
    value = torch.randn(batch, kv_heads, kv_len, 16, generator=generator).requires_grad_()
    return query, key, value


def _eager_mask(q_len, kv_len, sliding_window, batch=2):
    """transformers' own additive mask for the layer: causal, or causal within the window."""
    function = causal_mask_function if sliding_window is None else sliding_window_causal_mask_function(sliding_window)
    return eager_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                      mask_function=function)


def _run(fn, inputs, grad, **kwargs):
    for tensor in inputs:
        tensor.grad = None
    output, _ = fn(*inputs, **kwargs)
    output.backward(grad)
    return output.detach(), *(tensor.grad.clone() for tensor in inputs[1:])


@pytest.mark.parametrize("sliding_window", [None, 1, 4, 50])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("softcap", [SOFTCAP, None])
def test_matches_gemma2_eager_attention(heads, kv_heads, sliding_window, softcap):
    """Outputs and the gradients of query, key and value, for full and sliding layers (a window
    of one token, shorter and longer than the sequence), grouped key heads, with and without cap."""
    _assert_matches_eager(heads, kv_heads, 13, 13, sliding_window, softcap)


def _assert_matches_eager(heads, kv_heads, q_len, kv_len, sliding_window, softcap):
    """Output and the gradients of query, key and value as gemma2's eager attention's (no mask
    given: softcap_attention builds the causal and window one itself)."""
    module = _module(heads, kv_heads)
    query, key, value = _qkv(heads, kv_heads, q_len, kv_len=kv_len)
    grad = torch.randn(2, q_len, heads, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(scaling=SCALING, softcap=softcap)
    ours = _run(softcap_attention, (module, query, key, value), grad, attention_mask=None,
                sliding_window=sliding_window, **kwargs)
    expected = _run(eager_attention_forward, (module, query, key, value), grad,
                    attention_mask=_eager_mask(q_len, kv_len, sliding_window), **kwargs)
    for actual, reference in zip(ours, expected, strict=True):
        torch.testing.assert_close(actual, reference, **FP32)


def test_the_cap_is_applied():
    """The scores above are large enough that capping them changes the result (so the test above
    would see a dropped cap)."""
    module = _module(4, 2)
    query, key, value = _qkv(4, 2, 13)
    capped, _ = softcap_attention(module, query, key, value, None, scaling=SCALING, softcap=SOFTCAP)
    uncapped, _ = softcap_attention(module, query, key, value, None, scaling=SCALING, softcap=None)
    assert (capped - uncapped).abs().max() > 0.1


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_decoding_queries_are_the_last_positions(sliding_window):
    """With a cache, 3 new queries attend to 13 keys: they are positions 10 to 12."""
    _assert_matches_eager(4, 2, 3, 13, sliding_window, SOFTCAP)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on purpose, on CPU
@pytest.mark.parametrize("sliding_window", [None, 130])
def test_flex_path_matches_eager(sliding_window):
    """The CUDA path's score_mod and block mask, run by FlexAttention's CPU forward (it has no CPU
    backward): 300 tokens span three 128-token blocks, the window ends inside one, keys are shared
    by pairs of query heads."""
    module = _module(4, 2)
    query, key, value = (t.detach() for t in _qkv(4, 2, 300, batch=1))
    expected, _ = eager_attention_forward(module, query, key, value, _eager_mask(300, 300, sliding_window, batch=1),
                                          scaling=SCALING, softcap=SOFTCAP)
    block_mask = causal_block_mask(300, 300, sliding_window, torch.device("cpu"))
    ours = attend_flex(query, key, value, block_mask, SCALING, SOFTCAP).transpose(1, 2)
    torch.testing.assert_close(ours, expected, **FP32)


def test_flex_tiling_only_where_measured():
    """The tiling ftune gives FlexAttention is for 256-wide 16-bit heads on Hopper and queries long
    enough for FlexAttention's main kernel, where it was timed (bf16, 8192 tokens); its tiles divide
    FlexAttention's 128-token mask blocks, which FlexAttention requires."""
    options = flex_kernel_options(256, (9, 0), torch.bfloat16, 8192)
    for name in ("fwd_BLOCK_M", "fwd_BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2"):
        assert 128 % options[name] == 0, name
    assert flex_kernel_options(256, (9, 0), torch.bfloat16, 128) == options
    assert flex_kernel_options(256, (9, 0), torch.bfloat16, 127) is None  # the decoding kernel's sizes
    assert flex_kernel_options(256, (9, 0), torch.bfloat16, 1) is None
    assert flex_kernel_options(256, (9, 0), torch.float32, 8192) is None  # twice the shared memory per tile
    assert flex_kernel_options(128, (9, 0), torch.bfloat16, 8192) is None
    assert flex_kernel_options(256, (8, 0), torch.bfloat16, 8192) is None
    assert flex_kernel_options(256, None, torch.bfloat16, 8192) is None


@pytest.fixture
def registered():
    """softcap_attention registered in transformers under test names: alone (the model passes no
    mask), with sdpa's boolean masks and with its own mask function, as ftune registers it (those
    two: padding included). Removed afterwards."""
    names = {"ftune-test-softcap": None, "ftune-test-softcap-sdpa-mask": sdpa_mask,
             "ftune-test-softcap-own-mask": softcap_attention_mask}
    for name, mask_function in names.items():
        AttentionInterface.register(name, softcap_attention)
        if mask_function is not None:
            AttentionMaskInterface.register(name, mask_function)
    yield names
    for name in names:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def _tiny_gemma2(attn_implementation):
    # layer 0 slides over 4 tokens, layer 1 attends to all; Gemma-2's query scaling and a low cap
    config = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                  attn_logit_softcapping=SOFTCAP, query_pre_attn_scalar=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


@pytest.mark.parametrize("padded", [False, True])
def test_gemma2_model_trains_as_with_eager(registered, padded):
    """A tiny Gemma-2 through transformers' attention interface: the logits of every real token and
    the gradient of every weight equal eager attention's. Padded: the second row ends in 4 pad
    tokens (right padding, as the trainers pad), whose labels are ignored."""
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(ids)
    if padded:
        attention_mask[1, 7:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    reference = _tiny_gemma2("eager")
    results = []
    for implementation in ("eager", *(name for name, mask in registered.items() if padded <= (mask is not None))):
        model = _tiny_gemma2(implementation)
        model.load_state_dict(reference.state_dict())
        output = model(ids, attention_mask=attention_mask, labels=labels)
        output.loss.backward()
        results.append((output.logits[attention_mask.bool()].detach(), [p.grad for p in model.parameters()]))
    (expected_logits, expected_grads), *ours = results
    assert ours
    for logits, grads in ours:
        torch.testing.assert_close(logits, expected_logits, **FP32)
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, **FP32)


def test_its_mask_function_leaves_plain_causal_layers_to_the_attention():
    """No mask where a layer's is causal (its window aside) and nothing more: the attention builds
    it, or hands it to FlashAttention 4; transformers' FlexAttention mask for padding and for a
    cache's offset queries."""
    assert softcap_attention_mask(2, 11, 11) is None
    assert softcap_attention_mask(2, 11, 11, attention_mask=torch.ones(2, 11, dtype=torch.bool)) is None
    padded = torch.ones(2, 11, dtype=torch.bool)
    padded[1, 7:] = False
    assert isinstance(softcap_attention_mask(2, 11, 11, attention_mask=padded), BlockMask)
    assert isinstance(softcap_attention_mask(2, 1, 11, q_offset=10), BlockMask)
    assert isinstance(softcap_attention_mask(2, 11, 11, allow_is_causal_skip=False), BlockMask)


def test_flash_attention_4_is_for_cuda_alone():
    query, key, value = (t.detach().to(torch.bfloat16) for t in _qkv(4, 2, 5))
    assert not flash4_takes(query, key, value)


def test_refuses_what_it_does_not_compute():
    module = _module(4, 2)
    query, key, value = (t.detach() for t in _qkv(4, 2, 5))
    with pytest.raises(ValueError, match="dropout"):
        softcap_attention(module, query, key, value, None, dropout=0.1)
    with pytest.raises(ValueError, match="s_aux"):
        softcap_attention(module, query, key, value, None, s_aux=torch.zeros(4))
    with pytest.raises(TypeError, match="sdpa_mask or flex_attention_mask"):
        softcap_attention(module, query, key, value, _eager_mask(5, 5, None))


@gpu
@pytest.mark.parametrize("kernel", ["flex", "flash4"])
@pytest.mark.parametrize("tokens", [1536, 32, 16])
@pytest.mark.parametrize("sliding_window", [None, 512])
def test_compiled_flex_on_gemma2_9b_heads(sliding_window, tokens, kernel):
    """Compiled FlexAttention (given its block mask) and FlashAttention 4 (given none, where it is
    installed and runs on this GPU) at Gemma-2-9B's heads (16 query, 8 key, 256 wide, cap 50) in
    bf16, over a sequence long enough for ftune's Hopper tiling and over short ones that
    FlexAttention's decoding kernel runs: output and gradients no further from the fp32 eager
    result than bf16 eager is (each measured as the largest error relative to the largest
    reference value)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, head_dim=256)
    shapes = [(1, 16, tokens, 256), (1, 8, tokens, 256), (1, 8, tokens, 256)]
    inputs = [torch.randn(shape, device="cuda", generator=generator) * 3 for shape in shapes]
    grad = torch.randn(1, tokens, 16, 256, device="cuda", generator=generator)
    mask = _eager_mask(tokens, tokens, sliding_window, batch=1).cuda()
    kwargs = dict(scaling=256 ** -0.5, softcap=50.0)

    def run(fn, dtype, attention_mask, **extra):
        tensors = [t.detach().to(dtype).requires_grad_() for t in inputs]
        return _run(fn, (module, *tensors), grad.to(dtype), attention_mask=attention_mask, **kwargs, **extra)

    if kernel == "flash4" and not flash4_takes(*(t.to(torch.bfloat16) for t in inputs)):
        pytest.skip("FlashAttention 4 is not installed, or does not run soft-capped attention on this GPU")
    window = hiding_window(sliding_window, tokens)
    block_mask = causal_block_mask(tokens, tokens, window, torch.device("cuda")) if kernel == "flex" else None
    truth = run(eager_attention_forward, torch.float32, mask)
    eager = run(eager_attention_forward, torch.bfloat16, mask.to(torch.bfloat16))
    ours = run(softcap_attention, torch.bfloat16, block_mask, sliding_window=sliding_window)
    if kernel == "flash4":
        assert flash4_takes(*(t.to(torch.bfloat16) for t in inputs))  # it ran, and refused nothing
    for actual, eager_bf16, reference in zip(ours, eager, truth, strict=True):
        scale = reference.abs().max()
        ours_error = (actual.float() - reference).abs().max() / scale
        eager_error = (eager_bf16.float() - reference).abs().max() / scale
        assert ours_error <= 1.5 * eager_error + 1e-3, (ours_error, eager_error)


@gpu
def test_a_run_s_kinds_of_flex_call_all_run_compiled():
    """The kinds of FlexAttention call one Gemma-2 run makes (with and without gradients, full and
    sliding layers, long queries with ftune's tiling and decoding-sized ones, in bf16 and fp32)
    compile more variants of FlexAttention than dynamo's default limit, and none of them runs
    uncompiled (which would be FlexAttention's dense reference; softcap_attention.FLEX_VARIANTS)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from ftune.kernels.softcap_attention import _compiled_flex_attention

    module = types.SimpleNamespace(num_key_value_groups=2, training=False, head_dim=256)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a call past the limit raises
        for dtype in (torch.bfloat16, torch.float32):
            for tokens in (256, 16):
                for sliding_window in (None, 64):
                    for grad in (False, True):
                        query, key, value = (torch.randn(1, heads, tokens, 256, device="cuda", dtype=dtype,
                                                         requires_grad=grad) for heads in (16, 8, 8))
                        # the block mask its own path builds, so FlashAttention 4 (where installed) runs none
                        window = hiding_window(sliding_window, tokens)
                        block_mask = causal_block_mask(tokens, tokens, window, torch.device("cuda"))
                        with torch.set_grad_enabled(grad):
                            output, _ = softcap_attention(module, query, key, value, block_mask,
                                                          scaling=256 ** -0.5, softcap=50.0,
                                                          sliding_window=sliding_window)
                        if grad:
                            output.sum().backward()
    variants = _debug_get_cache_entry_list(_compiled_flex_attention().compiled_code)
    assert len(variants) > torch._dynamo.config.recompile_limit
