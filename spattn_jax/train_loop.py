"""The training and evaluation loops: pure step functions plus the loop that drives them.

The train state is a plain pytree (saved as is by Orbax)::

    {"params": <pure dict of the model's nnx.Param values>,
     "opt_state": <Optax state>,
     "step": int32 [],          # optimizer steps taken
     "rng": uint32 [2]}         # key data; reserved for stochastic layers (the model has none yet),
                                # saved and restored so that they resume exactly once added

The model's graph (``nnx.split``) is static; each step merges it with the params inside ``jit``.

Loss per optimizer step (nats per target token): ``sum_t w_t CE_t / sum_t w_t + aux`` where ``w_t`` is
1 for real targets and 0 for padding (segment id 0), ``aux`` the model's weighted MoE load-balancing
and router z-losses (``aux["aux_loss"]``), plus optionally ``logit_z_loss_weight * log(Z)^2`` per token
(PaLM's output z-loss; off by default, OLMoE uses only the router's). Gradient accumulation scans over
``grad_accum_steps`` micro-batches; target tokens are normalised by the whole batch's count, so the
accumulated gradient equals the one-batch gradient (the aux term is averaged over micro-batches).

Parallelism (:mod:`spattn_jax.sharding`): a mesh ``(data, fsdp, expert, tensor)`` of
:attr:`TrainConfig.mesh` over the devices of every process. The logical-axis rules lay out the
parameters, and the optimizer state like them; batch rows go over the batch axes. The steps are
jitted with those in/out shardings and run under ``jax.set_mesh``, where the model finds the mesh
(activation constraints, expert-parallel MoE dispatch, head-sharded attention kernels). One device
is the 1x1x1x1 mesh: the same code path.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from spattn_jax import checkpoint, data, metrics, optim, sharding, tokenizers
from spattn_jax.config import ModelConfig
from spattn_jax.model import Transformer

log = logging.getLogger(__name__)

# Test-only fault injection: after this optimizer step the loop sleeps for an hour, so a test can kill
# the process at a known point (after that step's checkpoint) with SIGKILL.
_FAULT_SLEEP_ENV = "SPATTN_FAULT_SLEEP_AT_STEP"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long to train and what to write.

    Attributes:
      run_dir: where checkpoints (``checkpoints/``), ``metrics.jsonl``, TensorBoard events
        (``tensorboard/``) and the resolved gin config go. A run restarted with the same ``run_dir``
        resumes from its newest readable checkpoint.
      total_steps: optimizer steps of the whole run (the schedule's length unless ``decay_steps``).
      grad_accum_steps: micro-batches per optimizer step; the data batch is split into this many.
      seed: model initialisation and the state's RNG key.
      log_every: steps between training-metric records.
      eval_every: steps between validation passes (also before the first step and after the last).
      eval_batches: validation batches per pass (0: the whole validation split).
      checkpoint_every: steps between checkpoints (the last step is always saved).
      keep_checkpoints: newest checkpoints kept on disk.
      async_checkpointing: write arrays in the background while training continues.
      logit_z_loss_weight: weight of the output-logit z-loss ``log(Z)^2`` per token (0: off).
      peak_flops_per_device: overrides the device table for MFU (FLOP/s); ``None``: look it up.
      progress_bar: show a tqdm bar with ETA on process 0.
      mesh: mesh axis sizes ``(data, fsdp, expert, tensor)`` (:class:`spattn_jax.sharding.MeshConfig`);
        one may be -1, the rest of the devices. Default: data parallelism over every device.
    """

    run_dir: str = "runs/default"
    total_steps: int = 1000
    grad_accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 16
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    logit_z_loss_weight: float = 0.0
    peak_flops_per_device: float | None = None
    progress_bar: bool = True
    mesh: tuple[int, int, int, int] = (-1, 1, 1, 1)

    def __post_init__(self):
        object.__setattr__(self, "mesh", tuple(self.mesh))  # gin and checkpoint JSON hand over lists
        if len(self.mesh) != len(sharding.MESH_AXES):
            raise ValueError(
                f"train mesh needs {len(sharding.MESH_AXES)} sizes {sharding.MESH_AXES}, got {self.mesh}"
            )
        self.mesh_config  # validates the sizes
        for name in ("total_steps", "grad_accum_steps", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train {name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.eval_batches < 0:
            raise ValueError(f"eval_batches must be >= 0, got {self.eval_batches}")

    @property
    def mesh_config(self) -> sharding.MeshConfig:
        return sharding.MeshConfig(*self.mesh)


# -- checks -------------------------------------------------------------------------------------


def check_setup(model_cfg: ModelConfig, data_cfg: data.DataConfig, train_cfg: TrainConfig, num_devices: int) -> None:
    """One-line ValueErrors for settings that cannot train, before anything is built.

    ``num_devices``: the devices the batch rows are split over (the mesh's batch axes).
    """
    model_cfg.check_length(data_cfg.seq_len)  # seq_len > max_seq_len or > band_len
    rows = train_cfg.grad_accum_steps * num_devices
    if data_cfg.batch_size % rows:
        raise ValueError(
            f"batch_size={data_cfg.batch_size} is not divisible by {num_devices} device(s) x "
            f"{train_cfg.grad_accum_steps} accumulation step(s); use a multiple of {rows}"
        )
    if data_cfg.tokenizer != "byte" or model_cfg.vocab_size < 256:
        vocab = tokenizers.load(data_cfg.tokenizer).vocab_size
        if vocab > model_cfg.vocab_size:
            raise ValueError(
                f"tokenizer {data_cfg.tokenizer} has {vocab} tokens but the model's vocab_size is "
                f"{model_cfg.vocab_size}; raise vocab_size"
            )


# -- state --------------------------------------------------------------------------------------


def model_graph(model_cfg: ModelConfig):
    """``(graphdef, rest)``: the model's static graph and its non-parameter state (none today)."""
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise NotImplementedError("the model has non-parameter state; the train loop does not carry it yet")
    return graphdef, rest


def state_initializer(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int) -> Callable[[], dict]:
    """A function building the initial train state (``jax.eval_shape`` it for the abstract state)."""

    def init() -> dict:
        model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }

    return init


def abstract_state(init: Callable[[], dict], shardings) -> Any:
    """``ShapeDtypeStruct`` pytree of the state (restore target): ``shardings`` is one sharding for
    every leaf, or a pytree of them like the state (a checkpoint then restores onto that layout,
    whatever mesh it was saved from)."""
    shapes = jax.eval_shape(init)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def state_specs(
    model_cfg: ModelConfig, optimizer: optax.GradientTransformation, init: Callable[[], dict], mesh
) -> dict:
    """``PartitionSpec`` pytree of the train state on ``mesh`` (a real or an abstract mesh).

    Parameters by the logical-axis rules (:func:`spattn_jax.sharding.param_specs`), the optimizer state
    like its parameters (:func:`spattn_jax.sharding.optimizer_specs`), step and RNG key replicated.
    """
    abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    params = sharding.param_specs(nnx.state(abstract_model, nnx.Param), mesh)
    opt_state = sharding.optimizer_specs(optimizer, jax.eval_shape(init)["opt_state"], params)
    return {"params": params, "opt_state": opt_state, "step": P(), "rng": P()}


# -- losses and steps ---------------------------------------------------------------------------


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(CE, log(Z)^2)`` per token, both float32 ``[B, T]``, from float32 logits ``[B, T, V]``."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - target_logit, jnp.square(logz)


def _forward(graphdef, rest, params, batch):
    model = nnx.merge(graphdef, params, rest)
    return model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])


