"""Radius schedules: late-phase SAM, and a radius that follows the
learning rate (GSAM).

Both return an ordinary schedule of the step count, for ``rho=`` of any
method. A schedule whose value at a step is 0 makes that step a skipped
one (no second gradient, the clean gradient out), and the planner
(:func:`sam_optax.planner`) knows it on the host: with planned steps those
steps compile to a program with no second gradient and no conditional.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sam_optax._src import base


def late_phase(
    rho: base.ScalarOrSchedule = 0.05, *, start: int
) -> Callable[[jax.Array], jax.Array]:
  r"""SAM only late in training: radius 0 before step ``start``, ``rho`` from it.

  Zhou et al. (ICLR 2025, arXiv 2410.10373) find that switching from SGD
  to SAM for the last part of training reaches most of full SAM's
  generalization: SAM's late phase selects the flatter minimum whatever
  the early phase did. The schedule is::

      rho_t = 0                  for t < start   (an SGD step)
      rho_t = rho (or rho(t))    for t >= start

  ``t`` is the step count of the method's state (a schedule ``rho`` is
  read at the global step, not the step since ``start``). Pass it as any
  method's ``rho``. Before ``start`` every step is a skipped one: no second
  gradient (``grad_evals`` stays 0), the output is the clean gradient
  exactly. With planned steps (:func:`sam_optax.planner`) those steps
  compile to a program with no conditional and no second evaluation of
  ``loss_fn``: SGD's gradient work; without a plan the compiled step holds
  a ``lax.cond`` whose SAM branch does not run. The paper switches for the
  last 10-50% of the epochs; ``start`` is in steps (``epochs_sgd *
  steps_per_epoch``).

  Args:
    rho: the radius from ``start`` on, a float >= 0 or a schedule.
    start: the first SAM step, an integer >= 0 (keyword-only; 0 is the
      method itself).

  Returns:
    A schedule ``count -> rho_t`` (float32).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    >>> tx = sam_optax.sam(loss_fn, rho=sam_optax.late_phase(0.05, start=3))
    >>> w, b = jnp.ones(3), jnp.arange(3.0)
    >>> state = tx.init(w)
    >>> for _ in range(5):
    ...   u, state = tx.update(jax.grad(loss_fn)(w, b), state, w, batch=b)
    >>> int(sam_optax.stats(state)["grad_evals"])  # steps 3 and 4
    2
  """
  start = base.static_int("start", start, 0)
  base.check_scalar_or_schedule("rho", rho, 0.0)
  return LatePhase(rho, start)


@dataclasses.dataclass(frozen=True, eq=False)
class LatePhase:
  """The schedule :func:`late_phase` returns (a callable of the count, with
  a readable ``repr`` for logs and result files)."""

  rho: Any
  start: int

  def __call__(self, count):
    value = base.resolve(self.rho, count, "rho")
    return jnp.where(count >= self.start, value, jnp.zeros((), jnp.float32))

  def __repr__(self) -> str:
    return f"late_phase({self.rho!r}, start={self.start})"


def rho_from_lr(
    learning_rate: base.ScalarOrSchedule,
    *,
    rho_max: float,
    rho_min: float = 0.0,
    lr_max: float,
    lr_min: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
  r"""A radius proportional to the learning rate, as GSAM uses it.

  Zhuang et al. (ICLR 2022, arXiv 2203.08065, Algorithm 1) tie the radius
  to the learning-rate schedule, so the perturbation shrinks as the
  learning rate decays::

      rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)
      rho_t = rho_max                                 when lr_max == lr_min

  as in the authors' code (google-research/big_vision,
  ``trainers/proj/gsam/gsam.py``), whose ViT-B/32 ImageNet configuration
  uses ``rho_max=0.6``, ``rho_min=0.1`` with ``lr_max`` the peak and
  ``lr_min`` the final learning rate. ``lr_t`` is ``learning_rate`` at the
  step count of the method's state (the same count as the base
  optimizer's as long as every step is finite).

  ``rho_max`` and ``rho_min`` bound the radius: a learning rate outside
  ``[lr_min, lr_max]`` (a schedule whose peak is above the ``lr_max``
  given, or whose end is below ``lr_min``) gives ``rho_max`` or
  ``rho_min``, not a radius extrapolated past them (the authors' code does
  not clip, as its learning rate never leaves that range). A constant
  learning rate outside the range is refused here.

  Args:
    learning_rate: the base optimizer's learning rate, a float or a
      schedule of the step count.
    rho_max: the radius at ``lr_max``, >= ``rho_min``.
    rho_min: the radius at ``lr_min``, >= 0.
    lr_max: the largest learning rate of the schedule, >= ``lr_min``.
    lr_min: the smallest, >= 0.

  Returns:
    A schedule ``count -> rho_t`` (float32), for any method's ``rho``.

  Example:
    >>> import optax, sam_optax
    >>> lr = optax.linear_schedule(0.1, 0.0, 100)
    >>> rho = sam_optax.rho_from_lr(lr, rho_max=0.1, rho_min=0.02,
    ...                             lr_max=0.1, lr_min=0.0)
    >>> [round(float(rho(t)), 4) for t in (0, 50, 100)]
    [0.1, 0.06, 0.02]
  """
  base.check_scalar_or_schedule("learning_rate", learning_rate, 0.0)
  base.check_range("rho_min", rho_min, 0.0)
  base.check_range("rho_max", rho_max, float(rho_min))
  base.check_range("lr_min", lr_min, 0.0)
  base.check_range("lr_max", lr_max, float(lr_min))
  span = float(lr_max) - float(lr_min)
  const = base._concrete_float(learning_rate)  # pylint: disable=protected-access
  if const is not None and not float(lr_min) <= const <= float(lr_max):
    raise ValueError(
        f"learning_rate {learning_rate!r} is outside [lr_min, lr_max] = "
        f"[{lr_min!r}, {lr_max!r}]: lr_max is the largest learning rate "
        f"(rho_max's) and lr_min the smallest (rho_min's)"
    )

  def schedule(count):
    if span == 0.0:
      del count
      return jnp.asarray(rho_max, jnp.float32)
    lr = base.resolve(learning_rate, count, "learning_rate")
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / span
    return jnp.clip(rho, rho_min, rho_max)

  return schedule
