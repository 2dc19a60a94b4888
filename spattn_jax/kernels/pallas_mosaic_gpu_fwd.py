"""Forward band-attention kernel in Pallas Mosaic GPU (Hopper): TMA + wgmma, FA3-style warpgroups.

A CTA works on one work-list entry ``(b, h, q_tile)`` of ``2 * block_q`` query rows at a time. By
default the CTAs are persistent (one per SM), each running its greedy share of the list
(:func:`static_tables`) and reading each entry's scalars from one work record; ``Config.num_ctas = 0``
launches one CTA per entry instead:

* warpgroups 0 and 1 (consumers) own ``block_q`` rows each: ``S = Q K^T`` and ``O += P V`` with
  wgmma from shared memory, online softmax in registers (base 2, fp32). A shared "schedule"
  barrier staggers them, so one warpgroup's softmax overlaps the other's matmuls (FA3 ping-pong,
  as in jax's ``attention_mgpu.py``);
* warpgroup 2 (producer) loads each busy unit's Q halves and streams the K and V tiles of its runs
  into a ``num_stages`` ring with TMA; per-slot "ready" barriers (TMA transaction counts) and
  "free" barriers (one arrival per consumer warpgroup) pace it. Units with no tile come last in the
  work list and only the producer visits them: it stores their O = 0, LSE = +inf from constant
  tiles while the busy units run (:func:`empty_unit_stores`). Q half 1 is loaded only after the
  unit's first K/V tile: the ping-pong barrier makes warpgroup 1's last tile of a unit wait for
  warpgroup 0's first tile of the next, so in a persistent CTA warpgroup 1 can release its Q only
  after that first K tile has arrived (waiting for the release first was the persistent-mode
  deadlock).

Both consumers and the producer walk the same run list (schedule.py, at the CTA's ``2 * block_q``
rows), so every barrier sees the same number of phases in every warpgroup even when a run is empty.
Interior runs skip the element mask; edge runs (and every run when segment ids are given) evaluate
the head's full predicate: OR over its intervals of ``lo <= i - j < hi`` (and equal segment ids), or,
when the bands are wide and apart enough that each edge tile crosses one boundary, that one compare
(:meth:`Plan.edge_masks`). Both are made as compile-time constants per element against limits per
thread (:func:`band_fill`).

Outputs: ``O [B, q_pad, H, Dp]`` in the input dtype and the base-2 log-sum-exp
``lse2 [B, H, q_pad]`` (``m + log2 l`` of the logits scaled by ``scale * log2 e``), which the backward
reads as it is: ``+inf`` on empty rows (also the padded rows past the last tile), so that every
probability the backward recomputes there is exactly 0.
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, vector

from spattn_jax.kernels import pallas_mosaic_gpu as common
from spattn_jax.kernels import schedule

LOG2E = math.log2(math.e)
RCP_LN2 = 1.0 / math.log(2.0)
COMPUTE_WGS = 2
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column
PRODUCER_REGS, CONSUMER_REGS = 40, 232  # 2 x 128 x 232 + 128 x 40 <= 64K registers per SM


def _register_split() -> tuple[int, int]:
    """(producer, consumer) ``setmaxnreg`` counts; ``SPATTN_MGPU_REGS=56,224`` overrides (diagnosis only)."""
    raw = os.environ.get("SPATTN_MGPU_REGS", "")
    if not raw:
        return PRODUCER_REGS, CONSUMER_REGS
    producer, consumer = (int(x) for x in raw.split(","))
    if producer % 8 or consumer % 8 or not 24 <= producer <= consumer <= 256 or producer + 2 * consumer > 512:
        raise ValueError(f"SPATTN_MGPU_REGS={raw}: multiples of 8 in [24, 256], producer + 2 x consumer <= 512")
    return producer, consumer


PREFETCH_LEAD = 4  # tiles before a unit's end at which the producer prefetches the next unit's rows


# JAX 0.10 requires plgpu.load's index argument; 0.11 deprecates it (index the ref instead).
_LOAD_TAKES_IDX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


# -- shared helpers (the backward imports these) ------------------------------------------------------


def compiler_params() -> plgpu.CompilerParams:
    """Approximate exp2/log and Lane semantics (explicit: JAX 0.11 defaults to Warpgroup).

    ``SPATTN_MGPU_TRACE=DIR`` (diagnosis only) turns on Mosaic GPU's in-kernel profiler: every
    warpgroup records the clock at the ``jax.named_scope`` regions of the kernels into shared memory
    (``SPATTN_MGPU_TRACE_SPACE`` regions per warpgroup, 16 B each), dumped as a trace per call into
    ``DIR``; ``bench/mgpu_dev.py trace`` reads them.
    """
    trace = {}
    if os.environ.get("SPATTN_MGPU_TRACE"):
        space = int(os.environ.get("SPATTN_MGPU_TRACE_SPACE", "256"))
        trace = dict(profile_space=space, profile_dir=os.environ["SPATTN_MGPU_TRACE"])
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane, **trace)


def tiled_smem(shape, dtype) -> plgpu.SMEM:
    """Shared memory in the layout wgmma and TMA want for 2-byte rows of 64-multiples: 128 B swizzle."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def load_vec(ref, layout, *, optimized: bool = True):
    """Load a 1-D ref (SMEM, or GMEM with ``optimized=False``) into registers with ``layout``."""
    if _LOAD_TAKES_IDX:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def bcast_rows(x, shape):
    """``[rows]`` -> ``shape``: the value of each row repeated along the columns."""
    return lax.broadcast_in_dim(x, shape, [0])


