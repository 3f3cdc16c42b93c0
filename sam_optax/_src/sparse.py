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
import numbers
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
    axis_name: Optional[str] = None,
) -> PyTree:
  """Empirical Fisher diagonal ``F = Σ_{i<num_samples} (∇ℓ_i(w))²``, float32.

  Example ``i`` is the batch with every leaf whose axis is 0 sliced to
  ``[i:i+1]`` (leaves whose ``batch_axes`` entry is None, such as model state
  or a PRNG key, are passed whole). Per-example gradients are computed
  ``chunk_size`` at a time (``vmap`` inside a ``fori_loop`` that accumulates
  the squares), so at most ``chunk_size`` gradient copies exist at once.

  Under ``axis_name`` the examples are the first ``num_samples`` of the
  GLOBAL batch, taken to be split contiguously over the axis (device ``d``
  holds examples ``[d*b, (d+1)*b)``, as with ``pmap`` over a reshaped batch
  or ``shard_map`` with ``P(axis)``): each device computes ``min(num_samples,
  b)`` per-example gradients of its own examples and weights by 0 those past
  ``num_samples``. The result is this device's part; ``psum`` it over the
  axis for the Fisher of the single-device run.

  Args:
    loss: ``loss(params, batch) -> scalar``.
    params: where the gradients are taken.
    batch: the batch; the first ``num_samples`` examples are used.
    num_samples: how many examples (static, at most the (global) batch size).
    chunk_size: per-example gradients computed together.
    batch_axes: 0 (every leaf is batched on its leading axis), None, or a
      prefix pytree of the batch with 0/None per leaf.
    axis_name: the ``pmap``/``shard_map`` axis the batch is split over.
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
    paths = base.leaf_paths(batch)
    found = {
        path: int(np.shape(x)[0])
        for path, x, ax in zip(paths, leaves, ax_leaves)
        if ax == 0 and np.ndim(x) > 0
    }
    raise ValueError(
        "per-example gradients slice every batch leaf marked 0 in batch_axes "
        f"on its leading axis, but their sizes differ: {found}; mark the "
        "leaves that are not per example (model state, a PRNG key) None in "
        "batch_axes, e.g. batch_axes={'x': 0, 'y': 0, 'state': None}"
    )
  local = sizes.pop()
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  if num_samples > local * devices:
    where = "" if devices == 1 else f" = {devices} devices x {local}"
    raise ValueError(
        f"num_samples must be in [1, batch size{where} = {local * devices}], "
        f"got {num_samples}"
    )
  per_device = min(num_samples, local)
  chunk = min(chunk_size, per_device)
  first = (
      jnp.int32(0)
      if axis_name is None
      else jax.lax.axis_index(axis_name).astype(jnp.int32) * local
  )

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
    if axis_name is None:
      return jax.tree.map(
          lambda y: jnp.sum(jnp.square(y.astype(jnp.float32)), axis=0), g
      )
    # Global index of each example; those past num_samples weigh 0.
    weight = (first + start + jnp.arange(size) < num_samples).astype(
        jnp.float32
    )
    return jax.tree.map(
        lambda y: jnp.tensordot(weight, jnp.square(y.astype(jnp.float32)), 1),
        g,
    )

  acc = base.zeros_like_f32(params)
  full, rest = divmod(per_device, chunk)
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


def keep_count(sparsity: Any, n: int, count: Any) -> Any:
  """K for ``n`` entries at step ``count``: a Python int or an int32 array."""
  s = static_sparsity(sparsity)
  if s is not None:
    return num_kept(n, s)
  st = jnp.clip(base.resolve(sparsity, count), 0.0, 1.0)
  k = jnp.floor(jnp.float32(n) * (1.0 - st)).astype(jnp.int32)
  return jnp.clip(k, 0, n)


@dataclasses.dataclass(frozen=True, eq=False)
class FisherMask(engine.Region):
  """SSAM-F region: top-K of the empirical Fisher, refreshed on a schedule.

  On every step with ``count % update_every == 0`` (step 0 included), before
  the perturbation, ``F = fisher_scores(...)`` (the first ``num_samples``
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
    return region_lib.MaskState(
        mask=_full_mask(params, static_sparsity(self.sparsity) == 0.0),
        refreshes=jnp.zeros((), jnp.int32),
    )

  def select(self, step, state):
    n = num_params(step.params)
    k = keep_count(self.sparsity, n, step.count)
    zero = jnp.zeros((), jnp.int32)
    if isinstance(k, int) and k == n:  # sparsity 0: no mask, exactly SAM
      return None, state, zero
    if isinstance(k, int) and k == 0:  # sparsity 1 (or a too small model)
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
          axis_name=step.axis_name,
      )
      return top_k_mask(base.psum(f, step.axis_name), k)

    mask = jax.lax.cond(refresh, compute, lambda _: state.mask, None)
    new_state = region_lib.MaskState(
        mask=mask, refreshes=state.refreshes + refresh.astype(jnp.int32)
    )
    evals = jnp.where(refresh, jnp.int32(self.num_samples), zero)
    return mask, new_state, evals