def _micro_batches(batch: dict, count: int) -> dict:
    """``[B, T] -> [count, B / count, T]``; micro-batch ``a`` takes rows ``a, a + count, ...``.

    Strided rather than contiguous so that, with rows sharded contiguously over devices, every
    micro-batch keeps an equal share of each device's rows and nothing moves between devices.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(
    graphdef, rest, optimizer, schedule, train_cfg: TrainConfig, place: "Placement | None" = None
) -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted, the state donated.

    With ``place`` the step is jitted with its state and batch shardings and runs under its mesh.
    """
    accum = train_cfg.grad_accum_steps
    grad_layout = (lambda g: g) if place is None else place.like_params  # noqa: E731
    z_weight = train_cfg.logit_z_loss_weight

    def step_fn(state: dict, batch: dict):
        params = state["params"]
        num_targets = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)

        def micro_loss(p, mb):
            logits, aux = _forward(graphdef, rest, p, mb)
            ce, logz2 = token_losses(logits, mb["targets"])
            w = (mb["segment_ids"] > 0).astype(jnp.float32)
            ce_sum = jnp.sum(ce * w)
            loss = (ce_sum + z_weight * jnp.sum(logz2 * w)) / num_targets + aux["aux_loss"] / accum
            return loss, (ce_sum, aux)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        micro = _micro_batches(batch, accum)

        def body(carry, mb):
            (loss, (ce_sum, aux)), grads = grad_fn(params, mb)
            aux = jax.tree.map(lambda a: a / accum, aux)  # reported aux values: mean over micro-batches
            return jax.tree.map(jnp.add, carry, (grads, loss, ce_sum, aux)), None

        # Zeros shaped like one micro-step's outputs start the sums.
        (_, (_, aux_shape)) = jax.eval_shape(micro_loss, params, jax.tree.map(lambda x: x[0], micro))
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
        # Gradients laid out like the parameters: FSDP reduce-scatters them instead of all-reducing.
        init = (grad_layout(zeros(params)), jnp.zeros(()), jnp.zeros(()), zeros(aux_shape))
        (grads, loss, ce_sum, aux), _ = jax.lax.scan(body, init, micro)
        grads = grad_layout(grads)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        out = {
            "loss": ce_sum / num_targets,
            "total_loss": loss,
            "aux_loss": aux["aux_loss"],
            "lb_loss": aux["lb_loss"],
            "z_loss": aux["z_loss"],
            "router_load": aux["router_load"],
            "router_entropy": aux["router_entropy"],
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "target_tokens": num_targets,
        }
        return new_state, out

    if place is None:
        return jax.jit(step_fn, donate_argnums=0)
    state = place.state_shardings
    return place.jit(step_fn, (state, place.batch), (state, place.replicated), donate_argnums=0)


