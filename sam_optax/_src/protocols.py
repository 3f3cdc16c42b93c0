"""The parts' protocols and what every part reads: one module that the
engine and every part import (the engine imports the parts, never the other
way round).

* :class:`Step`: what every part may read during one ``update`` call;
* :class:`Trainable`: the trainable sub-tree (``trainable=``) that every
  part runs on;
* :class:`Where`: the region's answer;
* the four part protocols, :class:`Geometry`, :class:`Region`,
  :class:`Gate` and :class:`Combine` (see :func:`sam_optax.sharpness_aware`);
* :class:`Plan`: one step's decisions, made on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

#: The values of :attr:`Gate.schedule`.
SCHEDULES = ("always", "never", "dynamic")


@dataclasses.dataclass(frozen=True)
class Step:
  """What every part may read during one ``update`` call (built once).

  Attributes:
    updates: the incoming clean gradient, as the caller passed it (per-device
      under ``pmap`` when the caller did not average it: m-sharpness).
    grads: ``updates`` averaged over ``axis_name`` (identical on every device);
      what the output and every statistic are built from.
    params: the current parameters.
    batch: the batch ``loss_fn`` takes.
    count: the step number (int32 scalar).
    rho: the perturbation radius at this step (float32 scalar).
    axis_name: the pmap/shard_map axis, or None.
    eps: the guard added to norms that divide.
    loss: ``loss(params, batch) -> scalar`` with any aux dropped.
  """

  updates: PyTree
  grads: PyTree
  params: PyTree
  batch: Any
  count: jax.Array
  rho: jax.Array
  axis_name: Optional[Union[str, tuple[str, ...]]]
  eps: float
  loss: Optional[Callable[[PyTree, Any], jax.Array]]


# --------------------------------------------------------------------------
# The trainable sub-tree.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trainable:
  """The trainable leaves of the params (``trainable=``), as a sub-tree.

  With ``trainable=`` the engine runs every part on the *sub-tree* of the
  params, gradients and states: the tree with each frozen leaf replaced by
  None (an empty node). Every trainable leaf keeps its path, so its layer
  name, and its place in leaf order, and the loss the parts see merges the
  frozen leaves back in as the very same arrays. So the method on the
  trainable leaves is, by construction, the same method run on those leaves
  alone: no part can perturb, differentiate, count or rank a frozen leaf.

  Attributes:
    treedef: the structure of the full params.
    flags: one Python bool per leaf of the params (True: trainable), in
      ``jax.tree.leaves`` order; at least one True and one False.

  Example:
    >>> from sam_optax import parts
    >>> t = parts.Trainable.from_mask({"body": False, "head": True})
    >>> t.restrict({"body": 1.0, "head": 2.0})
    {'body': None, 'head': 2.0}
    >>> t.merge({"body": None, "head": 3.0}, {"body": 1.0, "head": 2.0})
    {'body': 1.0, 'head': 3.0}
  """

  treedef: Any
  flags: tuple[bool, ...]

  @classmethod
  def from_mask(cls, mask: PyTree) -> "Trainable":
    """From a pytree of Python bools with the structure of the params."""
    leaves, treedef = jax.tree.flatten(mask)
    return cls(treedef, tuple(bool(x) for x in leaves))

  def mask(self) -> PyTree:
    """The flags as a pytree of Python bools shaped like the params."""
    return self.treedef.unflatten(self.flags)

  def _pick(self, tree: PyTree, keep: bool) -> PyTree:
    leaves = self.treedef.flatten_up_to(tree)
    return self.treedef.unflatten(
        [x if t == keep else None for x, t in zip(leaves, self.flags)]
    )

  def restrict(self, tree: PyTree) -> PyTree:
    """The sub-tree of ``tree`` (shaped like the params): frozen leaves
    replaced by None."""
    return self._pick(tree, True)

  def frozen(self, tree: PyTree) -> PyTree:
    """The complement of :meth:`restrict`: trainable leaves replaced by
    None."""
    return self._pick(tree, False)

  def merge(self, sub: PyTree, full: PyTree) -> PyTree:
    """The full tree: ``sub``'s leaves where trainable, ``full``'s leaves
    elsewhere (``full`` may be :meth:`frozen`'s sub-tree)."""
    a = self.treedef.flatten_up_to(sub)
    b = self.treedef.flatten_up_to(full)
    return self.treedef.unflatten(
        [x if t else y for x, y, t in zip(a, b, self.flags)]
    )

  def loss(self, loss: Callable, params: PyTree) -> Callable:
    """``loss`` of the sub-tree: the frozen leaves of ``params`` merged
    back in as the very same arrays, so nothing is differentiated through
    them and nothing below the lowest trainable leaf is backpropagated."""
    return lambda sub, batch: loss(self.merge(sub, params), batch)


# --------------------------------------------------------------------------
# Masks: the region's answer, classified once.
# --------------------------------------------------------------------------


def is_static_mask(mask: Any) -> bool:
  """True when ``mask`` is a non-empty pytree of Python (or NumPy) bools."""
  leaves = jax.tree.leaves(mask)
  return bool(leaves) and all(isinstance(x, (bool, np.bool_)) for x in leaves)


def _select_leaf(m: Any, x: Any, y: Any) -> Any:
  """``x`` where the mask leaf holds, else ``y``; a bool leaf is static."""
  if isinstance(m, (bool, np.bool_)):
    return x if m else y
  return jnp.where(m, x, y)


def apply_mask(tree: PyTree, mask: Optional[PyTree]) -> PyTree:
  """Zeroes ``tree`` outside ``mask`` (None: no mask)."""
  if mask is None:
    return tree
  return jax.tree.map(
      lambda m, x: _select_leaf(m, x, jnp.zeros_like(x)), mask, tree
  )


@dataclasses.dataclass(frozen=True)
class Where:
  """Where the perturbation applies this step.

  Attributes:
    mask: None (everywhere), a pytree of Python bools (a static set of
      leaves, known at trace time) or a pytree of boolean arrays (an
      element-wise or per-leaf mask, usually kept in state).
    normalize: take perturbation norms over the mask only (layer-wise SAM)
      rather than over the whole gradient (Sparse SAM).
    clean_outside: leaves outside the mask get the clean gradient in the
      output (layer-wise SAM) rather than the gradient at the perturbed
      point (Sparse SAM).
  """

  mask: Optional[PyTree] = None
  normalize: bool = False
  clean_outside: bool = False

  @property
  def static(self) -> bool:
    """``mask`` is a pytree of Python bools, known at trace time."""
    return self.mask is not None and is_static_mask(self.mask)

  def differentiated(self) -> Optional[PyTree]:
    """The static set of leaves the second gradient needs (None: all).

    A static mask whose outside keeps the clean gradient needs only its own
    leaves; otherwise every leaf. The other leaves enter ``loss_fn`` as the
    very same arrays, so nothing below them is backpropagated.
    """
    if self.static and self.clean_outside:
      return self.mask
    return None

  def restrict(self, tree: PyTree) -> PyTree:
    """``tree`` zeroed outside the mask."""
    return apply_mask(tree, self.mask)

  def norm_domain(self, tree: PyTree) -> PyTree:
    """What a perturbation norm is taken over: the region, or every leaf."""
    return self.restrict(tree) if self.normalize else tree

  def outside(self, inside: PyTree, outside: PyTree) -> PyTree:
    """``inside`` in the mask, ``outside`` elsewhere (leaf by leaf)."""
    return _select(self.mask, inside, outside)

  def finish(self, out: PyTree, grads: PyTree) -> PyTree:
    """The output: the clean gradient outside the region, if asked."""
    return self.outside(out, grads) if self.clean_outside else out


def _select(mask: Optional[PyTree], a: PyTree, b: PyTree) -> PyTree:
  """``a`` where ``mask`` (None: everywhere), else ``b``; bool leaves static."""
  if mask is None:
    return a
  return jax.tree.map(_select_leaf, mask, a, b)


# --------------------------------------------------------------------------
# Part protocols. Each part has a static configuration and an ``init`` that
# returns its state (arrays only).
# --------------------------------------------------------------------------


class Component:
  """Base: a part with no state."""

  def init(self, params: PyTree) -> PyTree:
    del params
    return optax.EmptyState()

  def for_trainable(self, trainable: Trainable) -> "Component":
    """This part for the trainable sub-tree (see :class:`Trainable`), which
    is then all it sees: its ``init``, its steps and its state are over the
    trainable leaves only. A part holding a setting shaped like the full
    params (a user's fixed mask) restricts it here; the default is the part
    itself."""
    del trainable
    return self

  def prefetch(self, count: int) -> bool:
    """Host-side: whether ``plan(count + 1)`` reads this part's state as it
    is before step ``count`` (``read(lagged=True)``). The planner then
    starts that read, asynchronously, when it plans step ``count``, and
    the next plan takes its value without waiting for the step dispatched
    in between (the default: no such read)."""
    del count
    return False


class Geometry(Component):
  """Builds the perturbation ``e`` from the clean gradient.

  ``perturb(step, state, where)`` returns ``(e, new_state)``. Norms that
  normalise ``e`` are taken over ``where.norm_domain(...)``. The engine
  zeroes ``e`` outside the region afterwards, so a geometry cannot perturb
  outside it.
  """

  def perturb(
      self, step: Step, state: PyTree, where: Where
  ) -> tuple[PyTree, PyTree]:
    raise NotImplementedError

  def advance(self, step: Step, state: PyTree, where: Where) -> PyTree:
    """The state after a step that builds no perturbation (its radius not
    positive and finite, or a gate that said no). The default keeps it. A
    geometry whose state is a running statistic of the clean gradient
    (LightSAM's accumulators, Friendly SAM's moving average) advances it
    as on every other step, so the statistic covers every step."""
    del step, where
    return state


class Region(Component):
  """Where the perturbation applies.

  ``select(step, state)`` returns ``(mask, new_state, evals)``: the mask for
  this step (None, a pytree of Python bools, or a pytree of boolean arrays;
  see :class:`Where`), the region's new state, and the gradient evaluations
  it spent (int32).

  Planning: ``plan(count, read, memo)`` runs on the host before step
  ``count`` and returns a hashable value fixing the region's decision for
  that step (None: nothing to plan); ``select_planned(step, state, plan)``
  then takes that step with no conditional. ``read()`` returns this part's
  state before step ``count`` as NumPy arrays (a device read that waits for
  the step dispatched last: use it only when the decision depends on device
  state and no lagged read is at hand); ``read(lagged=True)`` returns its
  state before step ``count - 1``, from the read the planner started then
  (see :meth:`prefetch`), or None when it did not plan that step from that
  state (then call ``read()``); ``memo``
  is a dict the planner keeps for this part between calls.

  ``observe(step, second, state)`` runs on computed steps only, after the
  second gradient (``second``, shaped like params; the clean gradient on
  leaves that were not differentiated), and returns the region's state;
  it lets a region learn from the perturbed gradient (a selection by
  sharpness).

  Attributes:
    normalize_over_region: the perturbation norm is taken over the region only
      (layer-wise SAM) rather than over the whole gradient (Sparse SAM).
    clean_outside: leaves outside the region get the clean gradient in the
      output (layer-wise SAM) rather than the dense perturbed one (Sparse SAM).
  """

  normalize_over_region: bool = False
  clean_outside: bool = False

  def select(
      self, step: Step, state: PyTree
  ) -> tuple[Optional[PyTree], PyTree, jax.Array]:
    del step
    return None, state, jnp.zeros((), jnp.int32)

  def plan(self, count: int, read: Callable[..., PyTree],
           memo: dict) -> Hashable:
    del count, read, memo
    return None

  def select_planned(
      self, step: Step, state: PyTree, plan: Hashable
  ) -> tuple[Optional[PyTree], PyTree, jax.Array]:
    del plan
    return self.select(step, state)

  def observe(self, step: Step, second: PyTree, state: PyTree) -> PyTree:
    del step, second
    return state

  def plan_key(self) -> Hashable:
    """The static settings that decide this region's plans (hashable).

    Two regions with equal keys accept each other's plans. The default: the
    type alone for a region that plans nothing; this very object for one
    that plans (override it to let equal settings share plans)."""
    if type(self).plan is Region.plan:
      return part_key(self)
    return part_key(self, instance=ById(self))

  def check_planned(self, plan: Hashable) -> None:
    """Raises ValueError unless ``plan`` is a value ``plan`` may return
    (None always is: the region then decides as without a plan)."""
    if plan is not None and type(self).plan is Region.plan:
      raise ValueError(
          f"plan.region must be None for {type(self).__name__} (it plans "
          f"nothing), got {plan!r}"
      )


class Gate(Component):
  """Decides whether the second gradient is computed this step.

  ``schedule`` says how the engine runs the gate, and is checked when the
  transform is built:

  * ``"always"``: every step computes the second gradient; ``decide`` is
    never called (and must not be overridden).
  * ``"never"``: no step does (likewise).
  * ``"dynamic"`` (the default): ``decide(step, state) -> (go, new_state)``
    is called every step and must be implemented; ``go`` is a boolean
    scalar, and the second gradient runs under a ``lax.cond``.

  Planning (optional): ``plan(count, read, memo)`` runs on the host before
  step ``count`` and returns the decision as a Python bool (None: decide on
  the device; ``read`` and ``memo`` as for :class:`Region`); with a plan,
  ``advance(step, state, go)`` replaces ``decide`` and must return the
  state ``decide`` would have returned with that decision.
  ``observe(step, second, state)`` runs on computed steps only,
  with the averaged second gradient; ``after(step, state)`` runs on every
  step, last.
  """

  schedule: str = "dynamic"

  def decide(self, step: Step, state: PyTree) -> tuple[jax.Array, PyTree]:
    raise NotImplementedError(
        f"{type(self).__name__} has schedule='dynamic' and must implement "
        "decide(step, state) -> (go, new_state)"
    )

  def plan(
      self, count: int, read: Callable[..., PyTree], memo: dict
  ) -> Optional[bool]:
    del count, read, memo
    if self.schedule == "always":
      return True
    if self.schedule == "never":
      return False
    return None

  def advance(self, step: Step, state: PyTree, go: bool) -> PyTree:
    del go
    if self.schedule != "dynamic":
      return state
    return self.decide(step, state)[1]

  def observe(self, step: Step, second: PyTree, state: PyTree) -> PyTree:
    del step, second
    return state

  def after(
      self, step: Step, state: PyTree, planned: Hashable = None
  ) -> PyTree:
    """Per-step bookkeeping, last. ``planned``: :meth:`plan_after`'s value
    for this step, or None without a plan."""
    del step, planned
    return state

  def plan_after(self, count: int) -> Hashable:
    """Host-side: the static value :meth:`after` gets at step ``count``."""
    del count
    return None

  def plan_key(self) -> Hashable:
    """The static settings that decide this gate's plans (hashable); see
    :meth:`Region.plan_key`. The default: the type and ``schedule`` for a
    gate that does not plan itself; this very object for one that does."""
    if type(self).plan is Gate.plan and type(self).plan_after is Gate.plan_after:
      return part_key(self, schedule=self.schedule)
    return part_key(self, instance=ById(self))

  def check_planned(self, second: Any, after: Hashable) -> None:
    """Raises ValueError unless ``second`` and ``after`` are values
    ``plan`` and ``plan_after`` may return (None always is)."""
    check_flag("plan.second", second)
    allowed = {"always": True, "never": False}.get(self.schedule)
    if second is not None and (
        (allowed is not None and second is not allowed)
        or (self.schedule == "dynamic" and type(self).plan is Gate.plan)
    ):
      one = "" if allowed is None else f" or {allowed}"
      raise ValueError(
          f"plan.second must be None{one} for {type(self).__name__} "
          f"(schedule={self.schedule!r}), got {second!r}"
      )
    if after is not None and type(self).plan_after is Gate.plan_after:
      raise ValueError(
          f"plan.gate_after must be None for {type(self).__name__}, got "
          f"{after!r}"
      )


def check_gate(gate: Gate) -> None:
  """Rejects a gate whose ``schedule`` and ``decide`` contradict each other."""
  if not isinstance(gate, Gate):
    raise ValueError(f"gate must be a sam_optax Gate, got {gate!r}")
  schedule = getattr(gate, "schedule", None)
  if schedule not in SCHEDULES:
    raise ValueError(
        f"gate.schedule must be one of {SCHEDULES}, got {schedule!r} "
        f"({type(gate).__name__})"
    )
  overrides = type(gate).decide is not Gate.decide
  if schedule != "dynamic" and overrides:
    raise ValueError(
        f"{type(gate).__name__} overrides decide() but has schedule="
        f"{schedule!r}, so decide() would never be called; set "
        "schedule='dynamic' for a gate that decides"
    )
  if schedule == "dynamic" and not overrides:
    raise ValueError(
        f"{type(gate).__name__} has schedule='dynamic' but does not "
        "implement decide(step, state) -> (go, new_state)"
    )


class Combine(Component):
  """Builds the output from the clean gradient and the second gradient."""

  def computed(
      self, step: Step, second: PyTree, state: PyTree
  ) -> tuple[PyTree, PyTree]:
    del step
    return second, state

  def skipped(self, step: Step, state: PyTree) -> tuple[PyTree, PyTree]:
    return step.grads, state


# --------------------------------------------------------------------------
# Plans.
# --------------------------------------------------------------------------


class ById:
  """Wraps an object so that it hashes and compares by identity (a part
  whose settings cannot be compared by value, in a plan key). Holding the
  object keeps its id from being reused."""

  __slots__ = ("obj",)

  def __init__(self, obj: Any):
    self.obj = obj

  def __hash__(self) -> int:
    return id(self.obj)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, ById) and other.obj is self.obj

  def __repr__(self) -> str:
    return f"<this {type(self.obj).__name__} object, id {id(self.obj):#x}>"


