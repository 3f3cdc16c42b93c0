"""SAM, ASAM and GNP: the first presets over the engine."""

from __future__ import annotations

from typing import Callable, Optional

import optax

from sam_optax._src import base
from sam_optax._src import combine as combine_lib
from sam_optax._src import engine
from sam_optax._src import geometry as geometry_lib


def sam(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.05,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv 2010.01412).

  Takes the clean gradient ``g = ∇L_B(w)`` and returns the gradient at the
  worst point of an L2 ball of radius ``rho``, to first order::

      e   = rho * g / (‖g‖ + eps)
      out = ∇L_B(w + e)

  Cost: one extra gradient per step. ``rho = 0`` returns ``g`` exactly.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux=True``).
    rho: radius, float or schedule; default 0.05 (the paper's CIFAR value).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; perturbed aux is discarded.
    axis_name: ``pmap``/``shard_map`` axis: the output (and every statistic)
      is averaged over it. The perturbation uses ``updates`` as passed: a
      per-device gradient gives m-sharpness (the original SAM code), a
      ``pmean``-ed one gives the global SAM step.
    eps: guard added to ``‖g‖``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain a base optimizer after
    it.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    >>> tx = optax.chain(sam_optax.sam(loss_fn, rho=0.05), optax.sgd(0.1))
    >>> w = jnp.ones(3); state = tx.init(w)
    >>> g = jax.grad(loss_fn)(w, jnp.arange(3.0))
    >>> u, state = tx.update(g, state, w, batch=jnp.arange(3.0))
    >>> int(sam_optax.stats(state)["grad_evals"])
    1
  """
  return engine.sharpness_aware(
      loss_fn,
      rho,
      geometry=geometry_lib.global_norm(),
      combine=combine_lib.replace(),
      has_aux=has_aux,
      axis_name=axis_name,
      eps=eps,
  )


def asam(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.5,
    eta: base.ScalarOrSchedule = 0.01,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM (Kwon et al., ICML 2021, arXiv 2102.11600).

  The ball is scaled element-wise by ``T = |w| + eta``, which makes the
  sharpness measure invariant to rescaling of the weights::

      e   = rho * T² ⊙ g / (‖T ⊙ g‖ + eps)
      out = ∇L_B(w + e)

  Defaults ``rho=0.5``, ``eta=0.01`` come from the authors' code
  (SamsungLabs/ASAM). Cost: one extra gradient per step.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    rho: radius, float or schedule.
    eta: offset that keeps zero weights perturbable; must be > 0.
    has_aux, axis_name, eps: as in :func:`sam`.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.asam(lambda w, b: jnp.sum(w * b)),
    ...                  optax.sgd(0.1))
  """
  return engine.sharpness_aware(
      loss_fn,
      rho,
      geometry=geometry_lib.adaptive(eta),
      combine=combine_lib.replace(),
      has_aux=has_aux,
      axis_name=axis_name,
      eps=eps,
  )


def gnp(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.1,
    alpha: base.ScalarOrSchedule = 0.8,
    *,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-norm penalty, "generalized SAM" (Zhao, Zhang, Hu, ICML 2022,
  arXiv 2202.03599).

  Penalizing ``‖∇L‖`` with a finite-difference Hessian-vector product gives::

      e   = rho * g / (‖g‖ + eps)
      out = (1 - alpha) * g + alpha * ∇L_B(w + e)

  ``alpha = 1`` is SAM. Defaults ``rho`` (the paper's r) 0.1 and ``alpha``
  0.8 come from the authors' CIFAR recipes (zhaoyang-0204/gnp). Cost: one
  extra gradient per step.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    rho: finite-difference radius, float or schedule.
    alpha: mixing weight in [0, 1], float or schedule.
    has_aux, axis_name, eps: as in :func:`sam`.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.gnp(lambda w, b: jnp.sum(w * b)),
    ...                  optax.sgd(0.1))
  """
  return engine.sharpness_aware(
      loss_fn,
      rho,
      geometry=geometry_lib.global_norm(),
      combine=combine_lib.mix(alpha),
      has_aux=has_aux,
      axis_name=axis_name,
      eps=eps,
  )
