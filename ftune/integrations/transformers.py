"""transformers as ftune patches it. Checked against transformers 5.17.0.

Kernels. `apply_kernels(model, rms_norm=..., ...)` patches one loaded model with ftune's kernels,
per instance: each module gets its own `forward` attribute, which `nn.Module.__call__` finds
before the class's. Nothing in transformers changes globally, so two models in one process, one
patched and one not, compute side by side (that is how the tests compare them). The patches are
bound methods, so `copy.deepcopy` of a patched model gives a patched copy that uses its own
weights. A PEFT model is patched through its underlying transformers model: only norms, the
rotary embedding, the MLP's activation and the LM head's loss are replaced, so the projections
keep their wrappers; `fused_lora` gives those wrappers (peft's LoRA layers) ftune's LoRA forward
(ftune/integrations/peft.py) and each attention module whose q, k and v it adapts a forward that
computes the three together. The Triton kernels need the model on CUDA (or on CPU under
TRITON_INTERPRET=1, for tests); `apply_kernels` refuses other devices rather than fall back
silently to slower code (`fused_lora` is plain PyTorch and runs anywhere). Patch after the model
is placed on its device.

Attention. transformers calls attention through a registry (`AttentionInterface`), and builds
each model's masks through another (`AttentionMaskInterface`); `wrap_attention` replaces an
entry with a wrapper of it, once per process (the engine parks attention's output this way,
ftune/engine/attention.py), and `register_attention` adds ftune's own implementations.

Router logits. A mixture-of-experts model asked for `output_router_logits` records each router's
logits with forward hooks into a collector (transformers.utils.output_capturing, a context
variable set by the model's forward) and computes the load-balancing loss from them. A layer
that the engine recomputes runs its forward without a graph, so the recorded logits would carry
no gradient and the auxiliary loss would train nothing. The engine therefore records a layer's
router logits into a collector of its own, returns them from its autograd Function (which gives
them the layer's backward) and hands those to the model's collector. The fused loss's forward
asks the backbone for them as the class's forward does (`output_router_logits`, else the config's)
and adds the load-balancing loss of the model's module (`load_balancing_loss_func`, times
`router_aux_loss_coef`), which it returns as `aux_loss`.

Generating with router logits. A model whose config asks for `output_router_logits` computes the
load-balancing loss in every forward, generation's included, where transformers 5.17 reshapes
the router logits of the tokens decoded in that step by the attention mask of the whole sequence
and fails ("The size of tensor a ... must match"). `generate_without_router_logits` makes a
model's `generate` pass `output_router_logits=False` (the forward then records none) unless the
caller asks otherwise: ftune's own generation and TRL's (GRPO) call it.

Decode steps. `GenerationMixin._sample` asks the model once per `generate` call whether to decode
through a compiled forward (`_valid_auto_compile_criteria(model_kwargs, generation_config)`) and,
if so, takes it from `get_compiled_call(compile_config)`; the prefill runs the plain forward
either way (beam search and assisted decoding never ask). `route_decode_steps` answers both on
one model instance (its own attributes, found before the class's methods): the engine's
CUDA-graph replay of a decode step (ftune/engine/decode_graphs.py) takes the place of the
compiled forward, where transformers would compile none over bitsandbytes' 4-bit layers. It
does not read `generation_config.disable_compile`, which TRL's GRPOTrainer always sets: the
recipe's grpo.cuda_graphs is the switch.

tests/test_integrations.py holds a contract test for each of these.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers.activations import GELUTanh, SiLUActivation
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import output_capturing
from transformers.utils.generic import can_return_tuple

from ftune.families import KERNEL_NAMES, family_of, known_model_types
from ftune.integrations.peft import fused_mlp, install_lora_forward, lora_layers, project_together
from ftune.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from ftune.kernels.rms_norm import rms_norm
from ftune.kernels.rope import apply_rotary_pos_emb
from ftune.kernels.swiglu import swiglu
from ftune.kernels.utils import runs_triton

CHECKED_VERSIONS = ("5.17.0",)
KERNELS = KERNEL_NAMES
TRITON_KERNELS = KERNELS[:4]
# The MLP activation modules of transformers that each of ftune's gated-product kernels computes
ACTIVATION_MODULES = {"silu": (SiLUActivation, nn.SiLU), "gelu_tanh": (GELUTanh,)}
# The projections of an attention module that read one input, in the order its forward calls them
GROUPED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass
class CausalLMOutputWithStats(CausalLMOutputWithPast):
    """The patched forward's output when labels are given: `logits` is None, and the fused loss's
    per-batch statistics (no gradient) are there for the trainer to log; a mixture of experts'
    load-balancing loss (part of `loss`) and router logits, as its own output has them."""

    entropy_sum: torch.FloatTensor | None = None
    num_correct: torch.FloatTensor | None = None
    num_tokens: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _family_modules(model: nn.Module, suffix: str) -> list[nn.Module]:
    """Modules of `model` whose class is defined in its modeling file and named `*{suffix}`."""
    module_name = type(model).__module__
    return [
        m for m in model.modules() if type(m).__module__ == module_name and type(m).__name__.endswith(suffix)
    ]


def _rope_attention_classes(model: nn.Module) -> list[type]:
    """Attention classes whose forward calls the modeling file's `apply_rotary_pos_emb`."""
    module_name = type(model).__module__
    classes = {type(m) for m in model.modules() if type(m).__module__ == module_name}
    return [c for c in classes if "apply_rotary_pos_emb" in c.forward.__code__.co_names]


