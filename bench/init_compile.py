"""How long the jitted train-state initialiser takes to compile, under different PRNG lowerings.

On an H200 (JAX 0.11.2) ``jit(init)`` of the 0.25B-1.75B preset took ~3 minutes to compile (XLA's
slow-compile alarm) against 8 s on a CPU. The initialiser is ~100 truncated-normal draws; with the
default partitionable threefry each becomes a large fused elementwise kernel (20 rounds of threefry
plus ``erf_inv``), compiled one by one. Each variant runs in its own process under a time limit:

* ``default``: JAX's defaults;
* ``threefry_kernel``: ``jax_threefry_gpu_kernel_lowering=True`` (threefry as one CUDA kernel call,
  same bits);
* ``host``: build the state on the host CPU and transfer it (no GPU compile of the initialiser).

Run (GPU)::

    python bench/init_compile.py --variants threefry_kernel,host,default --timeout 150
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import dataclasses, json, sys, time
import jax
variant, preset = sys.argv[1], sys.argv[2]
if variant == "threefry_kernel":
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
from spattn_jax import optim, train_loop
from spattn_jax.config import get_preset
cfg = dataclasses.replace(get_preset(preset), dtype="bfloat16")
tc = train_loop.TrainConfig(total_steps=1000, mesh=(1, 1, 1, 1))
oc = optim.OptimConfig()
opt = optim.make_optimizer(oc, 1000)
init = train_loop.state_initializer(cfg, opt, 0)
place = train_loop.mesh_placement(tc.mesh_config, cfg, opt, init)
t0 = time.time()
if variant == "host":
    with jax.default_device(jax.devices("cpu")[0]):
        state = jax.jit(init)()
    state = jax.device_put(state, place.state_shardings)
else:
    state = jax.jit(init, out_shardings=place.state_shardings)()
jax.block_until_ready(state)
total = time.time() - t0
leaf = jax.tree.leaves(state["params"])[0]
print(json.dumps(dict(variant=variant, seconds=total, first_leaf_sum=float(leaf.astype("float32").sum()))))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="threefry_kernel,host,default")
    parser.add_argument("--preset", default="olmoe_0p25b_1p75b")
    parser.add_argument("--timeout", type=float, default=150)
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    for variant in args.variants.split(","):
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, variant, args.preset], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=args.timeout)
            line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else json.dumps(
                dict(variant=variant, error=proc.stderr[-800:]))
        except subprocess.TimeoutExpired:
            line = json.dumps(dict(variant=variant, seconds=f"> {args.timeout:.0f} (timed out)"))
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
