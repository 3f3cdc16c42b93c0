"""Sparse SAM (issue 3): Fisher and dynamic masks, exact global top-k.

Every check is against numbers computed here independently: NumPy top-k by
lexicographic sort, per-example gradients one by one with ``jax.grad``, the
SSAM perturbation formula written out, the drop/grow counts in Python.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import parts
from sam_optax._src import fisher as fisher_lib
from sam_optax._src import region as region_lib
from sam_optax._src import topk

RHO = 0.05
EPS = 1e-12


# --------------------------------------------------------------------------
# A tiny MLP and independent references.
# --------------------------------------------------------------------------


def make_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "dense1": {
          "kernel": jax.random.normal(k1, (3, 4)) * 0.5,
          "bias": jnp.zeros(4),  # zero bias: ReLU ties and zero Fisher entries
      },
      "dense2": {
          "kernel": jax.random.normal(k2, (4, 2)) * 0.5,
          "bias": jax.random.normal(k3, (2,)) * 0.1,
      },
  }


def mlp_loss(params, batch):
  h = jax.nn.relu(batch["x"] @ params["dense1"]["kernel"]
                  + params["dense1"]["bias"])
  out = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))


def mlp_loss_aux(params, batch):
  loss = mlp_loss(params, batch)
  return loss, {"loss": loss}


def make_batch(seed, size=8):
  kx, ky = jax.random.split(jax.random.key(100 + seed))
  return {"x": jax.random.normal(kx, (size, 3)),
          "y": jax.random.normal(ky, (size, 2))}


# Compiled once per batch shape and shared by every reference below.
grad_fn = jax.jit(jax.grad(mlp_loss))


def flat(tree):
  return np.concatenate(
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  )


def unflat(vec, like):
  leaves, treedef = jax.tree.flatten(like)
  out, i = [], 0
  for x in leaves:
    out.append(np.asarray(vec[i:i + x.size]).reshape(x.shape))
    i += x.size
  return jax.tree.unflatten(treedef, out)


def ref_top_k(scores, k, eligible=None):
  """Largest scores first (the float64 order: subnormals exact, -0.0 equal
  to 0.0), lowest index first among equals; NaN below -inf."""
  s = np.ravel(np.asarray(scores, np.float64))
  nan = np.isnan(s)
  order = np.lexsort((np.arange(s.size), -np.where(nan, 0.0, s), nan))
  if eligible is not None:
    order = [i for i in order if eligible[i]]
  out = np.zeros(s.size, bool)
  out[list(order[:k])] = True
  return out


def ref_fisher(params, batch, num_samples):
  """Per-example gradients one by one, squared and summed, in float64."""
  total = 0.0
  for i in range(num_samples):
    ex = jax.tree.map(lambda x: x[i:i + 1], batch)
    total = total + flat(grad_fn(params, ex)) ** 2
  return total


def ref_ssam(params, batch, mask_flat):
  """out = ∇L(w + rho * g/(‖g‖+eps) ⊙ m), the norm over the FULL gradient."""
  g = flat(grad_fn(params, batch))
  e = RHO * g / (np.linalg.norm(g) + EPS) * mask_flat
  w = jax.tree.map(
      lambda p, d: p + jnp.asarray(d, p.dtype), params, unflat(e, params)
  )
  return flat(grad_fn(w, batch))


def n_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------
# Exact global top-k.
# --------------------------------------------------------------------------


def test_top_k_mask_exact_count_and_ties_match_reference():
  rng = np.random.default_rng(0)
  # repeated shapes, apart: handled together (stacked), ranked in leaf order
  shapes = [(3, 4), (), (5,), (3, 4), (2, 1, 3), (), (5,), (3, 4)]
  n = sum(int(np.prod(s)) for s in shapes)
  f = jax.jit(topk.top_k_mask)
  for trial in range(12):
    # Small integers: many ties; also NaN, +-inf, -0.0 and +0.0.
    vals = rng.integers(-3, 4, size=n).astype(np.float32)
    vals[rng.integers(0, n, 3)] = [np.nan, np.inf, -np.inf]
    vals[rng.integers(0, n, 2)] = [-0.0, 0.0]
    tree = unflat(vals, [np.zeros(s) for s in shapes])
    tree = [jnp.asarray(x, jnp.float32) for x in tree]
    elig = rng.random(n) < 0.6
    for use_elig in (False, True):
      limit = int(elig.sum()) if use_elig else n
      k = int(rng.integers(0, limit + 1)) if trial else limit
      got = f(tree, k, eligible=unflat(elig, tree) if use_elig else None)
      chex.assert_trees_all_equal_shapes(got, tree)
      got = flat(got).astype(bool)
      want = ref_top_k(vals, k, elig if use_elig else None)
      np.testing.assert_array_equal(got, want, err_msg=f"trial {trial} k {k}")
      assert got.sum() == k


def _concatenated_top_k_mask(scores, k, eligible=None):
  """The exact top-k as it was before it worked leaf by leaf (kept as the
  reference of the same rule): the keys of all leaves concatenated, 32 bit
  passes for the threshold, ties cut by blocked prefix sums."""
  leaves, treedef = jax.tree.flatten(scores)
  shapes = [jnp.shape(x) for x in leaves]
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  n = sum(sizes)
  blk = 1 << max(0, math.ceil(math.log2(max(n, 1)) / 2))
  rows = -(-n // blk)
  pad = rows * blk - n
  keys = topk._order_key(jnp.concatenate(
      [jnp.ravel(x).astype(jnp.float32) for x in leaves]
      + [jnp.zeros((pad,), jnp.float32)]))
  valid = jax.lax.broadcasted_iota(jnp.int32, (rows * blk,), 0) < n
  if eligible is not None:
    ok = treedef.flatten_up_to(eligible)
    valid = valid & jnp.concatenate(
        [jnp.ravel(jnp.broadcast_to(jnp.asarray(o, bool), s))
         for o, s in zip(ok, shapes)] + [jnp.zeros((pad,), bool)])
  keys = jnp.where(valid, keys, jnp.uint32(0)).reshape(rows, blk)
  k = jnp.asarray(k, jnp.int32)

  def decide_bit(i, t):
    cand = t | (jnp.uint32(1) << (jnp.uint32(31) - i.astype(jnp.uint32)))
    return jnp.where(jnp.sum(keys >= cand, dtype=jnp.int32) >= k, cand, t)

  t = jax.lax.fori_loop(0, 32, decide_bit, jnp.uint32(0))
  ties_wanted = k - jnp.sum(keys > t, dtype=jnp.int32)
  tie = (keys == t) & (keys > 0)
  per_row = jnp.cumsum(jnp.sum(tie, axis=1, dtype=jnp.int32))
  row = jnp.minimum(jnp.sum(per_row < ties_wanted, dtype=jnp.int32), rows - 1)
  before = jnp.where(row > 0, per_row[jnp.maximum(row - 1, 0)], 0)
  in_row = jnp.cumsum(
      jax.lax.dynamic_index_in_dim(tie, row, 0, keepdims=False),
      dtype=jnp.int32)
  col = jnp.sum(in_row < ties_wanted - before, dtype=jnp.int32)
  index = (jax.lax.broadcasted_iota(jnp.int32, (rows, blk), 0) * blk
           + jax.lax.broadcasted_iota(jnp.int32, (rows, blk), 1))
  chosen = ((keys > t) | (tie & (index <= row * blk + col))) & (k > 0)
  return chosen.reshape(-1)[:n]


def test_leafwise_top_k_equals_concatenated_top_k():
  """Leaf by leaf (no concatenation) the mask is today's, bit for bit: random
  scores, all equal, few distinct values (ties spanning leaves), NaN, +-inf,
  -0.0/+0.0, k = 0, 1, n, eligible masks, k traced (an argument of jit)."""
  rng = np.random.default_rng(1)
  shapes = [(4, 3), (), (6,), (2, 1, 3), (4, 3), (1, 5), (), (3, 2, 2, 2),
            (6,), (4, 3)]
  like = [np.zeros(s) for s in shapes]
  n = sum(int(np.prod(s)) for s in shapes)
  leafwise = jax.jit(topk.top_k_mask)
  concatenated = jax.jit(_concatenated_top_k_mask)
  kinds = ["random", "equal", "few", "special"]
  for trial in range(40):
    kind = kinds[trial % 4]
    if kind == "random":
      vals = rng.standard_normal(n).astype(np.float32)
    elif kind == "equal":
      vals = np.full(n, 0.5, np.float32)
    elif kind == "few":
      vals = rng.integers(0, 3, n).astype(np.float32)
    else:
      vals = rng.integers(-2, 3, n).astype(np.float32)
      vals[rng.choice(n, 6, replace=False)] = [
          np.nan, np.nan, -np.inf, np.inf, -0.0, 0.0]
    elig = rng.random(n) < 0.6 if trial % 3 == 1 else None
    limit = n if elig is None else int(elig.sum())
    for k in {0, 1, limit, int(rng.integers(0, limit + 1))}:
      tree = [jnp.asarray(x, jnp.float32) for x in unflat(vals, like)]
      e = None if elig is None else unflat(elig, like)
      got = leafwise(tree, k, eligible=e)
      chex.assert_trees_all_equal_shapes(got, tree)
      got = flat(got).astype(bool)
      want = np.asarray(concatenated(tree, k, e))
      np.testing.assert_array_equal(got, want, err_msg=f"{kind} k={k}")
      np.testing.assert_array_equal(got, ref_top_k(vals, k, elig))
      assert got.sum() == k


def test_top_k_mask_mixed_shapes_and_dtypes_match_numpy():
  """Leaves grouped by shape and dtype and stacked (float32, bfloat16,
  float16; scalars; an empty leaf), the groups interleaved in leaf order:
  random, tied, NaN, +-inf, -0.0 and float32 subnormal scores; eligible
  leaves given as arrays, Python bools and a scalar broadcast; k = 0, 1, all
  eligible and a random k; against NumPy's lexsort of the leaves' values."""
  rng = np.random.default_rng(7)
  specs = [((3, 4), jnp.float32), ((3, 4), jnp.bfloat16), ((), jnp.float32),
           ((5,), jnp.float16), ((3, 4), jnp.float32), ((2, 0), jnp.float32),
           ((), jnp.float32), ((5,), jnp.float32), ((3, 4), jnp.bfloat16),
           ((5,), jnp.float16), ((3, 4), jnp.float32)]
  like = [np.zeros(shape) for shape, _ in specs]
  n = sum(x.size for x in like)
  f = jax.jit(topk.top_k_mask)
  for trial in range(12):
    if trial % 3 == 0:
      vals = rng.standard_normal(n)
    elif trial % 3 == 1:
      vals = rng.integers(-2, 3, n).astype(np.float64)  # ties across groups
    else:
      vals = rng.standard_normal(n) * 10.0 ** rng.integers(-44, -37, n)
    vals[rng.choice(n, 5, replace=False)] = [np.nan, np.inf, -np.inf, -0.0,
                                             0.0]
    tree = [jnp.asarray(x, dtype)
            for x, (_, dtype) in zip(unflat(vals, like), specs)]
    # The reference ranks the values the leaves hold (after rounding).
    held = flat([x.astype(jnp.float32) for x in tree])
    elig_tree = [rng.random(x.shape) < 0.6 for x in like]
    elig_tree[2], elig_tree[6], elig_tree[7] = True, False, np.bool_(True)
    elig = np.concatenate([np.broadcast_to(e, x.shape).ravel()
                           for e, x in zip(elig_tree, like)])
    for use_elig in (False, True):
      limit = int(elig.sum()) if use_elig else n
      for k in {0, 1, limit, int(rng.integers(0, limit + 1))}:
        got = f(tree, k, eligible=elig_tree if use_elig else None)
        chex.assert_trees_all_equal_shapes(got, tree)
        got = flat(got).astype(bool)
        want = ref_top_k(held, k, elig if use_elig else None)
        np.testing.assert_array_equal(got, want, err_msg=f"{trial} k={k}")
        assert got.sum() == k


def _distinct_kernels(compiled_text: str) -> int:
  """Fused computations of a compiled XLA program that differ once their
  names and metadata are set aside: XLA:CPU compiles each distinct kernel
  (tens of ms), identical ones far more cheaply."""
  bodies = set()
  for comp in re.split(r"\n(?=%\S+ \(|ENTRY )", compiled_text):
    if comp.startswith("%fused"):
      body = comp.split("\n", 1)[1]
      body = re.sub(r"metadata=\{[^}]*\}", "", body)
      bodies.add(re.sub(r"%[\w.\-]+", "%x", body))
  return len(bodies)


def test_top_k_mask_kernels_do_not_grow_with_same_shaped_leaves():
  """Every leaf reads its flat-index offset from a scalar carried through
  the bit loop, not from a constant in its kernels: 12 leaves of each of
  three shapes compile to the distinct kernels of 2 of each, give or take
  the few that hold the number of index bits (it grows with N). With the
  offsets as constants, 34 distinct kernels became 173."""
  def kernels(copies):
    leaves = [jax.ShapeDtypeStruct((3, 4), jnp.float32),
              jax.ShapeDtypeStruct((5,), jnp.float32),
              jax.ShapeDtypeStruct((2, 3, 2), jnp.float32)] * copies
    fn = jax.jit(topk.top_k_mask)
    return _distinct_kernels(fn.lower(leaves, 7).compile().as_text())

  few, many = kernels(2), kernels(12)
  assert many <= few + 3, (few, many)


def test_top_k_mask_ranks_subnormal_scores_exactly():
  """float32 subnormals are ranked on their bit pattern, not as floats that
  XLA:CPU flushes to 0: the issue's case, then random scores near 1e-40
  (subnormal, with zeros and ties) over leaves of repeated shapes, against
  the float64 NumPy order."""
  f = jax.jit(topk.top_k_mask)
  tiny = np.array([0, 0, 0, 1e-45, 0, 0, 0, 1e-44], np.float32)
  assert np.flatnonzero(f([jnp.asarray(tiny)], 1)[0]).tolist() == [7]
  assert np.flatnonzero(f([jnp.asarray(tiny)], 2)[0]).tolist() == [3, 7]
  assert np.flatnonzero(f([jnp.asarray(-tiny)], 6)[0]).tolist() == [
      0, 1, 2, 4, 5, 6]
  rng = np.random.default_rng(3)
  like = [np.zeros(s) for s in [(3, 5), (7,), (3, 5), (), (7,)]]
  n = sum(x.size for x in like)
  for trial in range(30):
    vals = (rng.standard_normal(n) * 10.0 ** rng.integers(-44, -37, n))
    vals = vals.astype(np.float32)
    vals[rng.random(n) < 0.2] = 0.0
    assert np.count_nonzero(np.abs(vals) < np.finfo(np.float32).tiny) > n // 2
    k = int(rng.integers(1, n))
    got = flat(f([jnp.asarray(x) for x in unflat(vals, like)], k)).astype(bool)
    np.testing.assert_array_equal(got, ref_top_k(vals, k), err_msg=str(trial))


def test_top_k_mask_nan_ranks_lowest():
  """As documented: NaN below -inf (no tie with it), NaNs among themselves
  by index, and still above ineligible entries."""
  f = jax.jit(topk.top_k_mask)
  x = jnp.array([np.nan, -np.inf, 1.0, 2.0], jnp.float32)
  np.testing.assert_array_equal(f([x], 3)[0], [False, True, True, True])
  np.testing.assert_array_equal(f([x], 4)[0], [True, True, True, True])
  y = jnp.array([np.nan, -np.inf, np.nan, 0.0], jnp.float32)
  np.testing.assert_array_equal(f([y], 3)[0], [True, True, False, True])
  np.testing.assert_array_equal(
      f([y], 2, eligible=[np.array([True, False, True, False])])[0],
      [True, False, True, False])
  for vals in (np.asarray(x), np.asarray(y)):
    for k in range(5):
      np.testing.assert_array_equal(f([jnp.asarray(vals)], k)[0],
                                    ref_top_k(vals, k))


def test_top_k_mask_empty_leaves():
  got = jax.jit(topk.top_k_mask)([jnp.zeros((0, 3)), jnp.array([1., 2.])], 1)
  assert got[0].shape == (0, 3)
  np.testing.assert_array_equal(got[1], [False, True])
  assert topk.top_k_mask([jnp.zeros((0, 3))], 0)[0].shape == (0, 3)


def test_top_k_mask_rejects_2_31_entries():
  with pytest.raises(ValueError, match="fewer than 2\\*\\*31"):
    topk.top_k_mask([jax.ShapeDtypeStruct((2**16, 2**15), jnp.float32)], 1)


def test_num_kept_is_exact_floor():
  assert topk.num_kept(100, 0.29) == 71  # 100 * (1 - 0.29) == 70.999... in float
  assert topk.num_kept(10, 0.7) == 3
  assert topk.num_kept(26, 0.5) == 13
  assert topk.num_kept(7, 0.5) == 3
  assert topk.num_kept(26, 0.0) == 26 and topk.num_kept(26, 1.0) == 0
  for n in (1, 13, 1000, 25_557_032):
    for s in (0.1, 0.25, 0.33, 0.5, 0.9, 0.99):
      exact = (n * (1000 - round(s * 1000))) // 1000
      assert topk.num_kept(n, s) == exact


# --------------------------------------------------------------------------
# Fisher scores.
# --------------------------------------------------------------------------


def test_fisher_scores_match_per_example_gradients():
  params, batch = make_params(), make_batch(0)
  want = ref_fisher(params, batch, 5)
  # 5 examples in chunks of 2: a loop over 2 chunks and a remainder of 1.
  got = jax.jit(
      functools.partial(
          fisher_lib.fisher_scores, mlp_loss, num_samples=5, chunk_size=2
      )
  )(params, batch)
  np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-9)
  # One chunk of 5, and a leaf passed whole (batch_axes None): a loss scale.
  scaled = lambda p, b: b["s"] * mlp_loss(p, {"x": b["x"], "y": b["y"]})
  got = jax.jit(
      functools.partial(
          fisher_lib.fisher_scores, scaled, num_samples=5, chunk_size=8,
          batch_axes={"x": 0, "y": 0, "s": None},
      )
  )(params, dict(batch, s=jnp.float32(3.0)))
  np.testing.assert_allclose(flat(got), 9.0 * want, rtol=1e-5, atol=1e-9)
  # Model state left batched by mistake: the error names the leaves.
  with pytest.raises(ValueError, match=r"'state/mean': 5.*batch_axes"):
    fisher_lib.fisher_scores(mlp_loss, params, dict(batch, state={"mean": jnp.ones(5)}), 2)


# --------------------------------------------------------------------------
# SSAM-F end to end.
# --------------------------------------------------------------------------


def test_ssam_fisher_steps_mask_output_counts_no_retrace():
  params = make_params()
  n = n_params(params)
  k = topk.num_kept(n, 0.5)
  tx = sam_optax.ssam_fisher(
      mlp_loss_aux, RHO, 0.5, num_samples=5, update_every=2, chunk_size=2,
      has_aux=True, eps=EPS,
  )
  state = tx.init(params)
  assert not flat(state.region.mask).any()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, batch):
    g = jax.grad(mlp_loss)(params, batch)
    out, state = tx.update(g, state, params, batch=batch)
    return out, state

  mask = None
  for t in range(4):
    batch = make_batch(t)
    out, state = step(params, state, batch)
    if t % 2 == 0:  # refresh: the top-k of the Fisher on this batch
      mask = ref_top_k(ref_fisher(params, batch, 5), k)
    got_mask = flat(state.region.mask).astype(bool)
    np.testing.assert_array_equal(got_mask, mask, err_msg=f"step {t}")
    assert got_mask.sum() == k
    np.testing.assert_allclose(
        flat(out), ref_ssam(params, batch, mask), rtol=1e-5, atol=1e-7
    )
    s = sam_optax.stats(state)
    assert int(s["count"]) == t + 1
    assert int(s["mask_refreshes"]) == t // 2 + 1
    assert int(s["grad_evals"]) == (t + 1) + 5 * (t // 2 + 1)
    np.testing.assert_allclose(float(s["mask_density"]), k / n)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, out)


def test_num_samples_larger_than_batch_is_an_error():
  tx = sam_optax.ssam_fisher(mlp_loss, num_samples=9, update_every=1)
  params, batch = make_params(), make_batch(0, size=8)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"num_samples must be in \[1, batch size = 8\]"):
    tx.update(jax.grad(mlp_loss)(params, batch), state, params, batch=batch)


# --------------------------------------------------------------------------
# sparsity 0 and 1.
# --------------------------------------------------------------------------


def _run(tx, params, steps=3):
  opt = optax.chain(tx, optax.sgd(0.1))
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    g = jax.grad(mlp_loss)(params, batch)
    u, state = opt.update(g, state, params, batch=batch)
    return optax.apply_updates(params, u), state, u

  outs = []
  for t in range(steps):
    params, state, u = step(params, state, make_batch(t))
    outs.append(u)
  return params, state, outs


def test_sparsity_zero_is_sam_exactly():
  params = make_params()
  want, _, _ = _run(sam_optax.sam(mlp_loss, RHO), params)
  for tx in (
      sam_optax.ssam_fisher(mlp_loss, RHO, 0.0, num_samples=4, update_every=1),
      sam_optax.ssam_dynamic(
          mlp_loss, RHO, 0.0, update_every=1, total_steps=3
      ),
  ):
    got, state, _ = _run(tx, params)
    chex.assert_trees_all_equal(got, want)
    s = sam_optax.stats(state)
    assert float(s["mask_density"]) == 1.0
    assert int(s["grad_evals"]) == 3  # SAM's cost: no Fisher work at all


def test_sparsity_one_returns_clean_gradient_and_evaluates_nothing():
  params, batch = make_params(), make_batch(0)
  g = jax.grad(mlp_loss)(params, batch)
  traced = []

  def counting_loss(p, b):
    traced.append(1)  # runs when the transform traces loss_fn
    return mlp_loss(p, b)

  for tx in (
      sam_optax.ssam_fisher(counting_loss, RHO, 1.0, update_every=1),
      sam_optax.ssam_dynamic(counting_loss, RHO, 1.0, update_every=1,
                             total_steps=5),
  ):
    state = tx.init(params)
    out, state = jax.jit(
        lambda g, s, p, b: tx.update(g, s, p, batch=b)
    )(g, state, params, batch)
    chex.assert_trees_all_equal(out, g)
    s = sam_optax.stats(state)
    assert int(s["grad_evals"]) == 0 and float(s["mask_density"]) == 0.0
  assert not traced


@pytest.mark.parametrize("planned", [False, True])
def test_too_small_a_model_for_one_kept_entry_evaluates_nothing(planned):
  """K = floor(N * (1 - sparsity)) = 0 from a small model (one scalar at
  sparsity 0.5, not sparsity=1): the mask is empty, so w + e = w and the
  output is the clean gradient, with no gradient computed or counted
  (it computed the gradient at w again and counted it in grad_evals)."""
  params = {"w": jnp.asarray(1.5)}
  x, y = jnp.linspace(-1.0, 1.0, 8), jnp.linspace(0.0, 2.0, 8)

  def loss(p, b):
    return jnp.mean((jnp.tanh(p["w"] * b[0]) - b[1]) ** 2)

  g = jax.grad(loss)(params, (x, y))
  traced = []

  def counting_loss(p, b):
    traced.append(1)  # runs when the transform traces loss_fn
    return loss(p, b)

  for tx in (
      sam_optax.ssam_fisher(counting_loss, RHO, 0.5, num_samples=4,
                            update_every=1),
      sam_optax.ssam_dynamic(counting_loss, RHO, 0.5, update_every=1,
                             total_steps=5),
  ):
    plan_of = sam_optax.planner(tx)
    state = tx.init(params)
    step = jax.jit(lambda g, s, plan=None: tx.update(g, s, params,
                                                     batch=(x, y), plan=plan),
                   static_argnames="plan")
    for count in range(3):
      out, state = step(g, state, plan=plan_of(count, state) if planned else None)
      chex.assert_trees_all_equal(out, g)
    s = sam_optax.stats(state)
    assert int(s["count"]) == 3
    assert int(s["grad_evals"]) == 0 and float(s["mask_density"]) == 0.0
  assert not traced


# --------------------------------------------------------------------------
# SSAM-D.
# --------------------------------------------------------------------------


def test_cosine_drop_rate_schedule():
  for count in (0, 1, 7, 25, 50, 99, 100, 150):
    want = 0.5 * (1 + math.cos(math.pi * min(count / 100, 1.0))) / 2
    got = float(region_lib.cosine_drop_rate(jnp.int32(count), 0.5, 100))
    assert got == pytest.approx(want, abs=1e-7), count


@pytest.mark.parametrize("exact", [True, False])
def test_dynamic_counts(exact):
  for n, s, dr in [(26, 0.5, 0.3), (26, 0.5, 0.25), (1000, 0.1, 0.9),
                   (1000, 0.5, 0.5), (101, 0.3, 0.1), (101, 0.3, 0.0)]:
    k = topk.num_kept(n, s)
    f32 = np.float32  # the counts are defined in float32 arithmetic
    floor_keep = math.floor(f32(k) * (f32(1) - f32(dr)))
    if exact:
      grow = min(k - floor_keep, n - k)
      keep = k - grow
    else:
      keep = floor_keep
      grow = math.floor(min(f32(k) * f32(dr), f32(n) * f32(s)))
    got = region_lib.dynamic_counts(jnp.float32(dr), n, k, k, s, exact)
    assert (int(got[0]), int(got[1])) == (keep, grow), (n, s, dr)
    if exact:
      assert keep + grow == k


def test_uniform_noise_is_one_draw_per_leaf_key():
  """SSAM-D's noise, drawn for every leaf of a shape at once, is leaf i's
  ``uniform(fold_in(key, i))``: the numbers a draw per leaf gave."""
  key = jax.random.key(5)
  like = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,)), "c": jnp.zeros((3, 4)),
          "d": jnp.zeros(()), "e": jnp.zeros((5,), jnp.bfloat16)}
  got = jax.jit(region_lib._uniform_like)(key, like)
  for i, (g, x) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(like))):
    want = jax.random.uniform(jax.random.fold_in(key, i), x.shape, jnp.float32)
    np.testing.assert_array_equal(g, want)
    assert g.dtype == jnp.float32


def test_dynamic_init_exact_count_and_seed_determinism():
  params = make_params()
  n = n_params(params)
  masks = {}
  for seed in (0, 0, 1):
    tx = sam_optax.ssam_dynamic(
        mlp_loss, RHO, 0.3, update_every=1, total_steps=10, seed=seed
    )
    m = flat(tx.init(params).region.mask).astype(bool)
    assert m.sum() == topk.num_kept(n, 0.3)
    masks.setdefault(seed, []).append(m)
  np.testing.assert_array_equal(masks[0][0], masks[0][1])
  assert (masks[0][0] != masks[1][0]).any()


def _dynamic_refresh(tx, params, steps, state=None, step=None):
  """Runs ``steps`` jitted updates; returns the masks before/after each.

  Also returns the jitted step, traced once for all of them (refresh and
  non-refresh steps alike), so another state can be run without a compile.
  """
  state = tx.init(params) if state is None else state
  if step is None:
    traces = []

    @jax.jit
    def step(params, state, batch):
      traces.append(1)
      g = jax.grad(mlp_loss)(params, batch)
      out, state = tx.update(g, state, params, batch=batch)
      return out, state, g

    step.traces = traces

  history = []
  for t in range(steps):
    batch = make_batch(t)
    before = flat(state.region.mask).astype(bool)
    out, state, g = step(params, state, batch)
    after = flat(state.region.mask).astype(bool)
    history.append((t, before, after, flat(g), out, batch, state))
  assert len(step.traces) == 1  # no retrace across refresh/non-refresh steps
  return history, step


def test_dynamic_refresh_weight_drop_gradient_grow_matches_reference():
  params = make_params()
  n = n_params(params)
  s, drop_rate, total, every = 0.5, 0.5, 8, 2
  k = topk.num_kept(n, s)
  tx = sam_optax.ssam_dynamic(
      mlp_loss, RHO, s, drop_rate=drop_rate, update_every=every,
      total_steps=total, drop_criterion="weight", grow_criterion="gradient",
      eps=EPS,
  )
  w = flat(params)
  for t, before, after, g, out, batch, state in _dynamic_refresh(tx, params, 5)[0]:
    if t == 0 or t % every:
      np.testing.assert_array_equal(after, before, err_msg=f"step {t}")
    else:
      dr = drop_rate * (1 + math.cos(math.pi * t / total)) / 2
      grow_n = min(k - math.floor(k * (1 - dr)), n - k)
      keep = ref_top_k(np.abs(w), k - grow_n, before)
      grow = ref_top_k(np.abs(g), grow_n, ~before)
      np.testing.assert_array_equal(after, keep | grow, err_msg=f"step {t}")
      assert grow_n > 0 and (after != before).any()
    assert after.sum() == k
    np.testing.assert_allclose(
        flat(out), ref_ssam(params, batch, after), rtol=1e-5, atol=1e-7
    )
    assert int(state.region.refreshes) == t // every


def test_dynamic_refresh_default_criteria_counts_and_determinism():
  params = make_params()
  n = n_params(params)
  s, total, every = 0.5, 6, 1
  k = topk.num_kept(n, s)

  def build(seed):
    return sam_optax.ssam_dynamic(
        mlp_loss, RHO, s, update_every=every, total_steps=total, seed=seed
    )

  tx = build(3)
  run, step = _dynamic_refresh(tx, params, 3)
  # The seed only enters the initial state (mask and key): a transform built
  # again with the same seed starts from the same state and so follows the
  # same masks; another seed differs. The update is seed-independent, so the
  # compiled step is shared.
  chex.assert_trees_all_equal(build(3).init(params), tx.init(params))
  runs = [run] + [
      _dynamic_refresh(tx, params, 3, build(seed).init(params), step)[0]
      for seed in (3, 4)
  ]
  for t, before, after, g, *_ in runs[0]:
    if t == 0:
      np.testing.assert_array_equal(after, before)
      continue
    dr = 0.5 * (1 + math.cos(math.pi * t / total)) / 2
    grow_n = min(k - math.floor(k * (1 - dr)), n - k)
    kept = after & before
    # Dropped by |g|: the survivors are exactly the top |g| alive entries.
    np.testing.assert_array_equal(kept, ref_top_k(np.abs(g), k - grow_n, before))
    # Grown at random among the entries dead before the refresh.
    assert (after & ~before).sum() == grow_n
    assert after.sum() == k
  for a, b in zip(runs[0], runs[1]):  # same seed: same masks
    np.testing.assert_array_equal(a[2], b[2])
  assert any((a[2] != c[2]).any() for a, c in zip(runs[0], runs[2]))


def test_dynamic_authors_counts_mode():
  params = make_params()
  n = n_params(params)
  k = topk.num_kept(n, 0.5)  # 13
  tx = sam_optax.ssam_dynamic(
      mlp_loss, RHO, 0.5, drop_rate=0.6, update_every=1, total_steps=1000,
      exact_count=False,
  )
  t, before, after, *_ = _dynamic_refresh(tx, params, 2)[0][1]
  dr = 0.6 * (1 + math.cos(math.pi * 1 / 1000)) / 2
  keep, grow = math.floor(k * (1 - dr)), math.floor(min(k * dr, n * 0.5))
  assert keep + grow == k - 1  # the authors' rounding loses one entry here
  assert (after & before).sum() == keep and (after & ~before).sum() == grow


# --------------------------------------------------------------------------
# Multi-device: identical masks.
# --------------------------------------------------------------------------


def test_pmap_masks_agree_and_match_global_fisher():
  ndev = jax.local_device_count()
  assert ndev == 8
  params = make_params()
  n = n_params(params)
  k = topk.num_kept(n, 0.5)
  global_batch = make_batch(10, size=4 * ndev)
  # Host-side copies (NumPy: no eager XLA compiles), then one trivial pmap so
  # that every input already has the layout the step's outputs will have.
  to_devices = jax.pmap(lambda *a: a, axis_name="i")
  replicate = lambda tree: jax.tree.map(
      lambda x: np.stack([np.asarray(x)] * ndev), tree)
  rep, sharded = to_devices(
      replicate(params),
      jax.tree.map(lambda x: np.asarray(x).reshape((ndev, 4) + x.shape[1:]),
                   global_batch))
  per_device = lambda tree: np.stack(
      [flat(jax.tree.map(lambda x: np.asarray(x)[d], tree))
       for d in range(ndev)])

  for tx in (
      # 6 examples: all 4 of device 0 and the first 2 of device 1.
      sam_optax.ssam_fisher(mlp_loss, RHO, 0.5, num_samples=6,
                            update_every=1, chunk_size=3, axis_name="i",
                            eps=EPS),
      sam_optax.ssam_dynamic(mlp_loss, RHO, 0.5, update_every=1,
                             total_steps=4, axis_name="i", eps=EPS),
  ):
    (state,) = to_devices(replicate(tx.init(params)))
    traces = []

    @functools.partial(jax.pmap, axis_name="i")
    def step(params, state, batch):
      traces.append(1)
      g = jax.grad(mlp_loss)(params, batch)  # per-device gradient
      return tx.update(g, state, params, batch=batch)

    for _ in range(2):  # step 0, and step 1 (a dynamic refresh)
      out, state = step(rep, state, sharded)
    assert len(traces) == 1
    masks = per_device(state.region.mask).astype(bool)
    assert (masks == masks[0]).all() and masks[0].sum() == k
    outs = per_device(out)
    np.testing.assert_array_equal(outs, np.broadcast_to(outs[0], outs.shape))
    if hasattr(state.region, "key"):  # dynamic: agreement is the point
      continue
    # Fisher: the first 6 examples of the GLOBAL batch, as on one device.
    np.testing.assert_array_equal(
        masks[0], ref_top_k(ref_fisher(params, global_batch, 6), k))
    assert (np.asarray(state.grad_evals) == 2 * (1 + 6)).all()


def test_fisher_num_samples_past_global_batch_under_pmap_is_an_error():
  tx = sam_optax.ssam_fisher(mlp_loss, num_samples=9, update_every=1,
                             axis_name="i")
  params = make_params()
  batch = jax.tree.map(lambda x: x.reshape((2, 4) + x.shape[1:]),
                       make_batch(0, size=8))
  step = jax.pmap(
      lambda p, s, b: tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b),
      axis_name="i", devices=jax.local_devices()[:2])
  two = lambda t: jax.tree.map(lambda x: jnp.stack([x, x]), t)
  with pytest.raises(ValueError, match=r"batch size = 2 devices x 4 = 8\], got 9"):
    step(two(params), two(tx.init(params)), batch)


# --------------------------------------------------------------------------
# A fixed mask.
# --------------------------------------------------------------------------


def test_fixed_mask_formula_dense_output_and_skip():
  params, batch = make_params(), make_batch(0)
  g = jax.grad(mlp_loss)(params, batch)
  arr = {
      "dense1": {"kernel": np.arange(12).reshape(3, 4) % 3 == 0, "bias": True},
      "dense2": {"kernel": False, "bias": np.array([True, False])},
  }
  tx = sam_optax.ssam(mlp_loss, RHO, mask=arr, eps=EPS)
  state = tx.init(params)
  m = flat(jax.tree.map(lambda a, p: np.broadcast_to(a, p.shape), arr, params))
  out, state = tx.update(g, state, params, batch=batch)
  np.testing.assert_allclose(flat(out), ref_ssam(params, batch, m),
                             rtol=1e-5, atol=1e-7)
  assert float(sam_optax.stats(state)["mask_density"]) == pytest.approx(
      m.mean())
  # Python-bool leaves only: still the dense gradient at w + e everywhere
  # (Sparse SAM), not the clean gradient outside the mask.
  bools = {"dense1": {"kernel": False, "bias": False},
           "dense2": {"kernel": True, "bias": False}}
  out, _ = sam_optax.ssam(mlp_loss, RHO, mask=bools, eps=EPS).update(
      g, sam_optax.ssam(mlp_loss, mask=bools).init(params), params,
      batch=batch)
  m = flat(jax.tree.map(lambda a, p: np.full(p.shape, a), bools, params))
  want = ref_ssam(params, batch, m)
  np.testing.assert_allclose(flat(out), want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(flat(out)[:16], flat(g)[:16])  # dense1 moved too
  # No True anywhere: the clean gradient, no evaluation.
  none = jax.tree.map(lambda _: False, bools)
  tx = sam_optax.ssam(mlp_loss, RHO, mask=none)
  out, state = tx.update(g, tx.init(params), params, batch=batch)
  chex.assert_trees_all_equal(out, g)
  assert int(state.grad_evals) == 0


def test_fixed_mask_structure_mismatch_names_paths():
  params = make_params()
  bad = {"dense1": {"kernel": True, "bias": True}, "dense3": {"kernel": True}}
  with pytest.raises(ValueError, match=r"dense2/bias.*dense3/kernel"):
    sam_optax.ssam(mlp_loss, mask=bad).init(params)
  wrong_shape = {"dense1": {"kernel": np.ones((4, 3), bool), "bias": True},
                 "dense2": {"kernel": True, "bias": True}}
  with pytest.raises(ValueError, match=r"dense1/kernel: \(4, 3\) vs \(3, 4\)"):
    sam_optax.ssam(mlp_loss, mask=wrong_shape).init(params)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctor, kwargs, pattern",
    [
        ("fisher", dict(sparsity=1.5), r"sparsity must be in \[0, 1\]"),
        ("fisher", dict(sparsity=-0.1), r"sparsity must be in \[0, 1\]"),
        ("fisher", dict(num_samples=0), r"num_samples must be an integer in \[1, inf\]"),
        ("fisher", dict(update_every=0), r"update_every must be an integer in \[1, inf\]"),
        ("fisher", dict(chunk_size=0), r"chunk_size"),
        ("fisher", dict(batch_axes=1), r"batch_axes"),
        ("fisher", dict(sparsity=True), r"sparsity must be a number in \[0, 1\] or a schedule"),
        ("dynamic", dict(drop_rate=optax.constant_schedule(0.5)), r"drop_rate must be a number"),
        ("dynamic", dict(seed=jnp.float32(1)), r"seed must be an integer"),
        ("fisher", dict(rho=-1.0), r"rho must be in \[0, inf\)"),
        ("dynamic", dict(sparsity=2.0), r"sparsity must be in \[0, 1\]"),
        ("dynamic", dict(drop_rate=1.1), r"drop_rate must be in \[0, 1\]"),
        ("dynamic", dict(update_every=0), r"update_every"),
        ("dynamic", dict(total_steps=0), r"total_steps must be an integer in \[1, inf\]"),
        ("dynamic", dict(drop_criterion="magnitude"), r"drop_criterion must be one of 'gradient', 'weight', 'random'"),
        ("dynamic", dict(grow_criterion="momentum"), r"grow_criterion must be one of"),
        ("dynamic", dict(seed=1.5), r"seed must be an integer"),
        ("fixed", dict(mask={"a": np.ones(3)}), r"mask leaves must be booleans"),
    ],
)
def test_bad_arguments_fail_at_construction(ctor, kwargs, pattern):
  if ctor == "fisher":
    kw = dict(update_every=1)
    kw.update(kwargs)
    call = lambda: sam_optax.ssam_fisher(mlp_loss, **kw)
  elif ctor == "dynamic":
    kw = dict(update_every=1, total_steps=10)
    kw.update(kwargs)
    call = lambda: sam_optax.ssam_dynamic(mlp_loss, **kw)
  else:
    call = lambda: sam_optax.ssam(mlp_loss, **kwargs)
  with pytest.raises(ValueError, match=pattern):
    call()


def test_update_every_and_total_steps_are_required_keywords():
  with pytest.raises(TypeError):
    sam_optax.ssam_fisher(mlp_loss, 0.05, 0.5)  # pylint: disable=missing-kwoa
  with pytest.raises(TypeError):
    sam_optax.ssam_dynamic(mlp_loss, 0.05, 0.5, update_every=3)
  with pytest.raises(TypeError):
    sam_optax.ssam_fisher(mlp_loss, 0.05, 0.5, 16, 3)  # keyword-only


def test_parts_compose_with_other_gates():
  """A Fisher mask with LookSAM-style every-k gating, from the parts."""
  params, batch = make_params(), make_batch(0)
  tx = sam_optax.sharpness_aware(
      mlp_loss, RHO, geometry=parts.global_norm(),
      region=parts.fisher_mask(0.5, num_samples=2, update_every=4),
      gate=parts.every_k(2), eps=EPS,
  )
  state = tx.init(params)
  g = jax.grad(mlp_loss)(params, batch)
  out, state = tx.update(g, state, params, batch=batch)
  mask = ref_top_k(ref_fisher(params, batch, 2), 13)
  np.testing.assert_allclose(flat(out), ref_ssam(params, batch, mask),
                             rtol=1e-5, atol=1e-7)
  out, state = tx.update(g, state, params, batch=batch)  # gate closed
  chex.assert_trees_all_equal(out, g)
  assert int(state.grad_evals) == 1 + 2


def test_sparsity_schedule_fisher_mask_size_follows_it():
  params = make_params()
  n = n_params(params)
  sched = lambda count: jnp.where(count < 1, 0.5, 0.75)
  tx = sam_optax.ssam_fisher(mlp_loss, RHO, sched, num_samples=4,
                             update_every=1, eps=EPS)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  for t, s_t in enumerate((0.5, 0.75)):
    batch = make_batch(t)
    out, state = step(grad_fn(params, batch), state, params, batch)
    k = math.floor(n * (1 - s_t))  # 13, then 6
    mask = ref_top_k(ref_fisher(params, batch, 4), k)
    np.testing.assert_array_equal(flat(state.region.mask).astype(bool), mask)
    np.testing.assert_allclose(flat(out), ref_ssam(params, batch, mask),
                               rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_sparsity_and_drop_rate():
  """Injected (traced) sparsity and drop_rate give the same masks as plain
  numbers; changing the injected sparsity moves the mask to the new size."""
  params = make_params()
  n = n_params(params)
  kw = dict(rho=RHO, sparsity=0.5, drop_rate=0.5, update_every=1,
            total_steps=6, seed=2, eps=EPS)
  injected = optax.inject_hyperparams(
      sam_optax.ssam_dynamic, static_args=("loss_fn", "update_every",
                                           "total_steps", "seed"))(
                                               mlp_loss, **kw)
  history, _ = _dynamic_refresh(sam_optax.ssam_dynamic(mlp_loss, **kw),
                                params, 3)
  state = injected.init(params)
  step = jax.jit(lambda g, s, p, b: injected.update(g, s, p, batch=b))
  for t in range(3):
    batch = make_batch(t)
    _, state = step(grad_fn(params, batch), state, params, batch)
    np.testing.assert_array_equal(
        flat(state.inner_state.region.mask).astype(bool), history[t][2])
  before = flat(state.inner_state.region.mask).astype(bool)
  state.hyperparams["sparsity"] = jnp.float32(0.75)
  batch = make_batch(3)
  _, state = step(grad_fn(params, batch), state, params, batch)
  after = flat(state.inner_state.region.mask).astype(bool)
  assert after.sum() == math.floor(n * 0.25)  # 6: all from the old alive set
  assert (after & ~before).sum() == 0  # shrinking: nothing is grown
