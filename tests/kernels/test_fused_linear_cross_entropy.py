"""Fused LM head + cross-entropy against transformers' ForCausalLMLoss on full logits."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

import ftune.kernels.fused_linear_cross_entropy as flce
from ftune.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from tests.kernels.common import DEVICE, gpu

# fp32: the same logits, a different summation order. 16-bit: both sides build the logits with a
# 16-bit matmul (chunked here, whole in eager) and round the logits' gradient to 16 bits; the
# loss is an fp32 mean of per-token losses of size ~log(vocab).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}
VOCAB = 100  # not a multiple of any block size


def reference_loss(hidden, weight, labels, bias=None, softcap=None, logit_scale=1.0, return_stats=False, **loss_kwargs):
    """The eager LM head (Gemma 2's softcap included) and transformers' ForCausalLMLoss."""
    logits = torch.nn.functional.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = ForCausalLMLoss(logits, labels, weight.shape[0], **loss_kwargs)
    if not return_stats:
        return loss
    shift_labels = loss_kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    logits, shift_labels = logits.detach().float().flatten(0, -2), shift_labels.flatten()
    valid = shift_labels != -100
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return loss, (entropy[valid].sum(), (logits.argmax(-1) == shift_labels)[valid].sum().float(), valid.sum().float())


def _inputs(batch, seq, hidden_size, dtype, device, ignore=0.3, bias=False, vocab=VOCAB):
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, dtype=dtype, device=device, generator=generator)
    weight = torch.randn(vocab, hidden_size, dtype=dtype, device=device, generator=generator) / hidden_size**0.5 * 4
    labels = torch.randint(0, vocab, (batch, seq), device=device, generator=generator)
    labels[torch.rand(batch, seq, device=device, generator=generator) < ignore] = -100
    # Some labels the model predicts, so top-1 accuracy is neither 0 nor 1
    predicted = (hidden[:, :-1] @ weight.T).argmax(-1)
    labels[:, 1::3] = predicted[:, ::3]
    bias = torch.randn(vocab, dtype=dtype, device=device, generator=generator) if bias else None
    return hidden, weight, bias, labels


class InChunks:
    """A frozen weight served a block of rows at a time, as HostLMHead serves its pinned copy:
    each block a new tensor, as a copy to the device is."""

    # 32 rows a block: a 100-token vocabulary in three full blocks and a partial one
    rows_per_chunk = 32

    def __init__(self, weight):
        self.weight, self.shape, self.dtype = weight, weight.shape, weight.dtype
        self.blocks = []

    def chunks(self):
        rows = self.rows_per_chunk
        for first in range(0, self.shape[0], rows):
            self.blocks.append((first, min(rows, self.shape[0] - first)))
            yield first, self.weight[first : first + rows].clone()


def _run(fn, hidden, weight, bias, labels, weight_grad, scale_output=1.0, streamed=False, **kwargs):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_(weight_grad)
    bias = bias.clone().requires_grad_(weight_grad) if bias is not None else None
    if streamed:
        assert not weight_grad, "a head read in chunks is frozen"
        loss = fn(hidden, InChunks(weight.detach()), labels, bias=bias, **kwargs)
        (loss * scale_output).backward()
        return loss, hidden.grad, None, None
    loss = fn(hidden, weight, labels, bias=bias, **kwargs)
    (loss * scale_output).backward()
    return loss, hidden.grad, weight.grad, bias.grad if bias is not None else None


def _compare(hidden, weight, bias, labels, weight_grad=False, dtype=torch.float32, scale_output=1.0, streamed=False,
             **kwargs):
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("chunk_size", "final_logit_softcapping")}
    ref_kwargs["softcap"] = kwargs.get("final_logit_softcapping")
    ours = _run(fused_linear_cross_entropy, hidden, weight, bias, labels, weight_grad, scale_output, streamed,
                **kwargs)
    ref = _run(reference_loss, hidden, weight, bias, labels, weight_grad, scale_output, **ref_kwargs)
    tol = TOLERANCES[dtype]
    for name, actual, expected in zip(("loss", "hidden grad", "weight grad", "bias grad"), ours, ref, strict=True):
        if expected is None or (streamed and name != "loss" and name != "hidden grad"):
            assert actual is None, name
        else:
            assert actual.dtype == expected.dtype, name
            torch.testing.assert_close(actual, expected, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 32: a 100-token vocabulary spans three full blocks and a partial one, so the
    online logsumexp and argmax cross block boundaries as a 128k vocabulary does on the GPU."""
    monkeypatch.setattr(flce, "MAX_BLOCK_SIZE", 32)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("ignore", [0.0, 0.3], ids=["all-labelled", "some-ignored"])
def test_loss_and_hidden_grad(chunk_size, ignore, small_blocks):
    """Chunks of 1, 4, 5 tokens split the labelled tokens unevenly (the last chunk is partial)."""
    _compare(*_inputs(2, 9, 24, torch.float32, DEVICE, ignore=ignore), chunk_size=chunk_size)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_trainable_weight(bias, small_blocks):
    """A trainable head (and bias) gets its gradient, accumulated over uneven chunks."""
    _compare(*_inputs(2, 9, 24, torch.float32, DEVICE, bias=bias), weight_grad=True, chunk_size=4)


@pytest.mark.parametrize("num_items", [11, "tensor"])
def test_num_items_in_batch(num_items):
    """Sum divided by num_items_in_batch (gradient accumulation), an int or a tensor."""
    num_items = torch.tensor(11, device=DEVICE) if num_items == "tensor" else num_items
    _compare(*_inputs(2, 9, 24, torch.float32, DEVICE), num_items_in_batch=num_items, chunk_size=4)


def test_shift_labels():
    """Labels already shifted (as under sequence parallelism) are used as they are."""
    hidden, weight, bias, labels = _inputs(2, 9, 24, torch.float32, DEVICE)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].roll(1, dims=-1)
    _compare(hidden, weight, bias, labels, shift_labels=shifted)


