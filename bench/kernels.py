"""Band attention kernels side by side on one GPU, in one process.

Implementations (``--impls``):

* ours: every registered GPU implementation of :mod:`spattn_jax.attention` that imports
  (``pallas_triton``; ``pallas_mosaic_gpu`` once it exists);
* ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn", is_causal=True)``, dense
  causal (it cannot express per-head bands: the dense baseline);
* ``flex``: torch ``torch.compile(flex_attention, dynamic=False)`` with
  ``torch.compile(create_block_mask)(mask_mod, B=None, H=H, Q_LEN=N, KV_LEN=N)`` built from the SAME
  ``MaskSpec`` intervals;
* ``reference``: the fp32 jnp oracle, only up to ``--reference-max-n``.

For each B x N (H = 16, D = 128, bf16) and mask it times the forward and forward+backward and reports
ms (median) and useful TFLOP/s: FLOPs counted under the mask, ``4 D pairs`` forward and 2.5x that
backward (pairs from ``MaskSpec.pair_counts``; dense causal pairs for cuDNN). ``T_bound`` per pass is
``max(F / 600 TF/s, bytes / 3.0 TB/s)`` with ``8 B H N D`` bytes forward and twice that backward
(kernels.md §11). It checks our outputs and dq/dk/dv against FlexAttention's on the same inputs at
every shape, and against the fp32 reference at ``--check-shape``.

Timing (bench/timing.py, the same three numbers for every row): ``ms`` is the median of ``--iters``
synchronised wall-clock calls after 2 warm-ups (torch: ``triton.testing.do_bench``, warm-up 50 ms,
rep 200 ms, median); ``ms_pipelined`` the mean of ``--iters`` calls issued back to back and
synchronised once; ``ms_gpu`` the GPU busy time per call from the profiler (``jax.profiler`` /
``torch.profiler``), the like-for-like number across frameworks. Forward+backward is the VJP with a
given ``dO`` in both frameworks (torch: ``o.backward(dO)``).

Writes ``<out>/kernels_<gpu>_<date>.json`` and ``.md``; prints the markdown table last.

Examples::

  python bench/kernels.py --shapes 2x8192 --impls pallas_triton,flex          # quick
  python bench/kernels.py --tune --out $OUT                                   # sweep tiles first
  python bench/kernels.py --impls all                                         # everything
"""

from __future__ import annotations

import os

# torch and JAX share the GPU: cap JAX's preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import importlib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import clocks_text, gpu_identity, time_jax, time_torch  # noqa: E402  (bench/timing.py: one method for every row)

# `spattn_jax.attention` the module (the package re-exports a function of the same name).
attn_mod = importlib.import_module("spattn_jax.attention")
from spattn_jax import masks  # noqa: E402
from spattn_jax.kernels import reference  # noqa: E402

NUM_HEADS, HEAD_DIM = 16, 128
SHAPES = ("4x4096", "2x8192", "1x16384", "1x32768")
MASKS = ("spattention", "spattention_exclusive")
ACHIEVABLE_TFLOPS, ACHIEVABLE_TBPS = 600.0, 3.0  # kernels.md §11
OURS = tuple(n for n in attn_mod.IMPLEMENTATIONS if n not in ("reference", "splash"))

# Candidate settings for --tune, swept one kernel at a time at 2x8192 (coordinate descent):
# forward (block_q, block_k, num_warps, num_stages), then dQ, then dK/dV.
FWD_CANDIDATES = (
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 3),
    (128, 32, 4, 3), (128, 64, 8, 3), (32, 64, 4, 3),
)
DQ_CANDIDATES = (
    (64, 32, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2), (128, 32, 8, 3), (32, 64, 4, 3),
    (64, 16, 4, 3), (32, 32, 4, 3),
)
DKV_CANDIDATES = (
    (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 3),
    (64, 128, 8, 3), (128, 64, 8, 2), (16, 64, 4, 3),
)
# Defaults: the winners of the H100 sweep in bench/results/kernels_nvidia_h100_80gb_hbm3_2026-11-23_run2.json.
DEFAULT_TRITON = dict(
    block_q=64, block_k=32, num_warps=4, num_stages=3,
    block_q_dq=64, block_k_dq=32, num_warps_dq=4, num_stages_dq=2,
    block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=2, fast_exp2=True,
)


# -- counting --------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int]:
    b, n = text.lower().split("x")
    return int(b), int(n)


