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
- `use_base_as_reference` deletes the `ref` adapter that `DPOTrainer.__init__` (and
  `GRPOTrainer.__init__`, with beta > 0) adds to a peft model (a copy of `default`), for TRL's
  reference pass to run with the adapters off: `use_adapter(model, None)`, which GRPO's
  `_generate_and_score_completions` takes where no `ref` adapter exists.

tests/test_integrations_trainers.py holds a contract test for each.
"""

from __future__ import annotations

import torch

from ftune.integrations.peft import adapters_of, switch_without_grad_flags, switchable_layers


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
