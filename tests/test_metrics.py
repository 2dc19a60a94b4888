"""FLOPs under the mask, MFU, and the JSONL/TensorBoard writer."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest

from spattn_jax import masks, metrics
from spattn_jax.config import get_preset, param_counts


def test_causal_attention_flops_match_the_closed_form():
    T, H, L, hd = 128, 4, 3, 16
    causal = masks.make("causal", num_heads=H, band_len=T)
    # Dense causal: sum_h pairs_h = H T (T + 1) / 2, so 12 L hd sum / T = 6 L H hd (T + 1).
    assert metrics.attention_flops_per_token(causal, T, L, hd) == pytest.approx(6 * L * H * hd * (T + 1))


def test_masked_attention_flops_count_only_allowed_pairs():
    T, H = 256, 4
    counts = {v: metrics.attention_flops_per_token(masks.make(v, num_heads=H, band_len=T), T, 1, 1) for v in masks.VARIANTS}
    # Exclusive bands split one head's causal pairs between the heads: 1/H of dense causal work.
    assert counts["spattention_exclusive"] == pytest.approx(counts["causal"] / H)
    assert counts["balanced_exclusive"] == pytest.approx(counts["causal"] / H)
    assert counts["local"] < counts["spattention"] < counts["causal"]
    assert counts["gapped"] < counts["spattention_exclusive"]
    dense = masks.make("spattention", num_heads=H, band_len=T).dense(T)
    assert counts["spattention"] == pytest.approx(12 * dense.sum() / T)


def test_flops_per_token_of_the_tiny_preset():
    cfg = get_preset("tiny")
    _, active = param_counts(cfg)
    flops = metrics.flops_per_token(cfg, 256)
    assert flops.matmul == 6 * (active - cfg.vocab_size * cfg.d_model)
    pairs = cfg.mask().pair_counts(256).sum()
    assert flops.attention == pytest.approx(12 * cfg.num_layers * cfg.resolved_head_dim * pairs / 256)
    assert flops.total == flops.matmul + flops.attention
    causal = metrics.flops_per_token(dataclasses.replace(cfg, mask_variant="causal"), 256)
    assert causal.matmul == flops.matmul and causal.attention > flops.attention


def test_mfu_and_peaks():
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops("TPU v5 lite") == 197e12
    assert metrics.peak_flops("TPU v5p") == 459e12
    assert metrics.peak_flops("cpu") is None
    assert metrics.mfu(1e5, 1e9, 1, None) is None
    assert metrics.mfu(1e5, 1e9, 2, 1e15) == pytest.approx(0.05)
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e6) == math.inf


def test_writer_writes_jsonl_and_tensorboard(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    load = np.full((2, 4), 0.25)
    writer.write(1, {"loss": np.float32(2.0), "router_load": load, "router_entropy": np.array([1.0, 1.2]), "mfu": None})
    writer.write(1, {"loss": 1.5}, prefix="validation")
    writer.write(2, {"loss": 1.0})
    writer.write(2, {"loss": 0.9})  # a resumed run re-logs a step: the last record wins
    writer.close()
    train = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"), "train")
    assert train[1]["router_load"] == load.tolist() and train[1]["mfu"] is None
    assert train[2]["loss"] == pytest.approx(0.9)
    assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl"), "validation")[1]["loss"] == 1.5
    events = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
