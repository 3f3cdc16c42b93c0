"""Perturbation geometries: how the step uphill is built from the gradient.

A geometry turns the clean gradient ``g`` into the perturbation ``e`` that the
second gradient is evaluated at (``w + e``). The region's mask, when there is
one, is applied here: either after normalising by the full gradient norm
(Sparse SAM: ``‖e‖ <= rho``) or with the norm taken over the region only
(layer-wise SAM: ``‖e‖ = rho``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax._src import base
from sam_optax._src import engine


@dataclasses.dataclass(frozen=True)
class NormBall(engine.Geometry):
  """The worst case in a (possibly scaled) L2 ball of radius rho.

  With ``eta=None`` (SAM, Foret et al. 2021)::

      e = rho * g / (‖g‖ + eps)

  With ``eta`` set (ASAM, Kwon et al. 2021), element-wise ``T = |w| + eta``::

      e = rho * T² ⊙ g / (‖T ⊙ g‖ + eps)

  Norms are global over all leaves (and over the region only when the region
  asks for it), accumulated in float32. A zero gradient gives ``e = 0``.
  """

  eta: Any = None

  def perturb(self, step: engine.Step, state):
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
    mask = step.mask
    if mask is not None and step.normalize_over_region:
      arg = engine.apply_mask(arg, mask)
    norm = base.tree_norm(arg)
    factor = step.rho / (norm + step.eps)
    e = jax.tree.map(lambda n: factor * n, engine.apply_mask(num, mask))
    return e, state


def global_norm() -> NormBall:
  """SAM's geometry: ``e = rho * g / (‖g‖ + eps)``."""
  return NormBall()


def adaptive(eta: base.ScalarOrSchedule = 0.01) -> NormBall:
  """ASAM's geometry: ``e = rho * T² g / (‖T g‖ + eps)`` with ``T = |w| + eta``."""
  base.check_scalar_or_schedule("eta", eta, 0.0, low_open=True)
  return NormBall(eta=eta)
