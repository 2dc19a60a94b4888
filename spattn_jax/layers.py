"""Small building blocks: parameter helpers, RMSNorm, RoPE, positions of packed documents, embedding.

Shapes: ``B`` batch, ``T`` sequence, ``N`` heads, ``D`` feature width, ``V`` vocabulary.
Every :class:`nnx.Param` carries logical axis names (``out_sharding``) for a later mesh and rules
table; nothing here knows about meshes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

Axes = tuple[str | None, ...]


def dtype_of(name: str) -> jnp.dtype:
    """``"float32"`` -> ``jnp.float32`` and so on."""
    return jnp.dtype(name)


def _eager_sharding() -> bool | None:
    # Flax shards an annotated Param at creation by default, which needs a mesh. Without one (tests,
    # single device) keep the names as metadata only; under a mesh defer to flax's global setting.
    return None if meta.global_mesh_defined() else False


def normal_param(
    key: jax.Array, shape: Sequence[int], axes: Axes, *, std: float, dtype: jnp.dtype
) -> nnx.Param:
    """A normal(0, std) parameter truncated at 3 std (OLMo ``init_cutoff_factor: 3``)."""
    init = jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=axes, eager_sharding=_eager_sharding())


def ones_param(shape: Sequence[int], axes: Axes, *, dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(tuple(shape), dtype), out_sharding=axes, eager_sharding=_eager_sharding())


# -- RMSNorm -------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, computed in fp32.

    Args:
      x: ``[..., D]`` in any float dtype.
      scale: ``[D]``.
    Returns:
      ``[..., D]`` float32; callers cast to their compute dtype.
    """
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    return xf * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """Affine RMSNorm (no bias), scale initialised to 1. Output is in ``dtype``."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype: str = "float32", param_dtype: str = "float32"):
        self.eps = eps
        self.dtype = dtype
        self.scale = ones_param((features,), ("norm",), dtype=dtype_of(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., features]`` -> ``[..., features]``."""
        return rms_norm(x, self.scale[...], self.eps).astype(dtype_of(self.dtype))


# -- RoPE ----------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """``[head_dim // 2]`` inverse frequencies ``theta^(-2i / head_dim)``."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding in the "rotate half" layout of HF LLaMA/OLMoE.

    Dimension ``i < D/2`` is paired with ``i + D/2`` (not with its neighbour), so converted HF
    checkpoints need no permutation of the q/k projections.

    Args:
      x: ``[B, T, N, D]`` (``D`` even).
      positions: ``int [B, T]`` token positions; packed documents restart at 0.
      theta: RoPE base.
    Returns:
      ``[B, T, N, D]`` in ``x.dtype`` (the rotation itself runs in fp32).
    """
    head_dim = x.shape[-1]
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)  # [B, T, D/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """``int [B, T]`` position of each token within its document.

    Documents are contiguous runs of equal ``segment_ids`` (``int [B, T]``); a position restarts at 0
    wherever the id changes, so two documents with the same id must not be adjacent.
    """
    _, seq_len = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


# -- embedding -----------------------------------------------------------------------------------


class Embed(nnx.Module):
    """Token embedding table ``[V, D]``; lookups come out in ``dtype``."""

    def __init__(
        self, vocab_size: int, features: int, *, std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs
    ):
        self.dtype = dtype
        self.embedding = normal_param(
            rngs.params(), (vocab_size, features), ("vocab", "embed"), std=std, dtype=dtype_of(param_dtype)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``int [B, T]`` -> ``[B, T, D]``."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype_of(self.dtype))
