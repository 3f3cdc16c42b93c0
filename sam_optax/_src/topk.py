"""Exact global top-k over a pytree, and the entry counts Sparse SAM keeps.

:func:`top_k_mask` finds the K-th largest score over all leaves at once by 32
counting passes over the float32 bit patterns (one bit decided per pass),
then breaks ties at the threshold by the lowest flat index (leaves in
``jax.tree.leaves`` order, row-major inside a leaf). No sort, no scatter,
memory O(N).
"""

from __future__ import annotations

import fractions
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


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


def _blocked_keys(leaves, treedef, shapes, n, eligible):
  """(uint32 keys as a (rows, B) array, rows, B): every score's order key,
  0 for ineligible entries and the padding (never selected)."""
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
  return jnp.where(valid, keys, jnp.uint32(0)).reshape(rows, blk), rows, blk


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
  2-core CPU of this project: about 1 s, against about 20 s for
  ``jnp.sort`` of the concatenated scores. On
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
  keys, rows, blk = _blocked_keys(leaves, treedef, shapes, sum(sizes), eligible)
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
