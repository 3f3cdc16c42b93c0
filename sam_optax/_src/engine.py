"""The one engine behind every method.

Every sharpness-aware method in this library is the same step::

    where     = region.select(step)              # where the perturbation applies
    go        = gate.decide(step)                # is the second gradient computed?
    if go:                                       # static, or one ``lax.cond``
        e     = where.restrict(geometry.perturb(step, where))
        h     = grad loss_fn(w + e)              # the second gradient
        out   = combine.computed(step, h)        # e.g. h, or (1-a) g + a h
        gate.observe(step, h); region.observe(step, h)
    else:
        out   = combine.skipped(step)            # reuse what was stored, or g
    gate.after(step)                             # per-step bookkeeping

The four parts are small frozen objects holding static configuration; what
they remember lives in their slot of :class:`SharpnessAwareState`, as arrays.
A paper's method is a choice of four parts (``alias.py``); a combination no
paper has is built the same way with :func:`sharpness_aware`.

Every decision (the radius not positive and finite, the gate, a region's refresh or
selection) is taken in one of three ways, in this order:

1. statically, when it is known at construction (``rho=0``, a gate whose
   ``schedule`` is ``"always"`` or ``"never"``): no conditional is traced;
2. from a *plan* (:class:`Plan`, made on the host by :mod:`planner`) passed
   as ``update(..., plan=plan)``: the compiled program holds only that
   step's work, with no conditional;
3. on the device, by a ``lax.cond`` (the default, ``plan=None``); in an
   eager call (no ``jit``) the value is known and the branch runs in Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import canonical_conv
from sam_optax._src import fisher
from sam_optax._src import flax_interop
from sam_optax._src import gate as gate_lib
from sam_optax._src.protocols import ById
from sam_optax._src.protocols import Combine
from sam_optax._src.protocols import Gate
from sam_optax._src.protocols import Geometry
from sam_optax._src.protocols import Plan
from sam_optax._src.protocols import PlanKey
from sam_optax._src.protocols import Region
from sam_optax._src.protocols import Step
from sam_optax._src.protocols import Trainable
from sam_optax._src.protocols import Where
from sam_optax._src.protocols import check_gate
from sam_optax._src.protocols import check_plan
from sam_optax._src.protocols import plan_key

PyTree = Any


class SharpnessAwareState(NamedTuple):
  """State of every transform built by :func:`sharpness_aware`.

  Attributes:
    count: number of ``update`` calls with a finite clean and second
      gradient (int32): the step number every schedule reads. A step with a
      NaN or inf leaves the whole state as it was, ``count`` included.
      It saturates at ``2**31 - 1`` (``optax.safe_increment``), as does
      every counter of the parts: none wraps to a negative value.
    grad_evals: gradient evaluations of ``loss_fn`` made inside the transform
      (int32, saturating at ``2**31 - 1``). A second gradient counts 1
      (2 with ``num_splits > 1``: the sub-batches' clean and second
      gradients); per-example gradients count 1 per example (see the
      method's docstring). The clean gradient the caller
      computed is not counted: SGD's cost is one gradient per step.
    geometry: state of the perturbation geometry (e.g. adaptive accumulators).
    region: state of the region (e.g. a sparse mask, a layer selection).
    gate: state of the gate (e.g. a sampling schedule and its statistics).
    combine: state of the combination (e.g. a stored gradient for reuse).
  """

  count: jax.Array
  grad_evals: jax.Array
  geometry: PyTree
  region: PyTree
  gate: PyTree
  combine: PyTree

  def stats(self) -> dict[str, jax.Array]:
    out = {"count": self.count, "grad_evals": self.grad_evals}
    for part in (self.geometry, self.region, self.gate, self.combine):
      if hasattr(part, "stats"):
        out.update(part.stats())
    return out




#: A radius schedule's value counts as 0 below this fraction of the
#: schedule's scale (:func:`rho_floor`): float32 schedules round with errors
#: of a few 2**-24 of their scale, and XLA evaluates them differently under
#: ``jit`` (``c / T`` becomes ``c * (1 / T)``, multiply-adds fuse) than
#: eagerly, so a schedule that ends at 0 gives 0.0 on the host and 1.1e-9
#: on the device (``optax.linear_schedule(0.05, 0.0, 100)`` at step 100).
RHO_FLOOR = 2.0**-16

#: The counts whose values set a schedule's scale (each capped at the step).
_SCALE_COUNTS = np.array([0] + [2**j for j in range(31)] + [2**31 - 1],
                         np.int32)


def rho_floor(rho: Any, count: Any) -> Any:
  """The radius a schedule must exceed at step ``count`` to perturb.

  ``RHO_FLOOR`` (2**-16) times the schedule's scale: the largest finite
  ``|rho(c)|`` over ``c = min(n, count)`` for ``n`` in 0, 1, 2, 4, ...,
  2**30 and ``count`` itself (so a value that is the largest seen always
  counts). 0 for a radius that is not a schedule (a number, an injected
  value). The same function on the host (the planner) and on the device.
  """
  if not callable(rho):
    return 0.0
  counts = jnp.minimum(jnp.asarray(_SCALE_COUNTS), count)
  values = jax.vmap(lambda c: base.resolve(rho, c, "rho"))(counts)
  scale = jnp.max(jnp.where(jnp.isfinite(values), jnp.abs(values), 0.0))
  return RHO_FLOOR * scale


def rho_active(rho: Any, floor: Any = 0.0) -> Any:
  """Whether a step perturbs at radius ``rho``: only where ``rho > floor``
  (0, or for a schedule :func:`rho_floor`) and finite. A radius that is 0,
  negative, NaN or inf (a schedule, or an injected value), or a schedule's
  value within rounding of 0, makes the step a skipped one: no second
  gradient, the output is the clean gradient. The one rule of the device (a
  traced ``rho``), the planner (the host's float32 value) and a static
  ``rho``."""
  if isinstance(rho, (float, int)) and isinstance(floor, (float, int)):
    return bool(rho > floor and np.isfinite(rho))
  return jnp.logical_and(rho > floor, jnp.isfinite(rho))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the planner needs to know about a transform (static only)."""

  rho: Any
  static_rho: Optional[float]
  region: Region
  gate: Gate
  trainable: Hashable = None  # trainable_key(trainable=)

  @property
  def key(self) -> PlanKey:
    """The key every plan made for this transform carries."""
    return plan_key(self.rho, self.region, self.gate, self.trainable)


_SPEC_ATTR = "_sam_optax_spec"


def attach_spec(tx: optax.GradientTransformation, spec: Spec):
  """``tx`` with an update function that carries ``spec`` (for the planner)."""
  inner = tx.update

  def update_fn(*args, **kwargs):
    return inner(*args, **kwargs)

  setattr(update_fn, _SPEC_ATTR, spec)
  return tx._replace(update=update_fn)


def spec_of(tx: Any) -> Optional[Spec]:
  return getattr(getattr(tx, "update", None), _SPEC_ATTR, None)


# --------------------------------------------------------------------------
# The engine.
# --------------------------------------------------------------------------

_MISSING = object()

#: The four parts, in the order of their slots in SharpnessAwareState.
_PARTS = ("geometry", "region", "gate", "combine")


def _valid_on(part, params) -> bool:
  """Whether ``part.init(params)`` accepts ``params``."""
  try:
    part.init(params)
  except ValueError:
    return False
  return True


def _require_call_arguments(params, batch) -> None:
  if params is None:
    raise ValueError(
        "sam_optax transforms need `params`: call "
        "tx.update(grads, opt_state, params, batch=batch)"
    )
  if batch is _MISSING:
    raise ValueError(
        "sam_optax transforms need the keyword argument `batch` (the batch "
        "loss_fn(params, batch) takes): call "
        "tx.update(grads, opt_state, params, batch=batch). Flax's "
        "TrainState.apply_gradients(grads=..., batch=...) does not pass "
        "batch on (its extra keywords go to .replace): call state.tx.update "
        "yourself, then state.replace(step=state.step + 1, params=..., "
        "opt_state=...); see the docs' recipes page, 'Flax linen TrainState'"
    )
  flax_interop.check_batch(batch)


def _state_mismatch_message(detail: str) -> str:
  return (
      f"opt_state does not fit this transform: {detail}. A state fits only "
      "the transform (method and settings: num_layers, window, variant, "
      "layers, ...) that made it: restore a checkpoint into the transform "
      "that saved it, or start from tx.init(params)"
  )


def _reject_masked(params) -> None:
  """``optax.masked`` / ``multi_transform`` hand their inner transform the
  params with ``MaskedNode`` in place of the masked leaves: refused at
  ``init`` (where a count such as ``num_layers`` would otherwise be checked
  against the unmasked leaves alone) and so at ``update``
  (:meth:`_Engine.check_state` runs ``init``'s checks)."""
  if any(
      isinstance(x, optax.MaskedNode)
      for x in jax.tree.leaves(
          params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
      )
  ):
    raise ValueError(
        "sam_optax transforms cannot run inside optax.masked or "
        "optax.multi_transform: loss_fn would receive MaskedNode leaves "
        "instead of the frozen parameters. To apply the method to some "
        "parameters only, pass trainable= to it (a predicate on the "
        "'/'-joined leaf path, e.g. trainable=lambda p: "
        "p.startswith('head/'), or a pytree of bools like params) and put it "
        "outside the mask: chain it before optax.masked / multi_transform, "
        "which then freeze or split the base optimizer; see the docs' "
        "recipes page, 'Frozen parameters (trainable=)'"
    )


def _describe(out: Any) -> str:
  """What ``loss_fn`` returned, in the user's terms ("a tuple of 3", "a
  scalar array", "an array of shape (4,)"), never a tracer's type."""
  if isinstance(out, (tuple, list)):
    return f"a {type(out).__name__} of {len(out)}"
  if out is None:
    return "None"
  if isinstance(out, dict):
    return f"a dict with keys {sorted(map(str, out))}"
  if isinstance(out, (bool, int, float, complex)):
    return f"a Python {type(out).__name__}"
  shape = getattr(out, "shape", None)
  if shape is not None:
    return "a scalar array" if shape == () else f"an array of shape {shape}"
  return f"a {type(out).__name__}"


def _scalar_loss(loss_fn: Callable, has_aux: bool) -> Callable:
  """``loss(params, batch) -> scalar``, with a clear error for a bad aux."""

  def loss(params, batch):
    out = loss_fn(params, batch)
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(
            "has_aux=True: loss_fn must return a pair (loss, aux), got "
            f"{_describe(out)}; use has_aux=False for a scalar loss"
        )
      out = out[0]
    elif isinstance(out, (tuple, list)):
      raise ValueError(
          f"loss_fn returned {_describe(out)}: pass has_aux=True when it "
          "returns (loss, aux)"
      )
    if jnp.shape(out) != ():
      raise ValueError(
          f"loss_fn must return a scalar loss, got {_describe(out)}"
      )
    return out

  return loss


@dataclasses.dataclass(frozen=True)
class _Engine:
  """One configured transform: its parts and settings (static only).

  ``update`` is the step of the module docstring, in named pieces.
  """

  loss: Optional[Callable[[PyTree, Any], jax.Array]]  # None: at update
  has_aux: bool
  rho: Any
  static_rho: Optional[float]  # None: a schedule or an injected value
  geometry: Geometry
  region: Region
  gate: Gate
  combine: Combine
  axis_name: Optional[base.AxisName]
  eps: float
  trainable: Any = None
  num_splits: int = 1
  batch_axes: Any = 0

  def init(self, params: PyTree) -> SharpnessAwareState:
    _reject_masked(params)
    base.check_params(params)
    split = self.split(params)
    inner = self if split is None else self.restricted(split, params)
    sub = params if split is None else split.restrict(params)
    states = []
    for name in _PARTS:
      try:
        states.append(getattr(inner, name).init(sub))
      except ValueError as err:
        if split is None or not _valid_on(getattr(self, name), params):
          raise
        frozen = base.leaf_paths(split.frozen(params))
        raise ValueError(
            f"{err}. With trainable=, the method runs on the trainable "
            f"leaves only (frozen: {frozen}), and this {name} setting is "
            "valid only with frozen leaves included: name or count "
            "trainable leaves only (layers=, num_layers=, stat_leaves=, "
            "...), or make those leaves trainable in trainable="
        ) from err
    return SharpnessAwareState(
        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), *states
    )

  def split(self, params: PyTree) -> Optional[Trainable]:
    """The trainable sub-tree of ``params`` (None: every leaf trains)."""
    return trainable_split(self.trainable, params)

  def restricted(self, split: Trainable, params: PyTree) -> "_Engine":
    """This engine on the trainable sub-tree alone: its loss takes the
    sub-tree (the frozen leaves of ``params`` merged back in as the very
    same arrays) and each part is restricted to it."""
    return dataclasses.replace(
        self,
        loss=split.loss(self.loss, params),
        trainable=None,
        **{name: getattr(self, name).for_trainable(split) for name in _PARTS},
    )

  def update(
      self, updates, state, params=None, *, batch=_MISSING, plan=None,
      loss_fn=None, **extra
  ):
    del extra  # other extra arguments are for other transforms in the chain
    _require_call_arguments(params, batch)
    base.check_mapped_axes(self.axis_name, params, batch)
    self.check_state(state, params)
    base.check_updates(updates, params)
    engine = self.with_loss(loss_fn)
    plan = check_plan(
        plan,
        plan_key(self.rho, self.region, self.gate,
                 trainable_key(self.trainable)),
        self.region, self.gate,
    )
    split = self.split(params)
    if split is None:
      return engine.run(updates, state, params, batch, plan)
    # The method runs on the trainable sub-tree alone; frozen leaves get a
    # zero output, so a base optimizer chained after it does not move them.
    out, new_state = engine.restricted(split, params).run(
        split.restrict(updates), state, split.restrict(params), batch, plan
    )
    frozen = jax.tree.map(jnp.zeros_like, split.frozen(updates))
    return split.merge(out, frozen), new_state

  def check_state(self, state, params) -> None:
    """Refuses params that ``init`` refuses and a state that ``init``
    would not make. ``jax.eval_shape(self.init, params)`` runs ``init``'s
    checks on the params of this call (``optax.masked``'s ``MaskedNode``,
    leaves that are not float arrays: their dtypes can differ from those
    ``init`` saw) and gives the state's expected structure, shapes and
    dtypes: a checkpoint saved from a transform with other settings
    (another ``num_layers``, ``window``, variant or method) would otherwise
    fail later with an unrelated error, or run with the saved settings'
    arrays and report them. Traced once per params signature (JAX caches
    it)."""
    want = jax.eval_shape(self.init, params)
    if jax.tree.structure(state) != jax.tree.structure(want):
      raise ValueError(_state_mismatch_message(
          f"its structure is {jax.tree.structure(state)}, this transform's "
          f"init makes {jax.tree.structure(want)} (a checkpoint restored "
          "without a template comes back as plain dicts and lists: restore "
          "it with tx.init(params) as the template)"))
    for (path, got), ref in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                jax.tree.leaves(want)):
      shape, dtype = np.shape(got), jnp.result_type(got)
      if shape != ref.shape or dtype != ref.dtype:
        raise ValueError(_state_mismatch_message(
            f"at {jax.tree_util.keystr(path)} it holds {dtype}{list(shape)}, "
            f"this transform's init makes {ref.dtype}{list(ref.shape)}"))

  def with_loss(self, loss_fn: Optional[Callable]) -> "_Engine":
    """This engine with the loss of this call: ``update``'s ``loss_fn``
    where given (it wins over the construction-time one), else the one
    given at construction."""
    if loss_fn is None:
      if self.loss is None:
        raise ValueError(
            "this sam_optax transform was built without a loss_fn and "
            "update got none: pass it at construction, e.g. "
            "sam_optax.sam(loss_fn, rho=0.05), or at update, "
            "tx.update(grads, opt_state, params, batch=batch, "
            "loss_fn=loss_fn), with loss_fn(params, batch) -> scalar"
        )
      return self
    if not callable(loss_fn):
      raise ValueError(
          "update's loss_fn must be callable, loss_fn(params, batch) -> "
          f"scalar (or (scalar, aux) with has_aux=True), got {loss_fn!r}"
      )
    return dataclasses.replace(self, loss=_scalar_loss(loss_fn, self.has_aux))

  def run(self, updates, state, params, batch, plan):
    """One step on every leaf of ``params`` (the trainable sub-tree)."""
    step = self.make_step(updates, state, params, batch)
    # rho = 0: nothing is ever evaluated, unless the geometry keeps a
    # running statistic of the clean gradient (then the skipped path below
    # advances it).
    if (self.static_rho == 0.0
        and type(self.geometry).advance is Geometry.advance):
      out = base.tree_cast_like(step.grads, updates)
      count = jnp.where(
          base.tree_all_finite(step.grads),
          optax.safe_increment(state.count),
          state.count,
      )
      return out, state._replace(count=count)
    positive = self.rho_positive(step, plan)
    where, region_state, region_evals = self.run_region(step, state, plan)
    go, gate_state = self.run_gate(step, state, plan, positive)
    go = base.concrete_bool(go)  # eager: a Python branch, nothing traced
    # A region that observes the second gradient carries its state through
    # the branches; any other keeps it out of them (a mask is not copied
    # through a lax.cond).
    observes = type(self.region).observe is not Region.observe
    computed, skipped = self.branches(
        step, state, where, (region_state if observes else None, gate_state),
        go,
    )
    ending = base.cond(go, computed, skipped, None)
    out, geometry_state, combine_state, chosen, evals, maxabs = ending
    region_state = chosen[0] if observes else region_state
    gate_state = chosen[1]
    planned_after = None if plan is None else plan.gate_after
    gate_state = self.gate.after(step, gate_state, planned_after)
    out = self.finish_output(step, where, positive, out)
    # A non-finite clean or second gradient: the state is as if the step
    # never happened (count and every part; the work done is still counted
    # in grad_evals), and the output is non-finite for apply_if_finite and
    # loss scalers (where a masked perturbation may not carry the bad
    # value, its first leaf is all NaN: base.tie_first).
    ok, top = _step_check(maxabs, step.grads)
    kept = base.tree_select(
        ok,
        (optax.safe_increment(state.count), geometry_state, region_state,
         gate_state, combine_state),
        (state.count, state.geometry, state.region, state.gate, state.combine),
    )
    new_state = SharpnessAwareState(
        kept[0], base.saturating_add(state.grad_evals, evals + region_evals),
        *kept[1:]
    )
    return base.tie_first(base.tree_cast_like(out, updates), top,
                          poison=where.mask is not None
                          and not where.clean_outside), new_state

  def make_step(self, updates, state, params, batch) -> Step:
    return Step(
        updates=updates,
        grads=base.pmean(updates, self.axis_name),
        params=params,
        batch=batch,
        count=state.count,
        rho=base.resolve(self.rho, state.count, "rho"),
        axis_name=self.axis_name,
        eps=self.eps,
        loss=self.loss,
    )

  def rho_positive(self, step: Step, plan: Optional[Plan]):
    """True / False when known before tracing, else a traced boolean."""
    if self.static_rho is not None:
      return rho_active(self.static_rho)
    if plan is not None and plan.rho_skip is not None:
      return not plan.rho_skip
    return rho_active(step.rho, rho_floor(self.rho, step.count))

  def run_region(self, step, state, plan):
    """The region's choice: (where, its new state, evals)."""
    if plan is not None and plan.region is not None:
      mask, new, evals = self.region.select_planned(
          step, state.region, plan.region
      )
    else:
      mask, new, evals = self.region.select(step, state.region)
    where = Where(
        mask, self.region.normalize_over_region, self.region.clean_outside
    )
    return where, new, evals

  def run_gate(self, step, state, plan, positive):
    """(go: a Python bool or a traced boolean, the gate's new state)."""
    gate = self.gate
    if plan is not None and plan.second is not None:
      go, new = plan.second, gate.advance(step, state.gate, plan.second)
    elif gate.schedule == "always":
      go, new = True, state.gate
    elif gate.schedule == "never":
      go, new = False, state.gate
    else:
      go, new = gate.decide(step, state.gate)
    if positive is False or go is False:
      return False, new
    if positive is True:
      return go, new
    return (positive if go is True else jnp.logical_and(go, positive)), new

  def branches(self, step, state, where, chosen, go):
    """The two ways a step ends: (out, geometry, combine, (region, gate),
    evals, the second gradient's per-leaf ``max |.|`` (``base.leaf_max_abs``;
    zeros when it is skipped), each output leaf tied to its leaf's).
    ``chosen``: the region's (None: it does not observe) and the gate's
    states after their decisions."""
    nested = not isinstance(go, bool)  # the branch runs inside a lax.cond

    # A region that is empty by construction this step (a static mask of no
    # leaf: Sparse SAM keeping 0 entries of a model too small for one) has
    # w + e = w, and the gradient there is the clean one: nothing to
    # evaluate, and nothing counted in grad_evals.
    empty = where.static and not any(jax.tree.leaves(where.mask))

    def computed(_):
      if empty or self.num_splits == 1:
        e, geometry_state = self.geometry.perturb(step, state.geometry, where)
        second = (step.grads if empty else
                  self.second_gradient(step, where.restrict(e), where, nested))
      else:
        second, geometry_state = self.split_second_gradient(
            step, state.geometry, where, nested
        )
      out, combine_state = self.combine.computed(step, second, state.combine)
      # In the incoming gradient's dtype, as the skipped branch's (a
      # lax.cond needs both alike; the output is that dtype in the end).
      out = base.tree_cast_like(out, step.grads)
      observed = (self.region.observe(step, second, chosen[0]),
                  self.gate.observe(step, second, chosen[1]))
      # m-sharpness: num_splits clean and num_splits second sub-batch
      # gradients, each on 1/num_splits of the batch: 2 batch gradients.
      one = jnp.asarray(0 if empty else 1 if self.num_splits == 1 else 2,
                        jnp.int32)
      maxabs = base.leaf_max_abs(second)
      out = base.tie_leaves(out, second, maxabs)
      return out, geometry_state, combine_state, observed, one, maxabs

    def skipped(_):
      out, combine_state = self.combine.skipped(step, state.combine)
      geometry_state = self.geometry.advance(step, state.geometry, where)
      zero = jnp.zeros((), jnp.int32)
      maxabs = jnp.zeros((base.num_checked(step.grads),), jnp.float32)
      return out, geometry_state, combine_state, chosen, zero, maxabs

    return computed, skipped

  def split_second_gradient(self, step, geometry_state, where, nested):
    """m-sharpness on one device: the mean over ``num_splits`` contiguous
    sub-batches ``B_i`` of ``grad L_{B_i}(w + e_i)``, each ``e_i`` built by
    the geometry from that sub-batch's own clean gradient ``g_i`` (averaged
    over devices once, at the end), and the geometry's new state (from the
    last sub-batch: a geometry updates its state from ``step.grads``, the
    whole batch's gradient, which every sub-batch step carries).

    One sub-batch at a time (``lax.scan``): the memory of one SAM step on a
    sub-batch, not ``num_splits`` copies of the parameters, gradients and
    activations that a ``vmap`` over the splits would hold (and a ``vmap``
    with per-split weights turns every matmul and convolution into a
    batched one with different weights per split, which XLA runs as
    grouped convolutions).
    """
    # The scan body is not XLA's entry computation, so XLA:CPU would not
    # canonicalize its convolutions (about 20x slower on the benchmark CNN,
    # as inside a lax.cond): canonical_conv.grad does it up front.
    del nested
    grad = canonical_conv.grad
    parts, rebuild = fisher.split_batch(
        step.batch, self.batch_axes, self.num_splits
    )

    # This device's own sub-batch gradients (see base.per_device).
    own = base.per_device(step.params, self.axis_name)

    def one(carry, sliced):
      total, _ = carry
      batch = rebuild(sliced)
      g = grad(lambda p: step.loss(p, batch))(own)
      sub = dataclasses.replace(step, updates=g, batch=batch)
      e, new = self.geometry.perturb(sub, geometry_state, where)
      h = self.second_gradient(sub, where.restrict(e), where, True,
                               reduce=False)
      total = jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, h)
      return (total, new), None

    # The sum starts typed like the per-device gradients it adds.
    init = (base.zeros_like_f32(own), geometry_state)
    with fisher.slicing_hint(f"num_splits={self.num_splits} sub-batches"):
      (total, new), _ = jax.lax.scan(one, init, parts)
    mean = jax.tree.map(
        lambda t, g: (t / self.num_splits).astype(g.dtype), total, step.grads
    )
    return base.pmean(mean, self.axis_name), new

  def second_gradient(
      self, step: Step, e: PyTree, where: Where, nested: bool,
      reduce: bool = True,
  ):
    """grad loss(w + e), averaged over devices (unless ``reduce`` is
    False), shaped like params.

    Only the leaves ``where.differentiated()`` names are differentiated;
    the others are passed through as the very same arrays and their entry
    in the result is the clean gradient.
    """
    axis_name = self.axis_name if reduce else None
    # Inside a lax.cond XLA:CPU skips its convolution canonicalization;
    # canonical_conv.grad does it up front.
    grad = canonical_conv.grad if nested else jax.grad
    needed = where.differentiated()
    # Each device's own gradient, averaged below (see base.per_device).
    params = base.per_device(step.params, self.axis_name)
    if needed is None:
      perturbed = jax.tree.map(
          lambda w, d: w + d.astype(w.dtype), params, e
      )
      h = grad(lambda p: step.loss(p, step.batch))(perturbed)
      return base.pmean(h, axis_name)
    leaves, treedef = jax.tree.flatten(params)
    chosen = [i for i, m in enumerate(treedef.flatten_up_to(needed)) if m]
    e_leaves = treedef.flatten_up_to(e)

    def partial_loss(selected):
      full = list(leaves)
      for j, i in enumerate(chosen):
        full[i] = selected[j] + e_leaves[i].astype(selected[j].dtype)
      return step.loss(jax.tree.unflatten(treedef, full), step.batch)

    h = grad(partial_loss)([leaves[i] for i in chosen])
    h = base.pmean(h, axis_name)
    out = list(treedef.flatten_up_to(step.grads))
    for j, i in enumerate(chosen):
      out[i] = h[j]
    return jax.tree.unflatten(treedef, out)

  def finish_output(self, step, where, positive, out):
    """Clean gradient outside the region (if asked), and everywhere on a
    step whose radius is off (see :func:`rho_active`)."""
    out = where.finish(out, step.grads)
    if positive is False:
      return step.grads
    if positive is True:
      return out
    return jax.tree.map(
        lambda o, g: jnp.where(positive, o, g.astype(o.dtype)), out, step.grads
    )


