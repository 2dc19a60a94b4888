"""Band attention for Hopper (sm90+) in Pallas Mosaic GPU: forward, dQ and dK/dV kernels.

The schedule is the Triton kernel's (:mod:`spattn_jax.kernels.schedule`): every work unit loops over
the tiles its head's distance intervals reach, in closed form, as up to ``3 * slots`` runs (masked
low edge, unmasked interior, masked high edge per interval; SPA-default has two intervals, local
window + band, sharing one online-softmax state). On top of it, FA3 style:

* one CTA = one producer warpgroup that streams K/V (or Q/dO) tiles with TMA through a
  ``num_stages``-deep ring of shared-memory buffers, and two consumer warpgroups that run wgmma on
  ``block_q``-row halves of the CTA's tile (``set_max_registers`` 232 / 40);
* the launch grid is a static *work list* computed in NumPy at trace time: one entry per
  (batch, head, tile), heaviest first (longest-processing-time order, ties head-major so a head's
  K/V stays in L2), so the long bands start first and the short and empty units fill the tail.
  By default the CTAs are persistent, one per SM, each running its own contiguous share of the
  list, dealt greedily to the least-loaded CTA (:func:`balance`), and prefetching its next unit's
  rows (``num_ctas=0``: one CTA per entry);
* empty rows (no allowed key) write O = 0 and LSE = +inf, so that every probability the backward
  recomputes there is exactly 0. All three warpgroups of a CTA walk the same tile list,
  so a zero-trip loop keeps every barrier's phase in step (kernels.md §6).

Kernels live in :mod:`pallas_mosaic_gpu_fwd` and :mod:`pallas_mosaic_gpu_bwd`; this module holds the
entry point, the static plan and the custom VJP.

Inputs and limits (Mosaic GPU): bf16/fp16 only (fp32 raises a ValueError naming ``pallas_triton`` or
``reference``); head dims are zero-padded to a multiple of 64 (at most 128: D = 256 does not fit the
staging buffers); sequence lengths are
padded to the tile internally (padded keys are never inside any causal interval of a real query;
padded query rows are dropped and get LSE +inf in the backward). GQA: q head ``h`` reads kv head
``h // (H // K)``; dK/dV are produced per q head and summed over each group.

Versions: written against ``plgpu.kernel(..., out_type=..., scratch_types=...)`` with Lane lowering
semantics, which JAX 0.10.2 and 0.11.x both accept (0.11 made Warpgroup lowering the default, so it
is named explicitly). It runs only on an sm90+ GPU: :func:`is_supported` says whether it can here.
On a CPU the kernels can still be *lowered* (``jax.jit(...).trace(...).lower(lowering_platforms=
("cuda",))``), which the CPU tests use to catch tracing and lowering errors.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spattn_jax.kernels import schedule
from spattn_jax.kernels.common import pad_inputs, sum_gqa_groups
from spattn_jax.masks import MaskSpec

_DIM_MULTIPLE = 64  # wgmma/TMA with 128-byte swizzle: head dims and tiles in multiples of 64
_MAX_HEAD_DIM = 128  # D = 256 does not fit the staging buffers in 227 KiB of shared memory
# 227 KiB per block, less what Mosaic adds to our buffer sum (barriers, 1 KiB alignment of the 1-D
# buffers): 3.2 KiB for the dQ kernel at block_kv_dq 64 and 3 stages (233,600 B against our 230,400).
_SMEM_LIMIT = 227 * 1024 - 4 * 1024
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and pipeline depths (all multiples of 64 rows).

    Attributes:
      block_q: query rows per consumer warpgroup in the forward; a CTA covers ``2 * block_q`` rows.
      block_kv: keys per K/V tile in the forward.
      num_stages: depth of the forward's K/V shared-memory ring.
      block_q_dq, block_kv_dq: dQ kernel (``2 * block_q_dq`` rows per CTA, K/V tiles of
        ``block_kv_dq``).
      block_q_dkv, block_kv_dkv: dK/dV kernel (``2 * block_kv_dkv`` keys per CTA, Q/dO tiles of
        ``block_q_dkv``).
      num_stages_bwd: depth of both backward kernels' rings.
      lpt: order the work list heaviest first (otherwise plain (b, h, tile) order).
      num_ctas: CTAs per launch. ``None`` (default: one per SM) or a count: persistent CTAs that
        each run a greedy share of the work list (:func:`balance`), prefetching the next unit's rows while
        finishing the current (H100, 2x8192: 10-15% faster than one CTA per item). ``0``: one
        CTA per work item, launched in LPT order. The persistent mode used to hang whenever a CTA
        had two busy units (the forward's producer waited for warpgroup 1's Q release before
        streaming the K tile that the ping-pong barrier needs first); fixed 2026-11-23, checked by
        the CPU protocol simulation (tests/kernels/test_pallas_mosaic_gpu.py) and on the H100
        (bench/NOTES_mgpu.md).
      prefetch: a few tiles before each unit ends, the producer prefetches the CTA's next unit's rows
        (Q; Q, dO, O, lse; K, V) into L2, so that their loads at the unit boundary, which the
        consumers wait for, hit L2 instead of HBM.
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    num_stages_bwd: int = 2
    lpt: bool = True
    num_ctas: int | None = None
    prefetch: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("block_") and (value < _DIM_MULTIPLE or value % _DIM_MULTIPLE):
                raise ValueError(f"pallas_mosaic_gpu needs {f.name} to be a positive multiple of 64, got {value}")
            if f.name.startswith("num_stages") and value < 1:
                raise ValueError(f"{f.name} must be >= 1, got {value}")

    def smem_bytes(self, head_dim: int) -> dict[str, int]:
        """Shared memory each kernel declares for 2-byte inputs (buffers aligned to 1 KiB, barriers), for the
        227 KiB check. Mosaic adds 2 KiB of its own to the forward and dQ kernels (ncu, JAX 0.11.2, defaults);
        the dK/dV kernel takes exactly this."""
        from spattn_jax.kernels import pallas_mosaic_gpu_bwd as bwd  # noqa: PLC0415 (they import this module)
        from spattn_jax.kernels import pallas_mosaic_gpu_fwd as fwd  # noqa: PLC0415

        lists = dict(forward=fwd.forward_scratch, dq=bwd.dq_scratch, dkv=bwd.dkv_scratch)
        return {name: fwd.scratch_bytes(make(self, head_dim, jnp.bfloat16)) for name, make in lists.items()}

    @property
    def q_multiple(self) -> int:
        """Query padding unit: every kernel's query tile divides it."""
        return int(np.lcm.reduce([2 * self.block_q, 2 * self.block_q_dq, self.block_q_dkv]))

    @property
    def kv_multiple(self) -> int:
        return int(np.lcm.reduce([self.block_kv, self.block_kv_dq, 2 * self.block_kv_dkv]))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: real and padded shapes, intervals, settings."""

    batch: int
    q_len: int  # real lengths
    kv_len: int
    q_pad: int  # padded lengths (multiples of every kernel's tile)
    kv_pad: int
    head_dim: int  # padded head dim (multiple of 64)
    num_heads: int
    num_kv: int
    intervals: tuple[tuple[tuple[int, int], ...], ...]
    scale: float
    segments: bool
    config: Config

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

    def one_sided_edges(self, span: int) -> bool:
        """Whether every edge tile crosses exactly one interval boundary, for tiles whose distances span
        ``span`` values (CTA rows + pipelined tile): every interval at least that wide and that far
        from its neighbours."""
        return all(
            hi - lo >= span and (i == 0 or lo - head[i - 1][1] >= span)
            for head in self.intervals
            for i, (lo, hi) in enumerate(head)
        )

    def edge_masks(self, span: int, transpose: bool) -> tuple:
        """Static element mask of each run of the schedule: ``None`` (interior: no mask) or ``(kind, run)``.

        ``"full"`` evaluates the head's whole predicate (OR over its intervals, two compares each);
        ``"lt"`` / ``"ge"`` compare the distance with the run's one boundary
        (:func:`schedule.edge_compares`; the bound is in the work record), which
        :meth:`one_sided_edges` allows; ``"segments"``: an interior run that only segment ids mask.
        """
        one_sided = self.one_sided_edges(span)
        kinds = []
        for run, compare in enumerate(schedule.edge_compares(self.slots, transpose)):
            if compare is None:
                kinds.append(("segments", run) if self.segments else None)
            else:
                kinds.append((compare if one_sided else "full", run))
        return tuple(kinds)


# -- static tables (NumPy, trace time) ----------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def run_table(intervals, block_q: int, block_k: int, q_len: int, kv_len: int, transpose: bool) -> np.ndarray:
    """``int32 [H, tiles, 2 * runs]``: flattened ``(start, stop)`` run pairs (schedule.py), cached."""
    fn = schedule.transpose_runs if transpose else schedule.forward_runs
    runs = fn(intervals, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
    return np.ascontiguousarray(runs.reshape(runs.shape[0], runs.shape[1], -1))


def run_lengths(runs: np.ndarray) -> np.ndarray:
    """``int64 [H, tiles]``: inner tiles each (head, tile) visits, from a flattened run table."""
    starts, stops = runs[..., 0::2].astype(np.int64), runs[..., 1::2].astype(np.int64)
    return np.maximum(stops - starts, 0).sum(-1)


def work_list(lengths: np.ndarray, batch: int, *, lpt: bool = True) -> np.ndarray:
    """``int32 [batch * H * tiles, 3]`` of ``(b, h, tile)``, one row per CTA of a launch.

    With ``lpt`` the heaviest units come first (longest-processing-time order: a greedy list
    schedule, which is what the hardware block scheduler does with a grid, is then within 4/3 of
    optimal), ties broken head-major then batch then tile so that CTAs running together share a
    head's K/V in L2. Units with no tiles come last in either order: no consumer visits them, the
    producers store their zero outputs while the busy units run.

    Args:
      lengths: ``[H, tiles]`` tiles visited per unit (:func:`run_lengths`).
      batch: the batch size (every sequence has the same schedule).
    """
    num_heads, tiles = lengths.shape
    b, h, t = np.meshgrid(np.arange(batch), np.arange(num_heads), np.arange(tiles), indexing="ij")
    b, h, t = b.ravel(), h.ravel(), t.ravel()
    if lpt:
        # np.lexsort sorts by the last key first.
        order = np.lexsort((t, b, h, -lengths[h, t]))
    else:
        order = np.lexsort((t, h, b, lengths[h, t] == 0))
    return np.stack([b[order], h[order], t[order]], axis=1).astype(np.int32)


def balance(costs: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy list schedule of units onto ``workers`` persistent CTAs: ``(order, offsets)``.

    Units go in list order (heaviest first for an LPT list), each to the CTA with the least work so
    far (ties: the lowest index), so no CTA ends more than one unit above the mean (Graham's bound:
    makespan <= mean + max cost). CTA ``c`` runs ``order[offsets[c] : offsets[c + 1]]``, in list order.
    The strided split it replaces (CTA ``c`` takes units ``c, c + G, ...``) hands the ragged last wave
    of small units to the CTAs that already got the heaviest unit of every wave: 5% over the mean at
    2x8192 for both masks, against 1-3% here (tests/kernels/test_pallas_mosaic_gpu.py).

    Args:
      costs: ``[units]`` work per unit (any unit: tiles plus a fixed cost).
      workers: CTAs (at least 1).
    Returns:
      ``order`` ``int64 [units]`` (a permutation) and ``offsets`` ``int32 [workers + 1]``.
    """
    free = [(0.0, w) for w in range(workers)]
    owner = np.empty(len(costs), np.int64)
    for i, cost in enumerate(costs):
        load, w = heapq.heappop(free)
        owner[i] = w
        heapq.heappush(free, (load + float(cost), w))
    order = np.argsort(owner, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=workers))]).astype(np.int32)
    return order, offsets


