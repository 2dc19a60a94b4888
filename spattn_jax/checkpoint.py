"""Checkpoints: an Orbax ``CheckpointManager`` over three items, with fallback past damaged checkpoints.

A checkpoint at step ``s`` (directory ``<dir>/<s>``) holds

* ``state`` -- the train state pytree (params, optimizer state, step, RNG key), ``StandardSave``;
* ``data`` -- the training iterator's Grain state (a small JSON per process), Grain's own handler;
* ``meta`` -- JSON: the model and data configs, so ``eval.py`` can rebuild the model from the
  checkpoint directory alone.

Orbax writes a step to a temporary directory and renames it when complete, so a process killed
mid-save leaves no step behind. A step that is complete on disk but unreadable (truncated or
corrupted files) is reported, moved to ``<dir>.corrupt/<s>``, and the previous step is tried.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def make_manager(
    directory: str, *, save_every: int, keep: int | None, async_save: bool = True, create: bool = True
) -> ocp.CheckpointManager:
    """A manager that saves every ``save_every`` steps (or when forced) and keeps the newest ``keep``."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1),
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=create,  # leftovers of a save a kill interrupted
        create=create,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
    meta: dict,
    *,
    force: bool = False,
) -> bool:
    """Start saving ``step`` if the interval says so (or ``force``); returns whether a save started.

    The array write is asynchronous; the iterator state is captured now, in this call.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta),
    )
    return manager.save(step, args=args, force=force)


def _quarantine(manager: ocp.CheckpointManager, step: int) -> None:
    """Move an unreadable step out of the manager's directory (kept for inspection, never reused)."""
    src = os.path.join(str(manager.directory), str(step))
    dst_root = str(manager.directory).rstrip("/") + ".corrupt"
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, str(step))
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.move(src, dst)
    manager.reload()


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: Any | None,
) -> tuple[int, Any, dict] | None:
    """Restore the newest readable step: ``(step, state, meta)``, or ``None`` when there is none.

    ``abstract_state`` gives the structure, shapes, dtypes and shardings to restore into (from
    ``jax.eval_shape``). ``data_iterator`` (a Grain ``DatasetIterator``) is set to the saved position
    in place; pass ``None`` to skip it (evaluation). Unreadable steps are logged as warnings and
    moved aside; the next older one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 -- any decode/IO error means "this step is unusable"
            reason = " ".join(str(e).split())[:300]
            log.warning(
                "checkpoint step %d in %s is unreadable (%s: %s); moving it to %s.corrupt and trying the "
                "previous one",
                step, manager.directory, type(e).__name__, reason, manager.directory,
            )
            _quarantine(manager, step)
            continue
        return step, restored["state"], dict(restored["meta"])
    return None


def open_existing(directory: str) -> ocp.CheckpointManager:
    """A manager over checkpoints that already exist (evaluation): creates and deletes nothing."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    return make_manager(directory, save_every=1, keep=None, async_save=False, create=False)


def read_meta(manager: ocp.CheckpointManager, step: int | None = None) -> tuple[int, dict]:
    """``(step, meta)`` of ``step`` (default: the newest) without restoring any array."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {manager.directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory} (have {steps})")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return step, dict(meta)


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
    """The parameters of ``step``, restored into ``abstract_params``'s layout; the optimizer state
    and the data iterator are not read (evaluation needs a third of the state's memory)."""
    # The manager's "state" item is a standard (pytree) checkpoint; reading a subtree of it needs the
    # pytree handler's partial restore, which the manager's registered standard handler lacks.
    item = {"params": abstract_params}
    path = os.path.join(os.fspath(manager.directory), str(step), "state")
    restore = ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(path, args=restore)["params"]


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """The train state of ``step`` alone (no iterator), restored into ``abstract_state``'s layout."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return manager.restore(step, args=args)["state"]
