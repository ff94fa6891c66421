"""peft's LoRA layers run through ftune's fused LoRA (ftune/kernels/lora.py). Checked against peft 0.21.2.

`install_lora_forward` gives each of peft's LoRA layers around a linear projection a forward of
ftune's (an instance attribute: peft's class is untouched). That forward has three paths:

  augmented  a bitsandbytes 4-bit base with one plain adapter, on an input long enough that
             bitsandbytes would dequantize the weight anyway: the adapter inside the base GEMM
             (ftune/kernels/lora.py), alone or, for q, k and v and for the gated MLP, with the
             projections that read the same input;
  addmm      any other plain adapter: the base layer, then the adapter's product added in one
             `addmm` (its scaling and sum in the GEMM's epilogue), where peft makes three passes
             over the output (a clone, the scaling, the sum);
  peft       everything else (disabled or merged adapters, DoRA and other variants, per-row
             adapter names, adapter biases, inputs peft would cast): peft's own forward.

How the fused paths run is read from `LoRAExecution`, a context variable the checkpointing engine
sets around a layer's recompute (ftune/engine/halves.py) and nothing else changes: the matrices
it holds through the layer's chunks and backward, and the projections whose output only the
backward reads. Outside the engine the defaults hold: nothing held, every output read.

`switch_without_grad_flags` switches the active adapter of a LoRA model under `torch.no_grad()`
without `PeftModel.set_adapter`'s walk of every module, which also re-marks `requires_grad` (for
DPO's reference pass, integrations/trl.py): it sets `PeftModel.active_adapter`, the tuner's
`active_adapter` and each tuner layer's `_active_adapter`; and turns the adapters off without
`PeftModel.disable_adapter`'s walks: it sets `PeftModel._adapters_disabled` and each tuner layer's
`_disable_adapters`, which its forward reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import types
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ftune.integrations.bitsandbytes import FUSED_4BIT_MAX_TOKENS, fix_quant_state, is_4bit
from ftune.kernels.lora import AdaptedProjection, MLPGroups, ProjectionGroup, lora_mlp, lora_projections

CHECKED_VERSIONS = ("0.21.2",)


@dataclasses.dataclass(frozen=True)
class LoRAExecution:
    """How the fused LoRA paths run now.

    held:      augmented matrices made once and reused while this execution lasts (the engine's
               recompute of one layer), or None: made at each call.
    unread:    projections whose output the backward alone reads (the recomputed MLP's down
               projection, a parked attention's o projection): their forward GEMM is skipped.
    computed:  outputs of projections computed together with the first of their group (q with k
               and v), by projection, with the input they were computed from.
    """

    held: dict | None = None
    unread: frozenset[nn.Module] = frozenset()
    computed: Mapping[nn.Module, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


_EXECUTION: contextvars.ContextVar[LoRAExecution] = contextvars.ContextVar("ftune_lora_execution",
                                                                           default=LoRAExecution())


def current_execution() -> LoRAExecution:
    return _EXECUTION.get()


@contextlib.contextmanager
def lora_execution(*, hold: bool = False, unread: tuple[nn.Module | None, ...] = ()) -> Iterator[None]:
    """Within this block: with `hold`, every augmented matrix is made once (in a dict of this
    block's, emptied when it ends, so that a graph that outlives it holds none); the modules of
    `unread` have their outputs unread."""
    outer = _EXECUTION.get()
    held = {} if hold else outer.held
    token = _EXECUTION.set(dataclasses.replace(
        outer, held=held, unread=outer.unread | {m for m in unread if m is not None}))
    try:
        yield
    finally:
        _EXECUTION.reset(token)
        if hold and held:
            held.clear()


@contextlib.contextmanager
def _computed_together(outputs: Mapping[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    token = _EXECUTION.set(dataclasses.replace(_EXECUTION.get(), computed=outputs))
    try:
        yield
    finally:
        _EXECUTION.reset(token)


# ----------------------------------------------------------------------------------------------
# Which layers and inputs the fused paths take


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers around linear projections (plain, bitsandbytes 4-bit or 8-bit) in `model`."""
    from peft.tuners.lora import LoraLayer

    # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear subclasses; embeddings and convolutions are not
    return [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), nn.Linear)]


def _has_ftune_forward(layer: nn.Module | None) -> bool:
    return layer is not None and "_ftune_peft_forward" in layer.__dict__


