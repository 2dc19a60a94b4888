"""A few AdamW steps of the tiny MoE model on several meshes against the same steps without a mesh.

``python -m tests.multidevice.train_steps steps [dtype] [mesh ...]``; meshes as ``d,f,e,t``. The step is
the plain one (cross-entropy + the model's aux loss, AdamW), jitted with the rule-derived in/out
shardings of the parameters and of the optimizer state, traced under ``jax.set_mesh``. The batch is
fixed random bytes, so only the parallelism differs between runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from spattn_jax import config, optim, sharding
from spattn_jax.model import Transformer
from tests.multidevice import main

DEFAULT_MESHES = ("8,1,1,1", "2,2,2,1", "1,2,2,2", "1,1,8,1")
STEPS, BATCH, SEQ = 5, 8, 32


def _setup(dtype: str):
    cfg = dataclasses.replace(config.tiny, dtype=dtype)
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, warmup_steps=0), STEPS)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)

    def init():
        params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
        return params, optimizer.init(params)

    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits, aux = nnx.merge(graphdef, p)(tokens[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
            return ce + aux["aux_loss"], ce

        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce

    return optimizer, abstract_params, init, step


def _losses(dtype: str, mesh_shape: tuple[int, ...] | None) -> tuple[list[float], float]:
    optimizer, abstract_params, init, step = _setup(dtype)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(BATCH, SEQ + 1)), jnp.int32)
    if mesh_shape is None:
        params, opt_state = jax.jit(init)()
        run = jax.jit(step)
        mesh = None
    else:
        mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
        p_specs = sharding.param_specs(abstract_params, mesh)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params.to_pure_dict())
        o_specs = sharding.optimizer_specs(optimizer, abstract_opt, p_specs)
        p_sh, o_sh = sharding.named(mesh, p_specs), sharding.named(mesh, o_specs)
        batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("activation_batch", None), mesh))
        params, opt_state = jax.jit(init, out_shardings=(p_sh, o_sh))()
        run = jax.jit(
            step, in_shardings=(p_sh, o_sh, batch_sh), out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1)
        )
    losses = []
    start = time.time()
    for _ in range(STEPS):
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            params, opt_state, ce = run(params, opt_state, tokens)
        losses.append(float(ce))
    return losses, time.time() - start


def check_steps(dtype: str = "float32", *meshes: str) -> dict:
    out = {"single": _losses(dtype, None)}
    for m in meshes or DEFAULT_MESHES:
        out[m] = _losses(dtype, tuple(int(s) for s in m.split(",")))
    return out


if __name__ == "__main__":
    main({"steps": check_steps})