def make_eval_step(graphdef, rest, place: "Placement | None" = None) -> Callable:
    """``eval_step(params, batch) -> (sum of target CE in nats, number of targets)``, jitted."""

    def eval_fn(params, batch):
        logits, _ = _forward(graphdef, rest, params, batch)
        ce, _ = token_losses(logits, batch["targets"])
        w = (batch["segment_ids"] > 0).astype(jnp.float32)
        return jnp.sum(ce * w), jnp.sum(w)

    if place is None:
        return jax.jit(eval_fn)
    params = place.replicated if place.state is None else place.state["params"]
    return place.jit(eval_fn, (params, place.batch), place.replicated)


def evaluate(eval_step: Callable, params, batches: Iterable[dict], num_batches: int, to_device: Callable) -> dict:
    """Token-weighted mean CE over the first ``num_batches`` batches (0: all): loss, perplexity, tokens.

    Sums are accumulated in float64 on the host, so the result does not depend on how the tokens
    were split into batches beyond float32 rounding inside each batch.
    """
    total, count = 0.0, 0.0
    it = iter(batches)
    try:
        for i, batch in enumerate(it):
            if num_batches and i >= num_batches:
                break
            s, n = eval_step(params, to_device(batch))
            total += float(s)
            count += float(n)
    finally:
        if hasattr(it, "close"):
            it.close()
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": metrics.perplexity(loss), "tokens": int(count)}


# -- devices ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where arrays live: the train state as ``state`` (``None``: replicated), batch rows as ``batch``."""

    mesh: jax.sharding.Mesh
    replicated: NamedSharding
    batch: NamedSharding
    state: Any = None

    def put_batch(self, batch: dict) -> dict:
        """This process's ``[B_process, T]`` numpy rows -> global ``[B, T]`` arrays."""
        return {k: jax.make_array_from_process_local_data(self.batch, v) for k, v in batch.items()}

    @property
    def state_shardings(self) -> Any:
        return self.replicated if self.state is None else self.state

    @property
    def batch_shards(self) -> int:
        """Devices the batch rows are split over."""
        return math.prod(self.mesh.shape[axis] for axis in _spec_axes(self.batch.spec))

    def like_params(self, tree):
        """Constrain a params-like pytree (gradients) to the parameters' layout, inside ``jit``."""
        return tree if self.state is None else jax.lax.with_sharding_constraint(tree, self.state["params"])

    def jit(self, fn: Callable, in_shardings, out_shardings, **kwargs) -> Callable:
        """``jax.jit`` with these shardings, traced and run under this mesh (``jax.set_mesh``)."""
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **kwargs)

        def run(*args):
            with jax.set_mesh(self.mesh):
                return jitted(*args)

        return run


