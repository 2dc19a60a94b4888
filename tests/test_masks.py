"""The mask spec against brute-force evaluations of the spec's formulas (spec §1-3, §11)."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spattn_jax import masks
from tests import oracles

HEADS = st.sampled_from([1, 2, 3, 4, 5, 8, 16])


@st.composite
def layouts(draw, min_n=1, max_n=300):
    """(num_heads, n, band_len): a sequence of n keys under bands laid out for band_len (or n)."""
    num_heads = draw(HEADS)
    follow = draw(st.booleans())
    if follow:  # authors' mode: bands follow the current length, which must reach num_heads
        n = draw(st.integers(max(min_n, num_heads), max_n))
        return num_heads, n, None
    n = draw(st.integers(min_n, max_n))
    band_len = draw(st.sampled_from([max(n, num_heads), max(n, num_heads) + draw(st.integers(0, 200))]))
    return num_heads, n, band_len


def _edges(layout_len, num_heads):
    return masks.balanced_boundaries(layout_len, num_heads)


@given(layout=layouts(), variant=st.sampled_from(masks.VARIANTS))
def test_dense_equals_brute_force(layout, variant):
    num_heads, n, band_len = layout
    spec = masks.make(variant, num_heads=num_heads, band_len=band_len)
    length = band_len or n
    edges = _edges(length, num_heads) if variant.startswith("balanced") else None
    want = oracles.brute_dense(variant, length, num_heads, n, n, edges=edges)
    np.testing.assert_array_equal(spec.dense(n), want)


@given(layout=layouts(), q_len=st.integers(1, 40), variant=st.sampled_from(masks.VARIANTS))
def test_decoding_rows_are_the_last_rows(layout, q_len, variant):
    num_heads, n, band_len = layout
    q_len = min(q_len, n)
    spec = masks.make(variant, num_heads=num_heads, band_len=band_len)
    np.testing.assert_array_equal(spec.dense(q_len, n), spec.dense(n)[:, n - q_len :])


@given(layout=layouts(min_n=1))
def test_spattention_matches_the_authors_predicate(layout):
    """With band_len=None this is the authors' code; with a fixed band_len it uses that length."""
    num_heads, n, band_len = layout
    spec = masks.make("spattention", num_heads=num_heads, band_len=band_len)
    length = band_len or n
    got = spec.dense(n)
    for h, i, j in itertools.product(range(num_heads), range(n), range(n)):
        if got[h, i, j] != oracles.authors_spattention(length, num_heads, h, i, j):
            pytest.fail(f"head {h} ({i}, {j}) differs from the authors' predicate")


@given(layout=layouts(max_n=200))
def test_exclusive_bands_partition_the_causal_set(layout):
    num_heads, n, band_len = layout
    for variant in ("spattention_exclusive", "balanced_exclusive"):
        dense = masks.make(variant, num_heads=num_heads, band_len=band_len).dense(n)
        causal = np.tril(np.ones((n, n), bool))
        np.testing.assert_array_equal(dense.any(0), causal)  # Eq. 5: the union is causal
        assert dense.sum(0).max() <= 1  # Eq. 8: heads pairwise disjoint


@given(num_heads=st.sampled_from([1, 2, 4, 8, 16]), length=st.integers(16, 4096))
def test_balanced_boundaries_are_the_nearest_pair_count_splits(num_heads, length):
    edges = masks.balanced_boundaries(length, num_heads)
    assert edges[0] == 0 and edges[-1] == length and all(a < b for a, b in zip(edges, edges[1:]))
    pairs_below = np.concatenate([[0], np.cumsum(length - np.arange(length))])  # C(b), b = 0..L
    total = length * (length + 1) / 2
    for h in range(1, num_heads):
        best = np.min(np.abs(pairs_below - h * total / num_heads))
        if length >= 2 * num_heads:  # room enough that no boundary is forced
            assert abs(pairs_below[edges[h]] - h * total / num_heads) == pytest.approx(best)


@given(num_heads=st.sampled_from([2, 4, 8, 16]), length=st.integers(16, 2048))
def test_balanced_pair_counts_differ_by_at_most_two_diagonals(num_heads, length):
    """Within 2 L pairs of each other: less than one row of 128-query tiles (128 L pairs)."""
    counts = masks.make("balanced_exclusive", num_heads=num_heads, band_len=length).pair_counts(length)
    assert counts.sum() == length * (length + 1) // 2
    assert counts.max() - counts.min() <= 2 * length
    plain = masks.make("spattention_exclusive", num_heads=num_heads, band_len=length).pair_counts(length)
    if num_heads >= 4 and length >= 16 * num_heads:  # Eq. 4 bands are far from balanced
        assert plain.max() - plain.min() > 2 * length


