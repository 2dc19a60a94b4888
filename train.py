"""Train an SPAttention MoE decoder: ``python train.py [--gin_file=...] [--gin_param=...] [--run_dir=...]``.

With no arguments it trains the tiny preset on the embedded standard-library corpus
(``configs/experiments/tiny_cpu.gin``). Restarting with the same run directory resumes from its
newest readable checkpoint. Bad settings end with one line ``error: ...`` on stderr and exit code 2
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


def run(args: argparse.Namespace) -> dict:
    from spattn_jax import train_loop

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