def cosine_drop_rate(count: Any, drop_rate: Any, total_steps: int) -> jax.Array:
  """``drop_rate * (1 + cos(pi * min(count / total_steps, 1))) / 2`` (float32).

  Past ``total_steps`` the rate stays 0 (the authors' schedule ends there).
  """
  frac = jnp.clip(
      jnp.asarray(count, jnp.float32) / jnp.float32(total_steps), 0.0, 1.0
  )
  return jnp.asarray(drop_rate, jnp.float32) * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0


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
    n = num_params(params)
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

  def select(self, step, state):
    n = num_params(step.params)
    k = keep_count(self.sparsity, n, step.count)
    zero = jnp.zeros((), jnp.int32)
    if isinstance(k, int) and k == n:
      return None, state, zero
    if isinstance(k, int) and k == 0:
      return state.mask, state, zero
    refresh = (step.count % self.update_every == 0) & (step.count > 0)

    def compute(_):
      key = jax.random.wrap_key_data(state.key)
      key, drop_key, grow_key = jax.random.split(key, 3)
      dr = cosine_drop_rate(step.count, self.drop_rate, self.total_steps)
      alive = state.mask
      n_alive = sum(
          jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(alive)
      )
      s_t = (
          base.resolve(self.sparsity, step.count)
          if callable(self.sparsity)
          else self.sparsity
      )
      n_keep, n_grow = dynamic_counts(
          dr, n, k, n_alive, s_t, self.exact_count
      )
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
  for ax in jax.tree.leaves(batch_axes, is_leaf=lambda x: x is None):
    if ax not in (0, None) or isinstance(ax, bool):
      raise ValueError(f"batch_axes leaves must be 0 or None, got {ax!r}")
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
  seed = base.static_int("seed", seed, None)
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
    sparsity: base.ScalarOrSchedule = 0.5,
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
      plain number fixes ``K`` exactly at trace time (and 0 / 1 take the
      shortcuts above); an array (``optax.inject_hyperparams``) or a schedule
      of the step count is read at each refresh, with ``K`` in float32.
    num_samples: examples for the Fisher, >= 1 and at most the batch size
      (checked when the step is traced); default 16 (the authors' CIFAR-10
      run; 128 on ImageNet).
    update_every: refresh period in steps, >= 1 (required).
    chunk_size: per-example gradients computed together, >= 1; default 8.
    batch_axes: 0 when every batch leaf is batched on its leading axis
      (default); otherwise a prefix pytree of the batch with 0 (sliced) or
      None (passed whole: model state, a PRNG key) per leaf.
    has_aux, axis_name, eps: as in :func:`sam`. Under ``axis_name`` the
      examples are the first ``num_samples`` of the global batch, which is
      taken to be split contiguously over the axis (``pmap`` over a reshaped
      batch, ``shard_map`` with ``P(axis)``): each device computes the
      per-example gradients of its own examples among them, and the Fisher
      is summed over the axis before the top-k, so every device holds the
      same mask, the one a single-device run would compute.

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
      loss_fn,
      rho,
      region,
      static_sparsity(region.sparsity) == 1.0,
      has_aux,
      axis_name,
      eps,
  )


def ssam_dynamic(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.05,
    sparsity: base.ScalarOrSchedule = 0.5,
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
    sparsity: share of entries NOT perturbed, in [0, 1]; a plain number
      (exact ``K``, shortcuts for 0 and 1), an array or a schedule (``K`` in
      float32 at each refresh; when it changes, the next refresh moves the
      mask to the new size: :func:`dynamic_counts`).
    drop_rate: initial drop rate in [0, 1] (a number or an array); default
      0.5.
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
      loss_fn,
      rho,
      region,
      static_sparsity(region.sparsity) == 1.0,
      has_aux,
      axis_name,
      eps,
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
  freeze a mask found earlier, e.g. the one in a :func:`ssam_fisher` state
  (``opt_state[0].region.mask`` in ``optax.chain(ssam_fisher(...), ...)``).

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
  region_lib.fixed_mask(mask)  # checks that every leaf is boolean
  # Always an element-wise (array) mask, never the engine's static leaf set:
  # a leaf outside the mask still gets its gradient at the perturbed point
  # (the dense output of Sparse SAM), not the clean one.
  arrays = jax.tree.map(
      lambda m: m if isinstance(m, jax.Array) else np.asarray(m, bool), mask
  )
  concrete = not any(
      isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(arrays)
  )
  skip = concrete and not any(np.any(m) for m in jax.tree.leaves(arrays))
  return _ssam_engine(
      loss_fn, rho, region_lib.FixedMask(mask=arrays), skip, has_aux,
      axis_name, eps,
  )
