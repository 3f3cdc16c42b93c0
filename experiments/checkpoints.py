"""What a run writes: ``results.json`` and orbax checkpoints.

Checkpoints hold the whole ``TrainState`` (parameters, BatchNorm statistics,
the optimizer state with the methods' masks, stored gradients, counters and
random keys). PRNG key arrays are stored as their raw key data and wrapped
again on restore. Every process of a multi-host run calls :func:`save` and
:func:`restore` with the same arguments (orbax coordinates them; replicated
arrays are written once); a restore takes its shapes, dtypes and shardings
from a template state.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` atomically (through a temporary file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_json_default)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if callable(x):
    return repr(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def load_history(out: str) -> list[dict]:
  """The per-epoch history of ``out/results.json`` ([] when absent)."""
  path = os.path.join(out, "results.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f).get("history", [])


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _raw(tree):
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, tree
  )


def checkpoint_manager(path: str, max_to_keep: int = 2):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.CheckpointManager(
      os.path.abspath(path),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True),
  )


def save(manager, step: int, state: Any) -> None:
  """Saves ``state`` as checkpoint ``step`` and waits until it is written."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  manager.save(step, args=ocp.args.StandardSave(_raw(state)))
  manager.wait_until_finished()


def restore(manager, step: int, template: Any) -> Any:
  """Checkpoint ``step`` with the structure, dtypes and shardings of
  ``template`` (PRNG keys wrapped with the template's implementation)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _raw(template))
  raw = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return jax.tree.map(
      lambda t, r: (
          jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
          if _is_key(t) else r
      ),
      template,
      raw,
  )
