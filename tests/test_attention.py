"""The parked attention path (ftune/engine/attention.py): its kernels against PyTorch's SDPA, and an
offloaded layer's backward that skips attention's forward, against a layer that kept everything."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.nn import functional as F

from ftune.engine import attention, host_memory
from ftune.engine.attention import AttentionOutput
from ftune.memory import estimate
from tests.helpers import assert_relatively_close, lora_grads, tiny_lora_model

VOCAB = 512


@pytest.fixture(autouse=True)
def _no_refusals_between_tests(monkeypatch):
    # the tiny models' short rows park as the long rows of real ones do; the floor has its own test
    monkeypatch.setattr(estimate, "PARKING_MIN_TOKENS", 0)
    yield
    attention._refused.clear()


def _qkv(device, dtype, heads, kv_heads, tokens, head_dim, seed=0):
    generator = torch.Generator(device).manual_seed(seed)
    # (batch, tokens, heads, head_dim) transposed, as transformers' projections lay them out
    def make(h):
        return torch.randn(2, tokens, h, head_dim, device=device, dtype=dtype, generator=generator).transpose(1, 2)
    return make(heads), make(kv_heads), make(kv_heads)


def _window_mask(tokens, window, device):
    """Causal within the window, made apart from the code under test: query i sees keys i - window + 1 to i."""
    ones = torch.ones(tokens, tokens, dtype=torch.bool, device=device)
    return ones.tril() & ones.triu(-(window - 1))


def _replayed_against_sdpa(device, dtype, heads, kv_heads, tokens, head_dim, window=None):
    """The parked path's output and gradients against SDPA, causal or with the window's dense mask."""
    q, k, v = _qkv(device, dtype, heads, kv_heads, tokens, head_dim)
    scale = head_dim ** -0.5
    grad = torch.randn(2, tokens, heads, head_dim, device=device, dtype=dtype)
    ref_inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    mask = _window_mask(tokens, window, device) if window is not None else None
    expected = F.scaled_dot_product_attention(*ref_inputs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=heads != kv_heads)
    expected.transpose(1, 2).backward(grad)

    output, logsumexp, extras = attention._forward(q, k, v, scale, window=window)
    parked = AttentionOutput(output.transpose(1, 2).contiguous(), logsumexp, extras, scale)
    assert parked.window == window
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    replayed = attention._ReplayedAttention.apply(*inputs, parked)
    replayed.backward(grad)
    exact = dtype == torch.float32 and window is None  # the same kernel as SDPA's, on the same inputs
    torch.testing.assert_close(replayed, expected.transpose(1, 2), atol=0 if exact else 1e-6 if
                               dtype == torch.float32 else 2e-2, rtol=0)
    for got, want in zip(inputs, ref_inputs):
        scale_of = want.grad.abs().max().item()
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * scale_of
        torch.testing.assert_close(got.grad, want.grad, atol=tolerance, rtol=0)


@pytest.mark.parametrize("heads,kv_heads,tokens", [(4, 4, 17), (4, 2, 33), (6, 2, 5)])
def test_replayed_attention_has_sdpas_output_and_gradients(heads, kv_heads, tokens):
    _replayed_against_sdpa("cpu", torch.float32, heads, kv_heads, tokens, 16)


@pytest.mark.parametrize("heads,kv_heads,tokens,window", [(4, 4, 17, 4), (4, 2, 33, 8), (6, 2, 5, 1)])
def test_replayed_attention_within_a_window_has_sdpas_output_and_gradients(heads, kv_heads, tokens, window):
    _replayed_against_sdpa("cpu", torch.float32, heads, kv_heads, tokens, 16, window)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,tokens,head_dim", [(4, 2, 100, 32), (32, 8, 1000, 128), (28, 4, 257, 128)])
def test_gpu_replayed_attention_has_sdpas_output_and_gradients(heads, kv_heads, tokens, head_dim):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _replayed_against_sdpa("cuda", torch.bfloat16, heads, kv_heads, tokens, head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,tokens,head_dim,window", [(32, 32, 3000, 96, 2047), (8, 4, 3000, 256, 1024),
                                                                    (16, 16, 1500, 256, 1024)])
def test_gpu_replayed_attention_within_a_window_has_sdpas_output_and_gradients(heads, kv_heads, tokens, head_dim,
                                                                                window):
    """Phi-3-mini's heads and window, Gemma-3-4b's (grouped keys) and 256-wide heads without groups."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _replayed_against_sdpa("cuda", torch.bfloat16, heads, kv_heads, tokens, head_dim, window)


