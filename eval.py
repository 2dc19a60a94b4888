"""Validation loss and perplexity of a checkpoint: ``python eval.py --checkpoint_dir=runs/tiny_cpu``.

``--checkpoint_dir`` is a run directory (or its ``checkpoints/``). The model and data settings come
from the checkpoint itself; ``--split`` picks the run's own train or validation split, ``--data_path``
(repeatable) scores every document of other files instead. Gin bindings (``--gin_file``,
``--gin_param``) may override ``data.*`` settings such as the batch size or tokenizer. Prints one JSON
line: ``{"step", "split", "loss" (nats/token), "perplexity", "tokens"}``. Errors: one line ``error: ...``,
exit code 2.

Only the parameters are read (not the optimizer state), laid out on a device mesh by the training
rules: ``--mesh=data,fsdp,expert,tensor`` (one size may be -1), by default the run's own mesh when it
fits this machine's devices, else FSDP over all of them, so a model too large for one device is
evaluated split like it trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dir", required=True, help="run directory or its checkpoints/ folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--split", default="validation", choices=("validation", "train"))
    parser.add_argument("--data_path", action="append", default=[], help="score these files instead (repeatable)")
    parser.add_argument("--eval_batches", type=int, default=None,
                        help="batches to score (0: all; default: the run's train.eval_batches)")
    parser.add_argument("--gin_file", action="append", default=[], help="gin file with data.* overrides")
    parser.add_argument("--gin_param", action="append", default=[], help="one gin binding (repeatable)")
    parser.add_argument("--mesh", default=None,
                        help="data,fsdp,expert,tensor sizes (default: the run's mesh, else FSDP over every device)")
    return parser.parse_args(argv)


def checkpoints_dir(path: str) -> str:
    """``path/checkpoints`` for a run directory, else ``path`` itself."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def data_config_from(meta: dict, args: argparse.Namespace):
    """The run's DataConfig, with gin ``data.*`` overrides and ``--data_path`` applied."""
    import gin

    from spattn_jax import data, gin_bindings

    saved = data.DataConfig(**meta["data"])
    if args.gin_file or args.gin_param:
        gin_bindings.parse(args.gin_file, args.gin_param)
        # Only what the user bound changes; everything else stays as the run trained it.
        overrides = {
            name: gin.query_parameter(f"data.{name}")
            for name in (f.name for f in dataclasses.fields(data.DataConfig))
            if _is_bound(f"data.{name}")
        }
        saved = dataclasses.replace(saved, **overrides)
    if args.data_path:
        # Every document of the given files is scored: they form the "validation" split wholesale.
        saved = dataclasses.replace(saved, paths=(), validation_paths=tuple(args.data_path))
    return saved


def _is_bound(name: str) -> bool:
    import gin

    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False


def eval_mesh(arg: str | None, run_mesh: tuple[int, ...]) -> tuple[int, ...]:
    """``--mesh`` as sizes; without it the run's mesh if it fits the devices here, else ``(1, -1, 1, 1)``."""
    import jax

    from spattn_jax import sharding

    if arg is not None:
        try:
            sizes = tuple(int(v) for v in arg.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 4:
            raise ValueError(f"--mesh takes four comma-separated sizes data,fsdp,expert,tensor, got {arg!r}")
        return sizes
    try:
        sharding.MeshConfig(*run_mesh).shape(jax.device_count())
    except ValueError:  # the run's mesh does not fit the devices here
        return (1, -1, 1, 1)
    return tuple(run_mesh)


def run(args: argparse.Namespace) -> dict:
    import jax

    from spattn_jax import checkpoint, data, optim, train_loop
    from spattn_jax.config import ModelConfig

    manager = checkpoint.open_existing(checkpoints_dir(args.checkpoint_dir))
    try:
        step, meta = checkpoint.read_meta(manager, args.step)
        model_cfg = ModelConfig(**meta["model"])
        optim_cfg = optim.OptimConfig(**meta["optim"])
        train_cfg = train_loop.TrainConfig(**meta["train"])
        data_cfg = data_config_from(meta, args)
        # The optimizer is rebuilt only for the layout rules of the state; nothing of it is read.
        optimizer = optim.make_optimizer(optim_cfg, train_cfg.total_steps)
        init = train_loop.state_initializer(model_cfg, optimizer, train_cfg.seed)
        train_cfg = dataclasses.replace(train_cfg, grad_accum_steps=1, mesh=eval_mesh(args.mesh, train_cfg.mesh))
        train_loop.check_setup(model_cfg, data_cfg, train_cfg, jax.device_count())
        place = train_loop.mesh_placement(train_cfg.mesh_config, model_cfg, optimizer, init)
        params = checkpoint.restore_params(
            manager, step, train_loop.abstract_state(init, place.state_shardings)["params"]
        )
    finally:
        manager.close()
    split = "validation" if args.data_path else args.split
    num_batches = train_cfg.eval_batches if args.eval_batches is None else args.eval_batches
    graphdef, rest = train_loop.model_graph(model_cfg)
    pipeline = data.make_pipeline(data_cfg, split)
    result = train_loop.evaluate(
        train_loop.make_eval_step(graphdef, rest, place), params, pipeline.dataset, num_batches, place.put_batch
    )
    return {"step": step, "split": split, **result}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, SyntaxError) as e:
        if os.environ.get("SPATTN_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        gc.collect()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
