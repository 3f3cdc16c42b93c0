"""Perturbation geometries: how the step uphill is built from the gradient.

A geometry turns the clean gradient ``g`` into the perturbation ``e`` that the
second gradient is evaluated at (``w + e``). Its norms are taken over
``where.norm_domain(...)``: the whole gradient (Sparse SAM: ``‖e‖ <= rho``)
or the region only (layer-wise SAM: ``‖e‖ = rho``). The engine zeroes ``e``
outside the region afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
      num = arg = jax.tree.map(lambda x: x.astype(jnp.float32), g)
    else:
      eta = base.resolve(self.eta, step.count)
      scale = jax.tree.map(
          lambda w: jnp.abs(w.astype(jnp.float32)) + eta, step.params
      )
      arg = jax.tree.map(lambda t, x: t * x.astype(jnp.float32), scale, g)
      num = jax.tree.map(lambda t, a: t * a, scale, arg)
    norm = base.tree_norm(where.norm_domain(arg))
    factor = step.rho / (norm + step.eps)
    return jax.tree.map(lambda n: factor * n, num), state


def global_norm() -> NormBall:
  """SAM's geometry: ``e = rho * g / (‖g‖ + eps)``."""
  return NormBall()


def adaptive(eta: base.ScalarOrSchedule = 0.01) -> NormBall:
  """ASAM's geometry: ``e = rho * T² g / (‖T g‖ + eps)`` with ``T = |w| + eta``."""
  base.check_scalar_or_schedule("eta", eta, 0.0, low_open=True)
  return NormBall(eta=eta)