def part_key(part: Any, **settings: Hashable) -> tuple:
  """A part's plan key: its type and the settings that decide its plans."""
  return (type(part), tuple(sorted(settings.items())))


def check_flag(name: str, value: Any) -> None:
  """A plan field that is None or a Python bool."""
  if value is not None and not isinstance(value, bool):
    raise ValueError(
        f"{name} must be None or a Python bool, got {value!r} "
        f"({type(value).__name__})"
    )


class PlanKey(NamedTuple):
  """What identifies the plans of one transform (hashable, cheap).

  Attributes:
    rho: the radius schedule (compared by identity: the same function), or
      None when rho is a number (fixed, or injected by
      ``optax.inject_hyperparams``): the planner plans the radius only from
      a schedule.
    region: the region's :meth:`Region.plan_key`.
    gate: the gate's :meth:`Gate.plan_key`.
    trainable: what ``trainable=`` freezes (None: nothing): it renumbers
      the layers and leaves the parts see, so a plan's layer indices mean
      other layers under another ``trainable``. A predicate is compared by
      identity, a mask by its structure and flags.
  """

  rho: Hashable
  region: Hashable
  gate: Hashable
  trainable: Hashable = None

  def describe(self) -> str:
    """The key in words (no memory addresses: the same in every process)."""
    def name(x):
      if isinstance(x, ById):
        return f"<this {type(x.obj).__name__} object>"
      if callable(x):
        return getattr(x, "__qualname__", type(x).__name__)
      return repr(x)

    def part(key):
      kind, settings = key
      inner = ", ".join(f"{k}={name(v)}" for k, v in settings)
      return f"{kind.__name__}({inner})"

    rho = "a number" if self.rho is None else f"the schedule {name(self.rho)}"
    out = f"rho {rho}, region {part(self.region)}, gate {part(self.gate)}"
    if self.trainable is None:
      return out + ", every leaf trainable"
    if isinstance(self.trainable, ById):
      return out + f", trainable= the predicate {name(self.trainable.obj)}"
    return out + f", trainable= a mask freezing {self.trainable[2]}"

  def __repr__(self) -> str:
    return f"PlanKey({self.describe()})"


