"""SPAttention mask specs: the single source of truth for which (query, key) pairs each head sees.

A head's mask is a union of half-open *causal distance* intervals ``[lo, hi)``: query ``i`` may attend
key ``j`` iff ``lo <= i - j < hi`` for one of the head's intervals (so ``j <= i`` always). Kernels read
the intervals directly (:meth:`MaskSpec.intervals`, :meth:`MaskSpec.interval_table`); only tests and
plots build an ``N x N`` array (:meth:`MaskSpec.dense`).

Notation (spec §1): ``L`` is the length the bands are laid out for, ``H`` the number of heads,
``W_base = L // H``, ``R = L % H``, ``W_h = W_base + [h < R]`` (Eq. 2), ``S_h = h W_base + min(h, R)``
(Eq. 3). ``L`` is ``band_len`` when set (default: the model's maximum sequence length, so training,
short prompts and decoding see the same bands), or the current key length when ``band_len=None``
(the authors' code, where bands follow the batch's length).

Variants (:data:`VARIANTS`):

* ``causal`` -- dense causal, ``[0, L)``.
* ``spattention`` -- the authors' released default: band ``[S_h, S_h + W_h)`` plus the shared local
  window ``d <= W_h``. No row is ever empty.
* ``spattention_exclusive`` -- Eq. 4 alone (EBALL): ``[S_h, S_h + W_h)``. Heads partition ``[0, L)``.
* ``gapped`` -- GBHALF: ``[S_h, S_h + W_h // 2)``.
* ``local`` -- LocalOnly: ``[0, W_h]``.
* ``balanced_exclusive`` -- new here: bands ``[b_h, b_{h+1})`` that give every head the same number of
  causal pairs instead of the same distance width (:func:`balanced_boundaries`).
* ``balanced`` -- the same bands plus the shared local window ``d <= W_h``.

Empty rows: under ``spattention_exclusive``, ``gapped`` and ``balanced_exclusive`` a query ``i < lo``
of its head sees no key. Policy (spec §7.1, as PyTorch SDPA/FlexAttention): the output row is 0, its
log-sum-exp is ``-inf``, its gradients are 0, and nothing is NaN. Every implementation honours it.

Packed documents: distances are measured within a document. Segments are contiguous runs, so the
in-document distance of two tokens of one document is still ``i - j``; the attention entry point
adds the same-segment condition.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

Interval = tuple[int, int]  # half-open causal distance range [lo, hi)
HeadIntervals = tuple[Interval, ...]

VARIANTS: tuple[str, ...] = (
    "causal",
    "spattention",
    "spattention_exclusive",
    "gapped",
    "local",
    "balanced",
    "balanced_exclusive",
)
DEFAULT_VARIANT = "spattention"

# Variants whose per-head intervals can leave a query row without any key.
_MAY_HAVE_EMPTY_ROWS = frozenset({"spattention_exclusive", "gapped", "balanced_exclusive"})
# Variants that take the shared local window (its width defaults to W_h).
_WINDOWED = frozenset({"spattention", "local", "balanced"})


def band_bounds(length: int, num_heads: int) -> tuple[tuple[int, int], ...]:
    """Per head ``(S_h, W_h)`` of Eq. 2-3 for bands laid out over ``length`` distances."""
    base, rem = divmod(length, num_heads)
    return tuple((h * base + min(h, rem), base + (1 if h < rem else 0)) for h in range(num_heads))


def balanced_boundaries(length: int, num_heads: int) -> tuple[int, ...]:
    """Boundaries ``0 = b_0 < b_1 < ... < b_H = L`` that equalise causal pairs per head.

    Distance ``d`` occurs in ``L - d`` (query, key) pairs of a length-``L`` sequence, so the pairs of
    distances ``[0, b)`` number ``C(b) = b L - b (b - 1) / 2`` and all of them ``P = L (L + 1) / 2``.
    ``b_h`` is the integer nearest the root of ``C(b) = h P / H``, namely
    ``b = ((2L + 1) - sqrt((2L + 1)^2 - 8 h P / H)) / 2``, refined to the integer minimising
    ``|C(b) - h P / H|``. Each boundary is then within ``(L - b_h) / 2`` pairs of its target, so
    per-head pair counts differ by at most ``2 L`` (two distance diagonals), far under one 128-row
    tile row. When ``L`` is close to ``H`` the boundaries are forced strictly increasing, so that every
    head keeps at least one distance.
    """
    if length < num_heads:
        raise ValueError(f"balanced bands need length >= num_heads, got {length} < {num_heads}")
    total = length * (length + 1) / 2

    def pairs_below(b: int) -> float:
        return b * length - b * (b - 1) / 2

    bounds = [0]
    for h in range(1, num_heads):
        target = h * total / num_heads
        disc = max((2 * length + 1) ** 2 - 8 * target, 0.0)
        guess = int(round(((2 * length + 1) - math.sqrt(disc)) / 2))
        cands = [c for c in (guess - 1, guess, guess + 1) if 0 <= c <= length]
        best = min(cands, key=lambda c: (abs(pairs_below(c) - target), c))
        lo_ok, hi_ok = bounds[-1] + 1, length - (num_heads - h)
        bounds.append(min(max(best, lo_ok), hi_ok))
    bounds.append(length)
    return tuple(bounds)


def normalize(intervals: Sequence[Interval], limit: int) -> HeadIntervals:
    """Clip to ``[0, limit)``, drop empties, sort and merge overlapping or touching intervals."""
    clipped = sorted((max(lo, 0), min(hi, limit)) for lo, hi in intervals)
    out: list[Interval] = []
    for lo, hi in clipped:
        if lo >= hi:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Immutable, hashable description of a multi-head SPAttention mask.

    Attributes:
      variant: one of :data:`VARIANTS`.
      num_heads: query heads ``H``; head ``h`` gets the ``h``-th band (head 0 the nearest).
      band_len: length the bands are laid out for, or ``None`` to follow the current key length.
      window: width of the shared local window (``d <= window``) for ``spattention``, ``local`` and
        ``balanced``; ``None`` means ``W_h`` of Eq. 2.
      head_offset, total_heads: set by :meth:`select_heads` only. A spec of heads
        ``[head_offset, head_offset + num_heads)`` of a ``total_heads``-head mask, whose bands are laid
        out over all ``total_heads`` heads (a tensor-parallel shard's heads keep their own bands).
    """

    variant: str
    num_heads: int
    band_len: int | None
    window: int | None = None
    head_offset: int = 0
    total_heads: int | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(
                f"unknown mask variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {self.num_heads!r}")
        if not 0 <= self.head_offset <= self.layout_heads - self.num_heads:
            raise ValueError(
                f"heads [{self.head_offset}, {self.head_offset + self.num_heads}) are not within "
                f"total_heads={self.layout_heads}; use select_heads(start, stop) with 0 <= start < stop <= H"
            )
        if self.band_len is not None and self.band_len < self.layout_heads:
            raise ValueError(
                f"band_len={self.band_len} is shorter than num_heads={self.layout_heads}: every head needs "
                f"at least one distance; set band_len >= {self.layout_heads} (usually the model's max_seq_len)"
            )
        if self.window is not None:
            if self.variant not in _WINDOWED:
                raise ValueError(
                    f"variant {self.variant!r} has no shared local window; drop window= or use one of "
                    f"{', '.join(sorted(_WINDOWED))}"
                )
            if self.window < 0:
                raise ValueError(f"window must be >= 0, got {self.window}")

    # -- head slices (tensor parallelism) --------------------------------------------------------

    @property
    def layout_heads(self) -> int:
        """``H`` of Eq. 2-3: the heads the bands are laid out over (all heads, also for a slice)."""
        return self.num_heads if self.total_heads is None else self.total_heads

    def select_heads(self, start: int, stop: int) -> "MaskSpec":
        """The spec of heads ``[start, stop)`` of this one, each keeping its own band.

        ``spec.select_heads(a, b).intervals(n) == spec.intervals(n)[a:b]``; a kernel that runs on one
        tensor-parallel shard's heads takes this view.
        """
        if not 0 <= start < stop <= self.num_heads:
            raise ValueError(f"select_heads({start}, {stop}) needs 0 <= start < stop <= num_heads={self.num_heads}")
        return dataclasses.replace(
            self, num_heads=stop - start, head_offset=self.head_offset + start, total_heads=self.layout_heads
        )

    # -- lengths ---------------------------------------------------------------------------------

    def layout_length(self, kv_len: int) -> int:
        """``L``: the length the bands are laid out for when keys span ``kv_len`` positions."""
        self.check_length(kv_len)
        return self.band_len if self.band_len is not None else kv_len

    def check_length(self, kv_len: int) -> None:
        """Raise a one-line ValueError if a sequence of ``kv_len`` keys cannot use this mask."""
        if kv_len < 1:
            raise ValueError(f"sequence length must be >= 1, got {kv_len}")
        if self.band_len is not None and kv_len > self.band_len:
            raise ValueError(
                f"sequence length {kv_len} exceeds band_len={self.band_len}: bands are laid out for "
                f"band_len; raise band_len (the model's max_seq_len) or shorten the sequence"
            )
        if self.band_len is None and kv_len < self.layout_heads and self.variant != "causal":
            raise ValueError(
                f"sequence length {kv_len} is shorter than num_heads={self.layout_heads} with "
                f"band_len=None: bands follow the length; pad to >= {self.layout_heads} or set band_len"
            )

    @property
    def may_have_empty_rows(self) -> bool:
        return self.variant in _MAY_HAVE_EMPTY_ROWS

    # -- intervals -------------------------------------------------------------------------------

    def _raw(self, length: int) -> list[list[Interval]]:
        return self._raw_all_heads(length)[self.head_offset : self.head_offset + self.num_heads]

    def _raw_all_heads(self, length: int) -> list[list[Interval]]:
        h_range = range(self.layout_heads)
        if self.variant == "causal":
            return [[(0, length)] for _ in h_range]
        bounds = band_bounds(length, self.layout_heads)

        def window(h: int) -> Interval:
            w = bounds[h][1] if self.window is None else self.window
            return (0, w + 1)

        if self.variant == "spattention":
            return [[window(h), (s, s + w)] for h, (s, w) in enumerate(bounds)]
        if self.variant == "spattention_exclusive":
            return [[(s, s + w)] for s, w in bounds]
        if self.variant == "gapped":
            return [[(s, s + w // 2)] for s, w in bounds]
        if self.variant == "local":
            return [[window(h)] for h in h_range]
        edges = balanced_boundaries(length, self.layout_heads)
        bands = [[(edges[h], edges[h + 1])] for h in h_range]
        if self.variant == "balanced":
            return [[window(h)] + b for h, b in enumerate(bands)]
        assert self.variant == "balanced_exclusive", self.variant
        return bands

    def intervals(self, kv_len: int) -> tuple[HeadIntervals, ...]:
        """Per head, the sorted disjoint allowed distance intervals within ``[0, kv_len)``."""
        length = self.layout_length(kv_len)
        return tuple(normalize(iv, kv_len) for iv in self._raw(length))

    def max_intervals(self, kv_len: int) -> int:
        return max(1, max(len(iv) for iv in self.intervals(kv_len)))

    def interval_table(self, kv_len: int, num_slots: int | None = None) -> np.ndarray:
        """``int32 [H, num_slots, 2]`` table of ``(lo, hi)``; unused slots are the empty ``(0, 0)``."""
        ivs = self.intervals(kv_len)
        num_slots = num_slots or self.max_intervals(kv_len)
        table = np.zeros((self.num_heads, num_slots, 2), np.int32)
        for h, iv in enumerate(ivs):
            if len(iv) > num_slots:
                raise ValueError(f"head {h} has {len(iv)} intervals, more than num_slots={num_slots}")
            if iv:
                table[h, : len(iv)] = iv
        return table

    # -- dense views (tests and plots only) ------------------------------------------------------

    def dense(self, q_len: int, kv_len: int | None = None) -> np.ndarray:
        """``bool [H, q_len, kv_len]``; queries are the last ``q_len`` of ``kv_len`` positions."""
        kv_len = q_len if kv_len is None else kv_len
        if q_len > kv_len:
            raise ValueError(f"q_len={q_len} exceeds kv_len={kv_len}")
        dist = (np.arange(q_len)[:, None] + (kv_len - q_len)) - np.arange(kv_len)[None, :]
        out = np.zeros((self.num_heads, q_len, kv_len), bool)
        for h, iv in enumerate(self.intervals(kv_len)):
            for lo, hi in iv:
                out[h] |= (dist >= lo) & (dist < hi)
        return out

    def pair_counts(self, length: int) -> np.ndarray:
        """``int64 [H]``: allowed (query, key) pairs of each head over a length-``length`` sequence."""
        counts = np.zeros(self.num_heads, np.int64)
        for h, iv in enumerate(self.intervals(length)):
            for lo, hi in iv:
                # sum_{d=lo}^{hi-1} (length - d)
                counts[h] += (hi - lo) * length - (hi * (hi - 1) - lo * (lo - 1)) // 2
        return counts


def make(
    name: str = DEFAULT_VARIANT,
    *,
    num_heads: int,
    band_len: int | None,
    **options,
) -> MaskSpec:
    """Build a :class:`MaskSpec` by variant name; ``options`` are the spec's remaining fields."""
    allowed = {f.name for f in dataclasses.fields(MaskSpec)} - {
        "variant", "num_heads", "band_len", "head_offset", "total_heads"
    }
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"unknown mask option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}"
        )
    return MaskSpec(variant=name, num_heads=num_heads, band_len=band_len, **options)
