"""CPU tests of the Pallas Mosaic GPU band kernel (spattn_jax/kernels/pallas_mosaic_gpu*.py).

What runs where:

* The kernel *values* are checked on an H100 only: the shared kernel test body
  (tests/kernels/test_kernels.py, row ``pallas_mosaic_gpu``, skipped without an sm90 GPU) and
  ``bench/mgpu_dev.py check`` (outputs and dq/dk/dv against the fp32 reference; bench/NOTES_mgpu.md).
  JAX 0.10.2's Mosaic GPU interpreter cannot run these kernels on the CPU: it has no rule for
  ``run_state`` (the in-place wgmma accumulator) nor for layout casts, and a warp-specialised
  attention kernel (jax's own ``attention_mgpu``) hung in it.
* Here, on the CPU: the static schedule the kernels launch (work list, LPT order, run tables at the
  CTA geometry, checked by hypothesis against ``MaskSpec.dense``), a NumPy emulation of the forward's
  tile loop (runs, unmasked interiors, masked edges, the empty-row guard) against the reference, the
  input checks, and *lowering*: all three kernels are traced and lowered to Mosaic GPU for CUDA
  (``lower(lowering_platforms=("cuda",))``), which catches tracing, layout and lowering errors
  without a GPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_jax import masks
from spattn_jax.kernels import pallas_mosaic_gpu as mg
from spattn_jax.kernels import pallas_mosaic_gpu_fwd as mg_fwd
from spattn_jax.kernels import reference, schedule
from tests import bench_scripts


# -- work list ---------------------------------------------------------------------------------------


@given(
    heads=st.integers(1, 6),
    tiles=st.integers(1, 7),
    batch=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_work_list_is_a_permutation_heaviest_first(heads, tiles, batch, seed):
    lengths = np.random.default_rng(seed).integers(0, 5, size=(heads, tiles))
    items = mg.work_list(lengths, batch)
    assert items.dtype == np.int32 and items.shape == (batch * heads * tiles, 3)
    assert len({tuple(r) for r in items}) == items.shape[0]  # every unit exactly once
    w = lengths[items[:, 1], items[:, 2]]
    assert np.all(np.diff(w) <= 0), "LPT: non-increasing work"
    # Ties are head-major: within equal work, (h, b, t) ascends.
    for a, b in zip(items[:-1], items[1:]):
        if lengths[a[1], a[2]] == lengths[b[1], b[2]]:
            assert (a[1], a[0], a[2]) < (b[1], b[0], b[2])


def test_work_list_plain_order():
    lengths = np.array([[0, 3], [5, 1]])
    items = mg.work_list(lengths, 2, lpt=False)
    # (b, h, tile) order, the empty units (head 0, tile 0) last.
    assert [tuple(r) for r in items] == [(0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 1),
                                         (0, 0, 0), (1, 0, 0)]


def test_lpt_beats_plain_order_on_exclusive_bands():
    # EBALL at N = 8192, H = 16, 128-row CTAs: head 0 has the most tiles and is launched first.
    spec = masks.make("spattention_exclusive", num_heads=16, band_len=None)
    runs = mg.run_table(spec.intervals(8192), 128, 128, 8192, 8192, False)
    lengths = mg.run_lengths(runs)
    lpt = mg.lpt_makespan(lengths, 2, 132, overhead=0.5)
    plain = mg.lpt_makespan(lengths, 2, 132, lpt=False, overhead=0.5)
    assert lpt <= plain
    total = float(lengths.sum() * 2 + 0.5 * lengths.size * 2)
    assert lpt <= 1.05 * total / 132 + lengths.max() + 0.5  # near the average load


@settings(max_examples=30, deadline=None)
@given(
    costs=st.lists(st.floats(0.0, 20.0), min_size=0, max_size=60),
    workers=st.integers(1, 9),
)
def test_balance_is_the_greedy_list_schedule(costs, workers):
    """Against a plain loop: each unit, in list order, to the least-loaded CTA (lowest index on ties);
    every unit exactly once, each CTA's units contiguous and in list order; Graham's bound."""
    costs = np.asarray(costs, np.float64)
    order, offsets = mg.balance(costs, workers)
    loads, expect = [0.0] * workers, [[] for _ in range(workers)]
    for i, cost in enumerate(costs):
        w = min(range(workers), key=lambda k: (loads[k], k))
        loads[w] += cost
        expect[w].append(i)
    assert offsets.shape == (workers + 1,) and offsets[0] == 0 and offsets[-1] == len(costs)
    assert [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == expect
    span = mg.makespan(costs, order, offsets)
    assert span == pytest.approx(max(loads, default=0.0))
    if len(costs):
        assert span <= costs.sum() / workers + costs.max() + 1e-9


@pytest.mark.parametrize("variant", ["spattention", "spattention_exclusive"])
@pytest.mark.parametrize("geometry", [(128, 128, False), (128, 64, False), (64, 128, True)])
def test_balance_beats_the_strided_split_on_the_benchmark_lists(variant, geometry):
    """2x8192, H = 16 on 132 SMs, each kernel's tiles: the strided split (CTA c: units c, c + 132, ...)
    ends 5-6% over the mean load; the greedy deal at most 3.5% over it."""
    block_rows, block_inner, transpose = geometry
    spec = masks.make(variant, num_heads=16, band_len=None)
    lengths = mg.run_lengths(mg.run_table(spec.intervals(8192), block_rows, block_inner, 8192, 8192, transpose))
    items = mg.work_list(lengths, 2)
    tiles = lengths[items[:, 1], items[:, 2]]
    costs = tiles[tiles > 0] + mg_fwd.UNIT_COST
    strided = max(costs[c::132].sum() for c in range(132))
    span = mg.makespan(costs, *mg.balance(costs, 132))
    mean = costs.sum() / 132
    assert strided >= 1.045 * mean
    assert span <= 1.035 * mean and span < strided


# -- run tables at the kernels' geometries -----------------------------------------------------------


def _visited_pairs(runs, h, tile, block_rows, block_inner, transpose, q_len, kv_len):
    """bool [q_len, kv_len]: pairs inside tiles a unit visits (rows: its CTA tile)."""
    out = np.zeros((q_len, kv_len), bool)
    flat = runs[h, tile]
    for r in range(flat.size // 2):
        for t in range(flat[2 * r], flat[2 * r + 1]):
            if transpose:
                out[t * block_inner : (t + 1) * block_inner, tile * block_rows : (tile + 1) * block_rows] = True
            else:
                out[tile * block_rows : (tile + 1) * block_rows, t * block_inner : (t + 1) * block_inner] = True
    return out


@settings(max_examples=25)
@given(
    variant=st.sampled_from(masks.VARIANTS),
    heads=st.sampled_from([1, 2, 4, 8]),
    kv_len=st.integers(1, 600),
    q_short=st.integers(0, 100),
    rows=st.sampled_from([128, 256]),
    inner=st.sampled_from([64, 128]),
)
def test_cta_runs_cover_the_mask(variant, heads, kv_len, q_short, rows, inner):
    """Forward/dQ (CTA rows x K tiles) and dK/dV (Q tiles x CTA keys) visit every allowed pair once."""
    q_len = max(1, kv_len - q_short)
    if kv_len < heads:
        return
    spec = masks.make(variant, num_heads=heads, band_len=None)
    ivs = spec.intervals(kv_len)
    dense = spec.dense(q_len, kv_len)
    fwd = mg.run_table(ivs, rows, inner, q_len, kv_len, False)
    dkv = mg.run_table(ivs, inner, rows, q_len, kv_len, True)
    for h in range(heads):
        seen_f = np.zeros((q_len, kv_len), int)
        for tile in range(fwd.shape[1]):
            seen_f += _visited_pairs(fwd, h, tile, rows, inner, False, q_len, kv_len)
        seen_t = np.zeros((q_len, kv_len), int)
        for tile in range(dkv.shape[1]):
            seen_t += _visited_pairs(dkv, h, tile, rows, inner, True, q_len, kv_len)
        assert np.all(seen_f[dense[h]] == 1) and np.all(seen_t[dense[h]] == 1)
        assert seen_f.max(initial=0) <= 1 and seen_t.max(initial=0) <= 1


# -- NumPy emulation of the forward kernel's tile loop -----------------------------------------------


def _emulate_forward(plan: mg.Plan, q, k, v, q_seg=None, kv_seg=None):
    """What the forward kernel computes, step by step, in float64: per work item, per consumer half,
    per run tile; masks only on masked runs; base-2 online softmax with the empty-row guard."""
    c = plan.config
    bq, bk = c.block_q, c.block_kv
    runs = mg.run_table(plan.intervals, 2 * bq, bk, plan.q_len, plan.kv_len, False)
    items = mg.work_list(mg.run_lengths(runs), plan.batch, lpt=c.lpt)
    bands = mg.interval_table(plan)
    bounds = schedule.edge_bounds(plan.intervals, plan.slots, transpose=False)
    flags = plan.edge_masks(2 * bq + bk, transpose=False)
    coef = plan.scale * math.log2(math.e)
    out = np.full(q.shape, np.nan)  # unvisited rows stay NaN
    lse = np.full((plan.batch, plan.num_heads, plan.q_pad), np.nan)
    for b, h, tile in items:
        for wg in range(2):
            row0 = tile * 2 * bq + wg * bq
            qi = q[b, row0 : row0 + bq, h]
            acc, m, l = np.zeros((bq, q.shape[-1])), np.full(bq, -np.inf), np.zeros(bq)
            for r, masked in enumerate(flags):
                for t in range(runs[h, tile, 2 * r], runs[h, tile, 2 * r + 1]):
                    kj = k[b, t * bk : (t + 1) * bk, h // plan.groups]
                    vj = v[b, t * bk : (t + 1) * bk, h // plan.groups]
                    s = qi @ kj.T
                    if masked:
                        dist = (np.arange(bq)[:, None] + row0 + plan.q_offset) - (np.arange(bk)[None, :] + t * bk)
                        edges = ([tuple(bands[h, 2 * sl : 2 * sl + 2]) for sl in range(plan.slots)], bounds[h])
                        ok = mg_fwd.edge_allowed(dist, masked, edges)  # the kernel's own predicate
                        ok = np.ones_like(dist, bool) if ok is None else ok
                        if plan.segments:
                            ok &= q_seg[b, row0 : row0 + bq, None] == kv_seg[b, None, t * bk : (t + 1) * bk]
                        s = np.where(ok, s, -np.inf)
                    m_new = np.maximum(m, s.max(1) * coef)
                    m_use = np.where(m_new == -np.inf, 0.0, m_new) if masked else m_new
                    alpha = np.exp2(m - m_use)
                    p = np.exp2(s * coef - m_use[:, None])
                    acc = acc * alpha[:, None] + p @ vj
                    l = l * alpha + p.sum(1)
                    m = m_new
            empty = l == 0
            out[b, row0 : row0 + bq, h] = acc / np.where(empty, 1.0, l)[:, None]
            lse[b, h, row0 : row0 + bq] = np.where(empty, np.inf, m + np.log2(np.where(empty, 1.0, l)))
    return out, lse


@pytest.mark.parametrize(
    "variant,n,heads,kv_heads,docs,config,one_sided",
    [
        ("spattention", 700, 4, 2, 1, mg.Config(), False),
        ("spattention_exclusive", 520, 4, 4, 1, mg.Config(block_kv=64), False),
        ("spattention", 300, 2, 1, 3, mg.Config(), False),
        ("gapped", 256, 8, 8, 1, mg.Config(block_q=128), False),
        ("balanced", 640, 8, 4, 1, mg.Config(block_kv=64, lpt=False), False),
        # Bands wide and apart enough that every edge tile crosses one boundary: one compare per element.
        ("spattention_exclusive", 1040, 2, 2, 1, mg.Config(), True),
        ("spattention", 1100, 4, 2, 1, mg.Config(block_kv=64), True),
        ("spattention_exclusive", 1040, 2, 1, 3, mg.Config(), True),
    ],
)
def test_forward_emulation_matches_reference(variant, n, heads, kv_heads, docs, config, one_sided):
    rng = np.random.default_rng(n)
    d = 64
    spec = masks.make(variant, num_heads=heads, band_len=None)
    seg = None
    if docs > 1:
        cuts = np.sort(rng.choice(np.arange(1, n), size=docs - 1, replace=False))
        seg = np.searchsorted(cuts, np.arange(n), side="right")[None].astype(np.int32)
    plan = mg.make_plan((1, n, heads, d), (1, n, kv_heads, d), spec, scale=None, segments=seg is not None, config=config)
    assert plan.one_sided_edges(2 * config.block_q + config.block_kv) == one_sided
    q = rng.standard_normal((1, plan.q_pad, heads, d))
    k = rng.standard_normal((1, plan.kv_pad, kv_heads, d))
    v = rng.standard_normal((1, plan.kv_pad, kv_heads, d))
    q[:, n:] = 0.0
    k[:, n:] = 0.0
    v[:, n:] = 0.0
    pad = lambda x, val: None if x is None else np.pad(x, ((0, 0), (0, plan.q_pad - n)), constant_values=val)  # noqa: E731
    out, lse = _emulate_forward(plan, q, k, v, pad(seg, -1), pad(seg, -2))
    ref, ref_lse = reference.attention(
        *(jnp.asarray(x[:, :n], jnp.float32) for x in (q, k, v)),
        mask=spec, q_segment_ids=None if seg is None else jnp.asarray(seg),
        kv_segment_ids=None if seg is None else jnp.asarray(seg), return_lse=True,
    )
    assert np.all(np.isfinite(out[:, :n]))
    np.testing.assert_allclose(out[:, :n], np.asarray(ref), atol=2e-5, rtol=2e-5)
    # The kernel's LSE is base 2 and +inf on empty rows; the reference's is natural and -inf there.
    got, want = lse[:, :, :n] * math.log(2.0), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isposinf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("transpose,unit,inner", [(False, 128, 128), (False, 128, 64), (True, 128, 64)])
@pytest.mark.parametrize("variant,n,heads", [("spattention_exclusive", 1040, 2), ("spattention", 1100, 4),
                                             ("spattention", 2048, 4)])
def test_one_sided_edge_masks_equal_the_full_predicate(variant, n, heads, transpose, unit, inner):
    """On every edge tile of every unit (forward/dQ geometry, and the dK/dV kernel's transposed one:
    ``unit`` rows or keys per CTA, ``inner`` per pipelined tile), the one compare the kernels make
    (:meth:`Plan.edge_masks`, :func:`edge_allowed`) agrees with the head's full predicate on every
    real (query, key) pair."""
    spec = masks.make(variant, num_heads=heads, band_len=None)
    plan = mg.make_plan((1, n, heads, 64), (1, n, heads, 64), spec, scale=None, segments=False, config=mg.Config())
    kinds = plan.edge_masks(unit + inner, transpose)
    assert {m[0] for m in kinds if m} == {"lt", "ge"}
    bq, bk = (inner, unit) if transpose else (unit, inner)
    runs = mg.run_table(plan.intervals, bq, bk, n, n, transpose)
    bands, bounds = mg.interval_table(plan), schedule.edge_bounds(plan.intervals, plan.slots, transpose)
    checked = 0
    for h in range(heads):
        edges = ([tuple(bands[h, 2 * s : 2 * s + 2]) for s in range(plan.slots)], bounds[h])
        for tile in range(runs.shape[1]):
            for r, masked in enumerate(kinds):
                for t in range(runs[h, tile, 2 * r], runs[h, tile, 2 * r + 1]):
                    if not masked:
                        continue
                    qt, kt = (t, tile) if transpose else (tile, t)
                    qpos, kpos = qt * bq + np.arange(bq), kt * bk + np.arange(bk)
                    dist = qpos[:, None] - kpos[None, :]
                    real = (qpos[:, None] < n) & (kpos[None, :] < n)
                    full = mg_fwd.band_allowed(dist, edges[0])
                    one = mg_fwd.edge_allowed(dist, masked, edges)
                    assert np.array_equal(full & real, one & real), (h, tile, r, t)
                    checked += 1
    assert checked > 0


def _wgmma_accumulator_elements(thread: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the f32 elements ``thread`` of a warpgroup holds of a ``[64, cols]`` wgmma
    accumulator, from the PTX ISA's figure of the ``m64nNk16`` D fragment; element 0 first."""
    warp, lane = divmod(thread, 32)
    j, i, v = np.meshgrid(np.arange(cols // 8), np.arange(2), np.arange(2), indexing="ij")
    return (16 * warp + lane // 4 + 8 * i).ravel(), (8 * j + 2 * (lane % 4) + v).ravel()


@settings(max_examples=60, deadline=None)
@given(
    cols=st.sampled_from([64, 128]),
    transpose=st.booleans(),
    intervals=st.lists(
        st.tuples(st.one_of(st.none(), st.integers(-300, 300)), st.one_of(st.none(), st.integers(-300, 300))),
        min_size=1,
        max_size=2,
    ),
)
def test_band_fill_keeps_exactly_the_elements_in_the_intervals(cols, transpose, intervals):
    """For every thread of the warpgroup, the thread's ``d0`` plus the per-element constants give the
    distances of exactly the elements PTX's layout figure assigns it, and the limits against the
    constants keep an element iff its distance lies in one of the intervals: ``lo <= d - offset < hi``
    (``thresholds = (lo - offset, hi - offset)``, ``None`` = open), ``d - offset = +-(row - col)``."""
    sign, consts = mg_fwd.band_compare((64, cols), transpose=transpose)
    consts = consts.reshape(-1)
    assert consts.size == 64 * cols // 128
    s = -1 if transpose else 1  # d - offset = s (row - col)
    for thread in range(128):
        rows, cs = _wgmma_accumulator_elements(thread, cols)
        d0 = rows[0] - cs[0]
        rel = s * d0 + consts  # distance less offset, per element in Mosaic's register order
        assert sorted(rel.tolist()) == sorted((s * (rows - cs)).tolist())
        keep = np.zeros(consts.shape, bool)
        want = np.zeros(consts.shape, bool)
        for lo, hi in intervals:  # the kernel's compares (arith.cmpi sle / sgt) against the brute force
            keep |= (True if lo is None else (lo + sign * d0) <= consts) & (True if hi is None else (hi + sign * d0) > consts)
            want |= (True if lo is None else rel >= lo) & (True if hi is None else rel < hi)
        assert np.array_equal(keep, want)


# -- backward helpers ----------------------------------------------------------------------------------


def test_forward_work_list_covers_every_padded_row_tile():
    """q_pad may exceed the last real row by more than a CTA tile (here 256 vs 100 rows, 128-row
    tiles); the forward and dQ work lists still hold every tile once, the padded ones empty, so those
    kernels write every row's LSE (+inf) and delta (0) that the dK/dV kernel may read."""
    spec = masks.make("spattention_exclusive", num_heads=2, band_len=None)
    config = mg.Config(block_q_dq=128)
    plan = mg.make_plan((2, 100, 2, 64), (2, 100, 2, 64), spec, scale=None, segments=False, config=config)
    assert plan.q_pad == 256
    records, ranges, num_busy = mg_fwd.static_tables(plan, 128, 128, transpose=False)
    records = np.asarray(records)
    assert np.asarray(ranges)[-1] == num_busy  # the CTAs' shares cover exactly the busy units
    b, h, tile = records[:, 0], records[:, 1], records[:, 2]
    keys = sorted(zip(b.tolist(), h.tolist(), tile.tolist()))
    assert keys == [(bb, hh, tt) for bb in range(2) for hh in range(2) for tt in range(2)]
    runs = records[:, 3 : 3 + 2 * schedule.RUNS_PER_INTERVAL * plan.slots]
    lengths = np.maximum(runs[:, 1::2] - runs[:, 0::2], 0).sum(1)
    assert np.all(lengths[tile == 1] == 0) and np.all(lengths[tile == 0] > 0)
    assert num_busy == 4 and np.all(lengths[:num_busy] > 0)  # busy units first: the consumers' list


# -- inputs and config ---------------------------------------------------------------------------------


def test_rejects_fp32_and_names_the_alternatives():
    spec = masks.make("spattention", num_heads=2, band_len=None)
    x = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="pallas_triton"):
        mg.attention(x, x, x, mask=spec)


def test_rejects_tiles_that_overflow_shared_memory():
    spec = masks.make("spattention", num_heads=2, band_len=None)
    x = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
    # dQ: Q, dO, O and dQ staging (4 x 32 KiB) plus a 3-deep K/V ring of 64-key tiles (96 KiB).
    with pytest.raises(ValueError, match="dq kernel needs .* shared memory"):
        mg.attention(x, x, x, mask=spec, num_stages_bwd=3)


def test_scratch_bytes_counts_each_buffer_to_the_next_kib_and_8_bytes_a_barrier():
    plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    scratch = [
        plgpu.SMEM((2, 64), jnp.float32),  # 512 B -> 1 KiB
        plgpu.SMEM((64, 128), jnp.bfloat16),  # 16 KiB exactly
        plgpu.SMEM((4, 96), jnp.bfloat16),  # 768 B -> 1 KiB
        plgpu.Barrier(num_arrivals=2, num_barriers=3),
        plgpu.Barrier(num_barriers=1),
    ]
    assert mg_fwd.scratch_bytes(scratch) == 1024 + 16384 + 1024 + 4 * 8


def test_dkv_kernel_fits_the_164_kib_carveout_at_the_defaults():
    """The driver picks the smallest shared-memory carve-out that holds the kernel plus its 1 KiB
    reserve; at 164 KiB the SM keeps 92 KiB of L1. One more KiB puts dK/dV at the 196 KiB carve-out,
    measured 4% slower at SPA-default 2x8192 on the H200 (NOTES v11)."""
    used = mg.Config().smem_bytes(128)["dkv"]
    assert used + 1024 <= 164 * 1024
    assert mg.Config().smem_bytes(128)["forward"] <= 227 * 1024


def test_rejects_interpret_mode():
    spec = masks.make("spattention", num_heads=2, band_len=None)
    x = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="interpret"):
        mg.attention(x, x, x, mask=spec, interpret=True)


def test_config_validation_and_padding_units():
    with pytest.raises(ValueError, match="multiple of 64"):
        mg.Config(block_q=32)
    with pytest.raises(ValueError, match="unknown pallas_mosaic_gpu option"):
        mg.make_config(block_x=64)
    assert mg.make_config(block_k=64).block_kv == 64
    c = mg.Config(block_q=64, block_kv=128, block_q_dq=128, block_kv_dkv=64)
    assert c.q_multiple == 256 and c.kv_multiple == 128
    spec = masks.make("spattention", num_heads=4, band_len=None)
    plan = mg.make_plan((2, 1000, 4, 96), (2, 1000, 2, 96), spec, scale=None, segments=False, config=c)
    assert (plan.q_pad, plan.kv_pad, plan.head_dim, plan.groups) == (1024, 1024, 128, 2)
    assert plan.scale == pytest.approx(96**-0.5)


def test_not_supported_on_cpu():
    assert mg.is_supported() is False


# -- lowering to Mosaic GPU (no GPU needed) ------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,segments,kv_heads,options",
    [
        ("spattention", False, 4, {}),
        ("spattention_exclusive", True, 2, {}),
        ("causal", False, 1, dict(block_kv=64, num_stages=3, num_stages_bwd=2, num_ctas=None)),
    ],
)
def test_kernels_lower_for_cuda(variant, segments, kv_heads, options):
    b, n, h, d = 1, 1000, 4, 96
    spec = masks.make(variant, num_heads=h, band_len=None)
    q = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, n, kv_heads, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, n), jnp.int32) if segments else None

    def loss(q, k, v, seg):
        o = mg.attention(q, k, v, mask=spec, q_segment_ids=seg, kv_segment_ids=seg, **options)
        return jnp.sum(o.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("mosaic_gpu") >= 3  # forward, dQ and dK/dV custom calls


@pytest.mark.parametrize("num_ctas", [3, 132])
def test_barrier_protocol_has_no_deadlock(num_ctas, tmp_path):
    """The three kernels' traced barrier protocol, simulated warpgroup by warpgroup on the CPU
    (``bench/mgpu_dev.py protocol``) under random schedules: no deadlock, no barrier misuse.

    ``num_ctas=3`` gives every CTA many units (the persistent hand-over between units is where the
    forward deadlocked on the H100 before 2026-11-23: the old kernels fail this in the forward).
    """
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "bench" / "mgpu_dev.py"), "protocol", "--cases", "2,0,3,5",
         "--options", f'{{"num_ctas": {num_ctas}}}', "--max-ctas", "3", "--policies", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT protocol")]
    assert result == ["RESULT protocol runs=12 bad=0"], proc.stdout[-3000:]


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetch_names_the_rows_the_next_unit_loads(prefetch):
    """``Config.prefetch``: every L2 prefetch a CTA issues covers rows that the CTA's next unit then
    loads with TMA (before its own prefetch), in all three kernels; switched off, none is issued.

    Simulated on the traced kernels (the protocol simulator logs each CTA's loads and prefetches in
    issue order). Prefetching ``item + 2 G`` instead of the next item ``item + G`` fails this."""
    dev = _mgpu_dev()
    case = dev.CASES[2]  # 1 x 2048 EBALL, 16 heads: busy and empty units
    for name, closed in dev.kernel_jaxprs(case, dict(num_ctas=3, prefetch=prefetch)).items():
        kjaxpr, args, grid, threads = dev.find_kernel(closed)
        for cta in range(grid[0]):
            r = dev.simulate_cta(kjaxpr, args, cta, threads, dev.BARRIER_NAMES[name], "uniform", seed=cta)
            assert r["deadlock"] is None and r["problems"] == [], (name, cta, r["problems"][:3])
            assert (r["prefetches"] > 0) == prefetch, (name, cta, r["prefetches"])


