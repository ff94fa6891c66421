"""Per-token log-probabilities of `hidden @ head.T` for TRL's fused LM heads (DPO, GRPO), with a
frozen head kept off the device and read a block of vocabulary rows at a time (`WeightInChunks`:
ftune.engine.host_memory.HostLMHead).

TRL's own kernel (trl/kernels/chunked_logprob.py) reads the head whole: a head in host memory is
fetched for it (the 8B shape's: 0.98 GiB) and stays on the device from the forward's first layer
to the backward's start. Here only two blocks are ever on the device (the one in use and the next,
in flight). The forward folds each block's logits into online statistics per token (the running
maximum and sum of exponentials, as flash attention's softmax across keys), and the backward reads
the head a second time, recomputing each block's logits, as TRL's kernel recomputes its tiles:
`d log p_y / dz_v = [v = y] - p_v`, and for the entropy `dH / dz_v = -p_v (z_v - E[z])`. Each
block's gradient product is summed in fp32.

The logits are transformed as TRL transforms them: scaled by `logit_scale`, soft-capped, divided
by the temperature. The outputs are TRL's (`FusedCausalLMOutput`'s per-token fields) but for
`log_sum_sq_probs` (WPO's weights), which this module does not compute: the log-probabilities,
and on request the entropy (both differentiable), the mean logit and whether the target is the
first argmax (neither).
"""

from __future__ import annotations

import math

import torch

from ftune.kernels.fused_linear_cross_entropy import WeightInChunks

SUPPORTED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def streamed_token_log_probs(hidden: torch.Tensor, head: WeightInChunks, targets: torch.Tensor, *,
                             temperature: float = 1.0, final_logit_softcapping: float | None = None,
                             logit_scale: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)):
    """(log_probs, entropy, mean_logits, is_top1) per token of `hidden` ([N, H]) against `targets`
    ([N]), each None unless in `outputs` (log_probs always); the head is read in blocks."""
    unsupported = set(outputs) - set(SUPPORTED_OUTPUTS)
    if unsupported:
        raise ValueError(f"streamed log-probabilities compute {SUPPORTED_OUTPUTS}, not {sorted(unsupported)}")
    if hidden.dim() != 2 or hidden.shape[1] != head.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, head {tuple(head.shape)} and targets "
                         f"{tuple(targets.shape)} do not match")
    return _StreamedTokenLogProbs.apply(hidden, head, targets, temperature, final_logit_softcapping, logit_scale,
                                        tuple(outputs))


def _transformed(raw: torch.Tensor, logit_scale: float, softcap: float | None, inv_t: float) -> torch.Tensor:
    z = raw * logit_scale if logit_scale != 1.0 else raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z * inv_t if inv_t != 1.0 else z


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _block_logits(hidden: torch.Tensor, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One block's logits before the transform, in fp32 (the GEMM in `dtype`)."""
    return torch.mm(hidden, block.to(dtype).t()).float()


class _StreamedTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, targets, temperature, softcap, logit_scale, outputs):
        ctx.set_materialize_grads(False)  # an entropy read for logging only has no gradient
        dtype = _compute_dtype(hidden)
        inv_t = 1.0 / temperature
        tokens, device = hidden.shape[0], hidden.device
        h = hidden.to(dtype)
        running_max = torch.full((tokens,), -math.inf, device=device)
        sum_exp = torch.zeros(tokens, device=device)
        weighted_sum = torch.zeros(tokens, device=device) if "entropy" in outputs else None  # sum e^(z-m) z
        logit_sum = torch.zeros(tokens, device=device) if "mean_logits" in outputs else None
        # the largest logit before the target's index: the target is the first argmax when it beats it
        max_before_target = torch.full((tokens,), -math.inf, device=device) if "is_top1" in outputs else None
        target_logit = torch.zeros(tokens, device=device)
        for first, block in head.chunks():
            z = _transformed(_block_logits(h, block, dtype), logit_scale, softcap, inv_t)
            del block  # the next block's copy may take its memory
            local = targets - first
            width = z.shape[1]
            if logit_sum is not None:
                logit_sum += z.sum(dim=1)
            if max_before_target is not None:
                before = torch.arange(width, device=device) < local.unsqueeze(1)
                torch.maximum(max_before_target, z.masked_fill(~before, -math.inf).amax(dim=1), out=max_before_target)
            new_max = torch.maximum(running_max, z.amax(dim=1))
            rescale = torch.exp(running_max - new_max)
            e = torch.exp(z - new_max.unsqueeze(1))
            sum_exp.mul_(rescale).add_(e.sum(dim=1))
            if weighted_sum is not None:
                weighted_sum.mul_(rescale).add_((e * z).sum(dim=1))
            running_max = new_max
            in_block = (local >= 0) & (local < width)
            picked = z.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
            target_logit = torch.where(in_block, picked, target_logit)
        log_z = running_max + torch.log(sum_exp)
        log_probs = target_logit - log_z
        entropy = log_z - weighted_sum / sum_exp if weighted_sum is not None else None
        mean_logits = logit_sum / head.shape[0] if logit_sum is not None else None
        is_top1 = ((target_logit >= running_max) & (target_logit > max_before_target)
                   if max_before_target is not None else None)
        ctx.head, ctx.dtype, ctx.transform = head, dtype, (logit_scale, softcap, inv_t)
        ctx.save_for_backward(hidden, targets, log_z, entropy if entropy is not None else log_z)
        ctx.mark_non_differentiable(*(t for t in (mean_logits, is_top1) if t is not None))
        return log_probs, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, targets, log_z, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        logit_scale, softcap, inv_t = ctx.transform
        dtype = ctx.dtype
        h = hidden.to(dtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        mean_z = (log_z - entropy).unsqueeze(1) if grad_entropy is not None else None  # E[z] = log Z - H
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for first, block in ctx.head.chunks():
            raw = _block_logits(h, block, dtype)
            z = _transformed(raw, logit_scale, softcap, inv_t)
            p = torch.exp(z - log_z.unsqueeze(1))
            grad_z = torch.zeros_like(z)
            if grad_log_probs is not None:
                grad_z -= grad_log_probs.float().unsqueeze(1) * p
                local = targets - first
                in_block = (local >= 0) & (local < z.shape[1])
                grad_z[rows[in_block], local[in_block]] += grad_log_probs.float()[in_block]
            if grad_entropy is not None:
                grad_z -= grad_entropy.float().unsqueeze(1) * p * (z - mean_z)
            # back through the transform: the temperature, the soft cap, the scale
            grad_raw = grad_z * inv_t if inv_t != 1.0 else grad_z
            if softcap is not None:
                scaled = raw * logit_scale if logit_scale != 1.0 else raw
                grad_raw = grad_raw * (1 - torch.tanh(scaled / softcap) ** 2)
            if logit_scale != 1.0:
                grad_raw = grad_raw * logit_scale
            # each block's product summed in fp32: rounded to 16 bits block by block, the sum drifts
            grad_hidden += torch.mm(grad_raw, block.float()) if dtype == torch.float32 or hidden.device.type != "cuda" \
                else torch.mm(grad_raw.to(dtype), block.to(dtype), out_dtype=torch.float32)
            del block
        return grad_hidden.to(hidden.dtype), None, None, None, None, None, None