def bcast_cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def band_allowed(dist, bands):
    """``bool`` like ``dist`` (query position minus key position): OR over ``(lo, hi)`` scalars."""
    ok = None
    for lo, hi in bands:
        term = (dist >= lo) & (dist < hi)
        ok = term if ok is None else ok | term
    return ok


def tile_reaches(d_min, d_max, bands):
    """Scalar: whether any distance in ``[d_min, d_max]`` lies in one of the ``(lo, hi)`` bands.

    A consumer warpgroup skips the math of a pipelined tile that its own rows cannot reach (the
    CTA's run list is cut at both warpgroups' rows, so an edge tile can be empty for one of them).
    Empty ``(0, 0)`` slots never reach.
    """
    hit = None
    for lo, hi in bands:
        term = jnp.maximum(lo, d_min) <= jnp.minimum(hi - 1, d_max)
        hit = term if hit is None else hit | term
    return hit


def cta_slice(tile, block: int):
    """The ``COMPUTE_WGS * block`` rows (queries or keys) of a CTA's ``tile``: both warpgroups' halves."""
    return pl.ds(tile * (COMPUTE_WGS * block), COMPUTE_WGS * block)


def wg_slice(tile, w, block: int):
    """Warpgroup ``w``'s ``block`` rows (queries or keys) of a CTA's ``tile``."""
    return pl.ds(tile * (COMPUTE_WGS * block) + w * block, block)


def read_unit(records_ref, item, slots: int, num_runs: int):
    """Scalars of work item ``item``: ``(b, h, tile)``, runs ``[(start, stop)]`` and
    ``(bands, bounds)``: the head's ``[(lo, hi)]`` intervals and each run's edge bound.

    All of them sit in the item's record (one cache line, see :func:`static_tables`); loads a kernel
    does not use are dropped by the compiler.
    """
    field = lambda i: records_ref[item, i]  # noqa: E731
    b, h, tile = field(0), field(1), field(2)
    runs = [(field(3 + 2 * r), field(4 + 2 * r)) for r in range(num_runs)]
    base = 3 + 2 * num_runs
    bands = [(field(base + 2 * s), field(base + 2 * s + 1)) for s in range(slots)]
    base += 2 * slots
    bounds = [field(base + r) for r in range(num_runs)]
    return b, h, tile, runs, (bands, bounds)


def edge_allowed(dist, masked, edges):
    """``bool`` like ``dist`` on a tile of an edge run (``masked`` from :meth:`Plan.edge_masks`,
    ``edges = (bands, bounds)`` from :func:`read_unit`), or ``None`` where only segment ids mask."""
    kind, run = masked
    bands, bounds = edges
    if kind == "full":
        return band_allowed(dist, bands)
    if kind == "lt":
        return dist < bounds[run]
    if kind == "ge":
        return dist >= bounds[run]
    return None


def tile_allowed(shape, offset, masked, edges, *, transpose: bool = False, segments=None):
    """``bool [rows, cols]`` of an edge tile in wgmma layout.

    The distance (query position minus key position) is ``row - col + offset``, or ``col - row +
    offset`` with ``transpose`` (dK/dV: rows are keys); :func:`edge_allowed` tests it. ``segments``:
    ``(row_ids [rows] ROW, col_ids [cols] COL)`` document ids that must be equal, or ``None``.
    """
    r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA)
    c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA)
    ok = edge_allowed((c - r if transpose else r - c) + offset, masked, edges)
    if segments is not None:
        row_ids, col_ids = segments
        same = bcast_rows(row_ids, shape) == bcast_cols(col_ids, shape)
        ok = same if ok is None else ok & same
    return ok


