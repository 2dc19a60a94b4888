"""The optimizer: Optax AdamW with OLMoE's settings, a warm-up + cosine schedule and global-norm clipping.

Gradient accumulation is not here: the train step scans over micro-batches and hands Optax one
token-weighted mean gradient per optimizer step (:mod:`spattn_jax.train_loop`), so the schedule,
the step counter and the logged metrics all count optimizer steps.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters (defaults: OLMoE-1B-7B's release config, spec §8).

    Attributes:
      learning_rate: peak learning rate (OLMoE: 4e-4).
      warmup_steps: linear warm-up from 0 to the peak, in optimizer steps.
      decay_steps: steps of warm-up plus cosine decay; ``None``: the run's total steps.
      final_lr_fraction: the cosine ends at this fraction of the peak (OLMoE ``alpha_f`` 0.1).
      b1, b2, eps: Adam moments and epsilon.
      weight_decay: decoupled (AdamW) decay, multiplied by the learning rate as in Optax and PyTorch.
      decay_norms: also decay 1-D parameters (RMSNorm scales).
      decay_embeddings: also decay the input embedding table.
      clip_norm: global gradient-norm clip; ``None`` or 0 disables it.
    """

    learning_rate: float = 4e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = False
    decay_embeddings: bool = False
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate at optimizer step ``s`` (0-based): linear warm-up, then cosine to ``final_lr_fraction``."""
    decay_steps = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, max(decay_steps - 1, 0))  # short smoke runs still reach the peak
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )


def _is_norm(names: tuple[str, ...], leaf) -> bool:
    return leaf.ndim < 2 or any("norm" in n for n in names)


def _is_embedding(names: tuple[str, ...]) -> bool:
    # The input token table; the untied LM head is a projection and is decayed (as OLMo does).
    return any("embed" in n for n in names)


def decay_mask(params, cfg: OptimConfig):
    """A pytree of bools like ``params``: True where weight decay applies.

    Norm scales (1-D, or under a ``*norm*`` path) and the embedding table (``*embed*`` path) are
    excluded unless ``decay_norms`` / ``decay_embeddings``.
    """

    def decide(path, leaf):
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path)
        if _is_norm(names, leaf) and not cfg.decay_norms:
            return False
        if _is_embedding(names) and not cfg.decay_embeddings:
            return False
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW under the schedule; the decay mask is computed from the params."""
    chain = []
    if cfg.clip_norm:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(
            learning_rate=make_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: decay_mask(params, cfg),
        )
    )
    return optax.chain(*chain)