def test_softcap_and_logit_scale(small_blocks):
    _compare(*_inputs(2, 9, 24, torch.float32, DEVICE), final_logit_softcapping=3.0, logit_scale=0.7, chunk_size=5)


def test_scaled_output():
    """The gradient computed in the forward is scaled by the incoming gradient in the backward."""
    _compare(*_inputs(2, 9, 24, torch.float32, DEVICE), weight_grad=True, scale_output=2.5)


@pytest.mark.parametrize("num_items", [None, 0, 5])
def test_all_ignored(num_items):
    """A batch with no labelled token: loss 0 (not NaN) and zero gradients, whatever num_items is."""
    hidden, weight, _, labels = _inputs(2, 5, 24, torch.float32, DEVICE)
    labels = torch.full_like(labels, -100)
    loss, grad_hidden, grad_weight, _ = _run(
        fused_linear_cross_entropy, hidden, weight, None, labels, True, num_items_in_batch=num_items
    )
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0
    if num_items:
        assert ForCausalLMLoss(hidden @ weight.T, labels, VOCAB, num_items_in_batch=num_items).item() == 0.0


def test_stats(small_blocks):
    """Entropy sum, top-1 correct (first maximum on ties) and labelled-token count, in one pass."""
    hidden, weight, _, labels = _inputs(3, 11, 24, torch.float32, DEVICE)
    # Exact ties: two columns of the head equal, the second one's token as a label
    weight[40] = weight[7]
    labels[0, 1:] = 40
    hidden[0] = weight[7] * 10
    loss, stats = fused_linear_cross_entropy(hidden, weight, labels, return_stats=True, chunk_size=4)
    ref_loss, ref_stats = reference_loss(hidden, weight, labels, return_stats=True)
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[torch.float32])
    torch.testing.assert_close(stats.entropy_sum, ref_stats[0], **TOLERANCES[torch.float32])
    assert stats.num_correct.item() == ref_stats[1].item() and 0 < stats.num_correct.item() < ref_stats[2].item()
    assert stats.num_tokens.item() == ref_stats[2].item()


