"""TRL as ftune's runs change it. Checked against trl 1.16.0 (transformers 5.17.0).

- `LossFromModel` overrides `SFTTrainer.compute_loss(model, inputs, return_outputs=False,
  num_items_in_batch=None)`. TRL computes the loss from its own chunked LM head
  (`fused_lm_head=True`); with ftune's fused cross-entropy kernel on, the model's forward computes
  the loss itself from the labels (one pass that never builds the logits) and returns the sums
  behind the entropy and top-1 accuracy that TRL logs, and a mixture of experts' `aux_loss`, logged
  as TRL's own compute_loss logs it. It relies on SFTTrainer keeping
  `self._metrics[mode]` (lists per key, averaged into each log by `SFTTrainer.log`) and
  `self._total_train_tokens`.

- `ReferenceAdapterSwitch` wraps `DPOTrainer._compute_loss(model, inputs, return_outputs)`, whose
  reference pass (no ref_model, a peft model) runs inside `trl.trainer.utils.use_adapter`: under
  `torch.no_grad()`, `model.set_adapter("ref")`, then `model.set_adapter(previous)`; or, without a
  `ref` adapter, `with model.disable_adapter():`. Within it, peft's switch is
  `integrations.peft.switch_without_grad_flags`.
- `ReferenceRidesTraining` wraps `DPOTrainer.training_step(model, inputs, num_items_in_batch)`,
  `DPOTrainer.prediction_step(model, inputs, prediction_loss_only, ignore_keys)` and
  `_compute_loss`. The latter first calls the model for the policy with `fused_lm_head=True`, which
  reaches the forward `add_fused_lm_head` puts on the base model (an instance attribute) and returns
  a `FusedCausalLMOutput` of per-token fields (rows, tokens - 1); only then, with
  `self.precompute_ref_logps` set, does it read `inputs["ref_chosen_logps"]` and
  `inputs["ref_rejected_logps"]` in place of its reference pass.
- `stream_the_fused_head` wraps the forward `add_fused_lm_head` puts on the base model, a closure
  whose settings it reads by name (`temperature`, `cast_lm_head_to_fp32`, `outputs`,
  `final_logit_softcapping`, `logit_scale`, `backbone_attr`, `text_config`); with
  `fused_lm_head=True` that forward runs `getattr(model, backbone_attr)(**kwargs)`, scores the
  positions whose shifted label is not -100 and returns a `FusedCausalLMOutput` (`loss` the mean
  of their negative log-probabilities, or the sum over `num_items_in_batch`; the per-token fields
  zero elsewhere; `label_mask`).
- `streamed_token_log_probs` folds each block of a streamed head through the tile kernels of TRL's
  `ChunkedLogProbFunction` (trl/kernels/chunked_logprob.py): `_forward_kernel` (or `_forward_tile`
  without Triton) into its running statistics per token, `_backward_kernel` (`_backward_tile`)
  over a tile in place, `_addmm_fp32`, `_use_triton`, `_BLOCK_SIZE`, `TOKEN_CHUNK_SIZE`. Where the
  head is whole on the device, `ChunkedLogProbFunction` itself runs, with the token chunk of TRL's
  fused forward, `trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`.
- `use_base_as_reference` deletes the `ref` adapter that `DPOTrainer.__init__` (and
  `GRPOTrainer.__init__`, with beta > 0) adds to a peft model (a copy of `default`), for TRL's
  reference pass to run with the adapters off: `use_adapter(model, None)`, which GRPO's
  `_generate_and_score_completions` takes where no `ref` adapter exists.
- `restore_the_adapter_after_paged_generation` gives ftune's float32 adapter back after GRPO's
  paged generation (`use_transformers_continuous_batching`): `GRPOTrainer._generate_single_turn`
  casts the whole unwrapped model with `unwrapped_model.to(torch.bfloat16)` under `bf16`
  (`torch.float16` under `fp16`), then calls `unwrapped_model.generate_batch`.

tests/test_integrations_trainers.py holds a contract test for each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from ftune.integrations.peft import (adapters_of, adapters_on_first_rows, row_gateable_layers,
                                     switch_without_grad_flags, switchable_layers)
from ftune.kernels.fused_linear_cross_entropy import WeightInChunks
from ftune.memory.estimate import reference_rides

# What stream_the_fused_head reads of TRL's fused head (trl.trainer.utils.add_fused_lm_head's closure)
FUSED_HEAD_SETTINGS = ("temperature", "cast_lm_head_to_fp32", "outputs", "final_logit_softcapping", "logit_scale",
                       "backbone_attr", "text_config")


class LossFromModel:
    """SFTTrainer mixin: when `loss_from_model` is set, the loss and TRL's entropy, accuracy and token
    metrics come from the model's own forward (outputs `loss`, `num_tokens`, `entropy_sum`,
    `num_correct`); else TRL's compute_loss runs unchanged."""

    loss_from_model = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_from_model:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        gather = self.accelerator.gather_for_metrics
        valid = gather(outputs.num_tokens.detach()).sum()
        if valid > 0:
            self._metrics[mode]["entropy"].append((gather(outputs.entropy_sum.detach()).sum() / valid).item())
            self._metrics[mode]["mean_token_accuracy"].append((gather(outputs.num_correct.detach()).sum() / valid).item())
        if getattr(outputs, "aux_loss", None) is not None:  # the router's load-balancing loss, before its coefficient
            self._metrics[mode]["aux_loss"].append(gather(outputs.aux_loss.detach()).mean().item())
        if mode == "train":  # as TRL counts them: the mask's ones, or a padding-free batch's whole length
            if "attention_mask" in inputs:
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                positions = inputs["position_ids"]
                self._total_train_tokens += gather(torch.tensor(positions.size(1), device=positions.device)).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