def mask_spec(name: str) -> masks.MaskSpec:
    # Bands follow the length (the paper's parity mode), as in kernels.md's tables.
    return masks.make(name, num_heads=NUM_HEADS, band_len=None)


def useful_flops(mask: str, batch: int, n: int) -> tuple[float, float]:
    """(forward, backward) FLOPs under the mask: 4 D pairs and 2.5x that."""
    pairs = batch * float(mask_spec(mask).pair_counts(n).sum())
    fwd = 4.0 * HEAD_DIM * pairs
    return fwd, 2.5 * fwd


def t_bound_ms(mask: str, batch: int, n: int) -> tuple[float, float]:
    """(forward, forward+backward) ``T_bound`` in ms at achievable rates (kernels.md §11)."""
    f_fwd, f_bwd = useful_flops(mask, batch, n)
    q_fwd = 8.0 * batch * NUM_HEADS * n * HEAD_DIM
    fwd = max(f_fwd / (ACHIEVABLE_TFLOPS * 1e12), q_fwd / (ACHIEVABLE_TBPS * 1e12))
    bwd = max(f_bwd / (ACHIEVABLE_TFLOPS * 1e12), 2 * q_fwd / (ACHIEVABLE_TBPS * 1e12))
    return fwd * 1e3, (fwd + bwd) * 1e3


# -- timing ----------------------------------------------------------------------------------------


def row_common(mask: str, batch: int, n: int) -> dict:
    """The fields every result row of ``mask`` at ``batch x n`` carries: FLOPs and time bounds."""
    f_fwd, f_bwd = useful_flops(mask, batch, n)
    tb_fwd, tb_all = t_bound_ms(mask, batch, n)
    return dict(mask=mask, shape=f"{batch}x{n}", flops_fwd=f_fwd, flops_bwd=f_bwd, t_bound_fwd_ms=tb_fwd,
                t_bound_fwdbwd_ms=tb_all)


def timed_record(fwd: dict, fwdbwd: dict) -> dict:
    """One result row's timing fields from two :mod:`timing` results (forward, forward+backward)."""
    rec = {}
    for part, r in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        rec[f"{part}_ms"] = r["ms"]
        rec[f"{part}_ms_pipelined"] = r.get("ms_pipelined")
        rec[f"{part}_ms_gpu"] = r.get("ms_gpu")
        if r.get("kernels_us"):
            rec[f"{part}_kernels_us"] = r["kernels_us"]
        if r.get("gpu_error"):
            rec[f"{part}_gpu_error"] = r["gpu_error"]
        if r.get("clocks"):
            rec[f"{part}_clocks"] = r["clocks"]
    return rec


# -- implementations -------------------------------------------------------------------------------


def jax_fns(impl: str, mask: str, options: dict):
    """(forward, vjp) jitted callables on ``[B, N, H, D]`` arrays."""
    spec = mask_spec(mask)
    if impl == "cudnn":

        def fwd(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)

    elif impl == "reference":

        def fwd(q, k, v):
            return reference.attention(q, k, v, mask=spec)

    else:

        def fwd(q, k, v):
            return attn_mod.attention(q, k, v, mask=spec, implementation=impl, **options)

    def vjp(q, k, v, do):
        return jax.vjp(fwd, q, k, v)[1](do)

    return jax.jit(fwd), jax.jit(vjp)


class Flex:
    """torch FlexAttention on the same mask, compiled once per (mask, shape)."""

    def __init__(self):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # One compiled graph per (mask, shape, grad mode): the default limit of 8 sends later shapes to
        # the unfused eager path (it materialises the scores and runs out of memory at 16k).
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        self.torch = torch
        # Compiled: the block mask is built from the full N x N mask_mod. torch deprecates the old
        # `_compile=True` flag in favour of this form.
        self.create_block_mask = torch.compile(create_block_mask)
        self.flex = torch.compile(flex_attention, dynamic=False)

    def block_mask(self, mask: str, n: int):
        torch = self.torch
        table = torch.tensor(mask_spec(mask).interval_table(n), device="cuda", dtype=torch.int64)
        lo, hi = table[..., 0], table[..., 1]
        slots = table.shape[1]

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            ok = (d >= lo[h, 0]) & (d < hi[h, 0])
            for s in range(1, slots):
                ok = ok | ((d >= lo[h, s]) & (d < hi[h, s]))
            return ok

        return self.create_block_mask(mask_mod, B=None, H=NUM_HEADS, Q_LEN=n, KV_LEN=n)

    def to_torch(self, x: np.ndarray, grad: bool):
        t = self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).cuda().to(self.torch.bfloat16)
        return t.requires_grad_(grad)

    @staticmethod
    def to_numpy(t) -> np.ndarray:
        return t.detach().float().cpu().numpy().transpose(0, 2, 1, 3)


