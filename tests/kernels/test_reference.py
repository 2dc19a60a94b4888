"""The fp32 reference attention against a naive float64 per-head loop, and the empty-row policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spattn_jax import masks
from spattn_jax.attention import attention
from tests import oracles

jax.config.update("jax_default_matmul_precision", "highest")


def _segments(rng, batch, n, num_docs):
    """Contiguous document ids [B, n], as packing produces."""
    if num_docs == 1:
        return None
    ids = np.zeros((batch, n), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(num_docs - 1, n - 1), replace=False))
        ids[b] = np.searchsorted(cuts, np.arange(n), side="right")
    return ids


@given(
    variant=st.sampled_from(masks.VARIANTS),
    num_heads=st.sampled_from([2, 4, 8]),
    kv_groups=st.sampled_from([1, 2]),
    n=st.integers(8, 40),
    q_len=st.one_of(st.none(), st.integers(1, 8)),
    num_docs=st.sampled_from([1, 3]),
    follow=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_equals_naive_loop(variant, num_heads, kv_groups, n, q_len, num_docs, follow, seed):
    rng = np.random.default_rng(seed)
    batch, head_dim, num_kv = 2, 8, num_heads // kv_groups
    q_len = n if q_len is None else q_len
    q = rng.standard_normal((batch, q_len, num_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, n, num_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, n, num_kv, head_dim)).astype(np.float32)
    spec = masks.make(variant, num_heads=num_heads, band_len=None if follow else n + 5)
    seg = _segments(rng, batch, n, num_docs)
    seg_arg = None if seg is None else ((jnp.asarray(seg[:, n - q_len :]), jnp.asarray(seg)))
    got = attention(q, k, v, mask=spec, segment_ids=seg_arg, implementation="reference")
    want = oracles.numpy_attention(q, k, v, spec.dense(q_len, n), segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_matches_jax_dot_product_attention_for_causal():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 33, 4, 16)).astype(np.float32) for _ in range(3))
    spec = masks.make("causal", num_heads=4, band_len=64)
    got = attention(q, k, v, mask=spec, implementation="reference")
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("variant", ["spattention_exclusive", "gapped", "balanced_exclusive"])
def test_empty_rows_give_zero_output_lse_minus_inf_and_zero_gradients(variant):
    rng = np.random.default_rng(1)
    n, num_heads = 64, 4
    q, k, v, do = (jnp.asarray(rng.standard_normal((1, n, num_heads, 8)), jnp.float32) for _ in range(4))
    spec = masks.make(variant, num_heads=num_heads, band_len=n)
    empty = ~spec.dense(n).any(-1)  # [H, n]
    assert empty.any()

    from spattn_jax.kernels import reference

    out, lse = reference.attention(q, k, v, mask=spec, return_lse=True)
    out_hq = np.asarray(out[0]).transpose(1, 0, 2)  # [H, n, D]
    assert np.all(out_hq[empty] == 0)
    assert np.all(np.isneginf(np.asarray(lse[0])[empty])) and np.all(np.isfinite(np.asarray(lse[0])[~empty]))

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, mask=spec, implementation="reference") * do)

    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))
    dq_hq = np.asarray(dq[0]).transpose(1, 0, 2)
    assert np.all(dq_hq[empty] == 0)
    # Keys no query of a head reaches get no gradient from that head; with one kv head per q head,
    # a key every head ignores (j >= n - lo of every head's first interval) gets exactly zero.
    reached = spec.dense(n).any(1)  # [H, n]
    dk_hk = np.asarray(dk[0]).transpose(1, 0, 2)
    assert np.all(dk_hk[~reached] == 0)
