"""Band attention in Pallas with the Triton lowering: forward, dQ and dK/dV kernels (portable GPU path).

Every (batch, head, query tile) program loops over the key tiles its head's distance intervals reach,
taken in closed form from :mod:`spattn_jax.kernels.schedule` (no dense mask, no block list): per
interval a masked low-edge run, an unmasked interior run and a masked high-edge run, all sharing one
online-softmax state. The SPA-default mask has two intervals per head (local window + band), so up to
six runs. The backward is two band-aware kernels (FA2 style, no atomics):

* dQ over (b, h, query tile) with the forward's runs; it also computes ``delta = rowsum(O * dO)``.
* dK/dV over (b, h, key tile) with the transposed runs: exactly the query tiles that see the key tile.

Numerics: logits in fp32 with base-2 exponentials (``exp2(s * scale * log2 e)``), bf16/fp16 operands
into the matmuls with fp32 accumulation. Empty rows (a query with no allowed key): output 0, LSE
``-inf``, zero gradients and no NaN -- the forward guards ``exp2(-inf - -inf)`` and the backward reads
those rows' LSE as ``+inf`` so that their probabilities are exactly 0.

Any length: sequences are padded to the tile internally. Padded keys lie at distances < 0 from every
real query, so no interval admits them; padded query rows are dropped from the output and get LSE
``+inf`` in the backward. Head dims that are not a power of two are zero-padded (Triton needs power-of-
two tensors). GQA: q head ``h`` reads kv head ``h // (H // K)``; dK/dV are produced per q head and
summed over each group (extra memory only when ``H > K``).

Works on JAX 0.10 (interpret mode, CI) and 0.11 (GPU): the kernels use ``lax.dot_general`` and ref
indexing only, not the deprecated ``pl.dot``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from spattn_jax.kernels import schedule
from spattn_jax.kernels.common import dot_f32, pad_axis, pad_inputs, sum_gqa_groups
from spattn_jax.masks import MaskSpec

LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # Triton's tensor-core dots need every dimension >= 16.


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and Triton launch settings; a backward field set to ``None`` follows the forward's.

    Attributes:
      block_q, block_k: forward tile (query rows x keys), powers of two >= 16.
      block_q_dq, block_k_dq: dQ kernel tile.
      block_q_dkv, block_k_dkv: dK/dV kernel tile (the inner loop runs over query tiles).
      num_warps, num_stages: forward Triton settings; ``*_dq`` / ``*_dkv`` override per kernel.
      reverse_q_tiles: launch the last query tiles first (they see the most keys under causal-like
        masks), so the heavy programs do not form the tail.
      exact_delta: compute the backward's ``rowsum(O * dO)`` with the dot reduction that ``dP`` uses
        (see ``_row_dots``); ``None`` means "in interpret mode", where tests compare against
        exactly-zero reference gradients.
      fast_exp2: use PTX ``ex2.approx.ftz.f32`` for the softmax exponentials on the GPU (libdevice's
        ``exp2f`` otherwise); ignored in interpret mode.
    """

    # Defaults: the H100 sweep's winners at 2x8192, H=16, D=128 (bench/results/, bench/README.md).
    block_q: int = 64
    block_k: int = 32
    block_q_dq: int | None = 64
    block_k_dq: int | None = 32
    block_q_dkv: int | None = 64
    block_k_dkv: int | None = 64
    num_warps: int = 4
    num_stages: int = 3
    num_warps_dq: int | None = 4
    num_stages_dq: int | None = 2
    num_warps_dkv: int | None = 4
    num_stages_dkv: int | None = 2
    reverse_q_tiles: bool = True
    exact_delta: bool | None = None
    fast_exp2: bool = True

    def resolved(self) -> "Config":
        """A copy with every ``None`` replaced by its fallback."""
        pick = lambda x, d: d if x is None else x  # noqa: E731
        return dataclasses.replace(
            self,
            block_q_dq=pick(self.block_q_dq, self.block_q),
            block_k_dq=pick(self.block_k_dq, self.block_k),
            block_q_dkv=pick(self.block_q_dkv, self.block_q),
            block_k_dkv=pick(self.block_k_dkv, self.block_k),
            num_warps_dq=pick(self.num_warps_dq, self.num_warps),
            num_stages_dq=pick(self.num_stages_dq, self.num_stages),
            num_warps_dkv=pick(self.num_warps_dkv, self.num_warps),
            num_stages_dkv=pick(self.num_stages_dkv, self.num_stages),
        )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: shapes (real and padded), intervals, settings."""

    q_len: int  # real lengths
    kv_len: int
    q_pad: int  # padded lengths (multiples of every query / key block)
    kv_pad: int
    head_dim: int
    num_heads: int
    num_kv: int
    intervals: tuple[tuple[tuple[int, int], ...], ...]
    scale: float
    config: Config
    interpret: bool
    exact_delta: bool  # see _row_dots

    @property
    def fast_exp2(self) -> bool:
        return self.config.fast_exp2 and not self.interpret

    @property
    def slots(self) -> int:
        return schedule.padded_slots(self.intervals)

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv

    @property
    def q_offset(self) -> int:
        """Position of query row 0: queries are the last ``q_len`` of ``kv_len`` positions."""
        return self.kv_len - self.q_len


def _pow2_block(block: int, length: int) -> int:
    """A power-of-two block no larger than needed for ``length`` and at least 16."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"block sizes must be powers of two, got {block}")
    return max(_MIN_BLOCK, min(block, pl.next_power_of_2(length)))