# -- checks ----------------------------------------------------------------------------------------


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    if not np.all(np.isfinite(x)):
        return float("nan")
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-6))


def outputs_and_grads_jax(vjp_fn, fwd_fn, q, k, v, do) -> list[np.ndarray]:
    out = fwd_fn(q, k, v)
    grads = vjp_fn(q, k, v, do)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def outputs_and_grads_flex(flex: Flex, bm, qn, kn, vn, don) -> list[np.ndarray]:
    qt, kt, vt = (flex.to_torch(x, True) for x in (qn, kn, vn))
    o = flex.flex(qt, kt, vt, block_mask=bm)
    o.backward(flex.to_torch(don, False))
    return [flex.to_numpy(t) for t in (o, qt.grad, kt.grad, vt.grad)]


# Tolerances for bf16 inputs, on max|x - y| / max|y| (out, dq, dk, dv).
TOL = dict(out=2e-2, dq=5e-2, dk=5e-2, dv=5e-2)


def compare(name_a, a, name_b, b) -> dict:
    errs = {key: rel_err(x, y) for key, x, y in zip(("out", "dq", "dk", "dv"), a, b)}
    ok = all(np.isfinite(e) and e <= TOL[key] for key, e in errs.items())
    return dict(a=name_a, b=name_b, errors=errs, ok=bool(ok))


# -- environment -----------------------------------------------------------------------------------


def environment() -> dict:
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        jaxlib=getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
        argv=sys.argv[1:],
        mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    )
    env["nvidia_smi"] = gpu_identity()
    try:
        import torch
        import triton

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, triton=triton.__version__,
                   cudnn_torch=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name())
    except Exception as e:  # noqa: BLE001
        env["torch"] = repr(e)
    return env


