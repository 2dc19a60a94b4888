"""Backward band-attention kernels in Pallas Mosaic GPU (Hopper): dQ and dK/dV, band-aware loops.

Two kernels, no atomics (kernels.md §8, the tokamax/jax two-kernel design); S and dP are recomputed
in both. Each has one producer warpgroup streaming tiles with TMA through a ``num_stages_bwd`` ring
and two consumer warpgroups running wgmma on their half of the CTA's tile:

* dQ: a CTA owns ``2 * block_q_dq`` query rows of one (b, h). It first forms
  ``delta = rowsum(O * dO)`` (fp32) from the O and dO rows it loads anyway, and writes it out for the
  dK/dV kernel (a separate XLA pass over O and dO cost ~50 us at 2x8192, 10% of the EBALL
  backward); then it loops over the K/V tiles of the forward's runs (cut at the CTA's rows):
  ``P = exp2(S c - lse2)``, ``dP = dO V^T``, ``dS = P (dP - delta)``, ``dQ += dS K``; finally
  ``dQ *= scale``.
* dK/dV: a CTA owns ``2 * block_kv_dkv`` keys of one (b, h) and loops over the query tiles of the
  transposed runs (exactly the query tiles whose band reaches these keys):
  ``P^T = exp2(K Q^T c - lse2)``, ``dV += P^T dO``, ``dP^T = V dO^T``,
  ``dS^T = P^T (dP^T - delta)``, ``dK += dS^T Q``; finally ``dK *= scale``. Outputs are per q head;
  the caller sums GQA groups.

dK and dV leave a unit through one staging buffer per warpgroup, one after the other (32 KB less
shared memory than a buffer each). Units with no tile (keys no query sees, rows with no key, padded
rows) come last in the work lists and only the producers visit them: they store dK = dV = 0, or
dQ = 0 and delta = 0, from constant tiles while the busy units run (``empty_unit_stores``). With
``Config.prefetch`` the producer of either kernel prefetches the CTA's next unit's rows (Q, dO, O,
lse; or K, V) into L2 a few tiles before the current unit ends.

``lse2`` arrives with ``+inf`` on empty rows, so their probabilities are exactly 0 on every visited
tile; padded rows have dO = 0 and delta = 0, so they add nothing. Both kernels use the same static
work lists (heaviest units first) and run tables as the forward. On edge tiles a consumer warpgroup
skips the math of a tile its own rows (dQ) or keys (dK/dV) cannot reach, still taking part in the
ring's barriers: the CTA's run list is cut at both warpgroups' rows, and at 2x8192 one edge tile in
ten is empty for one of them (H100: EBALL dQ 149 -> 141 us, dK/dV 192 -> 181 us).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from spattn_jax.kernels import pallas_mosaic_gpu as common
from spattn_jax.kernels.pallas_mosaic_gpu_fwd import (
    COL,
    COMPUTE_WGS,
    LOG2E,
    ROW,
    WGMMA,
    _register_split,
    mask_tile,
    query_row_masker,
    tile_reaches,
    stream_kv_tiles,
    bcast_cols,
    bcast_rows,
    count_tiles,
    cta_slice,
    wg_slice,
    item_loop,
    launch,
    load_vec,
    loop_runs,
    cta_units,
    read_unit,
    static_tables,
    tiled_smem,
    wait_unless,
    empty_unit_stores,
    fill_constant_tiles,
    prefetch_hook,
    run_hooks,
)


# -- dQ -----------------------------------------------------------------------------------------------


def _dq_kernel(*refs, plan: common.Plan, num_busy: int):
    c = plan.config
    bq, bk, stages, dim = c.block_q_dq, c.block_kv_dq, c.num_stages_bwd, plan.head_dim
    (records_ref, ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, o_ref) = refs[:8]
    qseg_ref, kseg_ref = (refs[8], refs[9]) if plan.segments else (None, None)
    n_in = 10 if plan.segments else 8
    dq_ref, delta_ref = refs[n_in : n_in + 2]
    (q_smem2, do_smem2, o_smem2, dq_smem2, lse_smem2, delta_smem2, rows_ready, rows_free,
     k_smem, v_smem, k_ready, v_ready, k_free, v_free, zero_smem, zero_vec_smem) = refs[n_in + 2 :]
    num_items, num_ctas = records_ref.shape[0], ranges_ref.shape[0] - 1
    units = cta_units(ranges_ref)
    flags = plan.edge_masks(COMPUTE_WGS * bq + bk, transpose=False)
    unit = functools.partial(read_unit, records_ref, slots=plan.slots, num_runs=len(flags))
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    coef = plan.scale * LOG2E

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(_register_split()[1], action="increase")
        q_smem, do_smem, o_smem, dq_smem = q_smem2.at[wg], do_smem2.at[wg], o_smem2.at[wg], dq_smem2.at[wg]

        def one_item(item, step):
            b, h, q_tile, runs, edges = unit(item)
            rows = wg_slice(q_tile, wg, bq)
            row0 = rows.start
            masked_fill = query_row_masker(plan, b, rows, edges, qseg_ref, kseg_ref, bk)

            def body(t, carry, *, masked):
                sfx = "_m" if masked else ""  # profiler scopes of edge tiles
                dq_acc, lse, delta, step = carry
                slot = lax.rem(step, stages)
                with jax.named_scope("wait_kv"):
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])

                release = functools.partial(plgpu.barrier_arrive, v_free.at[slot])

                def compute_s_dp(acc_refs):
                    # S = Q K^T and dP = dO V^T issued together: one wait for both.
                    s_ref, dp_ref = acc_refs
                    plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))

                def work(dq_acc):
                    zeros = plgpu.layout_cast(jnp.zeros((bq, bk), jnp.float32), WGMMA)
                    with jax.named_scope("s_dp" + sfx):
                        s, dp = pl.run_state(compute_s_dp)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
                    release()
                    with jax.named_scope("ds" + sfx):
                        p = jnp.exp2(s * coef - bcast_rows(lse, s.shape))
                        if masked:
                            p = masked_fill(t, p, masked, 0.0)
                        ds = (p * (dp - bcast_rows(delta, dp.shape))).astype(dtype)

                    def compute_dq(acc_ref):
                        plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

                    with jax.named_scope("dq_mm" + sfx):
                        return pl.run_state(compute_dq)(plgpu.ACC.init(dq_acc))

                def skip(dq_acc):
                    release()
                    return dq_acc

                if masked:
                    offset = row0 + plan.q_offset - t * bk
                    reaches = tile_reaches(offset - (bk - 1), offset + (bq - 1), edges[0])
                    dq_acc = lax.cond(reaches, work, skip, dq_acc)
                else:
                    dq_acc = work(dq_acc)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq_acc, lse, delta, step + 1

            with jax.named_scope("wait_rows"):
                plgpu.barrier_wait(rows_ready.at[wg])
            with jax.named_scope("delta"):
                lse = load_vec(lse_smem2.at[wg], ROW)
                # Padded rows: dO is 0 and O finite (the forward writes every row), so delta is 0.
                prod = o_smem[...].astype(jnp.float32) * do_smem[...].astype(jnp.float32)
                delta = prod.sum(axis=1)
            dq_acc = plgpu.layout_cast(jnp.zeros((bq, dim), jnp.float32), WGMMA)
            dq_acc, _, delta, step = loop_runs(runs, flags, body, (dq_acc, lse, delta, step))
            # Releasing the rows right after the last S/dP matmul instead measured no faster (H100).
            plgpu.barrier_arrive(rows_free.at[wg])

            with jax.named_scope("epilogue"):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous dQ and delta left staging
                dq_smem[...] = (dq_acc * plan.scale).astype(dtype)
                delta_smem2.at[wg][...] = delta
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, rows, h], commit_group=False)
                plgpu.copy_smem_to_gmem(delta_smem2.at[wg], delta_ref.at[b, h, rows], commit_group=False)
                plgpu.commit_smem_to_gmem_group()
            return step

        item_loop(units, one_item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        fill_constant_tiles(zero_smem, zero_vec_smem, 0.0)  # empty rows: dQ = 0, delta = 0
        plgpu.set_max_registers(_register_split()[0], action="decrease")

        def empty_outputs(b, h, tile):
            rows = [wg_slice(tile, w, bq) for w in range(COMPUTE_WGS)]
            return [(zero_smem, dq_ref.at[b, r, h]) for r in rows] + [
                (zero_vec_smem, delta_ref.at[b, h, r]) for r in rows]

        empty_hook, store_other_empty_units = empty_unit_stores(num_busy, num_items, num_ctas, units, unit,
                                                                empty_outputs)

        def one_item(item, step):
            b, h, q_tile, runs, _ = unit(item)
            kv_head = h // plan.groups
            tiles = count_tiles(runs)
            for w in range(COMPUTE_WGS):
                rows = wg_slice(q_tile, w, bq)
                with jax.named_scope("p_wait_rows"):
                    wait_unless(item == units[0], rows_free.at[w])  # the CTA's first unit: nothing to wait for
                # Four copies arrive on one barrier (num_arrivals=4).
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem2.at[w], rows_ready.at[w])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem2.at[w], rows_ready.at[w])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem2.at[w], rows_ready.at[w])
                plgpu.copy_gmem_to_smem(o_ref.at[b, rows, h], o_smem2.at[w], rows_ready.at[w])

            kv = (k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free)

            def unit_rows(b, h, tile):
                rows = cta_slice(tile, bq)
                return [ref.at[b, rows, h] for ref in (q_ref, do_ref, o_ref)] + [lse_ref.at[b, h, rows]]

            hooks = (empty_hook(item, tiles),)
            hooks += prefetch_hook(c.prefetch, item, units[1], unit, tiles, unit_rows)
            return stream_kv_tiles(runs, flags, step, kv, b=b, kv_head=kv_head, block_k=bk, stages=stages, hooks=hooks)

        item_loop(units, one_item, jnp.int32(0))
        store_other_empty_units()
        plgpu.wait_smem_to_gmem(0)


def dq_scratch(c: common.Config, dim: int, dtype) -> list:
    """The dQ kernel's shared memory and barriers (``dim``: padded head dim)."""
    bq, bk, stages = c.block_q_dq, c.block_kv_dq, c.num_stages_bwd
    return [
        tiled_smem((COMPUTE_WGS, bq, dim), dtype),  # Q
        tiled_smem((COMPUTE_WGS, bq, dim), dtype),  # dO
        tiled_smem((COMPUTE_WGS, bq, dim), dtype),  # O (for delta)
        tiled_smem((COMPUTE_WGS, bq, dim), dtype),  # dQ staging
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # lse2
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),  # delta staging
        plgpu.Barrier(num_arrivals=4, num_barriers=COMPUTE_WGS),  # Q, dO, lse, O ready
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # rows free (one arrival: its warpgroup)
        tiled_smem((stages, bk, dim), dtype),  # K ring
        tiled_smem((stages, bk, dim), dtype),  # V ring
        plgpu.Barrier(num_barriers=stages),  # K ready
        plgpu.Barrier(num_barriers=stages),  # V ready
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # K free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # V free
        tiled_smem((bq, dim), dtype),  # zeros: dQ of empty units
        plgpu.SMEM((bq,), jnp.float32),  # zeros: delta of empty units
    ]


