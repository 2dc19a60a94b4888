"""Attention implementations behind :func:`spattn_jax.attention.attention`."""
