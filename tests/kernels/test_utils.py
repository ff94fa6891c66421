"""ftune/kernels/utils.py: compiled_with_variants against dynamo's recompile limit."""

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from ftune.kernels.utils import compiled_with_variants

KINDS = 12  # tensors of 12 ranks: a guard dynamo never relaxes into a dynamic one


def doubled(x):
    return x * 2


def _compiled_kinds(function, ranks=range(1, KINDS + 1)) -> int:
    """Calls `function` on a tensor of each rank; how many compiled variants dynamo made for them."""
    before = counters["stats"]["unique_graphs"]
    for rank in ranks:
        assert torch.equal(function(torch.ones([1] * rank)), torch.full([1] * rank, 2.0))
    return counters["stats"]["unique_graphs"] - before


def test_compiles_past_dynamos_recompile_limit():
    """The raised limit takes effect where dynamo reads it: 12 kinds of call get 12 compiled
    variants, where a plain torch.compile stops at the process's limit and runs the rest uncompiled;
    the process's limit is as it was between calls."""
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    assert limit < KINDS
    ours = compiled_with_variants(doubled, 16, backend="eager")
    assert _compiled_kinds(ours) == KINDS
    assert len(_debug_get_cache_entry_list(ours.compiled_code)) == KINDS  # kept on the copy's code
    assert torch._dynamo.config.recompile_limit == limit
    assert _compiled_kinds(torch.compile(doubled, backend="eager")) == limit


def test_other_compiles_of_the_function_leave_its_count_alone():
    """Dynamo keeps variants, and stops compiling for good, per code object: a plain compile of the
    same function that hits the limit first, before and in between, leaves ours compiling."""
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    ours = compiled_with_variants(doubled, 16, backend="eager")
    plain = torch.compile(doubled, backend="eager")
    assert _compiled_kinds(plain) == limit
    assert _compiled_kinds(ours, range(1, KINDS // 2 + 1)) == KINDS // 2
    assert _compiled_kinds(plain, range(KINDS + 1, KINDS + 3)) == 0  # the plain one runs uncompiled
    assert _compiled_kinds(ours, range(KINDS // 2 + 1, KINDS + 1)) == KINDS - KINDS // 2