def _fit_config(config: Config, q_len: int, kv_len: int, head_dim: int) -> Config:
    """Resolve fallbacks, shrink tiles to short sequences, and keep wide heads within shared memory."""
    c = config.resolved()
    q_fit = functools.partial(_pow2_block, length=q_len)
    k_fit = functools.partial(_pow2_block, length=kv_len)
    c = dataclasses.replace(
        c,
        block_q=q_fit(c.block_q),
        block_k=k_fit(c.block_k),
        block_q_dq=q_fit(c.block_q_dq),
        block_k_dq=k_fit(c.block_k_dq),
        block_q_dkv=q_fit(c.block_q_dkv),
        block_k_dkv=k_fit(c.block_k_dkv),
    )
    if head_dim > 128:
        # Each pipeline stage buffers a K and a V tile (or Q and dO): at D = 256 a 64-row bf16 tile is
        # 32 KiB, so three stages of two tiles plus the resident tiles overflow Hopper's 227 KiB.
        c = dataclasses.replace(
            c, num_stages=min(c.num_stages, 2), num_stages_dq=min(c.num_stages_dq, 2),
            num_stages_dkv=min(c.num_stages_dkv, 2),
        )
    return c


@functools.cache
def _run_tables(intervals, block_q: int, block_k: int, q_len: int, kv_len: int, transpose: bool) -> np.ndarray:
    """``int32 [H, tiles, 2 * runs]`` (flattened ``(start, stop)`` pairs), cached per geometry."""
    fn = schedule.transpose_runs if transpose else schedule.forward_runs
    runs = fn(intervals, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
    return runs.reshape(runs.shape[0], runs.shape[1], -1)


# -- in-kernel helpers ----------------------------------------------------------------------------


def _dot_nt(a, b):
    """``a @ b.T`` with fp32 accumulation: ``[m, d] x [n, d] -> [m, n]``."""
    return dot_f32(a, b, 1, 1)


def _dot(a, b):
    """``a @ b`` with fp32 accumulation: ``[m, k] x [k, n] -> [m, n]``."""
    return dot_f32(a, b, 1, 0)


def _band_allowed(dist, bands):
    """``bool`` like ``dist``: the head's predicate, OR over its ``(lo, hi)`` scalar pairs."""
    ok = None
    for lo, hi in bands:
        term = (dist >= lo) & (dist < hi)
        ok = term if ok is None else ok | term
    return ok


def _row_dots(a, b, *, exact: bool):
    """``[m]`` fp32 ``sum_d a_id b_id`` of two ``[m, d]`` tiles.

    ``exact`` takes the diagonal of ``a @ b.T``: the same dot reduction as ``dP = dO V^T``, so a row
    whose probability sits on one key (``O = V_j``) gets ``dP_ij - delta_i`` exactly 0, as autodiff
    of the reference softmax gives (a rounding-level residue there fails relative checks against an
    all-zero reference gradient). It costs one extra ``m x m`` product per program, so the compiled
    GPU path uses the elementwise sum instead.
    """
    if not exact:
        return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=1)
    m = a.shape[0]
    eye = jnp.arange(m)[:, None] == jnp.arange(m)[None, :]
    return jnp.sum(jnp.where(eye, _dot_nt(a, b), 0.0), axis=1)


