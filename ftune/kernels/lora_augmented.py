"""LoRA over 4-bit bases with the adapters inside the base GEMMs: the gated MLP in three GEMMs,
the attention's projections in one per output and one for their input gradient.

peft runs an adapted projection as the base GEMM and the adapter's two thin ones, and autograd
sums the two input gradients. Those thin GEMMs and sums are passes over whole projection outputs
and inputs: the profile of an `unsloth` step of the 8B shape at 8192 tokens on an H200 shows
24 ms of elementwise adds and 35 ms of rank-16 GEMMs that read and write a whole output in their
epilogue, in an 800 ms step (benchmarks/results/profile-8192-h200-parked.log).

Here each projection group (projections that read one input: gate and up; q, k and v; down or o
alone) is one 16-bit matrix, made wherever the 4-bit weights are dequantized:

             K       R
        N [  W    |  B  ]     W: the group's base weights stacked (gate over up, q over k over v)
        R [  s A  |  0  ]     B: each adapter's B in its own R columns (block diagonal); A scaled by s

    forward    y  = [x | x (sA)^T] @ [W | B]^T      the adapter's product is R more input columns
    backward   dx = [dy | dy B] @ [W ; sA]          its gradient R more output-gradient columns

one GEMM each way over K + R (or N + R) instead of K (or N), R = 32 for gate and up at rank 16:
0.8% more arithmetic and no other pass over the outputs. The adapters' gradients read the extra
columns: dB = dy^T (x (sA)^T) and dA = s (dy B)^T x. In the MLP the SwiGLU reads gate and up
where the GEMM wrote them, side by side in one buffer, and its backward writes their gradients
over them, beside the columns the R extra ones go to.

Rounding: the base product and the adapter's are summed in the GEMM's fp32 accumulator and
rounded once, where peft rounds the adapter's product, its scaled copy and the sum.

The paths cover what QLoRA training runs: projections that are peft LoRA layers over bitsandbytes
4-bit weights, without bias or (the attention's, as Qwen2's q, k and v) with a frozen one, each
with one active plain adapter (no dropout or DoRA), on inputs long enough that bitsandbytes would
dequantize the weights anyway. Anything else, and every call without ftune's LoRA forward
(`fused_lora`), takes the usual path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ftune.kernels import lora
from ftune.kernels.swiglu import swiglu_backward, swiglu_forward

# The rank columns padded with zeros to a multiple of this: rows of whole 16-byte vectors of
# 16-bit values, which cuBLAS wants for its fastest kernels
RANK_ALIGNMENT = 8
# The matrices made inside `matrices_once`, by (the group's base weights, dtype)
_REUSED_MATRICES: dict[tuple, "AugmentedWeight"] | None = None


@dataclass(frozen=True)
class _Member:
    """One projection of a group: its peft layer, adapter (its A and B), output rows and rank columns."""

    layer: nn.Module
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    adapter: str
    rows: slice
    ranks: slice

    @property
    def scaling(self) -> float:
        return self.layer.scaling[self.adapter]


class _Group:
    """Projections that read one input, their outputs side by side (gate and up; q, k and v)."""

    def __init__(self, layers: list[nn.Module], adapters: list[str]):
        members, rows, ranks = [], 0, 0
        for layer, adapter in zip(layers, adapters):
            out_features = layer.base_layer.weight.quant_state.shape[0]
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            rank = lora_a.shape[0]
            members.append(_Member(layer, lora_a, lora_b, adapter, slice(rows, rows + out_features),
                                   slice(ranks, ranks + rank)))
            rows, ranks = rows + out_features, ranks + rank
        self.members = members
        self.weights = [w for m in members for w in (m.lora_a, m.lora_b)]  # as the Functions take them
        self.out_features = rows
        self.in_features = layers[0].base_layer.weight.quant_state.shape[1]
        self.rank = -(-ranks // RANK_ALIGNMENT) * RANK_ALIGNMENT


class AugmentedWeight:
    """A group's base weights dequantized and its adapters beside them, in one (N + R) x (K + R) matrix."""

    def __init__(self, group: _Group, dtype: torch.dtype):
        n, k, r = group.out_features, group.in_features, group.rank
        self.n, self.k, self.r = n, k, r
        device = group.members[0].lora_a.device
        self.matrix = matrix = torch.empty(n + r, k + r, dtype=dtype, device=device)
        matrix[:n, k:].zero_()
        matrix[n:, k:].zero_()
        with torch.no_grad():  # the adapters are copied fresh each time: an optimizer step changes them
            for member in group.members:
                weight = member.layer.base_layer.weight
                # bitsandbytes' dequantization, then a copy into the matrix's rows (K + R apart): on
                # an H100, 0.08 ms for the 8B shape's gate weight, where a Triton kernel writing
                # straight into the rows took 1.14 ms (benchmarks/results/nf4-rows-kernel-h100.json)
                matrix[member.rows, :k].copy_(lora._whole_weight(weight, dtype))
                matrix[member.rows, k + member.ranks.start: k + member.ranks.stop].copy_(member.lora_b)
                torch.mul(member.lora_a, member.scaling, out=matrix[n + member.ranks.start: n + member.ranks.stop, :k])
            ranks_used = group.members[-1].ranks.stop
            if ranks_used < r:  # the padding rows of sA
                matrix[n + ranks_used:, :k].zero_()

    @property
    def forward_weight(self) -> torch.Tensor:
        """[W | B], N x (K + R): the input's extra columns meet the B blocks."""
        return self.matrix[: self.n]

    @property
    def backward_weight(self) -> torch.Tensor:
        """[W ; sA], (N + R) x K: the output gradient's extra columns meet the scaled A blocks."""
        return self.matrix[:, : self.k]

    @property
    def scaled_a(self) -> torch.Tensor:
        return self.matrix[self.n:, : self.k]

    @property
    def b(self) -> torch.Tensor:
        return self.matrix[: self.n, self.k:]


