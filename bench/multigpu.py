"""Data x expert parallelism on one host's GPUs: training tokens/s and memory per GPU against one GPU.

Issue 8's GPU measurement: the ``olmoe_0p25b_1p75b`` preset (bf16 compute, fp32
parameters and AdamW state, sequence 1024) trained with the real train step
(:func:`spattn_jax.train_loop.make_train_step` on :func:`spattn_jax.train_loop.mesh_placement`) on

==============  ==========================  ======================================================
name            mesh (data,fsdp,expert,tp)  what differs
==============  ==========================  ======================================================
``1gpu``        (1, 1, 1, 1) on GPU 0       the baseline
``2gpu_data``   (2, 1, 1, 1)                batch rows split, parameters and Adam state replicated
``2gpu_expert`` (1, 1, 2, 1)                batch rows split over ``expert``; experts split (32 per
                                            GPU, tokens dispatched with ragged_all_to_all); the
                                            dense weights FSDP-split over ``expert`` too
``2gpu_fsdp``   (1, 2, 1, 1)                batch rows split, every weight FSDP-split
==============  ==========================  ======================================================

The per-GPU batch is the same everywhere (``--rows_per_gpu`` rows of 1024 tokens), so ideal scaling
doubles tokens/s. Batches are fixed random tokens (one packed document per row): the input pipeline
is not measured. Each configuration runs in its own process (``CUDA_VISIBLE_DEVICES`` picks the GPUs),
compiles, warms up, then times ``--steps`` steps with ``block_until_ready``; memory is each GPU's
``peak_bytes_in_use`` after the timed steps.

Measured on 2x H200 (NVLink NV18; JAX 0.11.2; 8 rows of 1024 tokens per GPU, 20 timed steps;
bench/results/multigpu_h200x2_2026-11-23.json):

============  ==========  ===========  ========  ======================  ==================
config        tokens/s    per GPU      vs 1 GPU  peak GiB per GPU        state GiB per GPU
============  ==========  ===========  ========  ======================  ==================
1gpu          76,713      76,713       1.00x     40.3                    19.9
2gpu_data     141,444     70,722       1.84x     40.3, 40.3              19.9
2gpu_expert   95,825      47,912       1.25x     40.1, 40.1              10.0
2gpu_fsdp     132,643     66,322       1.73x     30.5, 30.5              10.0
============  ==========  ===========  ========  ======================  ==================

Expert parallelism pays two ragged all-to-alls per MoE layer and grouped matmuls over a receive
buffer sized for the worst case (every peer routing every row here); at two GPUs, where the whole
model fits on each, it is the slowest layout, and it halves the state without lowering the peak
(the buffers take what the state gave back).

Run (2xH200 machine)::

    python bench/multigpu.py                       # every configuration; table + bench/results/multigpu_*.json
    python bench/multigpu.py --only 2gpu_expert    # one
    SPATTN_RAGGED_A2A=0 python bench/multigpu.py   # MoE dispatch through the dense all_to_all stand-in

The same layout from the command line (with the real data pipeline)::

    python train.py --gin_file=experiments/olmoe_0p25b_1p75b.gin --gin_param='train.mesh=(1,1,2,1)' \\
        --gin_param=data.batch_size=32 --run_dir=runs/0p25b_2gpu_expert
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "1gpu": ("0", (1, 1, 1, 1)),
    "2gpu_data": ("0,1", (2, 1, 1, 1)),
    "2gpu_expert": ("0,1", (1, 1, 2, 1)),
    "2gpu_fsdp": ("0,1", (1, 2, 1, 1)),
}


def measure(name: str, rows_per_gpu: int, steps: int, warmup: int, preset: str) -> dict:
    """One configuration, in this process (its GPUs already chosen by ``CUDA_VISIBLE_DEVICES``)."""
    import jax
    import numpy as np

    jax.config.update("jax_threefry_gpu_kernel_lowering", True)  # as train.py does (bench/init_compile.py)
    from spattn_jax import optim, train_loop
    from spattn_jax.config import get_preset

    _, mesh = CONFIGS[name]
    model_cfg = dataclasses.replace(get_preset(preset), dtype="bfloat16")
    seq = model_cfg.max_seq_len
    devices = jax.device_count()
    batch = rows_per_gpu * devices
    train_cfg = train_loop.TrainConfig(total_steps=1000, mesh=mesh)
    optim_cfg = optim.OptimConfig()
    optimizer = optim.make_optimizer(optim_cfg, train_cfg.total_steps)
    schedule = optim.make_schedule(optim_cfg, train_cfg.total_steps)
    init = train_loop.state_initializer(model_cfg, optimizer, train_cfg.seed)
    place = train_loop.mesh_placement(train_cfg.mesh_config, model_cfg, optimizer, init)
    graphdef, rest = train_loop.model_graph(model_cfg)
    step = train_loop.make_train_step(graphdef, rest, optimizer, schedule, train_cfg, place)
    state = jax.jit(init, out_shardings=place.state_shardings)()

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    host = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    }
    batch_arrays = place.put_batch(host)

    t0 = time.time()
    state, out = step(state, batch_arrays)
    jax.block_until_ready(out)
    compile_s = time.time() - t0
    for _ in range(warmup):
        state, out = step(state, batch_arrays)
    jax.block_until_ready(out)
    t0 = time.time()
    for _ in range(steps):
        state, out = step(state, batch_arrays)
    jax.block_until_ready((state, out))
    seconds = (time.time() - t0) / steps
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    report = train_loop.dry_run(model_cfg, optim_cfg, train_cfg, devices)
    return {
        "name": name,
        "mesh": mesh,
        "devices": devices,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "batch": batch,
        "seq_len": seq,
        "step_s": seconds,
        "tokens_per_s": batch * seq / seconds,
        "tokens_per_s_per_gpu": batch * seq / seconds / devices,
        "compile_s": compile_s,
        "loss": float(out["loss"]),
        "peak_gib_per_gpu": [s.get("peak_bytes_in_use", 0) / 2**30 for s in stats],
        "state_gib_per_gpu": report["bytes"]["state"]["per_device"] / 2**30,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="configurations to run")
    parser.add_argument("--rows_per_gpu", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default="olmoe_0p25b_1p75b")
    parser.add_argument("--out_dir", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.rows_per_gpu, args.steps, args.warmup, args.preset)))
        return 0

    results = []
    for name in args.only or list(CONFIGS):
        gpus, _ = CONFIGS[name]
        cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}", f"--rows_per_gpu={args.rows_per_gpu}",
               f"--steps={args.steps}", f"--warmup={args.warmup}", f"--preset={args.preset}"]
        # The repo on the path: the bench runs from a plain checkout as well as an installed one.
        pythonpath = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, PYTHONPATH=pythonpath)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append({"name": name, "error": proc.stderr[-3000:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        peak = max(r["peak_gib_per_gpu"])
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, peak {peak:.1f} GiB per GPU", flush=True)

    base = next((r for r in results if r.get("name") == "1gpu" and "error" not in r), None)
    print("\n| config | mesh | GPUs | tokens/s | per GPU | vs 1 GPU | peak GiB per GPU | state GiB per GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed | | | | | | |")
            continue
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        peaks = ", ".join(f"{p:.1f}" for p in r["peak_gib_per_gpu"])
        print(f"| {r['name']} | {tuple(r['mesh'])} | {r['devices']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {speedup} | {peaks} | {r['state_gib_per_gpu']:.1f} |")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"multigpu_{time.strftime('%Y-%m-%d_%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
