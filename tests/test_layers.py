"""RMSNorm, RoPE, packed-document positions and parameter annotations."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_jax.layers import (
    Embed,
    RMSNorm,
    apply_rope,
    normal_param,
    positions_from_segments,
    rms_norm,
)


def test_rms_norm_matches_formula_and_is_fp32():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    scale = rng.normal(size=(8,)).astype(np.float32)
    want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-5), want, rtol=1e-5, atol=1e-6)
    out = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale), 1e-5)
    assert out.dtype == jnp.float32


def test_rms_norm_module_init_and_dtype():
    norm = RMSNorm(8, eps=1e-6, dtype="bfloat16")
    assert norm.scale[...].dtype == jnp.float32 and np.all(np.asarray(norm.scale[...]) == 1.0)
    assert norm(jnp.ones((2, 8))).dtype == jnp.bfloat16


def rope_hf_numpy(x, positions, theta=10000.0):
    """HF LLaMA/OLMoE: cat(freqs, freqs) cos/sin and rotate_half = cat(-x2, x1)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    freqs = positions[..., None].astype(np.float64) * inv
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * np.cos(emb) + rot * np.sin(emb)


def test_rope_matches_hf_rotate_half():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 0, 1, 2, 100]])
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos)), rope_hf_numpy(x, pos), atol=1e-5)


@settings(max_examples=min(5, settings.default.max_examples))
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 500))
def test_rope_scores_depend_on_relative_position_only(m, n, shift):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(a, b):
        qa = apply_rope(q, jnp.array([[a]]))
        kb = apply_rope(k, jnp.array([[b]]))
        return float(jnp.sum(qa * kb))

    np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=1e-3, atol=1e-3)


def test_positions_restart_per_document():
    seg = jnp.array([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [1, 2, 1, 1, 3, 3]])
    want = [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1]]
    np.testing.assert_array_equal(positions_from_segments(seg), want)


def test_params_carry_logical_axes_and_truncated_init():
    p = normal_param(jax.random.key(0), (256, 64), ("vocab", "embed"), std=0.02, dtype=jnp.float32)
    assert p.get_metadata()["out_sharding"] == ("vocab", "embed")
    w = np.asarray(p[...])
    assert np.abs(w).max() <= 3 * 0.02 + 1e-7
    assert 0.015 < w.std() < 0.02  # truncation at 3 std shrinks the std by ~1.3%
    emb = Embed(10, 4, std=0.02, dtype="bfloat16", param_dtype="float32", rngs=nnx.Rngs(0))
    out = emb(jnp.array([[1, 2, 3]]))
    assert out.shape == (1, 3, 4) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out[0, 1], np.float32), np.asarray(emb.embedding[...][2]), rtol=1e-2)