@pytest.mark.parametrize("case_index", [2, 4, 5])
@pytest.mark.parametrize("num_ctas", [3, None])
def test_every_output_row_is_stored_exactly_once(case_index, num_ctas):
    """Each kernel's two outputs (O and LSE; dQ and delta; dK and dV) are TMA-stored exactly once per
    element over all CTAs: busy units by their consumer warpgroups, empty units (EBALL keys no query
    sees, rows with no key, padded rows) by the producer from its constant tiles. Simulated on the
    traced kernels; a unit stored by both sides, or by neither, fails."""
    dev = _mgpu_dev()
    case = dev.CASES[case_index]
    for name, closed in dev.kernel_jaxprs(case, dict(case[9], num_ctas=num_ctas)).items():
        kj, kargs, grid, nt = dev.find_kernel(closed)
        stores = []
        for cta in range(grid[0]):
            r = dev.simulate_cta(kj, kargs, cta, nt, dev.BARRIER_NAMES[name], "uniform", seed=cta)
            assert not r["deadlock"] and not r["problems"], (name, cta, r)
            stores += r["stores"]
        counts = dev.store_counts(kj, kargs, stores)
        outputs = (len(kj.invars) - 2, len(kj.invars) - 1)
        assert sorted(counts) == list(outputs), (name, sorted(counts))
        for i in outputs:
            assert counts[i].min() == counts[i].max() == 1, (name, i, counts[i].min(), counts[i].max())


