"""SPAttention on TPU through JAX's splash attention (Mosaic TPU): forward, dq and dkv kernels.

Splash (``jax.experimental.pallas.ops.tpu.splash_attention``) brings the kernels, the block-sparse
metadata, GQA and segment ids. This module only lowers a :class:`~spattn_jax.masks.MaskSpec` to
splash's mask objects and wraps the call:

* **Masks.** Head ``h`` becomes one :class:`IntervalMask`, a ``_ComputableMask`` built from
  ``spec.intervals(Tk)`` (masks.py stays the single source of truth). On one interval it equals
  splash's ``LocalMask`` with an offset; it also takes unions (the SPA-default window plus band),
  which ``LocalMask | LocalMask`` would express only as a ``LogicalOr`` without a ``mask_function``.
  The heads go into one ``MultiHeadMask``.
* **Scale.** Splash applies no softmax scale, so ``q`` is multiplied by ``scale`` (in fp32, then
  cast back to ``q.dtype``) before the kernel; autodiff carries the factor into ``dq``.
* **Empty rows** (``spattention_exclusive``, ``gapped``, ``balanced_exclusive``, and rows a segment
  boundary empties). Splash leaves them undefined: a row whose visited blocks are all masked averages
  ``v`` over the masked block, and a row whose q-block visits no kv block divides 0 by 0 (NaN).
  Every call therefore passes an attention *sink* of logit :data:`SINK_LOGIT` (a virtual key with
  value 0). On a row with any allowed key its weight ``exp(SINK_LOGIT - lse)`` is exactly 0.0 in
  fp32, so nothing changes; on an empty row it takes the whole softmax, so the output is exactly 0
  and ``p = exp(mask_value - SINK_LOGIT)`` is 0, which makes the row's dq and its dk/dv
  contributions exactly 0 (spec §7.1). This also covers rows emptied by segment ids, which a
  static empty-row table could not.
* **Any length.** ``Tq`` and ``Tk`` are padded up to a block multiple. Padded keys sit past every
  real query, at negative distance, so no interval admits them; padded queries are computed and
  sliced off (their cotangent is 0, so they add exactly 0 to dk and dv).
* **Sharding.** With ``mesh=``, a ``jax.shard_map`` splits batch over ``batch_axes`` and heads over
  ``head_axis``; the kernel is built with ``head_shards`` and its metadata is passed through
  ``manual_sharding_spec``, so every head shard gets its own heads' masks.
* **Scalar memory.** A ``MultiHeadMask`` of distinct masks keeps ``heads x q-blocks x kv-blocks``
  entries of ``data_next``, ``block_mask`` and ``mask_next`` in SMEM (1 MiB per TensorCore on TPU
  v4/v5e/v5p/v6e, ``pltpu`` ``TpuInfo.smem_capacity_bytes``). When one kernel over all local heads
  would exceed ``smem_budget``, the heads run as one kernel per head (``heads_per_call=1``):
  unsharded, a single mask per kernel lets splash compute the mask in-kernel and shrink the grid
  to the visited kv blocks, so SMEM holds ``q-blocks x max visited kv-blocks`` entries.
  ``bench/splash_metadata.py`` reports the sizes.

Kernels (mask metadata on the host, numpy) are built once per (spec, lengths, block sizes, head
shards, heads per call, interpret mode) and cached (:func:`build_kernels`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spattn_jax.masks import HeadIntervals, MaskSpec

# Logit of the sink key. Far above splash's mask value (-0.7 * float32 max), so a fully masked row
# puts all its weight on the sink; far below any real logit, so exp(SINK_LOGIT - lse) underflows to
# exactly 0.0 on every row that has a key.
SINK_LOGIT = -1e30
LANES = 128  # splash needs kv blocks (and q blocks with segment ids) in multiples of the lane count
TPU_BLOCK = 512  # maxtext's default for every splash block size
INTERPRET_BLOCK = 128  # the smallest block splash takes; keeps interpret-mode grids small
SMEM_CAPACITY = 1024 * 1024  # bytes per TensorCore, TPU v4 / v5e / v5p / v6e / v7
# Leave room for the sink table and the compiler's own scalars.
DEFAULT_SMEM_BUDGET = 3 * SMEM_CAPACITY // 4


# -- masks -----------------------------------------------------------------------------------------


EMPTY, PARTIAL, FULL = 0, 1, 2  # splash's block_mask values


def block_kind(intervals: HeadIntervals, d0: int, rows: int, cols: int) -> int:
    """:data:`EMPTY`, :data:`PARTIAL` or :data:`FULL`: how much of a ``rows x cols`` block whose
    top-left entry has distance ``d0`` the intervals allow. The block holds every distance in
    ``[d0 - cols + 1, d0 + rows - 1]``, so counting the overlap decides it."""
    lo_d, hi_d = d0 - cols + 1, d0 + rows  # half-open
    covered = sum(max(0, min(hi, hi_d) - max(lo, lo_d)) for lo, hi in intervals)
    return EMPTY if covered == 0 else FULL if covered == hi_d - lo_d else PARTIAL


@functools.lru_cache(maxsize=64)
def _constant_block(value: bool, rows: int, cols: int) -> np.ndarray:
    block = np.full((rows, cols), value, np.bool_)
    block.flags.writeable = False
    return block


@functools.lru_cache(maxsize=4096)
def _partial_block(intervals: HeadIntervals, d0: int, rows: int, cols: int) -> np.ndarray:
    dist = d0 + np.arange(rows, dtype=np.int64)[:, None] - np.arange(cols, dtype=np.int64)[None, :]
    ok = np.zeros((rows, cols), np.bool_)
    for lo, hi in intervals:
        ok |= (dist >= lo) & (dist < hi)
    ok.flags.writeable = False
    return ok


def distance_block(intervals: HeadIntervals, d0: int, rows: int, cols: int) -> np.ndarray:
    """``bool [rows, cols]``, read-only: entry ``(r, c)`` is allowed iff ``d0 + r - c`` is in an
    interval.

    A band mask is Toeplitz, so a block depends only on ``d0``. Splash's host-side metadata scan
    slices every head x q-block x kv-block; sharing one array for all empty and all full blocks,
    and caching the few distinct partial ones, makes that scan look-ups instead of mask evaluations.
    """
    kind = block_kind(intervals, d0, rows, cols)
    if kind == PARTIAL:
        return _partial_block(intervals, d0, rows, cols)
    return _constant_block(kind == FULL, rows, cols)


class IntervalMask(splash_mask._ComputableMask):
    """Lazy ``[q_len, kv_len]`` splash mask of one head, from its distance intervals.

    Query row ``r`` sits at position ``r + offset`` (queries are the last ``q_len`` of the keys, so
    ``offset = Tk - Tq``); it may attend key ``c`` iff ``lo <= r + offset - c < hi`` for one
    ``(lo, hi)`` of ``intervals``. ``mask_function`` uses only elementwise ops, so splash can also
    evaluate it inside the kernel when a kernel has a single mask.
    """

    def __init__(self, shape: tuple[int, int], intervals: HeadIntervals, offset: int = 0):
        self.intervals = tuple((int(lo), int(hi)) for lo, hi in intervals)
        self.offset = int(offset)

        def mask_function(q_ids, kv_ids):
            dist = q_ids + self.offset - kv_ids if self.offset else q_ids - kv_ids
            ok = dist != dist  # all False, as numpy or jax, whatever the caller passes
            for lo, hi in self.intervals:
                ok = ok | ((dist >= lo) & (dist < hi))
            return ok

        super().__init__(shape=shape, mask_function=mask_function)

    def __getitem__(self, idx) -> np.ndarray:
        if len(idx) != 2 or not all(isinstance(s, slice) and s.step in (None, 1) for s in idx):
            raise NotImplementedError(f"IntervalMask takes two unit-step slices, got {idx}")
        (q0, q1, _), (k0, k1, _) = (s.indices(n) for s, n in zip(idx, self.shape))
        return distance_block(self.intervals, q0 + self.offset - k0, q1 - q0, k1 - k0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IntervalMask):
            return NotImplemented
        return (self.shape, self.intervals, self.offset) == (other.shape, other.intervals, other.offset)

    def __hash__(self) -> int:
        return hash((IntervalMask, self.shape, self.intervals, self.offset))

    def __repr__(self) -> str:
        return f"IntervalMask(shape={self.shape}, intervals={self.intervals}, offset={self.offset})"


def head_masks(spec: MaskSpec, q_len: int, kv_len: int, q_pad: int, kv_pad: int) -> tuple[IntervalMask, ...]:
    """One :class:`IntervalMask` of shape ``[q_pad, kv_pad]`` per head, for ``q_len`` real queries
    (the last of ``kv_len`` real keys). Bands are laid out by ``spec`` for the real ``kv_len``."""
    return tuple(
        IntervalMask((q_pad, kv_pad), ivs, offset=kv_len - q_len) for ivs in spec.intervals(kv_len)
    )


# -- block sizes and padding -----------------------------------------------------------------------

_Q_FIELDS = ("block_q", "block_q_dkv", "block_q_dq")
_KV_FIELDS = ("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_sizes_for(
    block_sizes: int | splash.BlockSizes | None, q_len: int, kv_len: int, interpret: bool
) -> splash.BlockSizes:
    """Splash block sizes for these lengths: multiples of 128, none longer than the padded length.

    ``block_sizes``: one int for every block, a splash ``BlockSizes``, or ``None`` for
    :data:`TPU_BLOCK` (:data:`INTERPRET_BLOCK` in interpret mode, where every grid step is slow).
    """
    if block_sizes is None:
        block_sizes = INTERPRET_BLOCK if interpret else TPU_BLOCK
    if isinstance(block_sizes, int):
        block_sizes = splash.BlockSizes(*(block_sizes,) * 8)
    if not block_sizes.has_backward_blocks:
        raise ValueError("splash block_sizes need the backward blocks (block_q_dkv, block_kv_dkv, ...)")
    sizes = {}
    for names, length in ((_Q_FIELDS, q_len), (_KV_FIELDS, kv_len)):
        for name in names:
            b = getattr(block_sizes, name)
            if b is None:  # block_q_dq / block_kv_dq with the fused backward kernel
                continue
            if b % LANES:
                raise ValueError(f"splash {name}={b} must be a multiple of {LANES}")
            sizes[name] = min(b, _round_up(length, LANES))
    # A kv block must stay a multiple of its compute sub-block.
    sizes["block_kv_compute"] = math.gcd(sizes["block_kv"], sizes["block_kv_compute"])
    sizes["block_kv_dkv_compute"] = math.gcd(sizes["block_kv_dkv"], sizes["block_kv_dkv_compute"])
    fields = {f: getattr(block_sizes, f) for f in ("use_fused_bwd_kernel", "q_layout", "k_layout", "v_layout")}
    return splash.BlockSizes(**sizes, **fields)


def padded_lengths(block_sizes: splash.BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
    """``(q_pad, kv_pad)``: the lengths rounded up to a multiple of every q (kv) block."""
    q_blocks = [getattr(block_sizes, f) for f in _Q_FIELDS if getattr(block_sizes, f)]
    kv_blocks = [getattr(block_sizes, f) for f in _KV_FIELDS if getattr(block_sizes, f)]
    return _round_up(q_len, math.lcm(*q_blocks)), _round_up(kv_len, math.lcm(*kv_blocks))


# -- kernels ---------------------------------------------------------------------------------------


def call_heads(num_heads: int, head_shards: int, heads_per_call: int) -> tuple[tuple[int, ...], ...]:
    """Global head ids of each kernel call, in the order of its ``MultiHeadMask``.

    Under ``head_shards`` shards each device holds ``H / head_shards`` consecutive heads; call ``c``
    runs local heads ``[c g, (c + 1) g)`` of every shard, so its mask lists those heads shard by
    shard, which is how splash splits a ``MultiHeadMask`` over ``head_shards``.
    """
    local = num_heads // head_shards
    return tuple(
        tuple(s * local + c * heads_per_call + i for s in range(head_shards) for i in range(heads_per_call))
        for c in range(local // heads_per_call)
    )


def smem_bytes(kernel: splash.SplashAttentionKernel, head_shards: int = 1) -> int:
    """Scalar memory one device needs for the largest of the kernel's pallas calls (fwd, dq, dkv).

    Each call prefetches its ``data_next``, ``block_mask`` and ``mask_next`` into SMEM; their first
    axis (heads or head shards) is split over ``head_shards``.
    """
    per_call = []
    for info in (kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info):
        if info is None:
            continue
        arrays = [a for a in (info.data_next, info.block_mask, info.mask_next) if a is not None]
        per_call.append(sum(a.size * a.dtype.itemsize for a in arrays) // head_shards)
    return max(per_call, default=0)


def mask_info_bytes(kernel: splash.SplashAttentionKernel) -> dict[str, dict[str, int]]:
    """Bytes of every ``MaskInfo`` array of the kernel, by pass (fwd, dq, dkv) and field."""
    out = {}
    for name in ("fwd", "dq", "dkv"):
        info = getattr(kernel, f"{name}_mask_info")
        if info is None:
            continue
        out[name] = {
            field: int(arr.size * arr.dtype.itemsize)
            for field, arr in info._asdict().items()
            if hasattr(arr, "dtype")
        }
    return out


def _kernel_for(masks: Sequence[IntervalMask], block_sizes, head_shards: int, interpret):
    with jax.ensure_compile_time_eval():  # metadata arrays must be constants, never tracers
        return splash.make_splash_mha(
            splash_mask.MultiHeadMask(tuple(masks)),
            block_sizes=block_sizes,
            head_shards=head_shards,
            q_seq_shards=1,
            interpret=interpret,
        )


def _smem_floor(
    spec: MaskSpec, kv_len: int, pads: tuple[int, int], heads: tuple[int, ...], head_shards: int, block_sizes
) -> int:
    """A lower bound of :func:`smem_bytes` for one call, cheap enough to skip hopeless builds.

    With more than one distinct mask per head shard, splash keeps one metadata row per local head,
    and every entry of its three arrays takes at least one byte.
    """
    ivs = spec.intervals(kv_len)
    per_shard = len(heads) // head_shards
    shards = [heads[s * per_shard : (s + 1) * per_shard] for s in range(head_shards)]
    if max(len({ivs[h] for h in shard}) for shard in shards) == 1:
        return 0
    q_pad, kv_pad = pads
    blocks = (q_pad // block_sizes.block_q) * (kv_pad // block_sizes.block_kv)
    return per_shard * blocks * 3


@functools.lru_cache(maxsize=64)
def build_kernels(
    spec: MaskSpec,
    q_len: int,
    kv_len: int,
    block_sizes: splash.BlockSizes,
    head_shards: int = 1,
    heads_per_call: int | None = None,
    interpret=False,
    smem_budget: int = DEFAULT_SMEM_BUDGET,
) -> tuple[tuple[splash.SplashAttentionKernel, ...], int]:
    """The splash kernels for ``spec`` at these lengths, and the heads each runs per shard.

    Returns ``(kernels, heads_per_call)``: kernel ``c`` runs the local heads
    ``[c g, (c + 1) g)`` of every head shard (:func:`call_heads`). ``heads_per_call=None`` picks
    all local heads in one kernel if its SMEM fits ``smem_budget`` bytes, else one kernel per head.
    Cached: the host-side metadata scan runs once per argument tuple.
    """
    num_heads = spec.num_heads
    if num_heads % head_shards:
        raise ValueError(f"num_heads={num_heads} is not divisible by head_shards={head_shards}")
    local = num_heads // head_shards
    q_pad, kv_pad = padded_lengths(block_sizes, q_len, kv_len)
    masks = head_masks(spec, q_len, kv_len, q_pad, kv_pad)

    def build(g):
        return tuple(
            _kernel_for([masks[h] for h in heads], block_sizes, head_shards, interpret)
            for heads in call_heads(num_heads, head_shards, g)
        )

    if heads_per_call is not None:
        if local % heads_per_call:
            raise ValueError(f"heads_per_call={heads_per_call} must divide the {local} heads per shard")
        g = heads_per_call
    else:
        floor = _smem_floor(
            spec, kv_len, (q_pad, kv_pad), call_heads(num_heads, head_shards, local)[0], head_shards, block_sizes
        )
        g = 1 if local > 1 and floor > smem_budget else local
    kernels = build(g)
    need = max(smem_bytes(kern, head_shards) for kern in kernels)
    if heads_per_call is None and g > 1 and need > smem_budget:
        g, kernels = 1, build(1)
        need = max(smem_bytes(kern, head_shards) for kern in kernels)
    if need > smem_budget and not interpret:
        warnings.warn(
            f"splash metadata for {spec.variant} at Tq={q_len}, Tk={kv_len} needs {need / 1024:.0f} KiB of "
            f"SMEM per call (budget {smem_budget / 1024:.0f} KiB, TPUs have 1024 KiB); use larger blocks "
            f"(block_sizes=1024) or more head shards",
            stacklevel=3,
        )
    return kernels, g


# -- the call --------------------------------------------------------------------------------------


def _resolve_interpret(interpret):
    """``None``: interpret when JAX's default backend is the CPU. ``True`` is Pallas's generic
    interpreter, which runs the kernel exactly as called on a TPU (batch vmapped into the grid, any
    mesh). A ``pltpu.InterpretParams`` selects Pallas's TPU interpreter, which also models SMEM/VMEM,
    scalar prefetch and DMAs and fills uninitialised memory with NaN; it loops over the batch (it
    rejects vmapped grids) and, in JAX 0.10.2, hangs under a multi-device ``shard_map`` on the CPU."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return interpret


