"""Expert parallelism: the dropless SwiGLU experts of :mod:`spattn_jax.moe` on a device mesh.

The router runs outside, on the global arrays (XLA partitions it; its losses need global means).
This module replaces :func:`spattn_jax.moe.expert_swiglu` under a mesh with one ``jax.shard_map``
over the whole mesh. Where the arrays live (mesh axes from :data:`spattn_jax.sharding.RULES`):

* tokens ``x [N, D]``, ``experts``/``weights [N, k]``: rows over the batch axes (``activation_batch``:
  data, fsdp, expert); each device holds ``n = N / batch shards`` tokens;
* ``w1``/``w3 [E, D, F]``, ``w2 [E, F, D]``: ``E`` over ``expert`` (``exp``), ``F`` over ``tensor``
  (``mlp``). At rest ``D`` is also FSDP-sharded; the ``in_specs`` leave ``D`` whole, so XLA
  all-gathers the weights at the region's edge and reduce-scatters their gradients.

Per device (``Pe`` expert shards, ``El = E / Pe`` local experts):

1. Sort the ``n k`` local assignments by expert (:func:`spattn_jax.moe.sort_assignments`): group sizes
   ``g [E]``. ``G = all_gather(g) [Pe, E]`` tells every device every count.
2. **Dispatch** (``ragged_all_to_all``, one slice per expert): expert ``e``'s rows go to device
   ``e // El``. The offsets are chosen so that the receive buffer comes out grouped by local expert,
   then by sender, i.e. already in grouped-matmul order: no local re-sort.
3. SwiGLU as three grouped matmuls (:func:`spattn_jax.moe.grouped_swiglu`) over the ``El`` local groups; with ``F``
   split over ``tensor`` the down projection is a partial sum, reduced with ``psum`` (the same tokens
   sit on every tensor shard).
4. **Return** (``ragged_all_to_all`` with the mirrored offsets), un-sort, combine with the router
   weights.

Dropless without padding to a capacity: only routed rows travel and the grouped matmul skips the rest. The
receive buffer is static, so it is sized for the worst case (``Pe n k`` rows: every peer routing
everything here), as maxtext's dropless path does; that costs memory, not traffic or FLOPs.

Numerics: the returned expert outputs travel in the compute dtype (``x.dtype``), as maxtext does; the
single-device path keeps them fp32 until the weighted sum. At fp32 both agree to rounding.

Collective fallback: XLA:CPU (JAX 0.10.2) has no ``ragged-all-to-all`` ("HLO opcode
`ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"). On CPU, :func:`ragged_all_to_all`
computes the same result with a dense ``all_to_all`` whose per-slice capacity is the sender's whole
buffer (dropless, ``E`` times the traffic): meant for tests on fake CPU devices, not for speed.
GPU and TPU use the native collective.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spattn_jax import sharding
from spattn_jax.moe import grouped_swiglu, sort_assignments


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, native: bool
):
    """``jax.lax.ragged_all_to_all``, or (``native=False``) the same result from a dense ``all_to_all``.

    The fallback pads every one of the ``K`` slices to ``operand.shape[0]`` rows, exchanges
    ``[K, rows, ...]`` with ``all_to_all`` (slice ``i`` goes to device ``i // (K / axis size)``, as
    in the ragged op), and scatters the received rows to the offsets their senders chose.
    """
    if native:
        return jax.lax.ragged_all_to_all(
            operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis_name
        )
    rows = operand.shape[0]
    r = jnp.arange(rows)
    src = input_offsets[:, None] + r[None, :]  # [K, rows]
    valid = r[None, :] < send_sizes[:, None]
    chunks = jnp.take(operand, jnp.where(valid, src, 0), axis=0)
    chunks = jnp.where(valid.reshape(valid.shape + (1,) * (operand.ndim - 1)), chunks, 0)
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [K, rows, ...] by sender
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest = jnp.where(r[None, :] < recv_sizes[:, None], offsets[:, None] + r[None, :], output.shape[0])
    return output.at[dest.reshape(-1)].set(received.reshape((-1,) + operand.shape[1:]), mode="drop")


def _swiglu(xs, w1, w3, w2, group_sizes, tensor_axis, gmm_impl):
    """Grouped SwiGLU: ``xs [M, D]`` grouped by expert -> fp32 ``[M, D]`` (rows past the groups: 0)."""
    y = grouped_swiglu(xs, w1, w3, w2, group_sizes, gmm_impl)
    return jax.lax.psum(y, tensor_axis) if tensor_axis else y  # F was split over tensor


def _dispatch_and_compute(xs, group_sizes, w1, w3, w2, *, expert_axis, tensor_axis, native, gmm_impl):
    """Steps 1-4 for one device: ``xs [n k, D]`` sorted by global expert -> outputs, same order."""
    num_experts = group_sizes.shape[0]
    shards = jax.lax.axis_size(expert_axis)
    local = num_experts // shards
    me = jax.lax.axis_index(expert_axis)

    counts = jax.lax.all_gather(group_sizes, expert_axis)  # [sender, E]
    per_dest = counts.reshape(shards, shards, local)  # [sender, dest device, local expert]
    senders_before = _exclusive_cumsum(per_dest, axis=0)  # rows of earlier senders, per (dest, expert)
    dest_start = _exclusive_cumsum(per_dest.sum(0), axis=1)  # [dest, local expert]: group starts
    mine = per_dest[:, me, :]  # [sender, local expert]: what I receive
    local_sizes = mine.sum(0)  # [El]

    # Dispatch: slice e = global expert e, to device e // El, placed at (its group, after earlier senders).
    out_offsets = (dest_start + senders_before[me]).reshape(-1)
    buffer = jnp.zeros((shards * xs.shape[0],) + xs.shape[1:], xs.dtype)
    received = ragged_all_to_all(
        xs, buffer, _exclusive_cumsum(group_sizes), group_sizes, out_offsets, mine.reshape(-1),
        axis_name=expert_axis, native=native,
    )
    ys = _swiglu(received, w1, w3, w2, local_sizes, tensor_axis, gmm_impl).astype(xs.dtype)

    # Return: slice (sender s, local expert e) goes back to s, at s's sorted offset of expert me El + e.
    back_in = (dest_start[me][None, :] + senders_before[:, me, :]).reshape(-1)
    back_out = jax.lax.dynamic_slice_in_dim(_exclusive_cumsum(counts, axis=1), me * local, local, axis=1)
    return ragged_all_to_all(
        ys, jnp.zeros_like(xs), back_in, mine.reshape(-1), back_out.reshape(-1), group_sizes,
        axis_name=expert_axis, native=native,
    )


def _local_moe(x, experts, weights, w1, w3, w2, *, num_experts, expert_axis, tensor_axis, native, gmm_impl):
    """One device's tokens: ``x [n, D]``, ``experts``/``weights [n, k]`` -> ``[n, D]``."""
    n, top_k = experts.shape
    order, token, group_sizes = sort_assignments(experts, num_experts)
    xs = jnp.take(x, token, axis=0)
    if expert_axis is None:  # every expert is local: the single-device computation
        ys = _swiglu(xs, w1, w3, w2, group_sizes, tensor_axis, gmm_impl)
    else:
        ys = _dispatch_and_compute(
            xs, group_sizes, w1, w3, w2, expert_axis=expert_axis, tensor_axis=tensor_axis, native=native,
            gmm_impl=gmm_impl,
        )
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)
    y = y.reshape(n, top_k, -1).astype(jnp.float32) * weights.astype(jnp.float32)[..., None]
    return jnp.sum(y, axis=1).astype(x.dtype)