def _step_check(maxabs, grads):
  """``(ok, top)`` of a step (:func:`base.step_finite`) from the second
  gradient's per-leaf ``max |.|`` (``maxabs``) and the clean ``grads``
  (whose per-leaf maxima are their norm's). One check over both, taken so
  that a memory scheduler can apply each leaf's update as soon as its
  second gradient exists (the first output leaf is tied to ``top``, every
  other to its own leaf's check). The clean maxima are reduced to their
  largest first: concatenated with the second gradient's (XLA merges the
  two into one concatenation), each stayed a buffer of its own (64 bytes
  on XLA:CPU) through the whole second gradient, 13 KB more than
  ``optax.contrib.sam``'s peak on a 200-leaf transformer."""
  _, clean_top = base.step_finite(base.leaf_max_abs(grads))
  return base.step_finite(jnp.concatenate([maxabs, clean_top[None]]))


def sharpness_aware(
    loss_fn: Optional[Callable[..., Any]] = None,
    rho: base.ScalarOrSchedule = 0.05,
    *,
    geometry: Geometry,
    region: Optional[Region] = None,
    gate: Optional[Gate] = None,
    combine: Optional[Combine] = None,
    has_aux: bool = False,
    axis_name: Optional[base.AxisName] = None,
    eps: float = base.DEFAULT_EPS,
    trainable: Any = None,
    num_splits: Optional[int] = None,
    batch_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """The engine: a sharpness-aware gradient transformation from four parts.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning a scalar, or ``(scalar,
      aux)`` when ``has_aux`` is True (the aux of perturbed evaluations is
      discarded). Or None: then every ``update`` call passes it,
      ``update(..., batch=batch, loss_fn=loss_fn)`` (a closure defined
      inside the user's ``train_step`` works). A ``loss_fn`` given to
      ``update`` wins over the construction-time one.
    rho: perturbation radius, a float >= 0 or a schedule of the step count.
      ``rho=0`` gives the clean gradient and evaluates nothing. A step
      perturbs only where the radius is > 0 and finite: a schedule (or an
      injected value) that is 0, negative, NaN or inf at a step makes that
      step a skipped one (no second gradient; the output is the clean
      gradient exactly, and the count advances), with or without a plan.
      A schedule's value counts as 0 up to ``2**-16`` of its scale (the
      largest ``|rho|`` at step 0, the powers of two up to the step and the
      step itself): a schedule that ends at 0 skips from there on although
      the device computes it as, e.g., 1.1e-9 (see the docs' planned steps
      page, "The radius").
    geometry: how the perturbation is built (``parts.global_norm()``, ...).
    region: where it applies (default: everywhere).
    gate: when the second gradient is computed (default: every step).
    combine: how the output is formed (default: the second gradient, SAM).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: the ``pmap`` / ``shard_map`` axis to average over (a tuple
      for a batch split over several), or None; see :func:`sam`.
    eps: guard added to every norm that divides.
    trainable: the parameters the method applies to (frozen ones: a
      backbone, embeddings): None (all), a predicate on the '/'-joined leaf
      path (``lambda p: p.startswith("head/")``), leaf path prefixes (a
      str or a sequence of them, ``"head"`` or ``("head", "neck/dense")``,
      matched at '/' boundaries as vSAM's ``stat_leaves``; not callable, so
      ``optax.inject_hyperparams`` needs no ``static_args`` for them), a
      pytree of Python bools with the structure of params (a dict, an ``eqx.Module`` of
      bools, which is a mask even though it is callable, an ``nnx.State``),
      or a Flax NNX filter (``nnx.PathContains("head")``,
      ``nnx.All(nnx.Param, ...)``, called on each variable with its path,
      as NNX does). Every part runs on the
      trainable leaves alone (:class:`parts.Trainable`), so the method on
      them equals the same method run on those leaves alone, with the
      frozen ones closed over in ``loss_fn``: frozen leaves are never
      perturbed or differentiated (nothing below the lowest trainable
      layer is backpropagated), and no norm, mask (its size ``K``, its
      ``mask_density``), layer ranking or statistic includes them. The
      parts' states hold the trainable leaves only (None in place of a
      frozen one), and a layer selection's ``selected_layers`` indexes the
      trainable layers (:func:`layer_paths` of the params with frozen
      leaves set to None). Settings that name or count leaves (``layers=``,
      ``num_layers=``, ``stat_leaves=``) refer to trainable ones: naming a
      frozen one fails at ``init``. A fixed mask is given with the
      structure of the full params; its frozen leaves are ignored. The
      output on frozen leaves is zero, so a plain base optimizer chained
      after it does not train them (a chained weight decay, or a
      momentum carried from before, still moves them: see the docs'
      recipes, "Frozen parameters"). Use this instead of wrapping the
      transform in ``optax.masked``. To perturb some leaves only and
      train all of them, use a region (``layerwise_sam(layers=...)``,
      ``ssam(mask=...)``), not ``trainable``.
    num_splits: m-sharpness on one device (Foret et al.'s ``m``): on a
      computed step, the batch is cut into ``num_splits`` contiguous
      sub-batches ``B_i`` of ``m = size / num_splits`` examples; each is
      perturbed with its own clean gradient ``g_i = ∇L_{B_i}(w)`` (the
      geometry's ``e_i``) and the second gradient is the mean of
      ``∇L_{B_i}(w + e_i)``, which the combination then uses as usual
      (with the whole batch's ``g``). The same result as ``shard_map``
      over ``num_splits`` devices, each given its sub-batch and its own
      gradient as ``updates``, with ``axis_name`` set. The sub-batches run
      one after the other (``lax.scan``: the memory of one sub-batch step).
      Cost: the clean sub-batch gradients are computed here (the
      caller's whole-batch ``g`` cannot give them), so a computed step
      makes 2 batch gradients' work (``grad_evals`` counts 2) where SAM
      makes 1. Default None: 1, one perturbation for the whole batch. The
      batch size (per device) must be a multiple of it; a leaf that is not
      per example is marked None in ``batch_axes``. Under
      ``optax.inject_hyperparams`` a given ``num_splits`` goes in
      ``static_args``.
    batch_axes: with ``num_splits``: None (default) or 0 when every batch
      leaf is split on its leading axis; otherwise a prefix pytree of the
      batch with 0 (split) or None (passed whole: model state, a PRNG key)
      per leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    clean gradient as ``updates`` and requires ``params`` and ``batch=``;
    it also reads ``loss_fn=`` (the loss at update time: needed when none
    was given here, and it wins over this one) and ``plan=`` (optional, from
    :func:`sam_optax.planner`); other keywords pass through unread.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> from sam_optax import parts
    >>> loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    >>> tx = sam_optax.sharpness_aware(
    ...     loss_fn, 0.05, geometry=parts.global_norm(),
    ...     gate=parts.every_k(2), combine=parts.mix(0.5))
    >>> w, b = jnp.ones(3), jnp.arange(3.0)
    >>> state = tx.init(w)
    >>> for _ in range(4):
    ...   u, state = tx.update(jax.grad(loss_fn)(w, b), state, w, batch=b)
    >>> int(state.grad_evals)
    2
  """
  check_loss_fn(loss_fn)
  base.check_scalar_or_schedule("rho", rho, 0.0)
  base.check_range("eps", eps, 0.0, low_open=True)
  axis_name = base.check_axis_name(axis_name)
  region = Region() if region is None else region
  gate = _every_step() if gate is None else gate
  combine = Combine() if combine is None else combine
  for name, part, kind in [
      ("geometry", geometry, Geometry), ("region", region, Region),
      ("combine", combine, Combine),
  ]:
    if not isinstance(part, kind):
      raise ValueError(f"{name} must be a sam_optax {kind.__name__}, got {part!r}")
  check_gate(gate)
  if not isinstance(has_aux, (bool, np.bool_)):
    # bool("False") is True: a string or a number here is a slip.
    raise ValueError(f"has_aux must be True or False, got {has_aux!r}")
  # None defaults, so that optax.inject_hyperparams (which injects every
  # numeric argument) leaves them static without static_args.
  num_splits = 1 if num_splits is None else base.static_int(
      "num_splits", num_splits, 1)
  batch_axes = 0 if batch_axes is None else batch_axes
  fisher.check_batch_axes(batch_axes)
  static_rho = None if callable(rho) else base._concrete_float(rho)  # pylint: disable=protected-access
  engine = _Engine(
      loss=None if loss_fn is None else _scalar_loss(loss_fn, has_aux),
      has_aux=bool(has_aux), rho=rho, static_rho=static_rho,
      geometry=geometry, region=region, gate=gate, combine=combine,
      axis_name=axis_name, eps=eps, trainable=check_trainable(trainable),
      num_splits=num_splits, batch_axes=batch_axes,
  )
  tx = optax.GradientTransformationExtraArgs(engine.init, engine.update)
  return attach_spec(
      tx, Spec(rho, static_rho, region, gate, trainable_key(engine.trainable))
  )


def check_loss_fn(loss_fn: Any) -> None:
  """Construction-time check of ``loss_fn``: a callable, or None (then
  every ``update`` call passes ``loss_fn=``)."""
  if loss_fn is not None and not callable(loss_fn):
    hint = ""
    if isinstance(loss_fn, (int, float)) or hasattr(loss_fn, "dtype"):
      hint = (
          " (a number as the first argument is taken for loss_fn: pass the "
          "radius by keyword, e.g. sam_optax.sam(rho=0.05))"
      )
    raise ValueError(
        "loss_fn must be callable, loss_fn(params, batch), or None (then "
        f"pass loss_fn= to every update call), got {loss_fn!r}{hint}"
    )


def _is_mask(trainable: Any) -> bool:
  """A non-empty pytree of Python bools: a mask, even when it is callable
  (an ``eqx.Module`` of bools, built the Equinox way with
  ``jax.tree.map(lambda _: False, model)``), never a predicate."""
  leaves = jax.tree.leaves(trainable)
  return bool(leaves) and all(isinstance(x, (bool, np.bool_)) for x in leaves)


def _nnx_filter(trainable: Any) -> Optional[Callable]:
  """A Flax NNX filter (``nnx.PathContains("head")``, ``nnx.Param``,
  ``nnx.All(...)``, ...) as its ``(path, variable) -> bool`` predicate; None
  for anything else."""
  kind = trainable if isinstance(trainable, type) else type(trainable)
  if not getattr(kind, "__module__", "").startswith("flax.nnx"):
    return None
  from flax.nnx import filterlib  # pylint: disable=g-import-not-at-top
  return filterlib.to_predicate(trainable)


def _path_prefixes(trainable: Any) -> Optional[tuple[str, ...]]:
  """A path prefix or a sequence of them, as a tuple; None otherwise."""
  if isinstance(trainable, str):
    return (trainable,)
  if (isinstance(trainable, (tuple, list)) and trainable
      and all(isinstance(s, str) for s in trainable)):
    return tuple(trainable)
  return None


def check_trainable(trainable: Any) -> Any:
  """Construction-time check of ``trainable`` (see :func:`sharpness_aware`);
  path prefixes come back as a tuple."""
  if (prefixes := _path_prefixes(trainable)) is not None:
    return prefixes
  if trainable is None or callable(trainable) or (
      _is_mask(trainable) and not isinstance(trainable, (bool, np.bool_))):
    return trainable
  raise ValueError(
      "trainable must be None, a predicate on the '/'-joined leaf path, a "
      "Flax NNX filter, leaf path prefixes (a str or a sequence of str), or "
      "a pytree of Python bools with the structure of params (one per leaf: "
      "a dict, an eqx.Module, an nnx.State); got "
      f"{trainable!r}{base.inject_hint('trainable', trainable)}"
  )


def trainable_key(trainable: Any) -> Hashable:
  """``trainable=`` (as :func:`check_trainable` returns it) in the hashable
  form a :class:`PlanKey` holds: None, the predicate by identity, or a
  mask's structure, flags and frozen paths."""
  if trainable is None:
    return None
  if _path_prefixes(trainable) is not None:
    return ("paths", tuple(trainable))
  if not _is_mask(trainable):
    return ById(trainable)
  leaves, treedef = jax.tree.flatten(trainable)
  flags = tuple(bool(x) for x in leaves)
  frozen = tuple(p for p, t in zip(base.leaf_paths(trainable), flags) if not t)
  return ("mask", treedef, frozen, flags)


def trainable_split(trainable: Any, params: PyTree) -> Optional[Trainable]:
  """The trainable sub-tree of ``params`` (None: every leaf trains); a
  ``trainable`` that does not match ``params`` fails here."""
  mask = trainable_mask(trainable, params)
  return None if mask is None else Trainable.from_mask(mask)


def _nnx_flags(pred: Callable, params: PyTree) -> list[bool]:
  """One flag per leaf of ``params`` from an NNX filter's predicate, called
  as NNX calls it: on each variable (an ``nnx.Variable`` of an
  ``nnx.State``, else the leaf) with its path of raw keys."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  flags = []
  for path, node in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=is_var)[0]:
    keep = pred(tuple(base.raw_key(k) for k in path), node)
    flags += [bool(keep)] * len(jax.tree.leaves(node))
  return flags


def trainable_mask(trainable: Any, params: PyTree) -> Optional[PyTree]:
  """The trainable leaves as a pytree of Python bools (None: all of them)."""
  if trainable is None:
    return None
  if _is_mask(trainable):
    base.check_same_structure(trainable, params, "trainable", shapes=False)
    mask = jax.tree.map(bool, trainable)
  elif (pred := _nnx_filter(trainable)) is not None:
    flags = _nnx_flags(pred, params)
    mask = jax.tree.unflatten(jax.tree.structure(params), flags)
  elif (prefixes := _path_prefixes(trainable)) is not None:
    keys = gate_lib.leaf_keys(params)
    unknown = [s for s in prefixes
               if not any(gate_lib.select_leaves(keys, [s]))]
    if unknown:
      raise ValueError(
          f"trainable names paths that are not in params: {unknown}; "
          f"params have the leaf paths {base.leaf_paths(params)}"
      )
    flags = gate_lib.select_leaves(keys, prefixes)
    mask = jax.tree.unflatten(jax.tree.structure(params), flags)
  else:
    paths = base.leaf_paths(params)
    flags = []
    for path in paths:
      keep = trainable(path)
      if not isinstance(keep, (bool, np.bool_)):
        raise ValueError(
            "trainable, as a predicate, must return a bool for every leaf "
            f"path; got {keep!r} for {path!r}"
        )
      flags.append(bool(keep))
    mask = jax.tree.unflatten(jax.tree.structure(params), flags)
  flags = jax.tree.leaves(mask)
  if not any(flags):
    raise ValueError(
        f"trainable freezes every leaf of params {base.leaf_paths(params)}"
    )
  return None if all(flags) else mask


def _every_step() -> Gate:
  return gate_lib.EveryStep()
