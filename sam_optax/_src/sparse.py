"""Sparse SAM (Mi et al., NeurIPS 2022, arXiv 2210.05177): masks and presets.

A binary mask ``m`` shaped like the params restricts the perturbation; the
output is the full dense gradient at the perturbed point::

    e   = rho * (g / (‖g‖ + eps)) ⊙ m      # normalised by the FULL ‖g‖
    out = ∇L_B(w + e)

The mask keeps exactly ``K = floor(N * (1 - sparsity))`` of the model's ``N``
entries, chosen over the whole model at once. Two regions keep such a mask in
the optimizer state and refresh it inside the compiled step (``lax.cond`` on
the step count, so non-refresh steps pay nothing for it):

* :class:`FisherMask` (SSAM-F): the top-K entries of the empirical Fisher
  diagonal, from per-example gradients of the first ``num_samples`` examples
  of the batch, computed in chunks (bounded memory).
* :class:`DynamicMask` (SSAM-D): a random initial mask, then periodically the
  weakest alive entries (by ``|g|``, ``|w|`` or at random) are dropped and as
  many dead entries are grown (at random, by ``|g|`` or ``|w|``), with a
  cosine-decaying drop rate.

Both are built on :func:`top_k_mask`, an exact global top-k over a pytree:
the K-th largest score is found by 32 counting passes over the float32 bit
patterns (one bit decided per pass), and ties at the threshold are broken by
the lowest flat index (leaves in ``jax.tree.leaves`` order, row-major inside
a leaf). No sort, no scatter, memory O(N).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import combine as combine_lib
from sam_optax._src import engine
from sam_optax._src import gate as gate_lib
from sam_optax._src import geometry as geometry_lib
from sam_optax._src import region as region_lib

PyTree = Any

CRITERIA = ("gradient", "weight", "random")


# --------------------------------------------------------------------------
# Counting.
# --------------------------------------------------------------------------


def num_kept(num_params: int, sparsity: float) -> int:
  """``floor(num_params * (1 - sparsity))``, computed exactly.

  ``sparsity`` is read as the shortest decimal that prints as the float
  (``0.29`` is 29/100), so ``num_kept(100, 0.29) == 71`` although
  ``100 * (1 - 0.29)`` is ``70.99999999999999`` in floating point.
  """
  s = fractions.Fraction(repr(float(sparsity)))
  return math.floor(num_params * (1 - s))


def num_params(tree: PyTree) -> int:
  """Number of entries over all leaves."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Exact global top-k.
# --------------------------------------------------------------------------


def _order_key(x: jax.Array) -> jax.Array:
  """uint32 keys whose unsigned order is the float order of ``x``.

  NaN counts as -inf; -0.0 and +0.0 are the same key (a tie).
  """
  x = x.astype(jnp.float32)
  x = jnp.where(jnp.isnan(x), -jnp.inf, x)
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  negative = (b >> 31) == 1
  return jnp.where(negative, ~b, b | jnp.uint32(0x80000000))


def _block_size(n: int) -> int:
  """A power of two near sqrt(n): rows of the (n / B, B) view of the scores."""
  return 1 << max(0, math.ceil(math.log2(max(n, 1)) / 2))


