"""Splash-specific tests: the mask lowering, metadata, kernel caching, SMEM planning and sharding.

Numerics against the fp32 reference live in the shared body (tests/kernels/test_kernels.py, the
``splash`` row). The sharded run needs 8 fake CPU devices, which must be set before JAX starts, so
it runs this file as a script in a subprocess (``python -m tests.kernels.test_splash sharded``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from spattn_jax import masks
from spattn_jax.kernels import reference
from spattn_jax.kernels import splash
from tests import bench_scripts
from tests.kernels.test_kernels import PINNED, Backend, check_against_reference


def _inputs(seed, batch, n, heads, kv_heads, head_dim, dtype=jnp.float32, kv_len=None):
    rng = np.random.default_rng(seed)
    kv_len = n if kv_len is None else kv_len
    q = jnp.asarray(rng.standard_normal((batch, n, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)), dtype)
    return q, k, v


# -- mask lowering ---------------------------------------------------------------------------------


@given(
    variant=st.sampled_from(masks.VARIANTS),
    heads=st.sampled_from([1, 2, 4, 8, 16]),
    n=st.integers(16, 300),
    q_len=st.one_of(st.none(), st.integers(1, 16)),
    follow=st.booleans(),
)
def test_head_masks_equal_spec_dense(variant, heads, n, q_len, follow):
    """The splash masks, padded to 128 blocks, are exactly spec.dense on the real rows and columns,
    and padded keys are never allowed for a real query."""
    q_len = n if q_len is None else q_len
    spec = masks.make(variant, num_heads=heads, band_len=None if follow else n + 11)
    q_pad, kv_pad = -(-q_len // 128) * 128, -(-n // 128) * 128
    got = np.stack([m[:, :] for m in splash.head_masks(spec, q_len, n, q_pad, kv_pad)])
    np.testing.assert_array_equal(got[:, :q_len, :n], spec.dense(q_len, n))
    assert not got[:, :q_len, n:].any()


@given(
    bounds=st.lists(st.integers(0, 60), min_size=0, max_size=6),
    d0=st.integers(-40, 80),
    rows=st.integers(1, 24),
    cols=st.integers(1, 24),
)
def test_distance_block_and_kind_match_brute_force(bounds, d0, rows, cols):
    ivs = masks.normalize(list(zip(bounds[::2], bounds[1::2])), 1000)
    dist = d0 + np.arange(rows)[:, None] - np.arange(cols)[None, :]
    want = np.zeros((rows, cols), bool)
    for lo, hi in ivs:
        want |= (dist >= lo) & (dist < hi)
    np.testing.assert_array_equal(splash.distance_block(ivs, d0, rows, cols), want)
    kind = splash.block_kind(ivs, d0, rows, cols)
    assert kind == (splash.FULL if want.all() else splash.PARTIAL if want.any() else splash.EMPTY)


def test_interval_mask_equals_local_mask_and_its_function():
    """One interval is splash's LocalMask with an offset; block slices, the in-kernel function
    and the full array agree."""
    shape, (lo, hi), offset = (384, 384), (40, 100), 0
    ours = splash.IntervalMask(shape, ((lo, hi),), offset)
    local = sm.LocalMask(shape, window_size=(hi - 1 - lo, 0), offset=offset - lo)
    np.testing.assert_array_equal(ours[:, :], local[:, :])
    for qs, ks in [(slice(0, 128), slice(0, 128)), (slice(128, 256), slice(0, 128)), (slice(256, 384), slice(128, 256))]:
        np.testing.assert_array_equal(ours[qs, ks], local[qs, ks])
    rows, cols = np.arange(384)[:, None], np.arange(384)[None, :]
    np.testing.assert_array_equal(ours.mask_function(rows, cols), ours[:, :])
    jax_fn = jax.jit(ours.mask_function)(jnp.asarray(rows), jnp.asarray(cols))
    np.testing.assert_array_equal(np.asarray(jax_fn), ours[:, :])


def test_interval_mask_hash_and_equality():
    a = splash.IntervalMask((256, 256), ((0, 9), (20, 28)), 0)
    b = splash.IntervalMask((256, 256), ((0, 9), (20, 28)), 0)
    c = splash.IntervalMask((256, 256), ((0, 9), (20, 29)), 0)
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c}) == 2


# -- block sizes -----------------------------------------------------------------------------------


def test_block_sizes_clip_and_pad():
    sizes = splash.block_sizes_for(None, 200, 1000, interpret=False)
    assert (sizes.block_q, sizes.block_kv, sizes.block_kv_compute) == (256, 512, 512)
    assert splash.padded_lengths(sizes, 200, 1000) == (256, 1024)
    sizes = splash.block_sizes_for(None, 200, 1000, interpret=True)
    assert {sizes.block_q, sizes.block_kv, sizes.block_q_dkv} == {128}
    custom = splash.block_sizes_for(splash.splash.BlockSizes(512, 512, 256, 512, 512, 256, 512, 512), 4096, 300, False)
    assert (custom.block_kv, custom.block_kv_compute) == (384, 128)  # compute block still divides
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.block_sizes_for(100, 256, 256, interpret=True)


# -- metadata --------------------------------------------------------------------------------------


def test_metadata_per_head_rows_and_dedup():
    """Distinct per-head masks keep one metadata row per head; Toeplitz partial blocks dedupe."""
    spec = masks.make("spattention_exclusive", num_heads=8, band_len=None)
    sizes = splash.block_sizes_for(128, 1024, 1024, interpret=True)
    (kernel,), per_call = splash.build_kernels(spec, 1024, 1024, sizes, 1, None, True)
    info = kernel.fwd_mask_info
    assert per_call == 8 and info.block_mask.shape == (8, 8, 8)
    # Head h's band [128 h, 128 (h + 1)) is block aligned: block (i, j) is partial iff i - j is h
    # or h + 1 (a triangle), never full, empty elsewhere.
    bm = np.asarray(info.block_mask)
    for h in range(8):
        diag = np.subtract.outer(np.arange(8), np.arange(8))
        assert set(np.unique(bm[h][(diag == h) | (diag == h + 1)])) <= {1}
        assert not bm[h][(diag != h) & (diag != h + 1)].any()
    assert info.partial_mask_blocks.shape[0] == 2  # lower and upper triangle, shared by all heads
    bytes_ = splash.mask_info_bytes(kernel)
    assert bytes_["fwd"]["block_mask"] == 8 * 8 * 8 and bytes_["fwd"]["partial_mask_blocks"] == 2 * 128 * 128
    assert splash.smem_bytes(kernel) == 3 * 8 * 8 * 8  # int8 data_next, block_mask, mask_next


def test_single_mask_kernels_compute_the_mask_in_kernel():
    """Causal heads are one mask: splash evaluates IntervalMask.mask_function in the kernel and
    loads no partial blocks."""
    spec = masks.make("causal", num_heads=4, band_len=None)
    sizes = splash.block_sizes_for(128, 512, 512, interpret=True)
    (kernel,), _ = splash.build_kernels(spec, 512, 512, sizes, 1, None, True)
    assert kernel.fwd_mask_info.partial_mask_blocks is None and kernel.fwd_mask_info.q_sequence is not None
    assert kernel.kwargs["mask_function"] is not None


@pytest.mark.parametrize("n, block, heads", [(2048, 128, 16), (1664, 128, 8), (3072, 512, 4)])
def test_metadata_bench_analytic_equals_measured(n, block, heads):
    """bench/splash_metadata.py counts 128k metadata instead of building it; at small N its counts
    must equal what splash builds (run() asserts it field by field)."""
    bench = bench_scripts.load("splash_metadata")
    variants = ["spattention", "spattention_exclusive", "gapped", "balanced", "balanced_exclusive"]
    rows = bench.run([n], [block], variants, heads=heads, measure_limit=1 << 30)
    assert all(r["source"].startswith("measured") for r in rows)
    assert "| 2,048 |" in bench.markdown(rows, dict(jax="jax", when="today")) or n != 2048


# -- caching and SMEM planning ---------------------------------------------------------------------


def test_kernels_built_once(monkeypatch):
    """Tracing attention again (new jit, grad) for the same spec and shape builds nothing new."""
    calls = []
    real = splash.splash.make_splash_mha

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(splash.splash, "make_splash_mha", counting)
    splash.build_kernels.cache_clear()
    spec = masks.make("spattention", num_heads=4, band_len=None)
    q, k, v = _inputs(0, 1, 130, 4, 2, 64)
    f = lambda q, k, v: splash.attention(q, k, v, mask=spec).sum()
    jax.jit(f)(q, k, v)
    assert len(calls) == 1
    jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    jax.jit(f)(q * 2, k, v)
    splash.attention(q, k, v, mask=spec)
    assert len(calls) == 1
    assert splash.build_kernels.cache_info().hits >= 2  # the grad trace and the eager call
    splash.attention(q[:, :129], k[:, :129], v[:, :129], mask=spec)  # another shape: one more build
    assert len(calls) == 2


def test_smem_budget_switches_to_one_kernel_per_head():
    spec = masks.make("spattention", num_heads=4, band_len=None)
    sizes = splash.block_sizes_for(128, 1024, 1024, interpret=True)
    kernels, per_call = splash.build_kernels(spec, 1024, 1024, sizes, 1, None, True, 1 << 20)
    assert per_call == 4 and len(kernels) == 1
    need = splash.smem_bytes(kernels[0])
    kernels, per_call = splash.build_kernels(spec, 1024, 1024, sizes, 1, None, True, need - 1)
    assert per_call == 1 and len(kernels) == 4
    # One mask per kernel: computed in the kernel, and the grid shrinks to the visited kv blocks.
    assert all(kern.fwd_mask_info.q_sequence is not None for kern in kernels)
    assert max(splash.smem_bytes(kern) for kern in kernels) < need


def test_warns_when_even_one_kernel_per_head_exceeds_smem():
    spec = masks.make("spattention", num_heads=2, band_len=None)
    sizes = splash.block_sizes_for(128, 1024, 1024, interpret=False)
    with pytest.warns(UserWarning, match="KiB of SMEM per call"):
        splash.build_kernels(spec, 1024, 1024, sizes, 1, None, False, 16)


@pytest.mark.parametrize("heads_per_call", [1, 2])
def test_heads_per_call_matches_one_kernel(heads_per_call):
    spec = masks.make("spattention", num_heads=4, band_len=None)
    q, k, v = _inputs(1, 2, 150, 4, 2, 64)
    seg = jnp.asarray(np.repeat([[0, 1]], 75, axis=1).repeat(2, 0), jnp.int32)
    one = splash.attention(q, k, v, mask=spec, q_segment_ids=seg, kv_segment_ids=seg)
    split = splash.attention(
        q, k, v, mask=spec, q_segment_ids=seg, kv_segment_ids=seg, heads_per_call=heads_per_call
    )
    np.testing.assert_allclose(np.asarray(split), np.asarray(one), atol=1e-6)


# -- semantics beyond the shared body --------------------------------------------------------------


def test_scale_and_cross_lengths():
    """A non-default scale, and Tq < Tk (queries are the last Tq positions)."""
    spec = masks.make("spattention", num_heads=4, band_len=None)
    q, k, v = _inputs(2, 1, 70, 4, 4, 64, kv_len=200)
    got = splash.attention(q, k, v, mask=spec, scale=0.3)
    want = reference.attention(q, k, v, mask=spec, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_fully_empty_q_block_gives_zeros_not_nan():
    """EBALL with bands wider than a block: whole q-blocks of far heads visit no kv block, where
    splash alone would divide 0 by 0."""
    spec = masks.make("spattention_exclusive", num_heads=2, band_len=None)
    q, k, v = _inputs(3, 1, 512, 2, 2, 64)
    loss = lambda q, k, v: (splash.attention(q, k, v, mask=spec) ** 2).sum()
    out = splash.attention(q, k, v, mask=spec)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.asarray(out)[:, :256, 1] == 0)  # head 1's band starts at distance 256
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[0])[:, :256, 1] == 0)
    want = jax.grad(lambda q, k, v: (reference.attention(q, k, v, mask=spec) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4)


# The shared body again, in Pallas's TPU interpreter: it models SMEM/VMEM, scalar prefetch and the
# block DMAs, raises on out-of-bounds reads and fills uninitialised memory with NaN.
TPU_INTERPRETER = Backend("splash", head_dims=(64, 128), options=(("interpret", pltpu.InterpretParams()),))


@pytest.mark.parametrize("case", PINNED, ids=lambda c: f"{c['variant']}-n{c['n']}")
def test_pinned_cases_in_tpu_interpreter(case):
    check_against_reference(TPU_INTERPRETER, dict(case, head_dim=min(case["head_dim"], 128)))


def test_vmap_path_equals_tpu_interpreter_path():
    """The default interpreter (batch vmapped into the grid, as on a TPU) equals the TPU
    interpreter (batch looped), forward and backward."""
    spec = masks.make("gapped", num_heads=4, band_len=None)
    q, k, v = _inputs(4, 2, 140, 4, 1, 64)

    def loss(q, k, v, interpret):
        return (splash.attention(q, k, v, mask=spec, interpret=interpret) ** 2).sum()

    a = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, None)
    b = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, pltpu.InterpretParams())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-6)


# -- sharding (8 fake CPU devices, in a subprocess) ------------------------------------------------


def test_sharded_equals_unsharded():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_splash", "sharded"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded ok" in proc.stdout


def _sharded_main() -> None:
    """Sharded (shard_map over batch and heads) against unsharded: outputs and q/k/v gradients."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    axes = ("data", "fsdp", "expert", "tensor")
    explicit, auto = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    cases = [
        # mesh shape, axis type, variant, heads, kv heads, heads_per_call, segment ids
        ((2, 1, 1, 4), explicit, "spattention_exclusive", 8, 2, None, True),  # kv heads repeated to 4
        ((2, 2, 1, 2), auto, "spattention", 8, 8, 1, False),  # one kernel per local head
        ((1, 2, 2, 2), auto, "balanced", 4, 1, None, True),  # MQA; "expert" replicates
    ]
    for shape, axis_type, variant, heads, kv_heads, per_call, with_seg in cases:
        mesh = jax.make_mesh(shape, axes, axis_types=(axis_type,) * 4)
        spec = masks.make(variant, num_heads=heads, band_len=None)
        q, k, v = _inputs(5, 4, 200, heads, kv_heads, 64)
        seg = None
        if with_seg:
            seg = jnp.asarray(np.searchsorted([60, 130], np.arange(200), side="right")[None].repeat(4, 0), jnp.int32)
        do = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)

        def run(q, k, v, mesh):
            return splash.attention(
                q, k, v, mask=spec, q_segment_ids=seg, kv_segment_ids=seg, mesh=mesh, heads_per_call=per_call
            )

        x_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        kv_sharding = x_sharding if kv_heads % shape[3] == 0 else NamedSharding(mesh, P(("data", "fsdp")))
        qs = jax.device_put(q, x_sharding)
        ks, vs = (jax.device_put(x, kv_sharding) for x in (k, v))
        with jax.set_mesh(mesh):
            # Auto meshes: the abstract mesh inside jit, as spattn_jax.sharding.attention passes it.
            pick = (lambda: mesh) if axis_type == explicit else jax.sharding.get_abstract_mesh
            out, vjp = jax.vjp(jax.jit(lambda q, k, v: run(q, k, v, pick())), qs, ks, vs)
            grads = vjp(jax.device_put(do, out.sharding))
        assert out.sharding.spec == x_sharding.spec or axis_type == auto, out.sharding
        ref_out, ref_vjp = jax.vjp(lambda q, k, v: run(q, k, v, None), q, k, v)
        ref_grads = ref_vjp(do)
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, err_msg=f"{shape} {variant} {name}")
        want = reference.attention(q, k, v, mask=spec, q_segment_ids=seg, kv_segment_ids=seg)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
        print(f"case {shape} {variant} ok", flush=True)
    print("sharded ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["sharded"]:
        _sharded_main()
