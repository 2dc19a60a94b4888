"""Sharded ops against their single-device selves: expert-parallel MoE, head-sharded attention, and the
CPU stand-in for ``ragged_all_to_all``. ``python -m tests.multidevice.parallel_ops <check>``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from spattn_jax import masks, moe, moe_parallel, sharding
from spattn_jax.attention import attention as attend
from tests.multidevice import main

MOE_MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 8, 1), (1, 1, 4, 2), (1, 1, 2, 4)]
ATTN_MESHES = [(2, 1, 1, 4), (1, 2, 2, 2), (4, 1, 1, 2), (2, 2, 2, 1), (1, 1, 2, 4)]


def _max_errors(got, want) -> list[float]:
    return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(got, want)]


def _on_mesh(shape, fn, *args):
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    with jax.set_mesh(mesh):
        return jax.jit(fn)(*args)


def check_moe(dtype: str = "float32", routing: str = "random", gmm_impl: str = "ragged_dot") -> dict:
    """Values and gradients (x, router weights, w1, w3, w2) of the expert-parallel MoE vs one device.

    The single-device reference always uses ``ragged_dot``; ``gmm_impl`` picks the sharded run's
    grouped matmul (``pallas_triton``: the GPU kernel, interpret mode, on a few meshes).
    """
    n, d, f, e, k = 64, 16, 12, 8, 2
    rng = np.random.default_rng(0)
    cdt = jnp.dtype(dtype)
    x = jnp.asarray(rng.normal(size=(n, d)), cdt)
    logits = rng.normal(size=(n, e))
    if routing == "skewed":  # every token picks experts 0 and 1: one expert shard receives everything
        logits[:, :2] += 100.0
    _, weights, experts = moe.route(jnp.asarray(logits, jnp.float32), k)
    w1, w3 = (jnp.asarray(rng.normal(size=(e, d, f)) * 0.3, cdt) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(e, f, d)) * 0.3, cdt)
    cot = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)

    def loss_and_grads(expert_fn):
        def loss(x, weights, w1, w3, w2):
            return jnp.sum(expert_fn(x, experts, weights, w1, w3, w2).astype(jnp.float32) * cot)

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))

    single = lambda *a: moe.expert_swiglu(*a, gmm_impl="ragged_dot")  # noqa: E731
    want = jax.jit(loss_and_grads(single))(x, weights, w1, w3, w2)
    want = [want[0], *want[1]]
    scale = [float(jnp.max(jnp.abs(w.astype(jnp.float32)))) for w in want]
    out = {"scale": scale}
    for shape in MOE_MESHES if gmm_impl == "ragged_dot" else [(2, 2, 2, 1), (1, 1, 4, 2)]:

        def sharded(x, weights, w1, w3, w2):
            fn = lambda *a: moe_parallel.expert_swiglu(*a, mesh=sharding.current_mesh(), gmm_impl=gmm_impl)  # noqa: E731
            return loss_and_grads(fn)(x, weights, w1, w3, w2)

        got = _on_mesh(shape, sharded, x, weights, w1, w3, w2)
        out[str(shape)] = _max_errors([got[0], *got[1]], want)
    return out


def check_native_lowers() -> dict:
    """The GPU/TPU path (native ragged_all_to_all) traces, differentiates and lowers to StableHLO here;
    XLA:CPU cannot compile it, so only the lowering is checked. Counts the collectives per mesh."""
    n, d, f, e, k = 64, 16, 12, 8, 2
    rng = np.random.default_rng(0)
    x, w1, w3 = jnp.ones((n, d)), jnp.ones((e, d, f)), jnp.ones((e, d, f))
    w2 = jnp.ones((e, f, d))
    _, weights, experts = moe.route(jnp.asarray(rng.normal(size=(n, e)), jnp.float32), k)
    out = {}
    for shape in [(1, 1, 8, 1), (1, 2, 2, 2)]:
        mesh = sharding.make_mesh(sharding.MeshConfig(*shape))

        def loss(x, weights, w1, w3, w2):
            y = moe_parallel.expert_swiglu(x, experts, weights, w1, w3, w2, mesh=sharding.current_mesh(), native=True)
            return jnp.sum(y * y)

        with jax.set_mesh(mesh):
            text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).lower(x, weights, w1, w3, w2).as_text()
        out[str(shape)] = text.count("ragged_all_to_all")
    return out


def check_ragged_docstring() -> dict:
    """The CPU stand-in reproduces the example of ``jax.lax.ragged_all_to_all``'s docstring."""
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)
    output = jnp.zeros((2, 4), jnp.float32)
    input_offsets = jnp.array([[0, 1], [0, 1]], jnp.int32)
    send_sizes = jnp.array([[1, 2], [1, 1]], jnp.int32)
    output_offsets = jnp.array([[0, 0], [1, 2]], jnp.int32)
    recv_sizes = jnp.array([[1, 1], [2, 1]], jnp.int32)

    def body(*args):
        args = [a[0] for a in args]
        return moe_parallel.ragged_all_to_all(*args, axis_name="x", native=False)[None]

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    result = run(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    return {"result": np.asarray(result).tolist()}


def check_attention(implementation: str = "reference", variant: str = "spattention") -> dict:
    """Head-sharded attention (shard_map, each tensor shard with its heads' bands) vs one device."""
    b, t, h, kv, dh = 8, 64, 4, 2, 16
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, dh)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat(np.array([[1] * 40 + [2] * 24]), b, axis=0), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
    spec = masks.make(variant, num_heads=h, band_len=t)

    def loss_and_grads(attn_fn):
        def loss(q, k, v):
            return jnp.sum(attn_fn(q, k, v, mask=spec, segment_ids=seg, implementation=implementation) * cot)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    want = jax.jit(loss_and_grads(attend))(q, k, v)
    want = [want[0], *want[1]]
    out = {"scale": [float(jnp.max(jnp.abs(w))) for w in want]}
    for shape in ATTN_MESHES:
        manual = lambda *a, **kw: sharding.attention(*a, manual=True, **kw)  # noqa: E731
        got = _on_mesh(shape, loss_and_grads(manual), q, k, v)
        out[str(shape)] = _max_errors([got[0], *got[1]], want)
    # Negative control: every tensor shard running heads 0.. of the mask (no head offset) must fail.
    original = masks.MaskSpec.select_heads
    masks.MaskSpec.select_heads = lambda self, start, stop: original(self, 0, stop - start)
    try:
        manual = lambda *a, **kw: sharding.attention(*a, manual=True, **kw)  # noqa: E731
        got = _on_mesh((2, 1, 1, 4), loss_and_grads(manual), q, k, v)
        out["no_head_offset"] = _max_errors([got[0], *got[1]], want)
    finally:
        masks.MaskSpec.select_heads = original
    return out


if __name__ == "__main__":
    main({
        "moe": check_moe,
        "native_lowers": check_native_lowers,
        "ragged_docstring": check_ragged_docstring,
        "attention": check_attention,
    })
