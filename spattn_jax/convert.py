"""Import HF transformers ``OlmoeForCausalLM`` weights into :class:`spattn_jax.model.Transformer`.

Nothing is downloaded: callers pass a local HF model, its ``state_dict()``, or a dict of arrays read
from local safetensors files. torch/transformers are imported only inside these functions (they are
test extras, not runtime dependencies).

Two HF expert layouts are accepted:

* transformers >= 5 modules: ``model.layers.{i}.mlp.experts.gate_up_proj [E, 2F, D]`` (gate rows
  first, then up) and ``...experts.down_proj [E, D, F]``;
* released checkpoints / transformers 4: per-expert ``...mlp.experts.{e}.gate_proj.weight [F, D]``,
  ``up_proj.weight [F, D]``, ``down_proj.weight [D, F]``.

Weight mapping (HF ``nn.Linear`` stores ``[out, in]``; ours are ``[in, ...]``)::

    model.embed_tokens.weight [V, D]                  -> embed.embedding [V, D]
    layers.{i}.input_layernorm.weight [D]             -> layers.{i}.attn_norm.scale
    layers.{i}.self_attn.q_proj.weight [H Dh, D]      -> layers.{i}.attn.wq [D, H, Dh]  (transpose, split heads)
    layers.{i}.self_attn.k_proj / v_proj [K Dh, D]    -> layers.{i}.attn.wk / wv [D, K, Dh]
    layers.{i}.self_attn.o_proj.weight [D, H Dh]      -> layers.{i}.attn.wo [H, Dh, D]
    layers.{i}.self_attn.q_norm / k_norm.weight       -> layers.{i}.attn.q_norm / k_norm.scale
    layers.{i}.post_attention_layernorm.weight [D]    -> layers.{i}.ffn_norm.scale
    layers.{i}.mlp.gate.weight [E, D]                 -> layers.{i}.ffn.router [D, E]
    experts gate / up                                 -> layers.{i}.ffn.w1 / w3 [E, D, F]
    experts down                                      -> layers.{i}.ffn.w2 [E, F, D]
    model.norm.weight [D]                             -> final_norm.scale
    lm_head.weight [V, D]                             -> lm_head [D, V]

HF splits heads as contiguous ``Dh`` chunks of the projection and uses the same rotate-half RoPE, so
no permutation is needed.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from spattn_jax.config import ModelConfig
from spattn_jax.model import Transformer


def config_from_hf(hf_config: Any, **overrides) -> ModelConfig:
    """A :class:`ModelConfig` equivalent to an HF ``OlmoeConfig``.

    The mask defaults to ``"causal"`` (HF OLMoE is dense attention) and the attention implementation
    to ``"auto"``; ``overrides`` replace any field (e.g. ``mask_variant="spattention"`` to fine-tune a
    pretrained model with band masks). Raises a one-line ValueError for HF options we do not model.
    """
    unsupported = {
        "norm_topk_prob": (getattr(hf_config, "norm_topk_prob", False), False),
        "clip_qkv": (getattr(hf_config, "clip_qkv", None), None),
        "attention_bias": (getattr(hf_config, "attention_bias", False), False),
        "hidden_act": (getattr(hf_config, "hidden_act", "silu"), "silu"),
        "tie_word_embeddings": (getattr(hf_config, "tie_word_embeddings", False), False),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"HF config has {name}={value!r}; only {name}={wanted!r} is supported, set it so")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"HF rope_type={rope['rope_type']!r} is not supported; use the default RoPE")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    fields = dict(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        max_seq_len=hf_config.max_position_embeddings,
        moe=True,
        num_experts=hf_config.num_experts,
        top_k=hf_config.num_experts_per_tok,
        expert_hidden=hf_config.intermediate_size,
        lb_loss_weight=getattr(hf_config, "router_aux_loss_coef", 0.01),
        mask_variant="causal",
        rope_theta=float(theta),
        norm_eps=hf_config.rms_norm_eps,
        qk_norm=True,
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; .float() because numpy has no bfloat16
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _state_dict(source: Any) -> dict[str, np.ndarray]:
    if hasattr(source, "state_dict"):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise ValueError(f"expected an HF model or a state dict, got {type(source).__name__}")
    return {k: _to_numpy(v) for k, v in source.items()}


def hf_to_params(source: Any, config: ModelConfig) -> dict[tuple, np.ndarray]:
    """``{our param path: float32 array}`` from an HF OLMoE model or state dict (either expert layout).

    Paths are those of ``nnx.to_flat_state(nnx.state(Transformer(config), nnx.Param))``.
    """
    sd = _state_dict(source)
    if not config.moe:
        raise ValueError("HF OLMoE checkpoints are MoE; use a config with moe=True")
    d, h, kv, dh = config.d_model, config.num_heads, config.resolved_kv_heads, config.resolved_head_dim
    e, f = config.num_experts, config.expert_hidden

    def take(key: str) -> np.ndarray:
        try:
            return sd.pop(key)
        except KeyError:
            raise ValueError(f"HF weights lack {key!r}; pass an OlmoeForCausalLM (not OlmoeModel) state dict") from None

    def linear(key: str, shape: tuple[int, ...]) -> np.ndarray:
        """An ``nn.Linear`` weight ``[out, in]`` transposed to ``[in, out]`` and split to ``shape``."""
        w = take(key).T
        if w.size != int(np.prod(shape)) or w.shape[0] != shape[0]:
            raise ValueError(
                f"HF {key} has shape {w.T.shape}, which does not fit {shape}; the config's heads/head_dim "
                f"do not match the checkpoint"
            )
        return w.reshape(shape)

    out: dict[tuple, np.ndarray] = {
        ("embed", "embedding"): take("model.embed_tokens.weight"),
        ("final_norm", "scale"): take("model.norm.weight"),
        ("lm_head",): take("lm_head.weight").T,
    }
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        lay = ("layers", i)
        out[lay + ("attn_norm", "scale")] = take(pre + "input_layernorm.weight")
        out[lay + ("ffn_norm", "scale")] = take(pre + "post_attention_layernorm.weight")
        out[lay + ("attn", "wq")] = linear(pre + "self_attn.q_proj.weight", (d, h, dh))
        out[lay + ("attn", "wk")] = linear(pre + "self_attn.k_proj.weight", (d, kv, dh))
        out[lay + ("attn", "wv")] = linear(pre + "self_attn.v_proj.weight", (d, kv, dh))
        out[lay + ("attn", "wo")] = linear(pre + "self_attn.o_proj.weight", (h * dh, d)).reshape(h, dh, d)
        if config.qk_norm:
            out[lay + ("attn", "q_norm", "scale")] = take(pre + "self_attn.q_norm.weight")
            out[lay + ("attn", "k_norm", "scale")] = take(pre + "self_attn.k_norm.weight")
        out[lay + ("ffn", "router")] = take(pre + "mlp.gate.weight").T
        fused = pre + "mlp.experts.gate_up_proj"
        if fused in sd:
            gate_up = take(fused)  # [E, 2F, D]
            if gate_up.shape[:2] != (e, 2 * f):
                raise ValueError(
                    f"HF {fused} has shape {gate_up.shape}, expected [E={e}, 2F={2 * f}, D]; "
                    f"config num_experts/expert_hidden do not match the checkpoint"
                )
            gate, up = gate_up[:, :f], gate_up[:, f:]
            down = take(pre + "mlp.experts.down_proj")  # [E, D, F]
        else:
            ex = pre + "mlp.experts.{}.{}.weight"
            gate = np.stack([take(ex.format(j, "gate_proj")) for j in range(e)])  # [E, F, D]
            up = np.stack([take(ex.format(j, "up_proj")) for j in range(e)])
            down = np.stack([take(ex.format(j, "down_proj")) for j in range(e)])  # [E, D, F]
        out[lay + ("ffn", "w1")] = gate.transpose(0, 2, 1)
        out[lay + ("ffn", "w3")] = up.transpose(0, 2, 1)
        out[lay + ("ffn", "w2")] = down.transpose(0, 2, 1)
    leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unused HF weights, e.g. {leftover[0]!r}; the config does not match the checkpoint")
    return out


def load_hf_weights(model: Transformer, source: Any) -> Transformer:
    """Overwrite every parameter of ``model`` (concrete or from ``nnx.eval_shape``) with HF weights.

    Values are cast to ``config.param_dtype``. Raises a one-line ValueError on a missing parameter
    or a shape mismatch. Returns ``model``.
    """
    import jax.numpy as jnp

    params = hf_to_params(source, model.config)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    missing = set(flat) - set(params)
    if missing:
        raise ValueError(f"no HF weight for parameter {sorted(missing, key=str)[0]}; config and checkpoint differ")
    for path, var in flat.items():
        value = params[path]
        if tuple(var.get_value().shape) != value.shape:
            raise ValueError(
                f"shape mismatch at {'.'.join(map(str, path))}: model {tuple(var.get_value().shape)} vs HF "
                f"{value.shape}; config and checkpoint differ"
            )
        var.set_value(jnp.asarray(value, dtype=jnp.dtype(model.config.param_dtype)))
    return model


def from_hf(hf_model: Any, **overrides) -> Transformer:
    """A :class:`Transformer` holding the weights of a local HF ``OlmoeForCausalLM``.

    The model is built abstractly (``nnx.eval_shape``), so no random init is spent on it.
    ``overrides`` go to :func:`config_from_hf`.
    """
    config = config_from_hf(hf_model.config, **overrides)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return load_hf_weights(model, hf_model)


__all__ = ["config_from_hf", "hf_to_params", "load_hf_weights", "from_hf"]
