"""Independent oracles: written from the spec's formulas, sharing no code with the package."""

from __future__ import annotations

import numpy as np


def eq23_bounds(n: int, num_heads: int, h: int) -> tuple[int, int]:
    """(S_h, W_h) of Eq. 2-3, straight from the paper."""
    base, rem = divmod(n, num_heads)
    return h * base + min(h, rem), base + (1 if h < rem else 0)


def allowed(variant: str, n: int, num_heads: int, h: int, i, j, window=None, edges=None):
    """Spec §11's reference predicate; i and j may be scalars or broadcastable int arrays.

    n is the length the bands are laid out for; edges are the balanced boundaries b_0..b_H.
    """
    s, w = eq23_bounds(n, num_heads, h)
    d = np.asarray(i) - np.asarray(j)
    win = w if window is None else window
    causal = d >= 0
    if variant == "causal":
        return causal
    if variant == "spattention":
        return causal & ((d <= win) | ((s <= d) & (d < s + w)))
    if variant == "spattention_exclusive":
        return causal & (s <= d) & (d < s + w)
    if variant == "gapped":
        return causal & (s <= d) & (d < s + w // 2)
    if variant == "local":
        return causal & (d <= win)
    if variant == "balanced_exclusive":
        return causal & (edges[h] <= d) & (d < edges[h + 1])
    if variant == "balanced":
        return causal & ((d <= win) | ((edges[h] <= d) & (d < edges[h + 1])))
    raise KeyError(variant)


def authors_spattention(n: int, num_heads: int, h: int, i: int, j: int) -> bool:
    """The predicate of the authors' released `SPAttention.py` mask_fn, clause for clause."""
    base_width, extra = n // num_heads, n % num_heads
    head_width = base_width + 1 if h < extra else base_width
    causal = j <= i
    local = (i - j) <= head_width
    start = h * base_width + min(h, extra)
    dist = i - j
    in_global = (dist >= start) and (dist < start + head_width) and (dist > head_width)
    return causal and (local or in_global)


def brute_dense(variant, n_layout, num_heads, q_len, kv_len, window=None, edges=None) -> np.ndarray:
    """bool [H, q_len, kv_len]; queries are the last q_len of kv_len positions."""
    i = np.arange(q_len)[:, None] + (kv_len - q_len)
    j = np.arange(kv_len)[None, :]
    return np.stack([allowed(variant, n_layout, num_heads, h, i, j, window, edges) for h in range(num_heads)])


def numpy_attention(q, k, v, dense_mask, segment_ids=None, scale=None) -> np.ndarray:
    """Naive float64 loop over (batch, head, query) with a given [H, Tq, Tk] bool mask."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_sz, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    groups = num_heads // num_kv
    scale = head_dim**-0.5 if scale is None else scale
    out = np.zeros_like(q)
    for b in range(b_sz):
        for h in range(num_heads):
            kh, vh = k[b, :, h // groups], v[b, :, h // groups]
            for i in range(q_len):
                qi = i + kv_len - q_len
                keys = [
                    j
                    for j in range(kv_len)
                    if dense_mask[h, i, j] and (segment_ids is None or segment_ids[b][qi] == segment_ids[b][j])
                ]
                if not keys:
                    continue  # empty row: output 0
                logits = np.array([q[b, i, h] @ kh[j] for j in keys]) * scale
                w = np.exp(logits - logits.max())
                out[b, i, h] = (w / w.sum()) @ vh[keys]
    return out
