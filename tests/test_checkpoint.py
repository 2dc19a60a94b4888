"""Orbax checkpoints: round trip of state + Grain iterator + meta, retention, damaged-step fallback."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spattn_jax import checkpoint, data

CFG = data.DataConfig(seq_len=32, batch_size=2, seed=1, read_threads=1)


def _state(scale: float) -> dict:
    return {
        "params": {"w": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.ones(3) * scale},
        "step": jnp.asarray(int(scale), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(int(scale))),
    }


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _iterator():
    return iter(data.make_pipeline(CFG, "train", process_index=0, process_count=1).dataset)


def _save_steps(directory, steps, keep=5):
    manager = checkpoint.make_manager(directory, save_every=1, keep=keep, async_save=True)
    it = _iterator()
    for s in steps:
        next(it)
        assert checkpoint.save(manager, s, _state(s), it, {"step": s, "note": "x"}, force=True)
    manager.wait_until_finished()
    manager.close()
    nxt = next(it)
    it.close()
    return nxt  # the batch that follows the last save


def test_round_trip_restores_state_iterator_and_meta(tmp_path):
    following = _save_steps(tmp_path / "ckpt", [1, 2, 3])
    manager = checkpoint.make_manager(tmp_path / "ckpt", save_every=1, keep=5)
    it = _iterator()
    step, state, meta = checkpoint.restore_latest(manager, _abstract(_state(3)), it)
    assert step == 3 and meta == {"step": 3, "note": "x"}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(3))):
        np.testing.assert_array_equal(a, b)
    # The data iterator continues exactly where the saved run's did.
    np.testing.assert_array_equal(next(it)["inputs"], following["inputs"])
    it.close()
    assert checkpoint.read_meta(manager)[0] == 3 and checkpoint.read_meta(manager, 2)[1]["step"] == 2
    manager.close()


def test_keeps_only_the_newest(tmp_path):
    _save_steps(tmp_path / "ckpt", [10, 20, 30, 40], keep=2)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["30", "40"]


def test_empty_directory_restores_nothing(tmp_path):
    manager = checkpoint.make_manager(tmp_path / "ckpt", save_every=1, keep=2)
    assert checkpoint.restore_latest(manager, _abstract(_state(1)), None) is None
    manager.close()
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        checkpoint.open_existing(str(tmp_path / "missing"))


@pytest.mark.parametrize("damage", ["truncate", "delete_state"])
def test_damaged_newest_step_falls_back_with_a_warning(tmp_path, caplog, damage):
    _save_steps(tmp_path / "ckpt", [1, 2])
    newest = tmp_path / "ckpt" / "2"
    for dirpath, _, files in os.walk(newest / "state"):
        for name in files:
            path = os.path.join(dirpath, name)
            if damage == "truncate":
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
            else:
                os.remove(path)
    manager = checkpoint.make_manager(tmp_path / "ckpt", save_every=1, keep=5)
    with caplog.at_level(logging.WARNING, logger="spattn_jax.checkpoint"):
        step, state, _ = checkpoint.restore_latest(manager, _abstract(_state(1)), _iterator())
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
    assert any("checkpoint step 2" in r.message and "unreadable" in r.message for r in caplog.records)
    assert (tmp_path / "ckpt.corrupt" / "2").is_dir() and manager.all_steps() == [1]
    manager.close()