def test_shared_memory_reuse_check_flags_stores_that_are_not_waited_for(monkeypatch):
    """The simulator's shared-memory checks: with ``wait_smem_to_gmem`` traced as a no-op, every kernel
    rewrites a staging buffer that a TMA store may still read, and exits with stores still reading."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dev = _mgpu_dev()
    monkeypatch.setattr(plgpu, "wait_smem_to_gmem", lambda n, wait_read_only=False: None)
    for name, closed in dev.kernel_jaxprs(dev.CASES[0], dict(num_ctas=1)).items():
        kj, kargs, grid, nt = dev.find_kernel(closed)
        r = dev.simulate_cta(kj, kargs, 0, nt, dev.BARRIER_NAMES[name], "uniform", seed=0)
        assert not r["deadlock"], (name, r["deadlock"])
        assert any("register store into" in p and "may still read it" in p for p in r["problems"]), name
        assert any("exits while a TMA store may still read" in p for p in r["problems"]), name


@pytest.mark.parametrize("wait", [False, True])
def test_shared_memory_reuse_check_flags_a_load_into_a_buffer_a_store_still_reads(wait):
    """A TMA load into the source of an unfinished TMA store is flagged; waiting for the store's reads
    first (``wait_smem_to_gmem(0, wait_read_only=True)``) clears it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dev = _mgpu_dev()

    def body(x_ref, o_ref, buf, bar):
        plgpu.copy_smem_to_gmem(buf, o_ref)
        if wait:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.copy_gmem_to_smem(x_ref, buf, bar)
        plgpu.barrier_wait(bar)
        plgpu.wait_smem_to_gmem(0)

    tile = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    kernel = plgpu.kernel(body, out_type=tile, scratch_types=[mg_fwd.tiled_smem((64, 64), jnp.bfloat16), plgpu.Barrier()],
                          grid=(1,), grid_names=("cta",), num_threads=1, thread_name="wg")
    kj, kargs, _, nt = dev.find_kernel(jax.make_jaxpr(kernel)(jnp.zeros(tile.shape, tile.dtype)))
    r = dev.simulate_cta(kj, kargs, 0, nt, ["ready"], "uniform", seed=0)
    assert not r["deadlock"]
    flagged = [p for p in r["problems"] if "TMA load into" in p and "may still read it" in p]
    assert bool(flagged) != wait, r["problems"]


