"""spattn-jax: SPAttention (arXiv 2511.09596) in JAX and Flax NNX.

Entry points: :mod:`spattn_jax.masks` (the mask specs), :func:`spattn_jax.attention.attention`,
:class:`spattn_jax.model.Transformer` with presets in :mod:`spattn_jax.config`.
"""

__version__ = "0.1.0"

from spattn_jax import masks  # noqa: E402  (so that `import spattn_jax; spattn_jax.masks.make(...)` works)

__all__ = ["masks"]
