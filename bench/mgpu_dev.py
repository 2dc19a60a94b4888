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
* ``stress``: the same shape's forward, dQ and dK/dV (``split``: three jitted calls, synchronised one
  by one, so a hang names its kernel; ``joint``: ``jax.vjp`` as in ``check``) on fresh random data
  every iteration, against the fp32 reference. A watchdog thread catches a hang: it prints the stage,
  the Python stacks, attaches ``cuda-gdb`` (which kernel, which SASS instruction each warpgroup sits
  on) and exits with code 3. Prints one ``RESULT`` line (passes / fails / hangs).
* ``profile``: each kernel (forward, dQ, dK/dV) launched once per mask, for ``ncu`` or the Mosaic GPU
  dump variables (``MOSAIC_GPU_DUMP_PTXAS`` / ``_SASS``); bench/mgpu_diag.sh drives it.
* ``trace``: Mosaic GPU's in-kernel profiler (``SPATTN_MGPU_TRACE``) on each kernel, one call per mask:
  where each warpgroup's cycles go (waits, matmuls, softmax, epilogues), per scope of the kernels.
* ``ncusrc`` (CPU): where one kernel's warp-stall samples sit, from
  ``ncu -i REP --page source --csv --print-source sass`` of a ``--section SourceCounters`` report:
  samples per stall reason, and per *region* (a run of consecutive SASS instructions executed the same
  number of times: a loop body, a unit's prologue or epilogue) with its hottest instructions.
* ``protocol`` (CPU, no GPU): simulates the barrier protocol of all three kernels from their traced
  jaxprs (every warpgroup of every CTA interprets the kernel's scalar control flow; a random scheduler
  interleaves them and the TMA engine; mbarriers with per-waiter parity as on sm90) and reports
  deadlocks, parity aliasing and mis-armed TMA phases over the check cases and persistent settings.

Timing is kernels.md §10's: median of ``--iters`` wall-clock calls each ended by
``block_until_ready`` after 2 warm-ups, plus the mean of back-to-back calls (``ms_pipelined``).
Writes ``<out>/mgpu_<stage>.json`` (``--out``, default ``$OUT`` or bench/results).
"""

from __future__ import annotations

import argparse
import faulthandler
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from jax._src import core as jax_core  # noqa: E402  (protocol stage: jaxpr interpretation)
from jax._src.state import indexing as state_indexing  # noqa: E402

from spattn_jax import masks  # noqa: E402
from spattn_jax.kernels import pallas_mosaic_gpu as mg  # noqa: E402
from spattn_jax.kernels import reference  # noqa: E402
from timing import clocks_text, gpu_identity, time_jax  # noqa: E402  (bench/timing.py: the one timing method)

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
    # One-sided edges (Plan.edge_masks "ge"/"lt": bands wide against the tiles), which 0-5 and 7 lack:
    (1, 1000, 1000, 4, 4, 128, "spattention", None, 1, {}),
    (1, 1000, 1000, 4, 2, 64, "spattention_exclusive", None, 1, dict(block_kv=64)),
    (1, 4096, 4096, 8, 8, 128, "spattention", None, 1, {}),
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


def restore_env(saved: dict) -> None:
    for key, val in saved.items():
        if val is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = val


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
            # "_env": environment variables the kernels read at trace time (diagnostic switches),
            # set while this entry is traced, so A/B variants of the code run in one process.
            cfg = dict(cfg)
            env = cfg.pop("_env", {})
            saved = {key: os.environ.get(key) for key in env}
            try:
                os.environ.update({key: str(val) for key, val in env.items()})
                f, fb = fns(impl, variant, cfg)
                t0 = time.perf_counter()
                jax.block_until_ready(fb(q, k, v, do))
                jax.block_until_ready(f(q, k, v))
                restore_env(saved)
                rec["compile_s"] = round(time.perf_counter() - t0, 1)
                rec["fwd"] = time_jax(f, q, k, v, iters=args.iters)
                rec["fwd_bwd"] = time_jax(fb, q, k, v, do, iters=args.iters)
                ff = flops(variant, batch, n)
                rec["fwd_tflops"] = ff / (rec["fwd"]["ms"] * 1e-3) / 1e12
                rec["fwd_bwd_tflops"] = 3.5 * ff / (rec["fwd_bwd"]["ms"] * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001
                rec["error"] = short(e)
                restore_env(saved)
            rows.append(rec)
            if "error" in rec:
                log(f"time {impl} {variant} {batch}x{n} {cfg}: ERROR {rec['error']}")
            else:
                g = lambda r: "-" if r.get("ms_gpu") is None else f"{r['ms_gpu']:.3f}"  # noqa: E731
                log(f"time {impl:5s} {variant:22s} {batch}x{n} {json.dumps(cfg):50s} fwd {rec['fwd']['ms']:.3f} "
                    f"(pipe {rec['fwd']['ms_pipelined']:.3f}, GPU {g(rec['fwd'])}) fwd+bwd {rec['fwd_bwd']['ms']:.3f} "
                    f"(pipe {rec['fwd_bwd']['ms_pipelined']:.3f}, GPU {g(rec['fwd_bwd'])}) ms "
                    f"| {rec['fwd_tflops']:.0f} / {rec['fwd_bwd_tflops']:.0f} TF/s | compile {rec['compile_s']}s"
                    + (f" | fwd+bwd at {c}" if (c := clocks_text(rec["fwd_bwd"].get("clocks"))) else ""))
                for part in ("fwd", "fwd_bwd"):
                    if rec[part].get("kernels_us"):
                        log(f"     {part} kernels µs/call: " + ", ".join(
                            f"{k[:40]}={v}" for k, v in list(rec[part]["kernels_us"].items())[:6]))
    return rows


# -- stress / profile: the three kernels called one by one -------------------------------------------


def split_fns(batch: int, n: int, variant: str, options: dict, heads: int = H, dim: int = D):
    """Jitted ``fwd(q,k,v) -> (out, lse2)``, ``dq(q,k,v,do,lse2,out) -> (dq, delta)``,
    ``dkv(q,k,v,do,lse2,delta) -> (dk, dv)``.

    The kernels of :func:`mg.attention`'s custom VJP, on shapes that need no padding (``n`` a multiple
    of the tiles, ``dim`` 64 or 128), with no GQA (``K = H``).
    """
    fwd_mod, bwd_mod = mg._kernels()
    spec = masks.make(variant, num_heads=heads, band_len=None)
    plan = mg.make_plan((batch, n, heads, dim), (batch, n, heads, dim), spec, scale=None, segments=False,
                        config=mg.make_config(**options))
    if (plan.q_pad, plan.kv_pad, plan.head_dim) != (n, n, dim):
        raise ValueError(f"split_fns needs an unpadded shape, got n={n} (pads to {plan.q_pad}), dim={dim}")
    return dict(
        fwd=jax.jit(lambda q, k, v: fwd_mod.forward(plan, q, k, v, None, None)),
        dq=jax.jit(lambda q, k, v, do, l2, out: bwd_mod.backward_dq(plan, q, k, v, do, l2, out, None, None)),
        dkv=jax.jit(lambda q, k, v, do, l2, dl: bwd_mod.backward_dkv(plan, q, k, v, do, l2, dl, None, None)),
    )


class Watchdog:
    """Catches a stall: prints the stage, all Python stacks, a cuda-gdb view of the GPU, then exits 3."""

    def __init__(self, out: Path, use_gdb: bool, counts: dict):
        self.out, self.use_gdb, self.counts = out, use_gdb, counts
        self.label, self.limit, self.t0 = "start", 600.0, time.monotonic()
        threading.Thread(target=self._run, daemon=True).start()

    def progress(self, label: str, limit: float):
        self.label, self.limit, self.t0 = label, limit, time.monotonic()

    def _run(self):
        while True:
            time.sleep(0.5)
            if time.monotonic() - self.t0 > self.limit:
                break
        log(f"HANG: no progress for {self.limit:.0f}s in stage '{self.label}' (pid {os.getpid()})")
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        if self.use_gdb:
            try:
                gdb_dump(os.getpid(), self.out)
            except Exception as e:  # noqa: BLE001
                log(f"cuda-gdb failed: {e!r}")
        c = self.counts
        log(f"RESULT pass={c['pass']} fail={c['fail']} hang=1 hang_stage={self.label}")
        sys.stdout.flush()
        os._exit(3)


def _gdb(pid: int, cmds: list, timeout: float) -> str:
    args = ["cuda-gdb", "-q", "-nx", "-batch", "-p", str(pid), "-ex", "set pagination off", "-ex", "set confirm off"]
    for c in cmds:
        args += ["-ex", c]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        return f"(cuda-gdb timed out after {timeout}s)\n" + (e.stdout or b"").decode(errors="replace")[-4000:]


def gdb_dump(pid: int, out: Path) -> None:
    """Two cuda-gdb attaches: the running kernels and blocks, then each warpgroup's SASS at its PC."""
    if shutil.which("cuda-gdb") is None:
        log("cuda-gdb: not installed")
        return
    try:  # let a child attach to us even under Yama ptrace_scope=1 (PR_SET_PTRACER, PR_SET_PTRACER_ANY)
        import ctypes

        ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)
    except Exception:  # noqa: BLE001
        pass
    text = _gdb(pid, ["info cuda kernels", "info cuda blocks"], timeout=45)
    log("## cuda-gdb: info cuda kernels / blocks\n" + text[-6000:])
    blocks = []
    for line in text.splitlines():  # "*  (0,0,0)     (191,0,0)   192 running" (ranges of blocks)
        parts = [p for p in line.replace("*", " ").split() if p.startswith("(") and p.endswith(")")]
        if parts and "running" in line:
            blocks.append(parts[0])
    cmds = []
    for blk in blocks[:2]:
        cmds += [f"cuda block {blk} thread (0,0,0)", "info cuda warps"]
        for tid in (0, 96, 128, 224, 256, 352):  # first and last warp of each warpgroup
            cmds += [f"cuda block {blk} thread ({tid},0,0)", "x/4i $pc"]
    text2 = _gdb(pid, cmds, timeout=60) if cmds else "(no running CUDA blocks: the hang is on the host)\n"
    log("## cuda-gdb: warps and SASS at the PC of each warpgroup's first and last warp\n" + text2[-8000:])
    full = "## info cuda kernels / blocks\n" + text + "\n## per-warpgroup PCs\n" + text2
    (out / "mgpu_hang_gdb.log").write_text(full)


