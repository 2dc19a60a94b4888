"""Optax setup: schedule, weight-decay mask, AdamW settings, clipping, and gradient accumulation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spattn_jax import optim, train_loop
from spattn_jax.config import get_preset
from spattn_jax.model import Transformer


def test_schedule_warms_up_linearly_then_cosine_to_ten_percent():
    cfg = optim.OptimConfig(learning_rate=1e-3, warmup_steps=10)
    lr = optim.make_schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(1e-4)
    after = np.array([float(lr(s)) for s in range(10, 101)])
    assert np.all(np.diff(after) <= 1e-12)
    # Halfway through the cosine the rate is halfway between peak and floor.
    assert float(lr(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)


def _tiny_params():
    model = Transformer(get_preset("tiny"), rngs=nnx.Rngs(0))
    return nnx.state(model, nnx.Param).to_pure_dict()


def test_decay_mask_skips_norms_and_embeddings():
    params = _tiny_params()
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(optim.decay_mask(params, optim.OptimConfig()))}
    assert not flat["['embed']['embedding']"]
    assert flat["['lm_head']"]
    norms = [k for k in flat if "norm" in k]
    assert norms and not any(flat[k] for k in norms)
    assert flat["['layers'][0]['attn']['wq']"] and flat["['layers'][0]['ffn']['w1']"]
    everything = optim.decay_mask(params, optim.OptimConfig(decay_norms=True, decay_embeddings=True))
    assert all(jax.tree.leaves(everything))


def test_adamw_uses_olmoe_settings_and_decays_only_masked_leaves():
    cfg = optim.OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=None)
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones((2,))}}
    tx = optim.make_optimizer(cfg, total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only decoupled decay moves a parameter: -lr * wd * p.
    np.testing.assert_allclose(updates["w"], -1e-2 * 0.1 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.clip_norm, cfg.final_lr_fraction) == (0.9, 0.95, 1e-8, None, 0.1)
    assert optim.OptimConfig().clip_norm == 1.0


def test_gradients_are_clipped_to_global_norm_one_before_adam():
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 5.0)}  # global norm 10
    for clip, expected_norm in ((1.0, 1.0), (None, 10.0)):
        tx = optim.make_optimizer(optim.OptimConfig(clip_norm=clip), total_steps=10)
        _, state = tx.update(grads, tx.init(params), params)
        mu = optax.tree_utils.tree_get(state, "mu")  # Adam's first moment: (1 - b1) * the gradient it saw
        assert float(optax.global_norm(mu)) == pytest.approx(0.1 * expected_norm, rel=1e-6)


def test_gradient_accumulation_equals_one_big_batch():
    # Aux weights 0: the load-balancing loss of a micro-batch is not that of the batch, the CE is.
    cfg = dataclasses.replace(get_preset("tiny"), lb_loss_weight=0.0, z_loss_weight=0.0)
    ocfg = optim.OptimConfig(learning_rate=1e-2, warmup_steps=0)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, 256, (4, 32), dtype=np.int32),
        "targets": rng.integers(0, 256, (4, 32), dtype=np.int32),
        "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 8 + [0] * 4]), 4, axis=0).astype(np.int32),
        "positions": np.tile(np.r_[np.arange(20), np.arange(8), np.zeros(4)], (4, 1)).astype(np.int32),
    }
    batch["segment_ids"][1, 10:] = 0  # rows with different numbers of targets
    # Plain SGD with rate 1: the parameter change is the gradient itself (Adam's first step would
    # turn float rounding of near-zero gradients into sign flips).
    tx = optax.sgd(1.0)
    schedule = optim.make_schedule(ocfg, total_steps=10)
    graphdef, rest = train_loop.model_graph(cfg)
    init = train_loop.state_initializer(cfg, tx, seed=0)
    results = {}
    for accum in (1, 2):
        step = train_loop.make_train_step(graphdef, rest, tx, schedule, train_loop.TrainConfig(grad_accum_steps=accum))
        state, metrics = step(init(), jax.tree.map(jnp.asarray, batch))
        results[accum] = (state, metrics)
    ref_state, ref_metrics = results[1]
    for accum in (2,):
        state, metrics = results[accum]
        assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
        assert float(metrics["grad_norm"]) == pytest.approx(float(ref_metrics["grad_norm"]), rel=1e-4)
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert int(ref_state["step"]) == 1
