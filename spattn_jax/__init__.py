"""spattn-jax: SPAttention (arXiv 2511.09596) in JAX and Flax NNX."""

from spattn_jax import masks
from spattn_jax.attention import attention

__all__ = ["attention", "masks"]
__version__ = "0.1.0"
