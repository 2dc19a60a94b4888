"""Transformer: shapes, aux dict, errors, packing, causality, bf16, annotations, and overfitting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spattn_jax.config import get_preset
from spattn_jax.model import Transformer

SMALL = dataclasses.replace(get_preset("tiny"), d_model=32, max_seq_len=16, band_len=12, expert_hidden=16)
LOGICAL_AXES = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "exp", "mlp", "norm", None}


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def forward_packed(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids)


@pytest.fixture(scope="module")
def small_model():
    return Transformer(SMALL, rngs=nnx.Rngs(0))


def random_tokens(shape, seed=0, vocab=256):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_forward_shapes_and_aux(small_model):
    logits, aux = forward(small_model, random_tokens((2, 12)))
    assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
    assert set(aux) == {"aux_loss", "lb_loss", "z_loss", "router_load", "router_entropy"}
    assert aux["router_load"].shape == (2, 8) and aux["router_entropy"].shape == (2,)
    np.testing.assert_allclose(aux["router_load"].sum(-1), 1.0, rtol=1e-6)
    layers, k = SMALL.num_layers, SMALL.top_k  # default "olmoe" reduction: layer means, z also / k
    want = SMALL.lb_loss_weight * aux["lb_loss"] / layers + SMALL.z_loss_weight * aux["z_loss"] / (layers * k)
    np.testing.assert_allclose(aux["aux_loss"], want, rtol=1e-6)
    assert np.all(np.isfinite(logits))


def test_dense_model_has_empty_router_stats():
    cfg = dataclasses.replace(SMALL, moe=False, ffn_hidden=24, num_layers=1)
    logits, aux = forward(Transformer(cfg, rngs=nnx.Rngs(0)), random_tokens((1, 8)))
    assert logits.shape == (1, 8, 256)
    assert float(aux["aux_loss"]) == float(aux["lb_loss"]) == float(aux["z_loss"]) == 0.0
    assert aux["router_load"].shape == (0, 0) and aux["router_entropy"].shape == (0,)


@pytest.mark.parametrize("name", ["olmoe_1b_7b", "olmoe_0p25b_1p75b", "table2_8l", "tiny"])
def test_every_preset_traces_at_full_length(name):
    cfg = get_preset(name)

    def run(tokens):
        return Transformer(cfg, rngs=nnx.Rngs(0))(tokens)

    logits, aux = jax.eval_shape(run, jax.ShapeDtypeStruct((1, cfg.max_seq_len), jnp.int32))
    assert logits.shape == (1, cfg.max_seq_len, cfg.vocab_size) and logits.dtype == jnp.float32
    layers = cfg.num_layers if cfg.moe else 0
    assert aux["router_load"].shape == ((layers, cfg.num_experts) if cfg.moe else (0, 0))


def test_too_long_sequences_raise_one_line_errors(small_model):
    with pytest.raises(ValueError, match=r"sequence length 20 exceeds max_seq_len=16; shorten the sequence"):
        small_model(random_tokens((1, 20)))
    with pytest.raises(ValueError, match=r"sequence length 14 exceeds band_len=12.*raise band_len"):
        forward(small_model, random_tokens((1, 14)))  # also clean from under jit
    follow = Transformer(dataclasses.replace(SMALL, bands_follow_length=True, num_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sequence length 3 is shorter than num_heads=4 with band_len=None"):
        follow(random_tokens((1, 3)))


def test_packed_documents_equal_separate_runs(small_model):
    # Bands are laid out over band_len=12 (W=3), so heads differ; distances are in-document either way.
    a, b = random_tokens((1, 5), seed=1), random_tokens((1, 7), seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[0] * 5 + [1] * 7])
    logits, _ = forward_packed(small_model, packed, seg)
    np.testing.assert_allclose(logits[:, :5], forward(small_model, a)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:], forward(small_model, b)[0], rtol=1e-5, atol=1e-5)


def test_causal_and_positions_default(small_model):
    tokens = random_tokens((1, 12), seed=3)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % 256)
    l1, _ = forward(small_model, tokens)
    l2, _ = forward(small_model, changed)
    np.testing.assert_allclose(l1[:, :8], l2[:, :8], rtol=1e-6, atol=1e-6)
    assert not np.allclose(l1[:, 8:], l2[:, 8:])
    explicit, _ = nnx.jit(lambda m, t, p: m(t, positions=p))(small_model, tokens, jnp.arange(12)[None])
    np.testing.assert_allclose(explicit, l1, rtol=1e-5, atol=1e-5)


def test_bf16_compute_is_close_to_fp32():
    cfg = dataclasses.replace(SMALL, init_std=0.1)  # larger weights: logits of order 1, a real test
    tokens = random_tokens((2, 12), seed=4)
    l32, _ = forward(Transformer(cfg, rngs=nnx.Rngs(0)), tokens)
    model16 = Transformer(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    l16, aux16 = forward(model16, tokens)
    assert l16.dtype == jnp.float32 and aux16["lb_loss"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    rel = float(jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32))
    assert rel < 5e-2, rel


def test_params_are_annotated_and_initialised(small_model):
    flat = nnx.to_flat_state(nnx.state(small_model, nnx.Param))
    for path, var in flat:
        axes = var.get_metadata().get("out_sharding")
        value = np.asarray(var.get_value())
        assert axes is not None and len(axes) == value.ndim, path
        assert set(axes) <= LOGICAL_AXES, (path, axes)
        if path[-1] == "scale":
            assert axes == ("norm",) and np.all(value == 1.0)
        else:
            assert np.abs(value).max() <= 3 * SMALL.init_std + 1e-7, path
    names = {path[-1] for path, _ in flat}
    assert {"wq", "wk", "wv", "wo", "router", "w1", "w2", "w3", "embedding", "lm_head"} <= names


def test_tiny_preset_overfits_one_batch_with_spattention():
    # Band layout over the batch length (W = 128 / 4 = 32), so heads really see different distances.
    seq_len, batch = 128, 4
    cfg = dataclasses.replace(get_preset("tiny"), band_len=seq_len)
    assert cfg.mask_variant == "spattention"
    text = (
        b"SPAttention gives every head its own band of distances, so that the heads together cover the "
        b"causal set. Making every head count: sparse attention without the speed-performance trade-off. "
    ) * 4
    data = np.frombuffer(text, np.uint8)[: batch * (seq_len + 1)].reshape(batch, seq_len + 1).astype(np.int32)
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(5e-3, b1=0.9, b2=0.95, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits, aux = model(inputs)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return ce + aux["aux_loss"], ce

        (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return ce

    first = float(step(model, opt))
    assert 5.0 < first < 6.0  # ~ log(256) = 5.55 at init
    for _ in range(119):
        last = float(step(model, opt))
    assert last < 0.5, f"cross-entropy {last:.3f} after 120 steps (start {first:.3f})"


def test_attention_options_reach_the_kernel():
    """``attention_options`` are the kernel's settings: a Pallas kernel with them matches the reference."""
    base = dataclasses.replace(SMALL, num_layers=1)
    tokens = random_tokens((1, 12))
    want, _ = forward(Transformer(dataclasses.replace(base, attention_impl="reference"), rngs=nnx.Rngs(0)), tokens)
    tuned = dataclasses.replace(
        base, attention_impl="pallas_triton", attention_options=(("block_q", 16), ("block_k", 16))
    )
    got, _ = forward(Transformer(tuned, rngs=nnx.Rngs(0)), tokens)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
    bogus = dataclasses.replace(base, attention_impl="pallas_triton", attention_options=(("block_qq", 16),))
    with pytest.raises(ValueError, match=r"unknown pallas_triton option\(s\) block_qq"):
        forward(Transformer(bogus, rngs=nnx.Rngs(0)), tokens)
