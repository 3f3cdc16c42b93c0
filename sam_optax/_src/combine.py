"""Combinations: how the output is formed from the clean and second gradients.

* :class:`Replace` (SAM): the second gradient.
* :class:`Mix` (GNP, layer-wise SAM): ``(1 - alpha) g + alpha h``.
* :class:`OrthogonalReuse` (LookSAM) and :class:`DecayedReuse` (vSAM): on a
  computed step they store part of the second gradient; on a skipped step
  they add it back to the clean gradient, so a skipped step still moves
  along the sharpness-aware direction at about SGD's cost.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import base
from sam_optax._src import protocols

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Replace(protocols.Combine):
  """SAM's rule: the output is the second gradient, ``out = ∇L(w + e)``."""


@dataclasses.dataclass(frozen=True)
class Mix(protocols.Combine):
  """Gradient-norm penalty rule (Zhao et al. 2022)::

      out = (1 - alpha) * g + alpha * ∇L(w + e)

  ``alpha = 1`` is SAM, ``alpha = 0`` is the clean gradient. ``alpha`` may be
  a float or a schedule of the step count.
  """

  alpha: Any = 0.8

  def computed(self, step: protocols.Step, second, state):
    a = base.resolve(self.alpha, step.count, "alpha")
    # In float32 (the output is cast to the gradient's dtype by the
    # engine): g rounded to a bfloat16 model's dtype first lost its digits.
    out = jax.tree.map(
        lambda g, h: (1.0 - a) * g.astype(jnp.float32)
        + a * h.astype(jnp.float32),
        step.grads, second,
    )
    return out, state


def replace() -> Replace:
  return Replace()


def mix(alpha: base.ScalarOrSchedule = 0.8) -> Mix:
  base.check_scalar_or_schedule("alpha", alpha, 0.0, high=1.0)
  return Mix(alpha=alpha)


# --------------------------------------------------------------------------
# LookSAM: orthogonal-component reuse.
# --------------------------------------------------------------------------


class OrthogonalReuseState(NamedTuple):
  """LookSAM's memory.

  Attributes:
    gv: the component of the last SAM gradient orthogonal to the clean
      gradient of that step (float32 whatever the params' dtype: rounded
      to bfloat16 it lost the digits the reuse adds back).
    since: steps since the last computed second gradient (int32; 0 on a
      computed step).
  """

  gv: PyTree
  since: jax.Array

  def stats(self) -> dict[str, jax.Array]:
    return {"steps_since_sample": self.since}


@dataclasses.dataclass(frozen=True)
class OrthogonalReuse(protocols.Combine):
  r"""LookSAM's combination (Liu et al., CVPR 2022, arXiv 2203.02714).

  On a computed step, with ``gs`` the second gradient::

      gv  = gs - (<gs, g> / (‖g‖² + eps)) * g        (stored)
      out = gs

  On a skipped step::

      out = g + alpha * (‖g‖ / (‖gv‖ + eps)) * gv

  Norms and inner products are global over all leaves, or per parameter
  tensor with ``per_leaf=True``; float32 whatever the dtype. ``alpha`` is a
  float or a schedule of the step count.
  """

  alpha: Any = 0.7
  per_leaf: bool = False

  def init(self, params):
    return OrthogonalReuseState(
        gv=base.zeros_like_f32(params),
        since=jnp.zeros((), jnp.int32),
    )

  def computed(self, step, second, state):
    g = base.tree_f32(step.grads)
    gs = base.tree_f32(second)
    if self.per_leaf:
      gv = jax.tree.map(
          lambda a, b: _orthogonal_part(a, b, step.eps), gs, g)
    else:
      gv = _orthogonal_part(gs, g, step.eps)
    new_state = OrthogonalReuseState(
        gv=base.tree_cast_like(gv, state.gv), since=jnp.zeros((), jnp.int32)
    )
    return base.tree_cast_like(second, step.grads), new_state

  def skipped(self, step, state):
    alpha = base.resolve(self.alpha, step.count, "alpha")
    g = base.tree_f32(step.grads)
    gv = base.tree_f32(state.gv)
    # alpha ‖g‖ / (‖gv‖ + eps) * gv with both norms as (n, k) pairs, so
    # that neither overflows (base.tree_norm_exp).
    def reuse(a, v):
      n_a, k_a = base.tree_norm_exp(a)
      scaled = base.times_over_norm(v, alpha * n_a, base.tree_norm_exp(v),
                                    step.eps, num_exp=k_a)
      return jax.tree.map(jnp.add, a, scaled)

    if self.per_leaf:
      out = jax.tree.map(reuse, g, gv)
    else:
      out = reuse(g, gv)
    new_state = state._replace(since=base.saturating_add(state.since, 1))
    return base.tree_cast_like(out, step.grads), new_state


