"""ModelConfig: validation messages, presets, mask construction and parameter counts."""

import dataclasses

import pytest

from spattn_jax import masks
from spattn_jax.config import PRESETS, ModelConfig, get_preset, param_counts

BASE = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, max_seq_len=32, num_experts=4, top_k=2, expert_hidden=16)


def closed_form(c: ModelConfig, *, include_embeddings: bool = True) -> tuple[int, int]:
    """Parameter count written out by hand (independent of the model code)."""
    d, v, n_layers, h = c.d_model, c.vocab_size, c.num_layers, c.num_heads
    kv = c.num_kv_heads or h
    dh = c.head_dim or d // h
    attention = d * h * dh + 2 * d * kv * dh + h * dh * d  # q, k, v, o
    qk_norm = (h * dh + kv * dh) if c.qk_norm else 0
    block_norms = 2 * d
    if c.moe:
        ffn = d * c.num_experts + 3 * c.num_experts * d * c.expert_hidden  # router + experts
        unused = 3 * (c.num_experts - c.top_k) * d * c.expert_hidden
    else:
        ffn, unused = 3 * d * c.ffn_hidden, 0
    embeddings = 2 * v * d if include_embeddings else 0  # untied input table + LM head
    total = embeddings + d + n_layers * (attention + qk_norm + block_norms + ffn)
    return total, total - n_layers * unused


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_match_closed_form(name):
    cfg = get_preset(name)
    for emb in (True, False):
        assert param_counts(cfg, include_embeddings=emb) == closed_form(cfg, include_embeddings=emb)
    total, active = param_counts(cfg)
    print(f"{name}: total={total:,} active={active:,}")


def test_olmoe_1b_7b_counts_match_the_release():
    # OLMoE paper: 6.9B total, 1.3B active parameters.
    total, active = param_counts(get_preset("olmoe_1b_7b"))
    assert (total, active) == (6_919_161_856, 1_282_017_280)


def test_small_olmoe_is_a_quarter_of_1b_7b_without_embeddings():
    big = param_counts(get_preset("olmoe_1b_7b"), include_embeddings=False)
    small = param_counts(get_preset("olmoe_0p25b_1p75b"), include_embeddings=False)
    # Router and norm vectors are linear in d_model (they halve, not quarter): allow 0.5%.
    assert small[0] == pytest.approx(big[0] / 4, rel=5e-3)
    assert small[1] == pytest.approx(big[1] / 4, rel=5e-3)


def test_preset_fields():
    big = get_preset("olmoe_1b_7b")
    assert (big.num_layers, big.d_model, big.num_heads, big.resolved_head_dim) == (16, 2048, 16, 128)
    assert (big.num_experts, big.top_k, big.expert_hidden, big.vocab_size, big.max_seq_len) == (64, 8, 1024, 50304, 4096)
    assert (big.lb_loss_weight, big.z_loss_weight, big.rope_theta, big.norm_eps) == (0.01, 0.001, 10000.0, 1e-5)
    t2 = get_preset("table2_8l")
    assert (t2.num_layers, t2.d_model, t2.num_heads, t2.max_seq_len, t2.moe) == (8, 1024, 8, 1024, False)
    small = get_preset("olmoe_0p25b_1p75b")
    assert (small.num_heads, small.max_seq_len, small.vocab_size) == (16, 1024, 50304)
    tiny = get_preset("tiny")
    assert (tiny.vocab_size, tiny.num_layers, tiny.num_heads, tiny.num_experts, tiny.top_k) == (256, 2, 4, 8, 2)


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; choose one of .*tiny"):
        get_preset("nope")


def test_mask_uses_max_seq_len_band_len_or_current_length():
    cfg = ModelConfig(**BASE)
    assert cfg.mask() == masks.make("spattention", num_heads=4, band_len=32)
    assert dataclasses.replace(cfg, band_len=16).mask().band_len == 16
    follow = dataclasses.replace(cfg, bands_follow_length=True)
    assert follow.mask() == masks.make("spattention", num_heads=4, band_len=None)
    assert dataclasses.replace(cfg, mask_variant="causal").mask().variant == "causal"


def test_resolved_defaults():
    cfg = ModelConfig(**BASE)
    assert (cfg.resolved_kv_heads, cfg.resolved_head_dim, cfg.resolved_band_len) == (4, 8, 32)
    assert hash(cfg) == hash(ModelConfig(**BASE))  # static: usable as a jit static argument


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mask_variant="bogus"), r"unknown mask variant 'bogus'; choose one of"),
        (dict(num_heads=5), r"num_heads=5 does not divide d_model=32; pick num_heads dividing d_model"),
        (dict(num_kv_heads=3), r"num_heads=4 is not a multiple of num_kv_heads=3; pick num_kv_heads dividing"),
        (dict(top_k=5), r"top_k=5 exceeds num_experts=4; set top_k <= num_experts"),
        (dict(band_len=2), r"band_len=2 is shorter than num_heads=4.*set band_len >= 4"),
        (dict(band_len=2, bands_follow_length=True), r"band_len=2 is shorter than num_heads=4"),
        (dict(moe=False), r"moe=False needs ffn_hidden >= 1.*set ffn_hidden"),
        (dict(expert_hidden=None), r"moe=True needs expert_hidden >= 1"),
        (dict(dtype="float8"), r"unknown dtype 'float8'; choose one of"),
        (dict(attention_impl="flash"), r"unknown attention_impl 'flash'; choose one of"),
        (dict(aux_loss_reduction="avg"), r"unknown aux_loss_reduction 'avg'"),
        (dict(head_dim=7), r"head_dim=7 must be even for RoPE"),
    ],
)
def test_bad_config_one_line_error(change, message):
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig(**{**BASE, **change})
    assert "\n" not in str(info.value)


def test_check_length_messages():
    cfg = ModelConfig(**BASE, band_len=16)
    with pytest.raises(ValueError, match=r"sequence length 40 exceeds max_seq_len=32"):
        cfg.check_length(40)
    with pytest.raises(ValueError, match=r"sequence length 20 exceeds band_len=16"):
        cfg.check_length(20)
    cfg.check_length(16)
