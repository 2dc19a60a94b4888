"""The attention entry point: one signature, several implementations behind it.

``attention(q, k, v, mask=spec)`` takes the ``[B, T, H, D]`` layout of ``jax.nn.dot_product_attention``
and a :class:`~spattn_jax.masks.MaskSpec`. Every implementation computes the same function (the fp32
reference is the oracle) and follows the spec's empty-row policy: zero output, zero gradients, no NaN.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import jax

from spattn_jax.masks import MaskSpec

# name -> "module:function"; imported lazily so that CPU-only machines never import GPU/TPU lowerings.
IMPLEMENTATIONS: dict[str, str] = {
    "reference": "spattn_jax.kernels.reference:attention",
    "pallas_triton": "spattn_jax.kernels.pallas_triton:attention",
    "pallas_mosaic_gpu": "spattn_jax.kernels.pallas_mosaic_gpu:attention",
    "splash": "spattn_jax.kernels.splash:attention",
}

# What "auto" tries, in order, per platform; the first that imports and accepts the inputs wins.
# On Hopper the Mosaic GPU kernel is first (bf16/fp16, head_dim <= 128); fp32 or wider heads fall
# through to the Triton kernel.
_AUTO_ORDER = {
    "gpu_sm90": ("pallas_mosaic_gpu", "pallas_triton", "reference"),
    "gpu": ("pallas_triton", "reference"),
    "tpu": ("splash", "reference"),
    "cpu": ("reference",),
}


@functools.cache
def _load(name: str) -> Callable | None:
    module, fn = IMPLEMENTATIONS[name].split(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        return None


def _accepts(name: str, q, options: dict) -> bool:
    """Whether ``name`` takes ``q`` (and ``options``): the kernel module's ``accepts``, if it has one."""
    if q is None:
        return True
    accepts = getattr(importlib.import_module(IMPLEMENTATIONS[name].split(":")[0]), "accepts", None)
    return accepts is None or accepts(q, **options)


def available(name: str) -> bool:
    """Whether implementation ``name`` imports on this install."""
    return name in IMPLEMENTATIONS and _load(name) is not None


def _platform_key() -> str:
    device = jax.devices()[0]
    if device.platform == "gpu":
        cap = getattr(device, "compute_capability", "0")
        return "gpu_sm90" if float(cap) >= 9.0 else "gpu"
    return device.platform if device.platform in _AUTO_ORDER else "cpu"


def resolve(implementation: str, q: jax.Array | None = None, **kernel_options) -> str:
    """The implementation name ``implementation`` stands for on this machine (and for ``q``, if given)."""
    if implementation == "auto":
        for name in _AUTO_ORDER[_platform_key()]:
            if _load(name) is not None and _accepts(name, q, kernel_options):
                return name
        return "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose 'auto' or one of "
            f"{', '.join(IMPLEMENTATIONS)}"
        )
    if _load(implementation) is None:
        raise ValueError(
            f"attention implementation {implementation!r} is not available on this install; "
            f"use implementation='auto' or 'reference'"
        )
    return implementation


def split_segment_ids(segment_ids, q_len: int, kv_len: int, batch: int):
    """Normalise ``segment_ids`` (``[B, T]`` or a ``(q_ids, kv_ids)`` pair) to ``(q_ids, kv_ids)``."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_ids, kv_ids = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                "one segment_ids array needs q_len == kv_len; pass (q_segment_ids, kv_segment_ids)"
            )
        q_ids = kv_ids = segment_ids
    if q_ids.shape != (batch, q_len) or kv_ids.shape != (batch, kv_len):
        raise ValueError(
            f"segment ids must be [B, Tq]={batch, q_len} and [B, Tk]={batch, kv_len}, "
            f"got {tuple(q_ids.shape)} and {tuple(kv_ids.shape)}"
        )
    return q_ids, kv_ids


def check_shapes(q, k, v, mask: MaskSpec) -> None:
    """One-line ValueErrors for inputs no implementation can take."""
    if not isinstance(mask, MaskSpec):
        raise ValueError(f"mask must be a MaskSpec (spattn_jax.masks.make(...)), got {type(mask).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got ranks {q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    num_heads, num_kv = q.shape[2], k.shape[2]
    if num_heads % num_kv:
        raise ValueError(
            f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv}; pick num_kv_heads "
            f"dividing num_heads"
        )
    if mask.num_heads != num_heads:
        raise ValueError(f"mask is for {mask.num_heads} heads but q has {num_heads}; rebuild the mask")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q_len={q.shape[1]} exceeds kv_len={k.shape[1]}")
    mask.check_length(k.shape[1])


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec,
    segment_ids=None,
    implementation: str = "auto",
    scale: float | None = None,
    **kernel_options,
) -> jax.Array:
    """Multi-head attention under a per-head SPAttention mask.

    Args:
      q: ``[B, Tq, H, D]``.
      k, v: ``[B, Tk, K, D]``; ``H`` a multiple of ``K`` (GQA groups are contiguous q heads).
      mask: a :class:`MaskSpec` for ``H`` heads. Queries are the last ``Tq`` of the ``Tk`` positions.
      segment_ids: ``int [B, T]`` document ids of packed sequences (self-attention), or a
        ``(q_ids [B, Tq], kv_ids [B, Tk])`` pair. No token attends across documents.
      implementation: ``"auto"`` or a key of :data:`IMPLEMENTATIONS`.
      scale: logit scale, default ``D ** -0.5``.
      **kernel_options: implementation-specific settings (block sizes, ``interpret``); kernels run in
        Pallas interpret mode by default when JAX's default backend is the CPU.

    Returns:
      ``[B, Tq, H, D]`` in ``q.dtype``.
    """
    check_shapes(q, k, v, mask)
    q_ids, kv_ids = split_segment_ids(segment_ids, q.shape[1], k.shape[1], q.shape[0])
    fn = _load(resolve(implementation, q, **kernel_options))
    return fn(q, k, v, mask=mask, q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=scale, **kernel_options)