def stage_stress(args) -> list:
    batch, n = (int(x) for x in args.shapes.split(",")[0].split("x"))
    variant = args.masks.split(",")[0]
    options = json.loads(args.options) if args.options else {}
    modes = args.modes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"pass": 0, "fail": 0}
    dog = Watchdog(out, use_gdb=not args.no_gdb, counts=counts)
    dog.progress("compile", args.compile_s)
    log(f"# stress {batch}x{n} {variant} options={options} modes={modes} iters={args.iters}")
    # Compile everything first, so that every call below is held to --stall-s (a Mosaic GPU kernel still
    # loads its module on the first call: well under a second).
    f = split_fns(batch, n, variant, options)
    spec = masks.make(variant, num_heads=H, band_len=None)

    def joint_fn(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: mg.attention(q, k, v, mask=spec, **options), q, k, v)
        return o, vjp(do)

    def ref_fn(q, k, v, do):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        o, vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, mask=spec), *f32)
        return o, vjp(do.astype(jnp.float32))

    t0 = time.perf_counter()
    x = jax.ShapeDtypeStruct((batch, n, H, D), jnp.bfloat16)
    c = {}
    if "split" in modes:
        out_, l2 = jax.eval_shape(f["fwd"], x, x, x)
        dl = jax.eval_shape(f["dq"], x, x, x, x, l2, out_)[1]
        c.update(fwd=f["fwd"].lower(x, x, x).compile(),
                 dq=f["dq"].lower(x, x, x, x, l2, out_).compile(), dkv=f["dkv"].lower(x, x, x, x, l2, dl).compile())
    if "joint" in modes:
        c["joint"] = jax.jit(joint_fn).lower(x, x, x, x).compile()
    if not args.no_ref:
        c["ref"] = jax.jit(ref_fn).lower(x, x, x, x).compile()
    log(f"compiled {sorted(c)} in {time.perf_counter() - t0:.1f}s")
    rows = []
    for it in range(args.iters):
        mode = modes[it % len(modes)]
        q, k, v, do = make_inputs(batch, n, seed=args.seed0 + it)
        t0 = time.perf_counter()
        times = {}
        if mode == "split":
            dog.progress(f"iter {it} split fwd", args.stall_s)
            out_, lse2 = jax.block_until_ready(c["fwd"](q, k, v))
            times["fwd"] = time.perf_counter() - t0
            dog.progress(f"iter {it} split dq", args.stall_s)
            t1 = time.perf_counter()
            dq, delta = jax.block_until_ready(c["dq"](q, k, v, do, lse2, out_))
            times["dq"] = time.perf_counter() - t1
            dog.progress(f"iter {it} split dkv", args.stall_s)
            t1 = time.perf_counter()
            dk, dv = jax.block_until_ready(c["dkv"](q, k, v, do, lse2, delta))
            times["dkv"] = time.perf_counter() - t1
        else:
            dog.progress(f"iter {it} joint fwd+bwd", args.stall_s)
            out_, (dq, dk, dv) = jax.block_until_ready(c["joint"](q, k, v, do))
            times["fwd+bwd"] = time.perf_counter() - t0
        rec = dict(iter=it, mode=mode, seconds={k_: round(t, 4) for k_, t in times.items()})
        if not args.no_ref:
            dog.progress(f"iter {it} reference", args.stall_s)
            o_ref, (dq_r, dk_r, dv_r) = jax.block_until_ready(c["ref"](q, k, v, do))
            errs = {"out": rel_err(out_, o_ref), "dq": rel_err(dq, dq_r), "dk": rel_err(dk, dk_r),
                    "dv": rel_err(dv, dv_r)}
            rec["errors"] = errs
            rec["ok"] = all(np.isfinite(e) and e <= TOL[k_] for k_, e in errs.items())
        else:
            rec["ok"] = bool(np.all(np.isfinite(np.asarray(out_, np.float32))))
        counts["pass" if rec["ok"] else "fail"] += 1
        rows.append(rec)
        log(f"iter {it:2d} {mode:5s} ok={rec['ok']} "
            + " ".join(f"{k_}={v_:.2e}" for k_, v_ in rec.get("errors", {}).items())
            + " | " + " ".join(f"{k_} {1e3 * t:.1f}ms" for k_, t in times.items()))
    dog.progress("done", 1e9)
    log(f"RESULT pass={counts['pass']} fail={counts['fail']} hang=0")
    return rows


