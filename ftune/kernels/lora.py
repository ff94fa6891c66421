"""LoRA over 4-bit bases with the adapters inside the base GEMMs: the gated MLP in three GEMMs,
a group of projections that read one input (q, k and v; o alone) in one per output and one for
their input gradient.

peft runs an adapted projection as the base GEMM and the adapter's two thin ones, and autograd
sums the two input gradients. Those thin GEMMs and sums are passes over whole projection outputs
and inputs: in a profile of an `unsloth` step of the 8B shape at 8192 tokens on an H200 they are
24 ms of elementwise adds and 35 ms of rank-16 GEMMs of an 800 ms step.

Here each group (gate and up; q, k and v; down or o alone) is one 16-bit matrix, made wherever
the 4-bit weights are dequantized:

             K       R
        N [  W    |  B  ]     W: the group's base weights stacked (gate over up, q over k over v)
        R [  s A  |  0  ]     B: each adapter's B in its own R columns (block diagonal); A scaled by s

    forward    y  = [x | x (sA)^T] @ [W | B]^T      the adapter's product is R more input columns
    backward   dx = [dy | dy B] @ [W ; sA]          its gradient R more output-gradient columns

one GEMM each way over K + R (or N + R) instead of K (or N), R = 32 for gate and up at rank 16:
0.8% more arithmetic and no other pass over the outputs. The adapters' gradients read the extra
columns: dB = dy^T (x (sA)^T) and dA = s (dy B)^T x. In the MLP the gated activation reads gate
and up where the GEMM wrote them, side by side in one buffer, and its backward writes their
gradients over them, beside the columns the R extra ones go to.

Rounding: the base product and the adapter's are summed in the GEMM's fp32 accumulator and
rounded once, where peft rounds the adapter's product, its scaled copy and the sum.

Two options come from the caller, never from module state:
  held           a dict in which each group's matrix is made once and reused until the caller
                 drops it (a recomputed layer's MLP chunks, or its recompute and backward);
  output_unread  the group's output is only differentiated, never read: the forward's GEMM is
                 skipped and an uninitialized tensor of the output's shape stands in for it.

Which projections qualify (peft LoRA layers over bitsandbytes 4-bit weights, one plain adapter,
inputs long enough that bitsandbytes would dequantize the weights anyway) is decided by
ftune/integrations/peft.py; this module holds only the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftune.kernels.swiglu import swiglu_backward, swiglu_forward

# The rank columns padded with zeros to a multiple of this: rows of whole 16-byte vectors of
# 16-bit values, which cuBLAS wants for its fastest kernels
RANK_ALIGNMENT = 8


@dataclass(frozen=True)
class AdaptedProjection:
    """One adapted projection: its frozen bitsandbytes 4-bit base layer (read at each use, so that
    a weight FSDP gathers anew is seen) and its adapter's A, B and scaling."""

    base: nn.Module
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class _Member:
    projection: AdaptedProjection
    rows: slice
    ranks: slice