def _exp2(x, *, fast: bool):
    """``2 ** x`` in fp32; ``fast`` is the single PTX ``ex2.approx.ftz`` (``exp2(-inf) = +0``)."""
    if not fast:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return y


def _read_bands(bands_ref, slots: int):
    return [(bands_ref[2 * s], bands_ref[2 * s + 1]) for s in range(slots)]


def _loop_runs(runs_ref, slots: int, body, carry):
    """Run ``body(tile, carry, masked=...)`` over the run table row: edges masked, interiors not."""
    for r, masked in enumerate(schedule.run_is_masked(slots)):
        start, stop = runs_ref[2 * r], runs_ref[2 * r + 1]
        carry = lax.fori_loop(start, stop, functools.partial(body, masked=masked), carry)
    return carry


def _tile_index(axis: int, num_tiles: int, reverse: bool):
    pid = pl.program_id(axis)
    return num_tiles - 1 - pid if reverse else pid


# -- forward ----------------------------------------------------------------------------------------


def _fwd_kernel(runs_ref, bands_ref, q_ref, k_ref, v_ref, *refs, plan: _Plan, segments: bool):
    """One (q tile, head, batch) program: ``q [bq, D]``, whole-sequence ``k, v [Tkp, D]`` of its kv head,
    run table row ``[2 * runs]``, head intervals ``[2 * slots]``; writes ``o [bq, D]``, ``lse [bq]`` (base 2)."""
    if segments:
        qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    c = plan.config
    bq, bk = c.block_q, c.block_k
    t = _tile_index(0, plan.q_pad // bq, c.reverse_q_tiles)
    bands = _read_bands(bands_ref, plan.slots)
    qk_scale = plan.scale * LOG2E  # logits in base 2: exp(x) = exp2(x log2 e)

    q = q_ref[...]
    rows = t * bq + plan.q_offset + jnp.arange(bq, dtype=jnp.int32)  # absolute positions
    q_ids = qseg_ref[...] if segments else None

    def body(u, carry, *, masked: bool):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(u * bk, bk)
        keys = pl.ds(start, bk)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        s = _dot_nt(q, k) * qk_scale  # [bq, bk]
        ok = None
        if masked:
            cols = start + jnp.arange(bk, dtype=jnp.int32)
            ok = _band_allowed(rows[:, None] - cols[None, :], bands)
        if segments:
            same = q_ids[:, None] == kseg_ref[keys][None, :]
            ok = same if ok is None else ok & same
        if ok is not None:
            s = jnp.where(ok, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        # A row with nothing allowed so far has m = -inf; shift by 0 so exp2(-inf - -inf) never runs.
        m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next) if ok is not None else m_next
        alpha = _exp2(m_prev - m_use, fast=plan.fast_exp2)
        p = _exp2(s - m_use[:, None], fast=plan.fast_exp2)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    carry = (
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _loop_runs(runs_ref, plan.slots, body, carry)
    nonempty = l > 0
    o_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), -jnp.inf)