def _mesh_axes(mesh, batch_axes: Sequence[str], head_axis: str | None, batch: int, num_heads: int):
    """``(batch spec entry, head axis or None, head shards)`` for ``mesh``; axes it lacks drop out.

    Size-1 axes stay in the specs, so that the output's sharding (a type on Explicit meshes) reads
    like the usual ``P(("data", "fsdp"), None, "tensor", None)`` activation sharding.
    """
    sizes = dict(mesh.shape)
    b_axes = tuple(a for a in batch_axes if a in sizes)
    b_size = math.prod(sizes[a] for a in b_axes)
    if batch % b_size:
        raise ValueError(
            f"batch={batch} is not divisible by the {b_size} devices of mesh axes {b_axes}; "
            f"use a batch that is a multiple of {b_size} or pass batch_axes=()"
        )
    h_axis = head_axis if head_axis in sizes else None
    head_shards = sizes[h_axis] if h_axis else 1
    if num_heads % head_shards:
        raise ValueError(
            f"num_heads={num_heads} is not divisible by mesh axis {h_axis!r} of size {head_shards}; "
            f"pass head_axis=None to replicate heads"
        )
    return (b_axes or None), h_axis, head_shards


def _reshard_for_explicit_mesh(mesh, specs, tree):
    """On a mesh with Explicit axes, shard_map takes inputs only in its in_specs' sharding (an
    Auto mesh reshards by itself), so reshard there; call under ``jax.set_mesh(mesh)``."""
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return tree

    def reshard(spec, x):
        return x if spec is None or x is None else jax.reshard(x, NamedSharding(mesh, spec))

    return jax.tree.map(reshard, specs, tree, is_leaf=lambda s: s is None or isinstance(s, P))


