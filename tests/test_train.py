"""train.py end to end, as a subprocess: learning, outputs, resume after SIGKILL, damaged checkpoints,
SIGTERM, and one-line errors for bad input.

Run A (:func:`straight_run`) trains the tiny preset for 40 steps on small rows and is shared by several
tests (and by ``test_eval.py``); it is computed once per session and cached on disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from spattn_jax.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
# Small rows so that a 40-step run takes seconds; every 10 steps a checkpoint, every step a log line.
SMALL = [
    f"train.total_steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=20",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "train.progress_bar=False",
    "data.seq_len=64",
    "data.batch_size=8",
]
# Held-out loss after 40 such steps, nats/byte (measured about 3.0; uniform is ln 256 = 5.55).
SHORT_RUN_BOUND = 3.6


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def train_cmd(run_dir, *params: str) -> list[str]:
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--run_dir={run_dir}"]
    return cmd + [f"--gin_param={p}" for p in params]


def run_train(run_dir, *params: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(run_dir, *params), cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout
    )


def train_losses(run_dir) -> dict[int, float]:
    return {s: r["loss"] for s, r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"), "train").items()}


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """Run A: 40 steps straight. Cached on disk so that other modules importing this fixture reuse it."""
    run_dir = tmp_path_factory.getbasetemp() / "straight_run"
    done = run_dir / "DONE"
    if not done.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = run_train(run_dir, *SMALL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done.write_text(proc.stdout + proc.stderr)
    return run_dir


def test_train_learns_and_writes_outputs(straight_run):
    run_dir = straight_run
    val = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), "validation")
    assert abs(val[0]["loss"] - math.log(256)) < 0.3  # an untrained byte model is near uniform
    assert val[STEPS]["loss"] < SHORT_RUN_BOUND
    assert val[STEPS]["perplexity"] == pytest.approx(math.exp(val[STEPS]["loss"]))
    train = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), "train")
    assert sorted(train) == list(range(1, STEPS + 1))
    rec = train[STEPS]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "aux_loss", "flops_per_token"):
        assert math.isfinite(rec[key]), key
    assert len(rec["router_entropy"]) == 2 and len(rec["router_load"][0]) == 8  # tiny: 2 layers, 8 experts
    assert sum(rec["router_load"][0]) == pytest.approx(1.0, abs=1e-5)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
    assert sorted(int(s) for s in os.listdir(run_dir / "checkpoints")) == [20, 30, 40]  # keep the last 3
    operative = (run_dir / "operative_config.gin").read_text()
    assert "model.preset = 'tiny'" in operative and "data.seq_len = 64" in operative
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["model"]["d_model"] == 64 and resolved["train"]["total_steps"] == STEPS


def test_restart_of_a_finished_run_trains_nothing(straight_run, tmp_path):
    run_dir = tmp_path / "again"
    shutil.copytree(straight_run, run_dir)
    proc = run_train(run_dir, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"trained steps {STEPS}..{STEPS}" in proc.stdout


def _wait_for(predicate, proc, timeout=240.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited early: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_resume_after_sigkill_matches_straight_run(straight_run, tmp_path):
    """Run B sleeps after step 25 (test fault injection), is SIGKILLed, restarts from the step-20
    checkpoint, and its losses for steps 21-40 equal run A's exactly."""
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(run_dir, *SMALL), cwd=REPO, env=_env({"SPATTN_FAULT_SLEEP_AT_STEP": "25"}),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics_file = run_dir / "metrics.jsonl"
        _wait_for(lambda: metrics_file.exists() and 25 in train_losses(run_dir), proc)
        _wait_for(lambda: (run_dir / "checkpoints" / "20" / "_CHECKPOINT_METADATA").exists(), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit()) == [10, 20]

    proc = run_train(run_dir, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the checkpoint of step 20" in proc.stderr
    a, b = train_losses(straight_run), train_losses(run_dir)
    assert [b[s] for s in range(21, STEPS + 1)] == [a[s] for s in range(21, STEPS + 1)]
    assert [b[s] for s in range(1, 21)] == [a[s] for s in range(1, 21)]


def _truncate_tree(path) -> int:
    count = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full)
            with open(full, "r+b") as f:
                f.truncate(size // 2)
            count += 1
    return count


def test_truncated_newest_checkpoint_falls_back_to_previous(straight_run, tmp_path):
    run_dir = tmp_path / "truncated"
    shutil.copytree(straight_run, run_dir)
    assert _truncate_tree(run_dir / "checkpoints" / "40") > 0
    proc = run_train(run_dir, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: checkpoint step 40" in proc.stderr and "unreadable" in proc.stderr
    assert "resuming from the checkpoint of step 30" in proc.stderr
    assert (run_dir / "checkpoints.corrupt" / "40").is_dir()
    # The rerun of steps 31-40 from the step-30 checkpoint reproduces run A.
    rerun = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    a = train_losses(straight_run)
    assert [r["loss"] for r in rerun if r["split"] == "train"][-10:] == [a[s] for s in range(31, STEPS + 1)]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    run_dir = tmp_path / "preempted"
    params = [p for p in SMALL if not p.startswith("train.total_steps")] + ["train.total_steps=100000"]
    proc = subprocess.Popen(
        train_cmd(run_dir, *params), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics_file = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics_file.exists() and len(train_losses(run_dir)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = max(train_losses(run_dir))
    saved = sorted(int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit())
    assert saved[-1] == last and last < 100000


@pytest.mark.parametrize(
    "params, expected",
    [
        (["data.paths=['/nonexistent/corpus']"], "data path not found: /nonexistent/corpus"),
        (["data.paths=['{empty}']"], "empty corpus"),
        (["data.seq_len=512"], "exceeds max_seq_len=256"),
        (["model.band_len=128", "data.seq_len=256"], "exceeds band_len=128"),
        (["data.batch_size=3"], "not divisible by 2 device(s)"),
        (["model.d_modle=64"], "doesn't have a parameter named 'd_modle'"),
        (["optim.lerning_rate=1e-3"], "doesn't have a parameter named 'lerning_rate'"),
    ],
    ids=["missing_path", "empty_corpus", "seq_len_over_max", "seq_len_over_band_len", "batch_vs_devices",
         "unknown_model_param", "unknown_optim_param"],
)
def test_bad_input_is_one_line_error(tmp_path, params, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.txt").write_text("")
    params = [p.replace("{empty}", str(empty)) for p in params]
    # Two fake CPU devices so that the batch check has something to divide by.
    proc = run_train(tmp_path / "run", *params, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert expected in lines[0]


def test_missing_gin_file_is_one_line_error(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--gin_file=no/such/file.gin"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "gin file not found: no/such/file.gin" in proc.stderr


def _parse_configs(files: list[str], params: list[str] = ()):
    import gin

    from spattn_jax import gin_bindings as gb

    gin.clear_config()
    try:
        gb.parse(files, list(params))
        return gb.model_config(), gb.data_config(), gb.optim_config(), gb.train_config()
    finally:
        gin.clear_config()


def test_default_experiment_is_the_tiny_preset_on_the_embedded_corpus():
    from spattn_jax.config import get_preset

    model, data_cfg, optim_cfg, train_cfg = _parse_configs(["experiments/tiny_cpu.gin"])
    assert model == get_preset("tiny") and model.mask_variant == "spattention"
    assert data_cfg.paths == () and data_cfg.tokenizer == "byte" and data_cfg.seq_len == model.max_seq_len
    assert (optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, optim_cfg.weight_decay, optim_cfg.clip_norm) == (
        0.9, 0.95, 1e-8, 0.1, 1.0)
    assert train_cfg.total_steps == 300 and train_cfg.run_dir == "runs/tiny_cpu"


def test_every_preset_and_variant_file_binds_what_it_names():
    from spattn_jax import masks
    from spattn_jax.config import PRESETS

    for preset in PRESETS:
        for variant in masks.VARIANTS:
            model, *_ = _parse_configs(["base.gin", f"models/{preset}.gin", f"attention/{variant}.gin"])
            assert model.mask_variant == variant
            assert model == PRESETS[preset].__class__(**{**PRESETS[preset].__dict__, "mask_variant": variant})
    model, *_ = _parse_configs(["experiments/tiny_cpu.gin"], ["model.d_model = 128", "model.num_experts = 4"])
    assert (model.d_model, model.num_experts, model.num_layers) == (128, 4, 2)


@pytest.mark.parametrize("name", ["tiny_cpu", "table2_8l", "olmoe_0p25b_1p75b", "olmoe_1b_7b"])
def test_experiment_files_parse_and_fit_their_model(name):
    from spattn_jax import train_loop

    model, data_cfg, _, train_cfg = _parse_configs([f"experiments/{name}.gin"])
    # The batch check with the 1024-row OLMoE batch on one device is the one a pod also passes.
    train_loop.check_setup(model, data_cfg, train_cfg, num_devices=1)
    assert data_cfg.seq_len <= model.max_seq_len