@contextlib.contextmanager
def matrices_once():
    """Within this block each group's augmented matrix is made once and serves every call, as
    `lora.dequantized_once` does for them and for the 4-bit weights the usual path reads.

    The forward without a graph runs a layer's MLP in chunks of tokens (ftune/engine/halves.py),
    and made the gate-up and down matrices for each chunk: three 4-bit dequantizations and 339 MiB
    of matrix written per chunk for the 8B shape. Here they are made once per layer whatever the
    length, and held together through its chunks: on an H100 the 8B shape's step went from 1.88x
    to 1.91x the baseline at 8192 tokens and from 1.81x to 1.86x at 16384, at the same peak once
    `_forward` made no buffer beside them (benchmarks/results/engine-h100-down-matrix-first.json).
    The 4-bit weights of the usual path are not held: their three copies at once cost the 8B
    shape's forward 0.32 GiB at 8192 tokens.
    """
    global _REUSED_MATRICES
    outer, _REUSED_MATRICES = _REUSED_MATRICES, {}
    try:
        yield
    finally:
        _REUSED_MATRICES = outer


def _reused_matrices() -> dict | None:
    """Where the matrices made now are kept: `matrices_once`'s, or `lora.dequantized_once`'s."""
    return _REUSED_MATRICES if _REUSED_MATRICES is not None else lora._REUSED_WEIGHTS


def _augmented(group: _Group, dtype: torch.dtype) -> AugmentedWeight:
    """The group's matrix: made once per `matrices_once` or `lora.dequantized_once` block inside
    one, else at each call."""
    reused = _reused_matrices()
    if reused is None:
        return AugmentedWeight(group, dtype)
    key = ("augmented", *(id(m.layer.base_layer.weight) for m in group.members), dtype)
    if key not in reused:
        reused[key] = AugmentedWeight(group, dtype)
    return reused[key]


