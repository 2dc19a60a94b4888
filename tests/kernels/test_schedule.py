"""The closed-form tile schedules against brute force over ``MaskSpec.dense``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_jax import masks
from spattn_jax.kernels import schedule


def _tile_view(dense: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
    """``bool [H, nq, bq, nk, bk]`` of ``dense [H, Tq, Tk]``, padding False."""
    h, tq, tk = dense.shape
    nq, nk = schedule.cdiv(tq, block_q), schedule.cdiv(tk, block_k)
    out = np.zeros((h, nq * block_q, nk * block_k), bool)
    out[:, :tq, :tk] = dense
    return out.reshape(h, nq, block_q, nk, block_k)


def _real(tq: int, tk: int, block_q: int, block_k: int) -> np.ndarray:
    """``bool [nq, bq, nk, bk]``: True where both the row and the key are real (not padding)."""
    nq, nk = schedule.cdiv(tq, block_q), schedule.cdiv(tk, block_k)
    rows = np.arange(nq * block_q) < tq
    keys = np.arange(nk * block_k) < tk
    return (rows[:, None] & keys[None, :]).reshape(nq, block_q, nk, block_k)


def _visits(runs: np.ndarray, num_other: int):
    """``int [H, T, num_other]`` visit counts and ``bool`` interior flags from a run table."""
    h, t, _, _ = runs.shape
    counts = np.zeros((h, t, num_other), np.int64)
    interior = np.zeros((h, t, num_other), bool)
    masked = schedule.run_is_masked(runs.shape[2] // schedule.RUNS_PER_INTERVAL)
    for r, is_masked in enumerate(masked):
        start, stop = runs[:, :, r, 0], runs[:, :, r, 1]
        idx = np.arange(num_other)
        inside = (idx >= start[..., None]) & (idx < stop[..., None])
        counts += inside
        if not is_masked:
            interior |= inside
    return counts, interior


geometry = st.fixed_dictionaries(
    dict(
        variant=st.sampled_from(masks.VARIANTS),
        num_heads=st.sampled_from([1, 2, 3, 4, 8, 16]),
        kv_len=st.integers(1, 300),
        q_frac=st.sampled_from([1.0, 1.0, 0.5, 0.1]),
        extra=st.sampled_from([None, 0, 5, 64]),
        block_q=st.sampled_from([1, 4, 16, 32, 64, 128]),
        block_k=st.sampled_from([1, 8, 16, 32, 64, 128]),
    )
)


def _setup(g):
    kv_len = g["kv_len"]
    q_len = max(1, int(round(kv_len * g["q_frac"])))
    follow = g["extra"] is None and kv_len >= g["num_heads"]
    band_len = None if follow else max(kv_len, g["num_heads"]) + (g["extra"] or 0)
    spec = masks.make(g["variant"], num_heads=g["num_heads"], band_len=band_len)
    return spec, q_len, kv_len


@settings(max_examples=150)
@given(g=geometry)
def test_forward_runs_visit_exactly_the_nonempty_tiles(g):
    spec, q_len, kv_len = _setup(g)
    bq, bk = g["block_q"], g["block_k"]
    runs = schedule.forward_runs(spec.intervals(kv_len), block_q=bq, block_k=bk, q_len=q_len, kv_len=kv_len)
    tiles = _tile_view(spec.dense(q_len, kv_len), bq, bk)  # [H, nq, bq, nk, bk]
    nonempty = tiles.any(axis=(2, 4))  # [H, nq, nk]
    counts, interior = _visits(runs, nonempty.shape[-1])

    assert counts.max(initial=0) <= 1, "a key tile is visited twice"
    np.testing.assert_array_equal(counts == 1, nonempty)  # every allowed pair covered, no waste

    # Interior: every real pair allowed and no padded key; and every such tile is interior.
    real = _real(q_len, kv_len, bq, bk)
    all_real_allowed = np.all(tiles | ~real[None], axis=(2, 4))
    keys_unpadded = (np.arange(nonempty.shape[-1]) + 1) * bk <= kv_len
    full = nonempty & all_real_allowed & keys_unpadded[None, None, :]
    np.testing.assert_array_equal(interior, full)


@settings(max_examples=150)
@given(g=geometry)
def test_transpose_runs_visit_exactly_the_query_tiles_that_see_each_key_tile(g):
    spec, q_len, kv_len = _setup(g)
    bq, bk = g["block_q"], g["block_k"]
    runs = schedule.transpose_runs(spec.intervals(kv_len), block_q=bq, block_k=bk, q_len=q_len, kv_len=kv_len)
    tiles = _tile_view(spec.dense(q_len, kv_len), bq, bk)
    nonempty = tiles.any(axis=(2, 4)).transpose(0, 2, 1)  # [H, nk, nq]
    counts, interior = _visits(runs, nonempty.shape[-1])

    assert counts.max(initial=0) <= 1, "a query tile is visited twice"
    np.testing.assert_array_equal(counts == 1, nonempty)

    real = _real(q_len, kv_len, bq, bk)
    all_real_allowed = np.all(tiles | ~real[None], axis=(2, 4)).transpose(0, 2, 1)
    rows_unpadded = (np.arange(nonempty.shape[-1]) + 1) * bq <= q_len
    full = nonempty & all_real_allowed & rows_unpadded[None, None, :]
    np.testing.assert_array_equal(interior, full)


@settings(max_examples=60)
@given(g=geometry)
def test_forward_and_transpose_visit_the_same_tile_pairs(g):
    spec, q_len, kv_len = _setup(g)
    geom = dict(block_q=g["block_q"], block_k=g["block_k"], q_len=q_len, kv_len=kv_len)
    fwd = schedule.forward_runs(spec.intervals(kv_len), **geom)
    bwd = schedule.transpose_runs(spec.intervals(kv_len), **geom)
    nq, nk = fwd.shape[1], bwd.shape[1]
    fwd_counts, _ = _visits(fwd, nk)
    bwd_counts, _ = _visits(bwd, nq)
    np.testing.assert_array_equal(fwd_counts, bwd_counts.transpose(0, 2, 1))
    assert schedule.visited_tiles(fwd) == fwd_counts.sum()


def test_position_functions_agree_on_jax_arrays():
    """The range helpers are plain integer arithmetic, so kernels can evaluate them on traced ints."""
    tiles = np.arange(7)
    geom = dict(block_q=16, block_k=32, q_len=100, kv_len=130)
    want = schedule.key_tiles(tiles, 20, 45, **geom)
    got = schedule.key_tiles(jnp.asarray(tiles, jnp.int32), 20, 45, **geom)
    for w, g_ in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g_), w)
    want = schedule.query_tiles(tiles, 3, 9, **geom)
    got = schedule.query_tiles(jnp.asarray(tiles, jnp.int32), 3, 9, **geom)
    for w, g_ in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g_), w)


def test_spattention_head_two_ranges_and_tile_counts_match_the_spec_table():
    """Spec §6: SPA-default at N=4096, H=16 touches 2,133 of 8,448 causal 128-tiles; EBALL 768."""
    for variant, want in (("spattention", 2133), ("spattention_exclusive", 768), ("causal", 8448)):
        spec = masks.make(variant, num_heads=16, band_len=None)
        runs = schedule.forward_runs(spec.intervals(4096), block_q=128, block_k=128, q_len=4096, kv_len=4096)
        total = schedule.visited_tiles(runs)
        assert total == want, (variant, total)


def test_interval_table_lists_farthest_first_and_pads_with_empty_slots():
    table = schedule.interval_table([((0, 5), (10, 20)), ((3, 4),)])
    np.testing.assert_array_equal(table, [[10, 20, 0, 5], [3, 4, 0, 0]])
