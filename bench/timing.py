"""The benchmarks' timing methods, shared so that every row of a table is timed the same way.

Three numbers per function, for JAX and torch alike:

* ``ms``: median wall clock of synchronised calls (JAX: ``block_until_ready`` after each call;
  torch: ``triton.testing.do_bench``, which times each call with CUDA events);
* ``ms_pipelined``: mean of ``iters`` calls issued back to back and synchronised once, so the host
  round trip of each call is hidden behind the GPU work of the previous ones;
* ``ms_gpu``: GPU busy time per call from the profiler (JAX: ``jax.profiler`` trace; torch:
  ``torch.profiler``): the union of the intervals of every kernel, memset and copy the calls put
  on the GPU, divided by the call count. This is what ncu or nsys would add up: neither host
  dispatch nor idle gaps between kernels count. ``kernels_us`` breaks it down by kernel name.

On the project H100 (a VM) a synchronised JAX call pays 0.1-0.3 ms of host round trip, which for a
0.5 ms kernel is a third of the number; ``ms_gpu`` is the like-for-like column across frameworks.
The profiler numbers are best effort: if a trace cannot be taken or read, the field is ``None``
and the reason is in ``gpu_error``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time
from typing import Callable, Iterable

import numpy as np


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (any unit; here µs)."""
    total, end_max = 0.0, -np.inf
    for start, end in sorted(intervals):
        if end <= end_max:
            continue
        total += end - max(start, end_max)
        end_max = end
    return total


def gpu_events_from_perfetto(trace: dict) -> list[dict]:
    """The ``X`` events of a JAX perfetto trace that ran on a GPU stream.

    Device processes are named ``/device:GPU:<n>``; their ``Stream #...`` threads hold the kernels,
    memsets and copies (the ``XLA Ops`` / ``XLA Modules`` threads repeat the same time per HLO op and
    are left out so nothing counts twice).
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids, stream_tids = set(), set()
    for e in events:
        if e.get("ph") != "M":
            continue
        name = (e.get("args") or {}).get("name", "")
        if e.get("name") == "process_name" and name.startswith("/device:GPU"):
            gpu_pids.add(e["pid"])
        elif e.get("name") == "thread_name" and name.startswith("Stream"):
            stream_tids.add((e["pid"], e["tid"]))
    return [
        e for e in events
        if e.get("ph") == "X" and e.get("pid") in gpu_pids and (e["pid"], e.get("tid")) in stream_tids
    ]


def summarize(events: list[tuple[str, float, float]], calls: int) -> dict:
    """``(name, start_us, dur_us)`` events of ``calls`` calls -> ``ms_gpu`` and per-kernel µs per call."""
    if not events:
        raise RuntimeError("the profile holds no GPU events")
    busy = union_us((s, s + d) for _, s, d in events)
    by_name = collections.defaultdict(list)
    for name, start, d in sorted(events, key=lambda e: e[1]):
        by_name[name[:80]].append(d)
    per_kernel = collections.Counter()
    for name, durs in by_name.items():
        # Kernels that share a name (Mosaic GPU's are all "anonymous_mosaic_gpu_kernel") are told
        # apart by their launch order inside a call: name#0, name#1, ...
        per_call = len(durs) // calls if len(durs) % calls == 0 else 1
        for i, d in enumerate(durs):
            per_kernel[f"{name}#{i % per_call}" if per_call > 1 else name] += d / calls
    top = dict(sorted(((k, round(v, 2)) for k, v in per_kernel.items()), key=lambda kv: -kv[1])[:12])
    return dict(ms_gpu=busy / calls / 1e3, kernels_us=top)


def jax_gpu_time(fn: Callable, *args, iters: int = 20) -> dict:
    """GPU busy ms per call of a jitted ``fn`` (already compiled), from a ``jax.profiler`` trace."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready([fn(*args) for _ in range(iters)])
        paths = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError("jax.profiler wrote no perfetto trace")
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = [(e.get("name", "?"), float(e["ts"]), float(e.get("dur", 0.0))) for e in gpu_events_from_perfetto(trace)]
    return summarize(events, iters)


def torch_gpu_time(fn: Callable, iters: int = 20) -> dict:
    """GPU busy ms per call of ``fn`` from ``torch.profiler`` (CUDA activities)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            events.append((e.name, float(e.time_range.start), float(e.time_range.end - e.time_range.start)))
    return summarize(events, iters)


def _with_gpu_time(result: dict, measure: Callable[[], dict]) -> dict:
    try:
        result.update(measure())
    except Exception as e:  # noqa: BLE001  (best effort: a missing profiler must not lose the row)
        result.update(ms_gpu=None, gpu_error=f"{type(e).__name__}: {str(e)[:200]}")
    return result


def time_jax(fn: Callable, *args, warmup: int = 2, iters: int = 20, gpu: bool = True) -> dict:
    """``ms`` (median synchronised), ``ms_pipelined`` and, with ``gpu``, ``ms_gpu`` of a jitted ``fn``."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(iters)])
    result = dict(ms=1e3 * float(np.median(times)), ms_pipelined=1e3 * (time.perf_counter() - t0) / iters)
    if gpu and jax.devices()[0].platform == "gpu":
        _with_gpu_time(result, lambda: jax_gpu_time(fn, *args, iters=iters))
    return result


def time_torch(fn: Callable, grad_to_none=None, iters: int = 20, gpu: bool = True) -> dict:
    """``ms`` (``do_bench`` median), ``ms_pipelined`` and, with ``gpu``, ``ms_gpu`` of a torch ``fn``."""
    import torch
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")

    def call():  # as do_bench does: fresh .grad each call, so no accumulation kernel is timed
        for t in grad_to_none or ():
            t.grad = None
        fn()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    torch.cuda.synchronize()
    result = dict(ms=float(ms), ms_pipelined=1e3 * (time.perf_counter() - t0) / iters)
    if gpu:
        _with_gpu_time(result, lambda: torch_gpu_time(call, iters=iters))
    return result
