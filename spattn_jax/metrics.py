"""Training metrics: FLOPs under the mask, MFU, and the JSONL + TensorBoard writer.

**FLOPs per trained token** (:func:`flops_per_token`), the convention of PaLM (Chowdhery et al., 2022,
App. B) with attention counted under the mask instead of dense:

* matmuls: ``6 * N`` with ``N`` the active parameters a token multiplies by (every non-embedding
  parameter, the LM head included, with MoE layers counting only the ``top_k`` experts a token
  uses, and the router): 2 FLOPs per multiply-add forward, twice that backward (input and weight
  gradients).
* attention scores and values: for head ``h`` of a length-``T`` sequence the mask allows
  ``pairs_h = mask.pair_counts(T)[h]`` (query, key) pairs; ``q.k`` and ``p.v`` cost
  ``2 * head_dim`` FLOPs each per pair, so the forward costs ``4 * head_dim * sum_h pairs_h`` per
  sequence per layer and training three times that. Per token:
  ``12 * L * head_dim * sum_h pairs_h / T``. For dense causal attention ``sum_h pairs_h = H T (T+1)/2``,
  giving ``6 L H head_dim (T + 1)``, half of PaLM's non-causal ``12 L H head_dim T``.

Packed rows are counted as full rows under the mask (segment boundaries remove more pairs; a kernel
that skipped them would do less work than counted). Softmax, norms and the router's top-k are not
counted. ``MFU = tokens/s * FLOPs per token / (devices * peak FLOP/s per device)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "tpu7x": 2307e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of a device from its ``device_kind`` string, or ``None`` if unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
        if name in kind:
            return PEAK_FLOPS[name]
    return None


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token, split as in the module docstring."""

    matmul: float
    attention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def attention_flops_per_token(mask, seq_len: int, num_layers: int, head_dim: int) -> float:
    """``12 * L * head_dim * sum_h pairs_h / T``: attention training FLOPs per token under ``mask``."""
    pairs = float(np.sum(mask.pair_counts(seq_len)))
    return 12.0 * num_layers * head_dim * pairs / seq_len


def flops_per_token(model_config, seq_len: int) -> FlopCount:
    """Training FLOPs per token of ``model_config`` (a :class:`spattn_jax.config.ModelConfig`) at ``seq_len``."""
    from spattn_jax.config import param_counts

    _, active = param_counts(model_config)
    # The embedding table is a lookup, not a matmul; the untied LM head is a matmul and stays in.
    matmul_params = active - model_config.vocab_size * model_config.d_model
    attn = attention_flops_per_token(
        model_config.mask(), seq_len, model_config.num_layers, model_config.resolved_head_dim
    )
    return FlopCount(matmul=6.0 * matmul_params, attention=attn)


def mfu(tokens_per_second: float, flops_per_token_: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or ``None`` without a known peak."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token_ / (num_devices * peak)


def perplexity(loss_nats: float) -> float:
    """``exp(loss)``, ``inf`` instead of an overflow."""
    return math.exp(loss_nats) if loss_nats < 700 else math.inf


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy/jax scalars to floats, arrays to nested lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim == 0:
        item = arr.item()
        return item if isinstance(item, (int, bool)) else float(item)
    return arr.tolist()


class MetricsWriter:
    """Writes one step's metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard (``<run_dir>/tensorboard``).

    Scalars are written as they are. Per-layer router statistics (``router_load [L, E]``,
    ``router_entropy [L]``) go to JSONL as lists and to TensorBoard as one scalar per layer
    (``router/entropy/layer_l``, ``router/max_load/layer_l`` = largest expert share times ``E``, 1 when
    balanced) and a histogram of expert shares per layer.
    """

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        # Append: a resumed run continues the same file; readers keep the last line of a step.
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        plain = _plain(metrics)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **plain}) + "\n")
        for name, value in plain.items():
            if name == "router_load":
                load = np.asarray(value)
                for layer, row in enumerate(load):
                    self._tb.add_scalar(f"router/max_load/layer_{layer}", float(row.max() * len(row)), step)
                    self._tb.add_histogram(f"router/load/layer_{layer}", row, step)
            elif name == "router_entropy":
                for layer, ent in enumerate(np.atleast_1d(value)):
                    self._tb.add_scalar(f"router/entropy/layer_{layer}", float(ent), step)
            elif isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_jsonl(path: str, split: str | None = None) -> dict[int, dict]:
    """``{step: record}`` of a metrics file, the last record of each step winning (resumed runs)."""
    out: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if split is None or rec.get("split") == split:
                out[rec["step"]] = rec
    return out
