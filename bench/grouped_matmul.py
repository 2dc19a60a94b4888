"""MoE grouped matmul on the GPU: the Pallas kernel against XLA's ``ragged_dot``, one SwiGLU expert layer.

The workload is one MoE layer's expert computation, forward and backward
(:func:`spattn_jax.moe.grouped_swiglu`: three grouped matmuls forward, six backward), at the
0.25B-1.75B preset's shapes by default: 8192 tokens x top-8 = 65,536 rows, ``D = 1024``,
``F = 512``, 64 experts, bf16. Group sizes come from a random router (near-uniform) and from a skewed
one (Zipf-like: a few experts take most rows). Columns: synchronised wall-clock ms (median) and the
back-to-back mean (``pipe``); TF/s counts the useful FLOPs, ``2 M D F x 3`` forward and twice that
backward; ``bound`` is those FLOPs at 600 TFLOP/s. ``ragged_dot`` runs in the same process; on XLA:GPU
it expands to dense products over all experts (the reason the kernel exists), so it may run out of
memory: the row then says so.

Run (GPU)::

    python bench/grouped_matmul.py                 # JSON + markdown in bench/results/
    python bench/grouped_matmul.py --tokens 2048   # smaller
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import time_jax  # noqa: E402  (bench/kernels.py)

from spattn_jax.kernels import grouped_matmul as gm  # noqa: E402
from spattn_jax.moe import grouped_swiglu  # noqa: E402

PEAK_TFLOPS = 600.0


def group_sizes(rows: int, experts: int, skew: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if skew == "uniform":
        p = np.full(experts, 1.0 / experts)
    else:  # Zipf-like, exponent 1.2, shuffled over the experts
        p = 1.0 / np.arange(1, experts + 1) ** 1.2
        p = rng.permutation(p / p.sum())
    counts = rng.multinomial(rows, p)
    return counts.astype(np.int32)


def layer_fns(impl: str, config: gm.Config):
    def loss(xs, w1, w3, w2, sizes, cot):
        mm = lambda a, b: gm.gmm(a, b, sizes, implementation=impl, config=config)  # noqa: E731
        h = (jax.nn.silu(mm(xs, w1)) * mm(xs, w3)).astype(xs.dtype)
        y = mm(h, w2)
        return jnp.sum(y * cot), y

    fwd = jax.jit(lambda *a: loss(*a)[1])
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    return fwd, grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--configs", default="128,128,64,4,3;128,128,64,8,3;64,128,64,4,4;128,256,64,8,3",
                        help="kernel tilings to try: block_m,block_n,block_k,num_warps,num_stages;...")
    parser.add_argument("--skip_ragged_dot", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    rows, d, f, e = args.tokens * args.top_k, args.d_model, args.hidden, args.experts
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    xs = jnp.asarray(rng.standard_normal((rows, d)), bf)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)) * 0.03, bf) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, d)) * 0.03, bf)
    cot = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    flops_fwd = 2.0 * rows * d * f * 3
    report = dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows, d_model=d, hidden=f, experts=e,
        dtype="bfloat16", flops_fwd=flops_fwd, peak_tflops=PEAK_TFLOPS, rows_out=[],
    )

    candidates = [("ragged_dot", gm.Config())] if not args.skip_ragged_dot else []
    for spec in args.configs.split(";"):
        bm, bn, bk, nw, ns = (int(v) for v in spec.split(","))
        candidates.append(("pallas_triton", gm.Config(bm, bn, bk, nw, ns)))

    for skew in ("uniform", "zipf"):
        sizes = jnp.asarray(group_sizes(rows, e, skew))
        args_ = (xs, w1, w3, w2, sizes, cot)
        reference = None
        for impl, cfg in candidates:
            row = dict(skew=skew, impl=impl, config=dataclasses.asdict(cfg) if impl != "ragged_dot" else None)
            try:
                fwd, grad = layer_fns(impl, cfg)
                t0 = time.time()
                jax.block_until_ready(grad(*args_))
                row["compile_s"] = time.time() - t0
                grads, y = grad(*args_)
                if impl == "ragged_dot":
                    reference = (y, grads)
                elif reference is not None:
                    scale = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32))))  # noqa: E731
                    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))  # noqa: E731
                    row["max_rel_err"] = {
                        name: err(a, b) / max(scale(b), 1e-30)
                        for name, a, b in zip(("y", "dx", "dw1", "dw3", "dw2"), (y, *grads), (reference[0], *reference[1]))
                    }
                tf = time_jax(fwd, *args_)
                tb = time_jax(lambda *a: grad(*a)[0], *args_)
                row.update(fwd_ms=tf["ms"], fwd_pipe_ms=tf["ms_pipelined"], fwdbwd_ms=tb["ms"],
                           fwdbwd_pipe_ms=tb["ms_pipelined"])
                row["fwd_tflops_pipe"] = flops_fwd / (tf["ms_pipelined"] * 1e-3) / 1e12
                row["fwdbwd_tflops_pipe"] = 3 * flops_fwd / (tb["ms_pipelined"] * 1e-3) / 1e12
            except Exception as exc:  # noqa: BLE001 -- an OOM of the dense expansion is a result
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(json.dumps(row), flush=True)
            report["rows_out"].append(row)

    table = markdown(report)
    report["table"] = table
    os.makedirs(args.out, exist_ok=True)
    gpu = report["device"].replace(" ", "_")
    base = os.path.join(args.out, f"grouped_matmul_{gpu}_{time.strftime('%Y-%m-%d_%H%M%S')}")
    with open(base + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(table + "\n")
    print(table)
    return 0


def markdown(report: dict) -> str:
    bound_fwd = report["flops_fwd"] / (report["peak_tflops"] * 1e12) * 1e3
    lines = [
        f"MoE expert layer (3 grouped matmuls), {report['rows']} rows, D={report['d_model']}, "
        f"F={report['hidden']}, E={report['experts']}, bf16 on {report['device']} (JAX {report['jax']}). "
        f"Bound at {report['peak_tflops']:.0f} TF/s: fwd {bound_fwd:.3f} ms, fwd+bwd {3 * bound_fwd:.3f} ms.",
        "",
        "| routing | impl | tiles (m,n,k,warps,stages) | fwd ms (pipe) | fwd+bwd ms (pipe) | fwd+bwd TF/s | max rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows_out"]:
        c = r.get("config")
        tiles = f"{c['block_m']},{c['block_n']},{c['block_k']},{c['num_warps']},{c['num_stages']}" if c else "-"
        if "error" in r:
            lines.append(f"| {r['skew']} | {r['impl']} | {tiles} | {r['error']} | | | |")
            continue
        err = max(r["max_rel_err"].values()) if "max_rel_err" in r else float("nan")
        lines.append(
            f"| {r['skew']} | {r['impl']} | {tiles} | {r['fwd_ms']:.3f} ({r['fwd_pipe_ms']:.3f}) | "
            f"{r['fwdbwd_ms']:.3f} ({r['fwdbwd_pipe_ms']:.3f}) | {r['fwdbwd_tflops_pipe']:.0f} | {err:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