# Gated MLPs as transformers writes them: `down_proj(act_fn(gate_proj(x)) * up_proj(x))` (Llama,
# Gemma), or one projection for both, gate first (Phi-3: `gate, up = gate_up_proj(x).chunk(2)`,
# `down_proj(up * activation_fn(gate))`). The activation module's attribute, by layout.
GATED_MLP_LAYOUTS = {("gate_proj", "up_proj", "down_proj"): "act_fn", ("gate_up_proj", "down_proj"): "activation_fn"}


def _gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The model's gated MLPs, in either layout."""
    return [m for m in _family_modules(model, "MLP") if _mlp_activation(m) is not None]


def _mlp_activation(mlp: nn.Module) -> nn.Module | None:
    """A gated MLP's activation module; None for a module of neither layout."""
    for projections, activation in GATED_MLP_LAYOUTS.items():
        if all(hasattr(mlp, name) for name in projections) and hasattr(mlp, activation):
            return getattr(mlp, activation)
    return None


def kernel_support(model: nn.Module) -> dict[str, str | None]:
    """For each kernel: None if it applies to `model`, else the reason it does not."""
    base = unwrap_model(model)
    model_type = _model_type(base)
    family = family_of(model_type)
    if family is None:
        reason = f"ftune has no entry for model type {model_type!r} (ftune/families.py knows {', '.join(known_model_types())})"
        return dict.fromkeys(KERNELS, reason)
    support: dict[str, str | None] = {
        name: None if name in family.kernels else f"not (yet) for the {family.name} family" for name in KERNELS
    }
    if support["rms_norm"] is None and not _family_modules(base, "RMSNorm"):
        support["rms_norm"] = f"{model_type}: no RMSNorm module found"
    if support["rope"] is None and not _rope_attention_classes(base):
        support["rope"] = f"{model_type}: no attention module calls apply_rotary_pos_emb"
    mlps = _gated_mlps(base)
    if support["swiglu"] is not None:
        pass
    elif not mlps:
        support["swiglu"] = f"{model_type}: no gated MLP found"
    elif not all(isinstance(_mlp_activation(m), ACTIVATION_MODULES[family.activation]) for m in mlps):
        act = getattr(base.config, "hidden_activation", None) or getattr(base.config, "hidden_act", None)
        support["swiglu"] = (f"{model_type}'s MLP activation is {act}, where ftune's kernel computes the "
                             f"family's {family.activation}")
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if support["fused_cross_entropy"] is not None:
        pass
    elif lm_head is None or not hasattr(base, base.base_model_prefix):
        support["fused_cross_entropy"] = f"{type(base).__name__} has no LM head (load it as a ForCausalLM)"
    elif type(lm_head) is not nn.Linear:
        # A LoRA- or 4-bit-wrapped head: its `weight` alone would silently drop the adapter or the
        # quantization state
        support["fused_cross_entropy"] = f"the LM head is a {type(lm_head).__name__}, not a plain nn.Linear"
    if support["fused_lora"] is None and not lora_layers(base):
        support["fused_lora"] = "the model has no LoRA layers"
    return support