def native_ragged_all_to_all(mesh) -> bool:
    """Whether to use the native collective: not on XLA:CPU, which cannot lower it (JAX 0.10.2).

    ``SPATTN_RAGGED_A2A=0`` / ``1`` overrides (e.g. to rule the collective out when debugging a GPU run).
    """
    flag = os.environ.get("SPATTN_RAGGED_A2A")
    if flag is not None:
        return flag not in ("0", "false", "")
    # abstract_device is None for an AbstractMesh of devices that need not exist.
    device = getattr(getattr(mesh, "abstract_mesh", mesh), "abstract_device", None)
    return (device.platform if device is not None else jax.default_backend()) != "cpu"


def expert_swiglu(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w1: jax.Array,
    w3: jax.Array,
    w2: jax.Array,
    *,
    mesh,
    native: bool | None = None,
    gmm_impl: str = "auto",
) -> jax.Array:
    """:func:`spattn_jax.moe.expert_swiglu` on ``mesh`` (same arguments, same result).

    Args:
      x: ``[N, D]``; experts: ``int [N, k]``; weights: ``[N, k]``; w1, w3: ``[E, D, F]``;
        w2: ``[E, F, D]`` -- global arrays, laid out as in the module docstring.
      mesh: the (abstract) mesh; ``E`` must divide by the ``expert`` shards, ``F`` by ``tensor``.
      native: use ``jax.lax.ragged_all_to_all`` (default: unless the mesh is on CPU).
      gmm_impl: the grouped matmul (:func:`spattn_jax.kernels.grouped_matmul.gmm`).
    Returns:
      ``[N, D]`` in ``x.dtype``, rows over the batch axes.
    """
    num_experts = w1.shape[0]
    batch = sharding.mesh_axes_of("activation_batch", mesh) or None
    expert_axis = sharding.mesh_axes_of("exp", mesh)
    tensor_axis = sharding.mesh_axes_of("mlp", mesh)
    if len(expert_axis) > 1 or len(tensor_axis) > 1:
        raise ValueError(
            f"experts and the expert hidden split over one mesh axis each, got {expert_axis}, {tensor_axis}"
        )
    expert_axis = expert_axis[0] if expert_axis else None
    tensor_axis = tensor_axis[0] if tensor_axis else None
    if expert_axis and num_experts % mesh.shape[expert_axis]:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the {mesh.shape[expert_axis]} shards of mesh "
            f"axis {expert_axis!r}"
        )
    native = native_ragged_all_to_all(mesh) if native is None else native
    rows, up, down = P(batch, None), P(expert_axis, None, tensor_axis), P(expert_axis, tensor_axis, None)
    body = functools.partial(
        _local_moe, num_experts=num_experts, expert_axis=expert_axis, tensor_axis=tensor_axis, native=native,
        gmm_impl=gmm_impl,
    )
    return jax.shard_map(
        body, mesh=mesh, in_specs=(rows, rows, rows, up, up, down), out_specs=rows,
        check_vma=False,  # the Pallas grouped matmul's outputs carry no replication information
    )(x, experts, weights, w1, w3, w2)
