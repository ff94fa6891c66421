"""Where one training step's time goes: torch.profiler over a few steps of an ftune stack with its
kernels (ftune/measure/stacks.py, ftune/measure/step.py), per mode, the CPU-side CUDA runtime calls
(syncs, allocations) and the top GPU kernels.

  python benchmarks/profile_step.py --seq 2048 --modes true,unsloth
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ftune.measure.stacks import RunSpec, build_stack  # noqa: E402
from ftune.measure.step import forward_loss, optimizer_step, train_step  # noqa: E402


# Kernel names by what they do, first match wins: where the GPU's time goes, in a few lines.
KERNEL_KINDS = [
    ("attention", re.compile(r"flash|fmha|attention|efficient", re.I)),
    ("bf16 GEMM", re.compile(r"gemm|cutlass|sm90|nvjet|cublas|xmma|ampere_bf16|s16816", re.I)),
    ("NF4 dequantize", re.compile(r"dequant", re.I)),
    ("host copies", re.compile(r"memcpy", re.I)),
    ("triton kernels", re.compile(r"triton|_kernel$", re.I)),
    ("fills", re.compile(r"memset|fill", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|unrolled", re.I)),
]


def print_gpu_time_by_kind(prof, steps: int) -> None:
    """Per step: the time the GPU had any kernel running (the union over streams) and each
    kind's summed kernel time. Wall time well above the busy time means the host sets the pace."""
    intervals, by_kind, unnamed, by_name = [], {}, {}, {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        intervals.append((event.time_range.start, event.time_range.end))
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(event.name)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.time_range.elapsed_us()
        total, count = by_name.get(event.name[:110], (0.0, 0))
        by_name[event.name[:110]] = (total + event.time_range.elapsed_us(), count + 1)
        if kind == "other":
            unnamed[event.name[:70]] = unnamed.get(event.name[:70], 0.0) + event.time_range.elapsed_us()
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    print(f"  GPU busy {busy / 1000 / steps:8.2f} ms/step (union of kernel intervals over all streams)")
    for kind, total in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"    {kind:16s} {total / 1000 / steps:8.2f} ms/step")
    for name, total in sorted(unnamed.items(), key=lambda item: -item[1])[:6]:
        print(f"      other: {total / 1000 / steps:8.2f} ms/step  {name}")
    print("  top kernels, ms/step and launches/step:")
    for name, (total, count) in sorted(by_name.items(), key=lambda item: -item[1][0])[:30]:
        print(f"    {total / 1000 / steps:8.2f} ms  x{count // steps:5d}  {name}")


def print_phase_gaps(model, ids: torch.Tensor) -> None:
    """One forward and one backward, each profiled alone: how long the CPU took to enqueue it
    against the wall time, and the compute stream's idle time with its largest gaps (the kernels
    on either side named). Idle time with the enqueue close to the wall time means the host sets
    the pace; idle time with the enqueue well ahead means something waits (a sync, a copy)."""

    def report(name: str, prof, enqueued: float, wall: float) -> None:
        kernels = [e for e in prof.profiler.kineto_results.events()
                   if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0]
        by_stream: dict[int, list] = {}
        for event in kernels:
            by_stream.setdefault(event.device_resource_id(), []).append(event)
        totals = {s: sum(e.duration_ns() for e in events) for s, events in by_stream.items()}
        compute = max(totals, key=totals.get)
        events = sorted(by_stream[compute], key=lambda e: e.start_ns())
        gaps, reach = [], events[0].end_ns()
        for before, after in zip(events, events[1:]):
            reach = max(reach, before.end_ns())
            if after.start_ns() > reach:
                gaps.append((after.start_ns() - reach, before.name()[:60], after.name()[:60]))
        span = (events[-1].end_ns() - events[0].start_ns()) / 1e6
        print(f"  {name}: wall {wall * 1000:.1f} ms, enqueued after {enqueued * 1000:.1f} ms; compute stream "
              f"{compute}: kernels {totals[compute] / 1e6:.1f} ms over a span of {span:.1f} ms, idle "
              f"{sum(g for g, _, _ in gaps) / 1e6:.1f} ms in {len(gaps)} gaps; other streams "
              + ", ".join(f"{s}: {t / 1e6:.1f} ms" for s, t in totals.items() if s != compute))
        for gap, before, after in sorted(gaps, reverse=True)[:8]:
            print(f"    gap {gap / 1e3:8.1f} us  after {before}  before {after}")
        buckets = {}
        for gap, _, after in gaps:
            buckets[after[:40]] = buckets.get(after[:40], 0) + gap
        print("    idle before, summed: " + "; ".join(f"{k} {v / 1e6:.1f} ms" for k, v in
                                                     sorted(buckets.items(), key=lambda kv: -kv[1])[:6]))

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        loss = forward_loss(model, ids)
        enqueued = time.perf_counter() - start
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    report("forward", prof, enqueued, wall)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        loss.backward()
        enqueued = time.perf_counter() - start
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    report("backward", prof, enqueued, wall)
    for parameter in model.parameters():
        parameter.grad = None