def apply_kernels(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    fused_cross_entropy: bool = True,
    fused_lora: bool = False,
    device: torch.device | None = None,
) -> dict[str, int]:
    """Patch `model` (a transformers causal LM, bare or PEFT-wrapped) in place, per instance.

    Returns how many modules each requested kernel replaced. Raises ValueError, before patching
    anything, when a requested kernel does not apply to the model (see `kernel_support`), was
    already applied to it, or the model runs on a device the kernels can't run on: `device`, or
    where its parameters are when not given (under FSDP the model waits in host memory until it is
    sharded onto the GPUs). `fused_lora` is off by default here, since a bare transformers model
    has no LoRA layers to patch.
    """
    flags = (rms_norm, rope, swiglu, fused_cross_entropy, fused_lora)
    requested = [name for name, on in zip(KERNELS, flags, strict=True) if on]
    base = unwrap_model(model)
    support = kernel_support(base)
    problems = [f"{name}: {support[name]}" for name in requested if support[name] is not None]
    applied = getattr(base, "_ftune_kernels", frozenset())
    problems += [f"{name}: already applied to this model" for name in requested if name in applied]
    if problems:
        raise ValueError("cannot apply ftune's kernels:\n  " + "\n  ".join(problems))
    if any(name in TRITON_KERNELS for name in requested):
        devices = {device} if device is not None else {p.device for p in base.parameters()}
        if not all(runs_triton(d) for d in devices):
            raise ValueError(
                f"ftune's Triton kernels need the model on CUDA (or on CPU under TRITON_INTERPRET=1, for tests); "
                f"it runs on {', '.join(sorted(map(str, devices)))}. Place the model first, "
                f"or turn the kernels off."
            )

    report: dict[str, int] = {}
    if "rms_norm" in requested:
        family = family_of(_model_type(base))
        forward = functools.partial(
            _rms_norm_forward,
            eps_attr=family.norm_eps_attribute,
            offset=family.norm_offset,
            casting_mode=family.norm_casting,
        )
        norms = _family_modules(base, "RMSNorm")
        for norm in norms:
            norm.forward = types.MethodType(forward, norm)
        report["rms_norm"] = len(norms)
    if "rope" in requested:
        count = 0
        for cls in _rope_attention_classes(base):
            forward = _forward_with_kernel_rope(cls)
            for attention in (m for m in base.modules() if type(m) is cls):
                _set_attention_forward(attention, types.MethodType(forward, attention))
                count += 1
        report["rope"] = count
    if "swiglu" in requested:
        mlps = _gated_mlps(base)
        forward = functools.partial(_gated_mlp_forward, activation=family_of(_model_type(base)).activation)
        for mlp in mlps:
            mlp.forward = types.MethodType(forward, mlp)
        report["swiglu"] = len(mlps)
    if "fused_cross_entropy" in requested:
        # Whatever forward the instance has now (the class's, or another wrapper such as TRL's fused
        # LM head) stays in charge of every call without labels. As a bound method it follows the
        # model through deepcopy.
        base._ftune_original_forward = base.forward
        base.forward = types.MethodType(_causal_lm_forward(type(base)), base)
        report["fused_cross_entropy"] = 1
    if "fused_lora" in requested:
        report["fused_lora"] = install_lora_forward(base)
        _group_attention_projections(base)
    base._ftune_kernels = applied | set(requested)
    return report


def _rms_norm_forward(self, hidden_states, *, eps_attr, offset, casting_mode):
    return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset=offset, casting_mode=casting_mode)


def _own_class(module: nn.Module) -> type:
    """The module's class, seen through FSDP2's `FSDP<Class>(FSDPModule, Class)` subclass."""
    cls = type(module)
    if issubclass(cls, FSDPModule) and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


def _gated_mlp_forward(self, x, *, activation: str):
    # the projections' outputs are read by nothing but the gated product: its backward may write
    # the gradients over them
    if hasattr(self, "gate_up_proj"):  # one projection for both: the kernel reads its halves in place
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(swiglu(gate, up, overwrite_inputs=True, activation=activation))
    fused = fused_mlp(self, x, activation)  # LoRA over 4-bit bases: the adapters inside the base GEMMs
    if fused is not None:
        return fused
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), overwrite_inputs=True, activation=activation))