@given(layout=layouts(max_n=120), variant=st.sampled_from(masks.VARIANTS))
def test_pair_counts_and_interval_table_agree_with_dense(layout, variant):
    num_heads, n, band_len = layout
    spec = masks.make(variant, num_heads=num_heads, band_len=band_len)
    dense = spec.dense(n)
    np.testing.assert_array_equal(spec.pair_counts(n), dense.sum((1, 2)))
    table = spec.interval_table(n)
    dist = np.arange(n)[:, None] - np.arange(n)[None, :]
    for h in range(num_heads):
        rebuilt = np.zeros((n, n), bool)
        for lo, hi in table[h]:
            rebuilt |= (dist >= lo) & (dist < hi)
        np.testing.assert_array_equal(rebuilt, dense[h])


def test_fixed_band_len_gives_short_sequences_the_training_bands():
    spec = masks.make("spattention", num_heads=16, band_len=1024)
    np.testing.assert_array_equal(spec.dense(100), spec.dense(1024)[:, :100, :100])
    follow = masks.make("spattention", num_heads=16, band_len=None)
    assert not np.array_equal(follow.dense(100), spec.dense(100))  # authors' mode: W = 6 at N = 100


def test_spec_table_numbers():
    """Spec §6 at N = 1024, H = 8: pair density and head imbalance."""
    n, num_heads = 1024, 8
    dense_pairs = num_heads * n * (n + 1) / 2
    expect = {"spattention_exclusive": (0.125, 14.9), "spattention": (0.331, 1.9), "local": (0.236, 1.0),
              "gapped": (0.066, 10.3)}
    for variant, (density, imbalance) in expect.items():
        counts = masks.make(variant, num_heads=num_heads, band_len=n).pair_counts(n)
        assert counts.sum() / dense_pairs == pytest.approx(density, abs=5e-4)
        assert counts.max() / counts.min() == pytest.approx(imbalance, abs=0.051)


def test_empty_rows_only_where_the_spec_allows_them():
    n, num_heads = 256, 8
    for variant in masks.VARIANTS:
        spec = masks.make(variant, num_heads=num_heads, band_len=n)
        empty = ~spec.dense(n).any(-1)
        assert spec.may_have_empty_rows == bool(empty.any()), variant
    eball = masks.make("spattention_exclusive", num_heads=num_heads, band_len=n)
    w = n // num_heads
    assert (~eball.dense(n).any(-1)).sum() == w * num_heads * (num_heads - 1) // 2  # spec §6


def test_spec_is_frozen_and_hashable():
    a = masks.make("spattention", num_heads=8, band_len=512)
    b = masks.make("spattention", num_heads=8, band_len=512)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.num_heads = 4


def test_window_option_widens_the_shared_window():
    spec = masks.make("spattention", num_heads=4, band_len=64, window=3)
    want = oracles.brute_dense("spattention", 64, 4, 64, 64, window=3)
    np.testing.assert_array_equal(spec.dense(64), want)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="dense", num_heads=8, band_len=64), r"unknown mask variant 'dense'; choose one of"),
        (dict(name="spattention", num_heads=8, band_len=4), r"band_len=4 is shorter than num_heads=8"),
        (dict(name="spattention", num_heads=8, band_len=64, widow=3), r"unknown mask option\(s\) widow"),
        (dict(name="spattention_exclusive", num_heads=8, band_len=64, window=3), r"has no shared local window"),
    ],
)
def test_bad_specs_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        masks.make(kwargs.pop("name"), **kwargs)
    assert "\n" not in str(info.value)


def test_sequence_longer_than_band_len_raises():
    spec = masks.make("spattention", num_heads=8, band_len=64)
    with pytest.raises(ValueError, match=r"sequence length 65 exceeds band_len=64: .*raise band_len"):
        spec.dense(65)
    with pytest.raises(ValueError, match=r"shorter than num_heads=8 with band_len=None"):
        masks.make("spattention", num_heads=8, band_len=None).dense(5)


@given(layout=layouts(min_n=16), variant=st.sampled_from(masks.VARIANTS), data=st.data())
def test_select_heads_keeps_each_heads_band(layout, variant, data):
    """A tensor-parallel shard's view: heads [a, b) with the bands they have in the whole mask."""
    num_heads, n, band_len = layout
    spec = masks.make(variant, num_heads=num_heads, band_len=band_len)
    a = data.draw(st.integers(0, num_heads - 1))
    b = data.draw(st.integers(a + 1, num_heads))
    part = spec.select_heads(a, b)
    assert part.num_heads == b - a
    assert part.intervals(n) == spec.intervals(n)[a:b]
    np.testing.assert_array_equal(part.dense(n), spec.dense(n)[a:b])
    np.testing.assert_array_equal(part.interval_table(n, 3), spec.interval_table(n, 3)[a:b])
    if b - a > 1:  # a slice of a slice is the slice of the whole
        assert part.select_heads(1, b - a) == spec.select_heads(a + 1, b)


def test_select_heads_checks_its_range():
    spec = masks.make("spattention", num_heads=4, band_len=64)
    assert hash(spec.select_heads(0, 2)) == hash(spec.select_heads(0, 2))
    for start, stop in ((2, 2), (-1, 2), (0, 5)):
        with pytest.raises(ValueError, match=r"select_heads\(.*\) needs 0 <= start < stop <= num_heads=4"):
            spec.select_heads(start, stop)
