"""Train an SPAttention MoE decoder: ``python train.py [--gin_file=...] [--gin_param=...] [--run_dir=...]``.

With no arguments it trains the tiny preset on the embedded standard-library corpus
(``configs/experiments/tiny_cpu.gin``). Restarting with the same run directory resumes from its
newest readable checkpoint.

Devices: ``--gin_param='train.mesh=(data, fsdp, expert, tensor)'`` lays the run out on a mesh (one size
may be -1, the rest; default: data parallelism over every device). Launched as several processes
(Slurm, Open MPI, multi-host TPU, or ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``)
it starts ``jax.distributed`` first (:func:`spattn_jax.sharding.initialize_distributed`); each process
reads its own share of the data and only process 0 logs and writes metrics.
``--dry_run`` prints the per-device bytes of parameters and optimizer state on that mesh and exits,
allocating nothing: ``--dry_run --gin_file=experiments/olmoe_1b_7b.gin --gin_param='train.mesh=(1,8,8,1)'``
sizes a 64-device run on a laptop. Bad settings end with one line ``error: ...`` on stderr and exit code 2
(set ``SPATTN_TRACEBACK=1`` to see the traceback instead).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

DEFAULT_GIN_FILES = ["experiments/tiny_cpu.gin"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=None,
                        help="gin file (repeatable; relative paths also resolve under configs/); "
                             f"default: {' '.join(DEFAULT_GIN_FILES)}")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="one gin binding, e.g. --gin_param='train.total_steps=100' (repeatable)")
    parser.add_argument("--run_dir", default=None, help="overrides train.run_dir")
    parser.add_argument("--dry_run", action="store_true",
                        help="print per-device bytes of parameters and optimizer state on train.mesh; "
                             "allocate nothing, train nothing")
    parser.add_argument("--num_devices", type=int, default=None,
                        help="devices for --dry_run (default: the product of train.mesh, or this "
                             "machine's device count when a size is -1)")
    return parser.parse_args(argv)


def build_configs(args: argparse.Namespace):
    """Parse gin and call the configurables: ``(model, data, optim, train)`` config dataclasses."""
    from spattn_jax import gin_bindings as gb

    params = list(args.gin_param)
    if args.run_dir:
        params.append(f"train.run_dir = {args.run_dir!r}")
    gb.parse(args.gin_file or DEFAULT_GIN_FILES, params)
    return gb.model_config(), gb.data_config(), gb.optim_config(), gb.train_config()


def write_run_config(run_dir: str, configs: dict) -> None:
    """Save the configuration in the run dir: gin's operative config (every parameter gin supplied,
    bound or default) and ``config.json`` (the resolved dataclasses, preset fields included)."""
    import dataclasses
    import json

    import gin
    import jax

    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({name: dataclasses.asdict(cfg) for name, cfg in configs.items()}, f, indent=2)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def dry_run(args: argparse.Namespace) -> dict:
    """Shapes and shardings only: the per-device memory of the state on the configured mesh."""
    import math

    import jax

    from spattn_jax import train_loop

    model_cfg, _, optim_cfg, train_cfg = build_configs(args)
    mesh = train_cfg.mesh
    num_devices = args.num_devices or (math.prod(mesh) if -1 not in mesh else jax.device_count())
    report = train_loop.dry_run(model_cfg, optim_cfg, train_cfg, num_devices)
    b = report["bytes"]
    print(
        f"model: {report['params']:,} parameters (d_model {model_cfg.d_model}, {model_cfg.num_layers} layers, "
        f"{model_cfg.num_experts if model_cfg.moe else 0} experts), parameters in {model_cfg.param_dtype}"
    )
    print(
        "mesh: " + " ".join(f"{k}={v}" for k, v in report["mesh"].items())
        + f" ({num_devices} devices; abstract, nothing allocated)"
    )
    for key, name in (("params", "parameters"), ("opt_state", "optimizer state"), ("state", "train state")):
        print(f"{name:>16}: {_gib(b[key]['per_device']):>11} per device ({_gib(b[key]['total'])} in all)")
    return report


def run(args: argparse.Namespace) -> dict:
    from spattn_jax import sharding, train_loop

    # Before anything touches a device: join the other processes of a multi-process launch.
    sharding.initialize_distributed()
    import jax

    # Same random bits, drawn by one CUDA kernel per array: XLA:GPU otherwise compiles every
    # initialiser draw as a large fused threefry kernel, >3 min for the 0.25B-1.75B preset on an H100
    # against 6 s this way (bench/init_compile.py). No effect off GPUs.
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)

    if jax.process_index() != 0:  # one log for the whole job: other processes report errors only
        logging.disable(logging.WARNING)
    model_cfg, data_cfg, optim_cfg, train_cfg = build_configs(args)
    write_run_config(train_cfg.run_dir, {"model": model_cfg, "data": data_cfg, "optim": optim_cfg, "train": train_cfg})
    summary = train_loop.train(model_cfg, data_cfg, optim_cfg, train_cfg)
    summary["run_dir"] = train_cfg.run_dir
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("spattn_jax").setLevel(logging.INFO)  # our progress notes; libraries stay at WARNING
    try:
        if args.dry_run:
            dry_run(args)
            return 0
        summary = run(args)
    except (ValueError, FileNotFoundError, SyntaxError) as e:  # SyntaxError: gin parse errors
        if os.environ.get("SPATTN_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        gc.collect()  # close Grain's prefetch threads before interpreter shutdown tears modules down
    val = summary["val_loss"]
    print(
        f"trained steps {summary['start_step']}..{summary['final_step']} in {summary['seconds']:.0f}s; "
        f"train loss {summary['train_loss']}, validation loss {val}; run dir {summary['run_dir']}"
    )
    return 128 + summary["stopped_by_signal"] if summary["stopped_by_signal"] else 0


if __name__ == "__main__":
    sys.exit(main())
