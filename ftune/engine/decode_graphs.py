"""Decoding one token at a time as a replayed CUDA graph.

A decode step of a 4-bit 8B model with LoRA launches about 1,900 small kernels. Launched one by
one from Python they cost about 140 ms of CPU for about 15 ms of GPU work: an H200 sat idle
through 88% of a GRPO step (benchmarks/profile_grpo.py --trace,
`2026-12-02-profile-grpo-traced-before-graphs.json`). transformers would compile such steps for a
static cache, but not over bitsandbytes' 4-bit layers (its quantizer says they are not
compileable). `DecodeGraph` captures the step as it is, in a CUDA graph, on the first decode step
of each `generate` call, and replays it for every later token: the step then costs its GPU time.

What the graph holds is static: its inputs (the masks of each kind of layer among them) are
copied into fixed tensors before each replay, and the KV cache must be transformers' StaticCache
of full-size layers, which keeps its length on the GPU (`StaticLayer.cumulative_length`) and so
advances inside the graph. Sliding-window layers count their length in Python, so their caches
decode eagerly, as does any step the graph was not captured for (a prefill, a changed shape) and
a step asked for its attentions or hidden states (a replay's outputs are overwritten by the
next; transformers copies the logits it keeps).

The embedding lookup runs before the graph, eagerly: ftune's input embedding may live in host
memory, where a graph cannot read it (the rows of B tokens cross to the GPU, then the graph runs
from the embeddings)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import StaticCache, StaticLayer

from ftune.integrations.transformers import route_decode_steps

logger = logging.getLogger(__name__)


def replayable(cache: Any) -> bool:
    """Whether a decode step over `cache` can run as a CUDA graph: a StaticCache whose layers all
    keep their length on the device."""
    return isinstance(cache, StaticCache) and all(type(layer) is StaticLayer for layer in cache.layers)


class DecodeGraph:
    """The one-token forward of one `generate` call, captured on its first decode step and then
    replayed. `capture=False` runs the forward eagerly on the same static inputs instead (the CPU
    has no graphs; tests check the inputs' handling there)."""

    def __init__(self, model: nn.Module, *, capture: bool = True, failures: list[str] | None = None):
        """failures: where a step that cannot replay says why; it then runs eagerly, and
        replay_decode_steps, which shares the list, routes no later call here."""
        self.model = model
        self.failures = failures if failures is not None else []
        self.embedding = model.get_input_embeddings()
        self.capture = capture
        self.signature: tuple | None = None
        self.static: dict[str, Any] = {}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Any = None
        self.recordings = 0  # inputs recorded into static ones: graphs captured, where capture is on

    def __call__(self, **inputs: Any) -> Any:
        input_ids = inputs.get("input_ids")
        if (input_ids is None or input_ids.shape[-1] != 1 or inputs.get("inputs_embeds") is not None
                or not replayable(inputs.get("past_key_values"))
                # what a replay returns is overwritten by the next one: only the logits, which
                # transformers copies at every step, may come out of it
                or inputs.get("output_attentions") or inputs.get("output_hidden_states")):
            return self.model(**inputs)
        inputs = dict(inputs)
        inputs["inputs_embeds"] = self.embedding(inputs.pop("input_ids"))
        signature = _signature(inputs)
        if signature is None:
            if self.capture:
                self._fail("a decode step's inputs hold a list or a tuple, which a graph cannot take as it is")
            return self.model(**inputs)
        if signature != self.signature:
            self._record(inputs, signature)
        else:
            _copy_into(self.static, inputs)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.output = self.model(**self.static)
        return self.output

    def _fail(self, reason: str) -> None:
        """Decode eagerly from now on, in this call and later ones, and say why once."""
        if not self.failures:
            logger.warning("decoding without CUDA graphs: %s", reason)
        self.failures.append(reason)
        self.capture = False

    def _record(self, inputs: dict[str, Any], signature: tuple) -> None:
        self.graph, self.output = None, None
        self.static = _clone(inputs)
        self.signature = signature
        self.recordings += 1
        if not self.capture:
            return
        cache = inputs["past_key_values"]
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]
        # One eager step on a side stream first: lazy initializations, Triton's compiles and
        # autotuning, cuBLAS's workspaces happen outside the capture. It writes this token's keys
        # and values where the replay writes them again; the cache's lengths are put back.
        current, side = torch.cuda.current_stream(), side_stream(self.model.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.model(**self.static)
        current.wait_stream(side)
        for layer, length in zip(cache.layers, lengths):
            layer.cumulative_length.copy_(length)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the live panel's thread may ask the allocator for its figures meanwhile
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.output = self.model(**self.static)
        except RuntimeError as error:  # an op that cannot be captured: this model decodes eagerly
            self._fail(f"capturing a decode step failed ({error})")
            self.output = None
            for layer, length in zip(cache.layers, lengths):
                layer.cumulative_length.copy_(length)
            return
        self.graph = graph


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream that warms up and captures every decode graph on `device`. cuBLAS keeps a
    workspace (32 MiB on an H200) for every stream it has run on, for the life of the process: a
    stream per `generate` call would add that much memory at every GRPO step."""
    return torch.cuda.Stream(device)


def _signature(value: Any) -> tuple | None:
    """What a graph captured for `value` (the step's inputs) is fixed to: tensors' shapes, dtypes,
    devices and strides; a dict's items (the masks of each kind of layer, where a config names
    its layers' types); other objects by identity (the cache); plain values as they are. None
    where a list or a tuple holds an input."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.stride())
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    if isinstance(value, dict):
        items = [(key, _signature(item)) for key, item in sorted(value.items())]
        return None if any(part is None for _, part in items) else ("dict", tuple(items))
    if isinstance(value, (list, tuple)):
        return None
    return ("object", id(value))


def _clone(value: Any) -> Any:
    """Static copies of the tensors in `value` (in a dict too); other objects as they are."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    return value


def _copy_into(static: Any, value: Any) -> None:
    """Copy the tensors of `value` into their static copies (same structure: same signature)."""
    if isinstance(value, torch.Tensor):
        static.copy_(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _copy_into(static[key], item)


def captures_on(model: nn.Module) -> bool:
    """Whether CUDA graphs can be captured where `model` is."""
    return model.device.type == "cuda"


def replay_decode_steps(model: nn.Module, *, capture: bool = True) -> None:
    """Make `model.generate` (a causal LM, or a PEFT model around one) decode through a DecodeGraph
    wherever its cache is replayable: a new graph for each call, dropped as the call returns."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model

    def accepts(model_kwargs: dict) -> bool:
        return ((not capture or captures_on(base)) and not failures
                and replayable(model_kwargs.get("past_key_values")))

    failures: list[str] = []
    route_decode_steps(base, accepts=accepts, step=lambda: DecodeGraph(base, capture=capture, failures=failures))