def test_unused_prefetch_check_flags_a_prefetch_that_no_load_reads():
    dev = _mgpu_dev()
    q, k = object(), object()
    rows = lambda start, size: ((0, 1), (start, size), (0, 1), (0, 128))  # noqa: E731
    used = [("prefetch", q, rows(128, 128)), ("load", q, rows(128, 64)), ("load", q, rows(192, 64))]
    assert dev.unused_prefetches(used) == []
    # The loads read other rows, another tensor, or come only after the next prefetch.
    assert dev.unused_prefetches([("prefetch", q, rows(128, 128)), ("load", q, rows(256, 64))]) == [rows(128, 128)]
    assert dev.unused_prefetches([("prefetch", q, rows(128, 128)), ("load", k, rows(128, 64))]) == [rows(128, 128)]
    late = [("prefetch", q, rows(0, 128)), ("prefetch", q, rows(128, 128)), ("load", q, rows(0, 64))]
    assert dev.unused_prefetches(late) == [rows(0, 128), rows(128, 128)]


# -- implementation="auto" on Hopper ---------------------------------------------------------------


def test_auto_picks_mosaic_on_hopper_for_inputs_it_takes(monkeypatch):
    """On sm90 ``auto`` is this kernel for bf16/fp16 and head_dim <= 128, else the Triton kernel."""
    from spattn_jax import attention as attn

    monkeypatch.setattr(attn, "_platform_key", lambda: "gpu_sm90")
    monkeypatch.setattr(mg, "is_supported", lambda: True)
    bf16 = jnp.zeros((1, 8, 2, 128), jnp.bfloat16)
    assert attn.resolve("auto", bf16) == "pallas_mosaic_gpu"
    assert attn.resolve("auto", bf16.astype(jnp.float16), block_q=64, num_stages=2) == "pallas_mosaic_gpu"
    assert attn.resolve("auto", bf16.astype(jnp.float32)) == "pallas_triton"  # Mosaic takes 2-byte inputs
    assert attn.resolve("auto", jnp.zeros((1, 8, 2, 256), jnp.bfloat16)) == "pallas_triton"  # D > 128
    assert attn.resolve("auto", bf16, block_k_dq=32) == "pallas_triton"  # a Triton-only tile option
    assert attn.resolve("auto", bf16, interpret=True) == "pallas_triton"
    monkeypatch.setattr(mg, "is_supported", lambda: False)  # e.g. an sm80 device reported as sm90
    assert attn.resolve("auto", bf16) == "pallas_triton"