def _plain_adapters(layer, x: torch.Tensor) -> list[str] | None:
    """The layer's active adapters when the addmm path computes what peft would for `x`, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active or any(name in getattr(layer, "lora_variant", {}) for name in active):
        return None
    if any(layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None for name in active):
        return None
    # peft casts x to the adapter's dtype when autocast is off; this path does not, so it takes
    # only inputs that need no cast
    if not torch.is_autocast_enabled(x.device.type) and any(layer.lora_A[n].weight.dtype != x.dtype for n in active):
        return None
    return active


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _long_enough(x: torch.Tensor) -> bool:
    """Whether the fused paths take input `x`: on CUDA, more than FUSED_4BIT_MAX_TOKENS rows, below
    which bitsandbytes picks by GPU and shape between its own 4-bit GEMM and dequantizing, and
    ftune leaves the choice to it. Read first, before any layer's checks: at short rows every
    projection of a step asks, and the checks cost about 20 us a layer on the development CPU."""
    return x.device.type != "cuda" or x.numel() // max(1, x.shape[-1]) > FUSED_4BIT_MAX_TOKENS


def _augmentable(layer, x: torch.Tensor, dtype: torch.dtype, frozen_bias: bool) -> AdaptedProjection | None:
    """The layer as one member of an augmented group, when the augmented matrix computes what peft
    would for this input (`_long_enough` already holds): one plain adapter without dropout over a
    4-bit base, in the compute dtype, with no hooks its call would run (a bias only where
    `frozen_bias`, the path adding it in the GEMM)."""
    if not _has_ftune_forward(layer) or layer._forward_pre_hooks or layer._forward_hooks:
        return None
    active = _plain_adapters(layer, x)
    if active is None or len(active) != 1 or not isinstance(layer.lora_dropout[active[0]], nn.Identity):
        return None
    base = layer.base_layer
    if not is_4bit(base):
        return None
    fix_quant_state(base)
    state = base.weight.quant_state
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    if base.bias is not None and (base.bias.requires_grad or not frozen_bias):
        return None
    if (base.compute_dtype or x.dtype) != dtype:
        return None
    name = active[0]
    return AdaptedProjection(base, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])


def _group(owner: nn.Module, projections: list[AdaptedProjection], make) -> ProjectionGroup | MLPGroups:
    """`make()`, kept on `owner` while its projections (base layers, adapters, scalings) stay the
    same: an adapter deleted and added again under its name gets new parameters, and new groups."""
    key = [(p.base, p.lora_a, p.lora_b, p.scaling) for p in projections]
    attribute = f"_ftune_lora_group_of_{len(key)}"  # q heads a group of three, and may run alone
    cached = owner.__dict__.get(attribute)
    if cached is None or not all(a[0] is b[0] and a[1] is b[1] and a[2] is b[2] and a[3] == b[3]
                                 for a, b in zip(cached[0], key)):
        cached = owner.__dict__[attribute] = (key, make())
    return cached[1]


def _no_global_hooks() -> bool:
    # global hooks would have run at each projection's call, which the fused groups skip
    return not (_global_forward_hooks or _global_forward_pre_hooks)


def mlp_groups(mlp: nn.Module, x: torch.Tensor, activation: str = "silu") -> tuple[MLPGroups, torch.dtype] | None:
    """The gated MLP's gate-up and down groups, when the fused MLP computes what peft would for x."""
    layers = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not _long_enough(x) or not _no_global_hooks() or any(layer is None for layer in layers):
        return None
    dtype = _compute_dtype(x)
    projections = [_augmentable(layer, x, dtype, frozen_bias=False) for layer in layers]
    if any(p is None for p in projections):
        return None
    groups = _group(mlp, projections, lambda: MLPGroups(ProjectionGroup(projections[:2]),
                                                        ProjectionGroup(projections[2:]), activation))
    return groups, dtype


def fused_mlp(mlp: nn.Module, x: torch.Tensor, activation: str = "silu") -> torch.Tensor | None:
    """`down(act(gate(x)) * up(x))` through the fused LoRA MLP, or None where it does not apply."""
    found = mlp_groups(mlp, x, activation)
    if found is None:
        return None
    groups, dtype = found
    execution = _EXECUTION.get()
    return lora_mlp(x, groups, dtype, held=execution.held, output_unread=mlp.down_proj in execution.unread)