def _group_attention_projections(model: nn.Module) -> None:
    """Give each attention module whose q, k and v carry ftune's LoRA forward a forward that
    computes the three in one group (ftune/integrations/peft.py `project_together`)."""
    for module in model.modules():
        layers = [getattr(module, name, None) for name in GROUPED_PROJECTIONS]
        if "_ftune_attention_forward" in module.__dict__ or not all(
                layer is not None and "_ftune_peft_forward" in layer.__dict__ for layer in layers):
            continue
        module._ftune_attention_forward = module.forward
        module._ftune_grouped = layers
        module.forward = types.MethodType(_grouped_attention_forward, module)


def _grouped_attention_forward(self, *args, **kwargs):
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    with project_together(self._ftune_grouped, hidden_states):
        return self._ftune_attention_forward(*args, **kwargs)


def _set_attention_forward(attention: nn.Module, forward) -> None:
    """An attention module's own forward replaced, beneath the projections' grouping if it has one."""
    if "_ftune_attention_forward" in attention.__dict__:
        attention._ftune_attention_forward = forward
    else:
        attention.forward = forward


@functools.cache
def _forward_with_kernel_rope(attention_class: type) -> types.FunctionType:
    """The class's forward, same code, reading `apply_rotary_pos_emb` from globals where it is ours.

    Rebinding the globals reuses transformers' attention code as it is, instead of a copy of it
    per family that would drift. The globals are a snapshot of the modeling file's namespace,
    taken once per class; attention backends are looked up through a registry that it shares.
    """
    forward = attention_class.forward
    namespace = {**forward.__globals__, "apply_rotary_pos_emb": apply_rotary_pos_emb}
    patched = types.FunctionType(
        forward.__code__, namespace, forward.__name__, forward.__defaults__, forward.__closure__
    )
    patched.__kwdefaults__ = forward.__kwdefaults__
    return functools.update_wrapper(patched, forward)


@functools.cache
def _causal_lm_forward(model_class: type) -> types.FunctionType:
    """A forward for instances of `model_class`: with labels, the fused loss and no logits."""
    signature = inspect.signature(model_class.forward)
    var_keyword = next(p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD)

    # `generate` validates its kwargs against the forward's signature: keep the class's
    @functools.wraps(model_class.forward)
    @can_return_tuple
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        extra = arguments.pop(var_keyword, {})
        labels = arguments.pop("labels", None)
        # Without labels (generation, evaluation of logits) and for TRL's trainers, which call
        # `model(..., fused_lm_head=True)` for their own chunked head, the original forward runs
        if labels is None or extra.get("fused_lm_head"):
            return self._ftune_original_forward(*args, **kwargs)
        extra.pop("fused_lm_head", None)
        del arguments["self"]
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        router = "output_router_logits" in signature.parameters  # a mixture of experts (Mixtral, Qwen3-MoE)
        if router and arguments.get("output_router_logits") is None:
            arguments["output_router_logits"] = getattr(self.config, "output_router_logits", False)
        # The backbone gets what the original forward gives it, loss kwargs included
        outputs = getattr(self, self.base_model_prefix)(**arguments, **extra)
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        lm_head = self.get_output_embeddings()
        # an LM head that keeps its weight elsewhere between steps (ftune/engine/host_memory.py's
        # HostLMHead) gives the loss its weight or its blocks (`for_the_loss`), and has `release`,
        # for when the loss is done with the weight
        host_head = callable(getattr(lm_head, "for_the_loss", None))
        if _own_class(lm_head) is not nn.Linear and not host_head:
            raise RuntimeError(f"the fused cross-entropy needs an nn.Linear LM head, not a {type(lm_head).__name__}")
        if isinstance(lm_head, FSDPModule):
            # FSDP2 gathers a unit's weights when the unit's forward runs; this path reads the
            # head's weight without calling it (the gathered head stays until FSDP reshards it)
            lm_head.unshard()
        loss, stats = fused_linear_cross_entropy(
            hidden_states[:, slice_indices, :],
            lm_head.for_the_loss() if host_head else lm_head.weight,
            labels,
            bias=lm_head.bias,
            shift_labels=extra.get("shift_labels"),
            ignore_index=extra.get("ignore_index", -100),
            num_items_in_batch=extra.get("num_items_in_batch"),
            final_logit_softcapping=getattr(self.config, "final_logit_softcapping", None),
            return_stats=True,
        )
        if host_head and torch.is_grad_enabled():
            lm_head.release()  # the loss's backward does not read the head: the layers' backward runs without it
        aux_loss = None
        if router and arguments["output_router_logits"]:  # the load-balancing loss, as the class's forward adds it
            aux_loss = sys.modules[model_class.__module__].load_balancing_loss_func(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, arguments.get("attention_mask"))
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return CausalLMOutputWithStats(
            aux_loss=aux_loss,
            router_logits=outputs.router_logits if aux_loss is not None else None,
            loss=loss,
            logits=None,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            entropy_sum=stats.entropy_sum,
            num_correct=stats.num_correct,
            num_tokens=stats.num_tokens,
        )

    return forward