# -- the run ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    np_: tuple  # q, k, v, do as float32 numpy ([B, N, H, D]), rounded to bf16 in both frameworks
    jx: tuple

    @classmethod
    def make(cls, batch: int, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        arrs = tuple(rng.standard_normal((batch, n, NUM_HEADS, HEAD_DIM), dtype=np.float32) for _ in range(4))
        jx = tuple(jnp.asarray(a, jnp.bfloat16) for a in arrs)
        # The bf16-rounded values, so torch sees exactly what JAX sees.
        arrs = tuple(np.asarray(x, np.float32) for x in jx)
        return cls(arrs, jx)


def run_entry(results: list, record: dict, fn, log) -> dict | None:
    """Run ``fn() -> dict`` and append ``record | dict``; errors are recorded, not raised."""
    try:
        record.update(fn())
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        record["error"] = msg
        log(f"  ! {record.get('impl')} {record.get('mask')} {record.get('shape')}: {msg}")
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
    results.append(record)
    return record


def tune(args, log) -> tuple[dict, list]:
    """Coordinate descent at ``--tune-shape``, one kernel at a time (forward, dQ, dK/dV), summed over masks.

    Each candidate times its kernel alone (``kernel_parts``; back-to-back mean, i.e. GPU-bound), so a
    sweep compiles one kernel per candidate and the three choices are independent.
    """
    from spattn_jax.kernels import pallas_triton

    batch, n = parse_shape(args.tune_shape)
    q, k, v, do = Inputs.make(batch, n, seed=1).jx
    best = dict(DEFAULT_TRITON)
    rows = []
    residuals = {}
    stages = (
        ("fwd", FWD_CANDIDATES, ("block_q", "block_k", "num_warps", "num_stages")),
        ("dq", DQ_CANDIDATES, ("block_q_dq", "block_k_dq", "num_warps_dq", "num_stages_dq")),
        ("dkv", DKV_CANDIDATES, ("block_q_dkv", "block_k_dkv", "num_warps_dkv", "num_stages_dkv")),
        ("all", ((True,), (False,)), ("fast_exp2",)),
    )
    for part, candidates, keys in stages:
        scores = []
        for cand in candidates:
            options = dict(best, **dict(zip(keys, cand)))
            try:
                per_mask = {}
                for mask in args.masks:
                    parts, residuals[mask] = pallas_triton.kernel_parts(
                        q, k, v, do, mask=mask_spec(mask), residuals=residuals.get(mask), **options
                    )
                    names = ("fwd", "dq", "dkv") if part == "all" else (part,)
                    per_mask[mask] = sum(
                        time_jax(parts[p][0], *parts[p][1], iters=args.iters, gpu=False)["ms_pipelined"]
                        for p in names
                    )
            except Exception as e:  # noqa: BLE001
                log(f"  tune {part} {cand}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append(dict(part=part, options={k_: options[k_] for k_ in keys}, ms=per_mask))
            total = sum(per_mask.values())
            log(f"  tune {part:3s} {cand}: " + " ".join(f"{m}={t:.3f}" for m, t in per_mask.items())
                + f" ms (sum {total:.3f})")
            scores.append((total, cand))
        if scores:
            best.update(dict(zip(keys, min(scores)[1])))
    log(f"  tuned: {best}")
    return best, rows


ODD_CASES = (
    # (name, B, Tq, Tk, H, K, D, docs): GQA + packed documents + D = 256 + N off the tile grid;
    # D = 64 with an odd N; decoding (queries are the last Tq of Tk positions).
    ("gqa-docs-d256", 1, 1000, 1000, 16, 4, 256, 3),
    ("odd-n-d64", 2, 777, 777, 16, 16, 64, 1),
    ("decode-d128", 1, 100, 1000, 16, 16, 128, 1),
)


def odd_checks(ours, masks_, log) -> list:
    """Our kernels (default settings) against the fp32 reference on shapes the bench grid misses."""
    rows = []
    for case in ODD_CASES:
        name, batch, tq, tk, h, kv, d, docs = case
        rng = np.random.default_rng(3)
        q = jnp.asarray(rng.standard_normal((batch, tq, h, d)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((batch, tk, kv, d)), jnp.bfloat16) for _ in range(2))
        do = jnp.asarray(rng.standard_normal((batch, tq, h, d)), jnp.bfloat16)
        seg = None
        if docs > 1:
            ids = np.sort(rng.integers(0, docs, (batch, tk)), axis=1).astype(np.int32)
            seg = (jnp.asarray(ids[:, tk - tq :]), jnp.asarray(ids))
        for mask in masks_:
            spec = masks.make(mask, num_heads=h, band_len=None)
            f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]

            def ref_fn(q, k, v, spec=spec):
                ids = (None, None) if seg is None else seg
                return reference.attention(q, k, v, mask=spec, q_segment_ids=ids[0], kv_segment_ids=ids[1])

            out, vjp = jax.vjp(ref_fn, *f32[:3])
            ref = [np.asarray(x) for x in (out, *vjp(f32[3]))]
            for impl in ours:
                try:
                    fn = jax.jit(lambda q, k, v, spec=spec, impl=impl: attn_mod.attention(
                        q, k, v, mask=spec, segment_ids=seg, implementation=impl))
                    out, vjp = jax.vjp(fn, q, k, v)
                    got = [np.asarray(x, np.float32) for x in (out, *vjp(do))]
                    c = dict(compare(impl, got, "reference", ref), mask=mask, shape=name)
                except Exception as e:  # noqa: BLE001
                    c = dict(a=impl, b="reference", mask=mask, shape=name, ok=False,
                             errors=dict.fromkeys(("out", "dq", "dk", "dv"), float("nan")),
                             error=f"{type(e).__name__}: {str(e)[:300]}")
                rows.append(c)
                log(f"  {mask:22s} {impl:16s} {name:14s} vs reference: {fmt_errs(c)} {c.get('error', '')}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of BxN")
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--impls", default="all", help="comma list of ours/cudnn/flex/reference, or 'all'")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reference-max-n", type=int, default=2048)
    p.add_argument("--flex-max-n", type=int, default=16384,
                   help="FlexAttention ran out of memory at 32k (kernels.md §10)")
    p.add_argument("--check-shape", default="1x2048", help="BxN for the fp32-reference check ('' to skip)")
    p.add_argument("--tune", action="store_true", help="sweep Triton tiles first (at --tune-shape)")
    p.add_argument("--tune-shape", default="2x8192")
    p.add_argument("--no-odd-checks", dest="odd_checks", action="store_false", help="skip GQA/docs/D=256/decode checks")
    p.add_argument("--triton-options", default="", help="JSON dict of pallas_triton options")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="", help="suffix for the output file names")
    args = p.parse_args(argv)
    args.masks = [m for m in args.masks.split(",") if m]
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    wanted = set(args.impls.split(","))
    every = set(OURS) | {"cudnn", "flex", "reference"}
    impls = every if "all" in wanted else wanted
    ours = [n for n in OURS if n in impls and attn_mod.available(n)]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    env = environment()
    log(f"# {env.get('gpu', env['device'])} | jax {env['jax']} | torch {env.get('torch')} | triton {env.get('triton')}")
    log(f"# ours: {ours}")
    flex = None
    if "flex" in impls:
        try:
            flex = Flex()
        except Exception as e:  # noqa: BLE001
            log(f"# flex unavailable: {e!r}")

    triton_options = dict(DEFAULT_TRITON, **json.loads(args.triton_options or "{}"))
    tuning_rows = []
    if args.tune and "pallas_triton" in ours:
        log(f"## tuning pallas_triton at {args.tune_shape}")
        triton_options, tuning_rows = tune(args, log)
    options_for = {name: (triton_options if name == "pallas_triton" else {}) for name in ours}

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    gpu_tag = "".join(c if c.isalnum() else "_" for c in env.get("gpu", env["device"])).strip("_").lower()
    base = out_dir / f"kernels_{gpu_tag}_{stamp}{('_' + args.tag) if args.tag else ''}"
    report = dict(env=env, options=options_for, tuning=tuning_rows, checks=[], results=[])

    def save():
        base.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))

    # 1. Correctness against the fp32 reference (and Flex) at a small shape.
    if args.check_shape:
        batch, n = parse_shape(args.check_shape)
        log(f"## reference check at {batch}x{n}")
        inputs = Inputs.make(batch, n, seed=2)
        for mask in args.masks:
            ref_fwd, ref_vjp = jax_fns("reference", mask, {})
            f32 = tuple(x.astype(jnp.float32) for x in inputs.jx)
            ref = outputs_and_grads_jax(ref_vjp, ref_fwd, *f32)
            got = {}
            for name in ours:
                try:
                    fwd, vjp = jax_fns(name, mask, options_for[name])
                    got[name] = outputs_and_grads_jax(vjp, fwd, *inputs.jx)
                except Exception as e:  # noqa: BLE001
                    log(f"  ! {name} {mask}: {type(e).__name__}: {str(e)[:300]}")
            if flex is not None:
                try:
                    got["flex"] = outputs_and_grads_flex(flex, flex.block_mask(mask, n), *inputs.np_)
                except Exception as e:  # noqa: BLE001
                    log(f"  ! flex {mask}: {type(e).__name__}: {str(e)[:300]}")
            for name, vals in got.items():
                c = dict(compare(name, vals, "reference", ref), mask=mask, shape=f"{batch}x{n}")
                report["checks"].append(c)
                log(f"  {mask:22s} {name:16s} vs reference: {fmt_errs(c)}")
            for name in ours:
                if name in got and "flex" in got:
                    c = dict(compare(name, got[name], "flex", got["flex"]), mask=mask, shape=f"{batch}x{n}")
                    report["checks"].append(c)
                    log(f"  {mask:22s} {name:16s} vs flex:      {fmt_errs(c)}")
        if args.odd_checks:
            report["checks"] += odd_checks(ours, args.masks, log)
        save()

    # 2. The bench. Every JAX row first, then every Flex row: once torch's profiler has held CUPTI,
    # jax.profiler cannot take it again in this process (H100, torch 2.11 / JAX 0.11.2).
    results = report["results"]
    ours_vals = {}  # (shape, mask) -> {impl: outputs and grads}, compared with Flex's below
    for batch, n in shapes:
        shape = f"{batch}x{n}"
        log(f"## {shape}")
        inputs = Inputs.make(batch, n, seed=0)
        q, k, v, do = inputs.jx
        if "cudnn" in impls:
            fwd, vjp = jax_fns("cudnn", "causal", {})
            f_fwd, f_bwd = useful_flops("causal", batch, n)

            def go_cudnn(fwd=fwd, vjp=vjp):
                a, b = time_jax(fwd, q, k, v, iters=args.iters), time_jax(vjp, q, k, v, do, iters=args.iters)
                return timed_record(a, b)

            r = run_entry(results, dict(impl="cudnn", mask="causal (dense)", shape=shape, flops_fwd=f_fwd,
                                        flops_bwd=f_bwd), go_cudnn, log)
            log(fmt_result(r))
            save()
        for mask in args.masks:
            vals = ours_vals.setdefault((shape, mask), {})
            for name in ours + (["reference"] if "reference" in impls and n <= args.reference_max_n else []):
                fwd, vjp = jax_fns(name, mask, options_for.get(name, {}))

                def go(fwd=fwd, vjp=vjp, name=name):
                    a = time_jax(fwd, q, k, v, iters=args.iters)
                    b = time_jax(vjp, q, k, v, do, iters=args.iters)
                    if name != "reference" and flex is not None and n <= args.flex_max_n:
                        vals[name] = outputs_and_grads_jax(vjp, fwd, q, k, v, do)
                    return timed_record(a, b)

                log(fmt_result(run_entry(results, dict(row_common(mask, batch, n), impl=name), go, log)))
                save()
        del inputs, q, k, v, do
    if flex is not None:
        for batch, n in shapes:
            shape = f"{batch}x{n}"
            log(f"## {shape} flex")
            inputs = Inputs.make(batch, n, seed=0)
            for mask in args.masks:
                if n > args.flex_max_n:
                    results.append(dict(row_common(mask, batch, n), impl="flex",
                                        error=f"skipped: N > --flex-max-n={args.flex_max_n}"))
                    log(f"  flex skipped at N={n} (out of memory in kernels.md §10; --flex-max-n to try)")
                    continue

                def go_flex(mask=mask, n=n, shape=shape):
                    torch = flex.torch
                    bm = flex.block_mask(mask, n)
                    qt, kt, vt = (flex.to_torch(x, True) for x in inputs.np_[:3])
                    dot = flex.to_torch(inputs.np_[3], False)

                    def f():
                        return flex.flex(qt, kt, vt, block_mask=bm)

                    def fb():
                        f().backward(dot)

                    with torch.no_grad():
                        a = time_torch(f, iters=args.iters)
                    b = time_torch(fb, grad_to_none=[qt, kt, vt], iters=args.iters)
                    theirs = outputs_and_grads_flex(flex, bm, *inputs.np_)
                    for name, mine in ours_vals.get((shape, mask), {}).items():
                        c = dict(compare(name, mine, "flex", theirs), mask=mask, shape=shape)
                        report["checks"].append(c)
                        log(f"  {mask:22s} {name:16s} vs flex:      {fmt_errs(c)}")
                    del bm, qt, kt, vt, dot
                    torch.cuda.empty_cache()
                    return timed_record(a, b)

                log(fmt_result(run_entry(results, dict(row_common(mask, batch, n), impl="flex"), go_flex, log)))
                save()
            del inputs
    report["table"] = markdown(report)
    save()
    base.with_suffix(".md").write_text(report["table"])
    log("")
    log(report["table"])
    return 0


