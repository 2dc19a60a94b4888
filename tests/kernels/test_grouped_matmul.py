"""Grouped matmul (``ragged_dot`` semantics): the Pallas kernel against a per-group numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_jax.kernels import grouped_matmul as gm

# Small tiles so that CI shapes cover tiles holding several groups, groups spanning tiles, and
# padding in every dimension.
SMALL = gm.Config(block_m=32, block_n=16, block_k=16)


def loop_gmm(lhs, rhs, group_sizes):
    """float64 ``[M, N]``: each group's rows times its matrix, rows past the groups 0."""
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(group_sizes):
        out[start:start + size] = lhs[start:start + size].astype(np.float64) @ rhs[g].astype(np.float64)
        start += size
    return out


def loop_grads(lhs, rhs, group_sizes, cot):
    """float64 ``d lhs, d rhs`` of ``sum(cot * gmm(lhs, rhs))``, by the same loop."""
    dlhs, drhs = np.zeros(lhs.shape), np.zeros(rhs.shape)
    start = 0
    for g, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        dlhs[rows] = cot[rows].astype(np.float64) @ rhs[g].astype(np.float64).T
        drhs[g] = lhs[rows].astype(np.float64).T @ cot[rows].astype(np.float64)
        start += size
    return dlhs, drhs


@st.composite
def problems(draw):
    groups = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(0, 70), min_size=groups, max_size=groups))
    spare = draw(st.integers(0, 40))  # rows past the last group
    k_dim, n_dim = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return np.array(sizes, np.int32), sum(sizes) + spare, k_dim, n_dim, draw(st.integers(0, 2**16))


@settings(max_examples=min(6, settings.default.max_examples))
@given(problems())
def test_gmm_values_and_grads_equal_per_group_loop(problem):
    sizes, rows, k_dim, n_dim, seed = problem
    if rows == 0:
        rows = 1
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((rows, k_dim)).astype(np.float32)
    rhs = rng.standard_normal((len(sizes), k_dim, n_dim)).astype(np.float32)
    cot = rng.standard_normal((rows, n_dim)).astype(np.float32)

    def f(a, b):
        out = gm.gmm(a, b, jnp.asarray(sizes), implementation="pallas_triton", config=SMALL, interpret=True)
        return jnp.sum(out * cot), out

    (dlhs, drhs), out = jax.grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(lhs), jnp.asarray(rhs))
    want_dlhs, want_drhs = loop_grads(lhs, rhs, sizes, cot)
    np.testing.assert_allclose(out, loop_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dlhs, want_dlhs, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(drhs, want_drhs, rtol=1e-5, atol=1e-4)
    assert out.dtype == jnp.float32


def test_gmm_bf16_matches_ragged_dot_and_default_tiles():
    """bf16 operands with the default (GPU) tiles: the kernel agrees with XLA's ragged_dot."""
    rng = np.random.default_rng(0)
    sizes = jnp.array([100, 0, 157, 1, 70], jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((400, 96)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((5, 96, 80)), jnp.bfloat16)
    ours = gm.gmm(lhs, rhs, sizes, implementation="pallas_triton", interpret=True)
    want = gm.gmm(lhs, rhs, sizes, implementation="ragged_dot")
    np.testing.assert_allclose(ours, want, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(ours[328:], 0.0)  # rows past the groups


def test_auto_and_bad_names():
    assert gm.resolve("auto") == ("pallas_triton" if jax.default_backend() == "gpu" else "ragged_dot")
    with pytest.raises(ValueError, match="unknown grouped-matmul implementation 'cutlass'"):
        gm.gmm(jnp.ones((4, 4)), jnp.ones((1, 4, 4)), jnp.array([4]), implementation="cutlass")


def test_tile_group_ranges_cover_exactly_the_groups_of_each_tile():
    sizes = jnp.array([5, 0, 0, 40, 3, 0, 20], jnp.int32)  # 68 rows, 96 with padding
    ranges = np.asarray(gm._tile_group_ranges(sizes, 96, 16))
    ends = np.cumsum(np.asarray(sizes))
    starts = ends - np.asarray(sizes)
    for t, (first, last) in enumerate(ranges):
        rows = set(range(t * 16, min(t * 16 + 16, 68)))
        touching = [g for g in range(7) if rows & set(range(starts[g], ends[g]))]
        if touching:
            assert first == touching[0] and last == touching[-1], (t, first, last, touching)
        else:
            assert first > last, (t, first, last)