# The per-token outputs of TRL's fused head that streamed_token_log_probs computes (not WPO's log_sum_sq_probs)
SUPPORTED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def streamed_token_log_probs(hidden: torch.Tensor, head: WeightInChunks, targets: torch.Tensor, *,
                             temperature: float = 1.0, final_logit_softcapping: float | None = None,
                             logit_scale: float = 1.0, outputs: tuple[str, ...] = ("log_probs",)):
    """(log_probs, entropy, mean_logits, is_top1) per token of `hidden` ([N, H]) against `targets`
    ([N]), each None unless in `outputs` (log_probs always), as TRL's ChunkedLogProbFunction
    computes them, with a frozen head read a block of vocabulary rows at a time (`WeightInChunks`:
    engine.host_memory.HostLMHead), where TRL's reads it whole.

    Each block's logits are a tile that TRL's own kernels fold into the running statistics per
    token (online log-sum-exp across blocks, as flash attention's softmax across keys); the
    backward reads the head again, block by block, and TRL's backward kernel turns each recomputed
    tile into its logits' gradient, whose product with the block is summed in fp32. Two launches a
    block (and chunk of tokens) forward and three backward: Llama-3's head, in 16 blocks, costs a
    step about 80 more launches than TRL's kernel over the whole head."""
    unsupported = set(outputs) - set(SUPPORTED_OUTPUTS)
    if unsupported:
        raise ValueError(f"streamed log-probabilities compute {SUPPORTED_OUTPUTS}, not {sorted(unsupported)}")
    if hidden.dim() != 2 or hidden.shape[1] != head.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, head {tuple(head.shape)} and targets "
                         f"{tuple(targets.shape)} do not match")
    return _StreamedTokenLogProbs.apply(hidden, head, targets, temperature, final_logit_softcapping, logit_scale,
                                        tuple(outputs))


def _token_chunks(tokens: int):
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE

    return [(start, min(start + TOKEN_CHUNK_SIZE, tokens)) for start in range(0, tokens, TOKEN_CHUNK_SIZE)]