def print_copy_sites(step, count: int = 20) -> None:
    """One step under the profiler with Python stacks: the copies (aten::copy_, which clone,
    contiguous and dtype casts run) that take the most GPU time, by call site and input shapes, so
    a copy kernel in the top kernels can be traced to the line that launches it. Copies launched on
    autograd's own thread (a recomputed layer's backward) come without Python frames."""
    torch.cuda.synchronize()
    # verbose: without it the events carry no Python frames
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True,
                 experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True)) as prof:
        step()
        torch.cuda.synchronize()
    sites = [e for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=6)
             if e.key == "aten::copy_" and e.self_device_time_total > 0]
    print("  copies by call site, ms/step and calls/step:")
    for event in sorted(sites, key=lambda e: -e.self_device_time_total)[:count]:
        print(f"    {event.self_device_time_total / 1000:8.2f} ms  x{event.count:5d}  shapes {event.input_shapes}")
        for frame in event.stack:
            print(f"        {frame}")


def print_phase_times(model, optimizer, ids: torch.Tensor, steps: int) -> None:
    """Median forward, backward and optimizer time over a few steps, each fenced by a sync: which
    half of the step a change has to shorten."""
    phases = {"forward": [], "backward": [], "optimizer": [], "forward enqueued": [], "backward enqueued": []}
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = forward_loss(model, ids)
        phases["forward enqueued"].append(time.perf_counter() - start)
        torch.cuda.synchronize()
        forward_done = time.perf_counter()
        loss.backward()
        phases["backward enqueued"].append(time.perf_counter() - forward_done)
        torch.cuda.synchronize()
        backward_done = time.perf_counter()
        optimizer_step(model, optimizer)
        torch.cuda.synchronize()
        phases["forward"].append(forward_done - start)
        phases["backward"].append(backward_done - forward_done)
        phases["optimizer"].append(time.perf_counter() - backward_done)
    print("  " + ", ".join(f"{name} {sorted(t)[len(t) // 2] * 1000:.1f} ms" for name, t in phases.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--modes", default="true,unsloth", help="activation-checkpointing modes, kernels on")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--copies", action="store_true", help="also name the call sites of the costliest copies")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles CUDA kernels: run it on a CUDA machine")
    from ftune.presets import preset_config

    vocab = preset_config(args.preset).vocab_size
    for mode in args.modes.split(","):
        label = mode
        stack = build_stack(RunSpec("ftune+k", mode), args.preset, seq=args.seq)
        model = stack.model
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        ids = torch.randint(0, vocab, (1, args.seq), device="cuda")

        def step():
            train_step(model, optimizer, ids)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        print(f"=== mode {label}: {(time.perf_counter() - start) / args.steps * 1000:.1f} ms per step (not profiled)")
        print_phase_times(model, optimizer, ids, args.steps)
        try:
            print_phase_gaps(model, ids)
        except Exception as error:  # a diagnostic: the step's figures above stand without it
            print(f"  phase gaps failed: {error!r}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.steps
        print(f"=== mode {label}: {elapsed * 1000:.1f} ms per step (profiled)", flush=True)
        events = prof.key_averages()
        runtime = [e for e in events if e.key.startswith("cuda") or "Synchronize" in e.key or "HostAlloc" in e.key]
        for e in sorted(runtime, key=lambda e: -e.cpu_time_total)[:10]:
            print(f"  cpu {e.cpu_time_total / 1000 / args.steps:8.2f} ms/step  x{e.count // args.steps:5d}  {e.key}")
        print_gpu_time_by_kind(prof, args.steps)
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
        if args.copies:
            print_copy_sites(step)
        del stack, model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