def top_k_mask(
    scores: PyTree,
    k: Any,
    *,
    eligible: Optional[PyTree] = None,
) -> PyTree:
  """A boolean pytree with True at the ``k`` largest scores over all leaves.

  Exactly ``k`` entries are True (``k`` may be a traced integer; it must not
  exceed the number of eligible entries). Among equal scores at the threshold
  the lowest flat index wins: leaves in ``jax.tree.leaves`` order, row-major
  inside a leaf. NaN scores rank lowest.

  How (no sort, no scatter, O(N) memory, a fixed number of XLA ops whatever
  the number of leaves):

  1. Every score becomes a uint32 key with the same order (the float32 bit
     pattern, sign-adjusted); the keys of all leaves are concatenated once.
  2. The k-th largest key ``t`` is built one bit at a time from the top: a
     bit is set when at least ``k`` keys are ``>=`` the candidate. That is 32
     counting passes (a compare and a sum each).
  3. All keys above ``t`` are kept, plus the first ``k - #(keys > t)`` keys
     equal to ``t`` in flat order: the tie counts per block of ``B ~ sqrt(N)``
     entries (one pass), a prefix sum over the blocks, and a prefix sum inside
     the one block where the cut falls give the index bound.

  Measured for 25M float32 scores in 160 leaves on the (shared, loaded)
  2-core CPU of this project: see the Sparse SAM note in the README (about
  1 s, against about 20 s for ``jnp.sort`` of the concatenated scores). On
  an accelerator the passes are bandwidth-bound: 34 reads of 4 bytes per
  entry, about 2 ms for 25M entries at 2 TB/s.

  Args:
    scores: a pytree of float arrays.
    k: how many entries to keep (Python or traced int).
    eligible: optional pytree of booleans like ``scores``; only these entries
      can be selected.

  Returns:
    A pytree of boolean arrays with the structure and shapes of ``scores``.
  """
  leaves, treedef = jax.tree.flatten(scores)
  if not leaves:
    return scores
  shapes = [jnp.shape(x) for x in leaves]
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  n = sum(sizes)
  blk = _block_size(n)
  rows = -(-n // blk)
  pad = rows * blk - n
  # One concatenation, then the key computation once on the flat array (the
  # op count, hence compile time, hardly grows with the number of leaves).
  flat_scores = jnp.concatenate(
      [jnp.ravel(x).astype(jnp.float32) for x in leaves]
      + [jnp.zeros((pad,), jnp.float32)]
  )
  keys = _order_key(flat_scores)
  valid = jax.lax.broadcasted_iota(jnp.int32, (rows * blk,), 0) < n
  if eligible is not None:
    ok = treedef.flatten_up_to(eligible)
    valid = valid & jnp.concatenate(
        [jnp.ravel(jnp.broadcast_to(jnp.asarray(o, bool), s))
         for o, s in zip(ok, shapes)]
        + [jnp.zeros((pad,), bool)]
    )
  # Ineligible entries and padding get key 0: never selected.
  keys = jnp.where(valid, keys, jnp.uint32(0)).reshape(rows, blk)
  k = jnp.asarray(k, jnp.int32)

  def decide_bit(i, t):
    cand = t | (jnp.uint32(1) << (jnp.uint32(31) - i.astype(jnp.uint32)))
    return jnp.where(jnp.sum(keys >= cand, dtype=jnp.int32) >= k, cand, t)

  # Eligible entries have a key >= 0x007FFFFF (the key of -inf), so from 0
  # up only eligible ones count.
  t = jax.lax.fori_loop(0, 32, decide_bit, jnp.uint32(0))
  ties_wanted = k - jnp.sum(keys > t, dtype=jnp.int32)  # >= 1 when k >= 1
  tie = (keys == t) & (keys > 0)
  per_row = jnp.cumsum(jnp.sum(tie, axis=1, dtype=jnp.int32))
  row = jnp.sum(per_row < ties_wanted, dtype=jnp.int32)
  row = jnp.minimum(row, rows - 1)
  before = jnp.where(row > 0, per_row[jnp.maximum(row - 1, 0)], 0)
  in_row = jnp.cumsum(
      jax.lax.dynamic_index_in_dim(tie, row, 0, keepdims=False),
      dtype=jnp.int32,
  )
  col = jnp.sum(in_row < ties_wanted - before, dtype=jnp.int32)
  bound = row * blk + col  # ties with flat index <= bound are kept
  index = jax.lax.broadcasted_iota(jnp.int32, (rows, blk), 0) * blk + (
      jax.lax.broadcasted_iota(jnp.int32, (rows, blk), 1)
  )
  chosen = ((keys > t) | (tie & (index <= bound))) & (k > 0)
  flat = chosen.reshape(-1)
  out, offset = [], 0
  for shape, size in zip(shapes, sizes):
    out.append(flat[offset:offset + size].reshape(shape))
    offset += size
  return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------
# Fisher scores from per-example gradients.
# --------------------------------------------------------------------------


def _expand_axes(batch_axes: Any, batch: Any) -> PyTree:
  """``batch_axes`` (0/None, a prefix of ``batch``) broadcast to every leaf."""
  try:
    return jax.tree.map(
        lambda ax, sub: jax.tree.map(lambda _: ax, sub),
        batch_axes,
        batch,
        is_leaf=lambda x: x is None,
    )
  except ValueError as err:
    raise ValueError(
        "batch_axes must be 0, None, or a prefix of the batch's structure "
        f"with 0/None leaves: {err}"
    ) from None


def fisher_scores(
    loss: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    num_samples: int,
    *,
    chunk_size: int = 8,
    batch_axes: Any = 0,
) -> PyTree:
  """Empirical Fisher diagonal ``F = Σ_{i<num_samples} (∇ℓ_i(w))²``, float32.

  Example ``i`` is the batch with every leaf whose axis is 0 sliced to
  ``[i:i+1]`` (leaves whose ``batch_axes`` entry is None, such as model state
  or a PRNG key, are passed whole). Per-example gradients are computed
  ``chunk_size`` at a time (``vmap`` inside a ``fori_loop`` that accumulates
  the squares), so at most ``chunk_size`` gradient copies exist at once.

  Args:
    loss: ``loss(params, batch) -> scalar``.
    params: where the gradients are taken.
    batch: the batch; the first ``num_samples`` examples are used.
    num_samples: how many examples (static, at most the batch size).
    chunk_size: per-example gradients computed together.
    batch_axes: 0 (every leaf is batched on its leading axis), None, or a
      prefix pytree of the batch with 0/None per leaf.
  """
  axes = _expand_axes(batch_axes, batch)
  leaves, treedef = jax.tree.flatten(batch)
  ax_leaves = treedef.flatten_up_to(axes)
  for x, ax in zip(leaves, ax_leaves):
    if ax not in (0, None):
      raise ValueError(f"batch_axes entries must be 0 or None, got {ax!r}")
  sizes = {int(np.shape(x)[0]) for x, ax in zip(leaves, ax_leaves)
           if ax == 0 and np.ndim(x) > 0}
  if any(ax == 0 and np.ndim(x) == 0 for x, ax in zip(leaves, ax_leaves)):
    raise ValueError(
        "a batch leaf marked as batched (batch_axes 0) is a scalar; mark it "
        "None in batch_axes"
    )
  if not sizes:
    raise ValueError(
        "per-example gradients need at least one batched leaf in the batch "
        "(batch_axes 0)"
    )
  if len(sizes) > 1:
    raise ValueError(
        f"batched leaves of the batch disagree on the batch size: {sorted(sizes)}"
    )
  batch_size = sizes.pop()
  if num_samples > batch_size:
    raise ValueError(
        f"num_samples must be in [1, batch size = {batch_size}], got "
        f"{num_samples}"
    )
  chunk = min(chunk_size, num_samples)

  def example_grad(*example_leaves):
    ex = [
        x[None] if ax == 0 else x for x, ax in zip(example_leaves, ax_leaves)
    ]
    return jax.grad(loss)(params, jax.tree.unflatten(treedef, ex))

  in_axes = tuple(ax_leaves)

  def sq_sum(start, size):
    part = [
        jax.lax.dynamic_slice_in_dim(x, start, size, 0) if ax == 0 else x
        for x, ax in zip(leaves, ax_leaves)
    ]
    g = jax.vmap(example_grad, in_axes=in_axes)(*part)
    return jax.tree.map(
        lambda y: jnp.sum(jnp.square(y.astype(jnp.float32)), axis=0), g
    )

  acc = base.zeros_like_f32(params)
  full, rest = divmod(num_samples, chunk)
  if full == 1:
    acc = sq_sum(0, chunk)
  elif full > 1:
    acc = jax.lax.fori_loop(
        0,
        full,
        lambda i, a: jax.tree.map(jnp.add, a, sq_sum(i * chunk, chunk)),
        acc,
    )
  if rest:
    acc = jax.tree.map(jnp.add, acc, sq_sum(full * chunk, rest))
  return acc


# --------------------------------------------------------------------------
# Regions.
# --------------------------------------------------------------------------


class DynamicMaskState(NamedTuple):
  """SSAM-D mask, refresh count and the PRNG key (raw uint32 key data)."""

  mask: Any
  refreshes: jax.Array
  key: jax.Array

  def stats(self):
    return {
        "mask_density": region_lib.mask_density(self.mask),
        "mask_refreshes": self.refreshes,
    }


def _full_mask(params, value: bool) -> PyTree:
  return jax.tree.map(lambda p: jnp.full(jnp.shape(p), value, bool), params)


@dataclasses.dataclass(frozen=True, eq=False)
class FisherMask(engine.Region):
  """SSAM-F region: top-K of the empirical Fisher, refreshed on a schedule.

  On every step with ``count % update_every == 0`` (step 0 included), before
  the perturbation, ``F = fisher_scores(...)`` is summed over ``axis_name``
  (so every device holds the same mask) and the mask becomes the top
  ``K = floor(N * (1 - sparsity))`` entries of ``F`` (:func:`top_k_mask`).
  Other steps reuse the stored mask. A refresh costs ``num_samples``
  gradient evaluations (per-example gradients count one each; under
  ``pmap`` each device spends ``num_samples``). ``sparsity = 0`` yields no
  mask (plain SAM, no Fisher work); ``sparsity = 1`` an empty one.
  State: :class:`region.MaskState` (its ``stats()`` gives ``mask_density``
  and ``mask_refreshes``); the mask is all False before the first update.
  """

  sparsity: float = 0.5
  num_samples: int = 16
  update_every: int = 1
  chunk_size: int = 8
  batch_axes: Any = 0

  def init(self, params):
    return region_lib.MaskState(
        mask=_full_mask(params, self.sparsity == 0.0),
        refreshes=jnp.zeros((), jnp.int32),
    )

  def select(self, step, state):
    n = num_params(step.params)
    k = num_kept(n, self.sparsity)
    zero = jnp.zeros((), jnp.int32)
    if k == n:  # sparsity 0: no mask at all, exactly SAM
      return None, state, zero
    if k == 0:  # sparsity 1 (or a model too small to keep one entry)
      return state.mask, state, zero
    refresh = step.count % self.update_every == 0

    def compute(_):
      f = fisher_scores(
          step.loss,
          step.params,
          step.batch,
          self.num_samples,
          chunk_size=self.chunk_size,
          batch_axes=self.batch_axes,
      )
      f = base.psum(f, step.axis_name)
      return top_k_mask(f, k)

    mask = jax.lax.cond(refresh, compute, lambda _: state.mask, None)
    new_state = region_lib.MaskState(
        mask=mask, refreshes=state.refreshes + refresh.astype(jnp.int32)
    )
    evals = jnp.where(refresh, jnp.int32(self.num_samples), zero)
    return mask, new_state, evals


def cosine_drop_rate(
    count: jax.Array, drop_rate: float, total_steps: int
) -> jax.Array:
  """``drop_rate * (1 + cos(pi * min(count / total_steps, 1))) / 2`` (float32).

  Past ``total_steps`` the rate stays 0 (the authors' schedule ends there).
  """
  frac = jnp.clip(
      jnp.asarray(count, jnp.float32) / jnp.float32(total_steps), 0.0, 1.0
  )
  return jnp.float32(drop_rate) * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0


def dynamic_counts(
    dr: jax.Array, n: int, k: int, sparsity: float, exact_count: bool
) -> tuple[jax.Array, jax.Array]:
  """(entries kept, entries grown) at drop rate ``dr`` (int32 scalars).

  ``exact_count=True`` [ours]: ``grow = min(K - floor(K (1 - dr)), N - K)``
  and ``keep = K - grow``, so the mask always holds exactly ``K`` entries
  (``keep`` is the paper's ``floor(K (1 - dr))`` whenever enough dead entries
  exist to regrow). ``exact_count=False`` follows the authors' code:
  ``keep = floor(K (1 - dr))``, ``grow = floor(min(K dr, N s))``, which can
  lose one entry per refresh to rounding (more when ``K dr > N s``).
  The products are taken in float32 (``dr`` is a float32 array), so one that
  is an integer in exact arithmetic may round to either side of it.
  """
  kf = jnp.float32(k)
  keep = jnp.floor(kf * (1.0 - dr)).astype(jnp.int32)
  if exact_count:
    grow = jnp.minimum(jnp.int32(k) - keep, jnp.int32(n - k))
    return jnp.int32(k) - grow, grow
  grow = jnp.floor(
      jnp.minimum(kf * dr, jnp.float32(n) * jnp.float32(sparsity))
  ).astype(jnp.int32)
  return keep, grow


@dataclasses.dataclass(frozen=True)
class DynamicMask(engine.Region):
  """SSAM-D region: random initial mask, periodic drop and grow.

  ``init`` draws a mask with exactly ``K = floor(N (1 - sparsity))`` entries
  (top-K of uniform scores from ``seed``). On every step with ``count > 0``
  and ``count % update_every == 0``, before the perturbation::

      dr    = drop_rate * (1 + cos(pi * count / total_steps)) / 2
      keep  = the `keep` alive entries with the largest drop score
      grow  = the `grow` dead entries with the largest grow score
      mask  = keep ∪ grow

  with the counts of :func:`dynamic_counts` and scores ``|g|``
  ("gradient": the clean gradient averaged over ``axis_name``), ``|w|``
  ("weight") or uniform noise ("random", from the key in state, identical
  on every device). Ties go to the lowest flat index. State:
  :class:`DynamicMaskState`. ``sparsity = 0`` yields no mask (plain SAM).
  """

  sparsity: float = 0.5
  drop_rate: float = 0.5
  update_every: int = 1
  total_steps: int = 1
  drop_criterion: str = "gradient"
  grow_criterion: str = "random"
  seed: int = 0
  exact_count: bool = True

  def init(self, params):
    n = num_params(params)
    k = num_kept(n, self.sparsity)
    if k in (0, n):
      init_key, key = jax.random.split(jax.random.key(self.seed))
      return DynamicMaskState(
          mask=_full_mask(params, k == n),
          refreshes=jnp.zeros((), jnp.int32),
          key=jax.random.key_data(key),
      )
    return _random_mask_state(
        jnp.asarray(self.seed, jnp.uint32), params, jnp.int32(k)
    )

  def _scores(self, criterion, step, key):
    if criterion == "gradient":
      return jax.tree.map(lambda g: jnp.abs(g.astype(jnp.float32)), step.grads)
    if criterion == "weight":
      return jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)), step.params)
    return _uniform_like(key, step.params)

  def select(self, step, state):
    n = num_params(step.params)
    k = num_kept(n, self.sparsity)
    zero = jnp.zeros((), jnp.int32)
    if k == n:
      return None, state, zero
    if k == 0:
      return state.mask, state, zero
    refresh = (step.count % self.update_every == 0) & (step.count > 0)

    def compute(_):
      key = jax.random.wrap_key_data(state.key)
      key, drop_key, grow_key = jax.random.split(key, 3)
      dr = cosine_drop_rate(step.count, self.drop_rate, self.total_steps)
      n_keep, n_grow = dynamic_counts(
          dr, n, k, self.sparsity, self.exact_count
      )
      alive = state.mask
      dead = jax.tree.map(jnp.logical_not, alive)
      keep = top_k_mask(
          self._scores(self.drop_criterion, step, drop_key),
          n_keep,
          eligible=alive,
      )
      grow = top_k_mask(
          self._scores(self.grow_criterion, step, grow_key),
          n_grow,
          eligible=dead,
      )
      mask = jax.tree.map(jnp.logical_or, keep, grow)
      return mask, jax.random.key_data(key)

    mask, key = jax.lax.cond(
        refresh, compute, lambda _: (state.mask, state.key), None
    )
    new_state = DynamicMaskState(
        mask=mask,
        refreshes=state.refreshes + refresh.astype(jnp.int32),
        key=key,
    )
    return mask, new_state, zero