def _spec_axes(spec: P) -> set[str]:
    out: set[str] = set()
    for entry in spec:
        out.update(() if entry is None else (entry,) if isinstance(entry, str) else entry)
    return out


def mesh_placement(
    mesh_cfg: sharding.MeshConfig, model_cfg: ModelConfig, optimizer, init: Callable[[], dict]
) -> Placement:
    """The mesh of ``mesh_cfg`` over every device, the state laid out by the rules, rows over the batch axes."""
    mesh = sharding.make_mesh(mesh_cfg)
    state = sharding.named(mesh, state_specs(model_cfg, optimizer, init, mesh))
    batch = NamedSharding(mesh, sharding.logical_to_spec(("activation_batch", None), mesh))
    return Placement(mesh, NamedSharding(mesh, P()), batch, state)


def data_parallel_placement() -> Placement:
    # Auto axis types: the model's code carries no sharding annotations for explicit mode yet.
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return Placement(mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))


# -- the loop -----------------------------------------------------------------------------------


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after this step, then exiting", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checkpoint_meta(model_cfg, data_cfg, optim_cfg, train_cfg, step: int) -> dict:
    return {
        "step": step,
        "model": dataclasses.asdict(model_cfg),
        "data": dataclasses.asdict(data_cfg),
        "optim": dataclasses.asdict(optim_cfg),
        "train": dataclasses.asdict(train_cfg),
    }


def _fault_injection(step: int) -> None:
    if os.environ.get(_FAULT_SLEEP_ENV) == str(step):
        log.warning("%s=%d: sleeping (test fault injection)", _FAULT_SLEEP_ENV, step)
        time.sleep(3600)


