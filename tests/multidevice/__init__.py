"""Checks that need several devices, run in a subprocess on 8 fake CPU devices.

The pytest process has already initialised JAX with one CPU device, and the device count cannot change
afterwards, so each check runs as ``python -m tests.multidevice.<module> <check>`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and prints one JSON line as its last line;
:func:`run` returns it parsed (and the stderr, for checks of XLA's warnings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = 8


def env(devices: int = DEVICES) -> dict:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
    )


def run(module: str, *args: str, devices: int = DEVICES, timeout: int = 600) -> tuple[dict, str]:
    """Run ``tests.multidevice.<module>`` with ``args`` on ``devices`` fake devices: ``(result, stderr)``."""
    proc = subprocess.run(
        [sys.executable, "-m", f"tests.multidevice.{module}", *args],
        cwd=REPO,
        env=env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def main(checks: dict) -> None:
    """``python -m tests.multidevice.<module> <check> [args...]``: print the check's result as JSON."""
    name, *args = sys.argv[1:]
    print(json.dumps(checks[name](*args)))