def _forward(plan: _Plan, q, k, v, q_seg, kv_seg):
    """Padded ``q [B, Tqp, H, Dp]``, ``k, v [B, Tkp, K, Dp]`` -> ``out`` like q, ``lse [B, H, Tqp]`` (base 2)."""
    c = plan.config
    batch, _, num_heads, dim = q.shape
    bq, bk = c.block_q, c.block_k
    nq = plan.q_pad // bq
    runs = _run_tables(plan.intervals, bq, bk, plan.q_len, plan.kv_len, False)
    runs = np.pad(runs, ((0, 0), (0, nq - runs.shape[1]), (0, 0)))  # all-padding tiles: no runs
    bands = schedule.interval_table(plan.intervals)
    t_of = (lambda i: nq - 1 - i) if c.reverse_q_tiles else (lambda i: i)
    g = plan.groups

    segments = q_seg is not None
    in_specs = [
        pl.BlockSpec((None, None, runs.shape[-1]), lambda i, h, b: (h, t_of(i), 0)),
        pl.BlockSpec((None, bands.shape[-1]), lambda i, h, b: (h, 0)),
        pl.BlockSpec((None, bq, None, dim), lambda i, h, b: (b, t_of(i), h, 0)),
        pl.BlockSpec((None, plan.kv_pad, None, dim), lambda i, h, b: (b, 0, h // g, 0)),
        pl.BlockSpec((None, plan.kv_pad, None, dim), lambda i, h, b: (b, 0, h // g, 0)),
    ]
    args = [jnp.asarray(runs), jnp.asarray(bands), q, k, v]
    if segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, h, b: (b, t_of(i))),
            pl.BlockSpec((None, plan.kv_pad), lambda i, h, b: (b, 0)),
        ]
        args += [q_seg, kv_seg]
    out_specs = [
        pl.BlockSpec((None, bq, None, dim), lambda i, h, b: (b, t_of(i), h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, t_of(i))),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, num_heads, plan.q_pad), jnp.float32),
    ]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan, segments=segments),
        grid=(nq, num_heads, batch),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=plan.interpret,
        name="spattn_band_fwd",
    )(*args)


# -- backward: dQ -------------------------------------------------------------------------------------


def _dq_kernel(
    runs_ref, bands_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, *refs, plan: _Plan, segments: bool
):
    """One (q tile, head, batch) program over the forward's runs: ``dq [bq, D]`` and ``delta [bq]``."""
    if segments:
        qseg_ref, kseg_ref, dq_ref, delta_ref = refs
    else:
        dq_ref, delta_ref = refs
    c = plan.config
    bq, bk = c.block_q_dq, c.block_k_dq
    t = _tile_index(0, plan.q_pad // bq, c.reverse_q_tiles)
    bands = _read_bands(bands_ref, plan.slots)
    qk_scale = plan.scale * LOG2E

    q = q_ref[...]
    do = do_ref[...]
    # delta_i = sum_d O_id dO_id = sum_j P_ij dP_ij: the softmax-Jacobian term (0 on padded rows).
    delta = _row_dots(do, o_ref[...], exact=plan.exact_delta)
    delta_ref[...] = delta
    lse = lse_ref[...]  # base 2; +inf on empty and padded rows, so their p is exactly 0
    rows = t * bq + plan.q_offset + jnp.arange(bq, dtype=jnp.int32)
    q_ids = qseg_ref[...] if segments else None

    def body(u, dq, *, masked: bool):
        start = pl.multiple_of(u * bk, bk)
        keys = pl.ds(start, bk)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        s = _dot_nt(q, k) * qk_scale
        ok = None
        if masked:
            cols = start + jnp.arange(bk, dtype=jnp.int32)
            ok = _band_allowed(rows[:, None] - cols[None, :], bands)
        if segments:
            same = q_ids[:, None] == kseg_ref[keys][None, :]
            ok = same if ok is None else ok & same
        if ok is not None:
            s = jnp.where(ok, s, -jnp.inf)
        p = _exp2(s - lse[:, None], fast=plan.fast_exp2)
        dp = _dot_nt(do, v)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _loop_runs(runs_ref, plan.slots, body, jnp.zeros((bq, q.shape[-1]), jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _backward_dq(plan: _Plan, q, k, v, out, do, lse, q_seg, kv_seg):
    c = plan.config
    batch, _, num_heads, dim = q.shape
    bq, bk = c.block_q_dq, c.block_k_dq
    nq = plan.q_pad // bq
    runs = _run_tables(plan.intervals, bq, bk, plan.q_len, plan.kv_len, False)
    runs = np.pad(runs, ((0, 0), (0, nq - runs.shape[1]), (0, 0)))
    bands = schedule.interval_table(plan.intervals)
    t_of = (lambda i: nq - 1 - i) if c.reverse_q_tiles else (lambda i: i)
    g = plan.groups

    segments = q_seg is not None
    row_spec = pl.BlockSpec((None, bq, None, dim), lambda i, h, b: (b, t_of(i), h, 0))
    kv_spec = pl.BlockSpec((None, plan.kv_pad, None, dim), lambda i, h, b: (b, 0, h // g, 0))
    vec_spec = pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, t_of(i)))
    in_specs = [
        pl.BlockSpec((None, None, runs.shape[-1]), lambda i, h, b: (h, t_of(i), 0)),
        pl.BlockSpec((None, bands.shape[-1]), lambda i, h, b: (h, 0)),
        row_spec, kv_spec, kv_spec, row_spec, row_spec, vec_spec,
    ]
    args = [jnp.asarray(runs), jnp.asarray(bands), q, k, v, out, do, lse]
    if segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, h, b: (b, t_of(i))),
            pl.BlockSpec((None, plan.kv_pad), lambda i, h, b: (b, 0)),
        ]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan, segments=segments),
        grid=(nq, num_heads, batch),
        in_specs=in_specs,
        out_specs=[row_spec, vec_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, plan.q_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps_dq, num_stages=c.num_stages_dq),
        interpret=plan.interpret,
        name="spattn_band_dq",
    )(*args)