def _orthogonal_part(gs: PyTree, g: PyTree, eps: float) -> PyTree:
  """``gs - (<gs, g> / (‖g‖² + eps)) g`` (float32), or zeros where that is
  at the rounding level of its computation: ``‖gv‖ <= 2**-22 sqrt(max(n,
  16)) ‖gs‖`` over ``n`` entries (16 float32 roundings of ``gs``'s norm for
  one entry, 4 times a random walk of ``n`` roundings for many).

  The rule rescales ``gv`` to ``alpha ‖g‖`` on the next steps, whatever its
  size; where ``gs`` is parallel to ``g`` (a one-entry leaf with
  ``per_leaf=True``, whose ``gv`` is 0 by definition; a quadratic whose
  gradient is a Hessian eigenvector) the computed ``gv`` is a rounding
  residue of about ``1e-8 ‖gs‖`` whose sign depends on the compiled
  program, and rescaled it moved the output by ``±alpha ‖g‖`` (``g``
  times 1.7 or 0.3). Zero, the reuse step returns ``g``: the rule's value
  for an exact ``gv = 0``."""
  coef = base.tree_projection_coef(gs, g, eps)
  gv = jax.tree.map(lambda a, b: a - coef * b, gs, g)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(gs))
  tol = 2.0**-22 * math.sqrt(max(n, 16))
  n_v, k_v = base.tree_norm_exp(gv)
  n_s, k_s = base.tree_norm_exp(gs)
  # ‖gv‖ > tol ‖gs‖, compared as (digits, exponent) pairs: no overflow.
  keep = n_v > base.times_pow2(tol * n_s, k_s - k_v)
  return jax.tree.map(lambda x: jnp.where(keep, x, 0.0), gv)


def orthogonal_reuse(
    alpha: base.ScalarOrSchedule = 0.7, *, per_leaf: bool = False
) -> OrthogonalReuse:
  """LookSAM's reuse combination (see :class:`OrthogonalReuse`)."""
  base.check_scalar_or_schedule("alpha", alpha, 0.0)
  if not isinstance(per_leaf, bool):
    raise ValueError(f"per_leaf must be a bool, got {per_leaf!r}")
  return OrthogonalReuse(alpha=alpha, per_leaf=per_leaf)


# --------------------------------------------------------------------------
# vSAM: decayed reuse of the PSF.
# --------------------------------------------------------------------------


class DecayedReuseState(NamedTuple):
  """vSAM's memory of the last sampled step.

  Attributes:
    psf: ``gs - g`` of the last computed step (float32 whatever the
      params' dtype).
    lam: the weight applied to ``psf`` at the last step (1 on a computed
      step, ``decay**n`` on the n-th reuse, 0 once expired), float32.
    since: steps since the last computed step (int32).
  """

  psf: PyTree
  lam: jax.Array
  since: jax.Array

  def stats(self) -> dict[str, jax.Array]:
    return {"reuse_weight": self.lam}