# -- in-kernel profiler (bench/mgpu_dev.py trace) ----------------------------------------------------


def _mgpu_dev():
    return bench_scripts.load("mgpu_dev")


def test_loading_the_dev_script_leaves_sys_path_alone():
    import sys

    before = list(sys.path)
    _mgpu_dev()
    assert sys.path == before


def test_trace_switch_turns_on_the_profiler_only_when_set(monkeypatch, tmp_path):
    from spattn_jax.kernels import pallas_mosaic_gpu_fwd as fwd

    monkeypatch.delenv("SPATTN_MGPU_TRACE", raising=False)
    assert fwd.compiler_params().profile_space == 0
    monkeypatch.setenv("SPATTN_MGPU_TRACE", str(tmp_path))
    monkeypatch.setenv("SPATTN_MGPU_TRACE_SPACE", "123")
    params = fwd.compiler_params()
    assert (params.profile_space, params.profile_dir) == (123, str(tmp_path))


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkv"])
def test_every_kernel_lowers_with_its_profiler_scopes(kernel, monkeypatch, tmp_path):
    """With ``SPATTN_MGPU_TRACE`` set, each kernel lowers to Mosaic GPU with the profiler's shared
    memory on top of its own and records the scopes ``mgpu_dev.py trace`` reports (only the host
    callback that dumps the trace needs a GPU backend, so lowering stops there on a CPU)."""
    from jax.experimental.mosaic.gpu import profiler

    seen = set()
    intern = profiler.ProfilerSpec.intern_name
    monkeypatch.setattr(profiler.ProfilerSpec, "intern_name", lambda self, name: seen.add(name) or intern(self, name))
    monkeypatch.setenv("SPATTN_MGPU_TRACE", str(tmp_path))
    monkeypatch.setenv("SPATTN_MGPU_TRACE_SPACE", "256")
    f = _mgpu_dev().split_fns(1, 1024, "spattention", {}, heads=8)[kernel]
    x = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((1, 8, 1024), jnp.float32)
    args = dict(fwd=(x, x, x), dq=(x, x, x, x, vec, x), dkv=(x, x, x, x, vec, vec))[kernel]
    try:
        f.trace(*args).lower(lowering_platforms=("cuda",))
    except ValueError as e:  # the dump callback, after the kernel itself lowered
        assert "platform" in str(e), e
    expected = dict(
        fwd={"wait_q", "wait_k", "qk", "qk_m", "softmax", "softmax_m", "sync_v", "pv", "epilogue", "p_wait_q", "p_wait_k"},
        dq={"wait_rows", "delta", "wait_kv", "s_dp", "ds", "ds_m", "dq_mm", "epilogue", "p_wait_rows", "p_wait_k"},
        dkv={"wait_keys", "wait_q", "st_dpt", "ds", "ds_m", "dv_dk", "epilogue", "p_wait_keys", "p_wait_q", "p_wait_do"},
    )[kernel]
    assert expected <= seen, expected - seen


