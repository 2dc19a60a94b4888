"""OLMoE mixture of experts: softmax top-k router, dropless SwiGLU experts, aux losses; dense SwiGLU.

Shapes: ``N`` tokens (batch and sequence flattened), ``D`` model width, ``E`` experts, ``k`` top-k,
``F`` per-expert hidden.

Routing (OLMoE / HF ``OlmoeTopKRouter``): ``logits = x W_r`` (no bias), ``p = softmax(logits)`` in
fp32, the ``k`` largest ``p`` pick the experts and are used as combine weights **without
renormalisation** (``norm_topk_prob=False``).

Experts are dropless: each token's ``k`` assignments are sorted by expert and the three SwiGLU
matmuls run as grouped matmuls (:func:`spattn_jax.kernels.grouped_matmul.gmm`: ``ragged_dot``, or a
Pallas kernel on GPUs) over the ``E`` contiguous groups; outputs
are unsorted and summed with the router weights. No token is ever dropped and shapes stay static
(``N k`` rows) under ``jit``.

Aux losses, per layer (source: the OLMoE training stack, ``Muennighoff/megablocks`` branch
``olmoe``, ``megablocks/layers/moe.py: batched_load_balancing_loss``; same lb form as Switch
Transformer eq. 4-6 and HF ``load_balancing_loss_func``; z-loss from ST-MoE, arXiv 2202.08906):

* load balance ``lb = E * sum_e f_e P_e``, with ``f_e = count_e / (N k)`` the fraction of the ``N k``
  assignments that went to expert ``e`` (a count, no gradient) and ``P_e = mean_t p_{t,e}`` the mean
  router probability. It is 1 under perfectly uniform routing.
* router z-loss ``z = mean_t (logsumexp_e logits_{t,e})^2``.

How megablocks combines layers: ``w_lb / L * sum_l lb_l`` and ``w_z / (L k) * sum_l z_l`` (it divides
the z-loss by ``L N k``, top-k included). :class:`spattn_jax.config.ModelConfig` offers that as
``aux_loss_reduction="olmoe"``, the default; ``"sum"`` adds ``w_lb lb_l + w_z z_l`` over layers.
HF's ``load_balancing_loss_func`` differs again (it pools counts and probabilities over layers before
the product and divides counts by ``N``, not ``N k``); it is not used for training here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from spattn_jax import sharding
from spattn_jax.kernels.grouped_matmul import gmm
from spattn_jax.layers import dtype_of, normal_param

# -- routing -------------------------------------------------------------------------------------


def route(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax, then top-k without renormalisation.

    Args:
      logits: ``[N, E]`` router logits (any float dtype; the softmax runs in fp32).
    Returns:
      ``probs [N, E]`` fp32, ``weights [N, k]`` fp32 (the top-k probabilities), ``experts int [N, k]``.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    return probs, weights, experts.astype(jnp.int32)


# Router statistics take an optional ``mask [N]`` of real tokens: padding (segment id 0) neither
# counts as load nor pulls the balance and z losses, as HF's ``load_balancing_loss_func`` does with an
# attention mask. Without a mask every token counts.


def _token_weights(n: int, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``w [N]`` fp32 (1 for counted tokens) and their number (at least 1, so all-padding gives 0)."""
    w = jnp.ones((n,), jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    return w, jnp.maximum(jnp.sum(w), 1.0)


def router_load(experts: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """``f [E]``: fraction of the counted tokens' ``k`` assignments each expert received (sums to 1)."""
    w, count = _token_weights(experts.shape[0], mask)
    weights = jnp.broadcast_to(w[:, None], experts.shape).reshape(-1)
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(weights)
    return counts / (count * experts.shape[1])


def load_balancing_loss(probs: jax.Array, experts: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``E * sum_e f_e P_e`` (scalar, fp32); gradients flow through ``P`` only (``f`` is a count)."""
    num_experts = probs.shape[-1]
    f = jax.lax.stop_gradient(router_load(experts, num_experts, mask))
    w, count = _token_weights(probs.shape[0], mask)
    p_mean = jnp.sum(probs.astype(jnp.float32) * w[:, None], axis=0) / count
    return num_experts * jnp.sum(f * p_mean)


def router_z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``mean_t logsumexp(logits_t)^2`` over counted tokens (scalar, fp32)."""
    w, count = _token_weights(logits.shape[0], mask)
    return jnp.sum(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)) * w) / count


def router_entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over counted tokens of the router distribution's entropy in nats (``log E`` when uniform)."""
    p = probs.astype(jnp.float32)
    w, count = _token_weights(p.shape[0], mask)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.sum(ent * w) / count


# -- dropless expert computation -----------------------------------------------------------------


def sort_assignments(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Order the ``N k`` assignments by expert.

    Args:
      experts: ``int [N, k]``.
    Returns:
      ``order int [N k]`` (flat assignment index in sorted order), ``token int [N k]`` (the token of
      each sorted row), ``group_sizes int [E]`` (rows per expert, in expert order).
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    token = order // experts.shape[1]
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    return order, token, group_sizes


def grouped_swiglu(xs, w1, w3, w2, group_sizes, gmm_impl: str = "auto") -> jax.Array:
    """``xs [M, D]`` grouped by expert (``group_sizes [E]``) -> fp32 ``[M, D]``; rows past the groups: 0."""
    mm = functools.partial(gmm, group_sizes=group_sizes, implementation=gmm_impl)
    h = (jax.nn.silu(mm(xs, w1)) * mm(xs, w3)).astype(xs.dtype)
    return mm(h, w2)


def expert_swiglu(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    gmm_impl: str = "auto",
) -> jax.Array:
    """Dropless top-k SwiGLU experts: ``sum_j weights[t, j] * FFN_{experts[t, j]}(x_t)``.

    Args:
      x: ``[N, D]`` in the compute dtype.
      experts: ``int [N, k]``; weights: ``[N, k]`` combine weights (fp32).
      w1, w3: ``[E, D, F]`` gate and up projections; w2: ``[E, F, D]`` down projection, all in the
        compute dtype. ``FFN_e(x) = (silu(x w1_e) * (x w3_e)) w2_e``.
      gmm_impl: the grouped matmul (:func:`spattn_jax.kernels.grouped_matmul.gmm`).
    Returns:
      ``[N, D]`` in ``x.dtype``.
    """
    num_tokens, top_k = experts.shape
    order, token, group_sizes = sort_assignments(experts, w1.shape[0])
    xs = jnp.take(x, token, axis=0)  # [N k, D], grouped by expert

    ys = grouped_swiglu(xs, w1, w3, w2, group_sizes, gmm_impl)  # [N k, D] fp32, sorted order
    # Undo the sort: sorted row r holds flat assignment order[r].
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)
    y = y.reshape(num_tokens, top_k, -1) * weights.astype(jnp.float32)[..., None]
    return jnp.sum(y, axis=1).astype(x.dtype)


# -- modules -------------------------------------------------------------------------------------


class MoE(nnx.Module):
    """OLMoE sparse MoE block: linear router, softmax top-k, dropless SwiGLU experts.

    Parameters: ``router [D, E]``, ``w1``/``w3 [E, D, F]``, ``w2 [E, F, D]``.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
        gmm_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.top_k = top_k
        self.gmm_impl = gmm_impl
        self.dtype = dtype
        pdt = dtype_of(param_dtype)
        self.router = normal_param(rngs.params(), (d_model, num_experts), ("embed", None), std=std, dtype=pdt)
        self.w1 = normal_param(
            rngs.params(), (num_experts, d_model, hidden), ("exp", "embed", "mlp"), std=std, dtype=pdt
        )
        self.w3 = normal_param(
            rngs.params(), (num_experts, d_model, hidden), ("exp", "embed", "mlp"), std=std, dtype=pdt
        )
        self.w2 = normal_param(
            rngs.params(), (num_experts, hidden, d_model), ("exp", "mlp", "embed"), std=std, dtype=pdt
        )

    def __call__(
        self, x: jax.Array, token_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x [B, T, D]`` -> ``(y [B, T, D], stats)``.

        ``stats``: ``lb_loss``, ``z_loss``, ``router_entropy`` (fp32 scalars) and ``router_load``
        (fp32 ``[E]``), all unweighted, for this layer, over the tokens where ``token_mask [B, T]``
        is true (all tokens without it). Every token is still routed and computed.
        """
        batch, seq_len, d_model = x.shape
        cdt = dtype_of(self.dtype)
        xf = x.reshape(batch * seq_len, d_model)
        # The router runs in fp32 whatever the compute dtype: top-k picks are sensitive to rounding.
        logits = jnp.dot(xf.astype(jnp.float32), self.router[...].astype(jnp.float32))
        probs, weights, experts = route(logits, self.top_k)
        mesh = sharding.current_mesh()
        if mesh is None:
            experts_fn = functools.partial(expert_swiglu, gmm_impl=self.gmm_impl)
        else:  # expert parallelism: tokens travel to their experts' devices (spattn_jax.moe_parallel)
            from spattn_jax import moe_parallel

            experts_fn = functools.partial(moe_parallel.expert_swiglu, mesh=mesh, gmm_impl=self.gmm_impl)
        y = experts_fn(
            xf.astype(cdt),
            experts,
            weights,
            self.w1[...].astype(cdt),
            self.w3[...].astype(cdt),
            self.w2[...].astype(cdt),
        )
        mask = None if token_mask is None else token_mask.reshape(-1)
        stats = {
            "lb_loss": load_balancing_loss(probs, experts, mask),
            "z_loss": router_z_loss(logits, mask),
            "router_load": router_load(experts, probs.shape[-1], mask),
            "router_entropy": router_entropy(probs, mask),
        }
        return y.reshape(batch, seq_len, d_model), stats


class DenseFFN(nnx.Module):
    """Dense SwiGLU FFN ``(silu(x w1) * (x w3)) w2``: ``w1``/``w3 [D, F]``, ``w2 [F, D]``."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        std: float = 0.02,
        dtype: str = "float32",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        pdt = dtype_of(param_dtype)
        self.w1 = normal_param(rngs.params(), (d_model, hidden), ("embed", "mlp"), std=std, dtype=pdt)
        self.w3 = normal_param(rngs.params(), (d_model, hidden), ("embed", "mlp"), std=std, dtype=pdt)
        self.w2 = normal_param(rngs.params(), (hidden, d_model), ("mlp", "embed"), std=std, dtype=pdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D]`` -> ``[B, T, D]`` in the compute dtype."""
        cdt = dtype_of(self.dtype)
        x = x.astype(cdt)
        gate = jnp.dot(x, self.w1[...].astype(cdt), preferred_element_type=jnp.float32)
        up = jnp.dot(x, self.w3[...].astype(cdt), preferred_element_type=jnp.float32)
        h = (jax.nn.silu(gate) * up).astype(cdt)
        return jnp.dot(h, self.w2[...].astype(cdt), preferred_element_type=jnp.float32).astype(cdt)
