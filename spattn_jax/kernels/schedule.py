"""Band-aware tile schedules in closed form: which tiles a band kernel visits, and which need a mask.

A head allows query position ``i`` to attend key ``j`` iff ``lo <= i - j < hi`` for one of its
distance intervals ``[lo, hi)`` (:meth:`spattn_jax.masks.MaskSpec.intervals`). Queries are the last
``q_len`` of ``kv_len`` positions, so query row ``r`` sits at position ``r + q_offset`` with
``q_offset = kv_len - q_len``. Tiles are ``block`` consecutive rows (or keys) starting at a multiple
of ``block``; the last tile of an axis may run past the real length (padding).

Two layers:

* Position-range functions (:func:`keys_seen`, :func:`keys_seen_by_all`, :func:`queries_seeing`,
  :func:`queries_seeing_all`, :func:`tiles_touching`, :func:`tiles_inside`) work on plain ints, NumPy
  arrays or traced ``jax.numpy`` int32 arrays alike (only ``+ - * //`` and :func:`_max`/:func:`_min`),
  so a kernel may also evaluate them in-kernel from program ids.
* :func:`forward_runs` / :func:`transpose_runs` evaluate them on the host (NumPy, static shapes) into
  small int32 *run tables*, one row per (head, tile): ``O(H * N / block)`` ints, never an
  ``N x N`` or ``tiles x tiles`` mask.

A run table row holds ``3 * slots`` half-open tile runs ``[start, stop)`` in increasing tile order.
Per interval (farthest band first for the forward, nearest first for the transpose) the runs are
*low edge*, *interior*, *high edge*; :func:`run_is_masked` gives the static pattern
``(True, False, True) * slots``. Interior tiles lie wholly inside one interval for every real
(query, key) pair, so the kernel skips the element mask there; edge tiles evaluate the head's full
predicate (all intervals). Where the tile ranges of two intervals overlap (a narrow gap between the
local window and the band), the later runs are clipped to start after the earlier ones, so every
tile is visited once; the clipped tiles are edge tiles of both intervals, already masked.

Guarantees (tests/kernels/test_schedule.py checks them against ``MaskSpec.dense``):

1. Every allowed (query, key) pair lies in a visited tile, and every visited tile holds at least one
   allowed pair of real positions (no wasted tiles beyond the band edges).
2. No tile is visited twice.
3. A tile in an interior run has every real pair allowed and no padding on the inner axis (keys in
   the forward, queries in the transpose); every such tile is in an interior run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Interval = tuple[int, int]

# Position of each run inside one interval's triple.
LOW_EDGE, INTERIOR, HIGH_EDGE = 0, 1, 2
RUNS_PER_INTERVAL = 3


def _max(a, b):
    """Elementwise max for ints, NumPy arrays and traced jax arrays (no jax import needed here)."""
    if hasattr(a, "aval") or hasattr(b, "aval"):
        import jax.numpy as jnp  # only reached when called on traced values

        return jnp.maximum(a, b)
    return np.maximum(a, b)


def _min(a, b):
    if hasattr(a, "aval") or hasattr(b, "aval"):
        import jax.numpy as jnp

        return jnp.minimum(a, b)
    return np.minimum(a, b)


def cdiv(a, b):
    """Ceiling division, exact for negative ``a`` too (``b > 0``)."""
    return -((-a) // b)


# -- position ranges of one interval ------------------------------------------------------------


def keys_seen(q_start, q_stop, lo, hi):
    """Keys ``[start, stop)`` that *some* query position in ``[q_start, q_stop)`` may attend.

    ``i - hi < j <= i - lo`` for one ``i`` in the range; the union over a contiguous query range is
    contiguous. Empty when ``start >= stop``. Not clipped to ``[0, kv_len)``.
    """
    return q_start - hi + 1, q_stop - lo


def keys_seen_by_all(q_start, q_stop, lo, hi):
    """Keys ``[start, stop)`` that *every* query position in ``[q_start, q_stop)`` may attend."""
    return q_stop - hi, q_start - lo + 1


def queries_seeing(k_start, k_stop, lo, hi):
    """Query positions ``[start, stop)`` that may attend *some* key in ``[k_start, k_stop)``."""
    return k_start + lo, k_stop + hi - 1


def queries_seeing_all(k_start, k_stop, lo, hi):
    """Query positions ``[start, stop)`` that may attend *every* key in ``[k_start, k_stop)``."""
    return k_stop - 1 + lo, k_start + hi


# -- tiles ----------------------------------------------------------------------------------------


def tiles_touching(start, stop, block, limit):
    """Tiles ``[first, stop)`` holding an index of ``[start, stop) ∩ [0, limit)``; empty as ``(x, x)``."""
    start = _max(start, 0)
    stop = _max(_min(stop, limit), start)
    first = start // block
    # An empty clipped range must give an empty tile range even when `start` is mid-tile.
    nonempty = _min(stop - start, 1)
    return first, first + nonempty * (cdiv(stop, block) - first)


def tiles_inside(start, stop, block, limit):
    """Tiles ``[first, stop)`` lying wholly inside ``[start, stop) ∩ [0, limit)``.

    A tile that runs past ``limit`` (the padded tail) is never inside. Empty as ``(x, x)``.
    """
    start, stop = _max(start, 0), _min(stop, limit)
    first = cdiv(start, block)
    return first, _max(stop // block, first)


def key_tiles(q_tile, lo, hi, *, block_q, block_k, q_len, kv_len):
    """For query tile ``q_tile``: ``(first, stop, inner_first, inner_stop)`` key tiles of ``[lo, hi)``.

    ``[first, stop)`` are the key tiles with an allowed pair for a real row of the tile;
    ``[inner_first, inner_stop) ⊆ [first, stop)`` those where every real pair is allowed and no key
    is padding. Rows ``r`` of the tile sit at positions ``r + kv_len - q_len``.
    """
    offset = kv_len - q_len
    r0 = q_tile * block_q
    r1 = _min(r0 + block_q, q_len)  # real rows only
    first, stop = tiles_touching(*keys_seen(r0 + offset, r1 + offset, lo, hi), block_k, kv_len)
    inner = tiles_inside(*keys_seen_by_all(r0 + offset, r1 + offset, lo, hi), block_k, kv_len)
    return _partition(first, stop, *inner)


def query_tiles(k_tile, lo, hi, *, block_q, block_k, q_len, kv_len):
    """The transpose of :func:`key_tiles`: query tiles for key tile ``k_tile`` under ``[lo, hi)``.

    ``[first, stop)`` are the query tiles with an allowed pair for a real key of the tile;
    ``[inner_first, inner_stop)`` those where every real pair is allowed and no row is padding.
    """
    offset = kv_len - q_len
    c0 = k_tile * block_k
    c1 = _min(c0 + block_k, kv_len)
    rs, re = queries_seeing(c0, c1, lo, hi)
    first, stop = tiles_touching(rs - offset, re - offset, block_q, q_len)
    rs, re = queries_seeing_all(c0, c1, lo, hi)
    inner = tiles_inside(rs - offset, re - offset, block_q, q_len)
    return _partition(first, stop, *inner)


def _partition(first, stop, inner_first, inner_stop):
    """Clamp the interior into ``[first, stop)`` so the three runs partition it."""
    stop = _max(stop, first)
    inner_first = _min(_max(inner_first, first), stop)
    inner_stop = _min(_max(inner_stop, inner_first), stop)
    return first, stop, inner_first, inner_stop


# -- run tables (host side) -----------------------------------------------------------------------


def run_is_masked(slots: int) -> tuple[bool, ...]:
    """Static per-run flag: edge runs mask elements, interior runs do not."""
    return tuple(c is not None for c in edge_compares(slots, transpose=False))


def edge_compares(slots: int, transpose: bool) -> tuple[str | None, ...]:
    """Per run, the one compare its tiles need when each edge tile crosses a single boundary:
    ``"lt"`` (``dist < hi``) on an interval's far edge, ``"ge"`` (``dist >= lo``) on its near edge,
    ``None`` on interior runs.

    Forward runs take a head's intervals farthest first and ascend in keys (far edge first); the
    transposed runs take them nearest first and ascend in queries (near edge first).
    """
    first, last = ("ge", "lt") if transpose else ("lt", "ge")
    return (first, None, last) * slots


def _runs(triples, num_tiles: int) -> np.ndarray:
    """Merge per-interval ``(first, stop, inner_first, inner_stop)`` arrays into ``[T, 3 * slots, 2]``.

    Runs keep their order; each starts no earlier than the previous one ended (a cursor), so
    overlapping edge tiles of neighbouring intervals are visited once.
    """
    out = np.zeros((num_tiles, RUNS_PER_INTERVAL * len(triples), 2), np.int32)
    cursor = np.zeros(num_tiles, np.int64)
    for s, (first, stop, inner_first, inner_stop) in enumerate(triples):
        bounds = ((first, inner_first), (inner_first, inner_stop), (inner_stop, stop))
        for r, (a, b) in enumerate(bounds):
            a = np.maximum(a, cursor)
            b = np.maximum(b, a)
            out[:, RUNS_PER_INTERVAL * s + r] = np.stack([a, b], axis=-1)
            cursor = b
    return out


def _check(intervals: Sequence[Sequence[Interval]], block_q: int, block_k: int, q_len: int, kv_len: int):
    if q_len < 1 or kv_len < q_len:
        raise ValueError(f"need 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    for h, head in enumerate(intervals):
        prev = -1
        for lo, hi in head:
            if not (0 <= lo < hi) or lo < prev:
                raise ValueError(f"head {h}: intervals must be sorted, disjoint and non-empty, got {head}")
            prev = hi


def padded_slots(intervals: Sequence[Sequence[Interval]]) -> int:
    """Interval slots per head (at least 1); heads with fewer get empty ``(0, 0)`` intervals."""
    return max(1, max((len(h) for h in intervals), default=1))


def forward_runs(
    intervals: Sequence[Sequence[Interval]], *, block_q: int, block_k: int, q_len: int, kv_len: int
) -> np.ndarray:
    """``int32 [H, cdiv(q_len, block_q), 3 * slots, 2]``: key-tile runs per (head, query tile).

    Intervals are taken farthest first, so runs ascend in key tiles. Forward and dQ kernels loop
    over these; :func:`run_is_masked` says which runs need the element mask.
    """
    _check(intervals, block_q, block_k, q_len, kv_len)
    slots = padded_slots(intervals)
    tiles = np.arange(cdiv(q_len, block_q), dtype=np.int64)
    out = np.zeros((len(intervals), tiles.size, RUNS_PER_INTERVAL * slots, 2), np.int32)
    geom = dict(block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
    for h, head in enumerate(intervals):
        triples = [key_tiles(tiles, lo, hi, **geom) for lo, hi in reversed(head)]
        out[h, :, : RUNS_PER_INTERVAL * len(head)] = _runs(triples, tiles.size)
    return out


def transpose_runs(
    intervals: Sequence[Sequence[Interval]], *, block_q: int, block_k: int, q_len: int, kv_len: int
) -> np.ndarray:
    """``int32 [H, cdiv(kv_len, block_k), 3 * slots, 2]``: query-tile runs per (head, key tile).

    The transpose of :func:`forward_runs`, for the dK/dV kernel: exactly the query tiles that see
    each key tile. Intervals are taken nearest first, so runs ascend in query tiles.
    """
    _check(intervals, block_q, block_k, q_len, kv_len)
    slots = padded_slots(intervals)
    tiles = np.arange(cdiv(kv_len, block_k), dtype=np.int64)
    out = np.zeros((len(intervals), tiles.size, RUNS_PER_INTERVAL * slots, 2), np.int32)
    geom = dict(block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
    for h, head in enumerate(intervals):
        triples = [query_tiles(tiles, lo, hi, **geom) for lo, hi in head]
        out[h, :, : RUNS_PER_INTERVAL * len(head)] = _runs(triples, tiles.size)
    return out


def interval_table(intervals: Sequence[Sequence[Interval]], slots: int | None = None) -> np.ndarray:
    """``int32 [H, 2 * slots]`` flat ``(lo, hi)`` pairs in forward run order (farthest first).

    Unused slots are the empty ``(0, 0)``, which no distance satisfies. Kernels read it to evaluate
    the head's full predicate on edge tiles.
    """
    slots = slots or padded_slots(intervals)
    table = np.zeros((len(intervals), 2 * slots), np.int32)
    for h, head in enumerate(intervals):
        for s, (lo, hi) in enumerate(reversed(head)):
            table[h, 2 * s : 2 * s + 2] = (lo, hi)
    return table


def edge_bounds(intervals: Sequence[Sequence[Interval]], slots: int, transpose: bool) -> np.ndarray:
    """``int32 [H, 3 * slots]``: the boundary each run's :func:`edge_compares` compare reads (``hi`` for
    ``"lt"``, ``lo`` for ``"ge"``; 0 on interior runs)."""
    compares = edge_compares(slots, transpose)
    table = np.zeros((len(intervals), RUNS_PER_INTERVAL * slots), np.int32)
    for h, head in enumerate(intervals):
        for s, (lo, hi) in enumerate(head if transpose else reversed(head)):
            for r in range(RUNS_PER_INTERVAL * s, RUNS_PER_INTERVAL * (s + 1)):
                if compares[r] is not None:
                    table[h, r] = hi if compares[r] == "lt" else lo
    return table


def visited_tiles(runs: np.ndarray) -> int:
    """Total tiles a run table visits (tile pairs a kernel computes), summed over heads and tiles."""
    return int(np.sum(np.maximum(runs[..., 1] - runs[..., 0], 0)))