def train(
    model_cfg: ModelConfig,
    data_cfg: data.DataConfig,
    optim_cfg: optim.OptimConfig,
    train_cfg: TrainConfig,
) -> dict:
    """Train (or resume) to ``train_cfg.total_steps``; returns a summary dict.

    Summary keys: ``start_step`` (0 or the step resumed from), ``final_step``, ``stopped_by_signal``
    (a signal number or ``None``), ``train_loss`` (last logged), ``val_loss`` (last validation pass,
    ``None`` without a validation split), ``seconds``.
    """
    t_start = time.time()
    optimizer = optim.make_optimizer(optim_cfg, train_cfg.total_steps)
    schedule = optim.make_schedule(optim_cfg, train_cfg.total_steps)
    init = state_initializer(model_cfg, optimizer, train_cfg.seed)
    # Shapes and layouts only (nothing allocated); raises one-line errors for a mesh that does not fit.
    place = mesh_placement(train_cfg.mesh_config, model_cfg, optimizer, init)
    check_setup(model_cfg, data_cfg, train_cfg, place.batch_shards)
    is_main = jax.process_index() == 0

    train_data = data.make_pipeline(data_cfg, "train")
    try:
        val_data = data.make_pipeline(data_cfg, "validation")
    except data.EmptySplitError as e:
        log.warning("%s; validation is skipped", e)
        val_data = None

    graphdef, rest = model_graph(model_cfg)

    manager = checkpoint.make_manager(
        os.path.join(train_cfg.run_dir, "checkpoints"),
        save_every=train_cfg.checkpoint_every,
        keep=train_cfg.keep_checkpoints,
        async_save=train_cfg.async_checkpointing,
    )
    data_iter = iter(train_data.dataset)
    # Restoring into the current layout reshards a checkpoint saved on another mesh.
    restored = checkpoint.restore_latest(manager, abstract_state(init, place.state_shardings), data_iter)
    if restored is None:
        start_step = 0
        state = jax.jit(init, out_shardings=place.state_shardings)()
    else:
        start_step, state, _ = restored
        if is_main:
            log.info("resuming from the checkpoint of step %d in %s", start_step, manager.directory)

    train_step = make_train_step(graphdef, rest, optimizer, schedule, train_cfg, place)
    eval_step = make_eval_step(graphdef, rest, place)
    writer = metrics.MetricsWriter(train_cfg.run_dir, enabled=is_main)
    flops = metrics.flops_per_token(model_cfg, data_cfg.seq_len)
    peak = train_cfg.peak_flops_per_device or metrics.peak_flops(jax.devices()[0].device_kind)
    tokens_per_step = data_cfg.batch_size * data_cfg.seq_len

    def run_eval(step: int) -> float | None:
        if val_data is None:
            return None
        result = evaluate(eval_step, state["params"], val_data.dataset, train_cfg.eval_batches, place.put_batch)
        writer.write(step, result, prefix="validation")
        return result["loss"]

    summary: dict[str, Any] = {"start_step": start_step, "stopped_by_signal": None, "train_loss": None}
    summary["val_loss"] = run_eval(0) if start_step == 0 else None

    from tqdm.auto import tqdm

    bar = tqdm(
        total=train_cfg.total_steps,
        initial=start_step,
        disable=not (train_cfg.progress_bar and is_main),
        unit="step",
        dynamic_ncols=True,
    )
    step = start_step
    try:
        with _StopRequest() as stop:
            t_mark, step_mark = None, start_step
            while step < train_cfg.total_steps:
                batch = place.put_batch(next(data_iter))
                state, step_metrics = train_step(state, batch)
                step += 1
                if t_mark is None:  # time from the end of the first (compiling) step
                    jax.block_until_ready(step_metrics)
                    t_mark, step_mark = time.time(), step
                last = step == train_cfg.total_steps
                if step % train_cfg.log_every == 0 or last:
                    host = jax.device_get(step_metrics)
                    now = time.time()
                    tps = (step - step_mark) * tokens_per_step / (now - t_mark) if step > step_mark else math.nan
                    t_mark, step_mark = now, step
                    record = {
                        **host,
                        "perplexity": metrics.perplexity(float(host["loss"])),
                        "tokens_per_second": tps,
                        "mfu": metrics.mfu(tps, flops.total, jax.device_count(), peak),
                        "flops_per_token": flops.total,
                    }
                    writer.write(step, record)
                    summary["train_loss"] = float(host["loss"])
                    bar.set_postfix(loss=f"{float(host['loss']):.3f}", refresh=False)
                if step % train_cfg.eval_every == 0 or last:
                    summary["val_loss"] = run_eval(step)
                meta = _checkpoint_meta(model_cfg, data_cfg, optim_cfg, train_cfg, step)
                if step % train_cfg.checkpoint_every == 0 or last:
                    checkpoint.save(manager, step, state, data_iter, meta, force=True)
                bar.update(1)
                if stop.signum is None and manager.reached_preemption(step):
                    stop.signum = signal.SIGTERM
                if stop.signum is not None:
                    if manager.latest_step() != step:
                        checkpoint.save(manager, step, state, data_iter, meta, force=True)
                    summary["stopped_by_signal"] = stop.signum
                    log.warning("stopped at step %d; checkpoint saved", step)
                    break
                _fault_injection(step)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
        data_iter.close()
    summary.update(final_step=step, seconds=time.time() - t_start)
    return summary


# -- dry run ------------------------------------------------------------------------------------


def dry_run(model_cfg: ModelConfig, optim_cfg: optim.OptimConfig, train_cfg: TrainConfig, num_devices: int) -> dict:
    """Per-device bytes of the parameters and the optimizer state on ``train_cfg.mesh`` over
    ``num_devices`` devices, from shapes and the sharding rules alone: nothing is allocated and the
    devices need not exist (an abstract mesh).

    Returns ``mesh`` (axis sizes), ``devices``, ``params`` (count), and ``bytes`` per device and in
    total for ``params``, ``opt_state`` and ``state`` (both, plus step and RNG key).
    """
    mesh = sharding.abstract_mesh(train_cfg.mesh_config, num_devices)
    optimizer = optim.make_optimizer(optim_cfg, train_cfg.total_steps)
    init = state_initializer(model_cfg, optimizer, train_cfg.seed)
    shapes = jax.eval_shape(init)
    specs = state_specs(model_cfg, optimizer, init, mesh)
    one = {axis: 1 for axis in sharding.MESH_AXES}

    def sizes(key):
        tree, spec = (shapes, specs) if key == "state" else (shapes[key], specs[key])
        return {
            "per_device": sharding.bytes_per_device(tree, spec, mesh),
            "total": sharding.bytes_per_device(tree, spec, one),
        }

    return {
        "mesh": dict(mesh.shape),
        "devices": num_devices,
        "params": sum(x.size for x in jax.tree.leaves(shapes["params"])),
        "bytes": {key: sizes(key) for key in ("params", "opt_state", "state")},
    }
