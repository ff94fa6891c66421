"""A mixture of experts' weights in 4 bits. Checked against transformers 5.17.0, bitsandbytes 0.50.2
and peft 0.21.2.

transformers 5 stores the experts of Mixtral, Qwen3-MoE and the like as 3D parameters of one
module per layer (`mlp.experts.gate_up_proj`, experts x 2 intermediate x hidden, and
`mlp.experts.down_proj`, experts x hidden x intermediate). Its bitsandbytes quantizer
(`Bnb4BitHfQuantizer.param_needs_quantization`) claims the weights of nn.Linear layers only, so
under 4-bit loading the experts load in 16 bits: Qwen3-30B-A3B's are 58 GB in bf16, 15 GB in NF4.

Loading. `experts_in_4bit(model_types)` is a context manager around `from_pretrained`: the
quantizer also claims each 3D expert parameter of the named model types, and its quantize op
hands those to `quantize_experts`. transformers runs that op after it has merged one layer's
experts from the checkpoint (a WeightConverter; a checkpoint of per-expert linear layers is merged
layer by layer), on the device the parameter loads to, so one layer's 16-bit stack exists at a
time: the 16-bit experts never sit whole in GPU or host memory. Every other weight goes to
bitsandbytes' own op, unchanged.

Storage. Each stack is quantized by bitsandbytes (`bitsandbytes.functional.quantize_4bit` through
`Params4bit`, with the recipe's quant type and double quantization) as one tensor of
experts x rows rows; its blocks of 64 never straddle two experts (every expert's matrix is a
multiple of 64 values), so each block holds one expert's values. It is registered beside the
parameter as `<name>_4bit` (a frozen Params4bit, which moves with the module and carries its
quantization state). The parameter itself stays, as zeros of the stack's shape in the compute
dtype, expanded from one element (no memory): peft's `target_parameters` adapts it as it
adapts a 16-bit stack, and its parametrization then gives zeros + delta, the adapter's delta.

DDP. Its start copies every parameter of rank 0 into each rank's, which an expanded placeholder
refuses: `keep_placeholders_out_of_ddp` names them to DDP as parameters to leave alone (FSDP,
which would shard them whole, keeps the experts 16-bit: ftune.plan.quantizes_experts).

Forward. The experts module gets a forward of its own (per instance) that dequantizes the
layer's stacks (one layer at a time, in the compute dtype, without a graph: the base is frozen),
adds the adapter's update where one is active (peft's one adapter: `baddbmm(base, lhs, rhs,
alpha=scaling)` from its parametrization's factors, the very operation it runs on a 16-bit stack;
several: the parametrization's value, the delta over the zeros) and calls the experts class's own
forward (transformers' routing weights and implementation, eager or grouped_mm) on a view of the
module that holds those weights. The gradients of the hidden states, the router and the adapter
are those of the 16-bit model whose experts hold the dequantized weights (tests/test_families.py).
What the experts' GEMMs save of those weights for the backward, a saved-tensor hook replaces by a
way to build them again (dequantize, and the same baddbmm with the factors): no layer keeps its
16-bit experts from its forward to its backward, not even in mode none, where every layer keeps
its graph. The price: each stack dequantized once more in the backward.

tests/test_integrations.py holds the contract tests of the quantizer's hooks and of the experts
forward reading its weights through `self.<name>` alone.
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

CHECKED_VERSIONS = {"transformers": ("5.17.0",), "bitsandbytes": ("0.50.2",), "peft": ("0.21.2",)}
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # the last parts of families.MOE_EXPERTS
SUFFIX = "_4bit"
BLOCKSIZE = 64  # bitsandbytes' 4-bit block, as Linear4bit's


def _expert_parameter(model: nn.Module, name: str, model_types: tuple[str, ...]) -> bool:
    """Whether `name` (a parameter's full name) is a 3D expert parameter of a model of these types."""
    if getattr(model.config, "model_type", None) not in model_types:
        return False
    path, _, last = name.rpartition(".")
    if last not in EXPERT_PARAMETERS:
        return False
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    parameter = module._parameters.get(last)
    return parameter is not None and parameter.dim() == 3


class _QuantizeOp:
    """The quantizer's op: experts to `quantize_experts`, every other weight to bitsandbytes' op."""

    def __init__(self, quantizer, inner, model_types: tuple[str, ...]):
        self.quantizer, self.inner, self.model_types = quantizer, inner, model_types

    def __getattr__(self, name):  # what transformers reads of a ConversionOps (reverse_op, ...)
        if name.startswith("__") or name in ("quantizer", "inner", "model_types"):  # copies, pickling
            raise AttributeError(name)
        return getattr(self.inner, name)

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model: nn.Module | None = None, **kwargs):
        experts = {key: value for key, value in input_dict.items()
                   if _expert_parameter(model, key, self.model_types)}
        rest = {key: value for key, value in input_dict.items() if key not in experts}
        result = self.inner.convert(rest, full_layer_name=full_layer_name, model=model, **kwargs) if rest else {}
        config = self.quantizer.quantization_config
        for key, value in experts.items():
            value = value[0] if isinstance(value, list) else value
            path, _, name = key.rpartition(".")
            result[key] = quantize_experts(model.get_submodule(path), name, value,
                                           quant_type=config.bnb_4bit_quant_type,
                                           double_quant=config.bnb_4bit_use_double_quant,
                                           compute_dtype=config.bnb_4bit_compute_dtype or value.dtype,
                                           quant_storage=config.bnb_4bit_quant_storage)
        return result


