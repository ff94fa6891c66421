"""Guards that keep a long run from being lost: stop cleanly on a signal, stop on a loss that
stays NaN/inf, give the evaluation's cached GPU memory back, and turn an out-of-memory into a
message that says what would fit."""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import replace

import psutil

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ftune.errors import OutOfMemory
from ftune.memory.estimate import estimate
from ftune.memory.monitor import format_bytes
from ftune.model_config import model_config
from ftune.plan import assumed_device, resolve


class GracefulStop(TrainerCallback):
    """On SIGINT or SIGTERM: finish the current step, save a checkpoint, stop.

    A second Ctrl-C while the step finishes interrupts at once (the last checkpoint stays).
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame):
        if self.signal_number is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal_number = number

    def on_step_end(self, args, state, control, **kwargs):
        self.signal_number = _agreed_signal(self.signal_number)
        if self.signal_number is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def _agreed_signal(received: int | None) -> int | None:
    """Under several processes, the signal any rank received, so that all stop after the same step.

    The checkpoint is written by all ranks together (checkpoints.py): a rank that stopped to save
    alone would wait for the others, which went on to the next step's gradient all-reduce. One
    all-reduce of one number per optimizer step.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return received
    on_gpu = dist.get_backend() == "nccl"
    flag = torch.tensor([received or 0], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


class EvaluationCacheReturned(TrainerCallback):
    """Empty PyTorch's CUDA cache after each evaluation. The evaluation's forward (no graph, the
    MLP in chunks) asks for other sizes than a training step, and the blocks it leaves cached are
    split by the next steps' tensors: reserved memory that a 24 GB card cannot spare, while the
    allocated peak stays the training step's (docs/benchmarks.md, "Evaluation's peak", has the
    H200's reserved figures with and without it)."""

    def on_evaluate(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class NonFiniteLossGuard(TrainerCallback):
    """Stop after `patience` consecutive logged losses that are NaN or infinite.

    A checkpoint is never saved at such a step, so the last checkpoint is the last good one.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.bad_in_a_row = 0
        self.stopped_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None or self.patience <= 0:
            return control
        if math.isfinite(loss):
            self.bad_in_a_row = 0
            return control
        self.bad_in_a_row += 1
        control.should_save = False
        if self.bad_in_a_row >= self.patience:
            self.stopped_at = state.global_step
            control.should_training_stop = True
        return control


def out_of_memory(recipe, step: int, device: torch.device, output_dir) -> OutOfMemory:
    """The message for a CUDA out-of-memory: where, how much, what the memory model predicts, and
    the change that the memory model says fits the card (in the order that costs least speed)."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    training, mode = recipe.training, recipe.checkpointing.mode
    candidates = []
    if mode in ("none", "true"):
        candidates.append(("checkpointing.mode: unsloth (layer inputs in host memory)", {"mode": "unsloth"}))
    if training.batch_size > 1:
        candidates.append((f"training.batch_size: {training.batch_size // 2} with training.grad_accum: "
                           f"{training.grad_accum * 2} (the same effective batch)", {"batch": training.batch_size // 2}))
    candidates.append((f"data.max_length: {recipe.data.max_length // 2}", {"seq": recipe.data.max_length // 2}))
    predicted, change = None, candidates[0][0]
    try:
        config = model_config(recipe)

        def estimated_peak(mode: str, **sizes: int) -> int:
            plan = resolve(recipe, assumed_device(), mode="unsloth" if mode == "smart" else mode, config=config)
            return estimate(plan.shape, replace(plan.setting, **sizes)).peak

        predicted = estimated_peak(mode)
        if total is not None:
            for text, overrides in candidates:
                if estimated_peak(**{"mode": mode, **overrides}) <= total * 0.95:
                    change = text
                    break
    except Exception:  # the advice must not fail where the estimate cannot be made (no config offline)
        pass
    where = f" (peak {format_bytes(peak)} of {format_bytes(total)})" if peak is not None else ""
    estimated = f" estimate-vram predicts {format_bytes(predicted)} for this recipe." if predicted else ""
    return OutOfMemory(
        f"The GPU ran out of memory at step {step}{where}, with checkpointing.mode {mode}, batch "
        f"{training.batch_size} and max_length {recipe.data.max_length};{estimated} Checkpoints already saved "
        f"in {output_dir} are intact.",
        hint=f"Change most likely to fit: {change}. `ftune estimate-vram RECIPE --vram SIZE` shows what each "
        "setting needs. Rerunning the same command resumes from the last checkpoint.",
    )


def host_memory_shortfall(recipe, cuda: bool) -> str | None:
    """Before training: a warning if the offloaded layer inputs would not fit in host RAM.

    The engine falls back by itself (inputs that find no host room stay on the GPU), so this is
    a warning, not an error: it says so before the first step instead of during it.
    """
    if recipe.checkpointing.mode not in ("unsloth", "smart"):
        return None
    try:
        # what must fit; the attention halves that layers park beside their inputs are optional
        plan = resolve(recipe, assumed_device(cpu=not cuda), mode="unsloth", config=model_config(recipe))
        needed = estimate(plan.shape, plan.setting).required_host
    except Exception:
        return None
    available = psutil.virtual_memory().available
    if needed <= available * 0.9:
        return None
    if not cuda:  # on CPU the "host" buffers are the same memory that every mode keeps its layer inputs in
        return (f"memory is short: the layer inputs alone need about {format_bytes(needed)} of RAM, "
                f"{format_bytes(available)} is available, and on CPU every checkpointing mode keeps them in it; "
                "lower data.max_length or training.batch_size (with more training.grad_accum).")
    return (f"host memory is short for offload: the layer inputs need about {format_bytes(needed)} of host RAM, "
            f"{format_bytes(available)} is available. Inputs that do not fit stay on the GPU (as mode true); "
            "free host memory, lower data.max_length, or set checkpointing.mode: true.")