def mask_tile(x, offset, masked, edges, fill: float, *, transpose: bool = False, segments=None):
    """``where(tile_allowed(...), x, fill)`` for ``x [rows, cols]`` in wgmma layout (arguments as there).

    Edges without segment ids take :func:`band_fill`: per element a compile-time constant against
    per-thread limits, which saves the add of the ``iota + offset`` form (one-sided: 2 instructions
    instead of 3). ``SPATTN_MGPU_EDGE_CONST=0`` (diagnosis only) keeps the ``where``.
    """
    kind, run = masked
    if kind != "segments" and segments is None and os.environ.get("SPATTN_MGPU_EDGE_CONST", "1") != "0":
        bands, bounds = edges
        intervals = {"ge": [(bounds[run], None)], "lt": [(None, bounds[run])]}.get(kind, bands)
        thresholds = [tuple(None if e is None else jnp.asarray(e - offset, jnp.int32) for e in iv) for iv in intervals]
        return band_fill(x, thresholds, transpose=transpose, fill=fill)
    ok = tile_allowed(x.shape, offset, masked, edges, transpose=transpose, segments=segments)
    return jnp.where(ok, x, fill)


def query_row_masker(plan: common.Plan, b, rows, edges, qseg_ref, kseg_ref, bk: int):
    """``masked_fill(t, x, masked, fill)``: :func:`mask_tile` of a warpgroup's query ``rows`` against
    key tile ``t`` (``x [rows, bk]``, forward and dQ kernels), with the segment ids if there are any."""
    q_seg = load_vec(qseg_ref.at[b, rows], ROW, optimized=False) if plan.segments else None

    def masked_fill(t, x, masked, fill):
        segments = None
        if plan.segments:
            segments = (q_seg, load_vec(kseg_ref.at[b, pl.ds(t * bk, bk)], COL, optimized=False))
        return mask_tile(x, rows.start + plan.q_offset - t * bk, masked, edges, fill, segments=segments)

    return masked_fill


@functools.lru_cache(maxsize=16)
def wgmma_distance_offsets(shape: tuple[int, int]) -> np.ndarray:
    """``int [*registers, vector]``: row minus column of each element a thread holds of a ``shape``
    array in wgmma layout, less that of the thread's first element. Thread-independent: the layout
    gives every thread the same pattern of elements, shifted by its lane and warp.
    """
    layout = WGMMA.to_mgpu()
    strides = layout.tiling.tile_strides((shape[1], 1))
    regs = layout.registers_shape(shape)
    out = np.empty((*regs, layout.vector_length), np.int64)
    for idx in np.ndindex(regs):
        row, col = divmod(sum(i * s for i, s in zip(idx, strides)), shape[1])
        out[idx] = row - col - np.arange(layout.vector_length)  # vector elements run along the columns
    return out


def band_compare(shape: tuple[int, int], *, transpose: bool):
    """How :func:`band_fill` tests an element: ``(sign, consts)``.

    With ``limit = threshold + sign * d0`` per thread and threshold (``d0``: row minus column of the
    thread's first element), element ``e`` passes a lower threshold iff ``limit <= consts[e]`` and an
    upper one iff ``limit > consts[e]``; ``consts`` as :func:`wgmma_distance_offsets` lays them out.
    From ``d = s (d0 + k) + offset`` with ``s = -1`` under ``transpose``: ``d >= bound`` iff
    ``bound - offset - s d0 <= s k``.
    """
    sign = 1 if transpose else -1
    return sign, wgmma_distance_offsets(shape) * -sign


