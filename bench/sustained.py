"""Sustained fwd+bwd throughput: each kernel runs back to back for a few seconds, under the GPU's power cap.

``bench/kernels.py`` times 20 calls: a burst that ends before the power controller reacts. A training
run keeps the GPU busy, and on the H200 that changes the picture (NOTES_mgpu v16, 2x8192): our kernels
draw up to the 700 W cap and drop to 1710-1775 MHz, while FlexAttention stays at 1980 MHz and about
620 W. So each row here is the wall clock per call over ``--seconds`` of calls issued in batches of 20,
with ``nvidia-smi`` sampling the SM clock, instantaneous power and the active throttle reasons
(``clocks_event_reasons.active``) every 20 ms. Only the samples above ``--busy-watts`` count, so
the idle lead-in and the tail are left out.

    # On the GPU machine (repo root); JSON and a markdown table land in --out.
    PYTHONPATH=$PWD python bench/sustained.py --shapes 2x8192 --impls pallas_mosaic_gpu,flex --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import gpu_identity, smi_sampler_command, stop_sampler  # noqa: E402


def _load_kernels_bench():
    """bench/kernels.py (its jitted functions, inputs and Flex build), under a name that cannot shadow
    HF's ``kernels`` package, which transformers imports."""
    spec = importlib.util.spec_from_file_location("spattn_bench_kernels", Path(__file__).resolve().parent / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module


kb = _load_kernels_bench()

LOAD_QUERY = "clocks.sm,power.draw.instant,clocks_event_reasons.active"
NO_REASON = 0


def summarize_load(lines: Iterable[str], busy_watts: float) -> dict:
    """``nvidia-smi --query-gpu=`` :data:`LOAD_QUERY` ``--format=csv,noheader,nounits`` lines -> the
    samples above ``busy_watts``: their count, mean SM MHz and W, the share with any throttle reason
    set, and the reasons seen (hex bit masks, as ``nvidia-smi`` prints them)."""
    busy = []
    for line in lines:
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            mhz, watts, reasons = float(parts[0]), float(parts[1]), int(parts[2], 16)
        except ValueError:
            continue
        if watts > busy_watts:
            busy.append((mhz, watts, reasons))
    if not busy:
        return dict(samples=0)
    table = np.asarray(busy, dtype=np.float64)
    return dict(
        samples=len(busy),
        sm_mhz_mean=round(float(table[:, 0].mean()), 1),
        sm_mhz_min=float(table[:, 0].min()),
        power_w_mean=round(float(table[:, 1].mean()), 1),
        throttled_share=round(float(np.mean([r != NO_REASON for _, _, r in busy])), 3),
        reasons=sorted({f"0x{r:016x}" for _, _, r in busy if r != NO_REASON}),
    )


@contextlib.contextmanager
def load_samples(busy_watts: float, interval_ms: int = 20):
    """Samples :data:`LOAD_QUERY` on this process's GPU 0 while the block runs; yields a dict filled on exit
    (:func:`summarize_load`), or holding ``error`` where there is no ``nvidia-smi``."""
    out: dict = {}
    with tempfile.TemporaryFile("w+") as log:
        try:
            proc = subprocess.Popen(smi_sampler_command(LOAD_QUERY, interval_ms), stdout=log, stderr=subprocess.STDOUT,
                                    text=True)
        except OSError as e:
            out["error"] = f"{type(e).__name__}: {e}"
            yield out
            return
        try:
            yield out
        finally:
            stop_sampler(proc)
            log.seek(0)
            out.update(summarize_load(log, busy_watts))


def sustained(step: Callable[[int], None], sync: Callable[[], None], seconds: float, batch: int = 20) -> dict:
    """Calls ``step(batch)`` until ``seconds`` have passed, then ``sync()``: ``ms`` per call and ``calls``."""
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < seconds:
        step(batch)
        calls += batch
    sync()
    return dict(ms=1e3 * (time.perf_counter() - t0) / calls, calls=calls)


def jax_step(impl: str, mask: str, inputs) -> tuple[Callable[[int], None], Callable[[], None]]:
    import jax

    _, vjp = kb.jax_fns(impl, mask, {})
    jax.block_until_ready(vjp(*inputs.jx))  # compile outside the timed loop

    def step(n):
        jax.block_until_ready([vjp(*inputs.jx) for _ in range(n)])

    return step, lambda: None


def flex_step(flex, mask: str, n: int, inputs) -> tuple[Callable[[int], None], Callable[[], None]]:
    torch = flex.torch
    q, k, v = (flex.to_torch(a, True) for a in inputs.np_[:3])
    do = flex.to_torch(inputs.np_[3], False)
    block_mask = flex.block_mask(mask, n)

    def step(count):
        for _ in range(count):
            for t in (q, k, v):
                t.grad = None  # as do_bench does: no accumulation kernel
            flex.flex(q, k, v, block_mask=block_mask).backward(do)

    step(3)
    torch.cuda.synchronize()
    return step, torch.cuda.synchronize


def markdown(report: dict) -> str:
    lines = [
        f"Sustained fwd+bwd, H={kb.NUM_HEADS}, D={kb.HEAD_DIM}, bf16, {report['seconds']} s of back-to-back calls per "
        f"row. GPU: {report['gpu']}; {report['date']}.",
        "",
        "ms/call is wall clock over the whole loop. Clock and power are the means of the nvidia-smi samples "
        f"above {report['busy_watts']} W; throttled = share of those samples with a throttle reason "
        "(0x4: software power cap); mJ/call = ms/call x W, the energy of one call under load. vs Flex = our "
        "ms / Flex's ms, same mask and shape.",
        "",
        "| B x N | mask | impl | ms/call | calls | SM MHz (min) | W | mJ/call | throttled | vs Flex |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    flex = {(r["shape"], r["mask"]): r["ms"] for r in report["rows"] if r["impl"] == "flex" and "ms" in r}
    for r in report["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['shape']} | {r['mask']} | {r['impl']} | {r.get('error', '-')} | | | | | | |")
            continue
        load = r.get("load", {})
        clock = watts = energy = throttled = "-"
        if load.get("samples"):
            clock = f"{load['sm_mhz_mean']:.0f} ({load['sm_mhz_min']:.0f})"
            watts = f"{load['power_w_mean']:.0f}"
            energy = f"{r['ms'] * load['power_w_mean']:.0f}"
            throttled = f"{100 * load['throttled_share']:.0f}%"
        ref = flex.get((r["shape"], r["mask"]))
        vs = f"{r['ms'] / ref:.3f}x" if ref and r["impl"] != "flex" else ""
        lines.append(f"| {r['shape']} | {r['mask']} | {r['impl']} | {r['ms']:.4f} | {r['calls']} | {clock} | {watts} | "
                     f"{energy} | {throttled} | {vs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2x8192", help="comma list of BxN")
    p.add_argument("--masks", default=",".join(kb.MASKS))
    p.add_argument("--impls", default="pallas_mosaic_gpu,flex", help="comma list: any of bench/kernels.py's, and flex")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each row's loop")
    p.add_argument("--busy-watts", type=float, default=250.0, help="samples at or below this are idle")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    impls = [x for x in args.impls.split(",") if x]
    jax_impls = [x for x in impls if x != "flex"]
    unknown = set(jax_impls) - set(kb.OURS) - {"cudnn", "reference"}
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; choose from {sorted(set(kb.OURS) | {'cudnn', 'reference', 'flex'})}")
    now = datetime.datetime.now(datetime.timezone.utc)
    report = dict(gpu=gpu_identity(), date=now.isoformat(timespec="seconds"), seconds=args.seconds,
                  busy_watts=args.busy_watts, rows=[])
    print(f"# {report['gpu']}", flush=True)
    flex = kb.Flex() if "flex" in impls else None
    for shape in (s for s in args.shapes.split(",") if s):
        batch, n = kb.parse_shape(shape)
        inputs = kb.Inputs.make(batch, n)
        for mask in (m for m in args.masks.split(",") if m):
            for impl in jax_impls + (["flex"] if flex else []):
                row = dict(impl=impl, mask=mask, shape=shape)
                try:
                    step, sync = flex_step(flex, mask, n, inputs) if impl == "flex" else jax_step(impl, mask, inputs)
                    time.sleep(0.5)  # idle lead-in: a clean baseline for the first samples
                    with load_samples(args.busy_watts) as load:
                        row.update(sustained(step, sync, args.seconds))
                    row["load"] = load
                except Exception as e:  # noqa: BLE001  (a row's failure is recorded, the rest still run)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"sustained_{now:%Y-%m-%d}{('_' + args.tag) if args.tag else ''}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1))
    base.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
