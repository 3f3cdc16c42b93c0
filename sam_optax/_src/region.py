"""Regions: where the perturbation applies.

A region yields a mask each step: None (everywhere), a pytree of Python bools
known before tracing (a static set of leaves: the engine then differentiates
only those), or a pytree of boolean arrays kept in state (a sparse mask,
refreshed or fixed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import base
from sam_optax._src import engine


class MaskState(NamedTuple):
  """A boolean mask shaped like the params, and how often it was refreshed."""

  mask: Any
  refreshes: jax.Array

  def stats(self):
    return {
        "mask_density": mask_density(self.mask),
        "mask_refreshes": self.refreshes,
    }


def mask_density(mask) -> jax.Array:
  """Share of entries that are True, over the whole model (float32)."""
  leaves = jax.tree.leaves(mask)
  total = sum(int(np.size(x)) for x in leaves)
  kept = sum(jnp.sum(x, dtype=jnp.int32) for x in leaves)
  return jnp.asarray(kept, jnp.float32) / max(total, 1)


is_static_mask = engine.is_static_mask


@dataclasses.dataclass(frozen=True)
class Everywhere(engine.Region):
  """The perturbation applies to every leaf (no mask)."""


@dataclasses.dataclass(frozen=True, eq=False)
class FixedMask(engine.Region):
  """A mask given by the user.

  A pytree of Python bools (one per leaf) is a static set of leaves: only they
  are differentiated in the second evaluation. A pytree of boolean arrays
  shaped like the params is an element-wise mask, kept in state.
  """

  mask: Any = None
  normalize_over_region: bool = False
  clean_outside: bool = False

  @property
  def static_mask(self):
    """The mask when it is a pytree of Python bools (a static set), else None."""
    return self.mask if is_static_mask(self.mask) else None

  def init(self, params):
    base.check_same_structure(self.mask, params, "mask")
    if self.static_mask is not None:
      return engine.Component.init(self, params)
    arrays = jax.tree.map(
        lambda m, p: jnp.broadcast_to(jnp.asarray(m, bool), jnp.shape(p)),
        self.mask,
        params,
    )
    return MaskState(mask=arrays, refreshes=jnp.zeros((), jnp.int32))

  def select(self, step, state):
    if self.static_mask is not None:
      return self.static_mask, state, jnp.zeros((), jnp.int32)
    return state.mask, state, jnp.zeros((), jnp.int32)


def everywhere() -> Everywhere:
  return Everywhere()


def fixed_mask(
    mask, *, normalize_over_region: bool = False, clean_outside: bool = False
) -> FixedMask:
  """A fixed region from a pytree of bools (see :class:`FixedMask`)."""
  if mask is None:
    raise ValueError("mask must be a pytree of booleans, got None")
  bad = [
      x for x in jax.tree.leaves(mask)
      if not (isinstance(x, (bool, np.bool_))
              or np.asarray(x).dtype == np.bool_)
  ]
  if bad:
    raise ValueError(
        "mask leaves must be booleans (Python bools or boolean arrays); got "
        f"leaves of dtype {sorted({str(np.asarray(x).dtype) for x in bad})}"
    )
  return FixedMask(
      mask=mask,
      normalize_over_region=normalize_over_region,
      clean_outside=clean_outside,
  )