def band_fill(x, thresholds, *, transpose: bool, fill: float):
    """``x [rows, cols]`` (f32, wgmma layout) where the distance ``d`` lies in one of the intervals, else
    ``fill``.

    ``d = row - col + offset`` (``col - row + offset`` with ``transpose``); ``thresholds``: per
    interval ``(lo - offset, hi - offset)`` scalars, either side ``None`` when open (a one-sided edge:
    ``[(bound - offset, None)]`` keeps ``d >= bound``). Written as ``iota + offset`` compares, every
    element costs an add before its compares: the compiler does not move the add to the scalar side.
    Here each element's ``row - col`` is the thread's own (``d0``, once per thread) plus a compile-time
    constant (:func:`wgmma_distance_offsets`), so each element compares an immediate with per-thread
    limits (:func:`band_compare`): a one-sided edge takes a compare and a select.
    """
    sign, consts = band_compare(tuple(x.shape), transpose=transpose)
    sides = [(lo is not None, hi is not None) for lo, hi in thresholds]
    scalars = [t for pair in thresholds for t in pair if t is not None]
    scalar = plgpu.Layout.WG_SPLAT(shape=())

    @plgpu.inline_mgpu(
        arg_types=(WGMMA, *[scalar] * len(scalars)),
        return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout=WGMMA),
    )
    def select(ctx, xa, *ts):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        row0, col0 = next(iter(xa.layout.thread_idxs(xa.shape)))
        d0 = arith.subi(arith.index_cast(i32, row0), arith.index_cast(i32, col0))
        limits = iter([(arith.addi if sign > 0 else arith.subi)(t.registers.item(), d0) for t in ts])
        bounds = [(next(limits) if has_lo else None, next(limits) if has_hi else None) for has_lo, has_hi in sides]
        fill_v = arith.constant(xa.mlir_dtype, fill)

        def keep(k):
            k = arith.constant(i32, int(k))
            hit = None
            for lo, hi in bounds:
                term = None if lo is None else arith.cmpi(arith.CmpIPredicate.sle, lo, k)
                if hi is not None:
                    below = arith.cmpi(arith.CmpIPredicate.sgt, hi, k)
                    term = below if term is None else arith.andi(term, below)
                hit = term if hit is None else arith.ori(hit, term)
            return hit

        regs = np.empty_like(xa.registers)
        for idx in np.ndindex(regs.shape):
            reg = out = xa.registers[idx]
            for v, k in enumerate(consts[idx]):
                pos = ir.DenseI64ArrayAttr.get([v])
                val = arith.select(keep(k), vector.extract(reg, dynamic_position=[], static_position=pos), fill_v)
                out = vector.insert(val, out, dynamic_position=[], static_position=pos)
            regs[idx] = out
        return mgpu.FragmentedArray(_registers=regs, _layout=xa.layout, _is_signed=None)

    return select(x, *scalars)


def loop_runs(runs, masked_flags, body, carry):
    """``body(t, carry, masked=flag)`` over every tile of every run, in order."""
    for (start, stop), masked in zip(runs, masked_flags):
        carry = lax.fori_loop(start, stop, functools.partial(body, masked=masked), carry)
    return carry


def persistent_grid(plan: common.Plan, num_items: int) -> int:
    """CTAs to launch: one per SM (persistent), or one per work item when ``num_ctas == 0``."""
    want = plan.config.num_ctas
    if want == 0:
        return num_items
    if want is None:
        want = int(getattr(jax.devices()[0], "core_count", 0) or 132)
    return max(1, min(want, num_items))


def strided_count(start, stop: int, stride: int):
    """How many of ``start, start + stride, ...`` lie below ``stop``; ``<= 0`` when none (a
    ``fori_loop`` bound). Exact for ``start < stop + stride``, e.g. a CTA index against any list."""
    return lax.div(stop - start + (stride - 1), stride)


def cta_units(ranges_ref):
    """``(first, stop)``: this CTA's busy work items are ``first, ..., stop - 1`` (scalars read from the
    ``[G + 1]`` offsets of :func:`static_tables`)."""
    cta = lax.axis_index("cta")
    return ranges_ref[cta], ranges_ref[cta + 1]


def item_loop(units, body, carry):
    """``body(item, carry)`` over this CTA's busy work items, ``units = (first, stop)`` of :func:`cta_units`."""
    first, stop = units
    return lax.fori_loop(0, stop - first, lambda j, c: body(first + j, c), carry)


def count_tiles(runs):
    """Tiles a unit visits; units with none skip their row loads (both sides test the same count)."""
    total = jnp.int32(0)
    for start, stop in runs:
        total = total + jnp.maximum(stop - start, 0)
    return total


RECORD_WORDS = 32  # int32 fields per work record: one 128-byte cache line


# A unit's fixed cost in tiles when dealing units to CTAs: its row loads at the boundary and its
# epilogue (in-kernel traces, NOTES v6: 0.4 tile in the forward to 1.5 in dQ).
UNIT_COST = 1.0