@dataclasses.dataclass(frozen=True)
class DecayedReuse(protocols.Combine):
  r"""vSAM's combination (Deng et al., arXiv 2403.08821).

  On a computed step, with ``gs`` the second gradient::

      psf = gs - g   (stored);   lam = 1;   out = gs

  On the n-th skipped step after it::

      out = g + decay**n * psf    for n <= max_reuse
      out = g                     afterwards

  This is the authors' ``lam = lam * decay while lam > decay**max_reuse``,
  counted in integers so the cut-off does not depend on rounding.
  """

  decay: float = 0.7
  max_reuse: int = 6

  def init(self, params):
    return DecayedReuseState(
        psf=base.zeros_like_f32(params),
        lam=jnp.zeros((), jnp.float32),
        since=jnp.zeros((), jnp.int32),
    )

  def computed(self, step, second, state):
    psf = jax.tree.map(
        lambda h, g: h.astype(jnp.float32) - g.astype(jnp.float32),
        second,
        step.grads,
    )
    new_state = DecayedReuseState(
        psf=base.tree_cast_like(psf, state.psf),
        lam=jnp.ones((), jnp.float32),
        since=jnp.zeros((), jnp.int32),
    )
    return base.tree_cast_like(second, step.grads), new_state

  def skipped(self, step, state):
    since = base.saturating_add(state.since, 1)
    active = since <= self.max_reuse
    lam = jnp.where(
        active,
        jnp.power(
            jnp.asarray(self.decay, jnp.float32), since.astype(jnp.float32)
        ),
        jnp.zeros((), jnp.float32),
    )
    out = jax.tree.map(
        lambda g, p: jnp.where(
            active,
            (g.astype(jnp.float32) + lam * p.astype(jnp.float32)).astype(
                g.dtype
            ),
            g,
        ),
        step.grads,
        state.psf,
    )
    return out, DecayedReuseState(psf=state.psf, lam=lam, since=since)


def decayed_reuse(decay: float = 0.7, max_reuse: int = 6) -> DecayedReuse:
  """vSAM's reuse combination (see :class:`DecayedReuse`)."""
  base.check_range("decay", decay, 0.0, 1.0, low_open=True, high_open=True)
  max_reuse = base.int_or_traced("max_reuse", max_reuse, 0)
  return DecayedReuse(decay=decay, max_reuse=max_reuse)


# --------------------------------------------------------------------------
# GSAM: the surrogate-gap combination.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SurrogateGap(protocols.Combine):
  r"""GSAM's combination (Zhuang et al., ICLR 2022, arXiv 2203.08065).

  With ``h`` the second gradient (at the perturbed point) and ``g`` the
  clean one, ``minimize_fp=True`` (the paper's GSAM, the authors' default)
  descends the perturbed loss along ``h`` and ascends the clean loss along
  the component of ``g`` orthogonal to ``h``, which shrinks the surrogate
  gap ``f_p - f`` without changing the descent on ``f_p``::

      g_perp = g - (<g, h> / ‖h‖²) * h
      out    = h - alpha * g_perp

  ``minimize_fp=False`` (the authors' other option) descends the clean loss
  and adds the part of ``h`` orthogonal to ``g``::

      h_perp = h - (<h, g> / ‖g‖²) * g
      out    = g + alpha * h_perp

  ``alpha = 0`` with ``minimize_fp=True`` is SAM. Inner products and norms
  are global over all leaves, in float32, overflow-safe
  (``tree_projection_coef``). No ``eps`` is added to the squared norm (the
  authors' code adds none): the projection is scale-free, so the rule is
  the same at gradient scales of 1e-30 and 1e30; a zero ``h`` (or ``g``)
  gives a zero projection, not NaN.
  ``alpha`` is a float or a schedule of the step count.
  """

  alpha: Any = 0.4
  minimize_fp: bool = True

  def computed(self, step, second, state):
    alpha = base.resolve(self.alpha, step.count, "alpha")
    g = base.tree_f32(step.grads)
    h = base.tree_f32(second)
    if self.minimize_fp:
      coef = base.tree_projection_coef(g, h)
      out = jax.tree.map(lambda a, b: b - alpha * (a - coef * b), g, h)
    else:
      coef = base.tree_projection_coef(h, g)
      out = jax.tree.map(lambda a, b: a + alpha * (b - coef * a), g, h)
    return base.tree_cast_like(out, step.grads), state


def surrogate_gap(
    alpha: base.ScalarOrSchedule = 0.4, *, minimize_fp: bool = True
) -> SurrogateGap:
  """GSAM's combination (see :class:`SurrogateGap`); ``alpha >= 0``."""
  base.check_scalar_or_schedule("alpha", alpha, 0.0)
  if not isinstance(minimize_fp, bool):
    raise ValueError(f"minimize_fp must be a bool, got {minimize_fp!r}")
  return SurrogateGap(alpha=alpha, minimize_fp=minimize_fp)
