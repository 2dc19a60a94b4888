"""One test body for every attention kernel: outputs and dq/dk/dv against the fp32 reference.

Each backend is a :class:`Backend` row. On a CPU the kernels run in Pallas interpret mode (their
default there), so shapes stay small; the GPU benchmark (bench/kernels.py) checks the big ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn_jax import masks
from spattn_jax.attention import attention, available
from spattn_jax.kernels import reference


@dataclasses.dataclass(frozen=True)
class Backend:
    """What a kernel supports and how closely it must match the reference.

    Tolerances are on ``max|x - x_ref| / max(max|x_ref|, ERR_FLOOR)`` per output, by input dtype.
    On a GPU, fp32 kernels multiply on the tensor cores in TF32 (10-bit mantissa), so their fp32 rows
    get :data:`TF32_TOL` there; the reference always runs at ``highest`` precision.
    """

    name: str
    head_dims: tuple[int, ...] = (32, 64)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    max_len: int = 200
    options: tuple[tuple[str, object], ...] = ()
    tol: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
        # dtype: (out, dq, dk, dv)
        ("float32", (2e-5, 1e-4, 1e-4, 1e-4)),
        ("bfloat16", (1.5e-2, 4e-2, 4e-2, 2e-2)),
    )

    def tolerances(self, dtype: str) -> dict[str, float]:
        tol = TF32_TOL if dtype == "float32" and jax.default_backend() == "gpu" else dict(self.tol)[dtype]
        return dict(zip(("out", "dq", "dk", "dv"), tol))


# TF32 rounds operands to 2^-11 relative (bf16: 2^-8). Gradients that cancel to ~0 (a row with one
# key: dS = P (dP - delta) = 0) are judged against ERR_FLOOR, where TF32's dP rounding shows as ~1e-2
# (H100, N = 1, D = 32: dq 9.1e-3, dk 1.1e-2), so the gradient bounds are half of bf16's.
TF32_TOL = (5e-3, 2e-2, 2e-2, 1e-2)


# Kernels register here; a row whose implementation does not import on this install is skipped.
BACKENDS: tuple[Backend, ...] = (
    # Splash in Pallas interpret mode (128 blocks there); lengths up to 300 pad to 3 blocks.
    # tests/kernels/test_splash.py reruns the pinned cases in Pallas's TPU interpreter.
    Backend("splash", head_dims=(64, 128), max_len=300),
    # Pallas Triton in interpret mode; 16/32 tiles so that N <= 200 has interior and edge tiles.
    Backend(
        "pallas_triton",
        options=(("block_q", 32), ("block_k", 16), ("block_q_dq", 16), ("block_k_dq", 32),
                 ("block_q_dkv", 16), ("block_k_dkv", 32)),
    ),
    # Pallas Mosaic GPU: sm90+ only (no CPU interpreter path; CPU tests in test_pallas_mosaic_gpu.py);
    # bf16, head dims padded to 64; 64-key tiles so that N <= 300 has interior and edge tiles.
    pytest.param(
        Backend("pallas_mosaic_gpu", head_dims=(64, 128), dtypes=("bfloat16",), max_len=300, options=(("block_kv", 64),)),
        marks=pytest.mark.skipif(
            "not __import__('spattn_jax.kernels.pallas_mosaic_gpu').kernels.pallas_mosaic_gpu.is_supported()",
            reason="pallas_mosaic_gpu needs an sm90+ GPU",
        ),
    ),
)


def _ids(backend: Backend) -> str:
    return backend.name


@st.composite
def cases(draw, backend: Backend):
    num_heads = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(1, backend.max_len))
    follow = draw(st.booleans()) and n >= num_heads
    return dict(
        batch=draw(st.integers(1, 2)),
        n=n,
        num_heads=num_heads,
        num_kv=draw(st.sampled_from([d for d in (1, 2, 4, 8) if num_heads % d == 0])),
        head_dim=draw(st.sampled_from(backend.head_dims)),
        dtype=draw(st.sampled_from(backend.dtypes)),
        variant=draw(st.sampled_from(masks.VARIANTS)),
        band_len=None if follow else n + draw(st.sampled_from([0, 0, 7, 64])),
        num_docs=draw(st.sampled_from([1, 1, 2, 4])),
        seed=draw(st.integers(0, 2**16)),
    )


def _segment_ids(rng, batch, n, num_docs):
    if num_docs == 1 or n < 2:
        return None
    ids = np.zeros((batch, n), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(num_docs - 1, n - 1), replace=False))
        ids[b] = np.searchsorted(cuts, np.arange(n), side="right")
    return jnp.asarray(ids)


# Inputs are unit normal, so outputs and gradients are O(1); the floor only matters when the reference
# is (near) all zero, e.g. gradients of a mask whose rows see one key each, where rounding is all that
# is left to compare.
ERR_FLOOR = 0.05


def _rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.max(np.abs(x - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), ERR_FLOOR))


def check_against_reference(backend: Backend, case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    b, n, h, kv, d = case["batch"], case["n"], case["num_heads"], case["num_kv"], case["head_dim"]
    dtype = jnp.dtype(case["dtype"])
    q = jnp.asarray(rng.standard_normal((b, n, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, n, kv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, n, kv, d)), dtype)
    do = jnp.asarray(rng.standard_normal((b, n, h, d)), dtype)
    seg = _segment_ids(rng, b, n, case["num_docs"])
    spec = masks.make(case["variant"], num_heads=h, band_len=case["band_len"])
    options = dict(backend.options)

    def run(q, k, v):
        return attention(q, k, v, mask=spec, segment_ids=seg, implementation=backend.name, **options)

    def run_ref(q, k, v):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return reference.attention(*f32, mask=spec, q_segment_ids=seg, kv_segment_ids=seg)

    out, vjp = jax.vjp(jax.jit(run), q, k, v)
    grads = vjp(do)
    with jax.default_matmul_precision("highest"):  # on a GPU the default would be TF32
        ref, vjp_ref = jax.vjp(jax.jit(run_ref), q, k, v)
        grads_ref = vjp_ref(do.astype(jnp.float32))

    tol = backend.tolerances(case["dtype"])
    errors = {"out": _rel_err(out, ref)}
    errors.update({name: _rel_err(g, gr) for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref)})
    bad = {k_: (e, tol[k_]) for k_, e in errors.items() if not e <= tol[k_]}
    assert not bad, f"{backend.name} {case}: error/tolerance {bad}"

    # Empty rows: exactly zero output, and their dq exactly zero.
    allowed = np.asarray(reference.allowed(spec, n, n, seg, seg)).any(-1)  # [B or 1, H, n]
    empty = np.broadcast_to(~allowed, (b, h, n)).transpose(0, 2, 1)  # [B, n, H]
    if empty.any():
        assert np.all(np.asarray(out, np.float32)[empty] == 0), "empty rows must output 0"
        assert np.all(np.asarray(grads[0], np.float32)[empty] == 0), "empty rows must have dq = 0"


@pytest.mark.parametrize("backend", BACKENDS, ids=_ids)
@settings(max_examples=min(6, settings.default.max_examples))
@given(data=st.data())
def test_kernel_matches_reference(backend: Backend, data):
    if not available(backend.name):
        pytest.skip(f"{backend.name} does not import here")
    check_against_reference(backend, data.draw(cases(backend)))


PINNED = [
    # Remainders (N % H != 0), N below and just past a tile, GQA, every interval shape.
    dict(batch=1, n=1, num_heads=1, num_kv=1, head_dim=32, dtype="float32", variant="causal", band_len=8, num_docs=1, seed=0),
    dict(batch=2, n=130, num_heads=8, num_kv=2, head_dim=64, dtype="float32", variant="spattention", band_len=None, num_docs=1, seed=1),
    dict(batch=1, n=200, num_heads=4, num_kv=4, head_dim=64, dtype="float32", variant="spattention_exclusive", band_len=200, num_docs=1, seed=2),
    dict(batch=1, n=129, num_heads=4, num_kv=1, head_dim=32, dtype="bfloat16", variant="gapped", band_len=256, num_docs=3, seed=3),
    dict(batch=1, n=160, num_heads=8, num_kv=8, head_dim=32, dtype="float32", variant="balanced", band_len=None, num_docs=2, seed=4),
    dict(batch=1, n=96, num_heads=2, num_kv=1, head_dim=64, dtype="bfloat16", variant="balanced_exclusive", band_len=96, num_docs=1, seed=5),
    # Intervals wider than the Mosaic GPU kernels' tile span: their one-compare edges.
    dict(batch=1, n=200, num_heads=2, num_kv=1, head_dim=64, dtype="bfloat16", variant="causal", band_len=None, num_docs=1, seed=6),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=_ids)
@pytest.mark.parametrize("case", PINNED, ids=lambda c: f"{c['variant']}-n{c['n']}")
def test_kernel_pinned_cases(backend: Backend, case):
    if not available(backend.name):
        pytest.skip(f"{backend.name} does not import here")
    case = dict(case, head_dim=min(case["head_dim"], max(backend.head_dims)))
    if case["dtype"] not in backend.dtypes:
        case["dtype"] = backend.dtypes[0]
    check_against_reference(backend, case)