# -- backward: dK, dV ---------------------------------------------------------------------------------


def _dkv_kernel(
    runs_ref, bands_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan, segments: bool
):
    """One (key tile, q head, batch) program over the transposed runs: ``dk, dv [bk, D]`` for that q head;
    ``q, do [Tqp, D]`` and ``lse, delta [Tqp]`` are the head's whole sequence."""
    if segments:
        qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    c = plan.config
    bq, bk = c.block_q_dkv, c.block_k_dkv
    u = pl.program_id(0)
    bands = _read_bands(bands_ref, plan.slots)
    qk_scale = plan.scale * LOG2E

    k = k_ref[...]
    v = v_ref[...]
    cols = u * bk + jnp.arange(bk, dtype=jnp.int32)
    k_ids = kseg_ref[...] if segments else None

    # Transposed layout ([keys, rows]) so that dV = P^T dO and dK = dS^T Q need no transposes.
    def body(t, carry, *, masked: bool):
        dk, dv = carry
        start = pl.multiple_of(t * bq, bq)
        rows_slice = pl.ds(start, bq)
        q = q_ref[rows_slice, :]
        do = do_ref[rows_slice, :]
        lse = lse_ref[rows_slice]
        delta = delta_ref[rows_slice]
        s_t = _dot_nt(k, q) * qk_scale  # [bk, bq]
        ok = None
        if masked:
            rows = start + plan.q_offset + jnp.arange(bq, dtype=jnp.int32)
            ok = _band_allowed(rows[None, :] - cols[:, None], bands)
        if segments:
            same = k_ids[:, None] == qseg_ref[rows_slice][None, :]
            ok = same if ok is None else ok & same
        if ok is not None:
            s_t = jnp.where(ok, s_t, -jnp.inf)
        p_t = _exp2(s_t - lse[None, :], fast=plan.fast_exp2)
        dv = dv + _dot(p_t.astype(do.dtype), do)
        dp_t = _dot_nt(v, do)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
    dk, dv = _loop_runs(runs_ref, plan.slots, body, (zeros, zeros))
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkv(plan: _Plan, q, k, v, do, lse, delta, q_seg, kv_seg):
    """dK, dV per *query* head: ``[B, Tkp, H, Dp]`` (fp32 when GQA groups are summed afterwards)."""
    c = plan.config
    batch, _, num_heads, dim = q.shape
    bq, bk = c.block_q_dkv, c.block_k_dkv
    nk = plan.kv_pad // bk
    runs = _run_tables(plan.intervals, bq, bk, plan.q_len, plan.kv_len, True)
    runs = np.pad(runs, ((0, 0), (0, nk - runs.shape[1]), (0, 0)))
    bands = schedule.interval_table(plan.intervals)
    g = plan.groups

    segments = q_seg is not None
    q_spec = pl.BlockSpec((None, plan.q_pad, None, dim), lambda u, h, b: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bk, None, dim), lambda u, h, b: (b, u, h // g, 0))
    vec_spec = pl.BlockSpec((None, None, plan.q_pad), lambda u, h, b: (b, h, 0))
    in_specs = [
        pl.BlockSpec((None, None, runs.shape[-1]), lambda u, h, b: (h, u, 0)),
        pl.BlockSpec((None, bands.shape[-1]), lambda u, h, b: (h, 0)),
        q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec,
    ]
    args = [jnp.asarray(runs), jnp.asarray(bands), q, k, v, do, lse, delta]
    if segments:
        in_specs += [
            pl.BlockSpec((None, plan.q_pad), lambda u, h, b: (b, 0)),
            pl.BlockSpec((None, bk), lambda u, h, b: (b, u)),
        ]
        args += [q_seg, kv_seg]
    out_dtype = k.dtype if g == 1 else jnp.float32
    out_spec = pl.BlockSpec((None, bk, None, dim), lambda u, h, b: (b, u, h, 0))
    out_shape = jax.ShapeDtypeStruct((batch, plan.kv_pad, num_heads, dim), out_dtype)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan, segments=segments),
        grid=(nk, num_heads, batch),
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=[out_shape, out_shape],
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps_dkv, num_stages=c.num_stages_dkv),
        interpret=plan.interpret,
        name="spattn_band_dkv",
    )(*args)