@contextlib.contextmanager
def experts_in_4bit(model_types: tuple[str, ...]):
    """Within it, `from_pretrained` with a 4-bit BitsAndBytesConfig also quantizes the 3D expert
    parameters of models of `model_types` (see the module docstring)."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    needs, ops = Bnb4BitHfQuantizer.param_needs_quantization, Bnb4BitHfQuantizer.get_quantize_ops

    def param_needs_quantization(self, model, param_name, **kwargs):
        return needs(self, model, param_name, **kwargs) or _expert_parameter(model, param_name, model_types)

    def get_quantize_ops(self):
        return _QuantizeOp(self, ops(self), model_types)

    Bnb4BitHfQuantizer.param_needs_quantization = param_needs_quantization
    Bnb4BitHfQuantizer.get_quantize_ops = get_quantize_ops
    try:
        yield
    finally:
        Bnb4BitHfQuantizer.param_needs_quantization, Bnb4BitHfQuantizer.get_quantize_ops = needs, ops


def quantize_experts(module: nn.Module, name: str, stack: torch.Tensor, *, quant_type: str = "nf4",
                     double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                     quant_storage: torch.dtype = torch.uint8) -> nn.Parameter:
    """Quantize one 3D expert stack of `module` (experts x out x in) into `<name>_4bit`, give the
    module its 4-bit forward, and return the placeholder that takes the parameter's place: zeros
    of the stack's shape in the compute dtype, one element of memory."""
    import bitsandbytes as bnb

    compute_dtype = compute_dtype or stack.dtype
    experts, rows, columns = stack.shape
    if (rows * columns) % BLOCKSIZE:
        raise ValueError(f"an expert of {rows} x {columns} values is no whole number of {BLOCKSIZE}-value blocks")
    weight = bnb.nn.Params4bit(stack.detach().reshape(experts * rows, columns), requires_grad=False,
                               blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type,
                               quant_storage=quant_storage)
    weight = weight.to(stack.device)  # quantizes (bitsandbytes' Params4bit)
    module.register_parameter(name + SUFFIX, weight)
    module._is_hf_initialized = True
    module.ftune_compute_dtype = compute_dtype
    if not isinstance(module.__dict__.get("forward"), types.MethodType):
        module.forward = types.MethodType(_forward_4bit, module)
    placeholder = torch.zeros((), dtype=compute_dtype, device=stack.device).expand(experts, rows, columns)
    return nn.Parameter(placeholder, requires_grad=False)


def keep_placeholders_out_of_ddp(model: nn.Module) -> list[str]:
    """Name the placeholders (see the module docstring) to DDP as parameters it leaves alone: its
    start broadcasts every parameter from rank 0 and copies it back into each rank's, which a tensor
    of one element expanded to a stack's shape refuses (every rank loads the same 4-bit experts, and
    they train nothing). Set on the module that DDP will wrap; the names set."""
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, parameter in model.named_parameters()
             if parameter.dim() == 3 and 0 in parameter.stride() and name.rpartition(".")[2] in EXPERT_PARAMETERS]
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def quantized_stacks(module: nn.Module) -> list[str]:
    """The names of the 4-bit expert stacks of one module."""
    return [name for name in EXPERT_PARAMETERS if name + SUFFIX in module._parameters]


def has_4bit_experts(model: nn.Module) -> bool:
    return any(quantized_stacks(module) for module in model.modules())


