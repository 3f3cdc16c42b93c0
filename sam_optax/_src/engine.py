"""The one engine behind every method.

Every sharpness-aware method in this library is the same loop::

    mask      = region.select(step)                # where the perturbation applies
    go        = gate.decide(step)                  # is the second gradient computed?
    if go:                                         # a ``lax.cond``, not a blend
        e     = geometry.perturb(step)             # rho-sized step uphill
        h     = grad loss_fn(w + e)                # the second gradient
        out   = combine.computed(step, h)          # e.g. h, or (1-a) g + a h
        gate.observe(step, h)
    else:
        out   = combine.skipped(step)              # reuse what was stored, or g

The four components are small objects holding static configuration only;
whatever they remember lives in their own slot of :class:`SharpnessAwareState`
as arrays. A paper's method is a choice of four components (see
``presets.py``); a combination no paper has is built the same way with
:func:`sharpness_aware`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import canonical_conv

PyTree = Any


class SharpnessAwareState(NamedTuple):
  """State of every transform built by :func:`sharpness_aware`.

  Attributes:
    count: number of ``update`` calls seen (int32).
    grad_evals: gradient evaluations of ``loss_fn`` made inside the transform
      (int32). A second gradient counts 1; per-example gradients count 1 per
      example (see the method's docstring). The clean gradient the caller
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


@dataclasses.dataclass
class Step:
  """Everything a component may read during one ``update`` call.

  Attributes:
    updates: the incoming clean gradient, as the caller passed it (per-device
      under ``pmap`` when the caller did not average it: m-sharpness).
    grads: ``updates`` averaged over ``axis_name`` (identical on every device);
      what the output and every statistic are built from.
    params: the current parameters.
    batch: the batch ``loss_fn`` takes.
    count: the step number (int32 scalar).
    rho: the perturbation radius at this step (float32 scalar).
    mask: where the perturbation applies (None: everywhere), set by the region.
    axis_name: the pmap/shard_map axis, or None.
    eps: the guard added to norms that divide.
    loss: ``loss(params, batch) -> scalar`` with any aux dropped.
    normalize_over_region: take the perturbation norm over the mask only.
  """

  updates: PyTree
  grads: PyTree
  params: PyTree
  batch: Any
  count: jax.Array
  rho: jax.Array
  mask: Optional[PyTree]
  axis_name: Optional[str]
  eps: float
  loss: Callable[[PyTree, Any], jax.Array]
  normalize_over_region: bool = False


# --------------------------------------------------------------------------
# Component bases. Each has a static configuration and an ``init`` that
# returns its state (arrays only). The defaults are the plain-SAM behaviour.
# --------------------------------------------------------------------------


class Component:
  """Base: a component with no state."""

  def init(self, params: PyTree) -> PyTree:
    del params
    return optax.EmptyState()


class Geometry(Component):
  """Builds the perturbation ``e`` from the clean gradient."""

  def perturb(self, step: Step, state: PyTree) -> tuple[PyTree, PyTree]:
    raise NotImplementedError


class Region(Component):
  """Where the perturbation applies.

  ``select`` returns the mask for this step: None (everywhere), a pytree of
  boolean arrays (an element-wise or per-leaf mask, usually kept in state), or
  a pytree of Python bools (a static set of leaves, known at trace time). With
  Python bools the second gradient is taken with respect to the selected
  leaves only, the others enter it as the very same arrays, and no
  backpropagation below the lowest selected layer happens.

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
    """Returns (mask or None, new state, gradient evaluations spent)."""
    del step
    return None, state, jnp.zeros((), jnp.int32)


class Gate(Component):
  """Decides whether the second gradient is computed this step.

  ``always`` / ``never`` are static shortcuts: the engine then emits no
  ``lax.cond`` at all.
  """

  always: bool = True
  never: bool = False

  def decide(self, step: Step, state: PyTree) -> tuple[jax.Array, PyTree]:
    del step
    return jnp.array(True), state

  def observe(self, step: Step, second: PyTree, state: PyTree) -> PyTree:
    """Called in the computed branch only, with the averaged second gradient."""
    del step, second
    return state


class Combine(Component):
  """Builds the output from the clean gradient and the second gradient."""

  def computed(
      self, step: Step, second: PyTree, state: PyTree
  ) -> tuple[PyTree, PyTree]:
    del step
    return second, state

  def skipped(self, step: Step, state: PyTree) -> tuple[PyTree, PyTree]:
    return step.grads, state


_MISSING = object()


def _mask_leaf(x: jax.Array, m: Any) -> jax.Array:
  """``x`` where the mask holds, zero elsewhere; a bool leaf is static."""
  if m is True:
    return x
  if m is False:
    return jnp.zeros_like(x)
  return jnp.where(m, x, jnp.zeros_like(x))


def is_static_mask(mask: Any) -> bool:
  """True when ``mask`` is a non-empty pytree of Python (or NumPy) bools."""
  leaves = jax.tree.leaves(mask)
  return bool(leaves) and all(isinstance(x, (bool, np.bool_)) for x in leaves)


def apply_mask(tree: PyTree, mask: Optional[PyTree]) -> PyTree:
  """Zeroes ``tree`` outside ``mask`` (None: no mask)."""
  if mask is None:
    return tree
  return jax.tree.map(_mask_leaf, tree, mask)


def sharpness_aware(
    loss_fn: Callable[..., Any],
    rho: base.ScalarOrSchedule = 0.05,
    *,
    geometry: Geometry,
    region: Optional[Region] = None,
    gate: Optional[Gate] = None,
    combine: Optional[Combine] = None,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  """The engine: a sharpness-aware gradient transformation from four parts.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning a scalar, or ``(scalar,
      aux)`` when ``has_aux`` is True (the aux of perturbed evaluations is
      discarded).
    rho: perturbation radius, a float or a schedule of the step count.
    geometry: how the perturbation is built (see ``geometry.py``).
    region: where it applies (default: everywhere).
    gate: when the second gradient is computed (default: every step).
    combine: how the output is formed (default: the second gradient, SAM).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: the ``pmap`` / ``shard_map`` axis to average over, or None.
    eps: guard added to every norm that divides.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    clean gradient as ``updates`` and requires ``params`` and ``batch=``.
  """
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
  base.check_scalar_or_schedule("rho", rho, 0.0)
  base.check_range("eps", eps, 0.0, low_open=True)
  if axis_name is not None and not isinstance(axis_name, str):
    raise ValueError(f"axis_name must be a string or None, got {axis_name!r}")
  region = Region() if region is None else region
  gate = Gate() if gate is None else gate
  combine = Combine() if combine is None else combine

  # rho known to be exactly zero before tracing: nothing is ever evaluated.
  static_rho = None if callable(rho) else base._concrete_float(rho)  # pylint: disable=protected-access
  rho_is_zero = static_rho == 0.0
  rho_may_be_zero = static_rho is None  # a schedule or a traced value

  def scalar_loss(params, batch):
    out = loss_fn(params, batch)
    return out[0] if has_aux else out

  def init_fn(params):
    return SharpnessAwareState(
        count=jnp.zeros((), jnp.int32),
        grad_evals=jnp.zeros((), jnp.int32),
        geometry=geometry.init(params),
        region=region.init(params),
        gate=gate.init(params),
        combine=combine.init(params),
    )

  # Inside a lax.cond (a gate, or a rho that may be zero) XLA:CPU skips its
  # convolution canonicalization; canonical_conv.grad does it up front.
  nested = rho_may_be_zero or not (gate.always or gate.never)
  grad_fn = canonical_conv.grad if nested else jax.grad

  def second_gradient(
      step: Step, e: PyTree, smask: Optional[PyTree]
  ) -> PyTree:
    """grad loss(w + e), averaged over devices, shaped like params.

    With a static region only the selected leaves are differentiated; the
    others are passed through as the very same arrays and their entry in the
    result is the clean gradient.
    """
    if smask is None:
      perturbed = jax.tree.map(
          lambda w, d: (w + d.astype(w.dtype)), step.params, e
      )
      h = grad_fn(lambda p: scalar_loss(p, step.batch))(perturbed)
      return base.pmean(h, axis_name)

    sel_leaves, treedef = jax.tree.flatten(step.params)
    mask_leaves = treedef.flatten_up_to(smask)
    e_leaves = treedef.flatten_up_to(e)
    idx = [i for i, m in enumerate(mask_leaves) if m]

    def partial_loss(selected):
      leaves = list(sel_leaves)
      for j, i in enumerate(idx):
        leaves[i] = selected[j] + e_leaves[i].astype(selected[j].dtype)
      return scalar_loss(jax.tree.unflatten(treedef, leaves), step.batch)

    h = grad_fn(partial_loss)([sel_leaves[i] for i in idx])
    h = base.pmean(h, axis_name)
    out = list(treedef.flatten_up_to(step.grads))
    for j, i in enumerate(idx):
      out[i] = h[j]
    return jax.tree.unflatten(treedef, out)

  def update_fn(updates, state, params=None, *, batch=_MISSING, **extra):
    del extra  # other extra arguments are for other transforms in the chain
    if params is None:
      raise ValueError(
          "sam_optax transforms need `params`: call "
          "tx.update(grads, opt_state, params, batch=batch)"
      )
    if batch is _MISSING:
      raise ValueError(
          "sam_optax transforms need the keyword argument `batch` (the batch "
          "loss_fn(params, batch) takes): call "
          "tx.update(grads, opt_state, params, batch=batch)"
      )
    count = state.count
    rho_t = base.resolve(rho, count)
    grads = base.pmean(updates, axis_name)
    step = Step(
        updates=updates,
        grads=grads,
        params=params,
        batch=batch,
        count=count,
        rho=rho_t,
        mask=None,
        axis_name=axis_name,
        eps=eps,
        loss=scalar_loss,
        normalize_over_region=region.normalize_over_region,
    )
    mask, region_state, region_evals = region.select(step, state.region)
    step.mask = mask
    static_mask = mask if mask is not None and is_static_mask(mask) else None
    go, gate_state = gate.decide(step, state.gate)

    def computed(_):
      e, geometry_state = geometry.perturb(step, state.geometry)
      if rho_may_be_zero:
        positive = rho_t > 0
        second = jax.lax.cond(
            positive,
            lambda: second_gradient(step, e, static_mask),
            lambda: step.grads,
        )
        evals = positive.astype(jnp.int32)
      else:
        second = second_gradient(step, e, static_mask)
        evals = jnp.ones((), jnp.int32)
      out, combine_state = combine.computed(step, second, state.combine)
      new_gate = gate.observe(step, second, gate_state)
      return out, geometry_state, combine_state, new_gate, evals

    def skipped(_):
      out, combine_state = combine.skipped(step, state.combine)
      return (
          out,
          state.geometry,
          combine_state,
          gate_state,
          jnp.zeros((), jnp.int32),
      )

    if rho_is_zero or gate.never:
      branch = skipped(None)
      if rho_is_zero:
        branch = (step.grads,) + branch[1:]
    elif gate.always:
      branch = computed(None)
    else:
      branch = jax.lax.cond(go, computed, skipped, None)
    out, geometry_state, combine_state, gate_state, evals = branch

    if region.clean_outside and mask is not None:
      if static_mask is not None:
        out = jax.tree.map(
            lambda m, o, g: o if m else g, static_mask, out, grads
        )
      else:
        out = base.tree_where(mask, out, grads)
    if rho_may_be_zero:
      out = jax.tree.map(
          lambda o, g: jnp.where(rho_t > 0, o, g), out, grads
      )
    out = base.tree_cast_like(out, updates)
    new_state = SharpnessAwareState(
        count=optax.safe_increment(count),
        grad_evals=state.grad_evals + evals + region_evals,
        geometry=geometry_state,
        region=region_state,
        gate=gate_state,
        combine=combine_state,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