# -- custom_vjp on padded arrays -----------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _band_attention(plan: _Plan, q, k, v, q_seg, kv_seg):
    return _forward(plan, q, k, v, q_seg, kv_seg)[0]


def _band_attention_fwd(plan: _Plan, q, k, v, q_seg, kv_seg):
    out, lse = _forward(plan, q, k, v, q_seg, kv_seg)
    # The backward reads LSE +inf on empty rows and padded rows: exp2(s - inf) = 0, never NaN.
    row = jnp.arange(plan.q_pad)
    lse = jnp.where((lse == -jnp.inf) | (row >= plan.q_len), jnp.inf, lse)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _band_attention_bwd(plan: _Plan, res, do):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, delta = _backward_dq(plan, q, k, v, out, do, lse, q_seg, kv_seg)
    dk, dv = _backward_dkv(plan, q, k, v, do, lse, delta, q_seg, kv_seg)
    if plan.groups > 1:
        dk, dv = sum_gqa_groups(dk, plan.num_kv, k.dtype), sum_gqa_groups(dv, plan.num_kv, v.dtype)
    return dq, dk, dv, None, None


_band_attention.defvjp(_band_attention_fwd, _band_attention_bwd)


# -- public entry point ----------------------------------------------------------------------------------


def make_config(block_q: int | None = None, block_k: int | None = None, **tuning: Any) -> Config:
    """A :class:`Config` from keyword settings; unknown keys raise a one-line ValueError."""
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = set(tuning) - fields
    if unknown:
        raise ValueError(
            f"unknown pallas_triton option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(fields))}"
        )
    if block_q is not None:
        tuning["block_q"] = block_q
    if block_k is not None:
        tuning["block_k"] = block_k
    return Config(**tuning)