class _StreamedTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head, targets, temperature, softcap, logit_scale, outputs):
        from trl.kernels import chunked_logprob as trl_kernels

        ctx.set_materialize_grads(False)  # an entropy read for logging only has no gradient
        device, tokens = hidden.device, hidden.shape[0]
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        kernel_args = {"logit_scale": logit_scale, "softcap": softcap or 1.0, "inv_t": 1 / temperature,
                       "HAS_SOFTCAP": softcap is not None}
        flags = {f"HAS_{name.upper()}": name in outputs for name in trl_kernels.OPTIONAL_OUTPUTS}
        fp32 = {"device": device, "dtype": torch.float32}  # the kernels' running statistics
        stats = {name: torch.zeros(tokens, **fp32) for name in ("sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum",
                                                               "target_logit")}
        running_max = torch.full((tokens,), float("-inf"), **fp32)
        max_before_target = torch.full((tokens,), float("-inf"), **fp32)
        h = hidden.to(dtype)
        targets = targets.contiguous()
        triton_fold = trl_kernels._use_triton(device)
        for first, block in head.chunks() if tokens else ():  # a batch without a scored token reads no block
            block = block.to(dtype)
            for start, end in _token_chunks(tokens):
                tile = torch.mm(h[start:end], block.t())
                fold = trl_kernels._forward_kernel[(end - start,)] if triton_fold else trl_kernels._forward_tile
                fold(tile, tile.stride(0), targets[start:end], running_max[start:end], stats["sum_exp"][start:end],
                     stats["x_sum_exp"][start:end], stats["sq_sum_exp"][start:end], stats["z_sum"][start:end],
                     max_before_target[start:end], stats["target_logit"][start:end], first, block.shape[0],
                     BLOCK_SIZE=trl_kernels._BLOCK_SIZE, **flags, **kernel_args)
            block = tile = None  # the next block's copy may take their memory
        log_z = running_max + torch.log(stats["sum_exp"])
        target_logit = stats["target_logit"]
        log_probs = target_logit - log_z
        entropy = log_z - stats["x_sum_exp"] / stats["sum_exp"] if "entropy" in outputs else None
        mean_logits = stats["z_sum"] / head.shape[0] if "mean_logits" in outputs else None
        is_top1 = ((target_logit >= running_max) & (target_logit > max_before_target)) if "is_top1" in outputs else None
        ctx.head, ctx.dtype, ctx.kernel_args = head, dtype, kernel_args
        ctx.save_for_backward(hidden, targets, log_z, entropy if entropy is not None else log_z)
        ctx.mark_non_differentiable(*(t for t in (mean_logits, is_top1) if t is not None))
        return log_probs, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        from trl.kernels import chunked_logprob as trl_kernels

        hidden, targets, log_z, entropy = ctx.saved_tensors
        if grad_log_probs is None and grad_entropy is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        grad_log_probs = grad_log_probs.float().contiguous() if grad_log_probs is not None else None
        grad_entropy = grad_entropy.float().contiguous() if grad_entropy is not None else None
        h = hidden.to(ctx.dtype)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        triton_fold = trl_kernels._use_triton(hidden.device)
        for first, block in ctx.head.chunks() if hidden.shape[0] else ():
            block = block.to(ctx.dtype)
            width = block.shape[0]
            for start, end in _token_chunks(hidden.shape[0]):
                tile = torch.mm(h[start:end], block.t())
                fold = trl_kernels._backward_kernel[(end - start, -(-width // trl_kernels._BLOCK_SIZE))] \
                    if triton_fold else trl_kernels._backward_tile
                fold(tile, tile.stride(0), targets[start:end], log_z[start:end], entropy[start:end],
                     (grad_log_probs if grad_log_probs is not None else log_z)[start:end],
                     (grad_entropy if grad_entropy is not None else log_z)[start:end], first, width,
                     HAS_LOGPROB_GRAD=grad_log_probs is not None, HAS_ENTROPY_GRAD=grad_entropy is not None,
                     BLOCK_SIZE=trl_kernels._BLOCK_SIZE, **ctx.kernel_args)
                trl_kernels._addmm_fp32(grad_hidden[start:end], tile, block)
            block = tile = None
        return grad_hidden.to(hidden.dtype), None, None, None, None, None, None


def stream_the_fused_head(model) -> bool:
    """Let TRL's fused LM head (DPO's loss; GRPO's is the same head, not wired) read a host LM head
    in blocks where the forward does not hold it whole (HostLMHead: a step that streams it),
    through streamed_token_log_probs; TRL's own kernel reads it whole, and the head would be
    fetched for it. Elsewhere TRL's own kernel runs, as TRL's forward runs it. Whether it applies:
    TRL's settings read from its closure (FUSED_HEAD_SETTINGS), outputs the streamed kernel
    computes, the head not cast to fp32 and without a bias, no router logits (a mixture of experts'
    auxiliary loss: asked for by the model's config, which TRL's forward follows, or by TRL's
    trainer in the call, where TRL's own forward runs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = base.__dict__.get("forward")
    function = getattr(fused, "__func__", None)
    if function is None or function.__closure__ is None:
        return False
    settings = dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in function.__closure__)))
    if not set(FUSED_HEAD_SETTINGS) <= settings.keys():
        return False
    if settings["cast_lm_head_to_fp32"] or set(settings["outputs"]) - set(SUPPORTED_OUTPUTS) or \
            getattr(settings["text_config"], "output_router_logits", False) or \
            getattr(base.get_output_embeddings(), "bias", None) is not None:
        return False
    kernel_settings = {name: settings[name] for name in ("temperature", "final_logit_softcapping", "logit_scale",
                                                         "outputs")}

    @functools.wraps(fused)  # its signature, which `generate` validates model kwargs against
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = base.get_output_embeddings()
        # a head in host memory (engine.host_memory.HostLMHead); TRL's own forward for anything else
        if not fused_lm_head or args or not isinstance(head, WeightInChunks) or not hasattr(head, "on_device") or \
                getattr(head, "bias", None) is not None or kwargs.get("output_router_logits"):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput

        kwargs["use_cache"] = False
        hidden = getattr(base, settings["backbone_attr"])(**kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        labels = labels.to(hidden.device)
        mask = labels != -100
        # Read only now: the first layer's hook has fetched the head whole for this forward, or let
        # it stream (HostLMHead.prefetch_for_the_forward); a whole head left by an earlier forward
        # without gradients is gone by now where this one streams.
        scored = _token_log_probs(hidden[mask], head, labels[mask], **kernel_settings)
        # zeros at the unscored positions, as TRL's; masked_scatter keeps an all-masked batch differentiable
        log_probs, entropy, mean_logits, is_top1 = (None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
                                                     for x in scored)
        return FusedCausalLMOutput(loss=_fused_head_loss(log_probs, mask, num_items_in_batch), log_probs=log_probs,
                                   entropy=entropy, mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    base.forward = forward
    return True


def _token_log_probs(hidden: torch.Tensor, head, targets: torch.Tensor, *, temperature: float,
                     final_logit_softcapping: float | None, logit_scale: float, outputs: tuple[str, ...]):
    """(log_probs, entropy, mean_logits, is_top1) of the scored tokens: streamed through the head's
    blocks where it is not on the device whole, else TRL's own kernel over the whole head, with
    the settings and token chunk TRL's fused forward gives it."""
    if not head.on_device:
        return streamed_token_log_probs(hidden, head, targets, temperature=temperature,
                                        final_logit_softcapping=final_logit_softcapping, logit_scale=logit_scale,
                                        outputs=outputs)
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    log_probs, entropy, _, mean_logits, is_top1 = ChunkedLogProbFunction.apply(
        hidden, head.weight, None, targets, temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, final_logit_softcapping,
        logit_scale, outputs)
    return log_probs, entropy, mean_logits, is_top1


def _fused_head_loss(log_probs: torch.Tensor, label_mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The `loss` of TRL's fused head: the scored tokens' negative log-probabilities, summed over
    `num_items_in_batch` where given, else averaged."""
    total = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return -log_probs.sum() / total


def use_base_as_reference(model) -> bool:
    """Drop TRL's frozen copy `ref` of a new adapter: whether there was one. A new adapter's B
    matrices are zero, so the copy computes what the base model computes, and TRL's reference pass
    without it runs with the adapters off (its own path for an adapter it adds itself): the copy's
    parameters (r x (in + out) per projection, in fp32: 168 MB for the 8B recipe's) leave the GPU,
    and the reference forward runs no adapter matmuls. It also leaves ftune's fused adapter paths,
    which take an active adapter, for bitsandbytes' own projections; its speed is not measured."""
    if "ref" not in getattr(model, "peft_config", {}):
        return False
    model.delete_adapter("ref")
    return True


def restore_the_adapter_after_paged_generation(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Let TRL's paged GRPO generation cast `model` to the run's `dtype` as it does before every
    generation, and give the trainable adapter back its own float32 values once the generation
    ends. ftune keeps the adapter in float32 on purpose (workflows.common.keep_adapter_in_fp32):
    left rounded to bfloat16, the optimizer's updates below bfloat16's resolution (about 0.4% of a
    weight) would be lost for the rest of the run. The cast itself must happen: transformers sizes
    the paged KV cache in `model.dtype`, its first floating-point parameter's, which is an
    adapter's where the embedding is in host memory and the base in 4 bits. The float32 values
    are held beside the cast copy during the generation (the adapter's size again, in bfloat16)."""
    cast, generate_batch = model.to, model.generate_batch
    held: dict[torch.nn.Parameter, torch.Tensor] = {}

    def to(*args, **kwargs):
        _, to_dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if to_dtype == dtype and not held:
            held.update({p: p.data for p in model.parameters() if p.requires_grad and p.dtype != dtype})
        return cast(*args, **kwargs)

    def generate_then_restore(*args, **kwargs):
        try:
            return generate_batch(*args, **kwargs)
        finally:
            for parameter, values in held.items():
                parameter.data = values
            held.clear()

    model.to, model.generate_batch = to, generate_then_restore


class ReferenceAdapterSwitch:
    """DPOTrainer mixin: the reference pass switches adapters without peft's requires_grad walk.

    TRL's reference pass sets the frozen copy `ref` active and the trained adapter back, each time
    through peft's `set_adapter`, which also re-marks which adapter trains: two walks of every
    module a step, 61-63 ms of CPU for a 32-layer model on a 2-core CPU against 2.6 ms with this
    switch, in a DPO step whose CPU time is eight times its GPU time (a traced 8B step on an H200,
    docs/benchmarks.md). Without gradients no flag is read, so while `_compute_loss` runs, a switch
    made under `torch.no_grad()` changes the active adapter alone (integrations/peft.py,
    `switch_without_grad_flags`); the trained adapter's parameters keep `requires_grad` throughout,
    as after peft's switch back.
    """

    # (the model, its adapters (peft.adapters_of), its tuner layers): listed again when either changes
    _switchable: tuple[object, tuple, list] | None = None

    def _compute_loss(self, model, inputs, return_outputs):
        # TRL switches the adapters of accelerator.unwrap_model(self.model): self.model itself for
        # one process and under DDP (transformers' Trainer keeps the wrapper in model_wrapped); the
        # recipe refuses DPO under fsdp
        adapters = adapters_of(self.model)
        if self._switchable is None or self._switchable[0] is not self.model or self._switchable[1] != adapters:
            self._switchable = (self.model, adapters, switchable_layers(self.model))
        with switch_without_grad_flags(self.model, self._switchable[2]):
            return super()._compute_loss(model, inputs, return_outputs)


class ReferenceRidesTraining:
    """DPOTrainer mixin: where the reference is the base model (a new adapter: use_base_as_reference),
    a short step's reference rows ride its training forward instead of running a forward of their own.

    A DPO step of short rows is bound by the host's Python and kernel launches, not by the GPU
    (docs/benchmarks.md): the reference pass costs about what the training forward costs, however
    few its rows. So the training forward takes the batch twice, its rows once more at the end, and
    LoRA adds its adapter to the first copy alone (integrations.peft.adapters_on_first_rows): the
    second copy computes the base model. Rows do not mix in a decoder, and no loss reads the second
    copy, so its gradients are zero and the adapter's are those of the policy's rows. The second
    copy's log-probabilities, detached and summed, go into the step's inputs as TRL's precomputed
    reference (`ref_chosen_logps`, `ref_rejected_logps`), which `_compute_loss` then reads in place
    of its reference pass. The gates last the whole training step, so that the checkpointing
    engine's recompute in the backward sees them too. An evaluation step rides the same way, its
    forward without gradients.

    It rides in steps of at most REFERENCE_RIDES_MAX_TOKENS tokens (memory.estimate.reference_rides,
    which the memory model counts), for peft LoRA models `adapters_on_first_rows` covers, without
    TRL's `ref` adapter, a reference model, precomputed reference log-probabilities, `ld_alpha` or a
    router's auxiliary loss; any other step runs as TRL makes it."""

    # make_trainer sets it where the run's reference is the base model
    reference_may_ride = False
    # (the model, its adapters (peft.adapters_of), its gateable LoRA layers): listed again when either changes
    _gateable: tuple[object, tuple, list] | None = None
    _ride: _ReferenceRide | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self._riding(inputs, super().training_step, model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return self._riding(inputs, super().prediction_step, model, inputs, prediction_loss_only, ignore_keys)

    def _riding(self, inputs, step, *args):
        """`step(*args)` (TRL's training or evaluation step), its reference riding where it can."""
        ride = self._reference_ride(inputs)
        if ride is None:
            return step(*args)
        self._ride = ride
        try:
            with ride:
                return step(*args)
        finally:
            self._ride = None

    def _compute_loss(self, model, inputs, return_outputs):
        ride = self._ride
        if ride is None or ride.taken:
            return super()._compute_loss(model, inputs, return_outputs)
        ride.taken, ride.inputs = True, inputs
        self.precompute_ref_logps = True  # TRL reads the reference from `inputs`, where the ride puts it
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.precompute_ref_logps = False

    def _reference_ride(self, inputs) -> _ReferenceRide | None:
        ids = inputs.get("input_ids")
        if (not self.reference_may_ride or self.ref_model is not None or self.precompute_ref_logps
                or self.ld_alpha is not None or self.aux_loss_enabled
                or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not _per_row(inputs, ids.shape[0])):
            return None
        config = self.model.config.get_text_config()
        if not reference_rides(ids.numel(), getattr(config, "intermediate_size", None)):
            return None
        adapters = adapters_of(self.model)
        if "ref" in dict(adapters):
            return None
        if self._gateable is None or self._gateable[0] is not self.model or self._gateable[1] != adapters:
            self._gateable = (self.model, adapters, row_gateable_layers(self.model))
        layers = self._gateable[2]
        base = self.model.get_base_model() if layers else None
        if base is None or "forward" not in base.__dict__:  # no fused head of TRL's on the model itself
            return None
        return _ReferenceRide(base, layers)


class _ReferenceRide:
    """One step's ride (ReferenceRidesTraining): the first call of TRL's fused head in
    `_compute_loss`, the policy's, runs the batch twice."""

    def __init__(self, base, layers: list):
        self.base, self.layers = base, layers
        self.fused_forward = base.__dict__["forward"]
        self.gates = contextlib.ExitStack()
        self.taken = False  # one ride a step: its first `_compute_loss`
        self.inputs: dict | None = None  # its inputs, as it reads them, until its policy call

    def __enter__(self):
        self.base.forward = self._forward
        return self

    def __exit__(self, *exc):
        self.base.forward = self.fused_forward
        self.gates.close()
        return False

    def _forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if self.inputs is None or not fused_lm_head or args:
            return self.fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        inputs, self.inputs = self.inputs, None
        ids = kwargs.get("input_ids")
        doubled = _twice(ids, labels, kwargs)
        if doubled is None:  # ReferenceRidesTraining._reference_ride checked the inputs: TRL changed its call
            raise RuntimeError("the DPO reference's rows cannot ride this forward (its arguments are not the "
                               f"batch's rows: {sorted(kwargs)}); ftune/integrations/trl.py needs a look")
        rows, tokens = ids.shape
        self.gates.enter_context(adapters_on_first_rows(self.layers, rows, 2 * rows, tokens))
        output = self.fused_forward(fused_lm_head=True, labels=torch.cat([labels, labels]), **doubled)
        policy = {}
        for field in dataclasses.fields(output):
            value = getattr(output, field.name)
            policy[field.name] = value[:rows] if field.name not in ("loss", "aux_loss") and value is not None else None
        # TRL's loss of the fused head, over the policy's rows (DPO's calls pass no num_items_in_batch)
        policy["loss"] = _fused_head_loss(policy["log_probs"], policy["label_mask"])
        # as TRL sums its reference pass's log-probabilities (each row's completion; zero elsewhere)
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = output.log_probs[rows:].detach().sum(dim=1).chunk(2)
        return type(output)(**policy)


def _twice(ids, labels, kwargs: dict) -> dict | None:
    """The forward's keyword arguments with every per-row tensor repeated after itself, or None where
    a tensor's rows are not the batch's, or the call shifts its labels itself or weighs the loss by a
    count of items."""
    if not isinstance(ids, torch.Tensor) or not isinstance(labels, torch.Tensor) \
            or not _per_row({"labels": labels, **kwargs}, ids.shape[0]) \
            or kwargs.get("num_items_in_batch") is not None or kwargs.get("shift_labels") is not None:
        return None
    return {name: torch.cat([value, value]) if isinstance(value, torch.Tensor) else value
            for name, value in kwargs.items()}


def _per_row(values: dict, rows: int) -> bool:
    """Whether every tensor among `values` holds one entry per row of a batch of `rows`."""
    return all(value.dim() > 0 and value.shape[0] == rows for value in values.values()
               if isinstance(value, torch.Tensor))