@jax.jit
def _random_mask_state(seed, params, k) -> DynamicMaskState:
  """SSAM-D's initial state: top-k of uniform noise, and the next key.

  Compiled once per parameter structure (seed and k are traced).
  """
  init_key, key = jax.random.split(jax.random.key(seed))
  return DynamicMaskState(
      mask=top_k_mask(_uniform_like(init_key, params), k),
      refreshes=jnp.zeros((), jnp.int32),
      key=jax.random.key_data(key),
  )


def _uniform_like(key, params) -> PyTree:
  """Uniform [0, 1) float32 noise shaped like ``params``, one key per leaf."""
  leaves, treedef = jax.tree.flatten(params)
  out = [
      jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x), jnp.float32)
      for i, x in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------
# Checked constructors (parts) and presets.
# --------------------------------------------------------------------------


def _static_float(name: str, value: Any, low: float, high: float) -> float:
  """A concrete float in [low, high] (schedules/traced values are refused)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a concrete number in [{low:g}, {high:g}] (it fixes "
        "the mask size at trace time; with optax.inject_hyperparams list it "
        f"in static_args), got {value!r}"
    )
  base.check_range(name, value, low, high)
  return float(np.asarray(value))


def _static_int(name: str, value: Any, low: int) -> int:
  if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(
      value, jax.core.Tracer
  ) and np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype,
                                              np.integer):
    value = int(value)
  return base.check_int(name, value, low)


def fisher_mask(
    sparsity: float = 0.5,
    *,
    num_samples: int = 16,
    update_every: int,
    chunk_size: int = 8,
    batch_axes: Any = 0,
) -> FisherMask:
  """A checked :class:`FisherMask` (SSAM-F's region)."""
  sparsity = _static_float("sparsity", sparsity, 0.0, 1.0)
  num_samples = _static_int("num_samples", num_samples, 1)
  update_every = _static_int("update_every", update_every, 1)
  chunk_size = _static_int("chunk_size", chunk_size, 1)
  for ax in jax.tree.leaves(batch_axes, is_leaf=lambda x: x is None):
    if ax not in (0, None):
      raise ValueError(f"batch_axes leaves must be 0 or None, got {ax!r}")
  return FisherMask(
      sparsity=sparsity,
      num_samples=num_samples,
      update_every=update_every,
      chunk_size=chunk_size,
      batch_axes=batch_axes,
  )


def dynamic_mask(
    sparsity: float = 0.5,
    *,
    drop_rate: float = 0.5,
    update_every: int,
    total_steps: int,
    drop_criterion: str = "gradient",
    grow_criterion: str = "random",
    seed: int = 0,
    exact_count: bool = True,
) -> DynamicMask:
  """A checked :class:`DynamicMask` (SSAM-D's region)."""
  sparsity = _static_float("sparsity", sparsity, 0.0, 1.0)
  drop_rate = _static_float("drop_rate", drop_rate, 0.0, 1.0)
  update_every = _static_int("update_every", update_every, 1)
  total_steps = _static_int("total_steps", total_steps, 1)
  base.check_choice("drop_criterion", drop_criterion, CRITERIA)
  base.check_choice("grow_criterion", grow_criterion, CRITERIA)
  seed = _static_int("seed", seed, None)
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


def _ssam_engine(loss_fn, rho, region, skip, has_aux, axis_name, eps):
  return engine.sharpness_aware(
      loss_fn,
      rho,
      geometry=geometry_lib.global_norm(),
      region=region,
      gate=gate_lib.never() if skip else None,
      combine=combine_lib.replace(),
      has_aux=has_aux,
      axis_name=axis_name,
      eps=eps,
  )


def ssam_fisher(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.05,
    sparsity: float = 0.5,
    *,
    num_samples: int = 16,
    update_every: int,
    chunk_size: int = 8,
    batch_axes: Any = 0,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Sparse SAM with a Fisher mask, SSAM-F (Mi et al., NeurIPS 2022,
  arXiv 2210.05177).

  Only the entries with the largest empirical Fisher information are
  perturbed; the update is the dense gradient at the perturbed point::

      F   = Σ_{i=1..num_samples} (∇ℓ_i(w))²        # on refresh steps
      m   = top floor(N (1 - sparsity)) entries of F, over the whole model
      e   = rho * (g / (‖g‖ + eps)) ⊙ m            # full ‖g‖: ‖e‖ <= rho
      out = ∇L_B(w + e)

  The mask is refreshed inside the compiled step (``lax.cond``) on steps with
  ``count % update_every == 0``, step 0 included, before perturbing; the
  authors refresh once per epoch, so pass the number of steps per epoch.
  [ours] The examples are the first ``num_samples`` of the current batch
  (the authors draw them from a separate shuffled loader; both estimate the
  same empirical Fisher). Per-example gradients are taken ``chunk_size`` at a
  time (at most that many gradient copies in memory). Exact count: ties at the
  threshold go to the lowest flat index (see :func:`top_k_mask`).

  Cost: one second gradient per step, plus ``num_samples`` per-example
  gradients on a refresh step (counted in ``grad_evals``, one each).
  ``sparsity=0`` is SAM exactly (no Fisher work); ``sparsity=1`` returns
  ``g`` and evaluates nothing. ``stats()`` reports ``mask_density`` and
  ``mask_refreshes``.

  Args:
    loss_fn: ``loss_fn(params, batch)``; for the Fisher it is called on
      one-example batches (leading axis of size 1).
    rho: radius, float or schedule; default 0.05 (the authors' CIFAR value).
    sparsity: share of entries NOT perturbed, in [0, 1]; default 0.5. A
      static float (it fixes the mask size).
    num_samples: examples for the Fisher, >= 1 and at most the batch size
      (checked when the step is traced); default 16 (the authors' CIFAR-10
      run; 128 on ImageNet).
    update_every: refresh period in steps, >= 1 (required).
    chunk_size: per-example gradients computed together, >= 1; default 8.
    batch_axes: 0 when every batch leaf is batched on its leading axis
      (default); otherwise a prefix pytree of the batch with 0 (sliced) or
      None (passed whole: model state, a PRNG key) per leaf.
    has_aux, axis_name, eps: as in :func:`sam`. Under ``axis_name`` each
      device uses its own first ``num_samples`` examples and the Fisher is
      summed over devices before the top-k, so all masks are identical.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.mean((b[:, :3] @ w - b[:, 3]) ** 2)
    >>> tx = optax.chain(
    ...     sam_optax.ssam_fisher(loss_fn, 0.05, 0.5, num_samples=4,
    ...                           update_every=10),
    ...     optax.sgd(0.1))
    >>> w = jnp.ones(3); batch = jnp.arange(32.0).reshape(8, 4) / 32
    >>> state = tx.init(w)
    >>> g = jax.grad(loss_fn)(w, batch)
    >>> u, state = tx.update(g, state, w, batch=batch)
    >>> s = sam_optax.stats(state)
    >>> int(s["grad_evals"]), int(s["mask_refreshes"]), float(s["mask_density"])
    (5, 1, 0.3333333432674408)
  """
  region = fisher_mask(
      sparsity,
      num_samples=num_samples,
      update_every=update_every,
      chunk_size=chunk_size,
      batch_axes=batch_axes,
  )
  return _ssam_engine(
      loss_fn, rho, region, region.sparsity == 1.0, has_aux, axis_name, eps
  )


def ssam_dynamic(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.05,
    sparsity: float = 0.5,
    *,
    drop_rate: float = 0.5,
    update_every: int,
    total_steps: int,
    drop_criterion: str = "gradient",
    grow_criterion: str = "random",
    seed: int = 0,
    exact_count: bool = True,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Sparse SAM with a dynamic mask, SSAM-D (Mi et al., NeurIPS 2022,
  arXiv 2210.05177).

  A random mask with exactly ``K = floor(N (1 - sparsity))`` entries evolves
  by drop and grow, as in dynamic sparse training::

      on steps count > 0 with count % update_every == 0, before perturbing:
      dr    = drop_rate * (1 + cos(pi * count / total_steps)) / 2
      keep  = the floor(K (1 - dr)) alive entries with the largest |g|
      grow  = K - keep dead entries chosen at random
      m     = keep ∪ grow
      e     = rho * (g / (‖g‖ + eps)) ⊙ m
      out   = ∇L_B(w + e)

  Defaults from the authors' code: ``drop_rate=0.5``, drop by ``|g|``
  (``drop_criterion="gradient"``), grow at random (``grow_criterion=
  "random"``); "gradient", "weight" and "random" are accepted for both
  (largest ``|g|``, largest ``|w|``, uniform noise). [ours]
  ``exact_count=True`` regrows as many entries as were dropped so the mask
  keeps exactly K entries (when fewer than ``K - keep`` dead entries exist,
  all of them grow and ``keep`` rises to match); ``exact_count=False`` uses
  the authors' counts ``grow = floor(min(K dr, N sparsity))``, which can lose
  entries to rounding. [ours] The cosine stops at 0 after ``total_steps``;
  the refreshed mask applies to the refresh step itself (the authors' code
  applies it from the next step). The random key lives in the state (from
  ``seed``), identical on every device; ``|g|`` is the gradient averaged over
  ``axis_name``, so all devices hold the same mask. Ties go to the lowest flat
  index.

  Cost: one second gradient per step; a refresh costs two top-k selections
  (no gradient evaluations). ``sparsity=0`` is SAM exactly; ``sparsity=1``
  returns ``g`` and evaluates nothing. ``stats()`` reports ``mask_density``
  and ``mask_refreshes``.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    rho: radius, float or schedule; default 0.05.
    sparsity: share of entries NOT perturbed, static float in [0, 1].
    drop_rate: initial drop rate in [0, 1]; default 0.5.
    update_every: refresh period in steps, >= 1 (required; the authors
      refresh once per epoch).
    total_steps: length of the cosine decay in steps, >= 1 (required).
    drop_criterion, grow_criterion: "gradient", "weight" or "random".
    seed: integer seed of the initial mask and the random choices.
    exact_count: keep exactly K entries (default) or follow the authors'
      rounding.
    has_aux, axis_name, eps: as in :func:`sam`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    >>> tx = optax.chain(
    ...     sam_optax.ssam_dynamic(loss_fn, 0.05, 0.5, update_every=2,
    ...                            total_steps=100, seed=0),
    ...     optax.sgd(0.1))
    >>> w = jnp.ones(10); state = tx.init(w)
    >>> float(sam_optax.stats(state)["mask_density"])
    0.5
  """
  region = dynamic_mask(
      sparsity,
      drop_rate=drop_rate,
      update_every=update_every,
      total_steps=total_steps,
      drop_criterion=drop_criterion,
      grow_criterion=grow_criterion,
      seed=seed,
      exact_count=exact_count,
  )
  return _ssam_engine(
      loss_fn, rho, region, region.sparsity == 1.0, has_aux, axis_name, eps
  )


def ssam(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.05,
    *,
    mask: PyTree,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Sparse SAM with a fixed, user-given mask (Mi et al., arXiv 2210.05177).

  ::

      e   = rho * (g / (‖g‖ + eps)) ⊙ mask
      out = ∇L_B(w + e)                 # dense: every leaf's gradient at w + e

  ``mask`` has the structure of the params; each leaf is a boolean array of
  the parameter's shape, or a single bool for the whole tensor. A mismatch
  fails at ``init`` with the paths that differ. A mask known at construction
  to hold no True at all returns ``g`` with no second gradient. Use it to
  freeze a mask found earlier, e.g. ``sam_optax.stats(state)`` of a
  :func:`ssam_fisher` run, or the mask from its state.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    rho: radius, float or schedule; default 0.05.
    mask: pytree of bools shaped like the params (keyword-only, required).
    has_aux, axis_name, eps: as in :func:`sam`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    >>> mask = {"a": jnp.array([True, False, True]), "b": False}
    >>> tx = sam_optax.ssam(lambda w, x: jnp.sum(w["a"] ** 2) * x, mask=mask)
    >>> float(sam_optax.stats(tx.init(params))["mask_density"])
    0.4000000059604645
  """
  region = region_lib.fixed_mask(mask)
  # Always an element-wise (array) mask: a leaf outside it still receives
  # its gradient at the perturbed point (the dense output of Sparse SAM).
  arrays = jax.tree.map(lambda m: np.asarray(m, bool), mask)
  region = region_lib.FixedMask(mask=arrays)
  concrete = all(
      not isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(mask)
  )
  skip = concrete and not any(np.any(m) for m in jax.tree.leaves(arrays))
  return _ssam_engine(loss_fn, rho, region, skip, has_aux, axis_name, eps)
