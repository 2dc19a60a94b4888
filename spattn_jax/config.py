"""Static model configuration: one frozen dataclass and the named presets.

A :class:`ModelConfig` is plain data (hashable, no global state); :class:`spattn_jax.model.Transformer`
reads it. Presets are module-level constants collected in :data:`PRESETS`.

Parameter counts (:func:`param_counts`, computed with ``nnx.eval_shape``, nothing allocated). Counting
rule: *total* is every parameter, embeddings and the untied LM head included; *active* is total minus
the ``num_experts - top_k`` experts a token does not use, in every MoE layer (router, attention, norms,
embeddings and head are always active). Non-embedding counts drop the embedding table and LM head.

============================  ===============  ===============  ==============================
preset                        total            active           non-embedding total / active
============================  ===============  ===============  ==============================
``olmoe_1b_7b``               6,919,161,856    1,282,017,280    6,713,116,672 / 1,075,972,096
``olmoe_0p25b_1p75b``         1,781,859,328      372,573,184    1,678,836,736 /   269,550,592
``table2_8l``                   205,816,832      205,816,832      102,794,240 /   102,794,240
``tiny``                            263,744          116,288          230,976 /      83,520
============================  ===============  ===============  ==============================
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spattn_jax import masks
from spattn_jax.attention import IMPLEMENTATIONS
from spattn_jax.kernels.grouped_matmul import IMPLEMENTATIONS as GMM_IMPLEMENTATIONS

_DTYPES = ("float32", "bfloat16", "float16")
_AUX_REDUCTIONS = ("sum", "olmoe")
_ATTENTION_IMPLS = ("auto", *IMPLEMENTATIONS)
_MOE_IMPLS = ("auto", *GMM_IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """An OLMoE-style decoder: pre-norm blocks of QK-normed attention and a SwiGLU MoE (or dense FFN).

    Attributes:
      vocab_size: embedding rows ``V`` (OLMoE: 50,304 rows for a 50,280-token vocabulary).
      d_model: residual width ``D``.
      num_layers: blocks ``L``.
      num_heads: query heads ``H``.
      max_seq_len: longest sequence the model accepts.
      num_kv_heads: key/value heads ``K`` (``None``: ``H``, i.e. MHA as in OLMoE).
      head_dim: per-head width (``None``: ``D // H``).
      moe: SwiGLU mixture of experts in every block if true, else a dense SwiGLU FFN.
      num_experts, top_k, expert_hidden: ``E``, ``k`` and the per-expert SwiGLU hidden ``F``.
      ffn_hidden: dense SwiGLU hidden when ``moe`` is false.
      lb_loss_weight, z_loss_weight: weights of the load-balancing and router z-losses
        (OLMoE: 0.01 and 0.001; see :mod:`spattn_jax.moe`).
      aux_loss_reduction: how per-layer aux losses combine into ``aux["aux_loss"]``. ``"olmoe"``
        (default): the OLMoE training code (megablocks ``olmoe`` branch),
        ``w_lb mean_l lb_l + w_z mean_l z_l / top_k``. ``"sum"``: ``sum_l (w_lb lb_l + w_z z_l)``.
      mask_variant: a :data:`spattn_jax.masks.VARIANTS` name.
      band_len: length the bands are laid out for (``None``: ``max_seq_len``).
      bands_follow_length: lay bands out over the current sequence length instead, as the authors'
        code does (``masks.make(..., band_len=None)``).
      attention_impl: ``"auto"`` or a :data:`spattn_jax.attention.IMPLEMENTATIONS` key.
      moe_impl: grouped matmul of the experts, ``"auto"`` or a
        :data:`spattn_jax.kernels.grouped_matmul.IMPLEMENTATIONS` key (``auto``: the Pallas kernel on
        GPUs, where XLA's ``ragged_dot`` runs densely over all experts; ``ragged_dot`` elsewhere).
      attention_options: ``(name, value)`` pairs passed to the attention kernel, e.g.
        ``(("block_sizes", 512),)`` for splash on TPU (multiples of 128) or
        ``(("block_q", 64), ("block_k", 32))`` for ``pallas_triton``.
      rope_theta, norm_eps: RoPE base and RMSNorm epsilon.
      qk_norm: RMSNorm over the flattened q and k projections (OLMoE), before RoPE.
      init_std: std of the normal init, truncated at 3 std.
      dtype: compute dtype of activations and matmuls; softmax, norms, router and logits stay fp32.
      param_dtype: storage dtype of the parameters.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    max_seq_len: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    moe: bool = True
    num_experts: int = 64
    top_k: int = 8
    expert_hidden: int | None = None
    ffn_hidden: int | None = None
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    aux_loss_reduction: str = "olmoe"
    mask_variant: str = masks.DEFAULT_VARIANT
    band_len: int | None = None
    bands_follow_length: bool = False
    attention_impl: str = "auto"
    attention_options: tuple[tuple[str, Any], ...] = ()
    moe_impl: str = "auto"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model}; pick num_heads "
                f"dividing d_model or set head_dim explicitly"
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim must be a positive int or None, got {self.head_dim!r}")
        kv = self.resolved_kv_heads
        if kv < 1 or self.num_heads % kv:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}; pick num_kv_heads "
                f"dividing num_heads (or None for MHA)"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(
                f"head_dim={self.resolved_head_dim} must be even for RoPE; set an even head_dim "
                f"(or d_model / num_heads)"
            )
        if self.moe:
            if self.num_experts < 1 or self.top_k < 1:
                raise ValueError(
                    f"num_experts={self.num_experts} and top_k={self.top_k} must be >= 1; or set moe=False"
                )
            if self.top_k > self.num_experts:
                raise ValueError(
                    f"top_k={self.top_k} exceeds num_experts={self.num_experts}; set top_k <= num_experts"
                )
            if not self.expert_hidden or self.expert_hidden < 1:
                raise ValueError(f"moe=True needs expert_hidden >= 1, got {self.expert_hidden!r}; set expert_hidden")
        elif not self.ffn_hidden or self.ffn_hidden < 1:
            raise ValueError(f"moe=False needs ffn_hidden >= 1, got {self.ffn_hidden!r}; set ffn_hidden")
        if self.band_len is not None and self.band_len < self.num_heads:
            raise ValueError(
                f"band_len={self.band_len} is shorter than num_heads={self.num_heads}: every head needs "
                f"at least one distance; set band_len >= {self.num_heads} (usually max_seq_len)"
            )
        if self.aux_loss_reduction not in _AUX_REDUCTIONS:
            raise ValueError(
                f"unknown aux_loss_reduction {self.aux_loss_reduction!r}; choose one of {', '.join(_AUX_REDUCTIONS)}"
            )
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; choose one of {', '.join(_ATTENTION_IMPLS)}"
            )
        if self.moe_impl not in _MOE_IMPLS:
            raise ValueError(f"unknown moe_impl {self.moe_impl!r}; choose one of {', '.join(_MOE_IMPLS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(_DTYPES)}")
        self.mask()  # the mask spec validates the variant and band length itself

    # -- derived values (properties, so dataclasses.replace never keeps a stale resolved value) ------

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_band_len(self) -> int | None:
        """The ``band_len`` handed to the mask: ``None`` when bands follow the current length."""
        if self.bands_follow_length:
            return None
        return self.max_seq_len if self.band_len is None else self.band_len

    def mask(self) -> masks.MaskSpec:
        """The attention mask spec every layer uses."""
        return masks.make(self.mask_variant, num_heads=self.num_heads, band_len=self.resolved_band_len)

    def check_length(self, seq_len: int) -> None:
        """One-line ValueError if a ``seq_len``-token sequence cannot go through the model."""
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}; shorten the "
                f"sequence or raise max_seq_len"
            )
        self.mask().check_length(seq_len)