@dataclass(frozen=True)
class _MLPParts:
    gate_up: _Group
    down: _Group
    dtype: torch.dtype

    def adapter_weights(self) -> list[torch.Tensor]:
        """A and B of gate, up and down, in the order the Function takes and returns them."""
        return self.gate_up.weights + self.down.weights


def _adapters_if_augmentable(layers: list[nn.Module], x: torch.Tensor,
                             frozen_bias: bool = False) -> tuple[tuple, torch.dtype] | None:
    """A key of the layers' adapters (their names and A and B parameters) and the compute dtype,
    when the augmented matrices compute what peft would for this input (for base layers with a
    frozen bias only where `frozen_bias`, the path adding it); else None. Runs at every call
    (some 300 in a forward of the 8B shape): about 28 us a layer on a slow host."""
    if lora.FOLD_ADAPTER_INPUT_GRADIENT or _global_forward_hooks or _global_forward_pre_hooks:
        return None  # the folded path asked for, or hooks the layers' calls would have run
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    key = []
    for layer in layers:
        # ftune's LoRA forward installed (fused_lora on), one plain adapter, peft's own fast-path rules
        adapter = lora._single_plain_adapter(layer) if hasattr(layer, "_ftune_peft_forward") else None
        if adapter is None or not lora._fast_path_applies(layer, x, {}):
            return None
        if layer._forward_pre_hooks or layer._forward_hooks:
            return None  # e.g. peft's per-row `adapter_names`: the matrices would skip the layer's call
        base = layer.base_layer
        if lora._is_4bit(base):
            from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

            fix_4bit_weight_quant_state_from_module(base)  # FSDP's gathered weight lacks it
        # where bitsandbytes would dequantize the whole weight anyway, in the input's compute dtype
        # (and a bias, if any, is frozen)
        if (not lora._reads_whole_weight(base, x) or (base.bias is not None and not frozen_bias)
                or (base.compute_dtype or dtype) != dtype):
            return None
        key += [adapter, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    return tuple(key), dtype


def lora_mlp_parts(mlp: nn.Module, x: torch.Tensor) -> _MLPParts | None:
    """The MLP's groups when the fused path computes what peft would for this input, else None."""
    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None for p in projections):
        return None
    found = _adapters_if_augmentable(projections, x)
    if found is None:
        return None
    key, dtype = found
    groups = _cached_groups(mlp, key, lambda: (_Group(projections[:2], key[0:6:3]), _Group(projections[2:], key[6:7])))
    return _MLPParts(*groups, dtype)


