"""MoE: the sorted ragged_dot path against a per-token loop, routing rules and aux-loss values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_jax.config import ModelConfig
from spattn_jax.model import aux_losses
from spattn_jax.moe import (
    DenseFFN,
    MoE,
    expert_swiglu,
    load_balancing_loss,
    route,
    router_entropy,
    router_load,
    router_z_loss,
    sort_assignments,
)


def naive_moe(x, router, w1, w3, w2, top_k):
    """Token by token: softmax router, its top-k experts picked in numpy, each expert's FFN applied.

    Tokens are processed independently (each gathers its own experts' weights); nothing is sorted or
    grouped, so this shares no code path with ``expert_swiglu``. ``x`` and the weights are numpy for
    the selection; the arithmetic is jnp so that it can be differentiated.
    """
    logits = np.asarray(x) @ np.asarray(router)
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]  # softmax is monotone

    def f(x, router, w1, w3, w2):
        probs = jax.nn.softmax(x @ router, axis=-1)  # [N, E]
        y = jnp.zeros_like(x)
        for j in range(top_k):  # the j-th choice of every token
            e = chosen[:, j]
            h = jax.nn.silu(jnp.einsum("nd,ndf->nf", x, w1[e])) * jnp.einsum("nd,ndf->nf", x, w3[e])
            y = y + probs[np.arange(x.shape[0]), e][:, None] * jnp.einsum("nf,nfd->nd", h, w2[e])
        return y

    return f


def check_against_loop(tokens, experts, top_k, seed, gmm_impl="ragged_dot"):
    d, f = 6, 5
    rng = np.random.default_rng(seed)
    router = rng.normal(size=(d, experts)).astype(np.float32)
    w1, w3 = (rng.normal(size=(experts, d, f)).astype(np.float32) * 0.5 for _ in range(2))
    w2 = rng.normal(size=(experts, f, d)).astype(np.float32) * 0.5
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    cot = rng.normal(size=(tokens, d)).astype(np.float32)

    moe = nnx.eval_shape(lambda: MoE(d, f, experts, top_k, gmm_impl=gmm_impl, rngs=nnx.Rngs(0)))
    for name, value in (("router", router), ("w1", w1), ("w3", w3), ("w2", w2)):
        getattr(moe, name).set_value(jnp.asarray(value))
    graphdef, state = nnx.split(moe)

    def ours(state, x):
        y = nnx.merge(graphdef, state)(x[None])[0][0]
        return jnp.sum(y * cot), y

    ref_fn = naive_moe(x, router, w1, w3, w2, top_k)

    def ref(router, w1, w3, w2, x):
        y = ref_fn(x, router, w1, w3, w2)
        return jnp.sum(y * cot), y

    (g_state, g_x), y = jax.jit(jax.grad(ours, argnums=(0, 1), has_aux=True))(state, x)
    g_ref, y_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3, 4), has_aux=True))(router, w1, w3, w2, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    ours_grads = (g_state["router"][...], g_state["w1"][...], g_state["w3"][...], g_state["w2"][...], g_x)
    for name, a, b in zip(("router", "w1", "w3", "w2", "x"), ours_grads, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


# One shape, several routings; two edge shapes (every expert used by every token; a single expert).
@settings(max_examples=min(4, settings.default.max_examples))
@given(seed=st.integers(0, 2**16))
def test_sorted_ragged_dot_equals_per_token_loop_values_and_grads(seed):
    check_against_loop(tokens=8, experts=5, top_k=2, seed=seed)


@pytest.mark.parametrize("tokens, experts, top_k", [(3, 3, 3), (4, 1, 1)])
def test_sorted_ragged_dot_equals_loop_edge_shapes(tokens, experts, top_k):
    check_against_loop(tokens, experts, top_k, seed=0)


@pytest.mark.parametrize("tokens, experts, top_k", [(8, 5, 2), (3, 3, 3)])
def test_pallas_grouped_matmul_moe_equals_per_token_loop(tokens, experts, top_k):
    """The GPU path (Pallas grouped matmul, interpret mode here) against the same per-token loop."""
    check_against_loop(tokens, experts, top_k, seed=1, gmm_impl="pallas_triton")


def test_sort_assignments_groups_by_expert():
    experts = jnp.array([[2, 0], [0, 1], [2, 1]])
    order, token, sizes = sort_assignments(experts, 4)
    np.testing.assert_array_equal(sizes, [2, 2, 2, 0])
    np.testing.assert_array_equal(np.asarray(experts).reshape(-1)[np.asarray(order)], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(token, np.asarray(order) // 2)


def test_expert_swiglu_handles_unused_experts_and_weights():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(5, 4, 2)), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(5, 2, 4)), jnp.float32)
    experts = jnp.array([[4, 4], [0, 4], [4, 0]])  # experts 1-3 get nothing; a repeated pick counts twice
    weights = jnp.array([[0.5, 0.25], [1.0, 0.0], [0.1, 0.2]])

    def ffn(v, e):
        return (jax.nn.silu(v @ w1[e]) * (v @ w3[e])) @ w2[e]

    want = jnp.stack([0.75 * ffn(x[0], 4), ffn(x[1], 0), 0.1 * ffn(x[2], 4) + 0.2 * ffn(x[2], 0)])
    np.testing.assert_allclose(expert_swiglu(x, experts, weights, w1, w3, w2), want, rtol=1e-5, atol=1e-6)


def test_route_is_softmax_top_k_without_renormalisation():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1]]))
    probs, weights, experts = route(logits, 2)
    np.testing.assert_allclose(probs, [[0.5, 0.3, 0.1, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(weights, [[0.5, 0.3]], rtol=1e-6)  # sums to 0.8, not 1
    np.testing.assert_array_equal(experts, [[0, 1]])


def test_aux_losses_on_hand_made_routing():
    # Two tokens, 4 experts, top-2. logits = log(p) + c gives softmax p and logsumexp c.
    p = np.array([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.2, 0.3]])
    c = np.array([1.0, 2.0])
    logits = jnp.asarray(np.log(p) + c[:, None], jnp.float32)
    probs, _, experts = route(logits, 2)
    np.testing.assert_array_equal(experts, [[0, 1], [0, 3]])
    # Assignments: expert 0 twice, 1 once, 3 once, of 4 -> f = [1/2, 1/4, 0, 1/4].
    np.testing.assert_allclose(router_load(experts, 4), [0.5, 0.25, 0.0, 0.25])
    # P = column means of p = [0.45, 0.2, 0.15, 0.2]; lb = 4 (0.5*0.45 + 0.25*0.2 + 0 + 0.25*0.2) = 1.3.
    np.testing.assert_allclose(load_balancing_loss(probs, experts), 1.3, rtol=1e-6)
    # z = mean(c^2) = (1 + 4) / 2.
    np.testing.assert_allclose(router_z_loss(logits), 2.5, rtol=1e-6)
    entropy = -np.mean([sum(v * math.log(v) for v in row) for row in p])
    np.testing.assert_allclose(router_entropy(probs), entropy, rtol=1e-6)
    # Uniform routing gives lb = 1 and entropy log E.
    uniform = jnp.zeros((8, 4))
    u_probs, _, u_experts = route(uniform, 1)
    u_experts = jnp.arange(8)[:, None] % 4  # a perfectly balanced assignment
    np.testing.assert_allclose(load_balancing_loss(u_probs, u_experts), 1.0, rtol=1e-6)
    np.testing.assert_allclose(router_entropy(u_probs), math.log(4), rtol=1e-6)


def test_router_statistics_leave_masked_tokens_out():
    """With a token mask, every statistic equals the same statistic of the unmasked tokens alone."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(10, 6)) * 2, jnp.float32)
    probs, _, experts = route(logits, 2)
    mask = jnp.asarray([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    keep = np.flatnonzero(np.asarray(mask))
    sub_probs, sub_experts, sub_logits = probs[keep], experts[keep], logits[keep]
    np.testing.assert_allclose(router_load(experts, 6, mask), router_load(sub_experts, 6), rtol=1e-6)
    np.testing.assert_allclose(load_balancing_loss(probs, experts, mask), load_balancing_loss(sub_probs, sub_experts), rtol=1e-6)
    np.testing.assert_allclose(router_z_loss(logits, mask), router_z_loss(sub_logits), rtol=1e-6)
    np.testing.assert_allclose(router_entropy(probs, mask), router_entropy(sub_probs), rtol=1e-6)
    # Gradients too: padding's router logits get none from the losses.
    g = jax.grad(lambda lg: load_balancing_loss(jax.nn.softmax(lg), experts, mask) + router_z_loss(lg, mask))(logits)
    np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)
    # All padding: zero, not NaN.
    none = jnp.zeros((10,), bool)
    assert float(load_balancing_loss(probs, experts, none)) == 0.0 and float(router_z_loss(logits, none)) == 0.0


def test_model_aux_losses_ignore_padding_tokens():
    """A packed batch's padding (segment id 0) changes no aux loss: the stats equal those of the same
    rows cut to their real tokens."""
    from spattn_jax.config import get_preset
    from spattn_jax.model import Transformer

    cfg = get_preset("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 48)), jnp.int32)
    seg = jnp.concatenate([jnp.ones((1, 32), jnp.int32), jnp.zeros((1, 16), jnp.int32)], axis=1)
    pos = jnp.arange(48)[None]
    _, aux_padded = model(tokens, positions=pos, segment_ids=seg)
    _, aux_cut = model(tokens[:, :32], positions=pos[:, :32], segment_ids=seg[:, :32])
    for name in ("lb_loss", "z_loss", "router_load", "router_entropy"):
        np.testing.assert_allclose(aux_padded[name], aux_cut[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_lb_gradient_flows_through_probabilities_only():
    logits = jnp.asarray(np.log([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.2, 0.3]]), jnp.float32)
    experts = jnp.array([[0, 1], [0, 3]])
    grad = jax.grad(lambda lg: load_balancing_loss(jax.nn.softmax(lg), experts))(logits)
    # d lb / d P_e = E f_e = [2, 1, 0, 1]; d P_e / d p_{t,e} = 1/2; then through the softmax.
    p = np.asarray(jax.nn.softmax(logits))
    g_p = np.array([2.0, 1.0, 0.0, 1.0]) / 2
    want = p * (g_p - np.sum(p * g_p, axis=-1, keepdims=True))
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["sum", "olmoe"])
def test_aux_losses_combine_layers(reduction):
    cfg = ModelConfig(
        vocab_size=8, d_model=8, num_layers=2, num_heads=2, max_seq_len=8, num_experts=4, top_k=2,
        expert_hidden=4, aux_loss_reduction=reduction,
    )
    stats = [
        {"lb_loss": jnp.float32(1.3), "z_loss": jnp.float32(2.5), "router_load": jnp.ones(4) / 4,
         "router_entropy": jnp.float32(1.0)},
        {"lb_loss": jnp.float32(1.1), "z_loss": jnp.float32(0.5), "router_load": jnp.ones(4) / 4,
         "router_entropy": jnp.float32(0.5)},
    ]
    aux = aux_losses(cfg, stats)
    np.testing.assert_allclose(aux["lb_loss"], 2.4, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], 3.0, rtol=1e-6)
    if reduction == "sum":
        want = 0.01 * 2.4 + 0.001 * 3.0
    else:  # megablocks OLMoE: mean over layers, z also divided by top_k
        want = 0.01 * 1.2 + 0.001 * 1.5 / 2
    np.testing.assert_allclose(aux["aux_loss"], want, rtol=1e-6)
    assert aux["router_load"].shape == (2, 4) and aux["router_entropy"].shape == (2,)


def test_moe_module_stats_and_bf16():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    apply = nnx.jit(lambda m, x: m(x))
    moe = MoE(8, 4, 4, 2, dtype="bfloat16", rngs=nnx.Rngs(0))
    y, stats = apply(moe, x)
    assert y.shape == (2, 3, 8) and y.dtype == jnp.bfloat16
    assert moe.w1[...].dtype == jnp.float32
    np.testing.assert_allclose(jnp.sum(stats["router_load"]), 1.0, rtol=1e-6)
    assert stats["lb_loss"].dtype == jnp.float32 and stats["z_loss"].dtype == jnp.float32
    y32, _ = apply(MoE(8, 4, 4, 2, rngs=nnx.Rngs(0)), x)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=5e-2, atol=5e-3)


def test_dense_ffn_matches_formula():
    ffn = DenseFFN(6, 5, std=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))
    w1, w3, w2 = ffn.w1[...], ffn.w3[...], ffn.w2[...]
    want = (jax.nn.silu(x @ w1) * (x @ w3)) @ w2
    np.testing.assert_allclose(ffn(x), want, rtol=1e-5, atol=1e-6)
    assert ffn.w1.get_metadata()["out_sharding"] == ("embed", "mlp")