def _packed_replayed_against_sdpa(device, dtype, heads, kv_heads, lengths, head_dim, window=None):
    """A padding-free batch's rows (one sequence of `lengths` end to end): the parked path's output
    and gradients against SDPA with the block-diagonal causal mask (within the window, if any)."""
    tokens = sum(lengths)
    generator = torch.Generator(device).manual_seed(1)
    q, k, v = (torch.randn(1, tokens, h, head_dim, device=device, dtype=dtype, generator=generator).transpose(1, 2)
               for h in (heads, kv_heads, kv_heads))
    starts = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    rows = attention.PackedRows(starts, max(lengths))
    row = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    sees = (row[:, None] == row[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    if window is not None:
        sees &= _window_mask(tokens, window, device)
    scale = head_dim ** -0.5
    grad = torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=generator)
    ref_inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*ref_inputs, attn_mask=sees, scale=scale, enable_gqa=heads != kv_heads)
    expected.transpose(1, 2).backward(grad)

    output, logsumexp, extras = attention._forward(q, k, v, scale, rows, window)
    parked = AttentionOutput(output.transpose(1, 2).contiguous(), logsumexp, extras, scale)
    assert parked.rows is rows and parked.window == window
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    replayed = attention._ReplayedAttention.apply(*inputs, parked)
    replayed.backward(grad)
    exact = dtype == torch.float32
    torch.testing.assert_close(replayed, expected.transpose(1, 2), atol=1e-6 if exact else 2e-2, rtol=0)
    for got, want in zip(inputs, ref_inputs):
        tolerance = 1e-5 if exact else 2e-2 * want.grad.abs().max().item()
        torch.testing.assert_close(got.grad, want.grad, atol=tolerance, rtol=0)


@pytest.mark.parametrize("heads,kv_heads,lengths", [(4, 4, (5, 12)), (4, 2, (1, 17, 3, 9)), (6, 2, (30,))])
def test_replayed_attention_of_packed_rows_has_sdpas_output_and_gradients(heads, kv_heads, lengths):
    _packed_replayed_against_sdpa("cpu", torch.float32, heads, kv_heads, lengths, 16)


@pytest.mark.parametrize("heads,kv_heads,lengths,window", [(4, 4, (5, 12), 4), (4, 2, (1, 17, 3, 9), 6)])
def test_replayed_attention_of_packed_rows_within_a_window_has_sdpas_output_and_gradients(heads, kv_heads, lengths,
                                                                                           window):
    _packed_replayed_against_sdpa("cpu", torch.float32, heads, kv_heads, lengths, 16, window)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,lengths,head_dim,window", [(4, 2, (100, 37, 1), 32, None),
                                                                     (32, 8, (900, 17, 1500, 211), 128, None),
                                                                     (32, 32, (2500, 17, 1500), 96, 1024),
                                                                     (8, 4, (900, 1500, 211), 256, 1024)])
def test_gpu_replayed_attention_of_packed_rows_has_sdpas_output_and_gradients(heads, kv_heads, lengths, head_dim,
                                                                              window):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _packed_replayed_against_sdpa("cuda", torch.bfloat16, heads, kv_heads, lengths, head_dim, window)


