"""Test settings shared by the whole suite."""

import os

# Kernel interpret-mode tests and the fake-device sharding tests run on the host CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# Few examples and no deadline: interpret-mode kernels are slow, and CI has 2 cores.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# On a GPU every example compiles fresh kernels (seconds each): a few examples per test, and no
# shrinking (each shrink step compiles again; the failing example is printed as drawn).
settings.register_profile(
    "gpu", max_examples=3, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
