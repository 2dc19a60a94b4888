"""Meshes and the logical-axis rules as code; sharded model steps on 8 fake CPU devices (subprocesses).

The rules are tested as data (every logical name the model uses has a rule, every sharded dimension of
the presets divides on the meshes we run, the MoE layout is the intended one) because rule drift costs
silently: maxtext#4005 was a 2.6x MoE slowdown from one missing ``'expert'`` in a batch rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from spattn_jax import config, optim, sharding
from spattn_jax.model import Transformer
from tests.multidevice import run

# Meshes (data, fsdp, expert, tensor) each preset is meant to run on.
PRESET_MESHES = {
    "tiny": [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 8, 1), (1, 1, 2, 4), (1, 8, 1, 1)],
    "olmoe_0p25b_1p75b": [(2, 1, 1, 1), (1, 1, 2, 1), (1, 2, 1, 1), (8, 1, 8, 1), (1, 8, 8, 1)],
    "olmoe_1b_7b": [(1, 8, 8, 1), (2, 4, 8, 1), (1, 4, 8, 2), (1, 1, 64, 1), (4, 16, 1, 1), (1, 16, 4, 1)],
    "table2_8l": [(8, 1, 1, 1), (1, 8, 1, 1), (1, 4, 1, 2), (1, 8, 1, 8)],
}


def _params_state(preset: str):
    return nnx.state(nnx.eval_shape(lambda: Transformer(config.get_preset(preset), rngs=nnx.Rngs(0))), nnx.Param)


def _mesh(shape):
    return dict(zip(sharding.MESH_AXES, shape))


# -- mesh config ---------------------------------------------------------------------------------


def test_mesh_config_resolves_the_rest():
    assert sharding.MeshConfig().shape(8) == (8, 1, 1, 1)
    assert sharding.MeshConfig(data=-1, expert=4).shape(64) == (16, 1, 4, 1)
    assert sharding.MeshConfig(1, 8, 8, 1).shape(64) == (1, 8, 8, 1)


@pytest.mark.parametrize(
    "kwargs, devices, message",
    [
        (dict(data=-1, fsdp=-1), 8, "at most one mesh axis may be -1"),
        (dict(data=0), 8, "must be >= 1 or -1"),
        (dict(data=-1, expert=3), 8, "does not fit 8 devices"),
        (dict(data=2, fsdp=2, expert=1, tensor=1), 8, "has 4 devices but 8 are available"),
    ],
)
def test_mesh_config_errors_are_one_line(kwargs, devices, message):
    with pytest.raises(ValueError, match=message) as info:
        sharding.MeshConfig(**kwargs).shape(devices)
    assert "\n" not in str(info.value)


def test_make_mesh_names_the_axes():
    mesh = sharding.make_mesh(sharding.MeshConfig())
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == jax.device_count()


# -- rules ---------------------------------------------------------------------------------------


def test_rules_table_has_one_rule_per_name_and_only_mesh_axes():
    names = [name for name, _ in sharding.RULES]
    assert len(names) == len(set(names))
    for _, target in sharding.RULES:
        targets = () if target is None else (target,) if isinstance(target, str) else target
        assert set(targets) <= set(sharding.MESH_AXES)


def test_moe_and_dense_layouts():
    mesh = _mesh((2, 2, 2, 2))
    # expert weight [exp, embed, mlp]: experts over expert, embed FSDP over fsdp only, hidden over tensor
    assert sharding.logical_to_spec(("exp", "embed", "mlp"), mesh, (8, 64, 64)) == P("expert", "fsdp", "tensor")
    assert sharding.logical_to_spec(("exp", "mlp", "embed"), mesh, (8, 64, 64)) == P("expert", "tensor", "fsdp")
    # dense weight: embed FSDP over fsdp and expert (maxtext's "embed")
    assert sharding.logical_to_spec(("embed", "q_heads", "head_dim"), mesh, (64, 4, 16)) == P(
        ("fsdp", "expert"), "tensor", None
    )
    assert sharding.logical_to_spec(("vocab", "embed"), mesh, (256, 64)) == P("tensor", ("fsdp", "expert"))
    # tokens: batch over every batch-carrying axis, expert included (maxtext#4005)
    assert sharding.logical_to_spec(sharding.BATCH_LENGTH_EMBED, mesh) == P(("data", "fsdp", "expert"), None, None)
    heads = sharding.logical_to_spec(sharding.BATCH_LENGTH_HEADS, mesh)
    assert heads == P(("data", "fsdp", "expert"), None, "tensor", None)
    # size-1 axes drop out: on pure data parallelism every parameter is replicated
    dp = _mesh((8, 1, 1, 1))
    assert sharding.logical_to_spec(("exp", "embed", "mlp"), dp, (8, 64, 64)) == P(None, None, None)


def test_unknown_names_and_uneven_splits_raise():
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'heads'"):
        sharding.logical_to_spec(("heads",), _mesh((1, 1, 1, 2)))
    with pytest.raises(ValueError, match=r"\('q_heads', size 3\).*not divisible by mesh axes \('tensor',\)"):
        sharding.logical_to_spec(("embed", "q_heads", "head_dim"), _mesh((1, 1, 1, 2)), (64, 3, 16))


@pytest.mark.parametrize("preset", sorted(PRESET_MESHES))
def test_every_parameter_has_a_rule_and_divides(preset):
    state = _params_state(preset)
    for shape in PRESET_MESHES[preset]:
        specs = sharding.param_specs(state, _mesh(shape))  # raises on a missing rule or an uneven split
        assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))) == len(jax.tree.leaves(state))


@pytest.mark.parametrize("preset, shape", [("tiny", (1, 2, 2, 2)), ("olmoe_1b_7b", (1, 4, 8, 2))])
def test_every_activation_name_has_a_rule(preset, shape):
    """Trace the model (shapes only) under a mesh the machine lacks: every constrain() resolves."""
    cfg = config.get_preset(preset)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    used = []
    real = sharding.logical_to_spec

    def spy(axes, *args, **kwargs):
        used.append(tuple(axes))
        return real(axes, *args, **kwargs)

    mesh = sharding.abstract_mesh(sharding.MeshConfig(*shape), int(jnp.prod(jnp.array(shape))))
    tokens = jax.ShapeDtypeStruct((16, 64), jnp.int32)
    try:
        sharding.logical_to_spec = spy
        with jax.sharding.use_abstract_mesh(mesh):
            logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t)[0], state, tokens)
    finally:
        sharding.logical_to_spec = real
    assert logits.shape == (16, 64, cfg.vocab_size)
    names = {n for axes in used for n in axes if n is not None}
    assert {"activation_batch", "activation_heads", "activation_vocab", "exp", "mlp"} <= names


def test_constrain_and_attention_are_single_device_code_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert sharding.current_mesh() is None
    assert sharding.constrain(x, sharding.BATCH_LENGTH_EMBED) is x


# -- optimizer state and memory ------------------------------------------------------------------


def test_optimizer_state_is_sharded_like_the_parameters():
    state = _params_state("tiny")
    mesh = _mesh((1, 2, 2, 2))
    p_specs = sharding.param_specs(state, mesh)
    optimizer = optim.make_optimizer(optim.OptimConfig(), 10)
    abstract = jax.eval_shape(optimizer.init, state.to_pure_dict())
    o_specs = sharding.optimizer_specs(optimizer, abstract, p_specs)
    adam = next(s for s in jax.tree.leaves(o_specs, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    assert adam.mu == p_specs and adam.nu == p_specs and adam.count == P()
    w1 = p_specs["layers"][0]["ffn"]["w1"]
    assert w1 == P("expert", "fsdp", "tensor")


def test_bytes_per_device_is_shape_arithmetic():
    state = _params_state("tiny")
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.to_pure_dict()))
    replicated = sharding.param_specs(state, _mesh((8, 1, 1, 1)))
    assert sharding.bytes_per_device(state.to_pure_dict(), replicated, _mesh((8, 1, 1, 1))) == total
    mesh = _mesh((1, 8, 1, 1))  # FSDP over 8: every parameter with an embed dim is split 8 ways
    per_device = sharding.bytes_per_device(state.to_pure_dict(), sharding.param_specs(state, mesh), mesh)
    norms = sum(x.size * 4 for x in jax.tree.leaves(state.to_pure_dict()) if x.ndim == 1)
    assert per_device == (total - norms) // 8 + norms


# -- processes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"TPU_WORKER_HOSTNAMES": "host0"}, False),
        ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, True),
        ({"SLURM_NTASKS": "4", "SPATTN_DISTRIBUTED": "0"}, False),
        ({"SPATTN_DISTRIBUTED": "1"}, True),
    ],
)
def test_initialize_distributed_only_when_launched_as_several_processes(monkeypatch, env, expected):
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SPATTN_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert sharding.initialize_distributed() is expected
    assert len(calls) == int(expected)
    if "JAX_PROCESS_ID" in env:
        assert calls[0] == {"num_processes": 2, "process_id": 1}


# -- on 8 fake devices ---------------------------------------------------------------------------


def _assert_attention_close(result, rel=2e-6):
    scale = result.pop("scale")
    wrong = result.pop("no_head_offset")
    for mesh, errors in result.items():
        for name, err, s in zip(("loss", "dq", "dk", "dv"), errors, scale):
            assert err <= rel * s + 1e-6, f"mesh {mesh}: {name} differs by {err:.3g} (scale {s:.3g})"
    # the negative control: without the head offset the shards run the wrong bands
    assert max(e / s for e, s in zip(wrong, scale)) > 1e-2


def test_head_sharded_attention_gives_each_shard_its_bands():
    result, _ = run("parallel_ops", "attention", "reference", "spattention")
    _assert_attention_close(result)


@pytest.mark.slow
def test_head_sharded_pallas_kernel_gives_each_shard_its_bands():
    # The Pallas (Triton-lowered) kernel in interpret mode, exclusive bands (rows with no key).
    result, _ = run("parallel_ops", "attention", "pallas_triton", "spattention_exclusive")
    _assert_attention_close(result)


def _assert_losses_match(result: dict, rel: float) -> dict:
    single, _ = result.pop("single")
    diffs = {}
    for mesh, (losses, _) in result.items():
        diffs[mesh] = max(abs(a - b) for a, b in zip(losses, single))
        for step, (a, b) in enumerate(zip(losses, single), 1):
            assert abs(a - b) <= rel * abs(b), f"mesh {mesh}, step {step}: loss {a} vs single-device {b}"
    return diffs


def test_train_steps_on_meshes_equal_the_unsharded_model():
    """5 AdamW steps of the tiny MoE: (8,1,1,1), (2,2,2,1), (1,2,2,2), (1,1,8,1) vs no mesh; fp32."""
    result, stderr = run("train_steps", "steps", "float32")
    _assert_losses_match(result, rel=1e-5)
    # A rule that forces XLA to replicate a sharded array to reshard it is a silent slowdown.
    assert "Involuntary full rematerialization" not in stderr


@pytest.mark.slow
def test_train_steps_on_meshes_equal_the_unsharded_model_bf16():
    # Two of the four meshes (the fp32 test above takes all four): data x fsdp x expert, and tensor.
    result, _ = run("train_steps", "steps", "bfloat16", "2,2,2,1", "1,2,2,2")
    assert sorted(result) == ["1,2,2,2", "2,2,2,1", "single"]
    _assert_losses_match(result, rel=1e-2)  # bf16 tolerance: routing and rounding differ after 5 steps


# -- the train loop on 8 fake devices (train_loop.train: Grain data, AdamW, Orbax) ----------------

# The model steps above cover all four 8-device meshes; through the train loop (Grain, Orbax, the
# sharded batch) two of them: every axis but "tensor" at once, and experts alone.
TRAIN_MESHES = ("2,2,2,1", "1,1,8,1")


@pytest.mark.slow
def test_train_loop_on_meshes_matches_one_device(tmp_path):
    """5 steps of the tiny MoE through the real train loop: one device vs two 8-device meshes."""
    one, _ = run("train_runs", "meshes", str(tmp_path / "one"), "1,1,1,1", devices=1)
    eight, stderr = run("train_runs", "meshes", str(tmp_path / "eight"), *TRAIN_MESHES)
    want = one["1,1,1,1"]
    assert sorted(want, key=int) == ["1", "2", "3", "4", "5"]
    for mesh, losses in eight.items():
        for step, loss in want.items():
            # fp32 model: agreement to rounding; the issue asks for bf16 tolerance (1e-2), far looser.
            assert losses[step] == pytest.approx(loss, rel=1e-5), f"mesh {mesh}, step {step}"
    assert "Involuntary full rematerialization" not in stderr


def test_checkpoint_saved_on_one_mesh_resumes_on_another(tmp_path):
    """Saved on (2,2,2,1), restored onto (1,2,2,2): the same numbers in the new layout, and steps 6-10
    continue as the straight run on the old mesh does."""
    result, _ = run("train_runs", "resume", str(tmp_path), "2,2,2,1", "1,2,2,2")
    assert result["restored_equal"] and result["restored_on_b_layout"]
    straight, resumed = result["straight"], result["resumed"]
    for step in map(str, range(6, 11)):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), f"step {step}"


def test_dry_run_sizes_a_64_device_mesh_without_allocating(capsys):
    """``train.py --dry_run`` on this one-device machine: OLMoE-1B-7B on a (1, 8, 8, 1) mesh."""
    import gc

    import gin

    import train

    gc.collect()  # train.main collects garbage too: count live arrays without earlier tests' garbage
    before = len(jax.live_arrays())
    try:
        code = train.main(["--dry_run", "--gin_file=experiments/olmoe_1b_7b.gin", "--gin_param=train.mesh=(1,8,8,1)"])
    finally:
        gin.clear_config()
    out = capsys.readouterr().out
    assert code == 0 and len(jax.live_arrays()) == before
    assert "data=1 fsdp=8 expert=8 tensor=1 (64 devices; abstract, nothing allocated)" in out
    assert "6,919,161,856 parameters" in out
    # fp32 parameters 25.78 GiB in all; per device a little over 1/64 (norm scales are replicated)
    per_device = {line.split(":")[0].strip(): line.split(":")[1].split("per device")[0].strip()
                  for line in out.splitlines() if "per device" in line}
    assert per_device["parameters"] == "412.9 MiB" and per_device["optimizer state"] == "825.8 MiB"
