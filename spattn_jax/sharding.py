"""Meshes and logical-axis sharding: one code path from one CPU to a pod.

Mesh axes (:data:`MESH_AXES`), outermost first:

* ``data``   -- pure data parallelism: batch rows; parameters replicated.
* ``fsdp``   -- batch rows, and parameters and optimizer state sharded along ``embed`` (ZeRO-3: XLA
  all-gathers a weight where it is used and reduce-scatters its gradient).
* ``expert`` -- MoE experts (``exp``); it also carries batch rows, and the dense weights shard their
  ``embed`` dimension over it as extra FSDP, as maxtext does. Tokens move to their experts' devices
  with an all-to-all (:mod:`spattn_jax.moe_parallel`).
* ``tensor`` -- attention heads, the expert hidden ``mlp``, and the vocabulary (Megatron style).

Model code names axes, never mesh axes: every ``nnx.Param`` carries logical names (``vocab``,
``embed``, ``q_heads``, ...; see :mod:`spattn_jax.layers`) and activations are constrained with
:func:`constrain` to ``activation_*`` names. :data:`RULES` is the one table that maps both to mesh
axes (maxtext's ``logical_axis_rules``). A rule lists candidate mesh axes; a dimension takes those of
its candidates that the mesh has with size > 1 and that no earlier dimension of the same array took.
That is how an expert weight ``[exp, embed, mlp]`` ends ``(expert, fsdp, tensor)`` while a dense
``[embed, q_heads, head_dim]`` weight ends ``((fsdp, expert), tensor, None)``.

Outside a mesh (no ``jax.set_mesh``), :func:`constrain` and :func:`attention` are the single-device
code: the model runs unchanged on one device.

Also here: per-device bytes of a sharded pytree (``train.py --dry_run``), and multi-process start-up
(:func:`initialize_distributed`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from spattn_jax.attention import attention as attend
from spattn_jax.attention import resolve as resolve_attention

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")

# Logical axis -> candidate mesh axes (str, tuple of str, or None for replicated). Tested as code
# (tests/test_sharding.py): every name the model uses has a rule, and every sharded dimension of the
# presets divides on the meshes we run.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # -- parameters
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),  # an expert weight's "exp" takes "expert" first, leaving "fsdp"
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("norm", None),
    # -- activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

# Activation layouts the model constrains to.
BATCH = ("activation_batch",)
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
BATCH_LENGTH_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
BATCH_LENGTH_VOCAB = ("activation_batch", "activation_length", "activation_vocab")


# -- meshes --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; their product is the device count. One size may be ``-1``: the rest.

    The default is pure data parallelism over every device.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be >= 1 or -1 (the rest), got {self}")
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1 (the rest), got {self}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """The axis sizes for ``num_devices`` devices, ``-1`` resolved."""
        sizes = self.sizes
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {self} does not fit {num_devices} devices: the fixed axes take {known}, "
                    f"which does not divide {num_devices}"
                )
            return tuple(num_devices // known if s == -1 else s for s in sizes)
        if known != num_devices:
            raise ValueError(
                f"mesh {self} has {known} devices but {num_devices} are available; make the sizes "
                f"multiply to {num_devices} or set one of them to -1"
            )
        return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The device mesh of ``cfg`` over ``devices`` (default: all devices of all processes).

    Axis types are Auto: XLA propagates shardings from the parameters' and the :func:`constrain`
    annotations; the MoE dispatch and the kernels are explicit ``shard_map`` regions.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(cfg: MeshConfig, num_devices: int) -> jax.sharding.AbstractMesh:
    """A mesh of ``num_devices`` devices that need not exist (sizes and shardings only, e.g. dry runs)."""
    return jax.sharding.AbstractMesh(
        cfg.shape(num_devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by ``jax.set_mesh`` (abstract inside ``jit``), or ``None`` without one.

    ``None`` too inside a ``shard_map`` region (manual axes), where per-device code runs.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


# -- rules ---------------------------------------------------------------------------------------


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape) if not isinstance(mesh, Mapping) else dict(mesh)


def logical_to_spec(
    axes: Sequence[str | None],
    mesh,
    shape: Sequence[int] | None = None,
    rules: Sequence[tuple[str, Any]] = RULES,
) -> P:
    """The ``PartitionSpec`` of an array whose dimensions have logical names ``axes``.

    Args:
      axes: one logical name (or ``None``: replicated) per dimension.
      mesh: a ``Mesh``/``AbstractMesh`` or a ``{axis: size}`` mapping.
      shape: the array's shape; when given, a dimension that its mesh axes do not divide raises.
      rules: the table (default :data:`RULES`).
    Raises:
      KeyError: a logical name without a rule.
      ValueError: a dimension not divisible by the devices it is split over.
    """
    table = dict(rules)
    sizes = _mesh_sizes(mesh)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}; add it to spattn_jax.sharding.RULES")
        target = table[name]
        candidates = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        chosen = tuple(a for a in candidates if sizes.get(a, 1) > 1 and a not in used)
        if shape is not None and chosen:
            parts = math.prod(sizes[a] for a in chosen)
            if shape[dim] % parts:
                raise ValueError(
                    f"dimension {dim} ({name!r}, size {shape[dim]}) of an array of shape {tuple(shape)} is not "
                    f"divisible by mesh axes {chosen} ({parts} devices); change the mesh or the model size"
                )
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to logical ``axes`` under the current mesh; else ``x``."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, mesh)))


def mesh_axes_of(logical: str, mesh) -> tuple[str, ...]:
    """The mesh axes (size > 1) that the logical axis ``logical`` alone maps to."""
    spec = logical_to_spec((logical,), mesh)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


# -- parameters and optimizer state --------------------------------------------------------------


def param_specs(abstract_params_state, mesh, rules=RULES) -> dict:
    """Pure dict (the params' structure) of the ``PartitionSpec`` of every ``nnx.Param``.

    Args:
      abstract_params_state: ``nnx.state(model, nnx.Param)`` of a model (abstract is fine: built with
        ``nnx.eval_shape``); each Param's ``out_sharding`` metadata holds its logical axis names.
    """
    from flax import nnx  # the rules table itself needs no flax

    logical = nnx.get_partition_spec(abstract_params_state).to_pure_dict()
    shapes = abstract_params_state.to_pure_dict()
    return jax.tree.map(
        lambda spec, leaf: logical_to_spec(tuple(spec), mesh, leaf.shape, rules),
        logical,
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def named(mesh: jax.sharding.Mesh, specs) -> Any:
    """``NamedSharding`` leaves from ``PartitionSpec`` leaves."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def optimizer_specs(optimizer, abstract_opt_state, params_specs) -> Any:
    """Specs of an Optax state: every per-parameter leaf (Adam moments, ...) sharded like its
    parameter, every other leaf (step counts) replicated.

    ``optax.tree_utils.tree_map_params`` finds the per-parameter leaves by re-running the
    optimizer's ``init`` on placeholders, so this holds for any Optax chain.
    """
    import optax

    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        abstract_opt_state,
        params_specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )


def shard_shape(shape: Sequence[int], spec: P, mesh) -> tuple[int, ...]:
    """Per-device block shape of a ``shape`` array laid out as ``spec`` (ceil for uneven splits)."""
    sizes = _mesh_sizes(mesh)
    out = []
    for dim, entry in enumerate(tuple(shape)):
        names = () if dim >= len(spec) or spec[dim] is None else spec[dim]
        names = (names,) if isinstance(names, str) else tuple(names)
        out.append(-(-entry // math.prod(sizes[a] for a in names)))
    return tuple(out)


def bytes_per_device(abstract_tree, specs, mesh) -> int:
    """Bytes one device holds of a pytree of ``ShapeDtypeStruct`` laid out by ``specs`` (same tree).

    Arithmetic on shapes only: ``mesh`` may be an ``AbstractMesh`` of devices this machine lacks.
    """
    leaves = jax.tree.leaves(abstract_tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    if len(leaves) != len(spec_leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} specs")
    return sum(
        math.prod(shard_shape(leaf.shape, spec, mesh)) * np.dtype(leaf.dtype).itemsize
        for leaf, spec in zip(leaves, spec_leaves)
    )


# -- attention under a mesh ----------------------------------------------------------------------


def attention(
    q, k, v, *, mask, segment_ids=None, implementation: str = "auto", manual: bool | None = None, **kernel_options
):
    """:func:`spattn_jax.attention.attention` under the current mesh: batch over the batch axes,
    heads over ``tensor``.

    * No mesh: the single-device call.
    * ``reference`` (``manual`` false): plain jnp, so XLA partitions it from the q/k/v shardings.
    * ``splash``: splash shards itself (its mask metadata is split by head; see kernels/splash.py).
    * Other kernels (Pallas GPU; or ``manual=True``): a ``shard_map`` over the batch and ``tensor``
      axes. Bands are per head, so a tensor shard must run its own heads' bands, and Pallas kernels
      bake their bands in at trace time: shard ``i`` takes branch ``i`` of a ``lax.switch`` whose
      branches call the kernel with ``mask.select_heads(i Hl, (i + 1) Hl)`` (one compiled kernel per
      tensor shard; every device runs only its own).

    Shapes as in :func:`spattn_jax.attention.attention`: q ``[B, T, H, D]``, k/v ``[B, T, K, D]``;
    ``kernel_options`` go to the kernel (block sizes).
    """
    mesh = current_mesh()
    if mesh is None:
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, implementation=implementation, **kernel_options)
    impl = resolve_attention(implementation, q, **kernel_options)
    if manual is None:
        manual = impl != "reference"
    if impl == "splash":
        return attend(
            q, k, v, mask=mask, segment_ids=segment_ids, implementation=impl, mesh=mesh,
            batch_axes=mesh_axes_of("activation_batch", mesh),
            head_axis=_single(mesh_axes_of("activation_heads", mesh)), **kernel_options,
        )
    if not manual:
        return attend(q, k, v, mask=mask, segment_ids=segment_ids, implementation=impl, **kernel_options)
    return _attention_shard_map(q, k, v, mask, segment_ids, impl, mesh, kernel_options)


def _single(axes: tuple[str, ...]) -> str | None:
    if len(axes) > 1:
        raise ValueError(f"heads can be split over one mesh axis, the rules give {axes}")
    return axes[0] if axes else None


def _attention_shard_map(q, k, v, mask, segment_ids, impl, mesh, kernel_options):
    batch_axes = mesh_axes_of("activation_batch", mesh)
    head_axis = _single(mesh_axes_of("activation_heads", mesh))
    shards = mesh.shape[head_axis] if head_axis else 1
    num_heads, num_kv = q.shape[2], k.shape[2]
    if num_heads % shards:
        raise ValueError(f"num_heads={num_heads} is not divisible by the {shards} shards of mesh axis {head_axis!r}")
    local = num_heads // shards
    group = num_heads // num_kv
    kv_split = num_kv % shards == 0  # else every shard keeps all kv heads and slices its own
    if not kv_split and local % group and group % local:
        raise ValueError(
            f"{local} q heads per {head_axis!r} shard straddle GQA groups of {group}; pick a tensor size "
            f"that divides num_kv_heads={num_kv} or whose shards hold whole groups"
        )
    b = batch_axes or None
    q_spec = P(b, None, head_axis, None)
    kv_spec = P(b, None, head_axis if kv_split else None, None)
    seg_spec = P(b, None)

    def branch(i, q, k, v, seg):
        if not kv_split:
            kv0 = (i * local) // group
            k, v = (x[:, :, kv0 : kv0 + max(1, local // group)] for x in (k, v))
        sub = mask.select_heads(i * local, (i + 1) * local) if shards > 1 else mask
        return attend(q, k, v, mask=sub, segment_ids=seg, implementation=impl, **kernel_options)

    def body(q, k, v, seg):
        if shards == 1:
            return branch(0, q, k, v, seg)
        branches = [functools.partial(branch, i) for i in range(shards)]
        return jax.lax.switch(jax.lax.axis_index(head_axis), branches, q, k, v, seg)

    seg_in = segment_ids if segment_ids is not None else jnp.zeros(q.shape[:2], jnp.int32)
    run = jax.shard_map(
        lambda q, k, v, seg: body(q, k, v, seg if segment_ids is not None else None),
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,  # Pallas calls carry no replication information
    )
    return run(q, k, v, seg_in)


# -- processes -----------------------------------------------------------------------------------


def _multi_process_env() -> bool:
    env = os.environ
    flag = env.get("SPATTN_DISTRIBUTED")
    if flag is not None:
        return flag.lower() not in ("", "0", "false", "no")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(count, "1") or 1) > 1:
            return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> bool:
    """Start ``jax.distributed`` when this process is one of several; returns whether it did.

    Call before anything touches a device. Detection, first match wins:

    * ``SPATTN_DISTRIBUTED=1`` / ``0`` forces it on or off.
    * ``JAX_COORDINATOR_ADDRESS=host:port`` (GPU clusters without a scheduler JAX knows): also set
      ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (and optionally ``JAX_LOCAL_DEVICE_IDS``).
    * Slurm (``SLURM_NTASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) and multi-host Cloud TPU
      (``TPU_WORKER_HOSTNAMES`` lists several hosts): JAX detects everything itself.

    One process (a laptop, one GPU host with several GPUs) needs none of this.
    """
    if not _multi_process_env() or jax.distributed.is_initialized():
        return False
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