def makespan(costs: np.ndarray, order: np.ndarray, offsets: np.ndarray) -> float:
    """The largest per-CTA sum of ``costs`` of a :func:`balance` schedule."""
    ordered = np.asarray(costs, np.float64)[order]
    return max((ordered[a:b].sum() for a, b in zip(offsets[:-1], offsets[1:])), default=0.0)


def lpt_makespan(lengths: np.ndarray, batch: int, workers: int, *, lpt: bool = True, overhead: float = 0.0) -> float:
    """Model makespan of the work list on ``workers`` SMs (greedy: next unit to the first free SM,
    which is what the hardware block scheduler does with one CTA per unit); ``overhead`` is a per-unit
    cost in tile units (prologue, epilogue)."""
    items = work_list(lengths, batch, lpt=lpt)
    costs = lengths[items[:, 1], items[:, 2]] + overhead
    return makespan(costs, *balance(costs, workers))


def interval_table(plan: Plan) -> np.ndarray:
    """``int32 [H, 2 * slots]`` ``(lo, hi)`` pairs for the edge-tile predicate (empty slots never match)."""
    return schedule.interval_table(plan.intervals, plan.slots)


# -- version compatibility ------------------------------------------------------------------------------


def is_supported() -> bool:
    """Whether the kernels can run here: a CUDA device of compute capability 9.0 or newer."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    if device.platform != "gpu":
        return False
    try:
        return float(getattr(device, "compute_capability", "0")) >= 9.0
    except ValueError:
        return False


# -- custom VJP on padded arrays ------------------------------------------------------------------------


def _kernels():
    # Imported lazily so that importing this module (the registry does) stays cheap.
    from spattn_jax.kernels import pallas_mosaic_gpu_bwd as bwd
    from spattn_jax.kernels import pallas_mosaic_gpu_fwd as fwd

    return fwd, bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def band_attention(plan: Plan, q, k, v, q_seg, kv_seg):
    """Padded ``[B, q_pad, H, Dp]`` in, padded out; see :func:`attention`."""
    fwd, _ = _kernels()
    return fwd.forward(plan, q, k, v, q_seg, kv_seg)[0]


def _band_attention_fwd(plan: Plan, q, k, v, q_seg, kv_seg):
    fwd, _ = _kernels()
    out, lse = fwd.forward(plan, q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _band_attention_bwd(plan: Plan, res, do):
    _, bwd = _kernels()
    q, k, v, q_seg, kv_seg, out, lse = res
    # The forward's LSE has +inf on empty rows, so it needs no fix-up pass (one was 2.4 us at 2x8192).
    # Padded dO rows and head-dim columns are already 0 (the cotangent of the slice in `attention`),
    # so their delta, dP, dS and dV contributions vanish without another pass over dO.
    dq, delta = bwd.backward_dq(plan, q, k, v, do, lse, out, q_seg, kv_seg)
    dk, dv = bwd.backward_dkv(plan, q, k, v, do, lse, delta, q_seg, kv_seg)
    if plan.groups > 1:
        dk, dv = sum_gqa_groups(dk, plan.num_kv, k.dtype), sum_gqa_groups(dv, plan.num_kv, v.dtype)
    return dq, dk, dv, None, None


band_attention.defvjp(_band_attention_fwd, _band_attention_bwd)


# -- public entry point ---------------------------------------------------------------------------------


def make_config(block_q: int | None = None, block_kv: int | None = None, **tuning: Any) -> Config:
    """A :class:`Config` from keyword settings; unknown keys raise a one-line ValueError."""
    fields = {f.name for f in dataclasses.fields(Config)}
    if "block_k" in tuning and block_kv is None:  # the Triton kernel's spelling
        block_kv = tuning.pop("block_k")
    unknown = set(tuning) - fields
    if unknown:
        raise ValueError(
            f"unknown pallas_mosaic_gpu option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(fields))}"
        )
    if block_q is not None:
        tuning["block_q"] = block_q
    if block_kv is not None:
        tuning["block_kv"] = block_kv
    return Config(**tuning)


def make_plan(q_shape, k_shape, mask: MaskSpec, *, scale, segments: bool, config: Config) -> Plan:
    """The static :class:`Plan` for ``q [B, Tq, H, D]`` and ``k [B, Tk, K, D]`` shapes."""
    batch, q_len, num_heads, head_dim = q_shape
    kv_len, num_kv = k_shape[1], k_shape[2]
    qm, km = config.q_multiple, config.kv_multiple
    return Plan(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        q_pad=schedule.cdiv(q_len, qm) * qm,
        kv_pad=schedule.cdiv(kv_len, km) * km,
        head_dim=schedule.cdiv(head_dim, _DIM_MULTIPLE) * _DIM_MULTIPLE,
        num_heads=num_heads,
        num_kv=num_kv,
        intervals=mask.intervals(kv_len),
        scale=float(head_dim**-0.5 if scale is None else scale),
        segments=segments,
        config=config,
    )


def accepts(q, *, interpret: bool | None = None, **options) -> bool:
    """Whether ``implementation="auto"`` may pick this kernel for ``q`` and these kernel options.

    bf16/fp16, head_dim <= 128, an sm90+ GPU, no interpret mode, and only options this kernel knows
    (another kernel's tile settings, e.g. the Triton kernel's ``block_k_dq``, leave it to that kernel).
    """
    known = {f.name for f in dataclasses.fields(Config)} | {"block_k"}
    return (
        not interpret
        and set(options) <= known
        and q.dtype in _SUPPORTED_DTYPES
        and q.shape[-1] <= _MAX_HEAD_DIM
        and is_supported()
    )


def check_inputs(q, k, v, mask: MaskSpec, q_segment_ids, kv_segment_ids) -> None:
    """One-line ValueErrors for inputs this implementation cannot take."""
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"pallas_mosaic_gpu takes bf16/fp16 q, k, v of one dtype (got {q.dtype}, {k.dtype}, {v.dtype}); "
            f"use implementation='pallas_triton' or 'reference' for fp32"
        )
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(
            f"pallas_mosaic_gpu supports head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}; "
            f"use implementation='pallas_triton' or 'reference'"
        )
    if mask.num_heads != q.shape[2]:
        raise ValueError(f"mask is for {mask.num_heads} heads but q has {q.shape[2]}; rebuild the mask")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"num_heads={q.shape[2]} is not a multiple of num_kv_heads={k.shape[2]}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q_len={q.shape[1]} exceeds kv_len={k.shape[1]}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")


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
    block_kv: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    **tuning: Any,
) -> jax.Array:
    """Band attention under a per-head :class:`MaskSpec` on Hopper, differentiable (custom VJP).

    Args:
      q: ``[B, Tq, H, D]`` bf16/fp16; k, v: ``[B, Tk, K, D]`` of the same dtype with ``H % K == 0``.
        Queries are the last ``Tq`` of the ``Tk`` positions.
      mask: per-head distance intervals (:meth:`MaskSpec.intervals` of ``Tk``).
      q_segment_ids, kv_segment_ids: optional ``int [B, Tq]``, ``int [B, Tk]`` document ids; tokens
        attend only within their document (masked elementwise on every visited tile).
      scale: logit scale, default ``D ** -0.5`` (of the unpadded head dim).
      block_q: forward query rows per consumer warpgroup (CTA = 2 x block_q rows); default 64.
      block_kv: forward K/V tile; default 128. ``block_k`` is accepted as an alias.
      num_stages: forward pipeline depth; default 2.
      interpret: must be falsy: there is no CPU interpreter path (Mosaic GPU's interpreter lacks
        ``run_state`` and layout casts); ``None`` is accepted for the shared signature.
      **tuning: remaining :class:`Config` fields (backward blocks and stages, ``lpt``).

    Returns:
      ``[B, Tq, H, D]`` in ``q.dtype``; empty rows are 0 with zero gradients.
    """
    if interpret:
        raise ValueError(
            "pallas_mosaic_gpu has no interpret mode; use implementation='pallas_triton' (interpret) or 'reference'"
        )
    check_inputs(q, k, v, mask, q_segment_ids, kv_segment_ids)
    if num_stages is not None:
        tuning["num_stages"] = num_stages
    config = make_config(block_q, block_kv, **tuning)
    for kernel, used in config.smem_bytes(schedule.cdiv(q.shape[-1], _DIM_MULTIPLE) * _DIM_MULTIPLE).items():
        if used > _SMEM_LIMIT:
            raise ValueError(
                f"pallas_mosaic_gpu {kernel} kernel needs {used} B of shared memory (> {_SMEM_LIMIT}) with {config}; "
                f"use smaller blocks or fewer stages"
            )
    segments = q_segment_ids is not None
    plan = make_plan(q.shape, k.shape, mask, scale=scale, segments=segments, config=config)
    qp, kp, vp, q_seg, kv_seg = pad_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, head_dim=plan.head_dim, q_len=plan.q_pad, kv_len=plan.kv_pad
    )
    out = band_attention(plan, qp, kp, vp, q_seg, kv_seg)
    return out[:, : plan.q_len, :, : q.shape[-1]]