def test_trace_summary_splits_each_track_into_its_scopes(tmp_path):
    """Per-scope counts and cycles, and the share outside every scope, on a hand-made trace: two
    consumer tracks and one producer track of one CTA (ts in clock cycles / 1e3)."""
    import json

    events = []

    def track(tid, spans):
        events.extend([dict(name="Init", ph="B", ts=0.0, pid=1, tid=tid), dict(name="Init", ph="E", ts=0.001, pid=1, tid=tid)])
        for name, start, stop in spans:
            events.extend([dict(name=name, ph="B", ts=start / 1e3, pid=1, tid=tid),
                           dict(name=name, ph="E", ts=stop / 1e3, pid=1, tid=tid)])

    track(1, [("wait", 10, 110), ("mm", 110, 410), ("wait", 510, 560), ("mm", 560, 1010)])  # span 1000
    track(2, [("wait", 10, 210), ("mm", 210, 1010)])  # span 1000, nothing outside
    track(3, [("p_wait", 10, 510)])  # producer: span 500
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(dict(traceEvents=events)))
    summary = _mgpu_dev().summarize_trace(path)
    consumer, producer = summary["consumer"], summary["producer"]
    assert consumer["tracks"] == 2 and consumer["span_cycles_mean"] == pytest.approx(1000)
    assert consumer["scopes"]["wait"]["count"] == pytest.approx(1.5)
    assert consumer["scopes"]["wait"]["cycles_total"] == pytest.approx((150 + 200) / 2)
    assert consumer["scopes"]["mm"]["cycles_each"] == pytest.approx((300 + 450 + 800) / 3)
    assert consumer["scopes"]["(outside scopes)"]["cycles_total"] == pytest.approx(100 / 2)
    assert sum(s["share"] for s in consumer["scopes"].values()) == pytest.approx(1.0)
    assert producer["tracks"] == 1 and producer["scopes"]["p_wait"]["share"] == pytest.approx(1.0)


