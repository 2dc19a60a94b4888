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

``clocks``: the SM clock (MHz), board power (W; instantaneous where the driver reports it) and
temperature (C) that ``nvidia-smi`` sampled while the function was timed (:func:`gpu_clocks`). On the H200 one code's SPA-default fwd+bwd spanned
0.855-0.893 ms across processes (NOTES_mgpu v14); the clocks tell a slower GPU from a slower kernel.
Long rows show it: at 1x65536 cuDNN ran at 1680 MHz and 680 W, at the H200's 700 W cap (v15).
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import select
import subprocess
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


# The memory clock beside the SM clock: on one code, H200 machines at the same 1980 MHz SM clock ran
# SPA-default fwd+bwd at 0.842 and 0.863 ms (NOTES_mgpu v16), every kernel 2.5% apart.
CLOCK_FIELDS = ("sm_mhz", "mem_mhz", "power_w", "temp_c")
# Instantaneous power first: ``power.draw`` is a one-second average on Hopper drivers, which a 1 ms row
# cannot move (v15). Drivers before 535 do not know the field and exit; then the average is read.
POWER_FIELDS = ("power.draw.instant", "power.draw")


def _clock_query(power_field: str) -> str:
    return f"clocks.sm,clocks.mem,{power_field},temperature.gpu"


def summarize_clocks(lines: Iterable[str]) -> dict:
    """``nvidia-smi --query-gpu=clocks.sm,clocks.mem,<power field>,temperature.gpu --format=csv,noheader,nounits``
    lines -> sample count and mean / min / max of each field; lines that do not parse (``[N/A]``) are
    left out."""
    samples = []
    for line in lines:
        try:
            samples.append([float(x) for x in line.split(",")])
        except ValueError:
            continue
    samples = [row for row in samples if len(row) == len(CLOCK_FIELDS)]
    if not samples:
        return dict(samples=0)
    table = np.asarray(samples)
    out = dict(samples=len(samples))
    for i, name in enumerate(CLOCK_FIELDS):
        out.update({f"{name}_mean": round(float(table[:, i].mean()), 1), f"{name}_min": float(table[:, i].min()),
                    f"{name}_max": float(table[:, i].max())})
    return out


def smi_sampler_command(query: str, interval_ms: int) -> list[str]:
    """``nvidia-smi`` sampling ``query`` (no header, no units) every ``interval_ms`` on GPU 0 of this
    process: the first of ``CUDA_VISIBLE_DEVICES`` when that is set."""
    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    return ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", str(interval_ms), "-i", index]


@contextlib.contextmanager
def gpu_clocks(interval_ms: int = 20, ready_s: float = 5.0):
    """Samples GPU 0's SM and memory clocks, power and temperature with ``nvidia-smi`` while the block runs.

    Power is the instantaneous draw where the driver has it, else the one-second average
    (``power_field`` in the dict says which).

    Yields a dict that is filled on exit (:func:`summarize_clocks`), or holds ``error`` where there is
    no ``nvidia-smi`` (a CPU machine). GPU 0 is the first of ``CUDA_VISIBLE_DEVICES`` when that is set.

    The block starts only once ``nvidia-smi`` has printed its first sample (at most ``ready_s``
    seconds): its start-up takes longer than a 2x8192 timing loop, which the samples would otherwise
    miss (session 14: one or two samples per row, all at idle power). That first sample was taken
    before the block, so it is kept apart, as ``before``, not in the summary.
    """
    out: dict = {}
    for power_field in POWER_FIELDS:
        cmd = smi_sampler_command(_clock_query(power_field), interval_ms)
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            out["error"] = f"{type(e).__name__}: {e}"
            yield out
            return
        first = _first_line(proc.stdout, ready_s)
        # A field this driver lacks makes nvidia-smi exit, or print [N/A]: try the next one. A silent
        # one that is still running is kept (it may only be slow to start).
        if first is None or summarize_clocks([first])["samples"]:
            break
        stop_sampler(proc)
    else:
        out["error"] = f"nvidia-smi gave no sample of {' or '.join(POWER_FIELDS)} (last: {first.strip()!r})"
        yield out
        return
    try:
        yield out
    finally:
        out.update(summarize_clocks(stop_sampler(proc).splitlines()))
        if out["samples"]:
            out["power_field"] = power_field
        if first:
            out["before"] = first.strip()


