"""Gradient reuse: LookSAM and vSAM.

Both methods compute the second gradient only on some steps and, on the
others, reuse what the last computed step left in state, so a reuse step
evaluates ``loss_fn`` once less than SAM and costs about what SGD costs. The
decision is a ``lax.cond`` inside the compiled step (the engine's gate), never
an arithmetic blend of both branches.

Parts (usable on their own with :func:`sam_optax.sharpness_aware`):

- :class:`OrthogonalReuse` (combine): LookSAM's rule. Stores the part of the
  SAM gradient orthogonal to the clean one, adds it back rescaled on skipped
  steps.
- :class:`DecayedReuse` (combine): vSAM's rule. Stores ``psf = gs - g`` and
  adds it back with a weight that decays geometrically, for a bounded number
  of steps.
- :class:`VariationSampling` (gate): vSAM's schedule. Samples the second
  gradient adaptively from the variation of statistics kept in ring buffers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import engine
from sam_optax._src import gate as gate_lib
from sam_optax._src import geometry as geometry_lib

PyTree = Any
LeafSelection = Union[None, Callable[[str], bool], Sequence[str]]


# --------------------------------------------------------------------------
# LookSAM: orthogonal-component reuse.
# --------------------------------------------------------------------------


class OrthogonalReuseState(NamedTuple):
  """LookSAM's memory.

  Attributes:
    gv: the component of the last SAM gradient orthogonal to the clean
      gradient of that step (params' dtypes).
    since: steps since the last computed second gradient (int32; 0 on a
      computed step).
  """

  gv: PyTree
  since: jax.Array

  def stats(self) -> dict[str, jax.Array]:
    return {"steps_since_sample": self.since}


@dataclasses.dataclass(frozen=True)
class OrthogonalReuse(engine.Combine):
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
        gv=jax.tree.map(jnp.zeros_like, params),
        since=jnp.zeros((), jnp.int32),
    )

  def computed(self, step, second, state):
    g = base.tree_f32(step.grads)
    gs = base.tree_f32(second)
    if self.per_leaf:
      gv = jax.tree.map(
          lambda a, b: a - (jnp.vdot(a, b) / (jnp.vdot(b, b) + step.eps)) * b,
          gs,
          g,
      )
    else:
      coef = base.tree_vdot(gs, g) / (base.tree_sq_norm(g) + step.eps)
      gv = jax.tree.map(lambda a, b: a - coef * b, gs, g)
    new_state = OrthogonalReuseState(
        gv=base.tree_cast_like(gv, state.gv), since=jnp.zeros((), jnp.int32)
    )
    return base.tree_cast_like(second, step.grads), new_state

  def skipped(self, step, state):
    alpha = base.resolve(self.alpha, step.count)
    g = base.tree_f32(step.grads)
    gv = base.tree_f32(state.gv)
    if self.per_leaf:
      out = jax.tree.map(
          lambda a, v: a
          + alpha * (base.tree_norm(a) / (base.tree_norm(v) + step.eps)) * v,
          g,
          gv,
      )
    else:
      scale = alpha * base.tree_norm(g) / (base.tree_norm(gv) + step.eps)
      out = jax.tree.map(lambda a, v: a + scale * v, g, gv)
    new_state = state._replace(since=state.since + 1)
    return base.tree_cast_like(out, step.grads), new_state


def orthogonal_reuse(
    alpha: base.ScalarOrSchedule = 0.7, *, per_leaf: bool = False
) -> OrthogonalReuse:
  """LookSAM's reuse combination (see :class:`OrthogonalReuse`)."""
  base.check_scalar_or_schedule("alpha", alpha, 0.0)
  if not isinstance(per_leaf, bool):
    raise ValueError(f"per_leaf must be a bool, got {per_leaf!r}")
  return OrthogonalReuse(alpha=alpha, per_leaf=per_leaf)


def looksam(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.1,
    *,
    k: int = 5,
    alpha: base.ScalarOrSchedule = 0.7,
    per_leaf: bool = False,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM (Liu, Mai, Chen, Hsieh, You, CVPR 2022, arXiv 2203.02714).

  Every ``k``-th step (``count % k == 0``, step 0 included) is a full SAM step
  that also stores the part of the SAM gradient orthogonal to ``g``::

      gs  = ∇L_B(w + rho * g / (‖g‖ + eps))
      gv  = gs - (<gs, g> / (‖g‖² + eps)) * g
      out = gs

  The other steps compute no second gradient and reuse ``gv``, rescaled to
  the current gradient's norm::

      out = g + alpha * (‖g‖ / (‖gv‖ + eps)) * gv

  The choice is a ``lax.cond`` in the compiled step: a reuse step evaluates
  ``loss_fn`` once less than SAM. Cost on average ``(k + 1) / k`` gradients
  per step. ``k = 1`` is SAM.

  Defaults ``k=5``, ``alpha=0.7``, ``rho=0.1`` are the common public choices
  (the paper's own values were not available to us). Norms and the
  projection are global by default; ``per_leaf=True`` does both per
  parameter tensor, as some public versions do.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux=True``).
    rho: radius, float or schedule.
    k: period of the SAM steps, an integer >= 1.
    alpha: weight of the reused component, >= 0, float or schedule.
    per_leaf: projection and norms per parameter tensor instead of global.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; perturbed aux is discarded.
    axis_name: ``pmap``/``shard_map`` axis: the output, the stored ``gv`` and
      every norm are built from gradients averaged over it, so every device
      keeps the same state. The perturbation uses ``updates`` as passed
      (per-device: m-sharpness; ``pmean``-ed: global SAM).
    eps: guard added to every norm that divides.

  ``sam_optax.stats`` reports ``count``, ``grad_evals`` and
  ``steps_since_sample``. Under ``optax.inject_hyperparams``, ``rho`` and
  ``alpha`` may be injected; ``k`` and ``per_leaf`` go in ``static_args``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    >>> tx = optax.chain(sam_optax.looksam(loss_fn, k=5), optax.sgd(0.1))
    >>> w = jnp.ones(3); state = tx.init(w); b = jnp.arange(3.0)
    >>> for _ in range(10):
    ...   u, state = tx.update(jax.grad(loss_fn)(w, b), state, w, batch=b)
    >>> int(sam_optax.stats(state)["grad_evals"])
    2
  """
  k = base.static_int("k", k, 1)
  return engine.sharpness_aware(
      loss_fn,
      rho,
      geometry=geometry_lib.global_norm(),
      gate=gate_lib.every_k(k),
      combine=orthogonal_reuse(alpha, per_leaf=per_leaf),
      has_aux=has_aux,
      axis_name=axis_name,
      eps=eps,
  )


# --------------------------------------------------------------------------
# vSAM: decayed reuse of the PSF and a variation-based sampling schedule.
# --------------------------------------------------------------------------


class DecayedReuseState(NamedTuple):
  """vSAM's memory of the last sampled step.

  Attributes:
    psf: ``gs - g`` of the last computed step (params' dtypes).
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
class DecayedReuse(engine.Combine):
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
        psf=jax.tree.map(jnp.zeros_like, params),
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
    since = state.since + 1
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


class VariationSamplingState(NamedTuple):
  """vSAM's schedule and statistics (all arrays, identical on every device).

  Attributes:
    rate: expected second gradients per window after warm-up (the authors'
      ``base_sr``), float32; the quota of a window is ``floor(rate)``.
    taken: second gradients taken in the current window (int32).
    probability: the probability of a sampled step at the last decision (1
      during warm-up, ``rate / window`` after), float32.
    since: steps since the last sampled step (int32).
    samples: sampled steps recorded so far (int32); the ring buffers' write
      position is ``samples % window``.
    key: PRNG key of the random draws.
    ratio: ring buffer of ``R = ‖psf‖ / ‖g‖`` over the last ``window`` samples.
    norm: ring buffer of ``P = ‖psf‖``.
    variance: ring buffer of ``V``, the mean block variance of ``sort(P)``.
  """

  rate: jax.Array
  taken: jax.Array
  probability: jax.Array
  since: jax.Array
  samples: jax.Array
  key: jax.Array
  ratio: jax.Array
  norm: jax.Array
  variance: jax.Array

  def stats(self) -> dict[str, jax.Array]:
    return {
        "sampling_rate": self.probability,
        "samples_per_window": self.rate,
        "steps_since_sample": self.since,
    }


def _select_leaves(paths: list[str], stat_leaves: LeafSelection) -> list[bool]:
  if stat_leaves is None:
    return [True] * len(paths)
  if callable(stat_leaves):
    return [bool(stat_leaves(p)) for p in paths]
  return [
      any(p == s or p.startswith(s.rstrip("/") + "/") for s in stat_leaves)
      for p in paths
  ]


def chronological(buffer: jax.Array, samples: jax.Array) -> jax.Array:
  """A ring buffer, oldest entry first (never-written entries come first)."""
  size = buffer.shape[0]
  return jnp.roll(buffer, -(samples % size))


def mean_relative_change(
    values: jax.Array, valid: jax.Array, eps: float
) -> jax.Array:
  """Mean of ``(x[i+1] - x[i]) / (x[i] + eps)`` over pairs of valid entries.

  ``values`` in chronological order; ``valid`` marks the recorded entries.
  Zero when fewer than two entries are valid.
  """
  x0, x1 = values[:-1], values[1:]
  pair = valid[:-1] & valid[1:]
  change = jnp.where(pair, (x1 - x0) / (x0 + eps), 0.0)
  n = jnp.sum(pair.astype(jnp.float32))
  return jnp.where(n > 0, jnp.sum(change) / jnp.maximum(n, 1.0), 0.0)


def block_variance(norms: jax.Array, blocks: int) -> jax.Array:
  """``V``: mean over ``blocks`` equal blocks of the variance of ``sort(P)``.

  The unbiased variance (``ddof=1``), as ``torch.var`` in the authors' code.
  """
  s = jnp.sort(norms).reshape(blocks, -1)
  return jnp.mean(jnp.var(s, axis=1, ddof=1))


@dataclasses.dataclass(frozen=True, eq=False)
class VariationSampling(engine.Gate):
  r"""vSAM's sampling gate (Deng, Pang, Zhang, Wang, arXiv 2403.08821).

  During the first ``warmup_steps`` steps every step is sampled. Then the
  steps are cut into windows of ``window`` steps, the first one starting at
  step ``warmup_steps``. At the first step of each window the rate (expected
  samples per window) is updated from the statistics of the last ``window``
  samples::

      dR   = clip(mean relative change of consecutive R values, -1, 1)
      dV   = clip(mean relative change of consecutive V values, -1, 1)
      rate = clip(rate * (1 + gains[0] * dR + gains[1] * dV),
                  1, floor(window * max_rate))

  and within the window a step is sampled with probability ``rate / window``
  while fewer than ``floor(rate)`` were taken, and forced when the steps left
  in the window (this one included) are no more than the quota left, so
  every window takes exactly ``floor(rate)`` samples.

  On every sampled step (warm-up included), with ``psf = gs - g`` over the
  leaves chosen by ``stat_leaves``: ``R = ‖psf‖ / (‖g‖ + eps)``,
  ``P = ‖psf‖`` go into ring buffers of length ``window``, then
  ``V = mean_b var(block_b(sort(P buffer)))`` over ``blocks`` equal blocks.
  """

  warmup_steps: int = 100
  window: int = 50
  blocks: int = 5
  max_rate: float = 0.8
  gains: tuple[float, float] = (0.13, 0.13)
  initial_rate: float = 1.0
  seed: int = 0
  stat_leaves: LeafSelection = None
  always: bool = False

  @property
  def max_quota(self) -> Union[int, jax.Array]:
    """``floor(window * max_rate)``: the most samples a window may take."""
    mr = base._concrete_float(self.max_rate)  # pylint: disable=protected-access
    if mr is None:  # injected by optax.inject_hyperparams
      return jnp.floor(self.window * jnp.asarray(self.max_rate, jnp.float32))
    return int(math.floor(self.window * mr))

  def init(self, params):
    paths = base.leaf_paths(params)
    if self.stat_leaves is not None:
      if not callable(self.stat_leaves):
        unknown = [
            s for s in self.stat_leaves
            if not any(_select_leaves(paths, [s]))
        ]
        if unknown:
          raise ValueError(
              f"stat_leaves names paths that are not in params: {unknown}; "
              f"params have the leaf paths {paths}"
          )
      if not any(_select_leaves(paths, self.stat_leaves)):
        raise ValueError(
            "stat_leaves selects no leaf of params; params have the leaf "
            f"paths {paths}"
        )
    # Three separate buffers: one array in two slots cannot be donated.
    zeros = lambda: jnp.zeros((self.window,), jnp.float32)  # noqa: E731
    return VariationSamplingState(
        rate=jnp.asarray(self.initial_rate, jnp.float32),
        taken=jnp.zeros((), jnp.int32),
        probability=jnp.ones((), jnp.float32),
        since=jnp.zeros((), jnp.int32),
        samples=jnp.zeros((), jnp.int32),
        key=jax.random.PRNGKey(self.seed),
        ratio=zeros(),
        norm=zeros(),
        variance=zeros(),
    )

  def updated_rate(self, state: VariationSamplingState, eps: float):
    """The rate after a window boundary, from the state's ring buffers."""
    idx = jnp.arange(self.window)
    valid = idx >= self.window - jnp.minimum(state.samples, self.window)
    d_r = mean_relative_change(
        chronological(state.ratio, state.samples), valid, eps
    )
    d_v = mean_relative_change(
        chronological(state.variance, state.samples), valid, eps
    )
    d_r = jnp.clip(d_r, -1.0, 1.0)
    d_v = jnp.clip(d_v, -1.0, 1.0)
    rate = state.rate * (1.0 + self.gains[0] * d_r + self.gains[1] * d_v)
    return jnp.clip(rate, 1.0, jnp.asarray(self.max_quota, jnp.float32))

  def decide(self, step, state):
    count = step.count
    warm = count < self.warmup_steps
    pos = jnp.maximum(count - self.warmup_steps, 0) % self.window
    boundary = jnp.logical_and(jnp.logical_not(warm), pos == 0)
    rate = jnp.where(boundary, self.updated_rate(state, step.eps), state.rate)
    taken = jnp.where(boundary, 0, state.taken)
    quota = jnp.floor(rate).astype(jnp.int32)
    key, sub = jax.random.split(state.key)
    prob = rate / self.window
    draw = jnp.logical_and(taken < quota, jax.random.uniform(sub) < prob)
    forced = (self.window - pos) <= (quota - taken)
    go = warm | draw | forced
    new_state = state._replace(
        rate=rate,
        taken=taken + jnp.logical_and(go, ~warm).astype(jnp.int32),
        probability=jnp.where(warm, 1.0, prob).astype(jnp.float32),
        since=jnp.where(go, 0, state.since + 1).astype(jnp.int32),
        key=key,
    )
    return go, new_state

  def observe(self, step, second, state):
    flat_g, _ = jax.tree_util.tree_flatten_with_path(step.grads)
    flat_h = jax.tree.leaves(second)
    paths = [base.path_str(p) for p, _ in flat_g]
    keep = _select_leaves(paths, self.stat_leaves)
    g = [x for (_, x), k in zip(flat_g, keep) if k]
    psf = [
        h.astype(jnp.float32) - x.astype(jnp.float32)
        for (_, x), h, k in zip(flat_g, flat_h, keep)
        if k
    ]
    p_now = base.tree_norm(psf)
    r_now = p_now / (base.tree_norm(g) + step.eps)
    i = state.samples % self.window
    norm = state.norm.at[i].set(p_now)
    ratio = state.ratio.at[i].set(r_now)
    variance = state.variance.at[i].set(block_variance(norm, self.blocks))
    return state._replace(
        samples=state.samples + 1, ratio=ratio, norm=norm, variance=variance
    )


def variation_sampling(
    *,
    warmup_steps: int = 100,
    window: int = 50,
    blocks: int = 5,
    max_rate: float = 0.8,
    gains: tuple[float, float] = (0.13, 0.13),
    initial_rate: float = 1.0,
    seed: int = 0,
    stat_leaves: LeafSelection = None,
) -> VariationSampling:
  """vSAM's sampling gate (see :class:`VariationSampling`), with checks."""
  warmup_steps = base.int_or_traced("warmup_steps", warmup_steps, 0)
  window = base.static_int("window", window, 2)
  blocks = base.static_int("blocks", blocks, 1)
  if window < blocks or window % blocks or window // blocks < 2:
    raise ValueError(
        "window must be a multiple of blocks with at least 2 values per block "
        f"(window >= 2 * blocks, window % blocks == 0); got window={window}, "
        f"blocks={blocks}"
    )
  # max_rate, initial_rate and seed may arrive as arrays (inject_hyperparams
  # injects every numeric argument): checked when concrete.
  base.check_range("max_rate", max_rate, 0.0, 1.0, low_open=True)
  concrete = base._concrete_float  # pylint: disable=protected-access
  max_quota = window
  if concrete(max_rate) is not None:
    max_rate = concrete(max_rate)
    max_quota = int(math.floor(window * max_rate))
    if max_quota < 1:
      raise ValueError(
          "max_rate must allow at least one sample per window: "
          f"floor(window * max_rate) = floor({window} * {max_rate}) = "
          f"{max_quota}; max_rate must be in [1/window, 1] = "
          f"[{1 / window:g}, 1]"
      )
  try:
    gains = tuple(float(x) for x in gains)
  except TypeError:
    raise ValueError(f"gains must be a pair of floats, got {gains!r}") from None
  if len(gains) != 2 or not all(math.isfinite(x) and x >= 0 for x in gains):
    raise ValueError(
        f"gains must be two finite floats in [0, inf), got {gains!r}"
    )
  base.check_range("initial_rate", initial_rate, 1.0, float(max_quota))
  if concrete(initial_rate) is not None:
    initial_rate = concrete(initial_rate)
  seed = base.int_or_traced("seed", seed, None)
  if stat_leaves is not None and not callable(stat_leaves):
    if isinstance(stat_leaves, str):
      stat_leaves = (stat_leaves,)
    stat_leaves = tuple(stat_leaves)
    if not stat_leaves or not all(isinstance(s, str) for s in stat_leaves):
      raise ValueError(
          "stat_leaves must be None, a predicate on the '/'-joined leaf path, "
          f"or a non-empty sequence of leaf paths or path prefixes; got "
          f"{stat_leaves!r}"
      )
  return VariationSampling(
      warmup_steps=warmup_steps,
      window=window,
      blocks=blocks,
      max_rate=max_rate,
      gains=gains,
      initial_rate=initial_rate,
      seed=seed,
      stat_leaves=stat_leaves,
  )


def vsam(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.05,
    *,
    warmup_steps: Optional[int] = None,
    window: int = 50,
    blocks: int = 5,
    max_rate: float = 0.8,
    gains: tuple[float, float] = (0.13, 0.13),
    decay: float = 0.7,
    max_reuse: int = 6,
    initial_rate: float = 1.0,
    seed: int = 0,
    stat_leaves: LeafSelection = None,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""vSAM, variation-based sampling SAM (Deng, Pang, Zhang, Wang,
  arXiv 2403.08821).

  The SAM gradient is the clean gradient plus PSF, the projection of the
  second-order term onto the first-order gradient; PSF changes slowly early
  in training and faster later. vSAM computes it (a full SAM step) on
  adaptively sampled steps and reuses it, decayed, on the steps between::

      sampled step:  gs  = ∇L_B(w + rho * g / (‖g‖ + eps))
                     psf = gs - g  (stored);  out = gs
                     record R = ‖psf‖/‖g‖, P = ‖psf‖ and
                     V = mean over `blocks` blocks of var(sort(P buffer))
                     in ring buffers of length `window`
      n-th reuse:    out = g + decay**n * psf   for n <= max_reuse
                     out = g                    afterwards

  Schedule: the first ``warmup_steps`` steps are SAM steps. Then, at the
  first step of every ``window``-step window (the first window starts at
  step ``warmup_steps``)::

      dR   = clip(mean_i (R[i+1] - R[i]) / R[i], -1, 1)   over the buffer
      dV   = clip(mean_i (V[i+1] - V[i]) / V[i], -1, 1)
      rate = clip(rate * (1 + gains[0]*dR + gains[1]*dV),
                  1, floor(window * max_rate))

  and in the window a step is sampled with probability ``rate / window``
  while fewer than ``floor(rate)`` were taken, and forced when the steps left
  (this one included) equal the quota left: every window takes exactly
  ``floor(rate)`` second gradients. The draws come from a PRNG key in state
  (``seed``), identical on every device. The choice is a ``lax.cond``: a
  reuse step evaluates ``loss_fn`` once less than SAM.

  Defaults (window 50, blocks 5, max_rate 0.8, gains (0.13, 0.13), decay 0.7,
  max_reuse 6, rho 0.05, initial rate 1) are from the authors' code
  (ajiaaa/vSAM, ``train_vsam.py`` and ``vsam/vsam.py``). Choices where the
  paper and code leave a point open or where we depart from the code:

  - ``warmup_steps`` default ``None`` means ``2 * window`` (100): the
    fewest warm-up steps after which both ring buffers hold only real
    statistics at the first rate update. The authors warm up 3 epochs; pass
    ``3 * steps_per_epoch`` to match them.
  - Relative changes are taken between consecutive *recorded* samples only
    (the authors' buffers start as zeros, which would divide by zero with
    a short warm-up); the divisor gets ``+ eps``. ``V`` uses the whole ``P``
    buffer, zeros not yet overwritten included, as the authors' code does.
  - The window count starts at step ``warmup_steps``, rate update first. (The
    authors' counter starts at 1, which makes their first window after
    warm-up one step short and free of samples.)
  - ``R`` and ``P`` are over the whole model by default (the authors use the
    last ``last_layer`` parameter tensors in module order; a pytree has no
    such order): ``stat_leaves`` restricts them to a subset.
  - The variance is the unbiased one (``torch.var``), so a block needs two
    values: ``window >= 2 * blocks``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux=True``).
    rho: radius, float or schedule.
    warmup_steps: integer >= 0 (None: ``2 * window``).
    window: steps per window, a multiple of ``blocks``, >= ``2 * blocks``.
    blocks: blocks of the sorted ``P`` buffer for ``V``, >= 1.
    max_rate: share of a window that may be sampled, in (0, 1] with
      ``floor(window * max_rate) >= 1``.
    gains: weights of ``dR`` and ``dV`` in the rate update, >= 0.
    decay: reuse weight decay, in (0, 1).
    max_reuse: reuse steps after a sample that add the decayed PSF, >= 0.
    initial_rate: samples per window before the first update, in
      ``[1, floor(window * max_rate)]``.
    seed: seed of the sampling key.
    stat_leaves: leaves ``R`` and ``P`` are computed over: None (all), a
      predicate on the '/'-joined leaf path (``"params/head/kernel"``), or a
      sequence of leaf paths or path prefixes (``["params/head"]``); checked
      against the params at ``init``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; perturbed aux is discarded.
    axis_name: ``pmap``/``shard_map`` axis. The output, PSF and every
      statistic are built from gradients averaged over it and the draws from
      a replicated key, so every device takes the same decision and keeps
      the same state. The perturbation uses ``updates`` as passed.
    eps: guard added to every norm that divides.

  ``sam_optax.stats`` reports ``count``, ``grad_evals``, ``sampling_rate``
  (probability of a sampled step at the last step: 1 in warm-up),
  ``samples_per_window``, ``steps_since_sample`` and ``reuse_weight``.
  Under ``optax.inject_hyperparams`` every numeric argument may be injected
  (``rho``, ``decay``, ``max_rate``, ``warmup_steps``, ``max_reuse``, ...)
  except ``window`` and ``blocks``, which fix buffer shapes: list them in
  ``static_args`` (a clear error says so otherwise).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    >>> tx = optax.chain(sam_optax.vsam(loss_fn, warmup_steps=4, window=10,
    ...                                 blocks=5), optax.sgd(0.1))
    >>> w = jnp.ones(3); state = tx.init(w); b = jnp.arange(3.0)
    >>> for _ in range(24):
    ...   u, state = tx.update(jax.grad(loss_fn)(w, b), state, w, batch=b)
    >>> int(sam_optax.stats(state)["grad_evals"])  # 4 warm-up + 1 per window
    6
  """
  window = base.static_int("window", window, 2)
  if warmup_steps is None:
    warmup_steps = 2 * window
  gate = variation_sampling(
      warmup_steps=warmup_steps,
      window=window,
      blocks=blocks,
      max_rate=max_rate,
      gains=gains,
      initial_rate=initial_rate,
      seed=seed,
      stat_leaves=stat_leaves,
  )
  return engine.sharpness_aware(
      loss_fn,
      rho,
      geometry=geometry_lib.global_norm(),
      gate=gate,
      combine=decayed_reuse(decay, max_reuse),
      has_aux=has_aux,
      axis_name=axis_name,
      eps=eps,
  )
