"""pallas_triton extras beyond the shared test body: decoding, odd head dims, settings, exact zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spattn_jax import masks
from spattn_jax.kernels import pallas_triton, reference

SMALL = dict(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16)


def _grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(do))]


def test_decoding_queries_are_the_last_positions_with_documents_and_odd_head_dim():
    """Tq < Tk, GQA, packed documents and D = 24 (zero-padded to 32 inside) against the reference."""
    rng = np.random.default_rng(0)
    tq, tk, h, kv, d = 9, 70, 4, 2, 24
    q = jnp.asarray(rng.standard_normal((2, tq, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, tk, kv, d)), jnp.float32) for _ in range(2))
    do = jnp.asarray(rng.standard_normal((2, tq, h, d)), jnp.float32)
    ids = np.sort(rng.integers(0, 3, (2, tk)), axis=1).astype(np.int32)
    q_ids, kv_ids = jnp.asarray(ids[:, tk - tq :]), jnp.asarray(ids)
    spec = masks.make("spattention", num_heads=h, band_len=None)

    def ours(q, k, v):
        return pallas_triton.attention(q, k, v, mask=spec, q_segment_ids=q_ids, kv_segment_ids=kv_ids, **SMALL)

    def ref(q, k, v):
        return reference.attention(q, k, v, mask=spec, q_segment_ids=q_ids, kv_segment_ids=kv_ids)

    for got, want in zip(_grads(jax.jit(ours), q, k, v, do), _grads(ref, q, k, v, do)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_single_key_rows_give_exactly_zero_gradients():
    """Every row sees at most one key (W = 1 bands): d softmax = 0 exactly, as autodiff of the reference."""
    rng = np.random.default_rng(1)
    n, h = 12, 8
    q, k, v, do = (jnp.asarray(rng.standard_normal((1, n, h, 32)), jnp.float32) for _ in range(4))
    spec = masks.make("gapped", num_heads=h, band_len=None)
    out, dq, dk, dv = _grads(jax.jit(lambda q, k, v: pallas_triton.attention(q, k, v, mask=spec, **SMALL)), q, k, v, do)
    assert np.all(dq == 0) and np.all(dk == 0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dv))


def test_settings_are_validated_with_one_line_errors():
    with pytest.raises(ValueError, match="unknown pallas_triton option"):
        pallas_triton.make_config(block_qq=64)
    spec = masks.make("causal", num_heads=1, band_len=None)
    x = jnp.zeros((1, 32, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        pallas_triton.attention(x, x, x, mask=spec, block_q=48)
    with pytest.raises(ValueError, match="both q_segment_ids"):
        pallas_triton.attention(x, x, x, mask=spec, q_segment_ids=jnp.zeros((1, 32), jnp.int32))


def test_backward_settings_fall_back_to_the_forward_ones():
    c = pallas_triton.Config(block_q=32, block_k=16, block_q_dq=None, num_stages_dkv=None).resolved()
    assert (c.block_q_dq, c.num_stages_dkv) == (32, c.num_stages)
    wide = pallas_triton._fit_config(pallas_triton.Config(num_stages=3), 4096, 4096, head_dim=256)
    assert max(wide.num_stages, wide.num_stages_dq, wide.num_stages_dkv) <= 2
