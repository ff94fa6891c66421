"""The checkpointing engine: one mechanism that wraps every decoder layer.

Each decoder layer (a transformers `GradientCheckpointingLayer`) gets a policy:
  keep       run as usual, every activation kept for backward;
  recompute  run without keeping activations, recompute in backward; the layer input stays put;
  offload    as recompute, but the layer input waits in host memory (see offload.py), and,
             where host memory allows, attention's output with it, so the recompute skips
             attention's forward (see attention.py).

Modes are lists of policies: none = all keep, true = all recompute, unsloth = all offload,
smart = a plan per layer. The recompute is one autograd Function (`_RecomputedLayer`) whose
backward reruns the layer under the forward's RNG and autocast state and backpropagates
through it, so every policy gives the gradients of `keep`. Pre-norm layers (Llama, Mistral,
Qwen) run as two residual halves with the MLP chunked over tokens (halves.py), which bounds
the working set of a recomputed layer at long context.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers.modeling_layers import GradientCheckpointingLayer

from ftune.engine import attention
from ftune.engine.attention import AttentionOutput
from ftune.engine.halves import ResidualHalves
from ftune.engine.host_memory import HostCopier, HostStash, buffer_size
from ftune.families import family_of
from ftune.integrations.transformers import recording_router_logits_apart, router_logits_being_recorded
from ftune.memory.estimate import MLP_CHUNK_BYTES, parks
from ftune.memory.policy import Policy

logger = logging.getLogger(__name__)


MODE_POLICIES = {"none": Policy.KEEP, "true": Policy.RECOMPUTE, "unsloth": Policy.OFFLOAD}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers in forward order (through peft wrappers too)."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


@dataclass
class CheckpointingEngine:
    """The policies installed on a model, and the host memory its offload uses."""

    mode: str
    policies: list[Policy]
    device: torch.device
    copier: HostCopier | None
    layers: list[nn.Module] = field(default_factory=list)
    # Each layer's own instance-level forward before ours (None: the class's forward).
    _originals: list[Callable | None] = field(default_factory=list)
    # The unit of the last layer that ran forward, to chain prefetches within one forward pass.
    _last_unit: "weakref.ref[_LayerUnit] | None" = None
    _warned_cache: bool = False
    # Largest MLP intermediate a recomputed layer creates at once (see halves.py).
    mlp_chunk_bytes: int = MLP_CHUNK_BYTES
    # The embedding tables (input, and the LM head under the fused loss) moved to host memory
    # (embedding.py), 0 when they stay on the device.
    host_embedding_bytes: int = 0
    # The layout of the family's layers, if they run as halves (ftune/families.py, engine/halves.py).
    residual_halves: str | None = None
    # A step of at most this many tokens keeps every layer's activations, as mode none does: the
    # plan's room for its longest step holds them (memory.estimate.keeps_layers); 0: none does.
    keep_up_to: int = 0

    def counts(self) -> dict[str, int]:
        return {policy.value: self.policies.count(policy) for policy in Policy}

    def host_bytes(self) -> int:
        """Host memory held for the GPU: offloaded layer inputs and the embedding tables (pinned on CUDA)."""
        pools = self.copier.pools if self.copier else ()
        return sum(pool.stats.bytes_total for pool in pools) + self.host_embedding_bytes

    def remove(self) -> None:
        """Give every layer its own forward back."""
        for layer, forward in zip(self.layers, self._originals):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
        self.layers, self._originals = [], []

    def describe(self) -> str:
        counts = ", ".join(f"{n} {p}" for p, n in self.counts().items() if n)
        return f"checkpointing {self.mode}: {counts}" if counts else f"checkpointing {self.mode}: no decoder layers"


def install_checkpointing(
    model: nn.Module,
    mode: str,
    policies: list[Policy] | None = None,
    device: torch.device | None = None,
    mlp_chunk_bytes: int = MLP_CHUNK_BYTES,
    host_embedding_bytes: int = 0,
    keep_up_to: int = 0,
) -> CheckpointingEngine:
    """Wrap each decoder layer of `model` with its policy (from the mode, or given per layer);
    `host_embedding_bytes`: what the embedding tables moved to host memory hold (host_memory.py);
    `keep_up_to`: the most tokens of a step whose layers all keep their activations."""
    layers = decoder_layers(model)
    if not layers and mode != "none":
        return _fall_back_to_transformers(model, mode, device)
    if policies is None:
        if mode not in MODE_POLICIES:
            raise ValueError(f"mode {mode!r} needs an explicit plan of policies")
        policies = [MODE_POLICIES[mode]] * len(layers)
    if len(policies) != len(layers):
        raise ValueError(f"{len(policies)} policies for {len(layers)} decoder layers")
    if hasattr(model, "gradient_checkpointing_disable") and any(l.gradient_checkpointing for l in layers):
        # transformers' own checkpointing would wrap ours a second time
        model.gradient_checkpointing_disable()
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    copier = HostCopier(device) if Policy.OFFLOAD in policies else None
    if copier is not None:
        attention.install()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(getattr(getattr(base, "config", None), "model_type", None))
    engine = CheckpointingEngine(mode=mode, policies=list(policies), device=device, copier=copier,
                                 mlp_chunk_bytes=mlp_chunk_bytes, host_embedding_bytes=host_embedding_bytes,
                                 residual_halves=family.residual_halves if family else None, keep_up_to=keep_up_to)
    for index, (layer, policy) in enumerate(zip(layers, policies)):
        engine.layers.append(layer)
        engine._originals.append(layer.__dict__.get("forward"))
        if policy is not Policy.KEEP:
            layer.forward = _WrappedForward(engine, index, layer, layer.forward, policy)
    model._ftune_engine = engine
    return engine


def _fall_back_to_transformers(model: nn.Module, mode: str, device: torch.device | None) -> CheckpointingEngine:
    """A model whose layers the engine does not know: transformers' own recompute (mode true)."""
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    device = device or next(model.parameters()).device
    if getattr(model, "supports_gradient_checkpointing", False) or hasattr(model, "gradient_checkpointing_enable"):
        try:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except ValueError:
            pass
        else:
            logger.warning("ftune's engine does not know the layers of %s: checkpointing.mode %s falls back to "
                           "transformers' own recompute (mode true)", name, mode)
            return CheckpointingEngine(mode="true (transformers)", policies=[], device=device, copier=None)
    logger.warning("%s supports no activation checkpointing: checkpointing.mode %s falls back to none", name, mode)
    return CheckpointingEngine(mode="none (unsupported model)", policies=[], device=device, copier=None)