def backward_dq(plan: common.Plan, q, k, v, do, lse, out, q_seg, kv_seg):
    """``(dQ [B, q_pad, H, Dp]`` in ``q.dtype``, ``delta [B, H, q_pad]`` fp32) from the forward's ``out``.

    ``delta = rowsum(O * dO)``, 0 on padded rows (their dO is 0) and on rows of units with no tile;
    the dK/dV kernel reads it.
    """
    c = plan.config
    tables = static_tables(plan, COMPUTE_WGS * c.block_q_dq, c.block_kv_dq, transpose=False)
    out_type = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((plan.batch, plan.num_heads, plan.q_pad), jnp.float32),
    ]
    inputs = [q, k, v, do, lse, out] + ([q_seg, kv_seg] if plan.segments else [])
    return launch(_dq_kernel, plan, tables, inputs, out_type, dq_scratch(c, plan.head_dim, q.dtype))


# -- dK / dV ------------------------------------------------------------------------------------------

# Rows of the dK/dV kernel's zero tile. Pallas aligns every scratch buffer to 1 KiB; a 4-row tile (1 KiB,
# and lse2/delta in one buffer) keeps the kernel at 162 KiB, inside the driver's 164 KiB shared-memory
# carve-out instead of the 196 KiB one: SPA-default dK/dV 408 -> 393 us at 2x8192 on the H200, EBALL
# +1.5 us for its 16x more zero stores. ncu: 4x fewer register-spill loads miss L1 (NOTES v11).
ZERO_ROWS = 4