def _cached_groups(owner, key: tuple, make):
    """`make()`, kept on `owner` while the adapters (names and parameters, `key`) stay the same: an
    adapter deleted and added again under its name gets new parameters, and new groups."""
    cached = owner.__dict__.get("_ftune_lora_groups")
    same = cached is not None and len(cached[0]) == len(key) and all(
        (a is b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(cached[0], key))
    if not same:
        cached = owner.__dict__["_ftune_lora_groups"] = (key, make())
    return cached[1]


def lora_mlp(mlp: nn.Module, x: torch.Tensor, parts: _MLPParts) -> torch.Tensor:
    """`down(silu(gate(x)) * up(x))` with every adapter, through the augmented weights. Under
    `lora.output_unread(mlp.down_proj)` the output is left unwritten (only its graph is wanted)."""
    output_unread = getattr(mlp.down_proj, "_ftune_output_unread", False)
    weights = parts.adapter_weights()
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return _LoRAMLP.apply(x, parts, output_unread, *weights)
    return _forward(x, parts, output_unread, for_backward=False)[0]


def _with_product(t: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[t | t @ matrix] in `dtype`: an input with its adapter columns, [x | x (sA)^T], or an output
    gradient with its, [dy | dy B]."""
    wide = torch.empty(t.shape[0], t.shape[1] + matrix.shape[1], dtype=dtype, device=t.device)
    wide[:, : t.shape[1]].copy_(t)
    torch.mm(wide[:, : t.shape[1]], matrix, out=wide[:, t.shape[1]:])
    return wide


def _forward(x: torch.Tensor, parts: _MLPParts, output_unread: bool, for_backward: bool = True):
    """The MLP's output and what its backward reads: the input with its adapter columns, gate and
    up side by side (room for their gradients' adapter columns), the SwiGLU product with its own.
    Without `for_backward` the first two are None, and the product is written over gate."""
    gate_up, down, dtype = parts.gate_up, parts.down, parts.dtype
    k, n = gate_up.in_features, down.in_features
    weight = _augmented(gate_up, dtype)
    # Without a graph, where the matrices are held through the chunks (`matrices_once`), the down
    # matrix is made first, before gate and up exist: made after them, beside the gate-up matrix,
    # it raised the peak at 8192 tokens by 0.08 GiB (benchmarks/results/engine-h100-product-over-gate.json)
    down_weight = _augmented(down, dtype) if not for_backward and _reused_matrices() is not None else None
    x_wide = _with_product(x.reshape(-1, k), weight.scaled_a.t(), dtype)
    tokens = x_wide.shape[0]
    gate_up_out = torch.empty(tokens, 2 * n + gate_up.rank, dtype=dtype, device=x.device)
    torch.mm(x_wide, weight.forward_weight.t(), out=gate_up_out[:, : 2 * n])
    del weight  # (with a graph, outside a reuse block) the next one is made only after this one is freed
    gate, up = gate_up_out[:, :n], gate_up_out[:, n: 2 * n]
    if not for_backward and down.rank <= n + gate_up.rank:
        # Nothing reads the widened input, gate or up again: the product goes over gate (each
        # element read before it is written, by the same thread) and its adapter columns over
        # up's first ones. Beside the matrices `matrices_once` holds through the chunks (339 MiB
        # for the 8B shape), a product of its own raised the peak at 8192 tokens by 0.11 GiB
        # (benchmarks/results/engine-h100-forward-matrices-once.json)
        x_wide = None
        swiglu_forward(gate, up, out=gate)
        product, gate_up_out = gate_up_out[:, : n + down.rank], None
    else:
        product = torch.empty(tokens, n + down.rank, dtype=dtype, device=x.device)
        swiglu_forward(gate, up, out=product[:, :n])
        if not for_backward:
            x_wide = gate_up_out = None
    weight = _augmented(down, dtype) if down_weight is None else down_weight
    torch.mm(product[:, :n], weight.scaled_a.t(), out=product[:, n:])
    # outputs made in their own shape, not as views, so that a caller may modify them in place
    y = torch.empty((*x.shape[:-1], down.out_features), dtype=dtype, device=x.device)
    if not output_unread:
        torch.mm(product, weight.forward_weight.t(), out=y.view(-1, down.out_features))
    return y, x_wide, gate_up_out, product


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, parts: _MLPParts, output_unread: bool, *adapter_weights):
        y, x_wide, gate_up_out, product = _forward(x, parts, output_unread)
        ctx.parts, ctx.input_shape, ctx.input_dtype = parts, x.shape, x.dtype
        # attributes, not saved tensors: the backward lets each go as soon as it is read
        ctx.x_wide, ctx.gate_up_out, ctx.product = x_wide, gate_up_out, product
        return y

    @staticmethod
    def backward(ctx, grad_output):
        parts, dtype = ctx.parts, ctx.parts.dtype
        gate_up, down = parts.gate_up, parts.down
        k, n = gate_up.in_features, down.in_features
        needs = ctx.needs_input_grad
        x_wide, gate_up_out, product = ctx.x_wide, ctx.gate_up_out, ctx.product
        ctx.x_wide = ctx.gate_up_out = ctx.product = None  # a second backward finds nothing
        if x_wide is None:
            raise RuntimeError("the fused LoRA MLP's backward ran twice through one graph (retain_graph=True)")
        grad = grad_output.reshape(-1, down.out_features).to(dtype)
        grads_wanted = any(needs[3:])

        # down: its input gradient through [dy | dy B] @ [W ; sA]
        weight = _augmented(down, dtype)
        grad_wide = _with_product(grad, weight.b, dtype)
        grad_product = torch.mm(grad_wide, weight.backward_weight)
        del weight
        down_grads = _adapter_grads(down, grad, grad_wide[:, down.out_features:], product[:, :n],
                                    product[:, n:], needs[3 + 4:]) if grads_wanted else [None, None]
        del grad_wide, product

        # SwiGLU: gate's and up's gradients written over them, then the extra columns of both
        swiglu_backward(grad_product, gate_up_out[:, :n], gate_up_out[:, n: 2 * n], overwrite_inputs=True)
        del grad_product
        weight = _augmented(gate_up, dtype)
        grad_gate_up = gate_up_out[:, : 2 * n]
        torch.mm(grad_gate_up, weight.b, out=gate_up_out[:, 2 * n:])
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(gate_up_out, weight.backward_weight).view(ctx.input_shape).to(ctx.input_dtype)
        del weight
        gate_up_grads = _adapter_grads(gate_up, grad_gate_up, gate_up_out[:, 2 * n:], x_wide[:, :k], x_wide[:, k:],
                                       needs[3: 3 + 4]) if grads_wanted else [None] * 4
        return (grad_x, None, None, *gate_up_grads, *down_grads)


def _adapter_grads(group: _Group, grad: torch.Tensor, grad_times_b: torch.Tensor, x: torch.Tensor,
                   x_times_scaled_a: torch.Tensor, needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
    """Each member's (dA, dB): dB = dy^T (x (sA)^T), dA = s (dy B)^T x, from one GEMM each for the
    group (its blocks off the diagonal are the products of other members' columns, unread)."""
    all_b = grad.t() @ x_times_scaled_a if any(needs[1::2]) else None  # N x R
    all_a = grad_times_b.t() @ x if any(needs[0::2]) else None  # R x K
    grads = []
    for index, member in enumerate(group.members):
        grad_a = grad_b = None
        if needs[2 * index]:
            grad_a = (all_a[member.ranks].float() * member.scaling).to(member.lora_a.dtype)
        if needs[2 * index + 1]:
            grad_b = all_b[member.rows, member.ranks].to(member.lora_b.dtype)
        grads += [grad_a, grad_b]
    return grads


# Projections grouped in the attention modules of the model families ftune patches: the names
# transformers gives them, in the order the attention's forward calls them
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",))


class ProjectionGroup:
    """Projections that read one input, called one after the other by the attention's forward
    (q, k, v). The first call computes them all (one Function, so their backward is one input
    gradient GEMM); the next calls, with the same input tensor, take their outputs. A call out of
    that order, or any input the path does not cover, goes the usual way."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self._pending: tuple[torch.Tensor, list] | None = None  # (input, outputs not yet taken)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        index = next(i for i, member in enumerate(self.layers) if member is layer)
        if index > 0:
            pending, self._pending = self._pending, None
            if pending is None or pending[0] is not x or pending[1][index] is None:
                return None
            output, pending[1][index] = pending[1][index], None
            if index + 1 < len(self.layers):
                self._pending = pending
            return output
        self._pending = None
        found = _adapters_if_augmentable(self.layers, x, frozen_bias=True)
        if found is None:
            return None
        key, dtype = found
        group = _cached_groups(self, key, lambda: _Group(self.layers, key[0::3]))
        output_unread = len(self.layers) == 1 and getattr(layer, "_ftune_output_unread", False)
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in group.weights)):
            outputs = _LoRAProjections.apply(x, group, dtype, output_unread, *group.weights)
        else:
            outputs = _project(x, group, dtype, output_unread)[0]
        if len(outputs) > 1:
            self._pending = (x, [None, *outputs[1:]])
        return outputs[0]


def group_projections(model: nn.Module) -> int:
    """Give the attention projections of `model` that ftune's LoRA forward patched their
    `ProjectionGroup`s (lora.fused_lora_forward consults them); how many groups."""
    count = 0
    for module in model.modules():
        for names in PROJECTION_GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if all(hasattr(layer, "_ftune_peft_forward") for layer in layers):
                group = ProjectionGroup(layers)
                for layer in layers:
                    layer._ftune_projection_group = group
                count += 1
    return count


def _project(x: torch.Tensor, group: _Group, dtype: torch.dtype, output_unread: bool):
    """Each member's output, and the input with its adapter columns (the backward reads both parts)."""
    weight = _augmented(group, dtype)
    x_wide = _with_product(x.reshape(-1, group.in_features), weight.scaled_a.t(), dtype)
    outputs = []
    for member in group.members:
        width = member.rows.stop - member.rows.start
        # made in its own shape, not as a view, so that a caller may modify it in place
        output = torch.empty((*x.shape[:-1], width), dtype=dtype, device=x.device)
        if not output_unread:
            member_weight = weight.forward_weight[member.rows].t()
            bias = member.layer.base_layer.bias
            if bias is None:
                torch.mm(x_wide, member_weight, out=output.view(-1, width))
            else:  # as bitsandbytes adds it: in the compute dtype, in the GEMM
                torch.addmm(bias.to(dtype), x_wide, member_weight, out=output.view(-1, width))
        outputs.append(output)
    return tuple(outputs), x_wide


class _LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group: _Group, dtype: torch.dtype, output_unread: bool, *adapter_weights):
        outputs, x_wide = _project(x, group, dtype, output_unread)
        ctx.set_materialize_grads(False)  # an output nothing read has no gradient: its columns are zeroed
        ctx.group, ctx.dtype, ctx.input_shape, ctx.input_dtype = group, dtype, x.shape, x.dtype
        # The backward reads x and its adapter columns. It keeps x itself rather than x_wide's copy
        # of it: o's input is attention's output, which SDPA keeps for its own backward, and the
        # copy cost the 8B shape 2.0 GiB in mode `none` at 8192 tokens, 42.35 GiB against 40.35
        # (H100, benchmarks/results/speed-h100-session18*.json). Under autocast, where x_wide's copy
        # is x in the compute dtype as the GEMM read it, x_wide is kept.
        k = group.in_features
        ctx.kept_wide = x.dtype != dtype
        ctx.save_for_backward(x_wide if ctx.kept_wide else x)
        # an attribute: the backward lets it go once read
        ctx.x_times_scaled_a = x_wide[:, k:] if ctx.kept_wide else x_wide[:, k:].clone()
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        group, dtype = ctx.group, ctx.dtype
        x_times_scaled_a, ctx.x_times_scaled_a = ctx.x_times_scaled_a, None
        if x_times_scaled_a is None:
            raise RuntimeError("the fused LoRA projections' backward ran twice through one graph (retain_graph=True)")
        n, k = group.out_features, group.in_features
        (kept,) = ctx.saved_tensors
        x = kept[:, :k] if ctx.kept_wide else kept.reshape(-1, k)
        # every output's gradient side by side, then the adapter columns: one input gradient GEMM
        grad_wide = torch.empty(x_times_scaled_a.shape[0], n + group.rank, dtype=dtype, device=x.device)
        for member, grad in zip(group.members, grad_outputs):
            if grad is None:
                grad_wide[:, member.rows].zero_()
            else:
                grad_wide[:, member.rows].copy_(grad.reshape(-1, member.rows.stop - member.rows.start))
        weight = _augmented(group, dtype)
        torch.mm(grad_wide[:, :n], weight.b, out=grad_wide[:, n:])
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(grad_wide, weight.backward_weight).view(ctx.input_shape).to(ctx.input_dtype)
        del weight
        adapter_grads = (_adapter_grads(group, grad_wide[:, :n], grad_wide[:, n:], x, x_times_scaled_a,
                                        needs[4:]) if any(needs[4:]) else [None] * (len(needs) - 4))
        return (grad_x, None, None, None, *adapter_grads)
