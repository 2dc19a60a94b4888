"""The OLMoE-style decoder with SPAttention masks, in Flax NNX.

Architecture (OLMoE-1B-7B, HF ``OlmoeForCausalLM``): token embedding; per block
``x += Attn(RMSNorm(x))`` and ``x += MoE(RMSNorm(x))`` (or a dense SwiGLU FFN); final RMSNorm; untied
LM head. Attention: q/k/v/o projections without bias; QK-norm is an RMSNorm over the whole flattened
q projection (``H * head_dim``) and k projection (``K * head_dim``), applied before RoPE; RoPE
theta 10,000 in the rotate-half layout; the mask is ``config.mask()``, the same for every layer.

Shapes: ``B`` batch, ``T`` sequence, ``D`` d_model, ``H``/``K`` query/kv heads, ``Dh`` head_dim,
``V`` vocab, ``L`` layers, ``E`` experts.

Precision: parameters live in ``config.param_dtype``; activations and matmuls run in
``config.dtype``; norms, softmaxes, router and logits are fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from spattn_jax import sharding
from spattn_jax.config import ModelConfig
from spattn_jax.layers import Embed, RMSNorm, apply_rope, dtype_of, normal_param, positions_from_segments
from spattn_jax.moe import MoE, DenseFFN


class Attention(nnx.Module):
    """QK-normed multi-head (or grouped-query) attention under the config's SPAttention mask.

    Parameters: ``wq [D, H, Dh]``, ``wk``/``wv [D, K, Dh]``, ``wo [H, Dh, D]``, and the QK-norm
    scales ``q_norm [H Dh]``, ``k_norm [K Dh]``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, kv, dh = config.d_model, config.num_heads, config.resolved_kv_heads, config.resolved_head_dim
        pdt, std = dtype_of(config.param_dtype), config.init_std
        self.wq = normal_param(rngs.params(), (d, h, dh), ("embed", "q_heads", "head_dim"), std=std, dtype=pdt)
        self.wk = normal_param(rngs.params(), (d, kv, dh), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
        self.wv = normal_param(rngs.params(), (d, kv, dh), ("embed", "kv_heads", "head_dim"), std=std, dtype=pdt)
        self.wo = normal_param(rngs.params(), (h, dh, d), ("q_heads", "head_dim", "embed"), std=std, dtype=pdt)
        if config.qk_norm:
            norm = dict(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)
            self.q_norm = RMSNorm(h * dh, **norm)
            self.k_norm = RMSNorm(kv * dh, **norm)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """``x [B, T, D]``, ``positions int [B, T]``, ``segment_ids int [B, T] | None`` -> ``[B, T, D]``."""
        cfg = self.config
        cdt = dtype_of(cfg.dtype)
        x = x.astype(cdt)

        def proj(w):
            return jnp.einsum("btd,dnh->btnh", x, w[...].astype(cdt), preferred_element_type=jnp.float32)

        q, k, v = proj(self.wq), proj(self.wk), proj(self.wv)
        if cfg.qk_norm:
            q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        q = sharding.constrain(apply_rope(q.astype(cdt), positions, cfg.rope_theta), sharding.BATCH_LENGTH_HEADS)
        k = sharding.constrain(apply_rope(k.astype(cdt), positions, cfg.rope_theta), sharding.BATCH_LENGTH_KV_HEADS)
        v = sharding.constrain(v.astype(cdt), sharding.BATCH_LENGTH_KV_HEADS)
        # Under a mesh, heads split over "tensor" and each shard's kernel gets its own heads' bands.
        out = sharding.attention(
            q, k, v, mask=cfg.mask(), segment_ids=segment_ids, implementation=cfg.attention_impl,
            **dict(cfg.attention_options),
        )
        out = sharding.constrain(out, sharding.BATCH_LENGTH_HEADS)
        y = jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(cdt), preferred_element_type=jnp.float32)
        return y.astype(cdt)


