"""LightSAM: parameter-agnostic SAM (Cheng et al., arXiv 2505.24399).

Both halves of a SAM step use an adaptive optimizer: the step uphill is
scaled by accumulated squared gradients (an engine :class:`Geometry` with
state), and the step downhill is the matching adaptive update (an optax
transform chained after the engine). Three variants share one template::

    I   adagrad_norm   u += ‖s‖²;   e = rho * s / sqrt(u)
                       v += ‖gs‖²;  update = -lr * gs / sqrt(v)
    II  adagrad        u += s²;     e = rho * s / sqrt(u)          (per coordinate)
                       v += gs²;    update = -lr * gs / sqrt(v)
    III adam           r = b1 r + (1-b1) s;  u = b2 u + (1-b2) s²;  e = rho * r / sqrt(u)
                       m = b1 m + (1-b1) gs; v = b2 v + (1-b2) gs²; update = -lr * m / sqrt(v)

with ``s`` the clean gradient, ``gs = ∇L_B(w + e)`` on the same batch,
accumulators ``u, v`` starting at ``eps²``, moments ``r, m`` at zero and no
bias correction (see :func:`lightsam` for the sources).

Two numerical guards, neither of which changes the rule on ordinary input:

- **Overflow.** The accumulators are stored as their square roots
  (``sqrt(u)``, ``sqrt(v)``) and grown with an overflow-safe ``hypot``
  (``sqrt(u + ‖s‖²) = hypot(sqrt(u), ‖s‖)``), so a gradient of 1e19 or
  more gives the rule's step instead of squaring to ``inf`` and making every
  later step 0. AdaGrad-Norm's ``‖s‖`` is kept as digits and a power of two
  (:func:`base.tree_norm_exp`) and the step is computed scaled by it, so
  finite gradients whose norm is past float32's range (~3.4e38) still give
  the rule's step; the root accumulator then holds ``inf``, and every later
  step is the rule's value in float32 (``s / sqrt(u)`` with ``u > 1e77``
  rounds to 0). The states expose the squared values for reading
  (``sum_of_squares``, ``accumulator``, ``nu``; ``inf`` once they exceed
  float32's range).
- **Non-finite steps.** When the incoming gradient (the clean one for the
  ascent, the perturbed one for the descent) has a NaN or inf entry anywhere
  in the tree, every accumulator keeps its previous value (a ``jnp.where``
  select, no ``lax.cond``), while the step's output still carries the
  non-finite value so that ``optax.apply_if_finite`` and loss scalers see
  it. A run with one such step then continues exactly as a run in which that
  step never happened.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax._src import base
from sam_optax._src import engine
from sam_optax._src import protocols

VARIANTS = ("adagrad_norm", "adagrad", "adam")

#: Default rho per variant, chosen on the benchmark problem (see lightsam()).
DEFAULT_RHO = {"adagrad_norm": 0.1, "adagrad": 0.003, "adam": 3e-4}

#: Default eps: accumulators start at eps² (the LightSAM rule).
DEFAULT_EPS = 1e-8


# --------------------------------------------------------------------------
# Small numerical helpers.
# --------------------------------------------------------------------------


def _safe_div(x: jax.Array, root: jax.Array) -> jax.Array:
  """``x / root`` (``root = sqrt(acc)``), and 0 where ``root == 0``.

  ``root`` starts at ``eps > 0``, so the guard never changes a value of the
  rule; it only keeps a coordinate that never saw a gradient finite once an
  exponential average (Adam, ``b2^t eps²``) underflows to zero.
  """
  zero = root == 0  # only the exact zero: a NaN root must stay visible
  return jnp.where(zero, 0.0, x / jnp.where(zero, 1.0, root))


def _grown_root(root: jax.Array, tree: Any) -> tuple[jax.Array, jax.Array]:
  """AdaGrad-Norm's ``sqrt(root² + ‖tree‖²)`` scaled by ``2**-k``, and
  ``k``: the exponent of the larger of ``root`` and ``‖tree‖`` (its
  (digits, power of two) pair, :func:`base.tree_norm_exp`), so both terms
  are at most about 1 and neither overflows nor flushes to 0 (scaling by
  the norm's alone overflowed a root of 1e20 for a gradient of 1e-19).
  Dividing ``x 2**-k`` by it gives ``x / sqrt(...)`` also when the norm is
  past float32's range; ``times_pow2(scaled, k)`` is the new root (``inf``
  then). NaN or inf when an entry of ``tree`` is."""
  n, kn = base.tree_norm_exp(tree)
  k = jnp.maximum(kn, base.pow2_exponent(root))
  return jnp.hypot(base.times_pow2(root, -k), base.times_pow2(n, kn - k)), k


def _decayed_hypot(decay: Any, root: jax.Array, x: jax.Array) -> jax.Array:
  """``sqrt(decay * root² + (1 - decay) * x²)`` without squaring (Adam's
  second moment kept as its root)."""
  if isinstance(decay, (int, float)):  # in float64: 1 - 0.999 in float32 is off by 5e-5
    keep, add = math.sqrt(decay), math.sqrt(1.0 - decay)
  else:  # traced (inject_hyperparams)
    keep, add = jnp.sqrt(decay), jnp.sqrt(1.0 - decay)
  return jnp.hypot(keep * root, add * x)


def _check_eps(eps: Any) -> None:
  base.check_range("eps", eps, 0.0, low_open=True)


def _check_beta(name: str, value: Any) -> None:
  base.check_range(name, value, 0.0, 1.0, high_open=True)


# --------------------------------------------------------------------------
# The adaptive updates (the descent half), usable on their own.
# --------------------------------------------------------------------------


class ScaleByAdagradNormState(NamedTuple):
  """``root_sum_of_squares``: ``sqrt(eps² + Σ_t ‖g_t‖²)`` (float32 scalar).

  Kept as the root so that it cannot overflow; ``sum_of_squares`` reads the
  squared value (``inf`` past float32's range).
  """

  root_sum_of_squares: jax.Array

  @property
  def sum_of_squares(self) -> jax.Array:
    return jnp.square(self.root_sum_of_squares)


def scale_by_adagrad_norm(
    eps: float = DEFAULT_EPS,
) -> optax.GradientTransformation:
  r"""AdaGrad-Norm: one scalar step size from the sum of squared gradient norms.

  Ward, Wu, Bottou, "AdaGrad stepsizes: sharp convergence over nonconvex
  landscapes" (ICML 2019, arXiv 1806.01811); the update of LightSAM-I
  (Cheng et al., arXiv 2505.24399)::

      v_0 = eps²
      v_t = v_{t-1} + ‖g_t‖²          # global L2 norm over all leaves
      out = g_t / sqrt(v_t)

  Chain ``optax.scale_by_learning_rate(lr)`` after it for ``-lr * out``. The
  first output has global norm just under 1 whatever the gradient's scale,
  which is what makes the step size agnostic to it. Norms accumulate in
  float32, overflow-safe (the state keeps ``sqrt(v_t)``, grown with
  ``hypot``); the output has the dtype of the incoming updates. A gradient
  with a NaN or inf entry leaves the state as it was and its output carries
  the non-finite value. Under ``pmap`` pass it the device-averaged gradient,
  as for any optax optimizer.

  Args:
    eps: the accumulator starts at ``eps²``; must be > 0 (default 1e-8, the
      LightSAM rule).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.scale_by_adagrad_norm(),
    ...                  optax.scale_by_learning_rate(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> [round(float(x), 4) for x in u]     # -0.1 * g / ‖g‖
    [-0.06, -0.08]
  """
  _check_eps(eps)

  def init_fn(params):
    del params
    return ScaleByAdagradNormState(
        root_sum_of_squares=base.new_array(eps, jnp.float32)
    )

  def update_fn(updates, state, params=None):
    del params
    # sqrt(v + ‖g‖²) and g / sqrt(...) both scaled by 2**-k, with ‖g‖ =
    # n 2**k: a norm past float32's range (~3.4e38, finite entries) still
    # gives the rule's g / ‖g‖-sized step; the stored root is then inf, and
    # every later step the rule's float32 value, 0.
    root, k = _grown_root(state.root_sum_of_squares, updates)
    out = jax.tree.map(
        lambda g: _safe_div(base.times_pow2(g.astype(jnp.float32), -k),
                            root).astype(g.dtype),
        updates,
    )
    root = jnp.where(jnp.isfinite(root), base.times_pow2(root, k),
                     state.root_sum_of_squares)
    return out, ScaleByAdagradNormState(root_sum_of_squares=root)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdagradState(NamedTuple):
  """``root_sum_of_squares``: ``sqrt(eps² + Σ_t g_t²)`` per coordinate
  (float32); ``sum_of_squares`` reads the squared values."""

  root_sum_of_squares: Any

  @property
  def sum_of_squares(self) -> Any:
    return jax.tree.map(jnp.square, self.root_sum_of_squares)


def scale_by_adagrad(eps: float = DEFAULT_EPS) -> optax.GradientTransformation:
  r"""Per-coordinate AdaGrad with the accumulator starting at ``eps²``::

      v_0 = eps²;  v_t = v_{t-1} + g_t²;  out = g_t / sqrt(v_t)

  The update of LightSAM-II. It is ``optax.scale_by_rss(
  initial_accumulator_value=eps**2, eps=0.0)`` in exact arithmetic; this one
  keeps the accumulator in float32 whatever the param dtype (scale_by_rss
  keeps it in the param dtype), as its root grown with ``hypot`` (no
  overflow for gradients of 1e19 and more), and returns the incoming dtype.
  A gradient with a NaN or inf entry anywhere leaves the state as it was;
  its output carries the non-finite value.
  """
  _check_eps(eps)

  def init_fn(params):
    return ScaleByAdagradState(
        root_sum_of_squares=base.full_like_f32(params, eps)
    )

  def update_fn(updates, state, params=None):
    del params
    root = jax.tree.map(
        lambda g, t: jnp.hypot(t, g.astype(jnp.float32)),
        updates,
        state.root_sum_of_squares,
    )
    out = jax.tree.map(
        lambda g, t: _safe_div(g.astype(jnp.float32), t).astype(g.dtype),
        updates,
        root,
    )
    root = base.tree_select(base.tree_all_finite(updates), root,
                    state.root_sum_of_squares)
    return out, ScaleByAdagradState(root_sum_of_squares=root)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamNoBiasState(NamedTuple):
  """First moment ``mu`` (from 0) and the root of the second moment
  ``nu_root = sqrt(nu)`` (from eps); ``nu`` reads the squared values."""

  mu: Any
  nu_root: Any

  @property
  def nu(self) -> Any:
    return jax.tree.map(jnp.square, self.nu_root)


def scale_by_adam_no_bias_correction(
    b1: float = 0.9, b2: float = 0.999, eps: float = DEFAULT_EPS
) -> optax.GradientTransformation:
  r"""Adam as LightSAM-III writes it: no bias correction, ``v_0 = eps²``::

      m_t = b1 m_{t-1} + (1-b1) g_t       (m_0 = 0)
      v_t = b2 v_{t-1} + (1-b2) g_t²      (v_0 = eps²)
      out = m_t / sqrt(v_t)

  Unlike ``optax.scale_by_adam`` there is no ``eps`` added to ``sqrt(v)`` and
  no bias correction, so the first step is ``(1-b1)/sqrt(1-b2) ≈ 3.16`` times
  ``sign(g)``. Moments in float32 (the second as its root, overflow-safe);
  the output has the incoming dtype. A gradient with a NaN or inf entry
  anywhere leaves both moments as they were; its output carries it.
  """
  _check_beta("b1", b1)
  _check_beta("b2", b2)
  _check_eps(eps)

  def init_fn(params):
    return ScaleByAdamNoBiasState(
        mu=base.zeros_like_f32(params),
        nu_root=base.full_like_f32(params, eps),
    )

  def update_fn(updates, state, params=None):
    del params
    g32 = base.tree_f32(updates)
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, g32)
    nu_root = jax.tree.map(
        lambda r, g: _decayed_hypot(b2, r, g), state.nu_root, g32
    )
    out = jax.tree.map(
        lambda m, r, g: _safe_div(m, r).astype(g.dtype), mu, nu_root, updates
    )
    new = ScaleByAdamNoBiasState(mu=mu, nu_root=nu_root)
    return out, base.tree_select(base.tree_all_finite(updates), new, state)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# The adaptive perturbation (the ascent half): an engine Geometry with state.
# --------------------------------------------------------------------------


class AdaptivePerturbationState(NamedTuple):
  """The ascent's accumulators.

  Attributes:
    momentum: ``r``, the first moment of the clean gradient (Adam variant; an
      empty tuple otherwise), float32, starts at 0.
    root_accumulator: ``sqrt(u)``: a float32 scalar (adagrad_norm) or a
      float32 pytree shaped like the params (adagrad, adam); starts at
      ``eps``. Kept as the root so that it cannot overflow; ``accumulator``
      reads ``u`` itself.
  """

  momentum: Any
  root_accumulator: Any

  @property
  def accumulator(self) -> Any:
    return jax.tree.map(jnp.square, self.root_accumulator)


@dataclasses.dataclass(frozen=True)
class AdaptivePerturbation(protocols.Geometry):
  """LightSAM's perturbation: ``e = rho * s / sqrt(u)`` (or ``rho * r / sqrt(u)``).

  See the module docstring for the three rules. The accumulators are state
  and are updated on every step, also one that builds no perturbation (a
  radius that is 0, e.g. before :func:`sam_optax.late_phase`'s start), from the clean
  gradient averaged over ``axis_name`` (``step.grads``), so every device keeps
  the same state. The freshest term of the numerator (``s``, or the ``(1-b1)
  s`` part of ``r``) is the ``updates`` as passed: a per-device gradient gives
  a per-device perturbation (m-sharpness), a ``pmean``-ed one the global
  step; without ``axis_name`` both are the same.

  With a region, the engine zeroes ``e`` outside it; adagrad_norm takes
  ``‖s‖`` over the region when the region asks to normalise over itself.

  Accumulators are kept as roots and grown with ``hypot`` (overflow-safe).
  When the clean gradient has a NaN or inf entry anywhere, the state is
  returned unchanged (a ``jnp.where`` select) and ``e`` carries the
  non-finite value. A NaN that appears only at the perturbed point cannot be
  seen here (``perturb`` runs before the second gradient); the engine
  discards the geometry's new state on such a step.
  """

  variant: str = "adagrad_norm"
  b1: float = 0.9
  b2: float = 0.999
  eps: float = DEFAULT_EPS

  def init(self, params):
    eps = base.new_array(self.eps, jnp.float32)  # not inject_hyperparams' own
    if self.variant == "adagrad_norm":
      return AdaptivePerturbationState(momentum=(), root_accumulator=eps)
    acc = base.full_like_f32(params, eps)
    momentum = base.zeros_like_f32(params) if self.variant == "adam" else ()
    return AdaptivePerturbationState(momentum=momentum, root_accumulator=acc)

  def perturb(
      self, step: protocols.Step, state: AdaptivePerturbationState, where
  ):
    s = base.tree_f32(step.grads)  # identical on every device: drives the state
    s_num = base.tree_f32(step.updates)  # as passed: drives the numerator
    finite = base.tree_all_finite(s)
    rho = step.rho
    if self.variant == "adagrad_norm":
      # Scaled by 2**-k (‖s‖ = n 2**k) as in scale_by_adagrad_norm: a norm
      # past float32's range still gives the rule's e, and u becomes inf
      # (every later e is then the rule's float32 value, 0).
      u, k = _grown_root(state.root_accumulator, where.norm_domain(s))
      e = jax.tree.map(
          lambda x: rho * _safe_div(base.times_pow2(x, -k), u), s_num)
      new = AdaptivePerturbationState(
          momentum=(), root_accumulator=base.times_pow2(u, k))
    elif self.variant == "adagrad":
      u = jax.tree.map(jnp.hypot, state.root_accumulator, s)
      e = jax.tree.map(lambda x, a: rho * _safe_div(x, a), s_num, u)
      new = AdaptivePerturbationState(momentum=(), root_accumulator=u)
    else:  # adam
      b1, b2 = self.b1, self.b2
      r = jax.tree.map(lambda m, x: b1 * m + (1.0 - b1) * x, state.momentum, s)
      r_num = jax.tree.map(
          lambda m, x: b1 * m + (1.0 - b1) * x, state.momentum, s_num
      )
      u = jax.tree.map(
          lambda a, x: _decayed_hypot(b2, a, x), state.root_accumulator, s
      )
      e = jax.tree.map(lambda x, a: rho * _safe_div(x, a), r_num, u)
      new = AdaptivePerturbationState(momentum=r, root_accumulator=u)
    return e, base.tree_select(finite, new, state)

  def advance(self, step, state, where):
    # u (and r) accumulate the clean gradient on every step, as the rules
    # say, also where no perturbation is built (XLA drops the unused e).
    return self.perturb(step, state, where)[1]


def adaptive_perturbation(
    variant: str = "adagrad_norm",
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = DEFAULT_EPS,
) -> AdaptivePerturbation:
  """LightSAM's adaptive ascent as an engine geometry (see the class)."""
  base.check_choice("variant", variant, VARIANTS)
  _check_beta("b1", b1)
  _check_beta("b2", b2)
  _check_eps(eps)
  return AdaptivePerturbation(variant=variant, b1=b1, b2=b2, eps=eps)


def on_trainable(
    inner: optax.GradientTransformation, trainable: Any
) -> optax.GradientTransformation:
  """``inner`` run on the trainable leaves alone (the sub-tree of
  :class:`protocols.Trainable`: its norms and state hold no frozen leaf);
  frozen leaves get a zero update."""
  if trainable is None:
    return inner

  def init_fn(params):
    part = engine.trainable_split(trainable, params)
    return inner.init(params if part is None else part.restrict(params))

  def update_fn(updates, state, params=None):
    part = engine.trainable_split(trainable, updates)
    if part is None:
      return inner.update(updates, state, params)
    sub_params = None if params is None else part.restrict(params)
    out, state = inner.update(part.restrict(updates), state, sub_params)
    zeros = jax.tree.map(jnp.zeros_like, part.frozen(updates))
    return part.merge(out, zeros), state

  return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_learning_rate(
    learning_rate: base.ScalarOrSchedule) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate``, except that a schedule's count
  advances only on finite updates, as the method's own count: a rejected
  step (a NaN or inf gradient, a non-finite output) leaves the schedule
  where it was, like every other part of the state. The state is optax's
  ``ScaleByScheduleState`` (a schedule) or ``EmptyState`` (a constant)."""
  if not callable(learning_rate):
    return optax.scale_by_learning_rate(learning_rate)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    lr = base.resolve(learning_rate, state.count, "learning_rate")
    out = jax.tree.map(lambda u: jnp.asarray(-lr, u.dtype) * u, updates)
    count = jnp.where(base.tree_all_finite(updates),
                      optax.safe_increment(state.count), state.count)
    return out, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def _adaptive_update(variant, b1, b2, eps) -> optax.GradientTransformation:
  if variant == "adagrad_norm":
    return scale_by_adagrad_norm(eps)
  if variant == "adagrad":
    return scale_by_adagrad(eps)
  return scale_by_adam_no_bias_correction(b1, b2, eps)


# --------------------------------------------------------------------------
# The full optimizer.
# --------------------------------------------------------------------------


def lightsam(
    loss_fn: Optional[Callable] = None,
    learning_rate: Optional[base.ScalarOrSchedule] = None,
    rho: Optional[base.ScalarOrSchedule] = None,
    *,
    variant: str = "adagrad_norm",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = DEFAULT_EPS,
    has_aux: bool = False,
    axis_name: Optional[base.AxisName] = None,
    trainable: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LightSAM, parameter-agnostic SAM (Cheng, Shen, Sun, Yin, Cao, Chen,
  arXiv 2505.24399).

  SAM whose ascent and descent both use an adaptive optimizer, so that
  training converges for any choice of ``rho`` and ``learning_rate`` (the
  paper's claim, under its assumptions). Made concrete in the test
  ``test_parameter_agnostic_sweep``: on least squares, rho in [0.01, 1] and
  lr in [0.1, 10], I and II converge on the whole grid where SAM + SGD
  diverges or stalls on most of it; III is agnostic to lr there but not to
  rho. In a finite run a large rho still costs accuracy (see the defaults
  below). ``s`` is
  the clean gradient (``updates``), ``gs = ∇L_B(w + e)`` the gradient at the
  perturbed point on the same batch::

      I   "adagrad_norm"  u += ‖s‖²;  e = rho s / sqrt(u);   v += ‖gs‖²;  Δw = -lr gs / sqrt(v)
      II  "adagrad"       u += s²;    e = rho s / sqrt(u);   v += gs²;    Δw = -lr gs / sqrt(v)
      III "adam"          r = b1 r + (1-b1) s;   u = b2 u + (1-b2) s²;   e = rho r / sqrt(u)
                          m = b1 m + (1-b1) gs;  v = b2 v + (1-b2) gs²;  Δw = -lr m / sqrt(v)

  ``u, v`` start at ``eps²``, ``r, m`` at 0, no bias correction; there is no
  ``eps`` in the denominators (the only guard returns 0 where an accumulator
  is exactly 0, which the rule never reaches since it starts at ``eps² >
  0``; see ``_safe_div``). The accumulators are stored as their roots,
  grown with an overflow-safe ``hypot``, and a step whose clean or perturbed
  gradient has a NaN or inf entry leaves them unchanged while its output
  carries the non-finite value (module docstring). It is built as::

      optax.chain(sharpness_aware(loss_fn, rho, geometry=adaptive_perturbation(variant)),
                  <matching adaptive update>,      # scale_by_adagrad_norm, ...
                  optax.scale_by_learning_rate(learning_rate))

  and is the **full optimizer**: its output is the parameter update
  (``-lr`` already applied); chain nothing after it but a finiteness check
  (``optax.chain(lightsam(...), optax.apply_if_finite(optax.identity(),
  n))``). Weight decay: an L2 term in ``loss_fn`` (both gradients then
  include it). A transform chained before LightSAM is lost (the update
  follows ``gs`` alone), and ``optax.add_decayed_weights(wd)`` after it
  adds ``+wd * w`` to an update that is already a descent step, which grows
  the weights; decoupled decay is ``optax.add_decayed_weights(-lr * wd)``
  after it, and with a learning-rate schedule
  ``optax.add_decayed_weights(lambda count: -schedule(count) * wd)``.
  Gradient clipping has no place in the chain either: before LightSAM it
  only shapes the perturbation, and ``optax.clip_by_global_norm(c)`` after
  it caps the update's norm (a limit on the step, not a clipped gradient).
  I and II bound every step already, because the current gradient is in
  the accumulator it is divided by: ``‖Δw‖ <= lr`` for I, ``|Δw_i| <= lr``
  for II. Cost: one extra gradient per step, like SAM.

  In II and III ``rho`` acts per coordinate (``‖e‖`` is about ``rho *
  sqrt(#params)`` on the first step, ``rho * 3.16 * sqrt(#params)`` for III
  without bias correction), so good values are much smaller than SAM's 0.05
  and shrink as the model grows. In I and II ``‖e‖`` decays like
  ``1/sqrt(t)`` as ``u`` accumulates; in III it does not (``u`` is an
  average), so III's rho acts like a fixed radius and too large a value
  stalls training as it does plain SAM.

  Default ``rho`` per variant [ours]: ``adagrad_norm`` 0.1, ``adagrad``
  0.003, ``adam`` 3e-4. How they were chosen: the benchmark's ``SmallCNN``
  (``experiments.models``, 128k parameters on 8x8 inputs) trained on
  scikit-learn's digits (1437 train / 360 test images, batch 64, 15 epochs,
  2 seeds) with ``learning_rate`` 1.0 / 0.01 / 0.001 (the registry's values);
  rho on a half-decade grid (I: 0.1 to 3, II: 1e-3 to 3e-2, III: 1e-4 to
  3e-3); the default is the rho > 0 with the best mean test accuracy (I
  95.97%, II 98.75%, III 98.75%). The next grid value up already costs
  accuracy and the one after it stops training (I at rho 3: 44%, II at
  0.03: 86%, III at 3e-3: 39%). On that small, easy problem no rho beat
  ``rho = 0`` by more than the noise (95.83%, 98.89%, 98.61%): treat the
  defaults as a safe scale to tune from, not a tuned value.

  ``learning_rate`` has no default. In the committed comparison (the docs'
  "Choosing a method" page: Fashion-MNIST, the digits, MNIST-1D, a short
  and a long regime each, paired against a tuned SGD), variant I at
  learning rate 1.0 was the best of 0.1, 0.3, 1.0 in all six cells and
  still below the best SGD row in four (-4.2, -10.2, -17.7 short; -13.4 on
  MNIST-1D long), above it only with the digits' wrong labels (+16.8): no
  setting met our rule for a default (never below the best SGD row). Tune
  the learning rate as you would SGD's.

  Args:
    loss_fn: ``loss_fn(params, batch)`` (``(loss, aux)`` with ``has_aux``),
      or None to pass it to every update, ``tx.update(grads, state, params,
      batch=batch, loss_fn=loss_fn)`` (as in :func:`sam_optax.sam`).
    learning_rate: ``lr`` > 0, float or schedule of the step count
      (required; ``lightsam(learning_rate=0.1)`` without a loss).
    rho: perturbation scale >= 0, float or schedule; None takes the
      variant's default (0.1, 0.003, 3e-4; see above). ``rho = 0`` gives
      the plain adaptive optimizer on the clean gradient with no second
      gradient.
    variant: ``"adagrad_norm"`` (I, the paper's main method), ``"adagrad"``
      (II) or ``"adam"`` (III).
    b1, b2: Adam's moment decays in [0, 1) (variant III only).
    eps: accumulators start at ``eps²``; > 0.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; perturbed aux is discarded.
    axis_name: ``pmap``/``shard_map`` axis. The second gradient is averaged
      over it, and so is the gradient that feeds the ascent's accumulators,
      so all state stays identical on every device. The numerator of ``e``
      uses ``updates`` as passed: a per-device gradient gives m-sharpness,
      a ``pmean``-ed one the global step.
    trainable: the parameters LightSAM trains, as in :func:`sam_optax.sam`
      (None: all; a predicate on the '/'-joined leaf path; or a pytree of
      Python bools). Both halves run on the trainable leaves alone: the
      ascent (its norms and accumulators) and the adaptive descent
      (AdaGrad-Norm's ``‖gs‖`` and every accumulator are over trainable
      leaves only), so the result on them equals LightSAM run on those
      leaves alone. Frozen leaves get a zero update: nothing else is needed
      to freeze them. LightSAM itself cannot go inside ``optax.masked`` or
      ``optax.multi_transform``: ``loss_fn`` would receive ``MaskedNode``
      leaves, and the first update raises.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: ``update(grads, state,
    params, batch=batch)`` returns the parameter update.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.sum((w - b) ** 2)
    >>> tx = sam_optax.lightsam(loss_fn, learning_rate=0.1)
    >>> w, b = jnp.zeros(3), jnp.ones(3)
    >>> state = tx.init(w)
    >>> g = jax.grad(loss_fn)(w, b)
    >>> u, state = tx.update(g, state, w, batch=b)
    >>> w = optax.apply_updates(w, u)
    >>> int(sam_optax.stats(state)["grad_evals"])
    1
  """
  base.check_choice("variant", variant, VARIANTS)
  if learning_rate is None:
    raise ValueError(
        "lightsam needs learning_rate (it is the full optimizer): "
        "lightsam(loss_fn, learning_rate, ...), or "
        "lightsam(learning_rate=..., ...) with the loss passed to update"
    )
  if rho is None:
    rho = DEFAULT_RHO[variant]
  base.check_scalar_or_schedule("rho", rho, 0.0)
  base.check_scalar_or_schedule("learning_rate", learning_rate, 0.0,
                                low_open=True)
  geometry = adaptive_perturbation(variant, b1=b1, b2=b2, eps=eps)
  ascent = engine.sharpness_aware(
      loss_fn, rho, geometry=geometry, has_aux=has_aux, axis_name=axis_name,
      trainable=trainable,
  )
  tx = optax.chain(
      ascent,
      on_trainable(_adaptive_update(variant, b1, b2, eps), trainable),
      _scale_by_learning_rate(learning_rate),
  )
  return engine.attach_spec(tx, engine.spec_of(ascent))  # for the planner
