"""HF transformers OlmoeForCausalLM -> our Transformer: logits parity and converter checks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from spattn_jax import convert  # noqa: E402
from spattn_jax.model import Transformer  # noqa: E402

VOCAB = 100


def make_hf(num_kv_heads=4, **extra):
    """A tiny random OLMoE with weights spread well beyond the 0.02 init, so that every tensor matters."""
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        norm_topk_prob=False,
        clip_qkv=None,
        pad_token_id=None,
        eos_token_id=None,
        **extra,
    )
    cfg._attn_implementation = "eager"
    model = transformers.OlmoeForCausalLM(cfg).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p))  # decisive routing: no near-ties between experts
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens)), output_router_logits=True)
    return out.logits.numpy(), [r.numpy() for r in out.router_logits]


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_logits_match_hf_olmoe(num_kv_heads):
    hf = make_hf(num_kv_heads)
    assert hf.config._attn_implementation == "eager" and hf.config.norm_topk_prob is False
    ours = convert.from_hf(hf, attention_impl="reference")
    assert ours.config.mask_variant == "causal" and ours.config.resolved_kv_heads == num_kv_heads
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 24)), jnp.int32)
    want, router_logits = hf_logits(hf, tokens)
    got, aux = nnx.jit(lambda m, t: m(t))(ours, tokens)
    assert np.abs(want).max() > 1.0  # a non-trivial comparison
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)

    # Router stats from HF's router logits, recomputed by hand.
    z = sum(np.mean(np.log(np.exp(r).sum(-1)) ** 2) for r in router_logits)
    np.testing.assert_allclose(aux["z_loss"], z, rtol=1e-4)
    lb = 0.0
    for r in router_logits:
        p = np.exp(r - r.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1)[:, :2]
        f = np.bincount(top.reshape(-1), minlength=8) / top.size
        lb += 8 * np.sum(f * p.mean(0))
    np.testing.assert_allclose(aux["lb_loss"], lb, rtol=1e-4)


def test_per_expert_checkpoint_layout_gives_the_same_params():
    hf = make_hf()
    cfg = convert.config_from_hf(hf.config)
    fused = hf.state_dict()
    legacy = {}
    for key, value in fused.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            f = value.shape[1] // 2
            for e in range(value.shape[0]):
                legacy[f"{base}{e}.gate_proj.weight"] = value[e, :f]
                legacy[f"{base}{e}.up_proj.weight"] = value[e, f:]
        elif key.endswith("mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                legacy[f"{base}{e}.down_proj.weight"] = value[e]
        else:
            legacy[key] = value
    a, b = convert.hf_to_params(fused, cfg), convert.hf_to_params(legacy, cfg)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_converted_model_runs_with_spattention_masks():
    hf = make_hf()
    model = convert.from_hf(hf, mask_variant="spattention", attention_impl="reference")
    logits, _ = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((1, 16), jnp.int32))
    assert logits.shape == (1, 16, VOCAB) and np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(norm_topk_prob=True), r"norm_topk_prob=True; only norm_topk_prob=False is supported"),
        (dict(clip_qkv=8.0), r"clip_qkv=8.0; only clip_qkv=None is supported"),
    ],
)
def test_unsupported_hf_options_raise(extra, message):
    cfg = transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_experts=4, num_experts_per_tok=2, pad_token_id=None, eos_token_id=None, **extra,
    )
    with pytest.raises(ValueError, match=message):
        convert.config_from_hf(cfg)


def test_mismatched_config_is_reported():
    hf = make_hf()
    cfg = convert.config_from_hf(hf.config, num_layers=1)
    with pytest.raises(ValueError, match=r"unused HF weights, e\.g\. 'model\.layers\.1\."):
        convert.hf_to_params(hf, cfg)
    narrow = convert.config_from_hf(hf.config, expert_hidden=16)
    with pytest.raises(ValueError, match=r"expected \[E=8, 2F=32, D\]; config num_experts/expert_hidden do not"):
        convert.hf_to_params(hf, narrow)
    wide_heads = convert.config_from_hf(hf.config, head_dim=32)
    model = nnx.eval_shape(lambda: Transformer(wide_heads, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(64, 64\), which does not fit \(64, 4, 32\)"):
        convert.load_hf_weights(model, hf)
    big_vocab = nnx.eval_shape(
        lambda: Transformer(convert.config_from_hf(hf.config, vocab_size=128), rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match=r"shape mismatch at embed\.embedding: model \(128, 64\) vs HF \(100, 64\)"):
        convert.load_hf_weights(big_vocab, hf)
