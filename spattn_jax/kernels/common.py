"""Array plumbing shared by the GPU kernels' wrappers (padding to tiles, GQA gradient sums)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