class ProjectionGroup:
    """Projections that read one input, their outputs side by side (gate and up; q, k and v)."""

    def __init__(self, projections: list[AdaptedProjection]):
        members, rows, ranks = [], 0, 0
        for projection in projections:
            out_features = projection.base.weight.quant_state.shape[0]
            rank = projection.lora_a.shape[0]
            members.append(_Member(projection, slice(rows, rows + out_features), slice(ranks, ranks + rank)))
            rows, ranks = rows + out_features, ranks + rank
        self.members = members
        # the adapters' A and B in the order the Functions take them and return their gradients
        self.weights = [w for m in members for w in (m.projection.lora_a, m.projection.lora_b)]
        self.out_features = rows
        self.in_features = projections[0].base.weight.quant_state.shape[1]
        self.rank = -(-ranks // RANK_ALIGNMENT) * RANK_ALIGNMENT


def dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit weight dequantized whole, in `dtype`, as its own backward makes it."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.view(-1, 1), weight.quant_state).to(dtype)


class AugmentedWeight:
    """A group's base weights dequantized and its adapters beside them, in one (N + R) x (K + R) matrix."""

    def __init__(self, group: ProjectionGroup, dtype: torch.dtype):
        n, k, r = group.out_features, group.in_features, group.rank
        self.n, self.k, self.r = n, k, r
        device = group.members[0].projection.lora_a.device
        self.matrix = matrix = torch.empty(n + r, k + r, dtype=dtype, device=device)
        matrix[:n, k:].zero_()
        matrix[n:, k:].zero_()
        with torch.no_grad():  # the adapters are copied fresh each time: an optimizer step changes them
            for member in group.members:
                projection = member.projection
                # bitsandbytes' dequantization, then a copy into the matrix's rows (K + R apart): on
                # an H100 the copy costs 0.08 ms for the 8B shape's gate weight, where a Triton
                # kernel writing straight into the rows took 1.14 ms
                matrix[member.rows, :k].copy_(dequantized(projection.base.weight, dtype))
                matrix[member.rows, k + member.ranks.start: k + member.ranks.stop].copy_(projection.lora_b)
                torch.mul(projection.lora_a, projection.scaling,
                          out=matrix[n + member.ranks.start: n + member.ranks.stop, :k])
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


def _augmented(group: ProjectionGroup, dtype: torch.dtype, held: dict | None) -> AugmentedWeight:
    """The group's matrix: made once per `held` dict, else at each call."""
    if held is None:
        return AugmentedWeight(group, dtype)
    key = (group, dtype)
    if key not in held:
        held[key] = AugmentedWeight(group, dtype)
    return held[key]


def _with_product(t: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[t | t @ matrix] in `dtype`: an input with its adapter columns, [x | x (sA)^T], or an output
    gradient with its, [dy | dy B]."""
    wide = torch.empty(t.shape[0], t.shape[1] + matrix.shape[1], dtype=dtype, device=t.device)
    wide[:, : t.shape[1]].copy_(t)
    torch.mm(wide[:, : t.shape[1]], matrix, out=wide[:, t.shape[1]:])
    return wide


def _adapter_grads(group: ProjectionGroup, grad: torch.Tensor, grad_times_b: torch.Tensor, x: torch.Tensor,
                   x_times_scaled_a: torch.Tensor, needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
    """Each member's (dA, dB): dB = dy^T (x (sA)^T), dA = s (dy B)^T x, from one GEMM each for the
    group (its blocks off the diagonal are the products of other members' columns, unread)."""
    all_b = grad.t() @ x_times_scaled_a if any(needs[1::2]) else None  # N x R
    all_a = grad_times_b.t() @ x if any(needs[0::2]) else None  # R x K
    grads = []
    for index, member in enumerate(group.members):
        projection = member.projection
        grad_a = grad_b = None
        if needs[2 * index]:
            grad_a = (all_a[member.ranks].float() * projection.scaling).to(projection.lora_a.dtype)
        if needs[2 * index + 1]:
            grad_b = all_b[member.rows, member.ranks].to(projection.lora_b.dtype)
        grads += [grad_a, grad_b]
    return grads


# ----------------------------------------------------------------------------------------------
# The gated MLP: down(act(gate(x)) * up(x)), act silu (SwiGLU) or tanh-GELU (GeGLU)


@dataclass(frozen=True)
class MLPGroups:
    gate_up: ProjectionGroup
    down: ProjectionGroup
    activation: str = "silu"  # ftune/kernels/swiglu.py ACTIVATIONS


def lora_mlp(x: torch.Tensor, groups: MLPGroups, dtype: torch.dtype, *, held: dict | None = None,
             output_unread: bool = False) -> torch.Tensor:
    """`down(act(gate(x)) * up(x))` with every adapter, through the augmented matrices, computed in `dtype`."""
    weights = groups.gate_up.weights + groups.down.weights
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return _LoRAMLP.apply(x, groups, dtype, held, output_unread, *weights)
    return _mlp_forward(x, groups, dtype, held, output_unread, for_backward=False)[0]


def _mlp_forward(x: torch.Tensor, groups: MLPGroups, dtype: torch.dtype, held: dict | None, output_unread: bool,
                 for_backward: bool = True):
    """The MLP's output and what its backward reads: the input with its adapter columns, gate and
    up side by side (room for their gradients' adapter columns), the gated product with its own.
    Without `for_backward` the first two are None, and the product is written over gate."""
    gate_up, down = groups.gate_up, groups.down
    k, n = gate_up.in_features, down.in_features
    weight = _augmented(gate_up, dtype, held)
    # Without a graph, with the matrices held through the chunks, the down matrix is made first,
    # before gate and up exist: made after them, beside the gate-up matrix, it raises the 8B
    # shape's forward peak at 8192 tokens by 0.08 GiB
    down_weight = _augmented(down, dtype, held) if not for_backward and held is not None else None
    x_wide = _with_product(x.reshape(-1, k), weight.scaled_a.t(), dtype)
    tokens = x_wide.shape[0]
    gate_up_out = torch.empty(tokens, 2 * n + gate_up.rank, dtype=dtype, device=x.device)
    torch.mm(x_wide, weight.forward_weight.t(), out=gate_up_out[:, : 2 * n])
    del weight  # (not held) the next matrix is made only after this one is freed
    gate, up = gate_up_out[:, :n], gate_up_out[:, n: 2 * n]
    if not for_backward and down.rank <= n + gate_up.rank:
        # Nothing reads the widened input, gate or up again: the product goes over gate (each
        # element read before it is written, by the same thread) and its adapter columns over
        # up's first ones. Beside the held matrices (339 MiB for the 8B shape) a product of its
        # own raises the forward peak at 8192 tokens by 0.11 GiB
        x_wide = None
        swiglu_forward(gate, up, out=gate, activation=groups.activation)
        product, gate_up_out = gate_up_out[:, : n + down.rank], None
    else:
        product = torch.empty(tokens, n + down.rank, dtype=dtype, device=x.device)
        swiglu_forward(gate, up, out=product[:, :n], activation=groups.activation)
        if not for_backward:
            x_wide = gate_up_out = None
    weight = _augmented(down, dtype, held) if down_weight is None else down_weight
    torch.mm(product[:, :n], weight.scaled_a.t(), out=product[:, n:])
    # outputs made in their own shape, not as views, so that a caller may modify them in place
    y = torch.empty((*x.shape[:-1], down.out_features), dtype=dtype, device=x.device)
    if not output_unread:
        torch.mm(product, weight.forward_weight.t(), out=y.view(-1, down.out_features))
    return y, x_wide, gate_up_out, product


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups: MLPGroups, dtype: torch.dtype, held: dict | None, output_unread: bool,
                *adapter_weights):
        y, x_wide, gate_up_out, product = _mlp_forward(x, groups, dtype, held, output_unread)
        ctx.groups, ctx.dtype, ctx.held = groups, dtype, held
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        # attributes, not saved tensors: the backward lets each go as soon as it is read
        ctx.x_wide, ctx.gate_up_out, ctx.product = x_wide, gate_up_out, product
        return y

    @staticmethod
    def backward(ctx, grad_output):
        groups, dtype, held = ctx.groups, ctx.dtype, ctx.held
        gate_up, down = groups.gate_up, groups.down
        k, n = gate_up.in_features, down.in_features
        needs = ctx.needs_input_grad
        first_weight = 5  # x, groups, dtype, held, output_unread, then the adapters' A and B
        x_wide, gate_up_out, product = ctx.x_wide, ctx.gate_up_out, ctx.product
        ctx.x_wide = ctx.gate_up_out = ctx.product = None  # a second backward finds nothing
        if x_wide is None:
            raise RuntimeError("the fused LoRA MLP's backward ran twice through one graph (retain_graph=True)")
        grad = grad_output.reshape(-1, down.out_features).to(dtype)
        grads_wanted = any(needs[first_weight:])
        gate_up_needs = needs[first_weight: first_weight + 4]
        down_needs = needs[first_weight + 4:]

        # down: its input gradient through [dy | dy B] @ [W ; sA]
        weight = _augmented(down, dtype, held)
        grad_wide = _with_product(grad, weight.b, dtype)
        grad_product = torch.mm(grad_wide, weight.backward_weight)
        del weight
        down_grads = _adapter_grads(down, grad, grad_wide[:, down.out_features:], product[:, :n],
                                    product[:, n:], down_needs) if grads_wanted else [None, None]
        del grad_wide, product

        # the gated product: gate's and up's gradients written over them, then the extra columns of both
        swiglu_backward(grad_product, gate_up_out[:, :n], gate_up_out[:, n: 2 * n], overwrite_inputs=True,
                        activation=groups.activation)
        del grad_product
        weight = _augmented(gate_up, dtype, held)
        grad_gate_up = gate_up_out[:, : 2 * n]
        torch.mm(grad_gate_up, weight.b, out=gate_up_out[:, 2 * n:])
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(gate_up_out, weight.backward_weight).view(ctx.input_shape).to(ctx.input_dtype)
        del weight
        gate_up_grads = _adapter_grads(gate_up, grad_gate_up, gate_up_out[:, 2 * n:], x_wide[:, :k], x_wide[:, k:],
                                       gate_up_needs) if grads_wanted else [None] * 4
        return (grad_x, None, None, None, None, *gate_up_grads, *down_grads)


# ----------------------------------------------------------------------------------------------
# A group of projections that read one input (q, k and v; o alone)


def lora_projections(x: torch.Tensor, group: ProjectionGroup, dtype: torch.dtype, *, held: dict | None = None,
                     output_unread: bool = False) -> tuple[torch.Tensor, ...]:
    """Each member's `base(x) + s (x A^T) B^T` (the base's frozen bias added in the GEMM, as
    bitsandbytes adds it), computed in `dtype` through the group's augmented matrix."""
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in group.weights)):
        return _LoRAProjections.apply(x, group, dtype, held, output_unread, *group.weights)
    return _project(x, group, dtype, held, output_unread)[0]


