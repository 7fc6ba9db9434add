"""Test set-up: eight simulated CPU devices, float32 matmuls at full precision.

XLA reads XLA_FLAGS once, when jax initialises its backends, so this must run before any
test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from hypothesis import Phase, settings  # noqa: E402

# CI runs the same examples every time (a failure reproduces); locally, new ones each run.
# CI does not shrink a failure (minutes on 2 cores): the example it prints is the report.
# Nor does it replay a local example database: `CI=1` here draws exactly what CI draws.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.generate],
)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