class _WrappedForward:
    """A decoder layer's forward, run through `_RecomputedLayer` while a graph is being built."""

    def __init__(self, engine: CheckpointingEngine, index: int, layer: nn.Module, forward: Callable, policy: Policy):
        self.engine_ref = weakref.ref(engine)
        self.index = index
        self.layer = layer
        self.forward = forward
        self.policy = policy
        self.uses_randomness = any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules())
        self.halves = (ResidualHalves(layer, engine.mlp_chunk_bytes, engine.residual_halves)
                       if ResidualHalves.supports(layer, self.uses_randomness, engine.residual_halves) else None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        engine = self.engine_ref()
        if engine is None or not torch.is_grad_enabled():
            # Evaluation and generation (no graph): nothing to save, the KV cache works as usual.
            # An evaluation forward runs the MLP in chunks as the training step does: whole, its
            # intermediates set a peak above training's (5.67 GiB against 5.57 for the 8B shape at
            # 8192 tokens, H200)
            if (self.halves is not None and len(args) == 1 and isinstance(args[0], torch.Tensor)
                    and not kwargs.get("use_cache") and kwargs.get("past_key_values") is None):
                return self.halves.forward(args[0], kwargs)
            return self.forward(*args, **kwargs)
        kwargs = self._without_cache(engine, kwargs)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.numel() // max(1, hidden.shape[-1]) <= engine.keep_up_to:
            return self.forward(*args, **kwargs)  # a short step: mode none's layer, autograd keeping what it saves
        leaves, spec = tree_flatten((args, kwargs))
        tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        tensors = [leaves[i] for i in tensor_slots]
        # read at every call: peft may add, switch or delete adapters between steps (one walk of a
        # peft-wrapped layer's modules costs about 0.2 ms of CPU)
        params = [p for p in self.layer.parameters() if p.requires_grad]
        if not params and not any(t.requires_grad for t in tensors):
            return self.forward(*args, **kwargs)  # nothing below needs gradients: no graph at all

        # The closure keeps only the non-tensor leaves: holding the tensors here would keep every
        # layer input alive on the GPU for as long as the graph lives, offloaded or not.
        skeleton = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

        def unflatten(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
            filled = list(skeleton)
            for slot, tensor in zip(tensor_slots, inputs):
                filled[slot] = tensor
            return tree_unflatten(filled, spec)

        # A mixture of experts whose router logits the model records (for its load-balancing loss):
        # they leave the Function as outputs, so that the loss's gradient reaches the layer.
        router_logits = router_logits_being_recorded()
        # The halves need the hidden state as the only positional argument, as transformers passes it.
        halves = self.halves if len(args) == 1 and isinstance(args[0], torch.Tensor) and router_logits is None else None
        # The first tensor argument is the hidden state, the only per-layer input worth moving;
        # masks and rotary tables are shared by all layers.
        unit = _LayerUnit(engine, self.index, self.policy, self.forward, halves, unflatten,
                          self.uses_randomness, tensors[0].device)
        unit.records_router_logits = router_logits is not None
        if unit.policy is Policy.OFFLOAD and unit.previous is None:
            # The step's first offloaded layer: every other one stashes an input of the same size
            unit.copier.pool.reserve([tensors[0].numel() * tensors[0].element_size()] * unit.offloaded_layers)
        # The layer's trainable parameters are inputs of the Function too: their gradients leave
        # its backward as return values and accumulate in the outer graph, where DDP's hooks see
        # them, instead of in a nested backward (which DDP does not expect). They also make
        # autograd call the backward when no input requires grad (frozen embeddings below).
        unit.n_inputs = len(tensors)
        outputs = _RecomputedLayer.apply(unit, *tensors, *params)
        layer_outputs = len(outputs) - unit.router_outputs
        if router_logits is not None:
            router_logits.extend(outputs[layer_outputs:])
        return tree_unflatten(list(outputs[:layer_outputs]), unit.output_spec)

    def _without_cache(self, engine: CheckpointingEngine, kwargs: dict[str, Any]) -> dict[str, Any]:
        # A recomputed layer would write its keys and values into the cache a second time.
        if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
            if not engine._warned_cache:
                logger.warning("use_cache is off while training with checkpointing (the recompute would write the cache twice)")
                engine._warned_cache = True
            kwargs = dict(kwargs, use_cache=False, past_key_values=None)
        return kwargs


class _LayerUnit:
    """What one layer's forward leaves for its backward: the input (or its host stash) and state."""

    def __init__(self, engine: CheckpointingEngine, index: int, policy: Policy, forward: Callable,
                 halves: ResidualHalves | None, unflatten: Callable, uses_randomness: bool, device: torch.device):
        self.index = index
        self.policy = policy
        self.forward = forward
        self.halves = halves
        self.unflatten = unflatten
        self.device = device
        self.output_spec = None
        self.records_router_logits = False
        self.router_outputs = 0  # router logits returned after the layer's own outputs
        self.stash: HostStash | None = None
        self.parked: _ParkedHalf | None = None
        self.previous: weakref.ref[_LayerUnit] | None = None
        self.autocast = {
            kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in {device.type, "cpu"}
        }
        self.rng_cpu = torch.get_rng_state() if uses_randomness else None
        self.rng_cuda = torch.cuda.get_rng_state(device) if uses_randomness and device.type == "cuda" else None
        if policy is Policy.OFFLOAD:
            last = engine._last_unit() if engine._last_unit is not None else None
            if last is not None and last.index < index:
                self.previous = weakref.ref(last)
            engine._last_unit = weakref.ref(self)
            self.copier = engine.copier
            self.layers_after = len(engine.policies) - index - 1
            self.offloaded_layers = engine.policies.count(Policy.OFFLOAD)

    def run_recording(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, list[torch.Tensor]]:
        """The layer's output, and the router logits it recorded (none unless the model records them)."""
        if not self.records_router_logits:
            return self.run(inputs), []
        with recording_router_logits_apart() as router_logits:
            output = self.run(inputs)
        return output, router_logits

    def run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The layer's output from these inputs (the graph, if any, is the caller's business)."""
        args, kwargs = self.unflatten(inputs)
        if self.halves is not None:
            # An offloaded layer parks its attention's output too, unless another input needs a
            # gradient (the parked backward returns the hidden state's alone)
            parks = self.policy is Policy.OFFLOAD and not any(t.requires_grad for t in inputs[1:])
            return self.halves.forward(args[0], kwargs, park=self.park if parks else None)
        return self.forward(*args, **kwargs)

    def park(self, residual: torch.Tensor, attended: AttentionOutput) -> bool:
        """Park the residual after attention and the attention's output in host memory, if the step
        parks (ftune/memory/estimate.py `parks`) and that leaves room for this layer's input, stashed after its
        forward, and every later one's; whether it did. The room is counted whole, though the step's
        first layer has already pinned those inputs (`reserve`): only new pinning checks it, and on a
        host short of memory a layer may recompute attention that would have fit."""
        tensors = (residual, attended.output, attended.logsumexp)
        input_bytes = residual.numel() * residual.element_size()
        parked_bytes = sum(t.numel() * t.element_size() for t in tensors)
        tokens = residual.numel() // residual.shape[-1]
        if not parks(tokens, self.offloaded_layers * (input_bytes + parked_bytes)):
            return False
        keep_free = (self.layers_after + 1) * buffer_size(input_bytes)
        if self.previous is None:  # the step's first offloaded layer: every other one parks the same
            self.copier.parking_pool.reserve([input_bytes, attended.output.numel() * attended.output.element_size()]
                                             * self.offloaded_layers, keep_free)
        stashes = []
        for tensor in tensors:
            stash = self.copier.stash_if_room(tensor, keep_free)
            if stash is None:
                return False  # the stashes made so far give their buffers back as they go
            stashes.append(stash)
        self.parked = _ParkedHalf(*stashes, extras=attended.extras, scale=attended.scale)
        return True

    def backward(self, inputs: list[torch.Tensor], wrt: list[torch.Tensor],
                 grad_outputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
        """Recompute from inputs; the gradients of `wrt` (inputs needing them, then parameters)."""
        if self.halves is not None:
            args, kwargs = self.unflatten(tuple(inputs))
            return self.halves.backward(args[0], kwargs, grad_outputs[0], wrt)
        with torch.enable_grad():
            output, router_logits = self.run_recording(tuple(inputs))
        outputs = tree_flatten(output)[0] + router_logits
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if not pairs:
            return [None] * len(wrt)
        return list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))

    def backward_parked(self, saved: tuple[torch.Tensor, ...], needs_grad: tuple[bool, ...], params: list,
                        grad_outputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
        """The backward of a layer that parked its attention half (halves.backward_parked): the
        gradients of the inputs (the hidden state's only), then of the parameters."""
        parked, self.parked = self.parked, None
        # The residual came back while the layer above ran (unless this is the first layer back);
        # the rest comes back in the order the backward reads it, while the MLP half runs; then
        # the layer below's first.
        for stash in (parked.residual, self.stash, parked.output, parked.logsumexp):
            stash.prefetch()
        self.prefetch_previous()
        _, kwargs = self.unflatten((None, *saved))  # the hidden state's slot is not read

        def fetch_input() -> torch.Tensor:
            hidden = self.stash.fetch().detach()
            return hidden.requires_grad_() if needs_grad[0] else hidden

        def fetch_attention() -> AttentionOutput:
            return AttentionOutput(parked.output.fetch(), parked.logsumexp.fetch(), parked.extras, parked.scale)

        # The residual is passed on, not kept: the MLP half frees it before the attention half runs
        # (one hidden-state tensor less at attention's backward, where long contexts peak)
        grad_input, *param_grads = self.halves.backward_parked(parked.residual.fetch(), fetch_input, fetch_attention,
                                                               kwargs, grad_outputs[0], params)
        return [grad_input] + [None] * (len(needs_grad) - 1) + param_grads

    def prefetch_previous(self) -> None:
        """Start bringing back what the layer below reads first: its parked residual, else its input."""
        previous = self.previous() if self.previous is not None else None
        if previous is None:
            return
        first = previous.parked.residual if previous.parked is not None else previous.stash
        if first is not None:
            first.prefetch()

    def replay_context(self):
        return _Replay(self)


@dataclass
class _ParkedHalf:
    """What an offloaded layer parked besides its input (attention.py): the residual after attention,
    attention's output and log-sum-exp in host memory, and the kernel's small extras on the device."""

    residual: HostStash
    output: HostStash
    logsumexp: HostStash
    extras: tuple
    scale: float


class _Replay:
    """Rerun under the forward's autocast and RNG state (LoRA dropout draws the same mask)."""

    def __init__(self, unit: _LayerUnit):
        self.unit = unit
        self.fork = None

    def __enter__(self):
        unit = self.unit
        if unit.rng_cpu is not None:
            devices = [unit.device] if unit.rng_cuda is not None else []
            self.fork = torch.random.fork_rng(devices=devices, device_type=unit.device.type)
            self.fork.__enter__()
            torch.set_rng_state(unit.rng_cpu)
            if unit.rng_cuda is not None:
                torch.cuda.set_rng_state(unit.rng_cuda, unit.device)
        self.autocasts = [torch.autocast(kind, dtype=dtype, enabled=enabled)
                          for kind, (enabled, dtype) in unit.autocast.items()]
        for context in self.autocasts:
            context.__enter__()
        return self

    def __exit__(self, *exc):
        for context in reversed(self.autocasts):
            context.__exit__(*exc)
        if self.fork is not None:
            self.fork.__exit__(*exc)
        return False


class _RecomputedLayer(torch.autograd.Function):
    """Forward without a graph; backward recomputes the layer and backpropagates through it."""

    @staticmethod
    def forward(ctx, unit: _LayerUnit, *inputs_and_params: torch.Tensor):
        inputs = inputs_and_params[: unit.n_inputs]
        ctx.params = inputs_and_params[unit.n_inputs:]  # the module's own parameters, alive anyway
        output, router_logits = unit.run_recording(inputs)
        leaves, spec = tree_flatten(output)
        if not all(isinstance(leaf, torch.Tensor) or leaf is None for leaf in leaves):
            raise TypeError(f"decoder layer {unit.index} returned non-tensor outputs: {type(output).__name__}")
        unit.output_spec = spec
        unit.router_outputs = len(router_logits)
        hidden, rest = inputs[0], inputs[1:]
        if unit.policy is Policy.OFFLOAD:
            unit.stash = unit.copier.stash(hidden)
            ctx.save_for_backward(*rest)
        else:
            ctx.save_for_backward(*inputs)
        ctx.unit = unit
        # Outputs that alias inputs would be marked as views; layers always return fresh tensors.
        return (*leaves, *router_logits)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        unit: _LayerUnit = ctx.unit
        saved = ctx.saved_tensors
        needs_grad = ctx.needs_input_grad[1: 1 + unit.n_inputs]
        if unit.parked is not None:
            with unit.replay_context():
                grads = unit.backward_parked(tuple(t.detach() for t in saved), needs_grad, list(ctx.params),
                                             grad_outputs)
            return (None, *grads)
        if unit.policy is Policy.OFFLOAD:
            hidden = unit.stash.fetch()  # a second backward through this graph raises here
            # Bring the layer below back while this one recomputes.
            unit.prefetch_previous()
            saved = (hidden, *saved)
        inputs = [t.detach().requires_grad_(needs) if needs else t.detach() for t, needs in zip(saved, needs_grad)]
        wanted = [t for t, needs in zip(inputs, needs_grad) if needs]
        with unit.replay_context():
            grads = iter(unit.backward(inputs, wanted + list(ctx.params), grad_outputs))
        input_grads = [next(grads) if needs else None for needs in needs_grad]
        return (None, *input_grads, *grads)
