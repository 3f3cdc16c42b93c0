"""Data parallelism over every device the run sees, on one host or many.

One global mesh with a single axis ``data`` over ``jax.devices()`` (every
device of every process). The batch is sharded over ``data``; parameters,
BatchNorm statistics and the optimizer state are replicated. Two ways to run
a SAM step on it (``--perturbation``):

- ``per-device`` (m-sharpness, the original SAM code's and big_vision's
  GSAM's setting): the step is a ``shard_map`` over ``data``; each device
  computes its shard's clean gradient and passes it to the method, built
  with ``axis_name="data"``, which perturbs with that gradient and averages
  its output (and every statistic behind a decision) over the axis.
- ``global``: the step of the whole batch under ``jit`` with sharded inputs
  (no axis name): the perturbation uses the gradient of the global batch,
  exactly what one device running the whole batch computes.

Across hosts (one process per host, ``jax.distributed``) every process runs
the same program over the same global mesh; :func:`host_to_global` turns the
global batch every process reads into a global array of which each process
only materialises its own devices' shards.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
PERTURBATIONS = ("per-device", "global")
DEFAULT_PERTURBATION = "per-device"

# Environment variables that make jax.distributed.initialize() find its
# parameters by itself (jax's own, then the cluster detectors it ships).
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS",)


def maybe_initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    force: bool = False,
) -> bool:
  """Calls ``jax.distributed.initialize`` when flags or the environment ask.

  With ``coordinator_address`` (and ``num_processes``, ``process_id``) the
  given values are used; with ``force`` (``--distributed``) or
  ``JAX_COORDINATOR_ADDRESS`` set, jax reads its parameters from the
  environment (its cluster detection covers Cloud TPU pods, SLURM, Open MPI
  and GKE). Returns whether it initialised. Must run before any other jax
  call touches a device.
  """
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ValueError(
          "--coordinator-address, --num-processes and --process-id go "
          f"together; got {given}"
      )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True
  if force or any(os.environ.get(k) for k in _CLUSTER_ENV):
    jax.distributed.initialize()
    return True
  return False


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """One axis ``data`` over ``devices`` (default: every device of every
  process, in ``jax.devices()`` order)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ``data``."""
  return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "--batch-size"):
  n = mesh.size
  if batch_size % n:
    raise ValueError(
        f"{flag} {batch_size} is not divisible by the {n} devices of the "
        f"mesh; choose a multiple of {n} (each device gets an equal shard)"
    )


def host_to_global(tree: Any, sharding: NamedSharding) -> Any:
  """Global arrays from host data that every process holds in full.

  Each process builds only the shards of its own devices (slices of its
  copy), so this works unchanged on one process and on many.
  """

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Host copies of replicated (or fully addressable) arrays."""
  return jax.tree.map(np.asarray, tree)
