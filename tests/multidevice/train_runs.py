"""The real train loop (``train_loop.train``: Grain data, AdamW, Orbax) on meshes of fake CPU devices.

``python -m tests.multidevice.train_runs meshes <workdir> <d,f,e,t> ...``: a short tiny-MoE run per mesh;
returns each run's per-step training losses.
``python -m tests.multidevice.train_runs resume <workdir> <mesh A> <mesh B>``: 10 steps on A with
checkpoints at 5 and 10; the step-5 checkpoint restored onto B's layout (arrays compared bitwise with
A's restore); then steps 6-10 trained from it on B. Returns both runs' losses.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from spattn_jax import checkpoint, data, metrics, optim, train_loop
from spattn_jax.config import get_preset
from tests.multidevice import main

STEPS = 5


def _configs(run_dir: str, mesh: str, steps: int):
    model = get_preset("tiny")
    data_cfg = data.DataConfig(seq_len=64, batch_size=8, read_threads=1, prefetch_batches=1)
    optim_cfg = optim.OptimConfig(learning_rate=3e-3, warmup_steps=2)
    train_cfg = train_loop.TrainConfig(
        run_dir=run_dir,
        total_steps=steps,
        log_every=1,
        eval_every=1000,
        eval_batches=1,
        checkpoint_every=5,
        async_checkpointing=False,
        progress_bar=False,
        mesh=tuple(int(s) for s in mesh.split(",")),
    )
    return model, data_cfg, optim_cfg, train_cfg


def _losses(run_dir: str) -> dict[int, float]:
    return {s: r["loss"] for s, r in metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"), "train").items()}


def check_meshes(workdir: str, *meshes: str) -> dict:
    out = {}
    for mesh in meshes:
        run_dir = os.path.join(workdir, mesh.replace(",", "x"))
        train_loop.train(*_configs(run_dir, mesh, STEPS))
        out[mesh] = _losses(run_dir)
    return out


def _restore(run_dir: str, mesh: str, step: int):
    model, _, optim_cfg, train_cfg = _configs(run_dir, mesh, 10)
    optimizer = optim.make_optimizer(optim_cfg, train_cfg.total_steps)
    init = train_loop.state_initializer(model, optimizer, train_cfg.seed)
    place = train_loop.mesh_placement(train_cfg.mesh_config, model, optimizer, init)
    manager = checkpoint.open_existing(os.path.join(run_dir, "checkpoints"))
    state = checkpoint.restore_state(manager, step, train_loop.abstract_state(init, place.state))
    manager.close()
    return state, place


def check_resume(workdir: str, mesh_a: str, mesh_b: str) -> dict:
    straight = os.path.join(workdir, "straight")
    train_loop.train(*_configs(straight, mesh_a, 10))

    # The step-5 checkpoint onto B's layout: the same numbers, B's shardings.
    on_a, _ = _restore(straight, mesh_a, 5)
    on_b, place_b = _restore(straight, mesh_b, 5)
    pairs = zip(jax.tree.leaves(on_a), jax.tree.leaves(on_b))
    same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)
    layouts = all(
        x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(jax.tree.leaves(on_b), jax.tree.leaves(place_b.state))
    )

    resumed = os.path.join(workdir, "resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "10"))
    train_loop.train(*_configs(resumed, mesh_b, 10))
    return {
        "straight": _losses(straight),
        "resumed": _losses(resumed),
        "restored_equal": same,
        "restored_on_b_layout": layouts,
    }


if __name__ == "__main__":
    main({"meshes": check_meshes, "resume": check_resume})
