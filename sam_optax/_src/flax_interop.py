"""Flax NNX objects where the library meets them, without importing Flax.

Flax is not a dependency: when ``flax.nnx`` has not been imported, no value
can be an NNX object, and there is nothing to do.
"""

from __future__ import annotations

import sys
from typing import Any

import jax


def loaded_nnx() -> Any:
  """The ``flax.nnx`` module if the program imported it, else None."""
  return sys.modules.get("flax.nnx")


def check_batch(batch: Any) -> None:
  """Refuses a stateful NNX object (``nnx.Rngs``, an ``nnx.Module``) in
  ``batch``.

  The transform evaluates ``loss_fn`` inside its own ``jax.grad``; an object
  that ``loss_fn`` mutates there (an ``Rngs`` counter drawing a dropout key,
  a module's BatchNorm statistics) belongs to the caller's trace, and Flax
  fails with "Cannot mutate ... from a different trace level". Arrays and
  the ``nnx.State`` of ``nnx.split`` (its variables are merged into a fresh
  module inside ``loss_fn``) are fine.
  """
  nnx = loaded_nnx()
  if nnx is None:
    return
  stateful = tuple(
      t for t in (getattr(nnx, "Rngs", None), getattr(nnx, "RngStream", None),
                  getattr(nnx, "Module", None))
      if isinstance(t, type))
  is_stateful = lambda x: isinstance(x, stateful)  # noqa: E731
  found = [
      (jax.tree_util.keystr(path), type(x).__name__)
      for path, x in jax.tree_util.tree_flatten_with_path(
          batch, is_leaf=is_stateful)[0]
      if is_stateful(x)
  ]
  if found:
    where = ", ".join(f"batch{p} (nnx.{name})" for p, name in found)
    raise ValueError(
        f"`batch` holds a stateful Flax NNX object: {where}. The transform "
        "calls loss_fn inside its own jax.grad, where Flax cannot mutate an "
        "object of the caller's trace. For dropout, draw the key in your "
        "step (key = rngs.dropout() or jax.random.fold_in(key, step)), pass "
        "the raw key in batch and build nnx.Rngs(dropout=batch['key']) "
        "inside loss_fn; for a model, pass the state of "
        "nnx.split(model, nnx.Param, ...) and nnx.merge it inside loss_fn "
        "(the docs' recipes page, 'Dropout')"
    )