# -- formatting ------------------------------------------------------------------------------------


def fmt_errs(c: dict) -> str:
    e = c["errors"]
    return " ".join(f"{k}={v:.2e}" for k, v in e.items()) + ("  ok" if c["ok"] else "  FAIL")


def fmt_result(r: dict) -> str:
    if r.get("error"):
        return f"  {r['impl']:16s} {r['mask']:22s} {r['shape']:8s} error: {r['error']}"
    def ms(key):
        v = r.get(key)
        return "-" if v is None else f"{v:.3f}"

    clocks = clocks_text(r.get("fwdbwd_clocks"))
    return (f"  {r['impl']:16s} {r['mask']:22s} {r['shape']:8s} ms sync/pipe/GPU: fwd {ms('fwd_ms')}/"
            f"{ms('fwd_ms_pipelined')}/{ms('fwd_ms_gpu')} fwd+bwd {ms('fwdbwd_ms')}/{ms('fwdbwd_ms_pipelined')}/"
            f"{ms('fwdbwd_ms_gpu')}" + (f" | fwd+bwd at {clocks}" if clocks else ""))


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"Band attention, H={NUM_HEADS}, D={HEAD_DIM}, bf16. {env.get('gpu', env['device'])}; jax {env['jax']}, "
        f"torch {env.get('torch')}, triton {env.get('triton')}, driver/smi: {env.get('nvidia_smi')}; {env['date']}.",
        "",
        "Three timings per row (bench/timing.py): **sync** = median wall clock of synchronised calls (JAX) or "
        "do_bench (torch); **pipe** = mean of calls issued back to back, synchronised once; **GPU** = GPU busy "
        "time per call from the profiler (jax.profiler / torch.profiler: union of kernel intervals), the "
        "like-for-like column across frameworks. TF/s = useful FLOPs under the mask (cuDNN: dense causal "
        "FLOPs) over the GPU time (sync where no profile). T_bound = max(F/600 TF/s, bytes/3.0 TB/s) per "
        "pass. vs Flex = Flex fwd+bwd / this fwd+bwd, same column (> 1: faster than Flex). SM clock = "
        "mean (min) SM MHz, and mean memory MHz, that nvidia-smi sampled while fwd+bwd was timed.",
        "",
        "| B x N | mask | impl | fwd ms sync / pipe / GPU | fwd+bwd ms sync / pipe / GPU | fwd TF/s | "
        "fwd+bwd TF/s | fwd+bwd GPU / T_bound | vs Flex sync / pipe / GPU | SM clock |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["results"]
    flex = {(r["shape"], r["mask"]): r for r in rows if r["impl"] == "flex" and not r.get("error")}

    def triple(r, part):
        vals = [r.get(f"{part}_ms"), r.get(f"{part}_ms_pipelined"), r.get(f"{part}_ms_gpu")]
        return " / ".join("-" if v is None else f"{v:.3f}" for v in vals)

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['shape']} | {r['mask']} | {r['impl']} | {r['error'][:80]} | | | | | | |")
            continue
        t_fwd = r.get("fwd_ms_gpu") or r["fwd_ms"]
        t_all = r.get("fwdbwd_ms_gpu") or r["fwdbwd_ms"]
        tf_fwd = r["flops_fwd"] / (t_fwd * 1e-3) / 1e12
        tf_all = (r["flops_fwd"] + r["flops_bwd"]) / (t_all * 1e-3) / 1e12
        bound = r.get("t_bound_fwdbwd_ms")
        over = f"{t_all / bound:.2f}x" if bound else ""
        fx = flex.get((r["shape"], r["mask"]))
        vs = ""
        if fx and r["impl"] != "flex":
            ratios = []
            for key in ("fwdbwd_ms", "fwdbwd_ms_pipelined", "fwdbwd_ms_gpu"):
                a, b = fx.get(key), r.get(key)
                ratios.append(f"{a / b:.2f}x" if a and b else "-")
            vs = " / ".join(ratios)
        c = r.get("fwdbwd_clocks") or {}
        clock = f"{c['sm_mhz_mean']:.0f} ({c['sm_mhz_min']:.0f})" if c.get("samples") else ""
        clock += f", mem {c['mem_mhz_mean']:.0f}" if "mem_mhz_mean" in c else ""
        lines.append(
            f"| {r['shape']} | {r['mask']} | {r['impl']} | {triple(r, 'fwd')} | {triple(r, 'fwdbwd')} | "
            f"{tf_fwd:.0f} | {tf_all:.0f} | {over} | {vs} | {clock} |"
        )
    checks = report.get("checks", [])
    if checks:
        lines += ["", "| check | shape | mask | out | dq | dk | dv | ok |", "|---|---|---|---|---|---|---|---|"]
        for c in checks:
            e = c["errors"]
            lines.append(
                f"| {c['a']} vs {c['b']} | {c['shape']} | {c['mask']} | {e['out']:.1e} | {e['dq']:.1e} | "
                f"{e['dk']:.1e} | {e['dv']:.1e} | {'yes' if c['ok'] else 'NO'} |"
            )
    final = report.get("options", {}).get("pallas_triton")
    tuned = [r for r in report.get("tuning", []) if r.get("part") not in (None, "all")]
    if final and tuned:
        lines += ["", "pallas_triton per kernel at the tuning shape with the chosen tiles "
                  "(ms, back-to-back mean, GPU-bound):", ""]
        lines += ["| kernel | tiles (q, k, warps, stages) | " + " | ".join(MASKS) + " |",
                  "|---|---|" + "---|" * len(MASKS)]
        for r in tuned:
            if all(final.get(k_) == v_ for k_, v_ in r["options"].items()):
                cells = " | ".join(f"{r['ms'].get(m, float('nan')):.3f}" for m in MASKS)
                lines.append(f"| {r['part']} | {tuple(r['options'].values())} | {cells} |")
    if report.get("options"):
        lines += ["", f"Options: `{json.dumps(report['options'])}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