def dequantize(module: nn.Module, name: str) -> torch.Tensor:
    """One 4-bit stack of `module`, dequantized (experts x out x in, in the compute dtype)."""
    import bitsandbytes.functional as F

    weight = module._parameters[name + SUFFIX]
    shape = _stack_shape(module, name)
    with torch.no_grad():
        return F.dequantize_4bit(weight.data, weight.quant_state).to(module.ftune_compute_dtype).view(shape)


def _stack_shape(module: nn.Module, name: str) -> torch.Size:
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original.shape
    return module._parameters[name].shape


class _ExpertsView:
    """The experts module, with its weights replaced: what its class's forward reads as `self`."""

    def __init__(self, module: nn.Module, weights: dict[str, torch.Tensor]):
        self.__dict__.update(weights)
        self.__dict__["_module"] = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def _forward_4bit(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The experts' forward over their 4-bit stacks (see the module docstring)."""
    weights, rebuild = {}, {}
    for name in quantized_stacks(self):
        weights[name], rebuild_one = _weight(self, name)
        if rebuild_one is not None:
            rebuild[weights[name].untyped_storage().data_ptr()] = rebuild_one
    dtype = hidden_states.dtype
    view = _ExpertsView(self, weights)
    # what the experts' GEMMs save of these weights, they get back rebuilt in the backward
    with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, rebuild), _unpack):
        out = type(self).forward(view, hidden_states.to(self.ftune_compute_dtype), *args, **kwargs)
    return out.to(dtype)


def _weight(module: nn.Module, name: str):
    """One stack's weight for this forward, and how to build it again without a graph (None: it
    cannot be, and is saved as it is)."""
    from peft.tuners.lora.layer import _LoraFactorsProxy

    if not parametrize.is_parametrized(module, name):  # no adapter active: the frozen base alone
        return dequantize(module, name), _memoized(lambda: dequantize(module, name))
    proxies = module.parametrizations[name]
    if len(proxies) == 1 and isinstance(proxies[0], _LoraFactorsProxy):
        # peft's one adapter: base + scaling * lhs @ rhs in one baddbmm, the very operation peft's
        # parametrization runs on a 16-bit stack; lhs and rhs carry the adapter's graph
        lhs, rhs, scaling = proxies[0].lhs, proxies[0].rhs, proxies[0].scaling
        weight = torch.baddbmm(dequantize(module, name), lhs, rhs, alpha=scaling)
        lhs, rhs = lhs.detach(), rhs.detach()
        return weight, _memoized(lambda: torch.baddbmm(dequantize(module, name), lhs, rhs, alpha=scaling))
    # any other parametrization (several adapters at once): its value is the delta over the zeros
    return dequantize(module, name) + getattr(module, name), None


def _memoized(build):
    """`build`, its result shared while it lives (eager experts save one slice per expert)."""
    held = [None]

    def rebuilt():
        weight = held[0]() if held[0] is not None else None
        if weight is None:
            with torch.no_grad():
                weight = build()
            held[0] = weakref.ref(weight)
        return weight

    return rebuilt


_REBUILT = object()


def _pack(rebuild: dict, tensor: torch.Tensor):
    if tensor.layout != torch.strided or not rebuild:
        return tensor
    rebuilt = rebuild.get(tensor.untyped_storage().data_ptr())
    if rebuilt is None:
        return tensor
    return _REBUILT, rebuilt, tensor.size(), tensor.stride(), tensor.storage_offset()


def _unpack(packed):
    if type(packed) is tuple and packed and packed[0] is _REBUILT:
        _, rebuilt, size, stride, offset = packed
        return rebuilt().as_strided(size, stride, offset)
    return packed


def dequantized_copy(model: nn.Module, into: nn.Module) -> int:
    """Copy the dequantized 4-bit experts of `model` into the 16-bit expert parameters of `into`
    (a model of the same shape loaded without them quantized, PEFT-wrapped or not), layer by
    layer: the reference the tests compare with. The number of stacks copied."""
    sources = [(module, name) for module in model.modules() for name in quantized_stacks(module)]
    targets = [(module, name) for module in into.modules() for name in EXPERT_PARAMETERS
               if getattr(module._parameters.get(name), "ndim", 0) == 3]
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} 4-bit expert stacks against {len(targets)} 16-bit ones")
    for (module, name), (target, target_name) in zip(sources, targets):
        assert name == target_name, (name, target_name)
        with torch.no_grad():
            target._parameters[name].copy_(dequantize(module, name))
    return len(sources)
