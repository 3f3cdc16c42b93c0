"""Test setup: 8 forced CPU devices for pmap / shard_map / sharding tests,
and XLA:CPU settings that compile about three times faster.

The flags must be set before jax is imported anywhere in the test process;
subprocesses the tests start inherit them.

The suite's time is mostly XLA:CPU compiling small programs. Three flags
cut that to about a third (measured on this project's steps): the legacy
loop emitters instead of XLA:CPU's MLIR fusion emitters, and no LLVM
optimisation of the generated code. The programs compute the same
operations in the same order; only how well the machine code is optimised
changes, which the tests (small models, a few steps) do not measure.
``SAM_OPTAX_TEST_XLA_DEFAULTS=1`` runs the suite at XLA's own defaults.
Tests that measure what XLA does by default (compiled memory) remove
:data:`FAST_COMPILE` from their subprocess's flags.
"""

import os

from experiments import xla_env  # imports no jax

#: Flags that make XLA:CPU compile faster (see the module docstring).
FAST_COMPILE = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


_extra = ["--xla_force_host_platform_device_count=8"]
if os.environ.get("SAM_OPTAX_TEST_XLA_DEFAULTS", "0").lower() in (
    "0", "", "false", "no", "off"):
  _extra += FAST_COMPILE
xla_env.add_flags(_extra, os.environ)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
