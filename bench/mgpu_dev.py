"""GPU dev/check/timing script for the Pallas Mosaic GPU band kernel (issue 7); one stage per call.

Stages (``python bench/mgpu_dev.py STAGE [options]``):

* ``check``: outputs and dq/dk/dv against the fp32 reference (:mod:`spattn_jax.kernels.reference`) on
  small shapes covering padding, GQA, segment ids, head-dim padding, ``Tq < Tk`` and empty rows;
  poisons nothing (Mosaic outputs are fresh buffers) but checks finiteness and exact zeros on empty
  rows. ``max|x - ref| / max|ref|`` per output, bf16 tolerances of the shared kernel test.
* ``time``: forward and forward+backward at ``--shapes`` (default 2x8192) for ``spattention`` and
  ``spattention_exclusive``, over ``--configs`` (JSON list of option dicts), beside cuDNN dense
  causal in the same process. Reports ms, useful TF/s and the ratio to cuDNN; prints a table last.
* ``big``: 1x32768 and 1x65536 forward+backward (they must run) and forward TF/s at 1x16384.

Timing is kernels.md §10's: median of ``--iters`` wall-clock calls each ended by
``block_until_ready`` after 2 warm-ups, plus the mean of back-to-back calls (``ms_pipelined``).
Writes ``<out>/mgpu_<stage>.json`` (``--out``, default ``$OUT`` or bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from spattn_jax import masks  # noqa: E402
from spattn_jax.kernels import pallas_mosaic_gpu as mg  # noqa: E402
from spattn_jax.kernels import reference  # noqa: E402
from kernels import time_jax  # noqa: E402  (bench/kernels.py: the one timing method)

H, D = 16, 128
TOL = dict(out=1.5e-2, dq=4e-2, dk=4e-2, dv=2e-2)  # the shared kernel test's bf16 row


def log(msg: str) -> None:
    print(msg, flush=True)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    if not np.all(np.isfinite(x)):
        return float("nan")
    return float(np.max(np.abs(x - ref), initial=0.0) / max(float(np.max(np.abs(ref), initial=0.0)), 1e-6))


ERROR_LOG: list[str] = []


def short(e: BaseException) -> str:
    """One line for the table; the full traceback goes to ``<out>/mgpu_errors.log``."""
    ERROR_LOG.append("".join(traceback.format_exception(e)))
    return f"{type(e).__name__}: {str(e).strip()}".replace("\n", " | ")[:700]


# -- check ---------------------------------------------------------------------------------------------

CASES = [
    # (batch, q_len, kv_len, heads, kv_heads, head_dim, variant, band_len, docs, options)
    (1, 256, 256, 4, 4, 64, "spattention", None, 1, {}),
    (1, 1024, 1024, 8, 8, 128, "spattention", None, 1, {}),
    (1, 2048, 2048, 16, 16, 128, "spattention_exclusive", None, 1, {}),
    (2, 200, 200, 4, 2, 64, "spattention", 256, 3, {}),
    (1, 130, 130, 8, 8, 32, "spattention_exclusive", None, 1, {}),
    (1, 100, 256, 4, 1, 64, "gapped", 300, 1, {}),
    (1, 512, 512, 2, 2, 128, "causal", None, 1, dict(block_kv=64, num_stages=3)),
    (1, 1000, 1000, 4, 4, 128, "balanced", None, 2, dict(block_q=64, block_kv=64)),
]


def check_case(case, seed: int) -> dict:
    b, tq, tk, h, kv, d, variant, band_len, docs, options = case
    rng = np.random.default_rng(seed)
    dt = jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((b, tq, h, d)), dt)
    k = jnp.asarray(rng.standard_normal((b, tk, kv, d)), dt)
    v = jnp.asarray(rng.standard_normal((b, tk, kv, d)), dt)
    do = jnp.asarray(rng.standard_normal((b, tq, h, d)), dt)
    spec = masks.make(variant, num_heads=h, band_len=band_len)
    q_seg = kv_seg = None
    if docs > 1:
        ids = np.zeros((b, tk), np.int32)
        for i in range(b):
            cuts = np.sort(rng.choice(np.arange(1, tk), size=docs - 1, replace=False))
            ids[i] = np.searchsorted(cuts, np.arange(tk), side="right")
        kv_seg = jnp.asarray(ids)
        q_seg = kv_seg[:, tk - tq :]

    def run(q, k, v):
        return mg.attention(q, k, v, mask=spec, q_segment_ids=q_seg, kv_segment_ids=kv_seg, **options)

    def run_ref(q, k, v):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return reference.attention(*f32, mask=spec, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

    t0 = time.perf_counter()
    out, vjp = jax.vjp(jax.jit(run), q, k, v)
    jax.block_until_ready(out)
    log(f"  forward done ({time.perf_counter() - t0:.1f}s)")
    grads = jax.jit(vjp)(do)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - t0
    ref, vjp_ref = jax.vjp(run_ref, q, k, v)
    grads_ref = vjp_ref(do.astype(jnp.float32))
    errs = {"out": rel_err(out, ref)}
    errs.update({n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, grads_ref)})
    ok = all(np.isfinite(e) and e <= TOL[n] for n, e in errs.items())
    allowed = np.asarray(reference.allowed(spec, tq, tk, q_seg, kv_seg)).any(-1)  # [B|1, H, Tq]
    empty = np.broadcast_to(~allowed, (b, h, tq)).transpose(0, 2, 1)
    empty_ok = True
    if empty.any():
        empty_ok = bool(np.all(np.asarray(out, np.float32)[empty] == 0) and np.all(np.asarray(grads[0], np.float32)[empty] == 0))
    # Determinism: a second run must give identical bits (a moving error is a race).
    out2 = jax.jit(run)(q, k, v)
    same = bool(np.array_equal(np.asarray(out, np.float32), np.asarray(out2, np.float32)))
    return dict(errors=errs, ok=ok and empty_ok and same, empty_rows=int(empty.sum()), empty_ok=empty_ok,
                deterministic=same, compile_and_run_s=round(compile_s, 2))


def stage_check(args) -> list:
    rows = []
    cases = CASES if not args.cases else [CASES[int(i)] for i in args.cases.split(",")]
    if args.case_json:  # extra cases: a JSON list of CASES-style lists
        cases = [tuple(c) for c in json.loads(args.case_json)]
    for i, case in enumerate(cases):
        rec = dict(case=repr(case))
        try:
            rec.update(check_case(case, seed=i))
        except Exception as e:  # noqa: BLE001
            rec["error"] = short(e)
        rows.append(rec)
        errs = rec.get("errors", {})
        log(f"check {i}: {case[:9]} ok={rec.get('ok')} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items())
            + (f" empty={rec.get('empty_rows')} det={rec.get('deterministic')} t={rec.get('compile_and_run_s')}s"
               if "errors" in rec else f" ERROR {rec.get('error')}"))
    return rows


# -- timing --------------------------------------------------------------------------------------------


def flops(variant: str, batch: int, n: int) -> float:
    """Useful forward FLOPs: 4 D (allowed pairs); dense causal for cuDNN."""
    pairs = batch * float(masks.make(variant, num_heads=H, band_len=None).pair_counts(n).sum())
    return 4.0 * D * pairs


def make_inputs(batch: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, n, H, D), np.float32), jnp.bfloat16) for _ in range(4))


def fns(impl: str, variant: str, options: dict):
    spec = masks.make(variant, num_heads=H, band_len=None)
    if impl == "cudnn":

        def fwd(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)

    else:

        def fwd(q, k, v):
            return mg.attention(q, k, v, mask=spec, **options)

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def stage_time(args) -> list:
    rows = []
    configs = json.loads(args.configs) if args.configs else [{}]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for batch, n in shapes:
        q, k, v, do = make_inputs(batch, n)
        entries = [("cudnn", "causal", {})] if not args.no_cudnn else []
        entries += [("mgpu", var, cfg) for cfg in configs for var in args.masks.split(",")]
        for impl, variant, cfg in entries:
            rec = dict(impl=impl, variant=variant, shape=f"{batch}x{n}", options=cfg)
            try:
                f, fb = fns(impl, variant, cfg)
                t0 = time.perf_counter()
                jax.block_until_ready(fb(q, k, v, do))
                rec["compile_s"] = round(time.perf_counter() - t0, 1)
                rec["fwd"] = time_jax(f, q, k, v, iters=args.iters)
                rec["fwd_bwd"] = time_jax(fb, q, k, v, do, iters=args.iters)
                ff = flops(variant, batch, n)
                rec["fwd_tflops"] = ff / (rec["fwd"]["ms"] * 1e-3) / 1e12
                rec["fwd_bwd_tflops"] = 3.5 * ff / (rec["fwd_bwd"]["ms"] * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001
                rec["error"] = short(e)
            rows.append(rec)
            if "error" in rec:
                log(f"time {impl} {variant} {batch}x{n} {cfg}: ERROR {rec['error']}")
            else:
                log(f"time {impl:5s} {variant:22s} {batch}x{n} {json.dumps(cfg):50s} fwd {rec['fwd']['ms']:.3f} "
                    f"(pipe {rec['fwd']['ms_pipelined']:.3f}) fwd+bwd {rec['fwd_bwd']['ms']:.3f} (pipe {rec['fwd_bwd']['ms_pipelined']:.3f}) ms "
                    f"| {rec['fwd_tflops']:.0f} / {rec['fwd_bwd_tflops']:.0f} TF/s | compile {rec['compile_s']}s")
    return rows


def table(rows: list) -> str:
    cud = {r["shape"]: r for r in rows if r.get("impl") == "cudnn" and "error" not in r}
    lines = ["| impl | mask | shape | options | fwd ms | fwd+bwd ms | fwd TF/s | cuDNN causal / ours (fwd+bwd) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "fwd" not in r:
            continue
        c = cud.get(r["shape"])
        ratio = f"{c['fwd_bwd']['ms'] / r['fwd_bwd']['ms']:.2f}x" if c else "-"
        lines.append(f"| {r['impl']} | {r['variant']} | {r['shape']} | {json.dumps(r['options'])} | {r['fwd']['ms']:.3f} | "
                     f"{r['fwd_bwd']['ms']:.3f} | {r['fwd_tflops']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("check", "time", "big"))
    p.add_argument("--cases", default="", help="comma list of CASES indices (check)")
    p.add_argument("--case-json", default="", help="JSON list of cases (check), replacing --cases")
    p.add_argument("--shapes", default="2x8192")
    p.add_argument("--masks", default="spattention,spattention_exclusive")
    p.add_argument("--configs", default="", help="JSON list of option dicts (time)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-cudnn", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    log(f"# {dev.device_kind} | jax {jax.__version__} | mgpu supported: {mg.is_supported()}")
    if args.stage == "check":
        rows = stage_check(args)
    elif args.stage == "time":
        rows = stage_time(args)
        log(table(rows))
    else:
        args.shapes = args.shapes if args.shapes != "2x8192" else "1x16384,1x32768,1x65536"
        args.no_cudnn = args.no_cudnn
        rows = stage_time(args)
        log(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if ERROR_LOG:
        (out / "mgpu_errors.log").write_text("\n\n".join(ERROR_LOG))
    (out / f"mgpu_{args.stage}.json").write_text(json.dumps(dict(device=dev.device_kind, jax=jax.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
