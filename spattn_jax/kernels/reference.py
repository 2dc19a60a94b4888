"""The fp32 reference attention: plain jnp, the oracle every kernel is tested against.

It materialises ``[B, H, Tq, Tk]`` scores, so use it for tests and small shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spattn_jax.masks import MaskSpec


def allowed(
    mask: MaskSpec,
    q_len: int,
    kv_len: int,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """``bool [B or 1, H, q_len, kv_len]`` from the spec's intervals and the segment ids.

    Queries are the last ``q_len`` of the ``kv_len`` positions. Segment ids are ``int [B, q_len]`` and
    ``int [B, kv_len]``; tokens attend only within their own segment.
    """
    table = mask.interval_table(kv_len)  # [H, K, 2], static
    dist = (jnp.arange(q_len)[:, None] + (kv_len - q_len)) - jnp.arange(kv_len)[None, :]
    lo = jnp.asarray(table[:, :, 0])[:, :, None, None]
    hi = jnp.asarray(table[:, :, 1])[:, :, None, None]
    ok = jnp.any((dist >= lo) & (dist < hi), axis=1)[None]  # [1, H, Tq, Tk]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, Tq, Tk]
        ok = ok & same[:, None]
    return ok


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Masked softmax attention in fp32.

    Args:
      q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, K, D]`` with ``H % K == 0`` (q head ``h`` reads kv head
        ``h // (H // K)``).
      mask: the spec; queries are the last ``Tq`` of ``Tk`` positions.
      q_segment_ids, kv_segment_ids: optional ``int [B, Tq]``, ``int [B, Tk]``.
      scale: logit scale, default ``D ** -0.5``.
      return_lse: also return the natural-log log-sum-exp ``[B, H, Tq]`` (``-inf`` on empty rows).

    Returns:
      ``[B, Tq, H, D]`` in ``q.dtype`` (and the lse). Empty rows give 0 output and zero gradients.
    """
    _, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    groups = num_heads // num_kv
    scale = head_dim**-0.5 if scale is None else scale
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf = jnp.repeat(kf, groups, axis=2)
    vf = jnp.repeat(vf, groups, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    ok = allowed(mask, q_len, kv_len, q_segment_ids, kv_segment_ids)
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    # An empty row has m = -inf; shifting by 0 keeps exp() finite and its p exactly 0.
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(ok, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=jax.lax.Precision.HIGHEST).astype(q.dtype)
    if not return_lse:
        return out
    denom, m = denom[..., 0], m[..., 0]
    lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)) + m, -jnp.inf)
    return out, lse