# -- presets -----------------------------------------------------------------------------------------

OLMOE_VOCAB = 50304  # embedding rows of the OLMo/OLMoE tokenizer (50,280 tokens padded to 64)

#: OLMoE-1B-7B (release config ``OLMoE-1B-7B-0924.yml`` / HF ``allenai/OLMoE-1B-7B-0924``).
olmoe_1b_7b = ModelConfig(
    vocab_size=OLMOE_VOCAB,
    d_model=2048,
    num_layers=16,
    num_heads=16,
    head_dim=128,
    max_seq_len=4096,
    moe=True,
    num_experts=64,
    top_k=8,
    expert_hidden=1024,
)

#: "OLMoE 0.25B-1.75B": the paper gives no config (spec §8). Ours is OLMoE-1B-7B at half width:
#: d_model 1024 (16 heads x 64), expert hidden 512, same depth (16), experts (64) and top-k (8).
#: Halving the width quarters every non-embedding matrix, so its non-embedding counts are exactly
#: 1/4 of 1B-7B's (1.68B total, 0.27B active), which is how we read the paper's "0.25B-1.75B"
#: (1B-7B / 4). Counting embeddings and LM head too it is 1.78B total, 0.37B active. 16 heads matches
#: the authors' hard-coded ``N_HEADS = 16``; context 1024 as in the paper.
olmoe_0p25b_1p75b = ModelConfig(
    vocab_size=OLMOE_VOCAB,
    d_model=1024,
    num_layers=16,
    num_heads=16,
    max_seq_len=1024,
    moe=True,
    num_experts=64,
    top_k=8,
    expert_hidden=512,
)

#: The paper's Table 2 model: 8 layers, d_model 1024, 8 heads (x 128), context 1024. Dense or MoE is
#: unstated; we use a dense SwiGLU FFN with hidden 2816 = 8/3 * d rounded up to a multiple of 256
#: (the LLaMA rule), which matches the parameters and FLOPs of a 4d GELU MLP.
table2_8l = ModelConfig(
    vocab_size=OLMOE_VOCAB,
    d_model=1024,
    num_layers=8,
    num_heads=8,
    max_seq_len=1024,
    moe=False,
    ffn_hidden=2816,
)

#: CPU-sized: byte vocabulary, 2 layers, width 64, 4 heads, 8 experts top-2.
tiny = ModelConfig(
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_heads=4,
    max_seq_len=256,
    moe=True,
    num_experts=8,
    top_k=2,
    expert_hidden=64,
)

PRESETS: dict[str, ModelConfig] = {
    "olmoe_1b_7b": olmoe_1b_7b,
    "olmoe_0p25b_1p75b": olmoe_0p25b_1p75b,
    "table2_8l": table2_8l,
    "tiny": tiny,
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; a one-line ValueError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def param_counts(config: ModelConfig, *, include_embeddings: bool = True) -> tuple[int, int]:
    """``(total, active)`` parameter counts of ``config``'s model, from shapes only (nothing allocated).

    Active = total minus, in every MoE layer, the weights of the ``num_experts - top_k`` experts a
    token does not use. ``include_embeddings=False`` drops the embedding table and the LM head.
    """
    from spattn_jax.model import abstract_params  # the model imports this module

    flat = abstract_params(config)
    total = 0
    inactive = 0
    for path, leaf in flat.items():
        size = 1
        for dim in leaf.shape:
            size *= dim
        if not include_embeddings and path[-1] in ("embedding", "lm_head"):
            continue
        total += size
        if config.moe and path[-1] in ("w1", "w2", "w3"):
            inactive += size // config.num_experts * (config.num_experts - config.top_k)
    return total, total - inactive
