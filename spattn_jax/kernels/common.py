"""Array plumbing shared by the GPU kernels' wrappers (padding to tiles, GQA gradient sums)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_f32(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
    """Two 2-D tiles contracted over one axis each, fp32 accumulation (tensor-core operands as given).

    ``lax.dot_general`` rather than ``pl.dot``: the one form every Pallas lowering (and interpret
    mode) takes on both JAX 0.10 and 0.11.
    """
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad ``x`` at the end of ``axis`` up to ``size`` with ``value`` (no copy when already there)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def sum_gqa_groups(dx: jax.Array, num_kv: int, dtype) -> jax.Array:
    """``[B, T, H, D]`` per-query-head key/value gradients -> ``[B, T, K, D]`` summed over each group.

    Query heads ``g * (H // K) ... (g + 1) * (H // K) - 1`` share kv head ``g``; the sum is in fp32.
    """
    b, t, h, d = dx.shape
    if h == num_kv:
        return dx.astype(dtype)
    return dx.reshape(b, t, num_kv, h // num_kv, d).astype(jnp.float32).sum(3).astype(dtype)


def pad_inputs(q, k, v, q_segment_ids, kv_segment_ids, *, head_dim: int, q_len: int, kv_len: int):
    """Zero-pad q ``[B, Tq, H, D]`` and k/v ``[B, Tk, K, D]`` to ``head_dim`` and ``q_len``/``kv_len``.

    Padded positions get segment ids no real token has, different for queries (-1) and keys (-2), so
    they never attend to or are attended by anything. Returns ``(q, k, v, q_seg, kv_seg)``.
    """
    qp = pad_axis(pad_axis(q, 3, head_dim), 1, q_len)
    kp = pad_axis(pad_axis(k, 3, head_dim), 1, kv_len)
    vp = pad_axis(pad_axis(v, 3, head_dim), 1, kv_len)
    if q_segment_ids is None:
        return qp, kp, vp, None, None
    q_seg = pad_axis(q_segment_ids.astype(jnp.int32), 1, q_len, value=-1)
    kv_seg = pad_axis(kv_segment_ids.astype(jnp.int32), 1, kv_len, value=-2)
    return qp, kp, vp, q_seg, kv_seg
