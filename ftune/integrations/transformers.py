"""transformers internals that ftune relies on. Checked against transformers 5.17.0.

Router logits. A mixture-of-experts model asked for `output_router_logits` records each router's
logits with forward hooks into a collector (transformers.utils.output_capturing, a context
variable set by the model's forward) and computes the load-balancing loss from them. A layer
that the engine recomputes runs its forward without a graph, so the recorded logits would carry
no gradient and the auxiliary loss would train nothing. The engine therefore records a layer's
router logits into a collector of its own, returns them from its autograd Function (which gives
them the layer's backward) and hands those to the model's collector.
"""

from __future__ import annotations

import contextlib

from transformers.utils import output_capturing

CHECKED_VERSIONS = ("5.17.0",)
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