def _project(x: torch.Tensor, group: ProjectionGroup, dtype: torch.dtype, held: dict | None, output_unread: bool):
    """Each member's output, and the input with its adapter columns (the backward reads both parts)."""
    weight = _augmented(group, dtype, held)
    x_wide = _with_product(x.reshape(-1, group.in_features), weight.scaled_a.t(), dtype)
    outputs = []
    for member in group.members:
        width = member.rows.stop - member.rows.start
        # made in its own shape, not as a view, so that a caller may modify it in place
        output = torch.empty((*x.shape[:-1], width), dtype=dtype, device=x.device)
        if not output_unread:
            member_weight = weight.forward_weight[member.rows].t()
            bias = member.projection.base.bias
            if bias is None:
                torch.mm(x_wide, member_weight, out=output.view(-1, width))
            else:
                torch.addmm(bias.to(dtype), x_wide, member_weight, out=output.view(-1, width))
        outputs.append(output)
    return tuple(outputs), x_wide


class _LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group: ProjectionGroup, dtype: torch.dtype, held: dict | None, output_unread: bool,
                *adapter_weights):
        outputs, x_wide = _project(x, group, dtype, held, output_unread)
        ctx.set_materialize_grads(False)  # an output nothing read has no gradient: its columns are zeroed
        ctx.group, ctx.dtype, ctx.held = group, dtype, held
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        # The backward reads x and its adapter columns. It keeps x itself rather than x_wide's copy
        # of it: o's input is attention's output, which SDPA keeps for its own backward, and the
        # copy costs the 8B shape 2.0 GiB in mode `none` at 8192 tokens. Under autocast, where
        # x_wide's copy is x in the compute dtype as the GEMM read it, x_wide is kept.
        k = group.in_features
        ctx.kept_wide = x.dtype != dtype
        ctx.save_for_backward(x_wide if ctx.kept_wide else x)
        # an attribute: the backward lets it go once read
        ctx.x_times_scaled_a = x_wide[:, k:] if ctx.kept_wide else x_wide[:, k:].clone()
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        group, dtype, held = ctx.group, ctx.dtype, ctx.held
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
        weight = _augmented(group, dtype, held)
        torch.mm(grad_wide[:, :n], weight.b, out=grad_wide[:, n:])
        needs = ctx.needs_input_grad
        first_weight = 5
        grad_x = None
        if needs[0]:
            grad_x = torch.mm(grad_wide, weight.backward_weight).view(ctx.input_shape).to(ctx.input_dtype)
        del weight
        adapter_needs = needs[first_weight:]
        adapter_grads = (_adapter_grads(group, grad_wide[:, :n], grad_wide[:, n:], x, x_times_scaled_a, adapter_needs)
                         if any(adapter_needs) else [None] * len(adapter_needs))
        return (grad_x, None, None, None, None, *adapter_grads)