class Block(nnx.Module):
    """Pre-norm block: ``x + Attn(norm(x))``, then ``x + FFN(norm(x))`` (MoE or dense SwiGLU)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)
        self.attn_norm = RMSNorm(config.d_model, **norm)
        self.attn = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, **norm)
        self.is_moe = config.moe
        ffn = dict(std=config.init_std, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        if config.moe:
            self.ffn = MoE(
                config.d_model, config.expert_hidden, config.num_experts, config.top_k, gmm_impl=config.moe_impl,
                **ffn,
            )
        else:
            self.ffn = DenseFFN(config.d_model, config.ffn_hidden, **ffn)

    def __call__(self, x, positions, segment_ids) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """``x [B, T, D]`` -> ``(x [B, T, D], router stats or None)``."""
        x = sharding.constrain(x + self.attn(self.attn_norm(x), positions, segment_ids), sharding.BATCH_LENGTH_EMBED)
        if self.is_moe:
            # Padding (segment id 0) stays out of the router statistics and the aux losses.
            real = None if segment_ids is None else segment_ids > 0
            h, stats = self.ffn(self.ffn_norm(x), real)
            return sharding.constrain(x + h, sharding.BATCH_LENGTH_EMBED), stats
        h = self.ffn(self.ffn_norm(x))
        return sharding.constrain(x + h, sharding.BATCH_LENGTH_EMBED), None


class Transformer(nnx.Module):
    """Decoder-only LM. ``Transformer(config, rngs=nnx.Rngs(0))(tokens)`` -> ``(logits, aux)``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(
            config.vocab_size,
            config.d_model,
            std=config.init_std,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(
            config.d_model, eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype
        )
        self.lm_head = normal_param(
            rngs.params(),
            (config.d_model, config.vocab_size),
            ("embed", "vocab"),
            std=config.init_std,
            dtype=dtype_of(config.param_dtype),
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Next-token logits.

        Args:
          tokens: ``int [B, T]``.
          segment_ids: ``int [B, T]`` ids of packed documents (contiguous runs); no attention crosses
            documents, and positions restart per document unless ``positions`` is given.
          positions: ``int [B, T]`` RoPE positions (default ``arange(T)``, or per document).

        Returns:
          ``logits`` float32 ``[B, T, V]`` and ``aux``: ``aux_loss`` (scalar to add to the CE loss,
          weighted and reduced over layers per ``config.aux_loss_reduction``), ``lb_loss`` and
          ``z_loss`` (unweighted sums over layers), ``router_load [L_moe, E]`` and
          ``router_entropy [L_moe]`` with ``L_moe = L`` for MoE models and 0 for dense ones.
        """
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [B, T], got shape {tuple(tokens.shape)}")
        batch, seq_len = tokens.shape
        cfg.check_length(seq_len)
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must equal tokens shape {(batch, seq_len)}")
        if positions is None:
            if segment_ids is None:
                positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
            else:
                positions = positions_from_segments(segment_ids)
        elif positions.shape != tokens.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} must equal tokens shape {(batch, seq_len)}")

        if sharding.current_mesh() is None:
            x = self.embed(tokens)
        else:
            # FSDP gathers a weight where it is used: the lookup reads whole rows, so gather D first.
            # Left D-sharded, XLA turns the batch-sharded gradient of the lookup into D-sharded rows
            # by replicating the whole [B, T, D] cotangent on every device.
            table = sharding.constrain(self.embed.embedding[...], ("vocab", None))
            x = jnp.take(table, tokens, axis=0).astype(dtype_of(cfg.dtype))
        x = sharding.constrain(x, sharding.BATCH_LENGTH_EMBED)
        layer_stats = []
        for block in self.layers:
            x, stats = block(x, positions, segment_ids)
            if stats is not None:
                layer_stats.append(stats)
        h = self.final_norm(x)
        logits = jnp.einsum(
            "btd,dv->btv",
            h,
            self.lm_head[...].astype(h.dtype),
            preferred_element_type=jnp.float32,
        )
        return sharding.constrain(logits, sharding.BATCH_LENGTH_VOCAB), aux_losses(cfg, layer_stats)


def aux_losses(config: ModelConfig, layer_stats: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Combine per-layer router stats into the ``aux`` dict of :meth:`Transformer.__call__`."""
    if not layer_stats:
        zero = jnp.zeros((), jnp.float32)
        return {
            "aux_loss": zero,
            "lb_loss": zero,
            "z_loss": zero,
            "router_load": jnp.zeros((0, 0), jnp.float32),
            "router_entropy": jnp.zeros((0,), jnp.float32),
        }
    lb = jnp.stack([s["lb_loss"] for s in layer_stats])
    z = jnp.stack([s["z_loss"] for s in layer_stats])
    if config.aux_loss_reduction == "olmoe":
        # megablocks (OLMoE branch) averages over layers and divides the z-loss by top_k as well.
        aux = config.lb_loss_weight * jnp.mean(lb) + config.z_loss_weight * jnp.mean(z) / config.top_k
    else:
        aux = jnp.sum(config.lb_loss_weight * lb + config.z_loss_weight * z)
    return {
        "aux_loss": aux,
        "lb_loss": jnp.sum(lb),
        "z_loss": jnp.sum(z),
        "router_load": jnp.stack([s["router_load"] for s in layer_stats]),
        "router_entropy": jnp.stack([s["router_entropy"] for s in layer_stats]),
    }


def abstract_params(config: ModelConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    """``{path: ShapeDtypeStruct}`` of every parameter, built with ``nnx.eval_shape`` (no allocation)."""
    return dict(_param_shapes(config))


@functools.lru_cache(maxsize=32)
def _param_shapes(config: ModelConfig) -> tuple[tuple[tuple, jax.ShapeDtypeStruct], ...]:
    # Tracing a 16-layer, 64-expert constructor takes seconds; configs are hashable, so cache.
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return tuple((path, var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)))
