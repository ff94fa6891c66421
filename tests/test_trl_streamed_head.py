"""The streamed per-token log-probabilities (ftune.integrations.trl.streamed_token_log_probs) against
TRL's chunked kernel over the whole head: the same outputs and input gradients, with the head read
in blocks of uneven size."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ftune.kernels.fused_linear_cross_entropy import WeightInChunks
from ftune.integrations.trl import streamed_token_log_probs


class _Blocks:
    """A head read a block of rows at a time, as HostLMHead reads its host copy; counts its reads."""

    def __init__(self, weight: torch.Tensor, rows_per_chunk: int):
        self.weight, self.rows_per_chunk = weight, rows_per_chunk
        self.shape, self.dtype = weight.shape, weight.dtype
        self.reads = 0

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        self.reads += 1
        for first in range(0, self.shape[0], self.rows_per_chunk):
            yield first, self.weight[first: first + self.rows_per_chunk]


class _Counted:
    """A Triton kernel whose launches (kernel[grid]) are recorded by name."""

    def __init__(self, kernel, name: str, launches: list):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


def _trl(hidden, weight, targets, temperature, softcap, scale, outputs):
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, temperature, 128, softcap, scale, outputs)


@pytest.mark.parametrize("triton", [False, True], ids=["torch-tiles", "triton-tiles"])
@pytest.mark.parametrize("temperature,softcap,scale", [(1.0, None, 1.0), (0.7, 3.0, 0.5)])
def test_streamed_log_probs_match_trls_kernel_over_the_whole_head(temperature, softcap, scale, triton, monkeypatch):
    """Both of TRL's tile forms: its torch functions, and its Triton kernels with their launch
    grids, run here under Triton's interpreter (tests/conftest.py), as a GPU runs them."""
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "_use_triton", lambda device: triton)
    launches = []
    for name in ("_forward_kernel", "_backward_kernel"):  # count the Triton kernels' launches
        kernel = getattr(chunked_logprob, name)
        monkeypatch.setattr(chunked_logprob, name, _Counted(kernel, name, launches))
    torch.manual_seed(0)
    # blocks of 1152, 1152 and 296 rows: the first two span two of the Triton kernels' 1024-wide tiles
    vocab, width, tokens = 2600, 64, 12
    weight = torch.randn(vocab, width)
    weight[200] = weight[5]  # a tie: target 200 is never the first argmax where 5 also wins
    hidden = torch.randn(tokens, width) * 2
    hidden[0] = weight[5] * 4  # token 0's largest logits: rows 5 and 200, equal
    hidden[1] = weight[5] * 4
    targets = torch.randint(0, vocab, (tokens,))
    targets[0], targets[1], targets[2] = 5, 200, vocab - 1  # the tie both ways, and the last row
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    head = _Blocks(weight, rows_per_chunk=1152)
    assert isinstance(head, WeightInChunks)

    ours_hidden = hidden.clone().requires_grad_()
    ours = streamed_token_log_probs(ours_hidden, head, targets, temperature=temperature,
                                    final_logit_softcapping=softcap, logit_scale=scale, outputs=outputs)
    assert launches.count("_forward_kernel") == (3 if triton else 0)  # one a block: 1152, 1152 and 296 rows
    theirs_hidden = hidden.clone().requires_grad_()
    theirs = _trl(theirs_hidden, weight, targets, temperature, softcap, scale, outputs)
    log_probs, entropy, mean_logits, is_top1 = ours
    torch.testing.assert_close(log_probs, theirs[0], rtol=1e-5, atol=1e-5)
    # the entropy sums 2600 terms per token, in another order across blocks: fp32's rounding
    torch.testing.assert_close(entropy, theirs[1], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(mean_logits, theirs[3], rtol=1e-5, atol=1e-5)
    assert torch.equal(is_top1, theirs[4])
    assert is_top1[0] and not is_top1[1]
    assert head.reads == 1

    # a loss of both differentiable outputs, with weights per token, as DPO's and GRPO's are
    weights = torch.randn(tokens)
    ((log_probs * weights).sum() + 0.3 * entropy.sum()).backward()
    ((theirs[0] * weights).sum() + 0.3 * theirs[1].sum()).backward()
    torch.testing.assert_close(ours_hidden.grad, theirs_hidden.grad, rtol=1e-4, atol=1e-5)
    assert head.reads == 2  # the backward reads the head once more
    assert (launches.count("_backward_kernel") > 0) == triton


def test_a_logged_entropy_costs_no_gradient_and_the_bad_output_is_named():
    torch.manual_seed(1)
    weight = torch.randn(100, 32)
    hidden = torch.randn(5, 32, requires_grad=True)
    targets = torch.randint(0, 100, (5,))
    log_probs, entropy, mean_logits, is_top1 = streamed_token_log_probs(
        hidden, _Blocks(weight, 40), targets, outputs=("log_probs", "entropy"))
    assert mean_logits is None and is_top1 is None
    log_probs.sum().backward()  # the entropy, logged only, has no gradient to give
    reference = hidden.detach().clone().requires_grad_()
    torch.log_softmax(reference @ weight.t(), -1).gather(1, targets[:, None]).sum().backward()
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-5, atol=1e-6)
    # a batch without a scored token: empty outputs, and a backward that gives zeros, with no block read
    empty, blocks = torch.zeros(0, 32, requires_grad=True), _Blocks(weight, 40)
    log_probs, *_ = streamed_token_log_probs(empty, blocks, targets[:0])
    assert log_probs.shape == (0,)
    (log_probs.sum() + (hidden * 0).sum()).backward()
    assert blocks.reads == 0
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        streamed_token_log_probs(hidden, _Blocks(weight, 40), targets, outputs=("log_probs", "log_sum_sq_probs"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_streamed_log_probs_match_trls_kernel_in_bf16(device):
    """Under bf16 autocast, a HostLMHead streaming its blocks (on CUDA from pinned memory on its
    side stream): TRL's outputs and input gradient to bf16 rounding (the backward's per-block
    products summed in fp32, as TRL sums its tiles'). On the CPU both fold with TRL's torch tiles."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from torch import nn

    from ftune.engine.host_memory import HostLMHead

    torch.manual_seed(0)
    vocab, width, tokens = 4096, 256, 96
    linear = nn.Linear(width, vocab, bias=False).to(torch.bfloat16).requires_grad_(False)
    head = HostLMHead(linear, torch.device(device), streams_the_loss=True)
    head.rows_per_chunk = 1024
    hidden = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    weights = torch.randn(tokens, device=device)
    results = []
    for ours in (True, False):
        h = hidden.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            if ours:
                scored = streamed_token_log_probs(h, head, targets, temperature=0.9, outputs=outputs)
                assert not head.on_device
            else:
                scored = _trl(h, linear.weight.to(device), targets, 0.9, None, 1.0, outputs)
        ((scored[0] * weights).sum() + 0.1 * scored[1].sum()).backward()
        results.append((scored, h.grad))
    (ours, grad), (theirs, expected) = results
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=2e-2)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=2e-2)
    torch.testing.assert_close(ours[2], theirs[3], rtol=0, atol=1e-2)
    assert (ours[3] == theirs[4]).float().mean() > 0.98  # a bf16 tie may fall either way
    torch.testing.assert_close(grad.float(), expected.float(), rtol=0, atol=2e-2 * expected.abs().max().item())


def test_trls_tile_kernels_are_where_the_streamed_head_reads_them():
    """streamed_token_log_probs folds its blocks through TRL's own tile kernels (private names of
    trl/kernels/chunked_logprob.py, checked against trl 1.16.0), in their argument order."""
    import inspect

    from trl.kernels import chunked_logprob

    names = ("_forward_kernel", "_forward_tile", "_backward_kernel", "_backward_tile", "_addmm_fp32", "_use_triton",
             "_BLOCK_SIZE", "TOKEN_CHUNK_SIZE", "OPTIONAL_OUTPUTS")
    missing = [name for name in names if not hasattr(chunked_logprob, name)]
    moved = "trl.kernels.chunked_logprob moved: ftune/integrations/trl.py streamed_token_log_probs needs a look"
    assert not missing, f"{moved} (missing {missing})"
    forward = list(inspect.signature(chunked_logprob._forward_tile).parameters)
    backward = list(inspect.signature(chunked_logprob._backward_tile).parameters)
    assert forward[:12] == ["tile", "tile_stride", "targets", "running_max", "sum_exp", "x_sum_exp", "sq_sum_exp",
                            "z_sum", "max_before_target", "target_logit", "vocab_start", "n_cols"], moved
    assert backward[:9] == ["tile", "tile_stride", "targets", "log_z", "entropy", "grad_logprobs", "grad_entropy",
                            "vocab_start", "n_cols"], moved
    assert chunked_logprob.OPTIONAL_OUTPUTS == ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), moved
    # where the head is whole, TRL's kernel runs as TRL's fused forward runs it, with its token chunk
    from trl.trainer import utils

    assert isinstance(getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None), int), \
        "trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE moved: ftune/integrations/trl.py _token_log_probs needs a look"


def test_trls_fused_forward_streams_where_the_first_layer_left_the_head_in_host_memory():
    """stream_the_fused_head reads the head where the first layer's hook has decided how this
    forward holds it (HostLMHead.prefetch_for_the_forward): a short step with gradients streams it,
    even after a forward without gradients left it whole on the device (an evaluation); a longer
    one, or one that finds it whole without gradients, runs TRL's kernel over the whole head. The
    log-probabilities are those of TRL's own forward in every case."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ftune.engine.host_memory import move_tables_to_host
    from ftune.integrations.trl import stream_the_fused_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    outputs = ("log_probs", "entropy")
    theirs = LlamaForCausalLM(config).requires_grad_(False)
    ours = LlamaForCausalLM(config)
    ours.load_state_dict(theirs.state_dict())
    ours.requires_grad_(False)
    for model in (theirs, ours):
        model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    move_tables_to_host(ours, torch.device("cpu"), lm_head=True, stream_up_to=64)
    head = ours.get_output_embeddings()
    head.rows_per_chunk = 128
    reads = []
    chunks = head.chunks
    head.chunks = lambda: reads.append(1) or chunks()
    for model in (theirs, ours):
        add_fused_lm_head(model, temperature=0.7, outputs=outputs)
    assert stream_the_fused_head(ours)

    def forward(model, ids: torch.Tensor, grad: bool):
        with torch.set_grad_enabled(grad):
            result = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True)
        if grad:
            result.log_probs.sum().backward()
        return result.log_probs.detach()

    # (rows, length, gradients): whether the head streams, and whether it is whole on the device after the forward
    for rows, length, grad, streams, whole_after in [(2, 16, True, True, False), (4, 100, True, False, False),
                                                     (4, 100, False, False, True), (2, 16, True, True, False),
                                                     (2, 16, False, True, False)]:
        ids = torch.randint(0, config.vocab_size, (rows, length))
        reads.clear()
        expected, actual = forward(theirs, ids, grad), forward(ours, ids, grad)
        assert len(reads) == (1 + grad if streams else 0), (rows, length, grad)
        assert head.on_device == whole_after, (rows, length, grad)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
