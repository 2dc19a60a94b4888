"""bench/timing.py: the GPU clock sampling beside each timing (no GPU needed: a stand-in nvidia-smi)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from tests import bench_scripts

timing = bench_scripts.load("timing")


def test_summarize_clocks_skips_lines_that_do_not_parse():
    got = timing.summarize_clocks(["1980, 3201, 600, 60", "[N/A], 3201, 5, 6", "1800, 2619, 700.5, 64", "", "oops",
                                   "1980, 600, 60"])
    assert got["samples"] == 2
    assert (got["sm_mhz_mean"], got["sm_mhz_min"], got["sm_mhz_max"]) == (1890.0, 1800.0, 1980.0)
    assert (got["mem_mhz_mean"], got["mem_mhz_min"]) == (2910.0, 2619.0)
    assert (got["power_w_mean"], got["temp_c_max"]) == (650.2, 64.0)
    assert timing.summarize_clocks(["[N/A], [N/A], [N/A], [N/A]"]) == dict(samples=0)
    assert timing.clocks_text(got) == "SM 1890 MHz (min 1800), mem 2910 MHz, 650 W, 64 C"
    assert timing.clocks_text(dict(samples=0)) == "" and timing.clocks_text(None) == ""
    old_json = {k: v for k, v in got.items() if not k.startswith("mem_")}  # rows recorded before v16
    assert timing.clocks_text(old_json) == "SM 1890 MHz (min 1800), 650 W, 64 C"


def _fake_smi(tmp_path: Path, body: str) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_gpu_clocks_samples_the_visible_gpu_while_the_block_runs(tmp_path, monkeypatch):
    """A stand-in nvidia-smi starts slowly, prints a sample, then two more once the block has begun
    (it waits for a file the block writes), then keeps running as ``-lms`` does until it is stopped.
    The block must not begin before the first sample; that sample is ``before``, and the summary
    holds the two taken during the block. The query went to the first visible GPU."""
    _fake_smi(
        tmp_path,
        f"sleep 0.5\necho '1980, 3201, 120, 40'\n"
        f"while [ ! -e {tmp_path}/block ]; do sleep 0.01; done\n"
        f"echo '1755, 3201, 690, 70'\necho '1800, 3201, 610, 66'\ntouch {tmp_path}/ready\nexec sleep 30",
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with timing.gpu_clocks(interval_ms=10) as clocks:
        (tmp_path / "block").touch()
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:  # it runs concurrently
            time.sleep(0.01)
        assert clocks == {}  # filled on exit
    assert clocks["samples"] == 2 and clocks["sm_mhz_max"] == 1800.0 and clocks["temp_c_max"] == 70.0
    assert clocks["before"] == "1980, 3201, 120, 40" and clocks["mem_mhz_min"] == 3201.0
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-i") + 1] == "3" and args[args.index("-lms") + 1] == "10"
    assert "--query-gpu=clocks.sm,clocks.mem,power.draw.instant,temperature.gpu" in args
    assert clocks["power_field"] == "power.draw.instant"


_SAMPLES = "echo '1980, 3201, 120, 40'\nwhile true; do echo '1900, 3201, 650, 60'; sleep 0.01; done"


def test_gpu_clocks_falls_back_to_average_power_on_older_drivers(tmp_path, monkeypatch):
    """Drivers before 535 reject ``power.draw.instant`` (nvidia-smi exits); others may print [N/A]
    for it. Either way the one-second average is sampled instead, and the dict says so."""
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for refusal in ("echo 'Field \"power.draw.instant\" is not a valid field to query.' >&2; exit 2",
                    "echo '1980, 3201, [N/A], 40'; exec sleep 30"):
        _fake_smi(tmp_path, f'case "$*" in *instant*) {refusal};; esac\n{_SAMPLES}')
        with timing.gpu_clocks(interval_ms=10) as clocks:
            time.sleep(0.2)
        assert clocks["power_field"] == "power.draw" and clocks["samples"] >= 1, refusal
        assert clocks["power_w_max"] == 650.0 and clocks["before"] == "1980, 3201, 120, 40"
        assert "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu" in (tmp_path / "args").read_text()


def test_gpu_clocks_names_the_fields_when_no_query_gives_a_sample(tmp_path, monkeypatch):
    _fake_smi(tmp_path, "echo 'No devices were found'; exit 6")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with timing.gpu_clocks() as clocks:
        pass
    assert "power.draw.instant or power.draw" in clocks["error"] and "No devices" in clocks["error"]
    assert "samples" not in clocks


def test_gpu_clocks_does_not_wait_forever_for_a_silent_nvidia_smi(tmp_path, monkeypatch):
    _fake_smi(tmp_path, "exec sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    t0 = time.monotonic()
    with timing.gpu_clocks(ready_s=0.2) as clocks:
        pass
    assert time.monotonic() - t0 < 10
    assert clocks == dict(samples=0)


def test_gpu_clocks_without_nvidia_smi_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nvidia-smi
    with timing.gpu_clocks() as clocks:
        pass
    assert "FileNotFoundError" in clocks["error"] and "samples" not in clocks


def test_gpu_identity_names_each_gpu_or_why_not(tmp_path, monkeypatch):
    _fake_smi(tmp_path, "echo 'NVIDIA H200, GPU-1234, 00000000:18:00.0, 96.00.A5, 580.159.04, 143771 MiB, 1980 MHz, 3201 MHz'")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert timing.gpu_identity().startswith("NVIDIA H200, GPU-1234,")
    assert f"--query-gpu={timing.GPU_IDENTITY}" in (tmp_path / "args").read_text()
    _fake_smi(tmp_path, "echo 'Failed to initialize NVML' >&2; exit 9")
    assert timing.gpu_identity() == "Failed to initialize NVML"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert timing.gpu_identity().startswith("FileNotFoundError")


def test_time_jax_on_the_cpu_records_no_clocks():
    import jax
    import jax.numpy as jnp

    result = timing.time_jax(jax.jit(lambda x: x * 2), jnp.ones(4), warmup=1, iters=2)
    assert result["ms"] > 0 and "clocks" not in result