def stage_profile(args) -> list:
    """Each kernel once per mask (after compiling everything), for ncu's kernel filter and launch count."""
    batch, n = (int(x) for x in args.shapes.split(",")[0].split("x"))
    options = json.loads(args.options) if args.options else {}
    rows = []
    staged = []
    for variant in args.masks.split(","):
        f = split_fns(batch, n, variant, options)
        q, k, v, do = make_inputs(batch, n)
        out_, l2 = jax.eval_shape(f["fwd"], q, k, v)
        compiled = dict(fwd=f["fwd"].lower(q, k, v).compile())
        dl = jax.eval_shape(f["dq"], q, k, v, do, l2, out_)[1]
        compiled["dq"] = f["dq"].lower(q, k, v, do, l2, out_).compile()
        compiled["dkv"] = f["dkv"].lower(q, k, v, do, l2, dl).compile()
        staged.append((variant, compiled, (q, k, v, do)))
        log(f"compiled {variant} {batch}x{n}")
    for variant, c, (q, k, v, do) in staged:
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out_, l2 = jax.block_until_ready(c["fwd"](q, k, v))
            t1 = t2 = time.perf_counter()
            _, dl = jax.block_until_ready(c["dq"](q, k, v, do, l2, out_))
            t3 = time.perf_counter()
            jax.block_until_ready(c["dkv"](q, k, v, do, l2, dl))
            t4 = time.perf_counter()
            rec = dict(variant=variant, shape=f"{batch}x{n}", fwd_ms=1e3 * (t1 - t0), dq_ms=1e3 * (t3 - t2),
                       dkv_ms=1e3 * (t4 - t3))
            rows.append(rec)
            log(f"profile {variant:22s} {batch}x{n} fwd {rec['fwd_ms']:.3f} dq {rec['dq_ms']:.3f} "
                f"dkv {rec['dkv_ms']:.3f} ms (synced, first calls)")
    return rows


def summarize_trace(path: Path) -> dict:
    """Per-warpgroup totals of one Mosaic GPU profiler trace (``SPATTN_MGPU_TRACE``).

    Events carry SM clock cycles (``ts * 1e3`` within one warpgroup's track). For consumers
    (warpgroups 0, 1) and the producer (2) separately: per scope the mean count, mean cycles per
    occurrence and mean total per warpgroup track, its share of the track's span, and the share
    left outside every scope; plus the mean and max span (first to last event) over tracks.
    """
    events = json.loads(path.read_text())["traceEvents"]
    tracks: dict = {}
    for e in events:
        tracks.setdefault(e["tid"], []).append(e)
    out = {}
    for role, wgs in (("consumer", (0, 1)), ("producer", (2,))):
        spans, totals, counts = [], {}, {}
        for tid, evs in tracks.items():
            if (tid - 1) % 3 not in wgs:
                continue
            stack, scoped = [], 0.0
            for e in evs:
                t = e["ts"] * 1e3
                if e["ph"] == "B":
                    stack.append((e["name"], t))
                    continue
                name, t0 = stack.pop()
                if name == "Init":
                    continue
                totals[name] = totals.get(name, 0.0) + (t - t0)
                counts[name] = counts.get(name, 0) + 1
                if not stack or stack[-1][0] == "Init":
                    scoped += t - t0
            first = min(e["ts"] for e in evs if e["name"] != "Init") * 1e3
            last = max(e["ts"] for e in evs if e["name"] != "Init") * 1e3
            spans.append(last - first)
            totals["(outside scopes)"] = totals.get("(outside scopes)", 0.0) + (last - first - scoped)
        n = max(len(spans), 1)
        mean_span = float(np.mean(spans)) if spans else 0.0
        out[role] = dict(
            tracks=len(spans), span_cycles_mean=mean_span, span_cycles_max=float(np.max(spans)) if spans else 0.0,
            scopes={k: dict(count=counts.get(k, 0) / n, cycles_each=v / max(counts.get(k, 1), 1),
                            cycles_total=v / n, share=v / n / max(mean_span, 1.0))
                    for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        )
    return out


def stage_trace(args) -> list:
    """Mosaic GPU in-kernel profiler traces of the forward, dQ and dK/dV kernels, one call each.

    ``SPATTN_MGPU_TRACE`` is set per kernel before it is traced, so each call dumps its own trace into
    ``<out>/traces/<mask>_<kernel>/``; the summary (:func:`summarize_trace`) is printed and returned.
    The untraced kernels are timed in the same process (GPU µs per kernel) for the cycle-to-µs scale.
    """
    batch, n = (int(x) for x in args.shapes.split(",")[0].split("x"))
    options = json.loads(args.options) if args.options else {}
    rows = []
    for variant in args.masks.split(","):
        q, k, v, do = make_inputs(batch, n)
        plain = split_fns(batch, n, variant, options)
        out_, l2 = plain["fwd"](q, k, v)
        _, dl = plain["dq"](q, k, v, do, l2, out_)
        calls = dict(fwd=(q, k, v), dq=(q, k, v, do, l2, out_), dkv=(q, k, v, do, l2, dl))
        for kernel, call_args in calls.items():
            rec = dict(variant=variant, shape=f"{batch}x{n}", kernel=kernel, options=options)
            rec["time"] = time_jax(plain[kernel], *call_args, iters=args.iters)
            folder = Path(args.out) / "traces" / f"{variant}_{batch}x{n}_{kernel}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            os.environ["SPATTN_MGPU_TRACE"] = str(folder)
            try:
                traced = split_fns(batch, n, variant, options)[kernel]
                jax.block_until_ready(traced(*call_args))
                jax.effects_barrier()
                trace = sorted(folder.glob("*.json"))[-1]
                rec["summary"] = summarize_trace(trace)
                with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:  # perfetto opens .json.gz
                    shutil.copyfileobj(src, dst)
                trace.unlink()
            except Exception as e:  # noqa: BLE001
                rec["error"] = short(e)
            finally:
                os.environ.pop("SPATTN_MGPU_TRACE", None)
            rows.append(rec)
            gpu = rec["time"].get("ms_gpu")
            log(f"trace {variant} {batch}x{n} {kernel}: GPU {gpu if gpu is None else round(1e3 * gpu, 1)} µs")
            if "error" in rec:
                log(f"  ERROR {rec['error']}")
                continue
            for role, summ in rec["summary"].items():
                log(f"  {role}: {summ['tracks']} tracks, span mean {summ['span_cycles_mean']:.0f} max "
                    f"{summ['span_cycles_max']:.0f} cycles")
                for name, sc in summ["scopes"].items():
                    log(f"    {name:18s} x{sc['count']:6.1f}  {sc['cycles_each']:8.0f} cyc each  "
                        f"{sc['cycles_total']:9.0f} total  {100 * sc['share']:5.1f}%")
    return rows


# -- protocol: the kernels' barrier protocol, simulated from their jaxprs (CPU, no GPU) -----------------
#
# Every warpgroup of a CTA interprets the *same kernel jaxpr* that Mosaic GPU lowers (scalar control
# flow evaluated exactly from the static work list / run tables, array math skipped), and a scheduler
# interleaves the three warpgroups and the TMA engine at random. mbarriers are modelled as on sm90:
# ``Barrier(num_arrivals=N)`` completes a phase after N warpgroup arrivals (or N TMA copies), and
# every wait uses the *waiter's own* parity bit (Mosaic keeps one bit per barrier per thread, flipped
# by each wait). Reported: deadlocks (nobody can move; which barrier each warpgroup waits on), parity
# aliasing (a waiter two or more phases behind: it would pass or block on the wrong phase), a TMA
# armed on a barrier phase that is already fully armed (transaction bytes of two phases mixed),
# TMA phases that no warpgroup waited for (a copy may land after the CTA moved on or exited), and
# L2 prefetches (``Config.prefetch``) that no later TMA load of the CTA reads from (wasted traffic:
# the prefetch named the wrong unit's rows). Shared-memory reuse is checked too (scratch buffers are
# tracked per CTA, down to the indexed window): a TMA store reads its source until its issuer's
# ``wait_smem_to_gmem`` covers its commit group, and a TMA load writes its destination until it lands;
# a TMA load or a register store into a window that a pending store still reads, a register store
# into a window a load is still writing, and a warpgroup exiting with stores still reading are
# reported.


class _Unknown:
    __slots__ = ()

    def __repr__(self):
        return "?"


UNK = _Unknown()


class SimBuffer:
    """Any ref whose contents the protocol does not need (SMEM buffers, GMEM tensors). Scratch buffers
    carry a ``name`` and are shared by a CTA's warpgroups, for the shared-memory reuse checks."""

    def __init__(self, name: str | None = None):
        self.name = name


class SimTable:
    """A GMEM int table with its concrete values (work list, run table, interval table)."""

    def __init__(self, arr):
        self.arr = np.asarray(arr)


class SimBarrier:
    def __init__(self, name: str, num: int, arrivals: int):
        self.name, self.arrivals = name, arrivals
        self.phase = [0] * num  # completed phases
        self.count = [0] * num  # arrivals in the current phase
        self.inflight = [0] * num  # TMA copies issued, not landed
        self.tma = [0] * num  # TMA copies issued in total

    def arrive(self, i: int):
        self.count[i] += 1
        if self.count[i] == self.arrivals:
            self.count[i] = 0
            self.phase[i] += 1


class ProtocolError(Exception):
    pass


class _Ctx:
    def __init__(self, cta_state, axes, names):
        self.cta, self.axes, self.names = cta_state, axes, names


class _CtaState:
    def __init__(self):
        self.alloc = {}
        self.barriers = []
        self.gmem = []  # ("load" | "prefetch" | "store", ref, ((start, size) per dim)) in issue order
        self.store_reads = []  # [wg, commit group or None (not committed yet), buffer, box] of TMA stores
        self.groups = {}  # wg -> commit groups so far
        self.loads = []  # (buffer, box) of TMA loads not landed
        self.problems = []


def _smem_box(transforms):
    """``[[start, stop], ...]`` of a shared-memory ref's window over the dims of its first indexer (its
    logical shape), composing chained indexers; ``None``: the whole buffer. Data-dependent indices and
    any transform after the first indexer widen the window (conservative)."""
    box, alive = None, []
    for t in transforms:
        if not hasattr(t, "indices"):
            if box is not None:
                break
            continue  # swizzle and tiling views: the logical shape is the first indexer's
        if box is None:
            box, alive = [[0, int(n)] for n in t.shape], list(range(len(t.shape)))
        kept = []
        for d, idx in zip(alive, t.indices):
            lo = box[d][0]
            if isinstance(idx, state_indexing.Slice):
                kept.append(d)
                if _concrete(idx.start):
                    box[d] = [lo + int(idx.start), lo + int(idx.start) + int(idx.size) * int(idx.stride)]
            elif _concrete(idx):
                box[d] = [lo + int(idx), lo + int(idx) + 1]
        alive = kept + alive[len(t.indices) :]
    return box


def _overlap(box_a, box_b) -> bool:
    if box_a is None or box_b is None or len(box_a) != len(box_b):
        return True
    return all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(box_a, box_b))


