"""Expert parallelism against the single-device MoE, on 8 fake CPU devices (a subprocess each).

Meshes (data, fsdp, expert, tensor): (8,1,1,1), (2,2,2,1), (1,2,2,2), (1,1,8,1), (1,1,4,2), (1,1,2,4).
Compared: the loss ``sum(y * cot)`` and its gradients with respect to x, the router weights, w1, w3, w2.
"""

from __future__ import annotations

import pytest

from tests.multidevice import run


def _assert_close(result: dict, rel: float, abs_: float = 1e-6) -> None:
    scale = result.pop("scale")
    names = ("loss", "d_x", "d_weights", "d_w1", "d_w3", "d_w2")
    for mesh, errors in result.items():
        for name, err, s in zip(names, errors, scale):
            assert err <= rel * s + abs_, f"mesh {mesh}: {name} differs by {err:.3g} (scale {s:.3g})"


def test_expert_parallel_equals_single_device_fp32():
    result, _ = run("parallel_ops", "moe", "float32", "random")
    _assert_close(result, rel=2e-6)


def test_expert_parallel_worst_case_routing_drops_nothing():
    # Every token picks experts 0 and 1, which live on one expert shard: that shard's receive buffer
    # fills to its worst case (every peer's every row); dropless means nothing is lost.
    result, _ = run("parallel_ops", "moe", "float32", "skewed")
    _assert_close(result, rel=2e-6)


def test_expert_parallel_with_the_pallas_grouped_matmul():
    # The GPU path's kernel (interpret mode) inside the shard_map: values and gradients as one device.
    result, _ = run("parallel_ops", "moe", "float32", "random", "pallas_triton")
    _assert_close(result, rel=2e-5)


@pytest.mark.slow
def test_expert_parallel_equals_single_device_bf16():
    # Expert outputs travel back in bf16 (the single-device path keeps fp32 until the weighted sum):
    # equal within a couple of bf16 ulps of the largest value.
    result, _ = run("parallel_ops", "moe", "bfloat16", "random")
    _assert_close(result, rel=2e-2)


def test_cpu_stand_in_for_ragged_all_to_all_follows_the_jax_docstring():
    # XLA:CPU cannot lower ragged-all-to-all; the stand-in must give the op's documented result.
    result, _ = run("parallel_ops", "ragged_docstring")
    assert result["result"] == [[1, 3, 0, 0], [2, 2, 4, 0]]


def test_native_ragged_all_to_all_path_lowers_with_its_gradient():
    # Forward: dispatch and return; backward: their transposes (also ragged_all_to_all).
    result, _ = run("parallel_ops", "native_lowers")
    assert result == {"(1, 1, 8, 1)": 4, "(1, 2, 2, 2)": 4}