def _run_calls(kernels, q, k, v, q_ids, kv_ids, *, heads_per_call: int, batch_loop: bool):
    """Run the kernels on one device's heads. q: ``[B, H_l, Tq_pad, D]``; k, v:
    ``[B, K_l, Tk_pad, D]``; ids: ``int [B, T_pad]`` or None. Returns ``[B, H_l, Tq_pad, D]``.

    Batch elements go through ``jax.vmap`` (one kernel launch, batch as an extra grid axis), or
    through ``lax.map`` when ``batch_loop``: Pallas's TPU interpreter rejects vmapped grids (it
    zips the grid with the kernel's dimension semantics, one short).
    """
    num_heads, num_kv = q.shape[1], k.shape[1]
    group = num_heads // num_kv
    sinks = jnp.full((heads_per_call,), SINK_LOGIT, jnp.float32)
    outs = []
    for c, kernel in enumerate(kernels):
        h0 = c * heads_per_call
        kv0, kv_n = h0 // group, max(1, heads_per_call // group)

        def one(args, kernel=kernel):
            q, k, v, q_ids, kv_ids = args
            seg = None if q_ids is None else splash.SegmentIds(q=q_ids, kv=kv_ids)
            return kernel(q, k, v, seg, sinks)

        args = (q[:, h0 : h0 + heads_per_call], k[:, kv0 : kv0 + kv_n], v[:, kv0 : kv0 + kv_n], q_ids, kv_ids)
        outs.append(jax.lax.map(one, args) if batch_loop else jax.vmap(one)(args))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_sizes: int | splash.BlockSizes | None = None,
    interpret=None,
    mesh: jax.sharding.Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    head_axis: str | None = "tensor",
    heads_per_call: int | None = None,
    smem_budget: int = DEFAULT_SMEM_BUDGET,
) -> jax.Array:
    """Splash attention under a per-head SPAttention mask.

    Args:
      q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, K, D]`` with ``H % K == 0`` (q head ``h`` reads kv head
        ``h // (H // K)``). Queries are the last ``Tq`` of the ``Tk`` positions.
      mask: the spec, for ``H`` heads.
      q_segment_ids, kv_segment_ids: optional ``int [B, Tq]``, ``int [B, Tk]`` document ids.
      scale: logit scale, default ``D ** -0.5``.
      block_sizes: int (every block) or splash ``BlockSizes``; multiples of 128. Default 512 on
        TPU, 128 in interpret mode. Blocks are clipped to the padded lengths.
      interpret: ``None``, ``True``/``False`` or a ``pltpu.InterpretParams``, see
        :func:`_resolve_interpret`; ``None`` interprets on the CPU.
      mesh: a ``Mesh`` or ``AbstractMesh``: ``shard_map`` the batch over ``batch_axes`` and the heads
        over ``head_axis`` (axes the mesh lacks are ignored). ``None``: no shard_map (one device).
      heads_per_call: local heads per kernel; ``None`` picks by ``smem_budget`` (bytes of SMEM
        metadata per kernel call), see :func:`build_kernels`.

    Returns:
      ``[B, Tq, H, D]`` in ``q.dtype``; empty rows are exactly 0 with zero gradients.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    interpret = _resolve_interpret(interpret)
    scale = head_dim**-0.5 if scale is None else scale
    sizes = block_sizes_for(block_sizes, q_len, kv_len, interpret=interpret is not False)
    q_pad, kv_pad = padded_lengths(sizes, q_len, kv_len)

    if mesh is None:
        b_spec, h_axis, head_shards = None, None, 1
    else:
        b_spec, h_axis, head_shards = _mesh_axes(mesh, batch_axes, head_axis, batch, num_heads)
    group = num_heads // num_kv
    if heads_per_call is not None and heads_per_call % group and group % heads_per_call:
        raise ValueError(
            f"heads_per_call={heads_per_call} must divide, or be a multiple of, the GQA group of "
            f"{group} q heads per kv head"
        )
    kernels, per_call = build_kernels(
        mask, q_len, kv_len, sizes, head_shards, heads_per_call, interpret, smem_budget
    )

    # Splash's layout is [H, T, D] per batch element. Scale q in fp32: splash applies no scale.
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qt = jnp.pad(qs.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, q_pad - q_len), (0, 0)))
    kv_padding = ((0, 0), (0, 0), (0, kv_pad - kv_len), (0, 0))
    kt, vt = (jnp.pad(x.transpose(0, 2, 1, 3), kv_padding) for x in (k, v))
    if head_shards > 1 and num_kv % head_shards:
        # Each head shard needs whole kv heads: repeat them until their count divides the shards.
        reps = math.lcm(num_kv, head_shards) // num_kv
        kt, vt = (jnp.repeat(x, reps, axis=1) for x in (kt, vt))
    q_ids = kv_ids = None
    if q_segment_ids is not None:
        # Any pad value works: padded keys are outside every interval of the real queries.
        q_ids = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, q_pad - q_len)))
        kv_ids = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, kv_pad - kv_len)))

    batch_loop = isinstance(interpret, pltpu.InterpretParams)
    if mesh is None:
        out = _run_calls(kernels, qt, kt, vt, q_ids, kv_ids, heads_per_call=per_call, batch_loop=batch_loop)
    else:
        if batch_loop and math.prod(dict(mesh.shape).values()) > 1:
            raise ValueError("Pallas's TPU interpreter hangs under a multi-device shard_map; use interpret=True")
        # The kernels' mask metadata is an input too: split by head shard like q, replicated over batch.
        kernel_specs = tuple(kern.manual_sharding_spec(NamedSharding(mesh, P(h_axis, None))) for kern in kernels)
        x_spec, id_spec = P(b_spec, h_axis, None, None), P(b_spec, None)
        in_specs = (kernel_specs, x_spec, x_spec, x_spec) + ((P(), P()) if q_ids is None else (id_spec, id_spec))
        args = _reshard_for_explicit_mesh(mesh, in_specs, (kernels, qt, kt, vt, q_ids, kv_ids))
        body = functools.partial(_run_calls, heads_per_call=per_call, batch_loop=batch_loop)
        out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=x_spec, check_vma=False)(*args)
    return out[:, :, :q_len].transpose(0, 2, 1, 3).astype(q.dtype)