def test_ncu_summary_takes_one_row_per_kernel_from_the_csv(tmp_path):
    """``mgpu_dev.py ncusum`` on an ``ncu --csv --page details`` log (the H200 format, with ncu's own
    lines before the header): one row per kernel ID, each metric's value and unit, the first value of a
    metric that appears twice, '-' for a metric ncu did not report."""
    import argparse

    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')

    def row(kid, section, metric, unit, value):
        return (f'"{kid}","512","python3.12","127.0.0.1","anonymous_mosaic_gpu_kernel","1","14","(384, 1, 1)",'
                f'"(132, 1, 1)","0","9.0","{section}","{metric}","{unit}","{value}",')

    lines = ["==PROF== Connected to process 512", head,
             row(0, "GPU Speed Of Light Throughput", "Duration", "ns", "245,376"),
             row(0, "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "27.38"),
             row(0, "Memory Workload Analysis", "Local Memory Spilling Requests", "", "50,208"),
             row(0, "Memory Workload Analysis", "Memory Throughput", "%", "39.75"),
             row(0, "Memory Workload Analysis", "Memory Throughput", "byte/second", "1,317,394"),
             row(1, "GPU Speed Of Light Throughput", "Duration", "ns", "100,000"),
             row(1, "Scheduler Statistics", "No Eligible", "%", "61.68")]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    kernels = _mgpu_dev().stage_ncusum(argparse.Namespace(csv=str(path)))
    assert len(kernels) == 2
    first, second = kernels
    assert first["dur"] == "245,376 ns" and first["dram%"] == "27.38 %" and first["spill-req"] == "50,208"
    assert first["mem%"] == "39.75 %"  # the SpeedOfLight-style percentage, not the later byte/s row
    assert first["grid"] == "(132, 1, 1)" and "no-elig%" not in first
    assert second["dur"] == "100,000 ns" and second["no-elig%"] == "61.68 %" and "spill-req" not in second


def test_ncu_summary_of_a_raw_page_keeps_time_shared_memory_and_l1_columns(tmp_path):
    """``mgpu_dev.py ncusum`` on an ``ncu --csv --page raw`` log (one column per metric, a units row under
    the header, as ``bench/mgpu_ab.sh`` writes it): one row per kernel with the time, shared-memory and
    L1 columns, local-memory metric names shortened."""
    import argparse

    lines = ["==PROF== Disconnected from process 512",
             '"ID","Kernel Name","gpu__time_duration.sum","launch__grid_size","launch__shared_mem_config_size",'
             '"l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum"',
             '"","","ns","","Kbyte","sector"',
             '"0","anonymous_mosaic_gpu_kernel","405,472","132","167.936","11,740,800"',
             '"1","anonymous_mosaic_gpu_kernel","163,744","132","200.704","0"']
    path = tmp_path / "ncu_raw.csv"
    path.write_text("\n".join(lines) + "\n")
    rows = _mgpu_dev().stage_ncusum(argparse.Namespace(csv=str(path)))
    assert rows == [
        {"gpu__time_duration.sum": "405,472", "launch__shared_mem_config_size": "167.936", "local_ld.sum": "11,740,800"},
        {"gpu__time_duration.sum": "163,744", "launch__shared_mem_config_size": "200.704", "local_ld.sum": "0"},
    ]


def test_ncu_source_summary_groups_samples_by_region_of_equal_execution_count(tmp_path):
    """``mgpu_dev.py ncusrc`` on an ``ncu --page source --csv --print-source sass`` export (its layout:
    a kernel-name line, then the header): stall samples per reason, and per run of consecutive
    instructions executed equally often (here a prologue, a loop body, an epilogue), hottest first."""
    import argparse

    head = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
            '"stall_barrier","stall_long_sb","stall_barrier (Not Issued)"')
    sass = [("LDC R1, c[0x0][0x28]", 2, 8, 0, 2), ("S2R R0, SR_TID.X", 1, 8, 0, 1),
            ("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ", 5, 96, 1, 0),
            ("WARPGROUP.DEPBAR.LE gsb0, 0x0", 30, 96, 30, 0), ("@P1 BRA 0x100", 3, 96, 0, 3),
            ("UTMASTG.5D [UR8], [UR4]", 7, 8, 0, 7)]
    lines = ['"Kernel Name","anonymous_mosaic_gpu_kernel",', head]
    for i, (src, n, ex, bar, lsb) in enumerate(sass):
        lines.append(f'"0x{i * 16:x}","      {src}","{n}","{ex}","{bar}","{lsb}","{bar}"')
    path = tmp_path / "src.csv"
    path.write_text("\n".join(lines) + "\n")
    got = _mgpu_dev().stage_ncusrc(argparse.Namespace(csv=str(path), top=5))
    assert got["total"] == 48
    assert got["reasons"] == {"stall_barrier": 31, "stall_long_sb": 13}  # "(Not Issued)" not double-counted
    assert [(r["first"], r["last"], r["executions"], r["samples"]) for r in got["regions"]] == [
        (0, 1, 8, 3), (2, 4, 96, 38), (5, 5, 8, 7)]