def static_tables(plan: common.Plan, block_q: int, block_k: int, transpose: bool) -> tuple[jax.Array, jax.Array, int]:
    """``(records int32 [items, 32 k], ranges int32 [G + 1], num_busy)`` as device constants, for ``G``
    CTAs (:func:`persistent_grid`).

    The work list holds the ``num_busy`` busy units first, then the empty ones. The busy units are dealt
    to the CTAs greedily, heaviest first (:func:`common.balance`, cost = tiles + :data:`UNIT_COST`),
    and stored CTA by CTA: CTA ``c`` runs records ``ranges[c] : ranges[c + 1]``. The empty units
    (:func:`empty_unit_stores`) are strided over the CTAs.

    Record ``i`` holds ``b, h, tile``, then the unit's ``3 slots`` ``(start, stop)`` runs, then its
    head's ``slots`` ``(lo, hi)`` intervals, then the ``3 slots`` edge bounds
    (:func:`schedule.edge_bounds`): everything a unit reads, in one cache line (two for more than two
    intervals per head) and with no dependent load (a work list indexing a run table costs two global
    round trips per unit). ``block_q`` / ``block_k`` are the tiles the schedule is cut at: the CTA's
    tile on its own axis (both consumer warpgroups together) and the pipelined tile.
    """
    runs = common.run_table(plan.intervals, block_q, block_k, plan.q_len, plan.kv_len, transpose)
    if not transpose:
        # Tiles past the last real row (q_pad can exceed it by more than a tile) become empty units:
        # the forward and dQ kernels then write every padded row (LSE +inf, delta 0) that the dK/dV
        # kernel may read.
        runs = np.pad(runs, ((0, 0), (0, plan.q_pad // block_q - runs.shape[1]), (0, 0)))
    lengths = common.run_lengths(runs)
    items = common.work_list(lengths, plan.batch, lpt=plan.config.lpt)
    tiles = lengths[items[:, 1], items[:, 2]]
    num_busy = int(np.count_nonzero(tiles))
    num_ctas = persistent_grid(plan, len(items))
    order, ranges = common.balance(tiles[:num_busy] + UNIT_COST, num_ctas)
    items[:num_busy] = items[:num_busy][order]
    bands = common.interval_table(plan)
    bounds = schedule.edge_bounds(plan.intervals, plan.slots, transpose)
    b, h, tile = items.T
    fields = np.concatenate([items, runs[h, tile], bands[h], bounds[h]], axis=1)
    width = RECORD_WORDS * -(-fields.shape[1] // RECORD_WORDS)
    records = np.zeros((len(items), width), np.int32)
    records[:, : fields.shape[1]] = fields
    return jnp.asarray(records), jnp.asarray(ranges), num_busy


# -- the kernel ---------------------------------------------------------------------------------------


def _fwd_kernel(*refs, plan: common.Plan, num_busy: int):
    c = plan.config
    bq, bk, stages, dim = c.block_q, c.block_kv, c.num_stages, plan.head_dim
    n_in = 7 if plan.segments else 5
    records_ref, ranges_ref, q_ref, k_ref, v_ref = refs[:5]
    qseg_ref, kseg_ref = refs[5:7] if plan.segments else (None, None)
    o_ref, lse_ref = refs[n_in : n_in + 2]
    (q_smem2, o_smem2, k_smem, v_smem, lse_smem2, q_ready, q_free, k_ready, v_ready, k_free, v_free, sched,
     zero_smem, inf_smem) = refs[n_in + 2 :]
    num_items, num_ctas = records_ref.shape[0], ranges_ref.shape[0] - 1
    units = cta_units(ranges_ref)
    flags = plan.edge_masks(COMPUTE_WGS * bq + bk, transpose=False)
    unit = functools.partial(read_unit, records_ref, slots=plan.slots, num_runs=len(flags))
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    coef = plan.scale * LOG2E  # logits -> base-2 exponent units

    def schedule_sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(_register_split()[1], action="increase")
        q_smem, o_smem, lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]

        def one_item(item, step):
            b, h, q_tile, runs, edges = unit(item)
            rows = wg_slice(q_tile, wg, bq)
            row0 = rows.start
            masked_fill = query_row_masker(plan, b, rows, edges, qseg_ref, kseg_ref, bk)

            def body(t, carry, *, masked):
                sfx = "_m" if masked else ""  # profiler scopes of edge tiles
                acc, m_i, l_i, step = carry
                slot = lax.rem(step, stages)
                with jax.named_scope("wait_k"):
                    plgpu.barrier_wait(k_ready.at[slot])

                def compute_qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    schedule_sync()  # the other warpgroup's softmax runs under this matmul
                    return acc_ref[...]

                with jax.named_scope("qk" + sfx):
                    s = pl.run_scoped(compute_qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                # The unit's last Q K^T is done: the producer may load the next unit's Q now, under
                # this tile's softmax, P V and the epilogue, instead of after them.
                arrive_if(step == last_step, q_free.at[wg])
                with jax.named_scope("softmax" + sfx):
                    acc, m_new, l_i, p16 = softmax(t, s, acc, m_i, l_i, masked)
                with jax.named_scope("sync_v" + sfx):
                    plgpu.barrier_arrive(sched)
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(sched)

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                with jax.named_scope("pv" + sfx):
                    acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i, step + 1

            def softmax(t, s, acc, m_i, l_i, masked):
                if masked:
                    s = masked_fill(t, s, masked, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1) * coef)
                # A row with no allowed key so far has m = -inf: shift by 0 instead (exp2(-inf) = 0,
                # no NaN). Interior tiles give every row a finite logit, so they skip the guard.
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m_i - m_use)
                p = jnp.exp2(s * coef - bcast_rows(m_use, s.shape))
                acc = acc * bcast_rows(alpha, acc.shape)
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                # Ordering that attention_mgpu found fastest for head_dim <= 128: finish the softmax,
                # then release the tensor core to the other warpgroup.
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                return acc, m_new, l_i, p16

            acc = plgpu.layout_cast(jnp.zeros((bq, dim), jnp.float32), WGMMA)
            m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), ROW)
            l_i = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), ROW)
            # Q is released on the unit's last tile (consumers only see busy units).
            last_step = step + count_tiles(runs) - 1
            with jax.named_scope("wait_q"):
                plgpu.barrier_wait(q_ready.at[wg])
            acc, m_i, l_i, step = loop_runs(runs, flags, body, (acc, m_i, l_i, step))
            with jax.named_scope("epilogue"):
                epilogue(b, h, row0, acc, m_i, l_i)
            return step

        def epilogue(b, h, row0, acc, m_i, l_i):
            empty = l_i == 0.0
            l_safe = jnp.where(empty, 1.0, l_i)
            acc = acc * bcast_rows(1.0 / l_safe, acc.shape)
            # +inf on empty rows: the backward's exp2(s - lse) is then exactly 0 there.
            lse = jnp.where(empty, jnp.inf, m_i + jnp.log(l_safe) * RCP_LN2)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous unit's O left o_smem
            o_smem[...] = acc.astype(dtype)
            lse_smem[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(row0, bq), h], commit_group=False)
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(row0, bq)], commit_group=False)
            plgpu.commit_smem_to_gmem_group()

        pl.when(wg == 1)(schedule_sync)  # stagger: warpgroup 1 starts one phase behind
        item_loop(units, one_item, jnp.int32(0))
        pl.when(wg == 0)(schedule_sync)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        fill_constant_tiles(zero_smem, inf_smem, jnp.inf)  # empty rows: O = 0, LSE = +inf
        plgpu.set_max_registers(_register_split()[0], action="decrease")

        def empty_outputs(b, h, tile):
            rows = [wg_slice(tile, w, bq) for w in range(COMPUTE_WGS)]
            return [(zero_smem, o_ref.at[b, r, h]) for r in rows] + [(inf_smem, lse_ref.at[b, h, r]) for r in rows]

        empty_hook, store_other_empty_units = empty_unit_stores(num_busy, num_items, num_ctas, units, unit,
                                                                empty_outputs)

        def one_item(item, step):
            b, h, q_tile, runs, _ = unit(item)
            kv_head = h // plan.groups
            tiles = count_tiles(runs)

            def load_q(w):
                # This unit's Q half ``w``, once warpgroup ``w`` released the previous unit's Q.
                rows = wg_slice(q_tile, w, bq)
                with jax.named_scope("p_wait_q"):
                    wait_unless(item == units[0], q_free.at[w])  # the CTA's first unit: nothing to wait for
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem2.at[w], q_ready.at[w])

            # Warpgroup 0's Q first, warpgroup 1's only after the unit's first K/V tile. The ping-pong
            # barrier ties warpgroup 1's last tile of the previous unit to warpgroup 0's first tile
            # of this one, so warpgroup 1 releases its Q only after warpgroup 0 has read this unit's
            # first K tile: waiting for that release before streaming the tile deadlocks (it did,
            # in every persistent CTA with two busy units; bench/NOTES_mgpu.md).
            load_q(0)
            kv = (k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free)
            unit_q = lambda b, h, tile: [q_ref.at[b, cta_slice(tile, bq), h]]  # noqa: E731
            hooks = ((0, lambda: load_q(1)), empty_hook(item, tiles))
            hooks += prefetch_hook(c.prefetch, item, units[1], unit, tiles, unit_q)
            return stream_kv_tiles(runs, flags, step, kv, b=b, kv_head=kv_head, block_k=bk, stages=stages, hooks=hooks)

        item_loop(units, one_item, jnp.int32(0))
        store_other_empty_units()
        plgpu.wait_smem_to_gmem(0)