def plan_key(
    rho: Any, region: Region, gate: Gate, trainable: Hashable = None
) -> PlanKey:
  """The ``PlanKey`` of a transform with these settings (``trainable``:
  the hashable form of ``trainable=``, see ``engine.trainable_key``)."""
  return PlanKey(
      rho=rho if callable(rho) else None,
      region=region.plan_key(),
      gate=gate.plan_key(),
      trainable=trainable,
  )


class Plan(NamedTuple):
  """The static structure of one step, made on the host (see ``planner``).

  Hashable, so it can be a static argument of ``jax.jit``. A field left None
  is decided on the device, as without a plan. Make plans with
  ``sam_optax.planner(tx)``, not by hand: ``update`` refuses a plan whose
  ``owner`` is not its own key (another transform, or other static
  settings) and any field its parts could not have planned.

  Attributes:
    rho_skip: the radius at this step is not a positive finite number (0,
      negative, NaN or inf): the step is skipped (no second gradient; the
      output is the clean gradient), as without a plan. Planned from a
      radius schedule only (None also where the schedule is within
      rounding of its floor: the device decides).
    second: the gate's decision.
    gate_after: the gate's end-of-step work (e.g. vSAM: draw the next
      window), see :meth:`Gate.plan_after`.
    region: the region's plan (e.g. refresh the mask or not; the selected
      layers).
    owner: the ``PlanKey`` of the transform the plan was made for (what
      identifies it; compared by ``update``).
  """

  rho_skip: Optional[bool] = None
  second: Optional[bool] = None
  gate_after: Hashable = None
  region: Hashable = None
  owner: Optional[PlanKey] = None


