"""What a run writes: ``results.json`` and orbax checkpoints.

A checkpoint holds two items: ``state``, the whole ``TrainState``
(parameters, BatchNorm statistics, the optimizer state with the methods'
masks, stored gradients, counters and random keys), and ``run``, the run's
record at that epoch (its settings, its history so far, the planner's device
reads so far; JSON). PRNG key arrays are stored as their raw key data and
wrapped again on restore. Every process of a multi-host run calls
:func:`save` and :func:`restore` with the same arguments (orbax coordinates
them; replicated arrays are written once); a restore takes its shapes,
dtypes and shardings from a template state.

Problems with what a directory holds are raised as :class:`ResumeError`
(the command does not fit the directory: nothing to resume, a run already
there, different settings) or :class:`CheckpointError` (a checkpoint that
cannot be read); both messages say which path and what to do.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

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


class ResumeError(ValueError):
  """The command does not fit its output directory (``--resume`` with
  nothing to resume, a fresh run over a previous one, a resume under
  different settings)."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read (empty, truncated, corrupt, or
  written in another format)."""


def to_json(obj: Any) -> Any:
  """``obj`` as it reads back from JSON (tuples become lists, arrays
  lists, callables their repr)."""
  return json.loads(json.dumps(obj, default=_json_default))


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


def save(manager, step: int, state: Any, record: Optional[dict] = None
         ) -> None:
  """Saves ``state`` and the run's ``record`` (JSON-serialisable; None: {})
  as checkpoint ``step`` and waits until it is written. Refuses a step that
  is already there (orbax would keep the old one without a word)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  if step in manager.all_steps():
    raise ResumeError(
        f"checkpoint {step_dir(manager, step)} exists already: delete it or "
        "choose another directory"
    )
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_raw(state)),
      run=ocp.args.JsonSave(to_json(record or {})),
  ))
  manager.wait_until_finished()


def step_dir(manager, step: int) -> str:
  """Where checkpoint ``step`` lives."""
  return os.path.join(str(manager.directory), str(step))


def _unreadable(manager, step: int, what: str, e: Exception
                ) -> CheckpointError:
  earlier = [s for s in manager.all_steps() if s < step]
  before = (
      f"delete {step_dir(manager, step)} to resume from the checkpoint of "
      f"epoch {max(earlier)}, or " if earlier else ""
  )
  run_dir = os.path.dirname(str(manager.directory))
  return CheckpointError(
      f"cannot read {what} of checkpoint {step_dir(manager, step)} "
      f"({type(e).__name__}: {_first_line(e)}); it is damaged or not written "
      f"by this version: {before}delete {run_dir} (or point --out "
      "elsewhere) to start again"
  )


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else ""


def load_record(manager, step: int) -> dict:
  """The run record saved with checkpoint ``step`` (:class:`CheckpointError`
  if it cannot be read)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  try:
    record = manager.restore(
        step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    if not isinstance(record, dict) or "config" not in record:
      raise ValueError(f"no run settings in {str(record)[:80]!r}")
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(manager, step, "the run record", e) from e
  return record


def restore(manager, step: int, template: Any) -> Any:
  """Checkpoint ``step`` with the structure, dtypes and shardings of
  ``template`` (PRNG keys wrapped with the template's implementation);
  :class:`CheckpointError` if it cannot be read."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _raw(template))
  try:
    raw = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise _unreadable(manager, step, "the training state", e) from e
  return jax.tree.map(
      lambda t, r: (
          jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
          if _is_key(t) else r
      ),
      template,
      raw,
  )
