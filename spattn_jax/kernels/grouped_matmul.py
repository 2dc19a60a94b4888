"""Grouped matmul for the dropless MoE: ``jax.lax.ragged_dot`` semantics, with a Pallas Triton GPU kernel.

``gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]``: rows ``[start_g, start_g + size_g)`` of
``lhs`` (groups contiguous, in order) multiply ``rhs[g]``; rows past ``sum(group_sizes)`` give 0.

Why a kernel: XLA:GPU lowers ``ragged_dot`` by expanding it to a dense ``[G, M, ...]`` product (its
cuDNN fusion, where present, covers the forward and the data gradient but not the weight gradient).
With 64 experts that costs 64x the FLOPs and, for the 0.25B-1.75B preset at 8k tokens per GPU, a
152 GiB temporary. TPU lowers ``ragged_dot`` natively and CPU only runs small models, so ``auto``
picks the kernel on GPUs only.

The kernel (megablox's tiling, written for Triton): rows are cut into ``block_m`` tiles *without*
padding groups to the tile. A ``(row tile, column tile)`` program loops over the groups its rows
touch (one for most tiles, two or more at group boundaries), and adds each group's product with the
other groups' rows zeroed; so each output tile is written once, by one program, and no atomics or
masked stores are needed. Empty groups are skipped. The weight gradient
(``tgmm``) runs a ``(group, K tile, N tile)`` program over the row tiles of its group, masking rows
of neighbouring groups. Backward: ``dlhs = gmm(dout, rhs^T)``, ``drhs = tgmm(lhs, dout)``, with the
fp32 cotangent rounded to the operands' dtype for the tensor cores (as megablox does).

Works on JAX 0.10 (interpret mode, CI) and 0.11 (GPU) alike: ``lax.dot_general``, ref indexing and
``lax.fori_loop`` only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from spattn_jax.kernels.common import dot_f32, pad_axis

IMPLEMENTATIONS = ("ragged_dot", "pallas_triton")


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles (powers of two, >= 16) and Triton launch settings for both kernels.

    Defaults: the best of three tilings on an H100 at the 0.25B-1.75B preset's expert shapes
    (``bench/grouped_matmul.py``, bench/results/grouped_matmul_*).
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4


def resolve(implementation: str) -> str:
    """``auto`` -> ``pallas_triton`` on GPUs, ``ragged_dot`` elsewhere; checks the name."""
    if implementation == "auto":
        return "pallas_triton" if jax.default_backend() == "gpu" else "ragged_dot"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown grouped-matmul implementation {implementation!r}; use 'auto' or one of {IMPLEMENTATIONS}"
        )
    return implementation


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str = "auto",
    config: Config = Config(),
    interpret: bool | None = None,
) -> jax.Array:
    """``ragged_dot(lhs [M, K], rhs [G, K, N], group_sizes int [G])`` -> fp32 ``[M, N]``.

    Differentiable in ``lhs`` and ``rhs``. ``interpret`` (Pallas interpret mode) defaults to "when
    the default backend is the CPU"; it only matters for ``pallas_triton``.
    """
    impl = resolve(implementation)
    if impl == "ragged_dot":
        return lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _gmm_vjp(lhs, rhs, group_sizes.astype(jnp.int32), config, bool(interpret))


# -- tiling tables (plain JAX, traced) -------------------------------------------------------------


def _group_bounds(group_sizes):
    """``start, end int [G]`` row offsets of each group."""
    end = jnp.cumsum(group_sizes)
    return end - group_sizes, end


def _tile_group_ranges(group_sizes, num_rows: int, block_m: int):
    """``int [tiles, 2]``: first and last group whose rows meet each row tile (first > last: none)."""
    _, end = _group_bounds(group_sizes)
    tiles = pl.cdiv(num_rows, block_m)
    lo = jnp.arange(tiles, dtype=jnp.int32) * block_m
    hi = jnp.minimum(lo + block_m, end[-1])  # rows past the last group belong to no group
    # Group of row r: the number of groups ending at or before r (empty groups end where they start).
    first = jnp.searchsorted(end, lo, side="right").astype(jnp.int32)
    last = jnp.searchsorted(end, hi - 1, side="right").astype(jnp.int32)
    last = jnp.where(hi > lo, last, first - 1)
    return jnp.stack([first, last], axis=1)


def _group_tile_ranges(group_sizes, block_m: int):
    """``int [G, 4]``: per group its first and last row tile, and its row start and end."""
    start, end = _group_bounds(group_sizes)
    first = start // block_m
    last = jnp.where(group_sizes > 0, (end - 1) // block_m, first - 1)
    return jnp.stack([first, last, start, end], axis=1).astype(jnp.int32)


def _bounds_table(group_sizes):
    start, end = _group_bounds(group_sizes)
    return jnp.stack([start, end], axis=1).astype(jnp.int32)  # [G, 2]


# -- kernels -----------------------------------------------------------------------------------------


def _gmm_kernel(tiles_ref, bounds_ref, lhs_ref, rhs_ref, out_ref, *, block_k: int, transpose_rhs: bool):
    """Program (row tile i, column tile j): ``lhs [bm, K]``, ``rhs [G, K, bn]`` (or ``[G, bn, K]``)."""
    bm, k_total = lhs_ref.shape
    rows = pl.program_id(0) * bm + jnp.arange(bm, dtype=jnp.int32)

    def group(g, acc):
        # Unmasked products over K, then the rows of other groups dropped once: most tiles hold one
        # group, and masking the product instead of every K slice of the operand keeps the loop lean.
        def chunk(kk, part):
            ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
            if transpose_rhs:
                return part + dot_f32(lhs_ref[:, ks], rhs_ref[g, :, ks], 1, 1)
            return part + dot_f32(lhs_ref[:, ks], rhs_ref[g, ks, :], 1, 0)

        part = lax.fori_loop(0, k_total // block_k, chunk, jnp.zeros(acc.shape, jnp.float32))
        mine = (rows >= bounds_ref[g, 0]) & (rows < bounds_ref[g, 1])
        return acc + jnp.where(mine[:, None], part, 0.0)

    acc = lax.fori_loop(tiles_ref[0], tiles_ref[1] + 1, group, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_kernel(ranges_ref, lhs_ref, dout_ref, out_ref, *, block_m: int):
    """Program (group g, K tile, N tile): ``sum`` over the group's rows of ``lhs^T dout``.

    Only the group's first and last row tiles can hold other groups' rows: those two are masked, the
    tiles between are not.
    """
    first, last, start, end = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]

    def tile(t, acc, *, masked: bool):
        m0 = pl.multiple_of(t * block_m, block_m)
        a = lhs_ref[pl.ds(m0, block_m), :]
        if masked:
            rows = m0 + jnp.arange(block_m, dtype=jnp.int32)
            a = jnp.where(((rows >= start) & (rows < end))[:, None], a, jnp.zeros_like(a))
        return acc + dot_f32(a, dout_ref[pl.ds(m0, block_m), :], 0, 0)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = lax.fori_loop(first, jnp.minimum(first + 1, last + 1), functools.partial(tile, masked=True), acc)
    acc = lax.fori_loop(first + 1, last, functools.partial(tile, masked=False), acc)
    acc = lax.fori_loop(jnp.maximum(last, first + 1), last + 1, functools.partial(tile, masked=True), acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def _fit(block: int, size: int) -> int:
    return max(16, min(block, pl.next_power_of_2(size)))


def _pad(x, axis: int, multiple: int):
    """Zero-pad ``axis`` of ``x`` up to a multiple of ``multiple``."""
    return pad_axis(x, axis, pl.cdiv(x.shape[axis], multiple) * multiple)


def _gmm_call(lhs, rhs, group_sizes, out_dtype, config: Config, interpret: bool, transpose_rhs: bool):
    """``lhs [M, K] x rhs[g] -> [M, N]``; ``rhs`` is ``[G, K, N]``, or ``[G, N, K]`` if ``transpose_rhs``."""
    num_rows, k_dim = lhs.shape
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm, bn, bk = _fit(config.block_m, num_rows), _fit(config.block_n, n_dim), _fit(config.block_k, k_dim)
    lhs_p = _pad(_pad(lhs, 0, bm), 1, bk)
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    rhs_p = _pad(_pad(rhs, k_axis, bk), n_axis, bn)
    mp, kp = lhs_p.shape
    np_ = rhs_p.shape[n_axis]
    tiles = _tile_group_ranges(group_sizes, mp, bm)
    bounds = _bounds_table(group_sizes)
    num_groups = rhs.shape[0]
    rhs_block = (num_groups, bn, kp) if transpose_rhs else (num_groups, kp, bn)
    rhs_index = (lambda i, j: (0, j, 0)) if transpose_rhs else (lambda i, j: (0, 0, j))
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, block_k=bk, transpose_rhs=transpose_rhs),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((None, 2), lambda i, j: (i, 0)),
            pl.BlockSpec((num_groups, 2), lambda i, j: (0, 0)),
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec(rhs_block, rhs_index),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="spattn_gmm",
    )(tiles, bounds, lhs_p, rhs_p)
    return out[:num_rows, :n_dim]


def _tgmm_call(lhs, dout, group_sizes, out_dtype, config: Config, interpret: bool):
    """``[G, K, N]``: per group ``lhs[rows_g]^T @ dout[rows_g]``."""
    num_rows, k_dim = lhs.shape
    n_dim = dout.shape[1]
    num_groups = group_sizes.shape[0]
    # The K tile is an output tile here, as wide as the N tile.
    bm, bn, bk = _fit(config.block_m, num_rows), _fit(config.block_n, n_dim), _fit(config.block_n, k_dim)
    lhs_p = _pad(_pad(lhs, 0, bm), 1, bk)
    dout_p = _pad(_pad(dout, 0, bm), 1, bn)
    mp, kp = lhs_p.shape
    np_ = dout_p.shape[1]
    ranges = _group_tile_ranges(group_sizes, bm)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=bm),
        grid=(num_groups, kp // bk, np_ // bn),
        in_specs=[
            pl.BlockSpec((None, 4), lambda g, a, b: (g, 0)),
            pl.BlockSpec((mp, bk), lambda g, a, b: (0, a)),
            pl.BlockSpec((mp, bn), lambda g, a, b: (0, b)),
        ],
        out_specs=pl.BlockSpec((None, bk, bn), lambda g, a, b: (g, a, b)),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="spattn_tgmm",
    )(ranges, lhs_p, dout_p)
    return out[:, :k_dim, :n_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_vjp(lhs, rhs, group_sizes, config, interpret):
    return _gmm_call(lhs, rhs, group_sizes, jnp.float32, config, interpret, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, config, interpret):
    return _gmm_vjp(lhs, rhs, group_sizes, config, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(config, interpret, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = _gmm_call(dout, rhs, group_sizes, lhs.dtype, config, interpret, transpose_rhs=True)
    drhs = _tgmm_call(lhs, dout, group_sizes, rhs.dtype, config, interpret)
    return dlhs, drhs, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)
