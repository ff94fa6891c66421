"""Every checkpointing mode gives the gradients of `none`: with accumulation, several forwards
before one backward, generation between steps, dropout, frozen layers, changing shapes."""

from __future__ import annotations

import gc

import pytest
import torch
from peft import LoraConfig

from ftune.engine import Policy, decoder_layers, install_checkpointing
from ftune.presets import preset_config
from tests.helpers import lora_grads, tiny_lora_model

MODES = ["true", "unsloth"]
VOCAB = 512


def _batch(seed: int, batch: int, seq: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def run_scenario(model) -> list:
    """Two optimizer-free 'steps' touching every case; returns losses, grads and generations."""
    record = []
    model.train()
    torch.manual_seed(123)  # LoRA dropout draws from this
    # Step 1: gradient accumulation over micro-batches of different shapes.
    for seed, (batch, seq) in enumerate([(2, 17), (3, 9)]):
        ids = _batch(seed, batch, seq)
        loss = model(input_ids=ids, labels=ids).loss / 2
        loss.backward()
        record.append(loss.detach())
    record.append(lora_grads(model))
    model.zero_grad(set_to_none=True)

    # Generation between steps, with the cache on and inference-mode tensors.
    model.eval()
    with torch.inference_mode():
        generated = model.generate(input_ids=_batch(7, 1, 5), max_new_tokens=4, do_sample=False, use_cache=True,
                                   pad_token_id=0)
    record.append(generated)
    model.train()

    # Step 2: two forwards before one backward, attention mask with padding.
    first, second = _batch(10, 2, 12), _batch(11, 2, 12)
    mask = torch.ones_like(second)
    mask[0, :3] = 0
    loss = model(input_ids=first, labels=first).loss + model(input_ids=second, attention_mask=mask, labels=second).loss
    loss.backward()
    record.append(loss.detach())
    record.append(lora_grads(model))
    return record


def assert_same(reference: list, other: list, atol: float) -> None:
    assert len(reference) == len(other)
    for expected, got in zip(reference, other):
        if isinstance(expected, dict):
            assert expected.keys() == got.keys()
            assert len(expected) > 0
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)
        elif expected.dtype == torch.long:
            assert torch.equal(expected, got)
        else:
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_equal_none(preset, mode, dropout):
    reference_model, _ = tiny_lora_model(preset, "none", dropout=dropout)
    model, engine = tiny_lora_model(preset, mode, dropout=dropout)
    assert engine.counts()[{"true": "recompute", "unsloth": "offload"}[mode]] == 3
    # fp32 on CPU is deterministic: the recompute reproduces the forward bit for bit.
    assert_same(run_scenario(reference_model), run_scenario(model), atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-mistral"])
@pytest.mark.parametrize("mode", MODES)
def test_mlp_chunked_recompute_equals_none(preset, mode):
    """The MLP half recomputed 5 tokens at a time (34-row batches: 7 uneven chunks)."""
    reference_model, _ = tiny_lora_model(preset, "none")
    intermediate = preset_config(preset).intermediate_size
    model, engine = tiny_lora_model(preset, mode, mlp_chunk_bytes=intermediate * 4 * 5)
    halves = [layer.forward.halves for layer in decoder_layers(model)]
    assert all(h is not None and h.chunk_tokens(4) == 5 for h in halves)
    assert_same(run_scenario(reference_model), run_scenario(model), atol=1e-5)


def test_dropout_layers_are_not_chunked():
    model, _ = tiny_lora_model("tiny-llama", "true", dropout=0.1)
    assert all(layer.forward.halves is None for layer in decoder_layers(model))


def test_gradients_differ_when_they_should():
    """The comparison can fail: a different dropout draw changes the gradients."""
    reference, _ = tiny_lora_model("tiny-llama", "none", dropout=0.1)
    model, _ = tiny_lora_model("tiny-llama", "unsloth", dropout=0.1)
    ids = _batch(0, 2, 9)
    torch.manual_seed(1)
    reference(input_ids=ids, labels=ids).loss.backward()
    torch.manual_seed(2)
    model(input_ids=ids, labels=ids).loss.backward()
    a, b = lora_grads(reference), lora_grads(model)
    assert max((a[n] - b[n]).abs().max().item() for n in a) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_frozen_layers_still_train_the_adapted_ones(mode):
    """LoRA on the last layer only: the frozen layers below need no backward, the last one does."""
    kwargs = dict(layers_to_transform=[2])
    reference, _ = tiny_lora_model("tiny-llama", "none", **kwargs)
    model, _ = tiny_lora_model("tiny-llama", mode, **kwargs)
    ids = _batch(3, 2, 10)
    for m in (reference, model):
        m(input_ids=ids, labels=ids).loss.backward()
    expected, got = lora_grads(reference), lora_grads(model)
    assert expected and all("layers.2." in n for n in expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_an_adapter_added_after_a_step_trains(mode):
    """A second adapter added between steps (and made the active one) trains: the engine passes each
    layer's trainable parameters as they are at that forward, and their gradients are those of `none`."""
    grads = {}
    for name in ("none", mode):
        model, _ = tiny_lora_model("tiny-llama", name)
        ids = _batch(4, 2, 10)
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
        model.set_adapter("second")
        for parameter_name, parameter in model.named_parameters():
            if "lora_B.second" in parameter_name:
                torch.nn.init.normal_(parameter, std=0.05)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = lora_grads(model)
    assert grads["none"] and all(".second." in name for name in grads["none"])
    assert grads[mode].keys() == grads["none"].keys()
    for name in grads["none"]:
        torch.testing.assert_close(grads[mode][name], grads["none"][name], atol=1e-6, rtol=0)


def test_mixed_policies_per_layer():
    reference, _ = tiny_lora_model("tiny-llama", "none")
    model, engine = tiny_lora_model("tiny-llama", "none")
    engine.remove()
    engine = install_checkpointing(model, "smart", policies=[Policy.OFFLOAD, Policy.KEEP, Policy.RECOMPUTE])
    assert engine.counts() == {"keep": 1, "recompute": 1, "offload": 1}
    assert_same(run_scenario(reference), run_scenario(model), atol=1e-6)


def test_pinned_pool_does_not_grow_over_steps():
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    stats = engine.copier.pool.stats
    after_first = None
    for step in range(20):
        ids = _batch(step, 2, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert stats.bytes_in_use == 0, "every host buffer goes back to the pool after backward"
        if step == 0:
            after_first = (stats.buffers, stats.bytes_total)
    assert stats.buffers == 3  # one buffer per layer input, allocated in the first step
    assert (stats.buffers, stats.bytes_total) == after_first
    assert stats.peak_in_use == 3 * stats.bytes_total // 3


def test_pool_reuses_buffers_when_shapes_change():
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    stats = engine.copier.pool.stats
    for seq in [32, 8, 20, 32, 5, 31]:
        ids = _batch(seq, 2, seq)
        model(input_ids=ids, labels=ids).loss.backward()
    # Sizes are rounded up to 2 MiB, so every one of these shapes shares the first step's buffers.
    assert stats.buffers == 3


def test_small_buffers_are_powers_of_two_shared_by_lengths_within_one():
    """A padding-free batch changes length every step: a buffer first asked for by a shorter one
    serves every later one up to its power of two, without a new (pinned, synchronizing) allocation."""
    from ftune.engine.host_memory import PIECE, HostBufferPool, buffer_size

    mib = 2**20
    assert PIECE == 16 * mib
    assert [buffer_size(n) for n in (1, 2 * mib, 2 * mib + 1, 9 * mib, 16 * mib, 16 * mib + 1, 70 * mib)] == \
        [2 * mib, 2 * mib, 4 * mib, 16 * mib, 16 * mib, 32 * mib, 80 * mib]
    pool = HostBufferPool(pin_memory=False)
    [first] = pool.acquire(5 * mib)
    assert first.numel() == 8 * mib
    pool.release([first])
    [again] = pool.acquire(7 * mib)
    assert again.data_ptr() == first.data_ptr()
    assert (pool.stats.buffers, pool.stats.bytes_total) == (1, 8 * mib)


def test_large_tensors_take_pieces_and_a_longer_batch_pins_only_the_pieces_it_adds():
    """Above a piece a tensor is held in whole pieces cut from power-of-two blocks: a longer batch
    than any before adds pieces and keeps the ones it has (a buffer per tensor would be replaced by
    a larger one and everything pinned again)."""
    from ftune.engine.host_memory import PIECE, HostBufferPool

    pool = HostBufferPool(pin_memory=False)
    first = pool.acquire(3 * PIECE + 1)  # four pieces: one block of four
    assert [b.numel() for b in first] == [PIECE] * 4
    assert (pool.stats.buffers, pool.stats.bytes_total) == (1, 4 * PIECE)
    pool.release(first)
    longer = pool.acquire(6 * PIECE)  # the four again and a block of two
    assert {b.data_ptr() for b in first} <= {b.data_ptr() for b in longer}
    assert (pool.stats.buffers, pool.stats.bytes_total) == (2, 6 * PIECE)
    pool.release(longer)
    assert pool.stats.bytes_in_use == 0 and len(pool.acquire(6 * PIECE)) == 6 and pool.stats.buffers == 2


def test_reserve_pins_a_steps_pieces_in_few_blocks_and_trim_frees_only_idle_blocks():
    from ftune.engine.host_memory import PIECE, HostBufferPool

    pool = HostBufferPool(pin_memory=False)
    pool.reserve([2 * PIECE + 5] * 5)  # three pieces each: 15, pinned as blocks of 8, 4, 2 and 1
    assert (pool.stats.buffers, pool.stats.bytes_total) == (4, 15 * PIECE)
    held = [pool.acquire(2 * PIECE + 5) for _ in range(5)]
    assert pool.stats.buffers == 4  # the step itself pins nothing
    pool.reserve([2 * PIECE + 5] * 5)
    assert pool.stats.buffers == 4 * 2  # all 15 held: the next step's are pinned anew
    for buffers in held:
        pool.release(buffers)
    in_use = pool.acquire(PIECE * 2)  # their block (or blocks) stays
    freed = pool.trim()
    kept = pool.stats.bytes_total
    assert freed == 30 * PIECE - kept and 2 * PIECE <= kept <= 16 * PIECE and pool.stats.buffers <= 2
    pool.release(in_use)
    assert pool.trim() == kept and pool.stats.buffers == 0


def test_stash_spanning_pieces_comes_back_bit_for_bit():
    from ftune.engine.host_memory import PIECE, HostCopier

    copier = HostCopier(torch.device("cpu"))
    tensor = torch.randn(PIECE // 4 * 2 + 7, dtype=torch.float32)  # two pieces and 28 bytes
    stash = copier.stash(tensor)
    assert stash.on_host and copier.pool.stats.bytes_in_use == 3 * PIECE
    assert torch.equal(stash.fetch(), tensor)
    assert copier.pool.stats.bytes_in_use == 0


def test_layer_inputs_in_pieces_give_the_gradients_of_none_and_a_longer_step_pins_up_front(monkeypatch):
    """With pieces small enough that every layer input spans several, the scenario's gradients
    equal `none`'s; a step longer than any before pins its pieces as its first layer starts, in
    blocks of a power of two pieces, and its later layers pin nothing."""
    from ftune.engine import host_memory

    monkeypatch.setattr(host_memory, "PIECE", 1024)
    reference, _ = tiny_lora_model("tiny-llama", "none")
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    assert_same(run_scenario(reference), run_scenario(model), atol=1e-6)

    pool, pinned = engine.copier.pool, []
    allocate = pool._allocate
    monkeypatch.setattr(pool, "_allocate", lambda nbytes, keep_free: pinned.append(nbytes) or allocate(nbytes, keep_free))
    first_layer = decoder_layers(model)[0]
    pinned_by_first_layer = []
    first_layer.register_forward_hook(lambda module, args, output: pinned_by_first_layer.append(list(pinned)))
    ids = _batch(3, 4, 40)  # longer than any batch of the scenario
    model(input_ids=ids, labels=ids).loss.backward()
    input_bytes = 4 * 40 * model.config.hidden_size * 4
    pieces = 3 * -(-input_bytes // 1024)
    assert pinned and all(n % 1024 == 0 and (n // 1024) & (n // 1024 - 1) == 0 for n in pinned)
    assert pool.stats.bytes_total >= pieces * 1024  # every layer's input fit
    assert len(pinned) <= pieces.bit_length()
    assert pinned_by_first_layer[-1] == pinned  # all of it by the end of the first layer's forward


def test_pool_lets_idle_buffers_go_when_longer_batches_supersede_them():
    """Larger buffers serve every request smaller ones did: once a batch needs them, the idle
    smaller ones leave the pool (pinned memory is the host's to share); one in use stays."""
    from ftune.engine.host_memory import HostBufferPool

    mib = 2**20
    pool = HostBufferPool(pin_memory=False)
    [idle], [held] = pool.acquire(3 * mib), pool.acquire(3 * mib)
    pool.release([idle])
    [larger] = pool.acquire(5 * mib)
    assert larger.numel() == 8 * mib
    assert (pool.stats.buffers, pool.stats.bytes_total) == (2, 12 * mib)  # the held 4 MiB and the new 8 MiB
    pool.release([held])
    pool.release([larger])
    assert pool.acquire(4 * mib)[0].numel() == 4 * mib  # the best fit still


def test_dropped_graph_returns_its_buffers():
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    ids = _batch(0, 2, 8)
    loss = model(input_ids=ids, labels=ids).loss
    assert engine.copier.pool.stats.bytes_in_use > 0
    del loss
    gc.collect()
    assert engine.copier.pool.stats.bytes_in_use == 0


def test_backward_twice_through_offloaded_graph_is_a_clear_error():
    model, _ = tiny_lora_model("tiny-llama", "unsloth")
    ids = _batch(0, 1, 6)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_no_graph_means_no_checkpointing():
    """Under no_grad the layers run as they are (generation keeps its cache)."""
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    with torch.no_grad():
        model(input_ids=_batch(0, 1, 6))
    assert engine.copier.pool.stats.buffers == 0


def test_remove_restores_the_layers():
    model, engine = tiny_lora_model("tiny-llama", "unsloth")
    layers = decoder_layers(model)
    assert all("forward" in layer.__dict__ for layer in layers)
    engine.remove()
    assert all("forward" not in layer.__dict__ for layer in layers)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_bf16_gradients_match_none(mode):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    for name in ("none", mode):
        model, _ = tiny_lora_model("tiny-llama", name, dropout=0.1)
        model.to("cuda")
        model.train()
        torch.manual_seed(5)
        ids = _batch(0, 2, 64).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[name] = (loss.detach(), lora_grads(model))
    (loss_a, grads_a), (loss_b, grads_b) = results["none"], results[mode]
    # The recompute runs the same bf16 kernels on the same inputs: equal to rounding.
    torch.testing.assert_close(loss_b, loss_a, atol=1e-3, rtol=0)
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-2 * scale + 1e-6, rtol=0, msg=name)


@pytest.mark.gpu
def test_gpu_offload_really_leaves_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batch, seq, layers = 2, 4096, 3
    held = {}
    for mode in ("true", "unsloth"):
        model, engine = tiny_lora_model("tiny-llama", mode, layers=layers)
        model.to("cuda")
        ids = _batch(0, batch, seq).cuda()
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held[mode] = torch.cuda.memory_allocated() - before
        if mode == "unsloth":
            stats = engine.copier.pool.stats
            assert stats.pinned
            assert stats.bytes_in_use >= layers * batch * seq * 128 * 4  # fp32 hidden states, in host memory
        loss.backward()
        del loss, model
    layer_inputs = layers * batch * seq * 128 * 4
    assert held["true"] - held["unsloth"] >= 0.9 * layer_inputs


def test_host_embedding_gives_the_same_loss_and_gradients():
    from ftune.engine.host_memory import HostEmbedding, move_tables_to_host

    reference, _ = tiny_lora_model("tiny-llama", "none")
    model, _ = tiny_lora_model("tiny-llama", "unsloth")
    freed = move_tables_to_host(model, torch.device("cpu"), lm_head=False)
    assert freed == VOCAB * 128 * 4
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_same(run_scenario(reference), run_scenario(model), atol=1e-6)


def _with_fused_loss(model):
    from ftune.integrations.transformers import apply_kernels

    apply_kernels(model, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=True)
    return model


def test_host_lm_head_gives_the_same_loss_and_gradients():
    """Both tables in host memory under the fused loss: the same losses, gradients and generations."""
    from ftune.engine.host_memory import HostLMHead, move_tables_to_host

    reference = _with_fused_loss(tiny_lora_model("tiny-llama", "none")[0])
    model = _with_fused_loss(tiny_lora_model("tiny-llama", "unsloth")[0])
    assert move_tables_to_host(model, torch.device("cpu"), lm_head=True) == 2 * VOCAB * 128 * 4
    head = model.get_output_embeddings()
    assert isinstance(head, HostLMHead)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_same(run_scenario(reference), run_scenario(model), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_short_steps_keep_their_layers_and_stream_the_head(mode, monkeypatch):
    """With keep_up_to, a step of at most that many tokens runs every layer as mode none does (no
    recompute, nothing offloaded) and reads the host LM head in blocks, never whole; a longer step
    runs the mode and fetches the head as the first layer starts. Losses, gradients and generations
    are those of mode none."""
    import ftune.engine.recompute as recompute
    from ftune.engine.host_memory import move_tables_to_host

    reference = _with_fused_loss(tiny_lora_model("tiny-llama", "none")[0])
    move_tables_to_host(reference, torch.device("cpu"), lm_head=True)
    model = _with_fused_loss(tiny_lora_model("tiny-llama", mode)[0])
    model._ftune_engine.keep_up_to = 30  # run_scenario's steps: 34 tokens, then 27 and 24 twice
    move_tables_to_host(model, torch.device("cpu"), lm_head=True, stream_up_to=30)
    head = model.get_output_embeddings()
    head.rows_per_chunk = 100  # the streamed loss in six blocks
    fetched, engine_calls = [], []
    decoder_layers(model)[0].register_forward_pre_hook(
        lambda module, args: fetched.append(head.on_device) if torch.is_grad_enabled() else None)
    apply = recompute._RecomputedLayer.apply
    monkeypatch.setattr(recompute._RecomputedLayer, "apply",
                        lambda *args: engine_calls.append(args[0].index) or apply(*args))
    assert_same(run_scenario(reference), run_scenario(model), atol=1e-6)
    assert fetched == [True, False, False, False]
    assert engine_calls == [0, 1, 2]  # the 34-token step's layers alone


@pytest.mark.gpu
def test_gpu_short_steps_keep_their_layers_and_stream_the_head_on_its_side_stream():
    """On CUDA, in bf16: a short step that keeps its layers copies the host head a block at a time
    on the head's side stream, never whole, and its loss and gradients are as close to fp32's as
    mode none's in bf16. (They are not mode none's to bf16's last bit: the streamed loss sums each
    block's product in fp32. On the H200, 2026-12-05, each was within 5.0% of fp32's at worst, and
    1.2% from the other.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ftune.engine.host_memory import move_tables_to_host

    results = {}
    for name, mode in (("fp32", "none"), ("none", "none"), ("keep", "unsloth")):
        model = _with_fused_loss(tiny_lora_model("tiny-llama", mode)[0].to("cuda"))
        move_tables_to_host(model, torch.device("cuda"), lm_head=True, stream_up_to=256 if name == "keep" else 0)
        model._ftune_engine.keep_up_to = 256 if name == "keep" else 0
        head = model.get_output_embeddings()
        head.rows_per_chunk = 128  # four blocks
        whole, blocks = [], []
        prefetch, chunks = head.prefetch, head.chunks
        head.prefetch = lambda: whole.append(1) or prefetch()
        head.chunks = lambda: blocks.append(1) or chunks()
        model.train()
        ids = _batch(0, 2, 64).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "fp32"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # (the fused loss lets go of a whole head once it has its gradient: on_device tells nothing here)
        assert (bool(whole), bool(blocks)) == ((False, True) if name == "keep" else (True, False)), name
        results[name] = (loss.detach().float(), lora_grads(model))
    exact_loss, exact = results["fp32"]

    def worst_error(grads) -> float:
        return max(((grads[k].float() - exact[k]).abs().max() / exact[k].abs().max()).item() for k in exact)

    torch.testing.assert_close(results["keep"][0], results["none"][0], atol=1e-3, rtol=0)
    torch.testing.assert_close(results["keep"][0], exact_loss, atol=1e-2, rtol=0)
    assert worst_error(results["keep"][1]) <= 1.25 * worst_error(results["none"][1])


def test_host_lm_head_is_dropped_before_the_backward_and_kept_for_decoding():
    from ftune.engine.host_memory import move_tables_to_host

    model = _with_fused_loss(tiny_lora_model("tiny-llama", "unsloth")[0])
    move_tables_to_host(model, torch.device("cpu"), lm_head=True)
    head = model.get_output_embeddings()
    seen_in_backward, fetched_ahead = [], []
    layer = decoder_layers(model)[-1]  # its input requires grad: the hook fires
    layer.register_full_backward_hook(lambda *args: seen_in_backward.append(head._on_device))
    layer.register_forward_pre_hook(lambda *args: fetched_ahead.append(head._on_device is not None))
    ids = _batch(0, 2, 9)
    loss = model(input_ids=ids, labels=ids).loss
    assert fetched_ahead == [True]  # the first layer started the copy
    assert head._on_device is None  # the fused loss released it
    loss.backward()
    assert seen_in_backward == [None]
    model.eval()
    with torch.inference_mode():
        model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert head._on_device is not None  # decoding keeps it rather than fetching it per token
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert head._on_device is None


@pytest.mark.parametrize("order", ["trl-first", "ftune-first"])
def test_host_lm_head_is_dropped_before_the_layers_backward_under_trls_chunked_head(order):
    """DPO and GRPO call `model(..., fused_lm_head=True)`: TRL's chunked head reads the head's
    weight itself and keeps it for its own backward. The copy is dropped once the backward has
    the decoder's output gradient, before any layer's backward; losses and gradients unchanged."""
    from trl.trainer.utils import add_fused_lm_head

    from ftune.engine.host_memory import move_tables_to_host

    results = []
    for host in (False, True):
        model = tiny_lora_model("tiny-llama", "unsloth")[0]
        if order == "trl-first":
            add_fused_lm_head(model.get_base_model())
            _with_fused_loss(model)
        else:
            _with_fused_loss(model)
            add_fused_lm_head(model.get_base_model())
        seen_in_backward = []
        if host:
            move_tables_to_host(model, torch.device("cpu"), lm_head=True)
            head = model.get_output_embeddings()
            decoder_layers(model)[-1].register_full_backward_hook(
                lambda *args: seen_in_backward.append(head._on_device))
        model.zero_grad(set_to_none=True)
        ids = _batch(3, 2, 11)
        loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        if host:
            assert head._on_device is not None  # read by TRL's head, kept for its backward
        loss.backward()
        if host:
            assert seen_in_backward == [None] and head._on_device is None
        results.append((loss.detach(), lora_grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=0, msg=name)


def test_trainable_embeddings_stay():
    from ftune.engine.host_memory import move_tables_to_host

    model, _ = tiny_lora_model("tiny-llama", "none")
    model.get_input_embeddings().weight.requires_grad_(True)
    model.get_output_embeddings().weight.requires_grad_(True)
    assert move_tables_to_host(model, torch.device("cpu"), lm_head=True) == 0
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def _tied(model):
    base = model.get_base_model()
    base.lm_head.weight = base.get_input_embeddings().weight
    return model


def test_tied_table_moves_only_with_the_head_and_once():
    """A tied table is both tables: in host memory only when the head goes too (else the GPU keeps it
    for the head anyway), as one pinned copy serving the lookups and the head's fetches."""
    from ftune.engine.host_memory import HostEmbedding, HostLMHead, move_tables_to_host

    model = _tied(tiny_lora_model("tiny-llama", "none")[0])
    assert move_tables_to_host(model, torch.device("cpu"), lm_head=False) == 0
    assert type(model.get_input_embeddings()) is torch.nn.Embedding

    class OwnForward(torch.nn.Embedding):  # an embedding HostEmbedding would not reproduce stays...
        def forward(self, ids):
            return super().forward(ids) * 2

    base, table = model.get_base_model(), model.get_input_embeddings()
    own = OwnForward(*table.weight.shape)
    own.weight = table.weight
    base.set_input_embeddings(own)
    assert move_tables_to_host(model, torch.device("cpu"), lm_head=True) == 0
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # ...and keeps its tied head with it
    base.set_input_embeddings(table)
    assert move_tables_to_host(model, torch.device("cpu"), lm_head=True) == VOCAB * 128 * 4
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, HostEmbedding) and isinstance(head, HostLMHead)
    assert head.host_weight is embedding.host_weight


def test_tied_tables_in_host_memory_give_the_same_loss_and_gradients():
    from ftune.engine.host_memory import move_tables_to_host

    reference = _with_fused_loss(_tied(tiny_lora_model("tiny-llama", "none")[0]))
    model = _with_fused_loss(_tied(tiny_lora_model("tiny-llama", "unsloth")[0]))
    move_tables_to_host(model, torch.device("cpu"), lm_head=True)
    assert_same(run_scenario(reference), run_scenario(model), atol=1e-6)


@pytest.mark.gpu
def test_gpu_host_tables_match_device_tables():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ftune.engine.host_memory import move_tables_to_host

    table = VOCAB * 128 * 4
    losses, grads, held = [], [], []
    for host in (False, True):
        model, _ = tiny_lora_model("tiny-llama", "unsloth")
        model.to("cuda")
        _with_fused_loss(model)
        if host:
            assert move_tables_to_host(model, torch.device("cuda"), lm_head=True) == 2 * table
            assert model.get_input_embeddings().weight.is_pinned()
            assert model.get_output_embeddings().host_weight.is_pinned()
        at_rest = torch.cuda.memory_allocated()
        for seq in (64, 16, 64):  # the staging buffer is reused and regrown
            ids = _batch(seq, 2, seq).cuda()
            if seq == 16:  # decoding between steps leaves the head on the GPU, made under inference mode
                model.eval()
                with torch.inference_mode():
                    model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
                model.train()
                # a loss from the logits: the head's own matmul saves that copy for its backward
                model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
            loss = model(input_ids=ids, labels=ids).loss
            torch.cuda.synchronize()
            held.append(torch.cuda.memory_allocated() - at_rest)  # what the backward starts with
            loss.backward()
        losses.append(loss.item())
        grads.append(lora_grads(model))
        del model, _
        gc.collect()  # the engine's hooks make cycles: the next run's measurement must not see this model
    assert losses[0] == losses[1]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)
    # The backward starts with the same activations and without the head's copy: had the fused
    # loss kept it, the host run would hold one table more
    assert abs(held[5] - held[2]) < table // 2, held


def test_unknown_architecture_falls_back_with_a_warning(monkeypatch, caplog):
    """Layers the engine does not recognise: transformers' own checkpointing, mode true."""
    import ftune.engine.recompute as checkpoint

    reference, _ = tiny_lora_model("tiny-llama", "none")
    model, _ = tiny_lora_model("tiny-llama", "none")
    monkeypatch.setattr(checkpoint, "decoder_layers", lambda m: [])
    engine = checkpoint.install_checkpointing(model, "unsloth")
    assert engine.mode == "true (transformers)" and "falls back" in caplog.text
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    ids = _batch(0, 2, 9)
    for m in (reference, model):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    a, b = lora_grads(reference), lora_grads(model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["true", "unsloth"])
def test_evaluation_forward_runs_the_mlp_in_chunks_and_gives_the_same_logits(mode, monkeypatch):
    """Without a graph (evaluation), layers of a family with halves run the MLP chunk by chunk, as
    the training step does, and give mode none's logits; generation with a cache runs them whole."""
    from ftune.engine.halves import ResidualHalves

    reference, _ = tiny_lora_model("tiny-llama", "none")
    intermediate = preset_config("tiny-llama").intermediate_size
    model, _ = tiny_lora_model("tiny-llama", mode, mlp_chunk_bytes=intermediate * 4 * 5)
    chunked = []
    chunks = ResidualHalves._chunks
    monkeypatch.setattr(ResidualHalves, "_chunks", lambda self, h: chunked.append(1) or chunks(self, h))
    ids = torch.randint(3, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(chunked) == 3  # each layer's MLP in chunks of 5 tokens
    chunked.clear()
    with torch.no_grad():
        model.generate(input_ids=ids[:1, :4], max_new_tokens=2, do_sample=False, use_cache=True)
    assert not chunked