def _dkv_kernel(*refs, plan: common.Plan, num_busy: int):
    c = plan.config
    bq, bk, stages, dim = c.block_q_dkv, c.block_kv_dkv, c.num_stages_bwd, plan.head_dim
    (records_ref, ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref) = refs[:8]
    qseg_ref, kseg_ref = (refs[8], refs[9]) if plan.segments else (None, None)
    n_in = 10 if plan.segments else 8
    dk_ref, dv_ref = refs[n_in : n_in + 2]
    (k_smem2, v_smem2, stage_smem2, keys_ready, keys_free,
     q_smem, do_smem, vec_smem, q_ready, do_ready, q_free, do_free, zero_smem) = refs[n_in + 2 :]
    lse_smem, delta_smem = vec_smem.at[0], vec_smem.at[1]
    num_items, num_ctas = records_ref.shape[0], ranges_ref.shape[0] - 1
    units = cta_units(ranges_ref)
    flags = plan.edge_masks(COMPUTE_WGS * bk + bq, transpose=True)
    unit = functools.partial(read_unit, records_ref, slots=plan.slots, num_runs=len(flags))
    wg = lax.axis_index("wg")
    dtype = q_ref.dtype
    coef = plan.scale * LOG2E

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(_register_split()[1], action="increase")
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        stage_smem = stage_smem2.at[wg]

        def one_item(item, step):
            b, h, kv_tile, runs, edges = unit(item)
            keys = wg_slice(kv_tile, wg, bk)
            key0 = keys.start
            k_seg = load_vec(kseg_ref.at[b, keys], ROW, optimized=False) if plan.segments else None

            def masked_fill(t, x, masked, fill):
                # Rows are keys, columns are queries.
                segments = None
                if plan.segments:
                    segments = (k_seg, load_vec(qseg_ref.at[b, pl.ds(t * bq, bq)], COL, optimized=False))
                offset = t * bq + plan.q_offset - key0
                return mask_tile(x, offset, masked, edges, fill, transpose=True, segments=segments)

            def body(t, carry, *, masked):
                sfx = "_m" if masked else ""  # profiler scopes of edge tiles
                dk_acc, dv_acc, step = carry
                slot = lax.rem(step, stages)
                with jax.named_scope("wait_q"):
                    plgpu.barrier_wait(q_ready.at[slot])
                    plgpu.barrier_wait(do_ready.at[slot])

                def compute_st_dpt(acc_refs):
                    # S^T = K Q^T and dP^T = V dO^T issued together: one wait for both.
                    st_ref, dpt_ref = acc_refs
                    plgpu.wgmma(st_ref, k_smem, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                    plgpu.wgmma(dpt_ref, v_smem, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))

                def work(accs):
                    dk_acc, dv_acc = accs
                    zeros = plgpu.layout_cast(jnp.zeros((bk, bq), jnp.float32), WGMMA)
                    with jax.named_scope("st_dpt" + sfx):
                        st, dpt = pl.run_state(compute_st_dpt)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
                    with jax.named_scope("ds" + sfx):
                        lse = load_vec(lse_smem.at[slot], COL)
                        delta = load_vec(delta_smem.at[slot], COL)
                        pt = jnp.exp2(st * coef - bcast_cols(lse, st.shape))
                        if masked:
                            pt = masked_fill(t, pt, masked, 0.0)
                        dst = pt * (dpt - bcast_cols(delta, dpt.shape))

                    def compute_dv_dk(acc_refs):
                        # dV += P^T dO and dK += dS^T Q issued together.
                        dv_acc_ref, dk_acc_ref = acc_refs
                        plgpu.wgmma(dv_acc_ref, pt.astype(dtype), do_smem.at[slot])
                        plgpu.wgmma(dk_acc_ref, dst.astype(dtype), q_smem.at[slot])

                    with jax.named_scope("dv_dk" + sfx):
                        dv_acc, dk_acc = pl.run_state(compute_dv_dk)((plgpu.ACC.init(dv_acc), plgpu.ACC.init(dk_acc)))
                    return dk_acc, dv_acc

                if masked:
                    offset = t * bq + plan.q_offset - key0
                    reaches = tile_reaches(offset - (bk - 1), offset + (bq - 1), edges[0])
                    dk_acc, dv_acc = lax.cond(reaches, work, lambda accs: accs, (dk_acc, dv_acc))
                else:
                    dk_acc, dv_acc = work((dk_acc, dv_acc))
                plgpu.barrier_arrive(q_free.at[slot])
                plgpu.barrier_arrive(do_free.at[slot])
                return dk_acc, dv_acc, step + 1

            zero = lambda: plgpu.layout_cast(jnp.zeros((bk, dim), jnp.float32), WGMMA)  # noqa: E731
            with jax.named_scope("wait_keys"):
                plgpu.barrier_wait(keys_ready.at[wg])
            dk_acc, dv_acc, step = loop_runs(runs, flags, body, (zero(), zero(), step))
            # Releasing K/V right after the last S^T/dP^T matmul instead measured slower (H100, SPA-default
            # dK/dV 418 -> 543 us: more register spills).
            plgpu.barrier_arrive(keys_free.at[wg])

            with jax.named_scope("epilogue"):
                # dK and dV leave through one staging buffer, one after the other: 32 KB less shared
                # memory than one buffer each, for a wait on a 16 KB TMA read (H200: no slower).
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous dV left staging
                stage_smem[...] = (dk_acc * plan.scale).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(stage_smem, dk_ref.at[b, keys, h])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                stage_smem[...] = dv_acc.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(stage_smem, dv_ref.at[b, keys, h])
            return step

        item_loop(units, one_item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        fill_constant_tiles(zero_smem)  # keys no query sees: dK = dV = 0
        plgpu.set_max_registers(_register_split()[0], action="decrease")

        def empty_outputs(b, h, tile):
            # The zero tile is ZERO_ROWS rows: a key tile's outputs take bk / ZERO_ROWS stores each.
            keys = cta_slice(tile, bk)
            pieces = [pl.ds(keys.start + i * ZERO_ROWS, ZERO_ROWS) for i in range(keys.size // ZERO_ROWS)]
            return [(zero_smem, ref.at[b, r, h]) for ref in (dk_ref, dv_ref) for r in pieces]

        empty_hook, store_other_empty_units = empty_unit_stores(num_busy, num_items, num_ctas, units, unit,
                                                                empty_outputs)

        def one_item(item, step):
            b, h, kv_tile, runs, _ = unit(item)
            kv_head = h // plan.groups
            tiles = count_tiles(runs)
            first = step

            def unit_keys(b, h, tile):
                return [ref.at[b, cta_slice(tile, bk), h // plan.groups] for ref in (k_ref, v_ref)]

            hooks = (empty_hook(item, tiles),)
            hooks += prefetch_hook(c.prefetch, item, units[1], unit, tiles, unit_keys)
            for w in range(COMPUTE_WGS):
                keys = wg_slice(kv_tile, w, bk)
                with jax.named_scope("p_wait_keys"):
                    wait_unless(item == units[0], keys_free.at[w])  # the CTA's first unit: nothing to wait for
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem2.at[w], keys_ready.at[w])
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem2.at[w], keys_ready.at[w])

            def body(t, step, *, masked):
                del masked
                slot = lax.rem(step, stages)
                rows = pl.ds(t * bq, bq)
                with jax.named_scope("p_wait_q"):
                    wait_unless(step < stages, q_free.at[slot])
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], q_ready.at[slot])
                with jax.named_scope("p_wait_do"):
                    wait_unless(step < stages, do_free.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_ready.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], do_ready.at[slot])
                run_hooks(hooks, step, first)
                return step + 1

            return loop_runs(runs, flags, body, step)

        item_loop(units, one_item, jnp.int32(0))
        store_other_empty_units()
        plgpu.wait_smem_to_gmem(0)


