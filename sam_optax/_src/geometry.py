"""Perturbation geometries: how the step uphill is built from the gradient.

A geometry turns the clean gradient ``g`` into the perturbation ``e`` that the
second gradient is evaluated at (``w + e``). Its norms are taken over
``where.norm_domain(...)``: the whole gradient (Sparse SAM: ``‖e‖ <= rho``)
or the region only (layer-wise SAM: ``‖e‖ = rho``). The engine zeroes ``e``
outside the region afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax._src import base
from sam_optax._src import protocols


@dataclasses.dataclass(frozen=True)
class NormBall(protocols.Geometry):
  """The worst case in a (possibly scaled) L2 ball of radius rho.

  With ``eta=None`` (SAM, Foret et al. 2021)::

      e = rho * g / (‖g‖ + eps)

  With ``eta`` set (ASAM, Kwon et al. 2021), element-wise ``T = |w| + eta``::

      e = rho * T² ⊙ g / (‖T ⊙ g‖ + eps)

  Norms are global over all leaves (over the region only when the region
  asks for it), accumulated in float32. A zero gradient gives ``e = 0``.
  """

  eta: Any = None

  def perturb(self, step: protocols.Step, state, where: protocols.Where):
    g = step.updates
    if self.eta is None:
      arg = jax.tree.map(lambda x: x.astype(jnp.float32), g)
      norm = base.tree_norm_exp(where.norm_domain(arg))
      return base.times_over_norm(arg, step.rho, norm, step.eps), state
    # ASAM: g is scaled leaf by leaf by a power of two (g' = g 2**-k,
    # exact, its largest entry in [0.5, 1)), so that T g' and T**2 g' stay
    # in float32's range where T**2 g would not (|w| = 1e4 and g = 1e31);
    # the exponents travel with the leaves into the norm and the ratio,
    # which for ordinary values give the same bits as unscaled. (T**2 alone
    # overflows only for weights past 1.8e19.)
    eta = base.resolve(self.eta, step.count, "eta")
    t = jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)) + eta,
                     step.params)
    g_exp = jax.tree.map(base.leaf_exponent, g)
    arg = jax.tree.map(
        lambda a, x, ex: a * base.times_pow2(x.astype(jnp.float32), -ex),
        t, g, g_exp)
    num = jax.tree.map(jnp.multiply, t, arg)
    norm = base.tree_norm_exp(where.norm_domain(arg), g_exp)
    return base.times_over_norm(num, step.rho, norm, step.eps,
                                exps=g_exp), state


def global_norm() -> NormBall:
  """SAM's geometry: ``e = rho * g / (‖g‖ + eps)``."""
  return NormBall()


def adaptive(eta: base.ScalarOrSchedule = 0.01) -> NormBall:
  """ASAM's geometry: ``e = rho * T² g / (‖T g‖ + eps)`` with ``T = |w| + eta``."""
  base.check_scalar_or_schedule("eta", eta, 0.0, low_open=True)
  return NormBall(eta=eta)


class FriendlyState(NamedTuple):
  """Friendly SAM's memory.

  Attributes:
    momentum: the exponential moving average ``m`` of the clean gradients of
      the steps so far (float32, shaped like the params).
    started: whether ``m`` holds a gradient yet (False before the first
      step).
  """

  momentum: Any
  started: jax.Array


@dataclasses.dataclass(frozen=True)
class Friendly(protocols.Geometry):
  r"""Friendly SAM's perturbation (Li et al., CVPR 2024, arXiv 2403.12350).

  The full-gradient component of SAM's perturbation does not help
  generalization; F-SAM removes an estimate of it, the moving average ``m``
  of past gradients, and perturbs along what is left (the batch-specific
  part)::

      d = g - sigma * m                 (d = g on the first step: m is empty)
      m = lmbda * m + (1 - lmbda) * g   (m = g on the first step)
      e = rho * d / (‖d‖ + eps)

  ``d`` uses ``m`` from before this step's gradient enters it, as in the
  authors' code (nblt/F-SAM, ``FriendlySAM.first_step``). ``m`` is updated
  from the gradient averaged over ``axis_name`` (so every device keeps the
  same state); ``d`` from ``updates`` as passed (per device: m-sharpness).
  It advances on every finite step, also one that builds no perturbation
  (a radius that is 0, or a gate that skips the second gradient), so it
  averages every step's gradient; a step whose clean or second gradient is
  not finite leaves it, like the whole state, as it was. Norms in
  float32; a zero ``d`` gives ``e = 0``.
  """

  sigma: Any = 1.0
  lmbda: Any = 0.9

  def init(self, params):
    return FriendlyState(
        momentum=base.zeros_like_f32(params),
        started=jnp.zeros((), bool),
    )

  def perturb(self, step: protocols.Step, state, where: protocols.Where):
    sigma = base.resolve(self.sigma, step.count, "sigma")
    lmbda = base.resolve(self.lmbda, step.count, "lmbda")
    # A non-finite lmbda (a schedule's or an injected value) leaves the
    # momentum as it was instead of storing NaN in it for good.
    lmbda = jnp.where(jnp.isfinite(lmbda), lmbda, 1.0)
    started = state.started
    d = jax.tree.map(
        lambda g, m: jnp.where(
            started, g.astype(jnp.float32) - sigma * m, g.astype(jnp.float32)
        ),
        step.updates,
        state.momentum,
    )
    momentum = jax.tree.map(
        lambda g, m: jnp.where(
            started,
            lmbda * m + (1.0 - lmbda) * g.astype(jnp.float32),
            g.astype(jnp.float32),
        ),
        step.grads,
        state.momentum,
    )
    e = base.times_over_norm(
        d, step.rho, base.tree_norm_exp(where.norm_domain(d)), step.eps)
    return e, FriendlyState(momentum=momentum, started=jnp.ones((), bool))

  def advance(self, step, state, where):
    # m averages the clean gradients of every step, also those that build
    # no perturbation (XLA drops the unused e).
    return self.perturb(step, state, where)[1]


def friendly(
    sigma: base.ScalarOrSchedule = 1.0, lmbda: base.ScalarOrSchedule = 0.9
) -> Friendly:
  """Friendly SAM's geometry (see :class:`Friendly`): ``sigma >= 0``,
  ``lmbda`` in [0, 1]."""
  base.check_scalar_or_schedule("sigma", sigma, 0.0)
  base.check_scalar_or_schedule("lmbda", lmbda, 0.0, high=1.0)
  return Friendly(sigma=sigma, lmbda=lmbda)