ROUTER_LOGITS = "router_logits"


def router_logits_being_recorded() -> list | None:
    """The list the running model's forward collects router logits into, or None when it does not."""
    collected = output_capturing._active_collector.get()
    if collected is None or ROUTER_LOGITS not in collected:
        return None
    return collected[ROUTER_LOGITS]


@contextlib.contextmanager
def recording_router_logits_apart():
    """Within this block, the router logits that the model's hooks record go to the list yielded,
    and no other output is recorded."""
    collected = {ROUTER_LOGITS: []}
    token = output_capturing._active_collector.set(collected)
    try:
        yield collected[ROUTER_LOGITS]
    finally:
        output_capturing._active_collector.reset(token)


_wrapped_attention: dict[str, object] = {}
# ftune's attention implementations, registered under these names when a model is loaded with one
SOFTCAP_ATTENTION = "ftune_softcap"
WINDOW_ATTENTION = "ftune_window"


def wrap_attention(name: str, make_wrapper) -> None:
    """Register `make_wrapper(original)` as transformers' attention implementation `name` (e.g.
    "sdpa"), once per process; `original` is transformers' own function, which the wrapper calls
    for everything it does not handle."""
    if name in _wrapped_attention:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    original = ALL_ATTENTION_FUNCTIONS[name]
    _wrapped_attention[name] = original
    AttentionInterface.register(name, make_wrapper(original))


def register_attention(name: str) -> None:
    """Make ftune's attention implementation `name` known to transformers (before a model is
    loaded with it), once per process (a wrapper of it, `wrap_attention`, stays in place):
    - ftune_softcap: soft-capped attention (ftune/kernels/softcap_attention.py), with no mask where a
      layer's is causal plus its window, else transformers' FlexAttention masks, built once per
      forward for every layer, padding and packed rows included;
    - ftune_window: sliding-window attention on the flash kernel's window
      (ftune/kernels/window_attention.py), with no mask where a layer's is causal plus its window,
      else transformers' sdpa masks."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if name == SOFTCAP_ATTENTION:
        from ftune.kernels.softcap_attention import softcap_attention, softcap_attention_mask

        attention, mask = softcap_attention, softcap_attention_mask
    elif name == WINDOW_ATTENTION:
        from ftune.kernels.window_attention import window_attention, window_attention_mask

        attention, mask = window_attention, window_attention_mask
    else:
        return
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)


def generate_without_router_logits(model: nn.Module) -> None:
    """Make `model.generate` (a mixture of experts whose config asks for router logits) ask its
    forwards for none: transformers 5.17's load-balancing loss fails on a decoding step's logits."""
    if not getattr(model.config, "output_router_logits", False) or "generate" in model.__dict__:
        return
    generate = model.generate

    @functools.wraps(generate)
    def generate_without(*args, **kwargs):
        kwargs.setdefault("output_router_logits", False)
        return generate(*args, **kwargs)

    model.generate = generate_without


def route_decode_steps(model: nn.Module, *, accepts, step) -> None:
    """Make `model.generate` run its decode steps through `step()` (a new callable for each call,
    given the forward's keyword arguments) where `accepts(model_kwargs)` holds for the call's
    prepared inputs (its cache among them); elsewhere as transformers decides. Per instance: other
    models are untouched."""
    routed = False

    def valid_auto_compile_criteria(model_kwargs, generation_config):
        nonlocal routed
        routed = bool(accepts(model_kwargs))
        return routed or type(model)._valid_auto_compile_criteria(model, model_kwargs, generation_config)

    def get_compiled_call(compile_config):
        return step() if routed else type(model).get_compiled_call(model, compile_config)

    model._valid_auto_compile_criteria = valid_auto_compile_criteria
    model.get_compiled_call = get_compiled_call
