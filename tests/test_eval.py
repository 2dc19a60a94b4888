"""eval.py: scores a checkpoint exactly as the training loop's validation pass did."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from spattn_jax.metrics import read_jsonl
from tests.test_train import REPO, STEPS, _env, straight_run  # noqa: F401 -- the shared 40-step run


def run_eval(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, "eval.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=300)


def test_eval_matches_the_training_loops_validation_loss(straight_run):  # noqa: F811
    proc = run_eval(f"--checkpoint_dir={straight_run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    logged = read_jsonl(os.path.join(straight_run, "metrics.jsonl"), "validation")[STEPS]
    assert result["step"] == STEPS and result["split"] == "validation"
    assert result["tokens"] == logged["tokens"]
    assert result["loss"] == pytest.approx(logged["loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(logged["loss"]), rel=1e-6)


def test_eval_on_files_and_an_older_step(straight_run, tmp_path):  # noqa: F811
    text = "def f(x):\n    return x + 1\n" * 20
    (tmp_path / "doc.txt").write_text(text)
    proc = run_eval(
        f"--checkpoint_dir={straight_run / 'checkpoints'}", "--step=30", f"--data_path={tmp_path}",
        "--eval_batches=0", "--gin_param=data.batch_size=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 30 and result["tokens"] == len(text) - 1  # bytes, all but the first
    assert 0 < result["loss"] < math.log(256) + 0.5


@pytest.mark.parametrize("mesh", ["2,2,2,1"])
def test_eval_on_a_mesh_equals_one_device(straight_run, mesh):  # noqa: F811
    """Parameters restored split over 8 (fake CPU) devices score like the single-device run."""
    # Four batches: the whole validation split took 145 s on the 8-device fake mesh on 2 CI cores.
    args = (f"--checkpoint_dir={straight_run}", "--gin_param=data.batch_size=8", "--eval_batches=4")
    one = run_eval(*args)
    split = run_eval(*args, f"--mesh={mesh}", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0 and split.returncode == 0, (one.stderr[-2000:], split.stderr[-2000:])
    one, split = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (one, split))
    assert split["tokens"] == one["tokens"] > 0
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_eval_bad_mesh_is_one_line(straight_run):  # noqa: F811
    proc = run_eval(f"--checkpoint_dir={straight_run}", "--mesh=2,2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --mesh takes four comma-separated sizes data,fsdp,expert,tensor, got '2,2'"
    ]


def test_eval_errors_are_one_line(tmp_path):
    proc = run_eval(f"--checkpoint_dir={tmp_path / 'nothing'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: checkpoint directory not found: " + str(tmp_path / "nothing")]