def dkv_scratch(c: common.Config, dim: int, dtype) -> list:
    """The dK/dV kernel's shared memory and barriers (``dim``: padded head dim)."""
    bq, bk, stages = c.block_q_dkv, c.block_kv_dkv, c.num_stages_bwd
    return [
        tiled_smem((COMPUTE_WGS, bk, dim), dtype),  # K
        tiled_smem((COMPUTE_WGS, bk, dim), dtype),  # V
        tiled_smem((COMPUTE_WGS, bk, dim), dtype),  # dK, then dV staging
        plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WGS),  # K, V ready
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # K, V free (one arrival: its warpgroup)
        tiled_smem((stages, bq, dim), dtype),  # Q ring
        tiled_smem((stages, bq, dim), dtype),  # dO ring
        plgpu.SMEM((2, stages, bq), jnp.float32),  # lse2 and delta rings: one buffer (Pallas aligns each to 1 KiB)
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # Q + lse ready
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # dO + delta ready
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # Q free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),  # dO free
        plgpu.SMEM((ZERO_ROWS, dim), dtype),  # zeros: dK and dV of empty units, ZERO_ROWS rows a store
    ]


def backward_dkv(plan: common.Plan, q, k, v, do, lse, delta, q_seg, kv_seg):
    """``(dK, dV)``, each ``[B, kv_pad, H, Dp]`` in ``k.dtype``: per q head (sum GQA groups after)."""
    c = plan.config
    tables = static_tables(plan, c.block_q_dkv, COMPUTE_WGS * c.block_kv_dkv, transpose=True)
    out_shape = jax.ShapeDtypeStruct((plan.batch, plan.kv_pad, plan.num_heads, plan.head_dim), k.dtype)
    inputs = [q, k, v, do, lse, delta] + ([q_seg, kv_seg] if plan.segments else [])
    dk, dv = launch(_dkv_kernel, plan, tables, inputs, [out_shape, out_shape], dkv_scratch(c, plan.head_dim, k.dtype))
    return dk, dv
