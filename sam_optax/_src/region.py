"""Regions: where the perturbation applies.

A region yields a mask each step (see :class:`protocols.Where`): None
(everywhere), a pytree of Python bools known before tracing (a static set of
leaves: the engine then differentiates only those), or a pytree of boolean
arrays kept in state (a sparse mask, refreshed or fixed).

* :class:`Everywhere`, :class:`FixedMask`: no decision to take.
* :class:`FisherMask` (SSAM-F) and :class:`DynamicMask` (SSAM-D): a mask of
  exactly ``K = floor(N (1 - sparsity))`` entries kept in state, refreshed on
  a step schedule (a ``lax.cond`` on the count, or a plan).
* :class:`FixedLayers`, :class:`OutputLayers`, :class:`TopLayers` and
  :class:`SharpLayers` (layer-wise SAM): a set of layers, fixed (static) or
  re-chosen at run time by gradient norm or sharpness (in state; static
  under a plan, so only the chosen layers are differentiated).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import base
from sam_optax._src import protocols
from sam_optax._src import fisher as fisher_lib
from sam_optax._src import layers as layers_lib
from sam_optax._src import topk

PyTree = Any
GroupFn = Callable[[str], str]
LayerSpec = Union[str, Sequence[str], Callable[[str], bool]]

CRITERIA = ("gradient", "weight", "random")


# --------------------------------------------------------------------------
# Everywhere and fixed masks.
# --------------------------------------------------------------------------


class MaskState(NamedTuple):
  """A boolean mask shaped like the params, and how often it was refreshed."""

  mask: Any
  refreshes: jax.Array

  def stats(self):
    return {
        "mask_density": mask_density(self.mask),
        "mask_refreshes": self.refreshes,
    }


def mask_density(mask) -> jax.Array:
  """Share of entries that are True, over the whole model (float32)."""
  leaves = jax.tree.leaves(mask)
  total = sum(int(np.size(x)) for x in leaves)
  kept = sum(jnp.sum(x, dtype=jnp.int32) for x in leaves)
  return jnp.asarray(kept, jnp.float32) / max(total, 1)


@dataclasses.dataclass(frozen=True)
class Everywhere(protocols.Region):
  """The perturbation applies to every leaf (no mask)."""


@dataclasses.dataclass(frozen=True, eq=False)
class FixedMask(protocols.Region):
  """A mask given by the user.

  A pytree of boolean arrays shaped like the params (or one bool array per
  leaf) is an element-wise mask, kept in state (a copy of it). A pytree of
  Python bools (one per leaf) is a static set of leaves: with
  ``clean_outside=True`` only those leaves are differentiated in the second
  evaluation (the others keep their clean gradient); with the default
  ``clean_outside=False`` every leaf gets its gradient at the perturbed
  point, as in Sparse SAM.
  """

  mask: Any = None
  normalize_over_region: bool = False
  clean_outside: bool = False

  @property
  def static_mask(self):
    """The mask when it is a pytree of Python bools (a static set), else None."""
    return self.mask if protocols.is_static_mask(self.mask) else None

  def for_trainable(self, trainable):
    """The mask is given with the structure of the full params; with
    ``trainable=`` its frozen leaves are dropped (never perturbed)."""
    base.check_same_structure(self.mask, trainable.mask(), "mask", shapes=False)
    return dataclasses.replace(self, mask=trainable.restrict(self.mask))

  def init(self, params):
    base.check_same_structure(self.mask, params, "mask")
    if self.static_mask is not None:
      return protocols.Component.init(self, params)
    # A copy: the state must not alias the caller's arrays (a train step
    # that donates its state would otherwise delete the user's mask).
    arrays = jax.tree.map(
        lambda m, p: jnp.array(
            jnp.broadcast_to(jnp.asarray(m, bool), jnp.shape(p)), copy=True
        ),
        self.mask,
        params,
    )
    return MaskState(mask=arrays, refreshes=jnp.zeros((), jnp.int32))

  def select(self, step, state):
    if self.static_mask is not None:
      return self.static_mask, state, jnp.zeros((), jnp.int32)
    return state.mask, state, jnp.zeros((), jnp.int32)


def everywhere() -> Everywhere:
  return Everywhere()


def fixed_mask(
    mask, *, normalize_over_region: bool = False, clean_outside: bool = False
) -> FixedMask:
  """A fixed region from a pytree of bools (see :class:`FixedMask`)."""
  if mask is None:
    raise ValueError("mask must be a pytree of booleans, got None")
  bad = [
      x for x in jax.tree.leaves(mask)
      if not (isinstance(x, (bool, np.bool_))
              or np.asarray(x).dtype == np.bool_)
  ]
  if bad:
    raise ValueError(
        "mask leaves must be booleans (Python bools or boolean arrays); got "
        f"leaves of dtype {sorted({str(np.asarray(x).dtype) for x in bad})}"
    )
  return FixedMask(
      mask=mask,
      normalize_over_region=normalize_over_region,
      clean_outside=clean_outside,
  )


# --------------------------------------------------------------------------
# Sparse SAM masks.
# --------------------------------------------------------------------------


class DynamicMaskState(NamedTuple):
  """SSAM-D mask, refresh count and the PRNG key (raw uint32 key data)."""

  mask: Any
  refreshes: jax.Array
  key: jax.Array

  def stats(self):
    return {
        "mask_density": mask_density(self.mask),
        "mask_refreshes": self.refreshes,
    }


def _full_mask(params, value) -> PyTree:
  return jax.tree.map(
      lambda p: jnp.full(jnp.shape(p), value, bool), params
  )


def static_sparsity(sparsity: Any) -> Optional[float]:
  """The sparsity as a Python float when it is a plain number, else None.

  A plain number fixes K at trace time, exactly (:func:`num_kept`), and lets
  ``sparsity`` 0 and 1 take their shortcuts (no mask / no second gradient).
  An array (as ``optax.inject_hyperparams`` passes it) or a schedule is read
  at every refresh; K is then ``floor(N (1 - s))`` in float32.
  """
  if isinstance(sparsity, (bool, np.bool_)):
    return None
  if isinstance(sparsity, (numbers.Real, np.floating, np.integer)):
    return float(sparsity)
  return None


def _fraction(x: jax.Array) -> jax.Array:
  """A run-time fraction (``sparsity``, a drop rate) in [0, 1]: clipped,
  NaN read as 0, so that a schedule's or an injected value out of range
  gives a defined count (a NaN cast to int32 is platform-dependent, and an
  infinite drop rate emptied the mask)."""
  return jnp.clip(jnp.nan_to_num(x, nan=0.0), 0.0, 1.0)


def keep_count(sparsity: Any, n: int, count: Any) -> Any:
  """K for ``n`` entries at step ``count``: a Python int or an int32 array."""
  s = static_sparsity(sparsity)
  if s is not None:
    return topk.num_kept(n, s)
  st = _fraction(base.resolve(sparsity, count, "sparsity"))
  k = jnp.floor(jnp.float32(n) * (1.0 - st)).astype(jnp.int32)
  return jnp.clip(k, 0, n)


class RefreshedMask(protocols.Region):
  """A mask of ``K = floor(N (1 - sparsity))`` entries kept in state and
  recomputed on the steps where ``refresh_at`` holds.

  Subclasses give ``refresh_at(count)`` (a function of the count alone, so a
  planner knows it without reading the device), ``refreshed(step, state,
  k)`` (the state after a refresh) and ``refresh_evals()``. Without a plan a
  refresh runs under a ``lax.cond``; with one, a step holds the refresh or
  not, with no conditional. A plain-number ``sparsity`` of 0 yields no mask
  (plain SAM) and of 1 an empty one, with no refresh work.
  """

  sparsity: Any = 0.5

  def refresh_at(self, count):
    raise NotImplementedError

  def refreshed(self, step, state, k):
    raise NotImplementedError

  def refresh_evals(self) -> int:
    return 0

  def _shortcut(self, step, state):
    """The (mask, state, evals) answer when K is 0 or N, else None."""
    n = topk.num_params(step.params)
    k = keep_count(self.sparsity, n, step.count)
    zero = jnp.zeros((), jnp.int32)
    if isinstance(k, int) and k == n:  # sparsity 0: no mask, exactly SAM
      return (None, state, zero), k
    if isinstance(k, int) and k == 0:  # sparsity 1 (or a too small model)
      # A static mask of no leaf: the engine then evaluates nothing.
      nothing = jax.tree.map(lambda _: False, step.params)
      return (nothing, state, zero), k
    return None, k

  def select(self, step, state):
    short, k = self._shortcut(step, state)
    if short is not None:
      return short
    refresh = self.refresh_at(step.count)
    state = base.cond(
        refresh, lambda s: self.refreshed(step, s, k), lambda s: s, state
    )
    evals = jnp.where(refresh, jnp.int32(self.refresh_evals()), 0)
    return state.mask, state, evals.astype(jnp.int32)

  def plan(self, count, read, memo):
    del read, memo
    return bool(self.refresh_at(count))

  def plan_key(self):
    return protocols.part_key(self, update_every=self.update_every)

  def check_planned(self, plan):
    protocols.check_flag("plan.region", plan)

  def select_planned(self, step, state, plan):
    short, k = self._shortcut(step, state)
    if short is not None:
      return short
    evals = jnp.int32(self.refresh_evals() if plan else 0)
    if plan:
      state = self.refreshed(step, state, k)
    return state.mask, state, evals


@dataclasses.dataclass(frozen=True, eq=False)
class FisherMask(RefreshedMask):
  """SSAM-F region: top-K of the empirical Fisher, refreshed on a schedule.

  On every step with ``count % update_every == 0`` (step 0 included), before
  the perturbation, ``F = fisher_lib.fisher_scores(...)`` (the first ``num_samples``
  examples of the batch; of the global batch under ``axis_name``) is summed
  over ``axis_name``, so every device holds the same mask, and the mask
  becomes the top ``K = floor(N * (1 - sparsity))`` entries of ``F``
  (:func:`top_k_mask`). Other steps reuse the stored mask. A refresh counts
  ``num_samples`` gradient evaluations (per-example gradients count one
  each; under ``axis_name`` they are shared among the devices that hold those
  examples). A plain-number ``sparsity = 0`` yields no mask (plain SAM, no
  Fisher work); ``sparsity = 1`` an empty one. State:
  :class:`region.MaskState` (``stats()``: ``mask_density``,
  ``mask_refreshes``); the mask is all False before the first update.
  """

  sparsity: Any = 0.5
  num_samples: int = 16
  update_every: int = 1
  chunk_size: int = 8
  batch_axes: Any = 0

  def init(self, params):
    return MaskState(
        mask=_full_mask(params, static_sparsity(self.sparsity) == 0.0),
        refreshes=jnp.zeros((), jnp.int32),
    )

  def refresh_at(self, count):
    return count % self.update_every == 0

  def refreshed(self, step, state, k):
    f = fisher_lib.fisher_scores(
        step.loss,
        step.params,
        step.batch,
        self.num_samples,
        chunk_size=self.chunk_size,
        batch_axes=self.batch_axes,
        axis_name=step.axis_name,
        # One power-of-two scale (from the averaged gradient, the same on
        # every device): huge gradients' squares stay finite, order kept.
        scale=base.tree_scale(step.grads),
    )
    mask = topk.top_k_mask(base.psum(f, step.axis_name), k)
    return MaskState(
        mask=mask, refreshes=base.saturating_add(state.refreshes, 1)
    )

  def refresh_evals(self):
    return self.num_samples


def cosine_drop_rate(count: Any, drop_rate: Any, total_steps: int) -> jax.Array:
  """``drop_rate * (1 + cos(pi * min(count / total_steps, 1))) / 2`` (float32).

  Past ``total_steps`` the rate stays 0 (the authors' schedule ends there).
  """
  frac = jnp.clip(
      jnp.asarray(count, jnp.float32) / jnp.float32(total_steps), 0.0, 1.0
  )
  rate = _fraction(jnp.asarray(drop_rate, jnp.float32))
  return rate * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0


def dynamic_counts(
    dr: Any, n: int, k: Any, alive: Any, sparsity: Any, exact_count: bool
) -> tuple[jax.Array, jax.Array]:
  """(entries kept, entries grown) at drop rate ``dr`` (int32 scalars).

  ``n`` entries, ``k`` the target count, ``alive`` the count in the current
  mask (equal to ``k`` unless ``sparsity`` changed or the authors' rounding
  lost entries).

  ``exact_count=True`` [ours]::

      keep0 = min(floor(alive (1 - dr)), K)
      grow  = min(K - keep0, N - alive)        # no more than the dead entries
      keep  = K - grow                         # so keep + grow == K always

  With ``alive == K`` this is the paper's ``keep = floor(K (1 - dr))`` and
  ``grow = K - keep`` whenever enough dead entries exist to regrow.
  ``exact_count=False`` follows the authors' code: ``keep = floor(K (1 -
  dr))``, ``grow = floor(min(K dr, N s))``, which can lose one entry per
  refresh to rounding (more when ``K dr > N s``). The products are taken in
  float32 (``dr`` is a float32 array), so one that is an integer in exact
  arithmetic may round to either side of it.
  """
  dr = jnp.asarray(dr, jnp.float32)
  kf = jnp.asarray(k, jnp.float32)
  k = jnp.asarray(k, jnp.int32)
  alive = jnp.asarray(alive, jnp.int32)
  if exact_count:
    keep0 = jnp.floor(alive.astype(jnp.float32) * (1.0 - dr)).astype(jnp.int32)
    keep0 = jnp.minimum(keep0, k)
    grow = jnp.minimum(k - keep0, jnp.int32(n) - alive)
    return k - grow, grow
  keep = jnp.floor(kf * (1.0 - dr)).astype(jnp.int32)
  s = jnp.asarray(sparsity, jnp.float32)
  grow = jnp.floor(jnp.minimum(kf * dr, jnp.float32(n) * s)).astype(jnp.int32)
  return jnp.minimum(keep, alive), grow


@dataclasses.dataclass(frozen=True, eq=False)
class DynamicMask(RefreshedMask):
  """SSAM-D region: random initial mask, periodic drop and grow.

  ``init`` draws a mask with exactly ``K = floor(N (1 - sparsity))`` entries
  (top-K of uniform scores from ``seed``). On every step with ``count > 0``
  and ``count % update_every == 0``, before the perturbation::

      dr    = drop_rate * (1 + cos(pi * count / total_steps)) / 2
      keep  = the `keep` alive entries with the largest drop score
      grow  = the `grow` dead entries with the largest grow score
      mask  = keep ∪ grow

  with the counts of ``dynamic_counts`` and scores ``|g|``
  ("gradient": the clean gradient averaged over ``axis_name``), ``|w|``
  ("weight") or uniform noise ("random", from the key in state, identical
  on every device). Ties go to the lowest flat index. State:
  :class:`DynamicMaskState`. A plain-number ``sparsity = 0`` yields no mask
  (plain SAM).
  """

  sparsity: Any = 0.5
  drop_rate: Any = 0.5
  update_every: int = 1
  total_steps: int = 1
  drop_criterion: str = "gradient"
  grow_criterion: str = "random"
  seed: int = 0
  exact_count: bool = True

  def init(self, params):
    n = topk.num_params(params)
    k = keep_count(self.sparsity, n, jnp.zeros((), jnp.int32))
    if isinstance(k, int) and k in (0, n):
      _, key = jax.random.split(jax.random.key(self.seed))
      return DynamicMaskState(
          mask=_full_mask(params, k == n),
          refreshes=jnp.zeros((), jnp.int32),
          key=jax.random.key_data(key),
      )
    return _random_mask_state(
        jnp.asarray(self.seed, jnp.uint32), params, jnp.asarray(k, jnp.int32)
    )

  def _scores(self, criterion, step, key):
    if criterion == "gradient":
      return jax.tree.map(lambda g: jnp.abs(g.astype(jnp.float32)), step.grads)
    if criterion == "weight":
      return jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)), step.params)
    return _uniform_like(key, step.params)

  def refresh_at(self, count):
    return (count % self.update_every == 0) & (count > 0)

  def refreshed(self, step, state, k):
    n = topk.num_params(step.params)
    key = jax.random.wrap_key_data(state.key)
    key, drop_key, grow_key = jax.random.split(key, 3)
    dr = cosine_drop_rate(step.count, self.drop_rate, self.total_steps)
    alive = state.mask
    n_alive = sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(alive))
    s_t = (
        _fraction(base.resolve(self.sparsity, step.count, "sparsity"))
        if callable(self.sparsity)
        else self.sparsity
    )
    n_keep, n_grow = dynamic_counts(dr, n, k, n_alive, s_t, self.exact_count)
    dead = jax.tree.map(jnp.logical_not, alive)
    keep = topk.top_k_mask(
        self._scores(self.drop_criterion, step, drop_key),
        n_keep,
        eligible=alive,
    )
    grow = topk.top_k_mask(
        self._scores(self.grow_criterion, step, grow_key),
        n_grow,
        eligible=dead,
    )
    return DynamicMaskState(
        mask=jax.tree.map(jnp.logical_or, keep, grow),
        refreshes=base.saturating_add(state.refreshes, 1),
        key=jax.random.key_data(key),
    )


@jax.jit
def _random_mask_state(seed, params, k) -> DynamicMaskState:
  """SSAM-D's initial state: top-k of uniform noise, and the next key.

  Compiled once per parameter structure (seed and k are traced).
  """
  init_key, key = jax.random.split(jax.random.key(seed))
  return DynamicMaskState(
      mask=topk.top_k_mask(_uniform_like(init_key, params), k),
      refreshes=jnp.zeros((), jnp.int32),
      key=jax.random.key_data(key),
  )


def _uniform_like(key, params) -> PyTree:
  """Uniform [0, 1) float32 noise shaped like ``params``, one key per leaf
  (leaf ``i``'s is ``fold_in(key, i)``).

  Drawn for all leaves of a shape at once (``vmap`` over their keys, the
  same numbers): a draw per leaf was a kernel of its own per leaf, which
  XLA:CPU compiled in about 0.2 s each."""
  leaves, treedef = jax.tree.flatten(params)
  groups: dict = {}
  for i, x in enumerate(leaves):
    groups.setdefault(tuple(jnp.shape(x)), []).append(i)
  out = [None] * len(leaves)
  for shape, idx in groups.items():
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        key, jnp.asarray(idx, jnp.uint32))
    noise = jax.vmap(
        lambda k, shape=shape: jax.random.uniform(k, shape, jnp.float32))(keys)
    for j, i in enumerate(idx):
      out[i] = noise[j]
  return jax.tree.unflatten(treedef, out)



def _check_fraction(name: str, value: Any) -> Any:
  """A float, array or schedule; a concrete value must lie in [0, 1]."""
  if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
    raise ValueError(f"{name} must be a number in [0, 1] or a schedule, "
                     f"got {value!r}")
  base.check_scalar_or_schedule(name, value, 0.0, high=1.0)
  return value


def fisher_mask(
    sparsity: Any = 0.5,
    *,
    num_samples: int = 16,
    update_every: int,
    chunk_size: int = 8,
    batch_axes: Any = 0,
) -> FisherMask:
  """A checked :class:`FisherMask` (SSAM-F's region)."""
  sparsity = _check_fraction("sparsity", sparsity)
  num_samples = base.static_int("num_samples", num_samples, 1)
  update_every = base.static_int("update_every", update_every, 1)
  chunk_size = base.static_int("chunk_size", chunk_size, 1)
  fisher_lib.check_batch_axes(batch_axes)
  return FisherMask(
      sparsity=sparsity,
      num_samples=num_samples,
      update_every=update_every,
      chunk_size=chunk_size,
      batch_axes=batch_axes,
  )


def dynamic_mask(
    sparsity: Any = 0.5,
    *,
    drop_rate: Any = 0.5,
    update_every: int,
    total_steps: int,
    drop_criterion: str = "gradient",
    grow_criterion: str = "random",
    seed: int = 0,
    exact_count: bool = True,
) -> DynamicMask:
  """A checked :class:`DynamicMask` (SSAM-D's region)."""
  sparsity = _check_fraction("sparsity", sparsity)
  if callable(drop_rate):
    raise ValueError(
        "drop_rate must be a number in [0, 1] (its decay is the built-in "
        f"cosine over total_steps), got {drop_rate!r}"
    )
  drop_rate = _check_fraction("drop_rate", drop_rate)
  update_every = base.static_int("update_every", update_every, 1)
  total_steps = base.static_int("total_steps", total_steps, 1)
  base.check_choice("drop_criterion", drop_criterion, CRITERIA)
  base.check_choice("grow_criterion", grow_criterion, CRITERIA)
  seed = base.check_seed("seed", seed)
  if not isinstance(exact_count, (bool, np.bool_)):
    raise ValueError(f"exact_count must be a bool, got {exact_count!r}")
  return DynamicMask(
      sparsity=sparsity,
      drop_rate=drop_rate,
      update_every=update_every,
      total_steps=total_steps,
      drop_criterion=drop_criterion,
      grow_criterion=grow_criterion,
      seed=seed,
      exact_count=bool(exact_count),
  )


# --------------------------------------------------------------------------
# Layer sets.
# --------------------------------------------------------------------------


class LayerSelection(NamedTuple):
  """The selected layers (indices into :func:`layer_paths`).

  Attributes:
    selected: int32 ``[n]``, the selected layer indices; for a runtime
      selection in decreasing order of its score, gradient norm or
      sharpness (-1 before the first ranking: every layer), the ranking
      before ``pending``. The stat ``selected_layers`` is ``pending`` for
      a runtime selection (its newest ranking), ``selected`` otherwise.
    refreshes: how many times the selection was (re)computed; None for a
      fixed selection.
    sharpness: float32 ``[layers]``, a selection by sharpness only: each
      layer's last estimate ``‖h_l - g_l‖`` (:class:`SharpLayers`).
    pending: int32 ``[n]``, a runtime selection only: the newest ranking,
      made at step ``ranked_at``; a step ``t`` perturbs it once
      ``ranked_at <= t - 2``, and ``selected`` (the ranking before it)
      until then (see :class:`TopLayers`).
    ranked_at: int32, the step that made ``pending`` (-1 before any).
  """

  selected: jax.Array
  refreshes: Optional[jax.Array] = None
  sharpness: Optional[jax.Array] = None
  pending: Optional[jax.Array] = None
  ranked_at: Optional[jax.Array] = None

  def stats(self):
    # A runtime selection: its newest ranking (perturbed two steps on).
    out = {"selected_layers":
           self.selected if self.pending is None else self.pending}
    if self.refreshes is not None:
      out["layer_refreshes"] = self.refreshes
    if self.sharpness is not None:
      out["layer_sharpness"] = self.sharpness
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class FixedLayers(protocols.Region):
  """A fixed set of layers, known before tracing (the fast path).

  ``layers`` is a layer path, a sequence of them (each matched on a path
  suffix: ``"head"`` finds ``"params/head"`` in a Flax linen variables
  dict; see ``layers.match_layers``), or a predicate ``layer_path ->
  bool``. ``select`` builds, at trace time from the params' structure, a
  pytree of Python bools: the engine then differentiates the selected leaves
  only and passes the others to ``loss_fn`` as the very same arrays, so
  nothing below the lowest selected layer is backpropagated.
  """

  layers: Any = ()
  group_fn: Optional[GroupFn] = None
  normalize_over_region: bool = False
  clean_outside: bool = True

  def selected_indices(self, params: PyTree) -> list[int]:
    """Indices (into :func:`layer_paths`) of the selected layers."""
    names, keys, _ = layers_lib.layer_groups(params, self.group_fn)
    if not callable(self.layers):
      return layers_lib.match_layers(names, self.layers, keys)
    chosen = []
    for i, n in enumerate(names):
      keep = self.layers(n)
      if not isinstance(keep, (bool, np.bool_)):
        raise ValueError(
            "layers, as a predicate, must return a Python bool for every "
            f"layer path; got {keep!r} for {n!r}"
        )
      if keep:
        chosen.append(i)
    if not chosen:
      raise ValueError(
          f"layers: the predicate selects no layer; valid paths: {names}"
      )
    return chosen

  def init(self, params):
    idx = self.selected_indices(params)
    if not set(idx) & set(layers_lib.filled_layers(params, self.group_fn)):
      names, _ = layers_lib.leaf_layers(params, self.group_fn)
      raise ValueError(
          f"layers selects only layers that hold no entries (zero-size "
          f"leaves): {[names[i] for i in idx]}; the step would perturb "
          "nothing. Name layers with entries"
      )
    return LayerSelection(selected=jnp.asarray(idx, jnp.int32))

  def select(self, step, state):
    del state  # the selection is static: the state reports it
    chosen = self.selected_indices(step.params)
    mask = static_layer_mask(step.params, self.group_fn, chosen)
    selection = LayerSelection(selected=jnp.asarray(chosen, jnp.int32))
    return mask, selection, jnp.zeros((), jnp.int32)


def static_layer_mask(params, group_fn, chosen) -> PyTree:
  """The pytree of Python bools marking the leaves of the ``chosen`` layers
  (all layers when ``chosen`` is empty)."""
  _, ids = layers_lib.leaf_layers(params, group_fn)
  chosen = set(chosen)
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [not chosen or i in chosen for i in ids])


@dataclasses.dataclass(frozen=True, eq=False)
class OutputLayers(protocols.Region):
  """The ``num_layers`` layers nearest the loss: the output side, found from
  the computation graph.

  At trace time ``loss_fn`` is traced once from shapes (nothing runs) and
  each layer gets the longest chain of operations from one of its leaves to
  the loss (:func:`layers.output_layers`); the ``num_layers`` shortest are
  selected (ties: the later layer). The choice is static, like
  :class:`FixedLayers`: only those layers are differentiated in the second
  evaluation, with no plan needed. On the small CNN of the experiments this
  is ``fc`` and ``head``; on ResNet-18 the head and the last BatchNorm.
  ``stats()`` reports the selection (-1 before the first update).
  """

  num_layers: int = 2
  group_fn: Optional[GroupFn] = None
  normalize_over_region: bool = False
  clean_outside: bool = True

  def init(self, params):
    layers_lib.check_num_layers(params, self.group_fn, self.num_layers)
    return LayerSelection(selected=jnp.full((self.num_layers,), -1, jnp.int32))

  def select(self, step, state):
    del state
    chosen = layers_lib.output_layers(
        step.loss, step.params, step.batch, self.num_layers, self.group_fn
    )
    mask = static_layer_mask(step.params, self.group_fn, chosen)
    selection = LayerSelection(selected=jnp.asarray(chosen, jnp.int32))
    return mask, selection, jnp.zeros((), jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class TopLayers(protocols.Region):
  """The ``num_layers`` layers with the largest clean-gradient norm, chosen
  from the clean gradient of an earlier step.

  At the end of every step with ``count % select_every == 0`` (step 0
  included) the ``num_layers`` layers with the largest norm of *that
  step's* clean gradient (averaged over ``axis_name``, so every device
  chooses the same) are ranked, and perturbed from the step after next on.
  So step ``t >= 2`` perturbs the ranking of step ``t - 2`` with
  ``select_every = 1``, of the last multiple of ``select_every`` at or
  before ``t - 2`` otherwise: a lag of two steps, which lets a planner know
  the selection one step before the step runs, and read it from the device
  while the step before runs (a read of the state the step just dispatched
  would wait for it). Steps 0 and 1, before any ranking is due, perturb
  every layer. Ties go to the
  layer with the lower index (``lax.top_k`` order); a NaN norm ranks last.

  Without a plan the mask is an array (one boolean per leaf) and the second
  gradient is a full one. With a plan the selection is static: only the
  selected layers are differentiated, like :class:`FixedLayers`, and one
  program is compiled per distinct selection. The planner reads the
  selection from the device once per re-selection.
  """

  num_layers: int = 2
  select_every: int = 1
  group_fn: Optional[GroupFn] = None
  normalize_over_region: bool = False
  clean_outside: bool = True

  def _layers(self, params):
    names, ids = layers_lib.leaf_layers(params, self.group_fn)
    layers_lib.check_num_layers(params, self.group_fn, self.num_layers)
    return names, ids

  def init(self, params):
    self._layers(params)
    return LayerSelection(
        selected=jnp.full((self.num_layers,), -1, jnp.int32),
        refreshes=jnp.zeros((), jnp.int32),
        pending=jnp.full((self.num_layers,), -1, jnp.int32),
        ranked_at=jnp.full((), -1, jnp.int32),
    )

  def reselects_after(self, count):
    """Whether the end of step ``count`` makes a new selection."""
    return count % self.select_every == 0

  def ranked(self, step, state, scores):
    """``state`` re-ranked by ``scores`` (one per layer, largest first; NaN
    last) if this step makes a selection, else as it was."""
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    # Ranked among the layers with entries only (a static subset).
    filled = layers_lib.filled_layers(step.params, self.group_fn)
    if len(filled) == scores.shape[0]:
      _, top = jax.lax.top_k(scores, self.num_layers)
    else:
      _, top = jax.lax.top_k(scores[np.asarray(filled)], self.num_layers)
      top = jnp.asarray(filled, jnp.int32)[top]
    due = self.reselects_after(step.count)
    # The ranking the next step perturbs is the newest before this one.
    return state._replace(
        selected=jnp.where(due, state.pending, state.selected),
        pending=jnp.where(due, top.astype(jnp.int32), state.pending),
        ranked_at=jnp.where(due, step.count, state.ranked_at),
        refreshes=base.saturating_add(state.refreshes, due),
    )

  @staticmethod
  def in_use(state, count):
    """The ranking step ``count`` perturbs (-1: every layer): the newest
    one made at or before step ``count - 2``."""
    return jnp.where(state.ranked_at <= count - 2, state.pending,
                     state.selected)

  def next_state(self, step, state):
    """The state after this step: re-ranked from its clean gradient if due."""
    names, ids = self._layers(step.params)
    return self.ranked(
        step, state, layers_lib.layer_sq_norms(step.grads, ids, len(names))
    )

  def chosen(self, step, state) -> jax.Array:
    """bool ``[layers]``: the layers the selection in ``state`` perturbs
    (every layer before the first ranking)."""
    names, _ = self._layers(step.params)
    sel = self.in_use(state, step.count)
    chosen = jnp.zeros((len(names),), bool).at[jnp.maximum(sel, 0)].set(True)
    return jnp.where(sel[0] < 0, True, chosen)

  def select(self, step, state):
    _, ids = self._layers(step.params)
    chosen = self.chosen(step, state)
    mask = jax.tree.unflatten(
        jax.tree.structure(step.params), [chosen[i] for i in ids]
    )
    return mask, self.next_state(step, state), jnp.zeros((), jnp.int32)

  def prefetch(self, count):
    # The next step perturbs a ranking this one does not: the newest in
    # the state before this step (its `pending`).
    return count >= 1 and (count - 1) % self.select_every == 0

  def plan(self, count, read, memo):
    if count < 2:
      return ()  # every layer
    # The last step, at or before count - 2, that made a ranking.
    made = (count - 2) // self.select_every * self.select_every
    if memo.get("made") != made:
      memo["made"] = made
      before = read(lagged=True)  # the state before step count - 1
      if before is not None:
        selected = before.pending
      else:  # waits for the step dispatched last
        now = read()
        selected = (now.pending if int(now.ranked_at) <= count - 2
                    else now.selected)
      selected = [int(i) for i in np.asarray(selected)]
      # -1: no ranking yet (a selection by sharpness ranks on computed
      # steps only), so every layer, as without a plan.
      memo["selection"] = () if min(selected) < 0 else tuple(sorted(selected))
    return memo["selection"]

  def plan_key(self):
    return protocols.part_key(
        self, num_layers=self.num_layers, select_every=self.select_every,
        group_fn=self.group_fn,
    )

  def check_planned(self, plan):
    """A selection: () (every layer) or ``num_layers`` distinct layer
    indices in increasing order (their range is checked in
    :meth:`select_planned`, where the number of layers is known)."""
    if plan is None:
      return
    ok = isinstance(plan, tuple) and all(
        type(i) is int and i >= 0 for i in plan  # pylint: disable=unidiomatic-typecheck
    )
    ok = ok and len(plan) in (0, self.num_layers)
    ok = ok and all(a < b for a, b in zip(plan, plan[1:]))
    if not ok:
      raise ValueError(
          f"plan.region must be None, () (every layer) or a tuple of "
          f"{self.num_layers} distinct layer indices (Python ints >= 0) in "
          f"increasing order, got {plan!r}"
      )

  def select_planned(self, step, state, plan):
    names, _ = self._layers(step.params)
    if plan and plan[-1] >= len(names):
      raise ValueError(
          f"plan.region selects layer {plan[-1]}, but params have "
          f"{len(names)} layers ({names})"
      )
    mask = static_layer_mask(step.params, self.group_fn, plan)
    return mask, self.next_state(step, state), jnp.zeros((), jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class SharpLayers(TopLayers):
  """The ``num_layers`` layers with the largest sharpness estimate.

  A layer's estimate is ``‖h_l - g_l‖``, the change the perturbation made
  to its gradient (``h`` the second gradient, ``g`` the clean one), from the
  last computed step that perturbed it. Until the first ranking every layer
  is perturbed, so the first computed step estimates them all; after that a
  layer outside the selection keeps its last estimate, and is perturbed
  again once the selected layers' estimates fall below it. Estimates are
  not decayed, and estimates taken with different selections are compared
  as they are: with every layer perturbed ``h_l - g_l`` also holds the
  other layers' share of the curvature, and with ``normalize="selection"``
  a smaller selection gets a larger share of the radius. Re-ranking, its
  two-step lag, planning and ``select_every`` are as in
  :class:`TopLayers`; the ranking is made after the second gradient
  (``observe``), so a step without one (a zero radius) keeps the
  selection. Under ``axis_name`` both gradients are averaged first, so
  every device ranks the same. With ``trainable=`` only the trainable
  layers are ranked.
  """

  def init(self, params):
    names, _ = self._layers(params)
    return super().init(params)._replace(
        sharpness=jnp.zeros((len(names),), jnp.float32)
    )

  def next_state(self, step, state):
    del step
    return state  # the ranking waits for the second gradient

  def observe(self, step, second, state):
    names, ids = self._layers(step.params)
    chosen = self.chosen(step, state)
    # Only the perturbed layers' change, so the overflow-safe scale (and so
    # the result) does not depend on what else was differentiated.
    treedef = jax.tree.structure(step.params)
    change = [  # one entry per leaf, in ids' order
        jnp.where(chosen[i], h.astype(jnp.float32) - g.astype(jnp.float32), 0)
        for i, h, g in zip(ids, treedef.flatten_up_to(second),
                           treedef.flatten_up_to(step.grads))
    ]
    scale = base.tree_scale(change)  # 1e20 gradients still rank
    norms = jnp.sqrt(layers_lib.layer_sq_norms(change, ids, len(names), scale))
    sharpness = jnp.where(chosen, norms / scale, state.sharpness)
    return self.ranked(step, state._replace(sharpness=sharpness), sharpness)


NORMALIZE = ("selection", "global")
SECOND = ("selected", "all")


def _layer_flags(normalize: str, second: str) -> dict:
  """The region flags of layer-wise SAM's two documented choices."""
  base.check_choice("normalize", normalize, NORMALIZE)
  base.check_choice("second", second, SECOND)
  return {
      "normalize_over_region": normalize == "selection",
      "clean_outside": second == "selected",
  }


def fixed_layers(
    layers: LayerSpec,
    *,
    group_fn: Optional[GroupFn] = None,
    normalize: str = "global",
    second: str = "selected",
) -> FixedLayers:
  """A fixed layer region (see :class:`FixedLayers`); paths checked at init.

  ``normalize``: the perturbation norm over the whole gradient ("global",
  the default: SAM's perturbation restricted to the selection) or over the
  selection ("selection", ``‖e‖ = rho``). ``second``: the second gradient is
  used on the selected layers only ("selected"; the others keep the clean
  gradient and are not differentiated) or on every layer ("all": a full
  backward pass).
  """
  layers_lib.check_group_fn(group_fn)
  flags = _layer_flags(normalize, second)
  given = layers
  if isinstance(layers, str):
    layers = (layers,)
  if callable(layers):
    return FixedLayers(layers=layers, group_fn=group_fn, **flags)
  try:
    layers = tuple(layers)
  except TypeError:
    layers = None
  if layers is None or not all(isinstance(p, str) for p in layers):
    raise ValueError(
        "layers must be None, a layer path (str), a sequence of layer paths "
        f"or a predicate on the path; got {given!r}"
        f"{base.inject_hint('layers', given)}"
    )
  if not layers:
    raise ValueError("layers must name at least one layer; got an empty list")
  return FixedLayers(layers=layers, group_fn=group_fn, **flags)


def output_layers(
    num_layers: int = 2,
    *,
    group_fn: Optional[GroupFn] = None,
    normalize: str = "global",
    second: str = "selected",
) -> OutputLayers:
  """The output-side layers (see :class:`OutputLayers`); ``normalize`` and
  ``second`` as in :func:`fixed_layers`."""
  num_layers = base.static_int("num_layers", num_layers, 1)
  layers_lib.check_group_fn(group_fn)
  return OutputLayers(
      num_layers=num_layers, group_fn=group_fn,
      **_layer_flags(normalize, second),
  )


def top_layers(
    num_layers: int = 2,
    *,
    select_every: int = 1,
    group_fn: Optional[GroupFn] = None,
    normalize: str = "global",
    second: str = "selected",
    by: str = "gradient",
) -> TopLayers:
  """A runtime layer selection ranked by clean-gradient norm (``by=
  "gradient"``, :class:`TopLayers`) or by a sharpness estimate (``by=
  "sharpness"``, :class:`SharpLayers`); ``normalize`` and ``second`` as in
  :func:`fixed_layers`."""
  num_layers = base.static_int("num_layers", num_layers, 1)
  select_every = base.static_int("select_every", select_every, 1)
  layers_lib.check_group_fn(group_fn)
  base.check_choice("by", by, ("gradient", "sharpness"))
  cls = SharpLayers if by == "sharpness" else TopLayers
  return cls(
      num_layers=num_layers,
      select_every=select_every,
      group_fn=group_fn,
      **_layer_flags(normalize, second),
  )