def stop_sampler(proc: subprocess.Popen) -> str:
    """Stops a sampling ``nvidia-smi`` (killed if it does not end within 5 s) and returns what it printed to
    its pipe that was not read yet (``""`` when its output went to a file)."""
    proc.terminate()
    try:
        text, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
    return text or ""


def _first_line(stream, timeout_s: float) -> str | None:
    """The first line of a pipe; ``""`` if it closed first; ``None`` if nothing came within
    ``timeout_s`` (then the pipe is left for the caller to read)."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if ready else None


def clocks_text(clocks: dict | None) -> str:
    """``"SM 1980 MHz (min 1755), mem 3201 MHz, 612 W, 61 C"`` from a :func:`gpu_clocks` dict, ``""``
    without samples."""
    if not clocks or not clocks.get("samples"):
        return ""
    mem = f"mem {clocks['mem_mhz_mean']:.0f} MHz, " if "mem_mhz_mean" in clocks else ""  # JSON before v16 lacks it
    return (f"SM {clocks['sm_mhz_mean']:.0f} MHz (min {clocks['sm_mhz_min']:.0f}), {mem}"
            f"{clocks['power_w_mean']:.0f} W, {clocks['temp_c_max']:.0f} C")


GPU_IDENTITY = "name,uuid,pci.bus_id,vbios_version,driver_version,memory.total,clocks.max.sm,clocks.max.mem"


def gpu_identity(timeout_s: float = 20.0) -> str:
    """One line per visible GPU: ``nvidia-smi --query-gpu=`` :data:`GPU_IDENTITY`, or why there is none.

    The UUID tells two lent machines apart: tables timed on different GPUs of one kind differ by a few
    percent at equal clocks, so a result names the GPU it ran on."""
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={GPU_IDENTITY}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    return smi.stdout.strip() or smi.stderr.strip() or f"nvidia-smi exited {smi.returncode}"


def time_jax(fn: Callable, *args, warmup: int = 2, iters: int = 20, gpu: bool = True) -> dict:
    """``ms`` (median synchronised), ``ms_pipelined`` and, with ``gpu``, ``ms_gpu`` of a jitted ``fn``."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    on_gpu = gpu and jax.devices()[0].platform == "gpu"
    with gpu_clocks() if on_gpu else contextlib.nullcontext() as clocks:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(iters)])
        result = dict(ms=1e3 * float(np.median(times)), ms_pipelined=1e3 * (time.perf_counter() - t0) / iters)
        if on_gpu:
            _with_gpu_time(result, lambda: jax_gpu_time(fn, *args, iters=iters))
    if clocks is not None:
        result["clocks"] = clocks
    return result


def time_torch(fn: Callable, grad_to_none=None, iters: int = 20, gpu: bool = True) -> dict:
    """``ms`` (``do_bench`` median), ``ms_pipelined`` and, with ``gpu``, ``ms_gpu`` of a torch ``fn``."""
    import torch
    import triton.testing

    def call():  # as do_bench does: fresh .grad each call, so no accumulation kernel is timed
        for t in grad_to_none or ():
            t.grad = None
        fn()

    with gpu_clocks() as clocks:
        ms = triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
        result = dict(ms=float(ms), ms_pipelined=1e3 * (time.perf_counter() - t0) / iters)
        if gpu:
            _with_gpu_time(result, lambda: torch_gpu_time(call, iters=iters))
    result["clocks"] = clocks
    return result