def test_a_call_without_a_padding_free_batchs_rows_has_none():
    query = torch.zeros(2, 4, 8, 16)
    starts = torch.tensor([0, 3, 8], dtype=torch.int32)
    packed = dict(cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=5, max_length_k=5)
    assert attention.PackedRows.of_call(query[:1], packed).longest == 5
    assert attention.PackedRows.of_call(query, packed) is None  # rows are laid end to end in a batch of one
    assert attention.PackedRows.of_call(query[:1], {}) is None


def _count_attention_calls(monkeypatch) -> dict[str, int]:
    """Calls of the parked path's forward, and of the implementations' own functions (each model
    here runs transformers' sdpa)."""
    counts = {"parked forward": 0, "sdpa": 0}
    forward = attention._forward

    def counted_forward(*args, **kwargs):
        counts["parked forward"] += 1
        return forward(*args, **kwargs)

    def counted(original):
        def call(*args, **kwargs):
            counts["sdpa"] += 1
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(attention, "_forward", counted_forward)
    for name, original in list(attention._originals.items()):
        monkeypatch.setitem(attention._originals, name, counted(original))
    return counts


def _step(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, **kwargs).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def _assert_same(expected, got, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = expected, got
    torch.testing.assert_close(loss_b, loss_a, atol=atol, rtol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=0, msg=name)


def _parking_pair(monkeypatch, preset="tiny-llama"):
    """A reference model (mode none) and an unsloth one, with the attention calls counted."""
    reference, _ = tiny_lora_model(preset, "none")
    model, engine = tiny_lora_model(preset, "unsloth")
    return reference, model, engine, _count_attention_calls(monkeypatch)


def _counted_step(counts, model, ids, **kwargs):
    """A step of `model` with the counts started afresh (the reference's attention went through the
    wrapper too)."""
    counts.update({"parked forward": 0, "sdpa": 0})
    return _step(model, ids, **kwargs)


def _fake_host_memory(monkeypatch, available, total=16 * 1024**3) -> None:
    """psutil reports `total` bytes and `available(reserve)`, the pools' reserve given."""
    reserve = max(host_memory._HOST_RESERVE_MIN, int(total * host_memory._HOST_RESERVE_FRACTION))
    Memory = namedtuple("Memory", "total available")
    monkeypatch.setattr(host_memory.psutil, "virtual_memory", lambda: Memory(total, available(reserve)))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_offloaded_layers_skip_attentions_forward_in_the_backward(preset, monkeypatch):
    reference, model, engine, counts = _parking_pair(monkeypatch, preset)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    expected, got = _step(reference, ids), _counted_step(counts, model, ids)
    layers = len(engine.layers)
    # one attention forward per layer, in the forward; the backward replays the parked output
    assert counts == {"parked forward": layers, "sdpa": 0}
    assert engine.copier.parking_pool.stats.buffers == 3 * layers  # residual, output, log-sum-exp
    assert engine.copier.parking_pool.stats.bytes_in_use == 0
    _assert_same(expected, got)


def test_a_padded_batch_recomputes_attention_as_before(monkeypatch):
    reference, model, engine, counts = _parking_pair(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    expected = _step(reference, ids, attention_mask=mask)
    got = _counted_step(counts, model, ids, attention_mask=mask)
    layers = len(engine.layers)
    assert counts["parked forward"] == 0 and counts["sdpa"] == 2 * layers  # forward and recompute
    assert engine.copier.parking_pool.stats.buffers == 0
    _assert_same(expected, got)


def test_layers_recompute_attention_where_parking_would_crowd_out_later_inputs(monkeypatch):
    """Parking is optional: a layer parks only if host memory keeps room for every later layer's
    input. Short of that the first layers (which would need the most room) recompute."""
    reference, model, engine, counts = _parking_pair(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    residual_bytes = ids.numel() * model.config.hidden_size * 4
    # a layer parks with room left for its own input and every later one's (2 MiB buffers each): with
    # 6 MiB above the reserve, the last two of three layers park
    _fake_host_memory(monkeypatch, lambda reserve: reserve + 3 * host_memory.buffer_size(residual_bytes))
    expected, got = _step(reference, ids), _counted_step(counts, model, ids)
    assert engine.copier.pool.stats.buffers == 3  # every layer input still in host memory
    assert engine.copier.parking_pool.stats.buffers == 3 * 2
    # every forward offers its output; the first layer, which could not park it, recomputes it
    assert counts == {"parked forward": 3, "sdpa": 1}
    _assert_same(expected, got)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_gpu_parked_attention_matches_a_layer_that_kept_everything(preset, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    results = []
    for mode in ("none", "unsloth"):
        model, engine = tiny_lora_model(preset, mode)
        model.to("cuda")
        ids = torch.randint(3, VOCAB, (2, 256), generator=torch.Generator().manual_seed(3)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(_step(model, ids))
        if mode == "unsloth":
            assert engine.copier.parking_pool.stats.buffers == 3 * len(engine.layers)
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-3, rtol=0)
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-2 * scale + 1e-6, rtol=0, msg=name)


def test_a_longer_batch_frees_idle_parked_buffers_before_leaving_an_input_on_the_gpu(monkeypatch, caplog):
    """Parked buffers sized for a shorter batch are idle in the pool; when a longer batch's layer
    input does not fit beside them, they are freed, and the input goes to host memory."""
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    limit = 30 * 1024**2  # host memory this run may take, less what the pools hold
    _fake_host_memory(monkeypatch, lambda reserve: reserve + limit - engine.host_bytes())
    short = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    _step(model, short)
    assert engine.copier.parking_pool.stats.buffers == 9  # 2 MiB each: 24 MiB with the inputs' 6
    long = torch.randint(3, VOCAB, (8, 1000), generator=torch.Generator().manual_seed(5))  # 4 MiB inputs
    loss = model(input_ids=long, labels=long).loss
    pool = engine.copier.pool.stats
    assert pool.bytes_in_use == 3 * 4 * 1024**2  # every layer input in host memory
    assert "host memory is short" not in caplog.text
    loss.backward()
    assert engine.host_bytes() <= limit


def test_the_parked_residual_is_freed_before_the_attention_half_runs(monkeypatch):
    """At long context a layer's backward peaks in attention's backward: the residual the MLP half
    read must be gone when the attention half fetches the layer input."""
    import weakref

    from ftune.engine.halves import ResidualHalves

    model, _ = tiny_lora_model("tiny-llama", "unsloth")
    residual, alive_at_next_fetch = [], []
    mlp_backward, fetch = ResidualHalves._mlp_backward, host_memory.HostStash.fetch

    def recorded_mlp_backward(self, h, *args):
        residual[:] = [weakref.ref(h)]
        return mlp_backward(self, h, *args)

    def checked_fetch(stash):
        if residual:  # the first fetch after an MLP half: the attention half's input
            alive_at_next_fetch.append(residual.pop()() is not None)
        return fetch(stash)

    monkeypatch.setattr(ResidualHalves, "_mlp_backward", recorded_mlp_backward)
    monkeypatch.setattr(host_memory.HostStash, "fetch", checked_fetch)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(6))
    _step(model, ids)
    assert alive_at_next_fetch == [False] * 3


def test_a_step_parks_only_within_its_share_of_host_memory(monkeypatch):
    """Parking takes twice the inputs' host memory; a step whose inputs and parked halves would take
    more than estimate.PARKING_HOST_SHARE of the host's memory recomputes attention instead."""
    reference, model, engine, counts = _parking_pair(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    hidden = ids.numel() * model.config.hidden_size * 4  # fp32 hidden states
    lse = ids.numel() * model.config.num_attention_heads * 4
    step = 3 * (hidden + 2 * hidden + lse)  # three layers: input, residual, attention output, log-sum-exp
    expected = _step(reference, ids)
    smallest = int(step / estimate.PARKING_HOST_SHARE)  # the smallest host on which the step parks
    for total, parks in ((smallest, True), (smallest - 1, False)):
        _fake_host_memory(monkeypatch, lambda reserve: 8 * 1024**3, total=total)
        _assert_same(expected, _counted_step(counts, model, ids))
        assert counts["sdpa"] == (0 if parks else 3), total  # recomputed attention when not parked


def test_parking_never_leaves_a_layer_input_on_the_gpu(monkeypatch, caplog):
    """Host memory that shrinks as the pools grow: layers park only while room stays for their own
    input (stashed after the forward that parks) and every later one's."""
    reference, _ = tiny_lora_model("tiny-llama", "none")
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    _fake_host_memory(monkeypatch, lambda reserve: reserve + 22 * 1024**2 - engine.host_bytes())
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(8))
    expected = _step(reference, ids)
    loss = model(input_ids=ids, labels=ids).loss
    assert engine.copier.pool.stats.bytes_in_use == 3 * 2 * 1024**2  # every input in host memory
    assert 0 < engine.copier.parking_pool.stats.buffers < 9  # and the room left parked some layers
    assert "host memory is short" not in caplog.text
    loss.backward()
    got = (loss.detach(), lora_grads(model))
    _assert_same(expected, got)


def test_steps_longer_than_the_token_cap_recompute_attention(monkeypatch):
    reference, model, engine, counts = _parking_pair(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(estimate, "PARKING_MAX_TOKENS", ids.numel() - 1)
    _assert_same(_step(reference, ids), _counted_step(counts, model, ids))
    assert engine.copier.parking_pool.stats.buffers == 0 and counts["sdpa"] == 3


def test_steps_shorter_than_the_token_floor_recompute_attention(monkeypatch):
    """Below PARKING_MIN_TOKENS a step is bound by the host, where parking's copies cost more than
    the attention forward they spare: it parks nothing and recomputes attention."""
    reference, model, engine, counts = _parking_pair(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(estimate, "PARKING_MIN_TOKENS", ids.numel() + 1)
    _assert_same(_step(reference, ids), _counted_step(counts, model, ids))
    assert engine.copier.parking_pool.stats.buffers == 0 and counts["sdpa"] == 3
    assert not estimate.parks(ids.numel(), 0, 64 * 1024**3) and estimate.parks(ids.numel() + 1, 0, 64 * 1024**3)


def test_parked_attention_under_cpu_autocast_runs_in_the_autocast_dtype(monkeypatch):
    """RoPE's fp32 tables leave q and k in fp32 beside a bf16 v under autocast: the parked path
    casts them as autocast casts SDPA's inputs, and parks."""
    reference, _ = tiny_lora_model("tiny-llama", "none")
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _step(reference, ids)
        got = _step(model, ids)
    assert engine.copier.parking_pool.stats.buffers == 9 and not attention._refused
    (loss_a, grads_a), (loss_b, grads_b) = expected, got
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=1e-3)  # measured: equal
    # Per tensor, relative to its norm: the parked path's bf16 roundings differ from SDPA's, 4.5e-3
    # at most over the 42 LoRA gradients (median 1.6e-3); a zeroed gradient gives 1.0, the fp32
    # gradients 3.5e-2. (An elementwise atol of 3e-2 let 19 of them be zeroed: their largest entry
    # is under it.)
    assert_relatively_close(grads_b, grads_a, tol=1.5e-2)


@pytest.mark.parametrize("mode", ["true", "unsloth"])
def test_lora_on_the_mlp_only(mode):
    """The first layer's attention half then has nothing to differentiate."""
    mlp = ["gate_proj", "up_proj", "down_proj"]
    reference, _ = tiny_lora_model("tiny-llama", "none", target_modules=mlp)
    model, _ = tiny_lora_model("tiny-llama", mode, target_modules=mlp)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11))
    _assert_same(_step(reference, ids), _step(model, ids))