def test_no_grad_computes_no_gradient():
    hidden, weight, _, labels = _inputs(2, 9, 24, torch.float32, DEVICE)
    hidden.requires_grad_()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference_loss(hidden.detach(), weight, labels), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit(dtype, small_blocks):
    _compare(*_inputs(2, 9, 24, dtype, DEVICE), dtype=dtype, weight_grad=True, chunk_size=5)


def test_autocast():
    """Under autocast the head runs in the autocast dtype, as F.linear would; fp32 grads come back."""
    hidden, weight, _, labels = _inputs(2, 9, 24, torch.float32, DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _compare(hidden, weight, None, labels, weight_grad=True, dtype=torch.bfloat16, chunk_size=4)


def test_chunk_size_bound():
    """The default chunk keeps the chunk's logits within the bound: 1046 tokens of a 128k
    vocabulary in bf16, and never below one token."""
    assert flce.chunk_tokens(128256, torch.bfloat16) == 1046
    assert flce.chunk_tokens(128256, torch.bfloat16) * 128256 * 2 <= flce.MAX_CHUNK_LOGITS_BYTES
    assert flce.chunk_tokens(10**9, torch.float32) == 1


def test_rejects_bad_arguments():
    hidden, weight, _, labels = _inputs(1, 4, 24, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, VOCAB))
    with pytest.raises(ValueError, match="do not match"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :3])
    with pytest.raises(ValueError, match="differ, outside autocast"):
        fused_linear_cross_entropy(hidden, weight.double(), labels)


@pytest.fixture
def streamed_blocks(monkeypatch):
    """Each row of a block of the head (32 rows) in kernel blocks of 16: the online softmax
    crosses both."""
    monkeypatch.setattr(flce, "MAX_BLOCK_SIZE", 16)


@pytest.mark.parametrize("chunk_size", [None, 4], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("ignore", [0.0, 0.3], ids=["all-labelled", "some-ignored"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "frozen-bias"])
def test_streamed_head(chunk_size, ignore, bias, streamed_blocks):
    """A head read a block of rows at a time gives the loss and hidden-state gradient of the
    whole head, with the labels' rows in every block, over whole and partial token chunks."""
    _compare(*_inputs(2, 9, 24, torch.float32, DEVICE, ignore=ignore, bias=bias), streamed=True, chunk_size=chunk_size)


def test_streamed_head_softcap_scale_and_num_items(streamed_blocks):
    _compare(*_inputs(2, 9, 24, torch.float32, DEVICE), streamed=True, final_logit_softcapping=3.0, logit_scale=0.7,
             num_items_in_batch=torch.tensor(11, device=DEVICE), scale_output=2.5)


def test_streamed_head_reads_each_block_once(streamed_blocks):
    hidden, weight, _, labels = _inputs(2, 9, 24, torch.float32, DEVICE)
    head = InChunks(weight)
    fused_linear_cross_entropy(hidden.requires_grad_(), head, labels, chunk_size=4).backward()
    assert head.blocks == [(0, 32), (32, 32), (64, 32), (96, 4)]


def test_streamed_head_stats(streamed_blocks):
    """Entropy and top-1 across blocks: a tie between rows of two blocks goes to the first."""
    hidden, weight, _, labels = _inputs(3, 11, 24, torch.float32, DEVICE)
    weight[40] = weight[7]  # blocks 1 and 0
    labels[0, 1:] = 40
    hidden[0] = weight[7] * 10
    loss, stats = fused_linear_cross_entropy(hidden, InChunks(weight), labels, return_stats=True)
    ref_loss, ref_stats = reference_loss(hidden, weight, labels, return_stats=True)
    torch.testing.assert_close(loss, ref_loss, **TOLERANCES[torch.float32])
    torch.testing.assert_close(stats.entropy_sum, ref_stats[0], **TOLERANCES[torch.float32])
    assert stats.num_correct.item() == ref_stats[1].item() and 0 < stats.num_correct.item() < ref_stats[2].item()
    assert stats.num_tokens.item() == ref_stats[2].item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streamed_head_16bit(dtype, streamed_blocks):
    _compare(*_inputs(2, 9, 24, dtype, DEVICE), dtype=dtype, streamed=True)


def test_streamed_head_without_labels_or_gradient(streamed_blocks):
    """No labelled token: nothing is read, loss 0. Without gradients: the loss alone."""
    hidden, weight, _, labels = _inputs(2, 5, 24, torch.float32, DEVICE)
    head = InChunks(weight)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), head, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and head.blocks == [] and torch.count_nonzero(hidden.grad) == 0
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, InChunks(weight), labels)
    torch.testing.assert_close(loss, reference_loss(hidden.detach(), weight, labels), **TOLERANCES[torch.float32])