def _prepare(q, k, v, mask, q_segment_ids, kv_segment_ids, scale, block_q, block_k, interpret, tuning):
    """Validate, build the static :class:`_Plan` and pad the operands to it."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    if mask.num_heads != num_heads:
        raise ValueError(f"mask is for {mask.num_heads} heads but q has {num_heads}; rebuild the mask")
    if num_heads % num_kv:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv}")
    if q_len > kv_len:
        raise ValueError(f"q_len={q_len} exceeds kv_len={kv_len}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    config = _fit_config(make_config(block_q, block_k, **tuning), q_len, kv_len, pl.next_power_of_2(head_dim))
    q_mult = max(config.block_q, config.block_q_dq, config.block_q_dkv)
    k_mult = max(config.block_k, config.block_k_dq, config.block_k_dkv)
    plan = _Plan(
        q_len=q_len,
        kv_len=kv_len,
        q_pad=schedule.cdiv(q_len, q_mult) * q_mult,
        kv_pad=schedule.cdiv(kv_len, k_mult) * k_mult,
        head_dim=head_dim,
        num_heads=num_heads,
        num_kv=num_kv,
        intervals=mask.intervals(kv_len),
        scale=float(head_dim**-0.5 if scale is None else scale),
        config=config,
        interpret=bool(interpret),
        exact_delta=bool(interpret) if config.exact_delta is None else config.exact_delta,
    )
    dim = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))
    qp, kp, vp, q_seg, kv_seg = pad_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, head_dim=dim, q_len=plan.q_pad, kv_len=plan.kv_pad
    )
    return plan, qp, kp, vp, q_seg, kv_seg


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    **tuning: Any,
) -> jax.Array:
    """Band attention under a per-head :class:`MaskSpec`, differentiable (custom VJP).

    Args:
      q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, K, D]`` with ``H % K == 0`` (q head ``h`` reads kv head
        ``h // (H // K)``). Queries are the last ``Tq`` of the ``Tk`` positions (``Tq < Tk``: decoding).
      mask: per-head distance intervals (:meth:`MaskSpec.intervals` of ``Tk``).
      q_segment_ids, kv_segment_ids: optional ``int [B, Tq]``, ``int [B, Tk]`` document ids; tokens
        attend only within their document (masked elementwise on every visited tile).
      scale: logit scale, default ``D ** -0.5``.
      block_q, block_k: forward tile (powers of two, >= 16; shrunk for short sequences); default 64 x 32.
      interpret: run the kernels in Pallas interpret mode; ``None`` means "when JAX's default backend
        is the CPU".
      **tuning: remaining :class:`Config` fields (backward blocks, ``num_warps``, ``num_stages``, ...).

    Returns:
      ``[B, Tq, H, D]`` in ``q.dtype``; empty rows are 0 with zero gradients.
    """
    plan, qp, kp, vp, q_seg, kv_seg = _prepare(
        q, k, v, mask, q_segment_ids, kv_segment_ids, scale, block_q, block_k, interpret, tuning
    )
    out = _band_attention(plan, qp, kp, vp, q_seg, kv_seg)
    return out[:, : plan.q_len, :, : plan.head_dim]


def kernel_parts(q, k, v, do, *, mask: MaskSpec, residuals=None, scale=None, block_q=None, block_k=None,
                 interpret=None, **tuning):
    """Each kernel alone, for benchmarks: ``({"fwd" | "dq" | "dkv": (jitted fn, args)}, residuals)``.

    Inputs as for :func:`attention` (no segment ids), plus the output cotangent ``do`` like ``q``.
    ``residuals = (out, lse, delta)`` of an earlier call (they do not depend on the tiles when no
    padding is needed) skip recomputing them; timing ``fn(*args)`` measures one kernel launch.
    """
    plan, qp, kp, vp, _, _ = _prepare(q, k, v, mask, None, None, scale, block_q, block_k, interpret, tuning)
    dop = pad_axis(pad_axis(do, 3, qp.shape[-1]), 1, plan.q_pad)
    fwd = jax.jit(lambda q, k, v: _forward(plan, q, k, v, None, None))
    dq = jax.jit(lambda *a: _backward_dq(plan, *a, None, None))
    dkv = jax.jit(lambda *a: _backward_dkv(plan, *a, None, None))
    if residuals is None:
        out, (*_, lse) = jax.jit(lambda q, k, v: _band_attention_fwd(plan, q, k, v, None, None))(qp, kp, vp)
        _, delta = dq(qp, kp, vp, out, dop, lse)
        residuals = (out, lse, delta)
    out, lse, delta = residuals
    parts = {
        "fwd": (fwd, (qp, kp, vp)),
        "dq": (dq, (qp, kp, vp, out, dop, lse)),
        "dkv": (dkv, (qp, kp, vp, dop, lse, delta)),
    }
    return parts, residuals