def _smem_target(ref, transforms):
    """``(buffer, box)`` of a scratch ref, ``None`` for anything else (GMEM, accumulators)."""
    if not isinstance(ref, SimBuffer) or ref.name is None:
        return None
    return ref, _smem_box(transforms)


def _hits(windows, target) -> bool:
    """Whether any ``(buffer, box)`` of ``windows`` overlaps ``target``."""
    return any(b is target[0] and _overlap(box, target[1]) for b, box in windows)


def _still_read(cta, target) -> bool:
    return _hits(((b, box) for _, _, b, box in cta.store_reads), target)


def _next_group(cta, wg) -> int:
    """Number the warpgroup's next TMA store commit group."""
    cta.groups[wg] = cta.groups.get(wg, 0) + 1
    return cta.groups[wg]


def _box_str(target) -> str:
    buf, box = target
    return buf.name + ("" if box is None else "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]")


def unused_prefetches(log) -> list:
    """The prefetches of a CTA's GMEM log that no load reads inside of before the next prefetch of the
    same tensor (each prefetch is for the CTA's *next* unit, whose loads come before its own prefetch)."""
    unused = []
    for i, (kind, ref, win) in enumerate(log):
        if kind != "prefetch":
            continue
        hit = False
        for k, r, w in log[i + 1 :]:
            if r is not ref:
                continue
            if k == "prefetch":
                break
            if len(w) == len(win) and all(s0 <= s1 and s1 + n1 <= s0 + n0 for (s0, n0), (s1, n1) in zip(win, w)):
                hit = True
                break
        if not hit:
            unused.append(win)
    return unused


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jax_core.ClosedJaxpr):
                yield x.jaxpr, x.consts
            elif isinstance(x, jax_core.Jaxpr):
                yield x, ()


def _has_barrier_ops(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("barrier_arrive", "barrier_wait", "copy_gmem_to_smem"):
            return True
        if any(_has_barrier_ops(j) for j, _ in _sub_jaxprs(eqn)):
            return True
    return False


def _concrete(x) -> bool:
    return isinstance(x, (int, bool, float, np.generic)) or (isinstance(x, np.ndarray) and x.shape == ())


def _idiv(a, b):
    q = np.abs(a) // np.abs(b)
    return (q * np.sign(a) * np.sign(b)).astype(np.asarray(a).dtype)


_FAST = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "max": np.maximum,
    "min": np.minimum,
    "lt": lambda a, b: np.bool_(a < b),
    "le": lambda a, b: np.bool_(a <= b),
    "gt": lambda a, b: np.bool_(a > b),
    "ge": lambda a, b: np.bool_(a >= b),
    "eq": lambda a, b: np.bool_(a == b),
    "ne": lambda a, b: np.bool_(a != b),
    "and": lambda a, b: a & b,
    "or": lambda a, b: a | b,
    "not": lambda a: np.logical_not(a) if np.asarray(a).dtype == bool else np.invert(a),
    "neg": lambda a: -a,
    "sign": np.sign,
    "div": _idiv,
    "rem": np.fmod,
    "select_n": lambda p, *cases: cases[int(p)],
}


