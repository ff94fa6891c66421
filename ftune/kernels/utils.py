"""What the kernels share: where Triton can run, how wide a block to launch, and how many variants
of a compiled op dynamo keeps."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
import triton

# `triton.jit` decides when a kernel is defined whether it will be compiled or run by the
# interpreter (TRITON_INTERPRET=1), so the switch is read once, at import, like the kernels read it.
INTERPRET: bool = triton.knobs.runtime.interpret


def _fix_interpreter_scalar_index() -> None:
    """Let the interpreter use a runtime integer as a loop bound under numpy >= 2.4.

    Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into Python ints
    with `int(array)`, which numpy 2.4 refuses, so `for i in range(0, n)` fails when `n` is an
    argument. This installs the upstream fix (triton-lang/triton#9171, fixed by #9172 after 3.6).
    It touches nothing unless TRITON_INTERPRET=1, which only tests set.
    """
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if INTERPRET:
    _fix_interpreter_scalar_index()

# A row wider than this is not held in one block (registers spill long before); the kernels that
# could meet wider rows (the vocabulary) loop over blocks instead.
MAX_FUSED_SIZE = 65536


def runs_triton(device: torch.device) -> bool:
    """Whether our kernels can run on tensors of `device`: CUDA, or CPU under the interpreter."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def check_device(*tensors: torch.Tensor) -> None:
    """Fail with a clear message, not a Triton error deep in a launch, on a device we can't run on.

    There is deliberately no silent PyTorch fallback: a kernel that quietly turned into the eager
    code would make a run slower and hungrier than the user asked for without saying so. Callers
    (`apply_kernels`, the recipe) turn the kernels off on CPU instead.
    """
    for tensor in tensors:
        if not runs_triton(tensor.device):
            raise RuntimeError(
                f"ftune's Triton kernels run on CUDA tensors, or on CPU under TRITON_INTERPRET=1 (for tests: it "
                f"must be set before ftune.kernels is imported); got a tensor on {tensor.device}. Turn the "
                f"kernels off for this device."
            )


def num_warps_for(block_size: int) -> int:
    """Liger-Kernel's calculate_settings: more warps as the block grows, so that each thread holds
    at most 8-16 elements and a 4096-wide bf16 row stays in registers."""
    if block_size >= 32768:
        return 32
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4


def block_settings(n_cols: int) -> tuple[int, int]:
    """BLOCK_SIZE and num_warps for a kernel that holds a whole row of `n_cols` in one block."""
    block_size = triton.next_power_of_2(n_cols)
    if block_size > MAX_FUSED_SIZE:
        raise ValueError(f"a row of {n_cols} elements is wider than one block can hold ({MAX_FUSED_SIZE})")
    return block_size, num_warps_for(block_size)


def num_programs(device: torch.device) -> int:
    """How many persistent programs a kernel that reduces across rows should launch."""
    if device.type == "cuda":
        # Four per SM: one program of a few warps per SM leaves the memory latency exposed
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter runs programs one after the other; a few are enough to exercise the
    # cross-program reduction in tests.
    return 4


def compiled_with_variants(function: Callable, variants: int, **compile_options) -> Callable:
    """`torch.compile(function, **compile_options)` that keeps up to `variants` compiled variants
    (or the caller's limit, if higher) before a new kind of call would run uncompiled.

    Dynamo compiles one variant per set of guards a call meets (grad mode, dtypes, ranks, the
    constants it reads), keeps them on the function's code object, and past
    `torch._dynamo.config.recompile_limit` (8) runs every new kind of call uncompiled, for good:
    once hit, the code object runs uncompiled whatever the limit later reads. So this compiles a
    copy of `function` with a code object of its own (`compiled_code` on the returned function:
    what other compiles of `function` in the process do leaves its count alone) and raises the
    limit during its calls, where dynamo reads it. torch 2.13's torch.compile does both itself
    (`isolate_recompiles`, `recompile_limit`); this also serves torch 2.11, the GPU image's. Checked
    against torch 2.13 and 2.11."""
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = function.__kwdefaults__, function.__qualname__, function.__doc__
    compiled = torch.compile(copy, **compile_options)
    config = torch._dynamo.config

    @functools.wraps(function)
    def call(*args, **kwargs):
        # set and restored by hand: a quarter of what config.patch costs (11 us against 43 on a 2-core CPU)
        limit = config.recompile_limit
        config.recompile_limit = max(variants, limit)
        try:
            return compiled(*args, **kwargs)
        finally:
            config.recompile_limit = limit

    call.compiled_code = copy.__code__
    return call