def arrive_if(pred, barrier):
    @pl.when(pred)
    def _():
        plgpu.barrier_arrive(barrier)


def wait_unless(skip, barrier):
    """``barrier_wait`` unless ``skip`` (a ring slot or buffer that has never been used is free)."""

    @pl.when(jnp.logical_not(skip))
    def _():
        plgpu.barrier_wait(barrier)


def stream_kv_tiles(runs, flags, step, kv, *, b, kv_head: int, block_k: int, stages: int, hooks=()):
    """Producer side of the K/V ring: TMA-copy the K and V tiles of a unit's runs into ``stages`` slots.

    ``kv = (k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free)``; ``step`` counts tiles
    streamed so far (the ring position). A slot is reused only after its consumers release it.
    ``hooks``: ``(index, fn)`` pairs; ``fn()`` runs once right after the K and V copies of the unit's
    tile number ``index`` (a traced scalar; never for a unit without tiles). Returns the new ``step``.
    """
    k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free = kv
    first = step

    def body(t, step, *, masked):
        del masked
        slot = lax.rem(step, stages)
        tile = (b, pl.ds(t * block_k, block_k), kv_head)
        with jax.named_scope("p_wait_k"):
            wait_unless(step < stages, k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[tile], k_smem.at[slot], k_ready.at[slot])
        with jax.named_scope("p_wait_v"):
            wait_unless(step < stages, v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[tile], v_smem.at[slot], v_ready.at[slot])
        run_hooks(hooks, step, first)
        return step + 1

    return loop_runs(runs, flags, body, step)