def check_plan(
    plan: Any, key: PlanKey, region: Region, gate: Gate
) -> Optional[Plan]:
  """``plan`` if it was made for a transform with ``key``, else ValueError.

  Checks its type, its owner, and every field against what the parts
  accept (a malformed or hand-made plan must not silently select nothing or
  skip a second gradient)."""
  if plan is None:
    return None
  if not isinstance(plan, Plan):
    raise ValueError(
        "plan must be None or the value sam_optax.planner(tx)(count, "
        f"opt_state) returns (a sam_optax Plan), got {plan!r}"
    )
  owner = plan.owner
  if not isinstance(owner, PlanKey):
    raise ValueError(
        f"plan was not made by sam_optax.planner (its owner is {owner!r}): "
        "pass the value sam_optax.planner(tx)(count, opt_state) returns, "
        f"for this tx, or plan=None; got {plan!r}"
    )
  if owner != key:
    hint = ""
    if owner.rho != key.rho:
      hint = (
          " A plan made from a rho schedule fits only a transform with that "
          "same schedule (the same function); under "
          "optax.inject_hyperparams build the planner with a number for rho "
          "(the injected value is then decided on the device)."
      )
    if owner.trainable != key.trainable:
      hint += (
          " A plan fits only a transform with the same trainable= (the "
          "same predicate object, or a mask freezing the same leaves): "
          "its layer indices count the trainable layers."
      )
    raise ValueError(
        "plan was made for another transform or other static settings: "
        f"made for ({owner.describe()}), passed to ({key.describe()}). "
        "Build the planner from the transform that takes the plans: "
        "sam_optax.planner(tx); under optax.inject_hyperparams, list the "
        "arguments that decide plans (k, warmup_steps, window, "
        f"update_every, num_layers, select_every) in static_args.{hint}"
    )
  check_flag("plan.rho_skip", plan.rho_skip)
  if plan.rho_skip is not None and key.rho is None:
    raise ValueError(
        "plan.rho_skip must be None for a transform whose rho is not a "
        f"schedule, got {plan.rho_skip!r}"
    )
  gate.check_planned(plan.second, plan.gate_after)
  region.check_planned(plan.region)
  return plan