def test_streamed_head_refuses_a_trainable_bias():
    hidden, weight, bias, labels = _inputs(1, 4, 24, torch.float32, DEVICE, bias=True)
    with pytest.raises(ValueError, match="its bias must be too"):
        fused_linear_cross_entropy(hidden, InChunks(weight), labels, bias=bias.requires_grad_())


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trainable"])
def test_gpu_llama3_vocab(dtype, weight_grad):
    """A 128256-token vocabulary (four 32768-wide blocks, the last one partial), 2 x 1500 tokens,
    in chunks of 700: full and partial chunks."""
    hidden, weight, _, labels = _inputs(2, 1500, 1024, dtype, "cuda", vocab=128256)
    _compare(hidden, weight, None, labels, weight_grad=weight_grad, dtype=dtype, chunk_size=700)


@gpu
def test_gpu_working_memory():
    """16k tokens, Llama-3's head (128256 x 4096, bf16, frozen): the loss's working memory beyond
    its inputs and the hidden-state gradient it must return stays under 1 GiB."""
    hidden = torch.randn(1, 16384, 4096, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    weight = torch.randn(128256, 4096, dtype=torch.bfloat16, device="cuda") / 64
    labels = torch.randint(0, 128256, (1, 16384), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    working = torch.cuda.max_memory_allocated() - baseline - hidden.grad.numel() * hidden.grad.element_size()
    assert working < 2**30, f"{working / 2**30:.2f} GiB"


@gpu
def test_gpu_host_head_streamed():
    """Gemma-2-9B's head (256000 x 3584, bf16, softcap 30) in pinned host memory, 8192 tokens: the
    loss read in blocks matches the whole head's, with the blocks' copies racing the matmuls on
    their side stream, and the loss's working memory stays well under the head's 1.71 GiB."""
    from torch import nn

    from ftune.engine.host_memory import HostLMHead

    hidden, weight, _, labels = _inputs(1, 8192, 3584, torch.bfloat16, "cuda", ignore=0.1, vocab=256000)
    head = nn.Linear(3584, 256000, bias=False, device="cpu", dtype=torch.bfloat16).requires_grad_(False)
    head.weight.copy_(weight)
    host = HostLMHead(head, torch.device("cuda"), streams_the_loss=True)
    hidden = hidden.requires_grad_()
    assert host.for_the_loss() is host
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(hidden, host.for_the_loss(), labels, final_logit_softcapping=30.0)
    loss.backward()
    torch.cuda.synchronize()
    working = torch.cuda.max_memory_allocated() - baseline - hidden.grad.numel() * hidden.grad.element_size()
    assert working < 0.75 * 2**30, f"{working / 2**30:.2f} GiB"
    streamed_grad, hidden.grad = hidden.grad, None
    whole = fused_linear_cross_entropy(hidden, weight, labels, final_logit_softcapping=30.0)
    whole.backward()
    torch.testing.assert_close(loss, whole, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(streamed_grad, hidden.grad, **TOLERANCES[torch.bfloat16])