def project_together(layers: list[nn.Module], x: torch.Tensor):
    """A block within which `layers` (q, k and v, called in turn on `x` by the attention's forward)
    take their outputs from one augmented group computed now; each output is handed out once.
    Where the group does not apply, the block changes nothing."""
    outputs = _group_outputs(layers, x)
    if outputs is None:
        return contextlib.nullcontext()
    return _computed_together({layer: (x, output) for layer, output in zip(layers, outputs)})


def _group_outputs(layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    if not _long_enough(x) or not _no_global_hooks():
        return None
    dtype = _compute_dtype(x)
    projections = [_augmentable(layer, x, dtype, frozen_bias=True) for layer in layers]
    if any(p is None for p in projections):
        return None
    group = _group(layers[0], projections, lambda: ProjectionGroup(projections))
    execution = _EXECUTION.get()
    return lora_projections(x, group, dtype, held=execution.held,
                            output_unread=len(layers) == 1 and layers[0] in execution.unread)


# ----------------------------------------------------------------------------------------------
# The forward


def lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A bound `forward` for a peft LoRA layer; `self._ftune_peft_forward` is peft's."""
    if args or kwargs:
        return self._ftune_peft_forward(x, *args, **kwargs)
    computed = _EXECUTION.get().computed.get(self)
    if computed is not None and computed[0] is x:
        del _EXECUTION.get().computed[self]  # handed out once: a second call computes anew
        return computed[1]
    outputs = _group_outputs([self], x)
    if outputs is not None:
        return outputs[0]
    active = _plain_adapters(self, x)
    if active is None:
        return self._ftune_peft_forward(x)
    result = self.base_layer(x)
    out_shape = result.shape
    result = result.reshape(-1, out_shape[-1])
    for name in active:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        if isinstance(dropout, _RowGate):
            # the same product (a row's scale commutes with A), gated where autograd saves r values
            # a token for it rather than a gated copy of the whole input
            down = dropout(F.linear(x, lora_a.weight))
        else:
            down = F.linear(dropout(x), lora_a.weight)
        down = down.reshape(-1, lora_a.weight.shape[0])
        result = torch.addmm(result, down, lora_b.weight.t(), alpha=self.scaling[name])
    return result.reshape(out_shape)


def install_lora_forward(model: nn.Module) -> int:
    """Give each LoRA layer of `model` ftune's forward; how many layers."""
    layers = lora_layers(model)
    for layer in layers:
        if not _has_ftune_forward(layer):
            layer._ftune_peft_forward = layer.forward
            layer.forward = types.MethodType(lora_forward, layer)
    return len(layers)


def adapters_of(model) -> tuple[tuple[str, int], ...]:
    """What tells one set of a model's adapters from another: each adapter's name and the identity
    of its config (peft keeps the object `add_adapter` was given); () without peft. An adapter
    deleted and added again with the same config object reads as unchanged."""
    return tuple((name, id(config)) for name, config in getattr(model, "peft_config", {}).items())


def switchable_layers(model) -> list:
    """The tuner layers of `model` whose active adapter `switch_without_grad_flags` sets, or [] for a
    model it does not cover: not a peft model, an adapter other than LoRA, auxiliary trainable
    modules (modules_to_save, trainable tokens), which peft's switch also handles."""
    from peft import PeftModel, PeftType
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not isinstance(model, PeftModel) or any(config.peft_type != PeftType.LORA for config in model.peft_config.values()):
        return []
    modules = list(model.modules())
    if any(isinstance(module, AuxiliaryTrainingWrapper) for module in modules):
        return []
    return [module for module in modules if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def switch_without_grad_flags(model, layers: list) -> Iterator[None]:
    """Within the context, `model.set_adapter(name)` under `torch.no_grad()` makes `name` the active
    adapter of `model` (a peft model) and of its tuner `layers` (`switchable_layers`) without
    touching any parameter. With gradients on, with `inference_mode` (which freezes the adapter),
    without layers, or with a merged layer, peft's own `set_adapter` runs, and once it has run,
    every later switch in the context too: peft's switch re-marks which adapter trains, and only
    its switch back marks the trained one again.

    `with model.disable_adapter():` under `torch.no_grad()` likewise turns the layers' adapters
    off and on again by their flag alone, where peft's would take the model's status (a walk of
    every module), unmark every adapter's parameters and mark the active one's again; with
    gradients on, after peft's switch, or with an adapter already off, peft's own runs."""
    if not layers or {"set_adapter", "disable_adapter"} & model.__dict__.keys() or any(layer.merged for layer in layers):
        yield
        return
    peft_set_adapter, peft_disable_adapter = model.set_adapter, model.disable_adapter
    flags_changed = False

    def set_adapter(adapter_name: str, inference_mode: bool = False) -> None:
        nonlocal flags_changed
        if flags_changed or torch.is_grad_enabled() or inference_mode or adapter_name not in model.peft_config:
            flags_changed = True
            return peft_set_adapter(adapter_name, inference_mode=inference_mode)
        model.active_adapter = adapter_name
        model.base_model.active_adapter = adapter_name
        for layer in layers:
            layer._active_adapter = [adapter_name]

    @contextlib.contextmanager
    def disable_adapter() -> Iterator[None]:
        if flags_changed or torch.is_grad_enabled() or model._adapters_disabled or \
                any(layer.disable_adapters for layer in layers):
            with peft_disable_adapter():
                yield
            return
        model._adapters_disabled = True
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer._disable_adapters = False
            model._adapters_disabled = False

    model.set_adapter, model.disable_adapter = set_adapter, disable_adapter
    try:
        yield
    finally:
        del model.set_adapter, model.disable_adapter


# ----------------------------------------------------------------------------------------------
# Rows without the adapter, in a batch that trains it


def row_gateable_layers(model) -> list:
    """The LoRA layers of `model` (a peft model) when `adapters_on_first_rows` makes its other rows
    compute the base model exactly, else []: every tuner layer a LoRA layer around a linear
    projection, each with one active adapter, no dropout (peft's `nn.Identity`), no adapter bias
    and no variant (DoRA's magnitude rescales the base output itself), none merged."""
    layers = switchable_layers(model)
    lora = lora_layers(model)
    if not layers or len(lora) != len(layers):
        return []
    for layer in lora:
        active = [name for name in layer.active_adapters if name in layer.lora_A]
        if (layer.merged or layer.disable_adapters or len(active) != 1
                or not isinstance(layer.lora_dropout[active[0]], nn.Identity)
                or active[0] in getattr(layer, "lora_variant", {})
                or layer.lora_B[active[0]].bias is not None or layer.lora_A[active[0]].bias is not None):
            return []
    return lora


class _RowGate(nn.Module):
    """Stands in for a LoRA layer's dropout: its input on the batch's first `kept` rows, zeros on
    the others, so that the adapter's product, lora_B(lora_A(dropout(x))), adds nothing there.
    It reads every input of the batch's shape: (rows, tokens, ...) or, as the checkpointing
    engine's MLP takes it, the rows' tokens flattened; an input of any other size is refused.
    ftune's LoRA forward (`lora_forward`) applies it to lora_A's product instead: the same numbers,
    and what autograd saves for it is r values a token, not a gated copy of the input."""

    def __init__(self, kept: int, rows: int, tokens: int):
        super().__init__()
        self.kept, self.rows, self.tokens = kept, rows, tokens
        self._masks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.rows * self.tokens * x.shape[-1]:
            raise RuntimeError(f"a LoRA input of shape {tuple(x.shape)} does not cover the batch's {self.rows} rows "
                               f"of {self.tokens} tokens: its rows cannot be told apart")
        mask = self._masks.get((x.device, x.dtype))
        if mask is None:
            mask = torch.zeros(self.rows, 1, dtype=x.dtype, device=x.device)
            mask[:self.kept] = 1
            self._masks[(x.device, x.dtype)] = mask
        return (x.reshape(self.rows, -1) * mask).view(x.shape)


@contextlib.contextmanager
def adapters_on_first_rows(layers: list, kept: int, rows: int, tokens: int) -> Iterator[None]:
    """Within the block, the LoRA `layers` (`row_gateable_layers`) add their adapter to the first
    `kept` of a batch's `rows` rows of `tokens` tokens only: the others compute the base model,
    forward and backward, as with the adapters off. The adapter-in-the-GEMM paths, which take no
    dropout, step aside for the addmm path (`_augmentable`)."""
    gate = _RowGate(kept, rows, tokens)
    replaced = []
    try:
        for layer in layers:
            (name,) = [name for name in layer.active_adapters if name in layer.lora_A]
            replaced.append((layer.lora_dropout, name, layer.lora_dropout[name]))
            layer.lora_dropout[name] = gate
        yield
    finally:
        for dropouts, name, original in replaced:
            dropouts[name] = original
