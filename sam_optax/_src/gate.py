"""Gates: when the second gradient is really computed.

A gate that is not ``always`` makes the engine emit a ``lax.cond``: on a
skipped step the branch that calls ``loss_fn`` does not run at all.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sam_optax._src import base
from sam_optax._src import engine


@dataclasses.dataclass(frozen=True)
class EveryStep(engine.Gate):
  """The second gradient every step (SAM, ASAM, GNP)."""


@dataclasses.dataclass(frozen=True)
class Never(engine.Gate):
  """Never a second gradient (e.g. Sparse SAM with ``sparsity=1``)."""

  always: bool = False
  never: bool = True

  def decide(self, step, state):
    del step
    return jnp.array(False), state


@dataclasses.dataclass(frozen=True)
class EveryK(engine.Gate):
  """The second gradient on steps with ``count % k == 0`` (step 0 included)."""

  k: int = 1
  always: bool = False

  def decide(self, step, state):
    return step.count % self.k == 0, state


def every_step() -> EveryStep:
  return EveryStep()


def never() -> Never:
  return Never()


def every_k(k: int) -> engine.Gate:
  """Every k-th step; ``k=1`` is every step, with no ``lax.cond`` emitted."""
  k = base.check_int("k", k, 1)
  return EveryStep() if k == 1 else EveryK(k=k)