def _pure(eqn, invals):
    outs = eqn.outvars
    scalar = all(getattr(v.aval, "shape", None) == () for v in outs) and all(_concrete(x) for x in invals)
    if not scalar or not outs:
        if eqn.effects and any(_has_barrier_ops(j) for j, _ in _sub_jaxprs(eqn)):
            raise ProtocolError(f"unhandled primitive with barrier operations inside: {eqn.primitive.name}")
        res = [UNK] * len(outs)
    else:
        name = eqn.primitive.name
        vals = [np.asarray(x)[()] for x in invals]
        if name in _FAST:
            res = [np.asarray(_FAST[name](*vals))[()]]
        elif name == "convert_element_type":
            res = [np.asarray(vals[0]).astype(eqn.params["new_dtype"])[()]]
        else:
            out = eqn.primitive.bind(*vals, **eqn.params)
            res = [np.asarray(o)[()] for o in (out if eqn.primitive.multiple_results else [out])]
    return res if eqn.primitive.multiple_results else res[0]


def _eval(jaxpr, consts, args, ctx):
    env = {}

    def read(v):
        return v.val if isinstance(v, jax_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        rule = _RULES.get(eqn.primitive.name)
        if rule is not None:
            outs = yield from rule(eqn, invals, ctx)
        elif eqn.primitive.name in _CALLS:
            sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            if not eqn.effects and not _has_barrier_ops(getattr(sub, "jaxpr", sub)) and any(
                not _concrete(x) for x in invals
            ):
                outs = [UNK] * len(eqn.outvars)
            else:
                j, c = (sub.jaxpr, sub.consts) if isinstance(sub, jax_core.ClosedJaxpr) else (sub, ())
                outs = yield from _eval(j, c, invals, ctx)
            outs = outs if eqn.primitive.multiple_results else outs[0]
        else:
            outs = _pure(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jax_core.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat", "checkpoint")


def _index(x, what):
    if x is UNK or not _concrete(x):
        raise ProtocolError(f"{what} depends on data the protocol does not track")
    return int(x)


def _window(transforms, what):
    """``((start, size), ...)`` of a chain of NDIndexers (an integer index has size 1)."""
    out = []
    for t in transforms:
        for d in getattr(t, "indices", ()):
            if isinstance(d, state_indexing.Slice):
                out.append((d.start if isinstance(d.start, int) else _index(d.start, what), int(d.size)))
            else:
                out.append((_index(d, what), 1))
    return tuple(out)


def _resolve(transforms, what):
    """Integer indices of a chain of NDIndexers (full slices give 0)."""
    return [start for start, _ in _window(transforms, what)]


def _rule_get(eqn, invals, ctx):
    ref, *flat = invals
    if isinstance(ref, SimTable) and eqn.outvars[0].aval.shape == ():
        idx = _resolve(jax.tree_util.tree_unflatten(eqn.params["tree"], flat), "table index")
        return np.asarray(ref.arr[tuple(idx)])[()]
    return UNK
    yield


def _barrier_slot(barrier, transforms):
    idx = _resolve(transforms, f"barrier index of {barrier.name}")
    i = idx[0] if idx else 0
    if not 0 <= i < len(barrier.phase):
        raise ProtocolError(f"barrier {barrier.name}[{i}] out of range")
    return i


def _rule_barrier(kind):
    def rule(eqn, invals, ctx):
        barrier, *flat = invals
        transforms = jax.tree_util.tree_unflatten(eqn.params["transforms_treedef"], flat)
        yield (kind, barrier, _barrier_slot(barrier, transforms))
        return []

    return rule


def _rule_copy_in(eqn, invals, ctx):
    src, dst, barrier, *flat = invals
    p = eqn.params
    n_src, n_dst = p["src_transforms_treedef"].num_leaves, p["dst_transforms_treedef"].num_leaves
    transforms = jax.tree_util.tree_unflatten(p["barrier_transforms_treedef"], flat[n_src + n_dst :])
    src_window = _window(jax.tree_util.tree_unflatten(p["src_transforms_treedef"], flat[:n_src]), "copy source")
    target = _smem_target(dst, jax.tree_util.tree_unflatten(p["dst_transforms_treedef"], flat[n_src : n_src + n_dst]))
    ctx.cta.gmem.append(("load", src, src_window))
    yield ("tma", barrier, _barrier_slot(barrier, transforms), target)
    return []


def _rule_copy_out(eqn, invals, ctx):
    src, dst, *flat = invals
    p = eqn.params
    n_src, n_dst = p["src_transforms_treedef"].num_leaves, p["dst_transforms_treedef"].num_leaves
    window = _window(jax.tree_util.tree_unflatten(p["dst_transforms_treedef"], flat[n_src : n_src + n_dst]), "store")
    ctx.cta.gmem.append(("store", dst, window))
    target = _smem_target(src, jax.tree_util.tree_unflatten(p["src_transforms_treedef"], flat[:n_src]))
    if target is not None:
        wg = ctx.axes["wg"]
        group = _next_group(ctx.cta, wg) if p["commit_group"] else None
        ctx.cta.store_reads.append([wg, group, *target])
    return []
    yield


def _rule_commit_group(eqn, invals, ctx):
    wg = ctx.axes["wg"]
    group = _next_group(ctx.cta, wg)
    for r in ctx.cta.store_reads:
        if r[0] == wg and r[1] is None:
            r[1] = group
    return []
    yield


def _rule_wait_stores(eqn, invals, ctx):
    # Reads are done once at most the n most recent commit groups of this warpgroup are in flight
    # (with or without ``wait_read_only``: waiting for the writes waits for the reads too).
    wg, n = ctx.axes["wg"], _index(invals[0], "wait_smem_to_gmem count")
    done = ctx.cta.groups.get(wg, 0) - n
    ctx.cta.store_reads = [r for r in ctx.cta.store_reads if not (r[0] == wg and r[1] is not None and r[1] <= done)]
    return []
    yield


def _rule_swap(eqn, invals, ctx):
    ref, _, *flat = invals
    target = _smem_target(ref, jax.tree_util.tree_unflatten(eqn.params["tree"], flat))
    if target is not None:
        where = f"wg{ctx.axes['wg']}: register store into {_box_str(target)}"
        if _still_read(ctx.cta, target):
            ctx.cta.problems.append(f"{where} while a TMA store may still read it")
        if _hits(ctx.cta.loads, target):
            ctx.cta.problems.append(f"{where} while a TMA load writes it")
    return [UNK] * len(eqn.outvars) if eqn.primitive.multiple_results else UNK
    yield


def _rule_prefetch(eqn, invals, ctx):
    ref, *flat = invals
    window = _window(jax.tree_util.tree_unflatten(eqn.params["ref_transforms_treedef"], flat), "prefetch")
    ctx.cta.gmem.append(("prefetch", ref, window))
    return []
    yield


def _rule_axis_index(eqn, invals, ctx):
    return np.int32(ctx.axes[eqn.params["axis_name"]])
    yield


def _rule_run_scoped(eqn, invals, ctx):
    inner = eqn.params["jaxpr"]
    objs = []
    for v in inner.invars:
        dtype = getattr(getattr(v.aval, "inner_aval", None), "dtype", None)
        if type(dtype).__name__ == "BarrierType":
            if v not in ctx.cta.alloc:
                j = len(ctx.cta.barriers)
                name = ctx.names[j] if j < len(ctx.names) else f"barrier{j}"
                b = SimBarrier(name, int(np.prod(v.aval.shape)), int(dtype.num_arrivals))
                ctx.cta.alloc[v] = b
                ctx.cta.barriers.append(b)
            objs.append(ctx.cta.alloc[v])
        else:
            if v not in ctx.cta.alloc:
                ctx.cta.alloc[v] = SimBuffer(f"scratch{len(ctx.cta.alloc) - len(ctx.cta.barriers)}")
            objs.append(ctx.cta.alloc[v])
    outs = yield from _eval(inner, invals, objs, ctx)
    return outs


def _rule_cond(eqn, invals, ctx):
    branches = eqn.params["branches"]
    i = min(max(_index(invals[0], "a pl.when / lax.cond predicate"), 0), len(branches) - 1)
    b = branches[i]
    outs = yield from _eval(b.jaxpr, b.consts, invals[1:], ctx)
    return outs


def _rule_while(eqn, invals, ctx):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
    while True:
        (pred,) = yield from _eval(cj.jaxpr, cj.consts, cconsts + carry, ctx)
        if not _index(pred, "a loop condition"):
            return carry
        carry = yield from _eval(bj.jaxpr, bj.consts, bconsts + carry, ctx)


def _rule_scan(eqn, invals, ctx):
    p = eqn.params
    nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    body = p["jaxpr"]
    n_ys = len(eqn.outvars) - ncarry
    for i in range(length):
        it = length - 1 - i if p.get("reverse") else i
        x = [np.asarray(a)[it][()] if isinstance(a, np.ndarray) else UNK for a in xs]
        outs = yield from _eval(body.jaxpr, body.consts, consts + carry + x, ctx)
        carry = outs[:ncarry]
    return carry + [UNK] * n_ys


def _rule_run_state(eqn, invals, ctx):
    inner = eqn.params["jaxpr"]
    if _has_barrier_ops(inner):
        # Closed-over refs (e.g. the ping-pong barrier) come first among the operands; the rest are
        # the accumulators, which the protocol does not look into.
        args = [x if isinstance(x, SimBarrier) else SimBuffer() for x in invals]
        args += [SimBuffer()] * (len(inner.invars) - len(args))
        yield from _eval(inner, [], args[: len(inner.invars)], ctx)
    return [UNK] * len(eqn.outvars)


_RULES = {
    "get": _rule_get,
    "barrier_arrive": _rule_barrier("arrive"),
    "barrier_wait": _rule_barrier("wait"),
    "copy_gmem_to_smem": _rule_copy_in,
    "async_prefetch": _rule_prefetch,
    "copy_smem_to_gmem": _rule_copy_out,
    "commit_group": _rule_commit_group,
    "wait_smem_to_gmem": _rule_wait_stores,
    "swap": _rule_swap,
    "axis_index": _rule_axis_index,
    "run_scoped": _rule_run_scoped,
    "cond": _rule_cond,
    "while": _rule_while,
    "scan": _rule_scan,
    "run_state": _rule_run_state,
}


def find_kernel(closed) -> tuple:
    """(kernel jaxpr, kernel args, grid, num_threads) of the one Mosaic GPU kernel in ``closed``."""
    found = []

    def walk(jaxpr, values):
        for eqn in jaxpr.eqns:
            vals = [v.val if isinstance(v, jax_core.Literal) else values.get(v) for v in eqn.invars]
            if eqn.primitive.name == "mpmd_map" or "meshes" in eqn.params:
                found.append((eqn, vals))
                continue
            for sub, consts in _sub_jaxprs(eqn):
                inner = dict(zip(sub.constvars, consts))
                if len(sub.invars) == len(vals):
                    inner.update({v: x for v, x in zip(sub.invars, vals) if x is not None})
                walk(sub, inner)

    walk(closed.jaxpr, dict(zip(closed.jaxpr.constvars, closed.consts)))
    if len(found) != 1:
        raise ProtocolError(f"expected one Mosaic GPU kernel, found {len(found)}")
    eqn, vals = found[0]
    (mesh,) = eqn.params["meshes"]
    (kjaxpr,) = eqn.params["jaxprs"]
    args = [SimTable(np.asarray(x)) if x is not None and np.asarray(x).dtype.kind == "i" else SimBuffer() for x in vals]
    args += [SimBuffer() for _ in range(len(kjaxpr.invars) - len(args))]
    return kjaxpr, args, tuple(mesh.grid), int(mesh.num_threads)


POLICIES = ("uniform", "producer_first", "consumers_first", "wg1_slow", "tma_slow")


def simulate_cta(kjaxpr, args, cta: int, num_threads: int, names, policy: str, seed: int, max_events: int = 10**7):
    """Run one CTA's warpgroups to the end or to a deadlock; returns a dict of findings."""
    rng = random.Random(seed)
    st = _CtaState()
    problems = []
    agents = []
    for wg in range(num_threads):
        ctx = _Ctx(st, {"cta": cta, "wg": wg}, names)
        agents.append(dict(wg=wg, gen=_eval(kjaxpr, [], args, ctx), event=None, done=False, waits={}, n=0))

    def advance(a):
        try:
            a["event"] = next(a["gen"])
        except StopIteration:
            a["event"], a["done"] = None, True

    def ready(a):
        if a["done"]:
            return False
        kind, b, i = a["event"][:3]
        if kind != "wait":
            return True
        k = a["waits"].get((id(b), i), 0)
        return b.phase[i] % 2 != k % 2

    landings = []
    for a in agents:
        advance(a)
    for _ in range(max_events):
        runnable = [a for a in agents if ready(a)]
        if not runnable and not landings:
            break
        producer = num_threads - 1
        if policy == "producer_first" and any(a["wg"] == producer for a in runnable):
            runnable = [a for a in runnable if a["wg"] == producer]
        elif policy == "consumers_first" and any(a["wg"] != producer for a in runnable):
            runnable = [a for a in runnable if a["wg"] != producer]
        elif policy == "wg1_slow" and len(runnable) > 1 and rng.random() < 0.9:
            runnable = [a for a in runnable if a["wg"] != 1] or runnable
        land_p = 0.05 if policy == "tma_slow" else 0.5
        if landings and (not runnable or rng.random() < land_p):
            b, i, target = landings.pop(rng.randrange(len(landings)))
            if target is not None:
                st.loads.remove(target)
            b.inflight[i] -= 1
            b.arrive(i)
            continue
        a = rng.choice(runnable)
        kind, b, i = a["event"][:3]
        a["n"] += 1
        if kind == "arrive":
            b.arrive(i)
        elif kind == "tma":
            if b.count[i] + b.inflight[i] >= b.arrivals:
                problems.append(f"wg{a['wg']}: TMA on {b.name}[{i}] while phase {b.phase[i]} is already fully armed")
            target = a["event"][3]
            if target is not None:
                if _still_read(st, target):
                    problems.append(f"wg{a['wg']}: TMA load into {_box_str(target)} "
                                    "while a TMA store may still read it")
                st.loads.append(target)
            b.inflight[i] += 1
            b.tma[i] += 1
            landings.append((b, i, target))
        else:
            k = a["waits"].get((id(b), i), 0)
            if b.phase[i] >= k + 2:
                problems.append(f"wg{a['wg']}: parity aliasing on {b.name}[{i}]: wait #{k} sees phase {b.phase[i]}")
            a["waits"][(id(b), i)] = k + 1
        advance(a)
    else:
        raise ProtocolError("event budget exhausted (livelock?)")
    deadlock = None
    if not all(a["done"] for a in agents):
        deadlock = []
        for a in agents:
            if a["done"]:
                deadlock.append(f"wg{a['wg']} done")
            else:
                kind, b, i = a["event"][:3]
                k = a["waits"].get((id(b), i), 0)
                deadlock.append(f"wg{a['wg']} waits {b.name}[{i}] (its wait #{k}; phase {b.phase[i]}, "
                                f"{b.count[i]}/{b.arrivals} arrived)")
    else:
        for b in st.barriers:
            for i in range(len(b.phase)):
                if b.tma[i]:
                    waited = max((a["waits"].get((id(b), i), 0) for a in agents), default=0)
                    if b.phase[i] > waited:
                        problems.append(f"{b.name}[{i}]: {b.phase[i]} TMA phases, at most {waited} waited for")
        problems += [f"L2 prefetch of {w} that no later load reads" for w in unused_prefetches(st.gmem)]
        problems += [f"wg{wg}: exits while a TMA store may still read {_box_str((buf, box))}"
                     for wg, _, buf, box in st.store_reads]
    problems += st.problems
    prefetches = sum(kind == "prefetch" for kind, _, _ in st.gmem)
    stores = [(ref, win) for kind, ref, win in st.gmem if kind == "store"]
    return dict(deadlock=deadlock, problems=problems, events=sum(a["n"] for a in agents), prefetches=prefetches,
                stores=stores)


def store_counts(kjaxpr, args, stores) -> dict:
    """``{kernel operand index: int array}``: how often each element of each GMEM ref was TMA-stored
    (over the ref's indexed leading dims), from every CTA's ``simulate_cta(...)["stores"]`` together."""
    counts = {}
    for i, (var, ref) in enumerate(zip(kjaxpr.invars, args)):
        mine = [win for r, win in stores if r is ref]
        if mine:
            counts[i] = np.zeros(var.aval.shape[: len(mine[0])], np.int64)
            for win in mine:
                counts[i][tuple(slice(start, start + size) for start, size in win)] += 1
    return counts

BARRIER_NAMES = dict(
    fwd=["q_ready", "q_free", "k_ready", "v_ready", "k_free", "v_free", "sched"],
    dq=["rows_ready", "rows_free", "k_ready", "v_ready", "k_free", "v_free"],
    dkv=["keys_ready", "keys_free", "q_ready", "do_ready", "q_free", "do_free"],
)

PROTOCOL_OPTIONS = [
    {},
    dict(num_ctas=1),
    dict(num_ctas=2),
    dict(num_ctas=3),
    dict(num_ctas=7),
    dict(block_kv=64, num_stages=3, num_stages_bwd=3, num_ctas=5),
    dict(num_stages=1, num_stages_bwd=1, num_ctas=4),
    dict(block_q=128, block_kv=64, block_q_dq=128, block_kv_dkv=128, num_ctas=3),
]


def kernel_jaxprs(case, options: dict) -> dict:
    """``{kernel: closed jaxpr}`` of the forward, dQ and dK/dV kernels for a CASES entry (abstract inputs)."""
    b, tq, tk, h, kv, d, variant, band_len, docs = case[:9]
    fwd_mod, bwd_mod = mg._kernels()
    spec = masks.make(variant, num_heads=h, band_len=band_len)
    plan = mg.make_plan((b, tq, h, d), (b, tk, kv, d), spec, scale=None, segments=docs > 1,
                        config=mg.make_config(**options))
    sds = jax.ShapeDtypeStruct
    q = sds((b, plan.q_pad, h, plan.head_dim), jnp.bfloat16)
    k = sds((b, plan.kv_pad, kv, plan.head_dim), jnp.bfloat16)
    lse = sds((b, h, plan.q_pad), jnp.float32)
    segs = [sds((b, plan.q_pad), jnp.int32), sds((b, plan.kv_pad), jnp.int32)] if plan.segments else []

    def seg(s):
        return tuple(s) if s else (None, None)

    return dict(
        fwd=jax.make_jaxpr(lambda q, k, v, *s: fwd_mod.forward(plan, q, k, v, *seg(s)))(q, k, k, *segs),
        dq=jax.make_jaxpr(lambda q, k, v, do, l2, o, *s: bwd_mod.backward_dq(plan, q, k, v, do, l2, o, *seg(s)))(
            q, k, k, q, lse, q, *segs),
        dkv=jax.make_jaxpr(lambda q, k, v, do, l2, dl, *s: bwd_mod.backward_dkv(plan, q, k, v, do, l2, dl, *seg(s)))(
            q, k, k, q, lse, lse, *segs),
    )


def stage_protocol(args) -> list:
    # Cases 8-10 differ from the others only in their element masks, which the protocol never sees.
    cases = CASES[:8] if not args.cases else [CASES[int(i)] for i in args.cases.split(",")]
    options = [json.loads(args.options)] if args.options else PROTOCOL_OPTIONS
    policies = POLICIES[: args.policies]
    rows = []
    bad = 0
    for i, case in enumerate(cases):
        for opts in options:
            opts = {**case[9], **opts} if len(case) > 9 else opts
            try:
                closed = kernel_jaxprs(case, opts)
            except ValueError as e:  # e.g. shared memory over the limit for this config
                log(f"protocol case {i} {opts}: skipped ({e})")
                continue
            for name, cj in closed.items():
                t0 = time.perf_counter()
                rec = dict(case=repr(case[:9]), options=opts, kernel=name)
                try:
                    kj, kargs, grid, nt = find_kernel(cj)
                    ctas = list(range(grid[0]))
                    if args.max_ctas and len(ctas) > args.max_ctas:  # a spread sample: heavy first, light last
                        ctas = sorted(set(np.linspace(0, grid[0] - 1, args.max_ctas).astype(int).tolist()))
                    dead, probs, events, prefetches = [], [], 0, 0
                    for c in ctas:
                        for pi, pol in enumerate(policies):
                            r = simulate_cta(kj, kargs, c, nt, BARRIER_NAMES[name], pol, seed=1000 * c + pi)
                            events += r["events"]
                            prefetches += r["prefetches"]
                            if r["deadlock"]:
                                dead.append(dict(cta=c, policy=pol, waits=r["deadlock"]))
                            probs += [f"cta {c} {pol}: {p}" for p in r["problems"]]
                    rec.update(grid=grid[0], ctas=len(ctas), events=events, prefetches=prefetches,
                               deadlocks=len(dead), problems=len(probs),
                               first_deadlock=dead[0] if dead else None, first_problems=probs[:3])
                except ProtocolError as e:
                    rec["error"] = str(e)
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                rows.append(rec)
                ok = "error" not in rec and not rec["deadlocks"] and not rec["problems"]
                bad += not ok
                msg = (f"ERROR {rec['error']}" if "error" in rec else
                       f"grid {rec['grid']} ctas {rec['ctas']} events {rec['events']} deadlocks {rec['deadlocks']} "
                       f"problems {rec['problems']}")
                log(f"protocol {i} {case[6]:22s} {case[:3]} {json.dumps(opts):60s} {name:3s} "
                    f"{'ok ' if ok else 'BAD'} {msg}")
                if rec.get("first_deadlock"):
                    log(f"    deadlock: {rec['first_deadlock']}")
                for p_ in rec.get("first_problems", []):
                    log(f"    {p_}")
    log(f"RESULT protocol runs={len(rows)} bad={bad}")
    return rows


NCU_METRICS = (
    ("Duration", "dur"),
    ("Compute (SM) Throughput", "sm%"),
    ("Memory Throughput", "mem%"),
    ("DRAM Throughput", "dram%"),
    ("Registers Per Thread", "regs"),
    ("Dynamic Shared Memory Per Block", "dsmem"),
    ("Achieved Occupancy", "occ%"),
    ("Executed Ipc Active", "ipc"),
    ("Warp Cycles Per Issued Instruction", "cyc/inst"),
    ("L2 Hit Rate", "L2hit%"),
    ("No Eligible", "no-elig%"),
    ("Local Memory Spilling Requests", "spill-req"),
)


def _ncu_raw_summary(lines) -> list:
    """``ncu --csv --page raw`` (one row per kernel, one column per metric, a units row under the header):
    the time, shared-memory and L1 (``l1tex__``) columns of each kernel."""
    import csv

    head, _units, *body = [r for r in csv.reader(lines) if r]
    keep = [i for i, h in enumerate(head) if h.startswith(("gpu__", "launch__shared", "l1tex__"))]
    names = [head[i].replace("l1tex__t_sectors_pipe_lsu_mem_local_op_", "local_") for i in keep]
    log(" | ".join(names))
    rows = []
    for r in body:
        log(" | ".join(r[i] for i in keep))
        rows.append(dict(zip(names, (r[i] for i in keep))))
    return rows


def stage_ncusum(args) -> list:
    """A compact table of an ``ncu --csv --page details`` log: one row per profiled kernel (``--page raw``
    logs: :func:`_ncu_raw_summary`)."""
    import csv

    lines = Path(args.csv).read_text(errors="replace").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        log(f"ncusum: no CSV header in {args.csv} (no kernel profiled?)")
        return []
    if '"Metric Name"' not in lines[start]:
        return _ncu_raw_summary(lines[start:])
    kernels: dict = {}
    for rec in csv.DictReader(lines[start:]):
        key = rec.get("ID")
        k = kernels.setdefault(key, {"name": rec.get("Kernel Name", "?")[:40], "grid": rec.get("Grid Size", "")})
        for metric, short_ in NCU_METRICS:
            if rec.get("Metric Name") == metric and short_ not in k:
                k[short_] = f"{rec.get('Metric Value', '')} {rec.get('Metric Unit', '')}".strip()
    cols = ["name", "grid"] + [m[1] for m in NCU_METRICS]
    log("| " + " | ".join(cols) + " |")
    log("|" + "---|" * len(cols))
    for k in kernels.values():
        log("| " + " | ".join(str(k.get(c, "-")) for c in cols) + " |")
    return list(kernels.values())


def stage_ncusrc(args) -> dict:
    """Warp-stall samples of one kernel's SASS (``ncu --page source --csv --print-source sass``): totals
    per stall reason and per region of equal execution count, largest first (``--top`` of each)."""
    import csv

    lines = Path(args.csv).read_text(errors="replace").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"Address"')), None)
    if start is None:
        log(f"ncusrc: no source-page CSV header in {args.csv}")
        return {}
    rows = list(csv.DictReader(lines[start:]))
    num = lambda r, k: int(float(r.get(k) or 0))  # noqa: E731
    samples = [num(r, "Warp Stall Sampling (All Samples)") for r in rows]
    total = max(sum(samples), 1)
    reasons = {k: sum(num(r, k) for r in rows) for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k}
    regions = []  # [first, last, executions, samples]
    for i, r in enumerate(rows):
        ex = num(r, "Instructions Executed")
        if regions and regions[-1][2] == ex:
            regions[-1][1], regions[-1][3] = i, regions[-1][3] + samples[i]
        else:
            regions.append([i, i, ex, samples[i]])
    log(f"ncusrc: {len(rows)} SASS instructions, {total} samples")
    for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[: args.top]:
        log(f"  {k:24s} {v:7d} {100 * v / total:5.1f}%")
    log("  region (instructions)  executions  samples  share  hottest")
    for first, last, ex, n in sorted(regions, key=lambda g: -g[3])[: args.top]:
        hot = max(range(first, last + 1), key=lambda i: samples[i])
        log(f"  {first:5d}-{last:<5d}        {ex:10d} {n:8d} {100 * n / total:5.1f}%  "
            f"{hot}: {rows[hot].get('Source', '').strip()[:60]} ({samples[hot]})")
    return dict(total=total, reasons=reasons, regions=[dict(first=g[0], last=g[1], executions=g[2], samples=g[3])
                                                       for g in regions])


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
    p.add_argument("stage", choices=("check", "time", "big", "stress", "profile", "trace", "protocol", "ncusum",
                                     "ncusrc"))
    p.add_argument("--cases", default="", help="comma list of CASES indices (check)")
    p.add_argument("--case-json", default="", help="JSON list of cases (check), replacing --cases")
    p.add_argument("--shapes", default="2x8192")
    p.add_argument("--masks", default="spattention,spattention_exclusive")
    p.add_argument("--configs", default="", help='JSON list of option dicts (time); an "_env" dict in one sets '
                   "environment variables while that entry is traced (diagnostic switches)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-cudnn", action="store_true")
    p.add_argument("--options", default="", help="JSON option dict (stress, profile; protocol: replaces its list)")
    p.add_argument("--modes", default="split,joint", help="stress: alternate these call modes")
    p.add_argument("--stall-s", type=float, default=20.0, help="stress: seconds without progress = hang")
    p.add_argument("--compile-s", type=float, default=120.0, help="stress: limit for compiling everything first")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--no-ref", action="store_true", help="stress: skip the fp32 reference (sanitizer runs)")
    p.add_argument("--no-gdb", action="store_true", help="stress: no cuda-gdb attach on a hang")
    p.add_argument("--repeat", type=int, default=1, help="profile: calls per kernel")
    p.add_argument("--max-ctas", type=int, default=48, help="protocol: CTAs simulated per kernel (0: all)")
    p.add_argument("--policies", type=int, default=len(POLICIES), help="protocol: scheduling policies per CTA")
    p.add_argument("--csv", default="", help="ncusum: the ncu --csv --page details (or raw) log; ncusrc: the --page source one")
    p.add_argument("--top", type=int, default=12, help="ncusrc: stall reasons and regions to print")
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    log(f"# {dev.device_kind} | jax {jax.__version__} | mgpu supported: {mg.is_supported()}")
    if dev.platform == "gpu":
        log(f"# {gpu_identity()}")
    if args.stage == "check":
        rows = stage_check(args)
    elif args.stage == "stress":
        if args.shapes == "2x8192":
            args.shapes = "1x2048"
        if args.masks == "spattention,spattention_exclusive":
            args.masks = "spattention_exclusive"
        rows = stage_stress(args)
    elif args.stage == "profile":
        rows = stage_profile(args)
    elif args.stage == "trace":
        rows = stage_trace(args)
    elif args.stage == "protocol":
        rows = stage_protocol(args)
    elif args.stage == "ncusum":
        stage_ncusum(args)
        return 0
    elif args.stage == "ncusrc":
        stage_ncusrc(args)
        return 0
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
