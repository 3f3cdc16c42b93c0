"""Combinations: how the output is formed from the clean and second gradients."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sam_optax._src import base
from sam_optax._src import engine


@dataclasses.dataclass(frozen=True)
class Replace(engine.Combine):
  """SAM's rule: the output is the second gradient, ``out = ∇L(w + e)``."""


@dataclasses.dataclass(frozen=True)
class Mix(engine.Combine):
  """Gradient-norm penalty rule (Zhao et al. 2022)::

      out = (1 - alpha) * g + alpha * ∇L(w + e)

  ``alpha = 1`` is SAM, ``alpha = 0`` is the clean gradient. ``alpha`` may be
  a float or a schedule of the step count.
  """

  alpha: Any = 0.8

  def computed(self, step: engine.Step, second, state):
    a = base.resolve(self.alpha, step.count)
    out = jax.tree.map(
        lambda g, h: (1.0 - a) * g.astype(h.dtype) + a * h, step.grads, second
    )
    return out, state


def replace() -> Replace:
  return Replace()


def mix(alpha: base.ScalarOrSchedule = 0.8) -> Mix:
  base.check_scalar_or_schedule("alpha", alpha, 0.0, high=1.0)
  return Mix(alpha=alpha)