def fill_constant_tiles(tile_ref, vec_ref=None, fill: float = 0.0):
    """Zeros into ``tile_ref [rows, D]`` and ``fill`` into ``vec_ref [rows]`` (fp32): the producer's
    sources for the outputs of empty units (:func:`empty_unit_stores`). Runs before the producer gives
    up its registers. A tile of fewer than 64 rows (plain shared memory, no swizzle) is written with
    a strided layout, ``rows * D / 128`` elements a thread."""
    rows, cols = tile_ref.shape
    layout = WGMMA if rows % 64 == 0 else plgpu.Layout.WG_STRIDED((rows, cols), vec_size=rows * cols // 128)
    tile_ref[...] = plgpu.layout_cast(jnp.zeros(tile_ref.shape, tile_ref.dtype), layout)
    if vec_ref is not None:
        vec_ref[...] = plgpu.layout_cast(jnp.full(vec_ref.shape, fill, jnp.float32), ROW)
    plgpu.commit_smem()


def empty_unit_stores(num_busy: int, num_items: int, num_ctas: int, units, unit, stores):
    """Producer side of the empty units: ``(hook, finish)``.

    Empty units (no tile: keys no query sees, rows with no key, padded rows) come last in the work list,
    after the ``num_busy`` busy ones, and no consumer visits them: the producer TMA-stores their outputs
    from constant shared-memory tiles (:func:`fill_constant_tiles`). CTA ``c`` owns empty units
    ``num_busy + c, num_busy + c + G, ...``; ``hook(item, tiles)`` is a :func:`run_hooks` entry that
    stores the CTA's ``j``-th empty unit while its ``j``-th busy unit ``item`` streams, so that the zero
    writes overlap the math instead of forming a tail at the kernel's end (EBALL at 2x8192: 47% of
    the units); ``finish()`` stores the ones left after the CTA's last busy unit. ``units = (first,
    stop)``: the CTA's busy items (:func:`cta_units`). ``stores(b, h, tile)`` gives the ``(smem source,
    gmem destination)`` pairs of one unit.
    """
    first, stop = units
    own = num_busy + lax.axis_index("cta")  # the CTA's first empty unit

    def store(item):
        for src, dst in stores(*unit(item)[:3]):
            plgpu.copy_smem_to_gmem(src, dst)

    def hook(item, tiles):
        empty = own + (item - first) * num_ctas
        return jnp.minimum(tiles - 1, 1), lambda: pl.when(empty < num_items)(lambda: store(empty))

    def finish():
        start = own + (stop - first) * num_ctas
        lax.fori_loop(0, strided_count(start, num_items, num_ctas), lambda j, c: (store(start + j * num_ctas), c)[1],
                      jnp.int32(0))

    return hook, finish


def run_hooks(hooks, step, first):
    """Run each ``(at, fn)`` of ``hooks`` whose ``at`` is the ring position ``step`` less the unit's ``first``."""
    for at, fn in hooks:
        # A static 0 compares with ``first`` directly: no extra scalar op, so the forward's Q-half-1
        # hook lowers as it did before hooks existed (register allocation here is touchy, NOTES v5).
        pl.when(step == first if isinstance(at, int) and at == 0 else step == first + at)(fn)


def prefetch_hook(prefetch: bool, item, stop, unit, tiles, slices):
    """``(index, fn)``: prefetch into L2 the rows the CTA's next unit (``item + 1``, if below the CTA's
    ``stop``) will load, ``PREFETCH_LEAD`` tiles before this unit's end, or ``()`` when
    ``Config.prefetch`` is off.

    ``slices(b, h, tile)`` gives the GMEM ref slices of that unit's rows. Its TMA loads then hit L2
    instead of HBM at the unit boundary, where the consumers wait for them.
    """
    if not prefetch:
        return ()
    nxt = item + 1

    def fn():
        b, h, tile, _, _ = unit(jnp.minimum(nxt, stop - 1))

        @pl.when(nxt < stop)
        def _():
            for ref in slices(b, h, tile):
                plgpu.async_prefetch(ref)

    return ((jnp.maximum(tiles - PREFETCH_LEAD, 0), fn),)


def scratch_bytes(scratch) -> int:
    """Shared memory a kernel's ``scratch_types`` take: Pallas aligns every buffer to 1 KiB; barriers are
    8 bytes each, after the buffers."""
    total = 0
    for x in scratch:
        if isinstance(x, plgpu.Barrier):
            total += 8 * int(np.prod(x.num_barriers))  # an int or a shape, by JAX version
        else:
            total += -(-math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // 1024) * 1024
    return total


def forward_scratch(c: common.Config, dim: int, dtype) -> list:
    """The forward kernel's shared memory and barriers (``dim``: padded head dim)."""
    bq, bk, stages = c.block_q, c.block_kv, c.num_stages
    return [
        tiled_smem((COMPUTE_WGS, bq, dim), dtype),  # Q
        tiled_smem((COMPUTE_WGS, bq, dim), dtype),  # O staging
        tiled_smem((stages, bk, dim), dtype),  # K ring
        tiled_smem((stages, bk, dim), dtype),  # V ring
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # LSE staging
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # Q ready
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # Q free (one arrival: its warpgroup)
        plgpu.Barrier(num_barriers=stages),  # K ready
        plgpu.Barrier(num_barriers=stages),  # V ready
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # K free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # V free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # schedule (ping-pong)
        tiled_smem((bq, dim), dtype),  # zeros: O of empty units
        plgpu.SMEM((bq,), jnp.float32),  # +inf: LSE of empty units
    ]


def launch(kernel, plan: common.Plan, tables, inputs: list, out_type: list, scratch: list):
    """Run ``kernel(*refs, plan=plan, num_busy=...)`` on one persistent CTA per ``ranges`` entry, each of
    ``COMPUTE_WGS + 1`` warpgroups. ``tables = (records, ranges, num_busy)`` from :func:`static_tables`; the
    kernel's refs are ``records, ranges``, then ``inputs``, the outputs (``out_type``) and ``scratch``."""
    records, ranges, num_busy = tables
    return plgpu.kernel(
        functools.partial(kernel, plan=plan, num_busy=num_busy),
        out_type=out_type,
        scratch_types=scratch,
        grid=(ranges.shape[0] - 1,),
        grid_names=("cta",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=compiler_params(),
    )(records, ranges, *inputs)


def forward(plan: common.Plan, q, k, v, q_seg, kv_seg):
    """``(O [B, q_pad, H, Dp], lse2 [B, H, q_pad])`` for padded inputs (see the module docstring)."""
    c = plan.config
    tables = static_tables(plan, COMPUTE_WGS * c.block_q, c.block_kv, transpose=False)
    out_type = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((plan.batch, plan.num_heads, plan.q_pad), jnp.float32),
    ]
    inputs = [q, k, v] + ([q_seg, kv_seg] if plan.segments else [])
    out, lse = launch(_fwd_kernel, plan, tables, inputs, out_type, forward_scratch(c, plan.head_dim, q.dtype))
    return out, lse
