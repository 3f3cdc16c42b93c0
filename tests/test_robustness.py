"""Issue 13, the parts that live in base.py, lightsam.py and stats.py.

- overflow-safe norms against NumPy float64;
- LightSAM: a NaN or inf step leaves every accumulator as it was;
- argument errors: ValueError at construction naming the argument;
- ``stats()`` under pmap and under ``nnx.Optimizer``;
- the docs' recipes (docs/recipes.md, docs/devices.md), run as written.

With the engine's side (check_params at init, the non-finite state guard,
the overflow-safe projection and layer norms), every test here is a plain
test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import chex
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._src import base
from sam_optax._src import engine
from sam_optax._src import lightsam as lightsam_lib
from tests import doc_blocks
from tests import helpers
from tests.helpers import make_batch, mlp_loss, mlp_params

NAN, INF = float("nan"), float("inf")


def f64_norm(tree):
  return float(np.sqrt(sum(
      np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)
  )))


def f64_vdot(a, b):
  return float(sum(
      np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ))


# --------------------------------------------------------------------------
# 1. Overflow-safe norms.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-3, 1.0, 1e3, 1e19, 1e25, 1e30])
def test_tree_norm_matches_float64_at_every_scale(scale):
  rng = np.random.default_rng(0)
  tree = {
      "a": jnp.asarray(rng.standard_normal((4, 3)) * scale, jnp.float32),
      "b": [jnp.asarray(rng.standard_normal(5) * scale, jnp.float32),
            jnp.zeros((0, 2), jnp.float32)],
      "c": None,
  }
  want = f64_norm(tree)
  np.testing.assert_allclose(float(base.tree_norm(tree)), want, rtol=1e-6)
  other = jax.tree.map(lambda x: x * 0.5 + scale * 0.1, tree)
  np.testing.assert_allclose(
      float(base.tree_projection_coef(other, tree)),
      f64_vdot(other, tree) / want**2, rtol=1e-5)
  if scale >= 1e19:  # the plain squared sum overflows: why the scaled form exists
    assert not np.isfinite(float(base.tree_sq_norm(tree))) or scale < 1e20


@pytest.mark.parametrize("jit", [False, True])
def test_tree_norm_leaves_of_very_different_magnitudes(jit):
  """Each leaf's norm is taken at its own power-of-two scale, then the norm
  of the leaf norms: leaves of 1e30 beside 1e-30, a zero leaf beside tiny
  ones, a single tiny leaf, a leaf whose norm overflows only with the
  others."""
  rng = np.random.default_rng(2)
  norm = jax.jit(base.tree_norm) if jit else base.tree_norm

  def leaf(shape, scale):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

  cases = [
      {"big": leaf(5, 1e30), "tiny": leaf(3, 1e-30), "mid": leaf((2, 2), 1.0)},
      {"zero": jnp.zeros(4), "tiny": leaf(3, 1e-30), "tiny2": leaf(2, 1e-35)},
      {"zero": jnp.zeros(4), "a": leaf(6, 1e-20), "b": leaf(6, 1e20)},
      {"one": leaf(7, 1e-36)},
      {"a": leaf(3, 1e3), "b": leaf(3, 1e-3), "c": leaf((2, 3), 1e19),
       "d": jnp.zeros((0,)), "e": leaf(1, 1e-19)},
      {"a": jnp.full(3, 1e38), "b": jnp.full(2, 2e37)},  # norm 1.74e38
  ]
  for tree in cases:
    np.testing.assert_allclose(float(norm(tree)), f64_norm(tree), rtol=2e-6)
  # Non-finite entries beside finite leaves of any scale.
  assert float(norm({"a": leaf(3, 1e-30), "b": jnp.array([1.0, -INF])})) == INF
  assert np.isnan(float(norm({"a": leaf(3, 1e30), "b": jnp.array([NAN]),
                              "c": jnp.array([INF])})))
  assert float(norm({"a": jnp.zeros(3), "b": jnp.zeros(2)})) == 0.0
  # Beyond float32's range: inf, as the plain norm would be.
  assert float(norm({"a": jnp.full(4, 3e38), "b": jnp.full(4, 3e38)})) == INF


def test_tree_norm_is_the_plain_norm_for_ordinary_values():
  rng = np.random.default_rng(1)
  tree = {"a": jnp.asarray(rng.standard_normal(1000), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((7, 9)), jnp.bfloat16),
          "h": jnp.asarray(rng.standard_normal(3), jnp.float16)}
  plain = jnp.sqrt(base.tree_sq_norm(tree))
  np.testing.assert_allclose(float(base.tree_norm(tree)), float(plain), rtol=1e-6)
  np.testing.assert_allclose(float(base.tree_norm(tree)), f64_norm(tree), rtol=1e-5)


def test_tree_norm_zero_empty_nan_inf():
  assert float(base.tree_norm({"a": jnp.zeros(3)})) == 0.0
  assert float(base.tree_norm({})) == 0.0
  assert float(base.tree_norm({"a": jnp.zeros((0,))})) == 0.0
  assert np.isnan(float(base.tree_norm({"a": jnp.array([1.0, NAN])})))
  assert np.isnan(float(base.tree_norm({"a": jnp.array([INF, NAN])})))
  assert float(base.tree_norm({"a": jnp.array([1.0, -INF])})) == INF
  assert float(base.tree_projection_coef({"a": jnp.ones(2)}, {"a": jnp.zeros(2)})) == 0.0
  assert np.isnan(float(base.tree_projection_coef({"a": jnp.ones(2)},
                                                  {"a": jnp.array([1.0, NAN])})))
  # Under jit too.
  np.testing.assert_allclose(
      float(jax.jit(base.tree_norm)({"a": jnp.full(4, 1e20)})), 2e20, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_step_check_tie_and_sort_keep_values_and_find_any_non_finite(jit):
  """base.tie leaves every entry as it was (bit for bit: signed zeros, NaN,
  inf), whatever the scalar it waits for; base.step_finite is true exactly
  when no per-leaf max |x| is NaN or inf (NumPy decides the expected
  flag), with a NaN anywhere in the vector (the sort puts it last)."""
  maybe_jit = jax.jit if jit else (lambda f: f)
  x = jnp.array([-0.0, 0.0, 1.5, -2.0, NAN, INF, -INF], jnp.float32)
  for r in (0.0, 3.0, INF, NAN):
    y = maybe_jit(base.tie)(x, jnp.float32(r))
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32),
                                  np.asarray(x).view(np.uint32))
  tree = {"a": x[:4], "b": jnp.zeros((0,)), "i": jnp.arange(3),
          "c": jnp.array([[1.0, -5.0]], jnp.bfloat16)}
  tied = maybe_jit(base.tie_leaves)(tree, tree, base.leaf_max_abs(tree))
  assert jax.tree.structure(tied) == jax.tree.structure(tree)
  for k in tree:
    np.testing.assert_array_equal(np.asarray(tied[k], np.float32),
                                  np.asarray(tree[k], np.float32))
  np.testing.assert_array_equal(np.asarray(base.leaf_max_abs(tree)),
                                [2.0, 5.0])  # leaf order: a, c (b empty, i int)
  rng = np.random.default_rng(0)
  for trial in range(40):
    v = np.abs(rng.standard_normal(rng.integers(1, 9))).astype(np.float32)
    if trial % 4:
      v[rng.integers(0, v.size)] = (NAN, INF, 3e38)[trial % 3]
    ok, top = maybe_jit(base.step_finite)(jnp.asarray(v))
    assert bool(ok) == bool(np.all(np.isfinite(v))), v
    if np.any(np.isnan(v)):
      assert np.isnan(float(top))
    else:
      assert float(top) == float(np.max(v))
  ok, top = base.step_finite(jnp.zeros((0,), jnp.float32))
  assert bool(ok) and float(top) == 0.0


def test_tree_max_abs_matches_numpy_with_nan_of_either_sign_inf_subnormals():
  """The leaves' maxima are combined on their bit patterns: the result is
  NumPy's max of |x| (NaN when any entry is NaN, whatever its sign bit),
  subnormals and -0.0 included, eagerly and under jit."""
  rng = np.random.default_rng(3)
  neg_nan = np.frombuffer(np.uint32(0xFFC00001).tobytes(), np.float32)[0]
  specials = [np.float32(1e-41), np.float32(-3e-45), np.float32(-0.0),
              np.float32(INF), np.float32(-INF), np.float32(NAN), neg_nan]
  for trial in range(30):
    tree = [rng.standard_normal(shape).astype(np.float32)
            * np.float32(10.0 ** rng.integers(-44, 38))
            for shape in [(3,), (2, 2), (), (0,), (4,)]]
    if trial % 3:
      leaf = tree[int(rng.choice([0, 1, 4]))]
      leaf.flat[0] = specials[trial % len(specials)]
    flat = np.concatenate([np.abs(x).ravel() for x in tree])
    want = np.max(flat)
    for fn in (base.tree_max_abs, jax.jit(base.tree_max_abs)):
      got = float(fn([jnp.asarray(x) for x in tree]))
      if np.isnan(want):
        assert np.isnan(got), (trial, got)
      else:
        assert got == want, (trial, got, want)


def test_finiteness_check_is_compiled_once_not_into_every_leaf():
  """A state of many leaves kept or dropped on ``tree_all_finite`` of as
  many leaves: the compiled program has a few max operations per leaf. A
  float max over the stacked leaf maxima became, in XLA, a chain of one
  max per leaf copied into every leaf's select (50 leaves: 2,500)."""
  grads = [jax.ShapeDtypeStruct((4, 3 + i % 3), jnp.float32) for i in range(50)]
  masks = [jax.ShapeDtypeStruct(g.shape, bool) for g in grads]

  def keep(g, old):
    new = [x > 0 for x in g]
    return base.tree_select(base.tree_all_finite(g), new, old)

  text = jax.jit(keep).lower(grads, masks).compile().as_text()
  assert text.count(" maximum(") <= 3 * len(grads), text.count(" maximum(")


def test_sam_perturbation_has_radius_rho_for_huge_gradients():
  """SAM's NormBall uses base.tree_norm: a 1e20 gradient is no longer e = 0."""
  params = {"w": jnp.zeros(3)}
  for scale in (1e-20, 1.0, 1e20, 1e30):
    g = {"w": jnp.array([1.0, -2.0, 2.0]) * scale}
    step = engine.Step(updates=g, grads=g, params=params, batch=None,
                       count=jnp.zeros((), jnp.int32), rho=jnp.float32(0.05),
                       axis_name=None, eps=1e-12, loss=None)
    e, _ = sam_optax.parts.global_norm().perturb(step, None, engine.Where())
    want = 0.05 * np.array([1.0, -2.0, 2.0]) / 3.0
    if scale < 1e-12:  # the eps guard dominates a tiny gradient, as documented
      continue
    np.testing.assert_allclose(np.asarray(e["w"]), want, rtol=1e-5)


# --------------------------------------------------------------------------
# 2. LightSAM: non-finite steps and overflow.
# --------------------------------------------------------------------------

UPDATES = {
    "adagrad_norm": lightsam_lib.scale_by_adagrad_norm,
    "adagrad": lightsam_lib.scale_by_adagrad,
    "adam": lightsam_lib.scale_by_adam_no_bias_correction,
}
VARIANTS = tuple(UPDATES)


def _grads(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"a": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal(4), jnp.bfloat16)}
          for _ in range(n)]


def _poison(g, value):
  return {"a": g["a"].at[1, 0].set(value), "b": g["b"]}


def _assert_same_tree(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("jit", [False, True])
def test_descent_state_ignores_a_non_finite_gradient(variant, bad, jit):
  tx = UPDATES[variant]()
  update = jax.jit(tx.update) if jit else tx.update
  gs = _grads(6)
  k = 2
  st_bad = st_ref = tx.init(gs[0])
  for t, g in enumerate(gs):
    if t == k:
      out, st_bad = update(_poison(g, bad), st_bad)
      assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
      continue  # the reference run never saw step k
    out_bad, st_bad = update(g, st_bad)
    out_ref, st_ref = update(g, st_ref)
    _assert_same_tree(out_bad, out_ref)
    _assert_same_tree(st_bad, st_ref)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out_bad))


def _step(g, params):
  return helpers.engine_step(g, params, rho=0.3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_ascent_state_ignores_a_non_finite_gradient(variant, bad):
  geo = sam_optax.parts.adaptive_perturbation(variant)
  gs = [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in _grads(5, 1)]
  params = jax.tree.map(jnp.zeros_like, gs[0])
  st_bad = st_ref = geo.init(params)
  for t, g in enumerate(gs):
    if t == 1:
      e, st_bad = geo.perturb(_step(_poison(g, bad), params), st_bad, engine.Where())
      assert not bool(jnp.all(jnp.isfinite(e["a"])))  # carried, not hidden
      continue
    e_bad, st_bad = geo.perturb(_step(g, params), st_bad, engine.Where())
    e_ref, st_ref = geo.perturb(_step(g, params), st_ref, engine.Where())
    _assert_same_tree(e_bad, e_ref)
    _assert_same_tree(st_bad, st_ref)


def test_squared_accumulators_are_readable():
  tx = sam_optax.scale_by_adagrad_norm(eps=1e-3)
  g = {"a": jnp.array([3.0, 4.0])}
  _, st = tx.update(g, tx.init(g))
  np.testing.assert_allclose(float(st.sum_of_squares), 1e-6 + 25.0, rtol=1e-6)
  st2 = lightsam_lib.scale_by_adam_no_bias_correction(eps=1e-3).init(g)
  np.testing.assert_allclose(np.asarray(st2.nu["a"]), 1e-6, rtol=1e-6)


def _linear_loss(scale):
  def loss_fn(w, x):
    return scale * jnp.sum(w["w"] * x)
  return loss_fn


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale", [1e19, 1e25, 1e30])
def test_lightsam_is_scale_free_for_huge_gradients(variant, scale):
  """A 1e19+ gradient used to square to inf and make every later update 0.

  On a linear loss the AdaGrad rules are invariant to the loss's scale
  (eps is negligible against both), so the huge run matches the unit one.
  """
  x = jnp.array([1.0, -2.0, 0.5])
  runs = []
  for s in (1.0, scale):
    loss_fn = _linear_loss(s)
    tx = sam_optax.lightsam(loss_fn, 0.1, 0.05, variant=variant)
    w = {"w": jnp.zeros(3)}
    st = tx.init(w)
    outs = []
    for _ in range(4):
      g = jax.grad(loss_fn)(w, x)
      u, st = tx.update(g, st, w, batch=x)
      w = optax.apply_updates(w, u)
      outs.append(np.asarray(u["w"]))
    runs.append(np.stack(outs))
  assert np.all(np.isfinite(runs[1])) and np.all(np.abs(runs[1][-1]) > 0)
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4)


def _trap_loss(params, batch):
  """Finite with a finite gradient at the clean point ``batch["w0"]``; its
  gradient is NaN anywhere else (the perturbed point) when ``poison``."""
  x, y = batch["xy"]
  base_loss = mlp_loss(params, (x, y))
  same = jnp.all(jnp.stack([jnp.all(p == q) for p, q in zip(
      jax.tree.leaves(params), jax.tree.leaves(batch["w0"]))]))
  k = jax.lax.stop_gradient(jnp.where(same, 0.0, batch["poison"]))
  return base_loss + k * sum(jnp.sum(p) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("where", ["grad", "batch"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_lightsam_non_finite_step_leaves_accumulators(variant, where, bad):
  ref = _lightsam_run_kw(variant, None)
  got = _lightsam_run_kw(variant, (where, bad))
  _assert_same_tree(got, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lightsam_nan_only_at_the_perturbed_point(variant):
  ref = _lightsam_run_kw(variant, None)
  got = _lightsam_run_kw(variant, ("perturbed", NAN))
  _assert_same_tree(got, ref)


def test_lightsam_nan_at_the_perturbed_point_spares_the_descent():
  """What lightsam.py controls already holds: the descent half's state is
  untouched by a step whose only NaN is the perturbed gradient."""
  params = mlp_params()
  for variant in VARIANTS:
    tx = sam_optax.lightsam(_trap_loss, 0.05, variant=variant)
    st = tx.init(params)
    for poison in (0.0, NAN):
      batch = {"xy": make_batch(), "w0": params, "poison": jnp.float32(poison)}
      g = jax.grad(_trap_loss)(params, batch)
      assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
      u, new = tx.update(g, st, params, batch=batch)
      if poison == 0.0:
        st = new
        continue
      assert not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(u))
      _assert_same_tree(new[1], st[1])


@functools.lru_cache(maxsize=None)
def _lightsam_jitted(variant):
  """One transform and one compiled update per variant, shared by the runs
  that are compared (the same program on both sides)."""
  tx = sam_optax.lightsam(_trap_loss, 0.05, variant=variant)
  return tx, jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))


def _step_inputs(params, t, inject):
  """Step t's batch and clean gradient, with ``inject = (where, value)``
  put into the batch, at the perturbed point only, or into the gradient."""
  xy = make_batch(seed=t)
  where, value = inject or (None, None)
  if where == "batch":
    xy = (xy[0].at[0, 0].set(value), xy[1])
  poison = value if where == "perturbed" else 0.0
  batch = {"xy": xy, "w0": params, "poison": jnp.float32(poison)}
  g = jax.grad(_trap_loss)(params, batch)
  if where == "grad":
    g = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(value), g)
  return batch, g


def _lightsam_run_kw(variant, inject, k=2, steps=5):
  params = mlp_params()
  tx, upd = _lightsam_jitted(variant)
  st = tx.init(params)
  for t in range(steps):
    if t == k and inject is None:
      continue  # the reference run: step k never happens
    batch, g = _step_inputs(params, t, inject if t == k else None)
    u, st = upd(g, st, params, batch)
    if t == k:
      assert not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(u))
      continue  # the user's check (apply_if_finite) drops the update
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(u))
    params = optax.apply_updates(params, u)
  sam_state, descent, _ = st
  return sam_state.geometry, descent, params


# --------------------------------------------------------------------------
# 3. Argument errors.
# --------------------------------------------------------------------------

CONSTRUCTORS = {
    "sam": {}, "asam": {}, "gnp": {}, "layerwise_sam": {},
    "ssam_fisher": {"update_every": 1}, "ssam_dynamic": {"update_every": 1, "total_steps": 10},
    "looksam": {}, "vsam": {}, "lightsam": {"learning_rate": 0.1},
}


@pytest.mark.parametrize("ctor", sorted(CONSTRUCTORS))
@pytest.mark.parametrize("rho", [INF, -INF, NAN, 1j, 1 + 0j, "0.1", None, [0.1]])
def test_rho_must_be_a_finite_real(ctor, rho):
  if rho is None and ctor == "lightsam":
    pytest.skip("lightsam's rho=None takes the variant's default")
  with pytest.raises(ValueError, match="rho"):
    getattr(sam_optax, ctor)(mlp_loss, rho=rho, **CONSTRUCTORS[ctor])


def test_ssam_fixed_mask_rho_checked():
  mask = jax.tree.map(lambda x: jnp.ones(x.shape, bool), mlp_params())
  for rho in (INF, 1j):
    with pytest.raises(ValueError, match="rho"):
      sam_optax.ssam(mlp_loss, rho=rho, mask=mask)


@pytest.mark.parametrize("lr", [None, "0.1", 1j, INF, NAN, 0.0])
def test_lightsam_learning_rate(lr):
  with pytest.raises(ValueError, match="learning_rate"):
    sam_optax.lightsam(mlp_loss, learning_rate=lr)


def test_schedules_and_traced_values_still_pass():
  sam_optax.sam(mlp_loss, rho=optax.linear_schedule(0.0, 0.1, 10))
  sam_optax.lightsam(mlp_loss, learning_rate=optax.cosine_decay_schedule(1.0, 10))
  jax.jit(lambda r: sam_optax.sam(mlp_loss, rho=r).init(mlp_params()).count)(0.1)


def test_check_seed():
  for ok in (0, 7, 2**32 - 1, np.int64(5), np.uint32(2**32 - 1), jnp.asarray(3)):
    base.check_seed("seed", ok)
  for bad in (-1, 2**32, 2**40, 1.5, "0", None, True, jnp.ones(2, jnp.int32)):
    with pytest.raises(ValueError, match="seed"):
      base.check_seed("seed", bad)
  jax.jit(lambda s: base.check_seed("seed", s))(3)  # traced: unchecked


@pytest.mark.parametrize("ctor", ["vsam", "ssam_dynamic"])
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_out_of_range_rejected_at_construction(ctor, seed):
  with pytest.raises(ValueError, match="seed"):
    getattr(sam_optax, ctor)(mlp_loss, seed=seed, **CONSTRUCTORS[ctor])


@pytest.mark.parametrize("ctor", sorted(CONSTRUCTORS))
@pytest.mark.parametrize("rho", [True, np.bool_(False), jnp.asarray(True)])
def test_rho_refuses_booleans(ctor, rho):
  """rho=True was read as 1.0."""
  with pytest.raises(ValueError, match="rho: expected a real number, got the boolean"):
    getattr(sam_optax, ctor)(mlp_loss, rho=rho, **CONSTRUCTORS[ctor])


@pytest.mark.parametrize("ctor", sorted(CONSTRUCTORS))
def test_has_aux_must_be_a_bool(ctor):
  """has_aux="False" was stored as bool("False"), True."""
  for bad in ("False", 0, None):
    with pytest.raises(ValueError, match="has_aux must be True or False"):
      getattr(sam_optax, ctor)(mlp_loss, has_aux=bad, **CONSTRUCTORS[ctor])
  getattr(sam_optax, ctor)(mlp_loss, has_aux=np.False_, **CONSTRUCTORS[ctor])


@pytest.mark.parametrize("ctor", sorted(CONSTRUCTORS))
def test_updates_must_match_params(ctor):
  """A gradient leaf of another shape broadcast into w + e and into the
  output ((1, n) for an (n,) weight, a scalar), and an integer one had the
  result cast to integers: each is refused, naming the leaf."""
  params, batch = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(params, batch)
  tx = getattr(sam_optax, ctor)(mlp_loss, **CONSTRUCTORS[ctor])
  state = tx.init(params)
  b1 = params["l1"]["bias"]
  cases = [
      ({**g, "l1": {**g["l1"], "bias": g["l1"]["bias"][None]}},
       rf"leaves differ in shape from params: \['l1/bias: \(1, {b1.size}\) "
       rf"vs \({b1.size},\)'\]"),
      ({**g, "l1": {**g["l1"], "bias": jnp.float32(0.3)}},
       rf"leaves differ in shape from params: \['l1/bias: \(\) vs \({b1.size},\)'\]"),
      ({**g, "l1": {**g["l1"], "bias": jnp.ones(b1.shape, jnp.int32)}},
       r"must have floating-point leaves .*\['l1/bias \(int32\)'\]"),
  ]
  for bad, message in cases:
    for run in (lambda u: tx.update(u, state, params, batch=batch),
                jax.jit(lambda u: tx.update(u, state, params, batch=batch))):
      with pytest.raises(ValueError, match=message):
        run(bad)
  with pytest.raises(ValueError, match=(
      r"updates \(the gradient passed to tx.update\) does not match the "
      r"structure of params: missing paths \['l2/bias', 'l2/kernel'\]")):
    tx.update({"l1": g["l1"]}, state, params, batch=batch)


def test_updates_of_another_float_dtype_are_accepted():
  """float32 gradients of bfloat16 weights (and the reverse) pass the
  check: only shape, structure and a floating dtype are required."""
  params, batch = mlp_params(), make_batch()
  tx = sam_optax.sam(mlp_loss, rho=0.05)
  g = jax.grad(mlp_loss)(params, batch)
  out, _ = tx.update(jax.tree.map(lambda x: x.astype(jnp.bfloat16), g),
                     tx.init(params), params, batch=batch)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out, _ = tx.update(g, tx.init(p16), p16, batch=batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))


def test_check_params():
  ok = {"a": jnp.ones(2), "b": jnp.ones(2, jnp.bfloat16), "c": jnp.ones(0, jnp.float16),
        "d": None, "e": np.float32(1.0), "f": []}
  base.check_params(ok)
  # A Python float is not an array (the methods read .dtype): refused.
  with pytest.raises(ValueError, match=r"Python floats.*'?e \(1.0\)"):
    base.check_params({**ok, "e": 1.0})
  with pytest.raises(ValueError, match=r"params has complex leaves.*'?z/0 \(complex64\)"):
    base.check_params({"z": [jnp.ones(2, jnp.complex64)], "a": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"not floating point.*step \(int32\).*freeze"):
    base.check_params({"step": jnp.zeros((), jnp.int32), "a": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"mask \(bool\)"):
    base.check_params({"mask": jnp.zeros(3, bool)})
  with pytest.raises(ValueError, match=r"^weights has"):
    base.check_params({"i": 3}, name="weights")


def test_lightsam_init_rejects_integer_and_complex_leaves():
  tx = sam_optax.lightsam(mlp_loss, 0.1)
  with pytest.raises(ValueError, match=r"table \(int32\)"):
    tx.init({**mlp_params(), "table": jnp.arange(3)})
  with pytest.raises(ValueError, match=r"complex"):
    tx.init({"w": jnp.ones(3, jnp.complex64)})


@pytest.mark.parametrize("ctor", sorted(set(CONSTRUCTORS) - {"lightsam"}))
def test_every_method_rejects_integer_and_complex_leaves_at_init(ctor):
  tx = getattr(sam_optax, ctor)(mlp_loss, **CONSTRUCTORS[ctor])
  with pytest.raises(ValueError, match=r"table \(int32\)"):
    tx.init({**mlp_params(), "table": jnp.arange(3)})
  with pytest.raises(ValueError, match=r"complex"):
    tx.init({"w": jnp.ones(3, jnp.complex64)})


# --------------------------------------------------------------------------
# 4. stats() under pmap and nnx.
# --------------------------------------------------------------------------


def test_stats_keep_the_device_axis_under_pmap():
  n = jax.local_device_count()
  assert n > 1  # conftest forces 8 CPU devices
  loss_fn = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)  # noqa: E731
  sam_tx = sam_optax.ssam_dynamic(loss_fn, sparsity=0.5, update_every=1,
                                  total_steps=10, axis_name="d")
  tx = optax.chain(sam_tx, optax.sgd(0.1))
  params = jnp.ones((4, 1))
  state = jax.pmap(tx.init)(jnp.broadcast_to(params, (n, 4, 1)))
  st = sam_optax.stats(state)
  assert set(st) >= {"count", "grad_evals", "mask_density", "mask_refreshes"}
  for k, v in st.items():
    assert v.shape[0] == n, (k, v.shape)
  single = sam_optax.stats(tx.init(params))
  for k in single:
    np.testing.assert_allclose(np.asarray(st[k][0]), np.asarray(single[k]))
  # Inside the compiled step the values are the device's own (no axis).
  inner = jax.pmap(lambda s: sam_optax.stats(s)["mask_density"], axis_name="d")(state)
  np.testing.assert_allclose(np.asarray(inner), np.asarray(st["mask_density"]))


def test_stats_unwraps_nnx_optimizer_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model)

  def loss_fn(params, batch):
    return jnp.mean(nnx.merge(graphdef, params, copy=True)(batch) ** 2)

  tx = optax.chain(sam_optax.ssam_dynamic(loss_fn, update_every=1, total_steps=5),
                   optax.sgd(0.1))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((4, 3))
  grads = jax.grad(loss_fn)(nnx.state(model, nnx.Param), x)
  opt.update(model, grads, batch=x)
  st = sam_optax.stats(opt.opt_state)
  assert int(st["count"]) == 1 and int(st["grad_evals"]) == 1
  for k, v in st.items():
    assert isinstance(v, jax.Array), (k, type(v))
  assert 0.0 < float(st["mask_density"]) <= 1.0


# --------------------------------------------------------------------------
# 5. The docs' recipes, run as written.
# --------------------------------------------------------------------------

def _run(name):
  """The example block ``name`` of the docs (docs/recipes.md, docs/devices.md)."""
  return doc_blocks.run(doc_blocks.example(name), f"example:{name}")


def test_readme_trainstate_recipe():
  scope = _run("trainstate")
  assert float(scope["loss"]) < 1e-2
  st = sam_optax.stats(scope["opt_state"])
  assert int(st["count"]) == int(st["grad_evals"]) == 100


def test_plain_trainstate_apply_gradients_is_the_reported_failure():
  """Why the recipe exists: Flax sends ``batch`` to .replace, not tx.update."""
  from flax.training import train_state
  params = mlp_params()
  state = train_state.TrainState.create(
      apply_fn=None, params=params,
      tx=optax.chain(sam_optax.sam(mlp_loss), optax.sgd(0.1)))
  g = jax.grad(mlp_loss)(params, make_batch())
  with pytest.raises(ValueError, match="batch"):
    state.apply_gradients(grads=g, batch=make_batch())


def test_readme_nnx_optimizer_recipe():
  scope = _run("nnx_optimizer")
  assert float(scope["loss"]) < 1e-2
  st = sam_optax.stats(scope["opt_state"])
  assert int(st["count"]) == int(st["grad_evals"]) == 100
  assert all(isinstance(v, jax.Array) for v in st.values())


def test_readme_equinox_recipe():
  pytest.importorskip("equinox")
  scope = _run("equinox")
  assert float(scope["loss"]) < 0.05
  st = sam_optax.stats(scope["opt_state"])
  assert int(st["grad_evals"]) == 100


def test_readme_pmap_stats_recipe():
  scope = _run("pmap_stats")
  n = jax.local_device_count()
  for k, v in scope["stats"].items():
    assert v.shape == (n,), k
  assert int(scope["stats"]["count"][0]) == 5


def test_readme_apply_if_finite_recipe():
  scope = _run("apply_if_finite")
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(scope["params"]))


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_apply_if_finite_placement(placement):
  """NaN only at the perturbed point: only the inner placement catches it."""
  sam_tx = sam_optax.sam(_trap_loss, rho=0.05)
  if placement == "outside":
    tx = optax.apply_if_finite(optax.chain(sam_tx, optax.sgd(0.1)), 5)
  else:
    tx = optax.chain(sam_tx, optax.apply_if_finite(optax.sgd(0.1), 5))
  _, u, _ = _trap_step(tx)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert finite == (placement == "inside")


def _trap_step(tx):
  """One update of ``tx`` on ``_trap_loss`` with a NaN only at the
  perturbed point (the clean gradient is finite): (state before, update,
  state after)."""
  params = mlp_params()
  st0 = tx.init(params)
  batch = {"xy": make_batch(), "w0": params, "poison": jnp.float32(NAN)}
  g = jax.grad(_trap_loss)(params, batch)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  u, st = tx.update(g, st0, params, batch=batch)
  return st0, u, st


@pytest.mark.parametrize("placement", ["outside", "after"])
def test_apply_if_finite_with_lightsam(placement):
  """LightSAM is the whole optimizer: apply_if_finite around it tests the
  clean gradient only; chained after it (on optax.identity) it tests the
  update, which carries the perturbed gradient's NaN, and drops it. Either
  way LightSAM's accumulators ignore the non-finite step."""
  light = sam_optax.lightsam(_trap_loss, 0.3, rho=0.05)
  if placement == "outside":
    tx = optax.apply_if_finite(light, 5)
  else:
    tx = optax.chain(light, optax.apply_if_finite(optax.identity(), 5))
  st0, u, st = _trap_step(tx)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert finite == (placement == "after")
  if placement == "after":
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  assert int(sam_optax.stats(st)["count"]) == 0
  def kept(s):  # LightSAM's state but grad_evals (it counts the work done)
    s = s.inner_state if placement == "outside" else s[0]
    return [x for path, x in jax.tree_util.tree_flatten_with_path(s)[0]
            if "grad_evals" not in jax.tree_util.keystr(path)]
  chex.assert_trees_all_equal(kept(st), kept(st0))


def test_readme_lightsam_accumulation_recipe():
  scope = _run("lightsam_accumulation")
  assert float(scope["loss"]) < 0.5
  st = sam_optax.stats(scope["opt_state"])
  assert int(st["count"]) == 40  # micro-steps
  assert int(st["grad_evals"]) == 40


def test_lightsam_accumulation_chain_is_lightsam_at_k1():
  """The recipe's chain with every_k_schedule=1 is lightsam itself."""
  params = mlp_params()
  a = sam_optax.lightsam(mlp_loss, 0.3, 0.1)
  b = optax.chain(
      sam_optax.sharpness_aware(mlp_loss, rho=0.1,
                                geometry=sam_optax.parts.adaptive_perturbation("adagrad_norm")),
      optax.MultiSteps(optax.chain(sam_optax.scale_by_adagrad_norm(),
                                   optax.scale_by_learning_rate(0.3)),
                       every_k_schedule=1).gradient_transformation())
  sa, sb = a.init(params), b.init(params)
  pa = pb = params
  for t in range(3):
    batch = make_batch(seed=t)
    ua, sa = a.update(jax.grad(mlp_loss)(pa, batch), sa, pa, batch=batch)
    ub, sb = b.update(jax.grad(mlp_loss)(pb, batch), sb, pb, batch=batch)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  chex_close = lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)  # noqa: E731
  jax.tree.map(chex_close, pa, pb)


def test_multisteps_counts_micro_steps():
  """looksam(k=2) under 3 micro-steps per update: the gate counts micro-steps."""
  k_micro = 3
  tx = optax.chain(sam_optax.looksam(mlp_loss, k=2),
                   optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k_micro)
                   .gradient_transformation())
  params = mlp_params()
  st = tx.init(params)
  update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  for t in range(6):
    batch = make_batch(seed=t)
    u, st = update(jax.grad(mlp_loss)(params, batch), st, params, batch)
    params = optax.apply_updates(params, u)
  s = sam_optax.stats(st)
  assert int(s["count"]) == 6            # micro-steps, not the 2 updates
  assert int(s["grad_evals"]) == 3       # every 2nd micro-step


def test_looksam_reuse_steps_with_huge_gradients():
  """LookSAM on a cubic scaled by 1e20: outputs scale with the loss (a
  loss whose perturbed gradient is not parallel to the clean one, so that
  the stored orthogonal part is not rounding noise)."""
  x = jnp.array([1.0, -2.0, 0.5])
  outs = []
  for scale in (1.0, 1e20):
    def loss_fn(w, b, s=scale):
      return s * (jnp.sum((w["w"] - b) ** 2) + jnp.sum(w["w"] ** 3))
    tx = sam_optax.looksam(loss_fn, rho=0.1, k=2)
    w = {"w": jnp.array([0.3, -0.1, 0.2])}
    st = tx.init(w)
    run = []
    for _ in range(4):
      u, st = tx.update(jax.grad(loss_fn)(w, x), st, w, batch=x)
      run.append(np.asarray(u["w"], np.float64) / scale)
    outs.append(np.stack(run))
  assert np.all(np.isfinite(outs[1]))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# The target for every method: a non-finite step is as if it never
# happened (the engine's guard keeps count and every part's state).
# --------------------------------------------------------------------------

METHODS = {
    "sam": {}, "asam": {}, "gnp": {}, "layerwise_sam": {"select_by": "gradient"},
    "ssam_fisher": {"update_every": 2, "num_samples": 4,
                    "batch_axes": {"xy": 0, "w0": None, "poison": None}},
    "ssam_dynamic": {"update_every": 2, "total_steps": 10},
    # vsam: step 2 (the injected one) is a warm-up step, so the perturbed
    # point is evaluated there (a reuse step never evaluates it)
    "looksam": {"k": 2}, "vsam": {"window": 4, "blocks": 2, "warmup_steps": 3},
    "lightsam": {"learning_rate": 0.05},
}
@functools.lru_cache(maxsize=None)
def _method_jitted(name):
  tx = getattr(sam_optax, name)(_trap_loss, **METHODS[name])
  return tx, jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))


def _method_run(name, inject, k=2, steps=5):
  tx, upd = _method_jitted(name)
  params = mlp_params()
  st = tx.init(params)
  for t in range(steps):
    if t == k and inject is None:
      continue  # the reference run: step k never happens
    batch, g = _step_inputs(params, t, inject if t == k else None)
    u, st = upd(g, st, params, batch)
    if t == k:
      assert not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(u))
      continue
    params = optax.apply_updates(params, u)
  # count and grad_evals are the step's bookkeeping, not its values
  stats = {k: v for k, v in sam_optax.stats(st).items()
           if k not in ("count", "grad_evals")}
  return params, stats, jax.tree.leaves(st)


def _cases():
  for name in sorted(METHODS):
    for where in ("grad", "batch", "perturbed"):
      yield pytest.param(name, where, id=f"{name}-{where}")


@pytest.mark.parametrize("name,where", list(_cases()))
def test_non_finite_step_is_as_if_it_never_happened(name, where):
  ref_params, ref_stats, _ = _method_run(name, None)
  for value in (NAN, INF):
    params, stats, _ = _method_run(name, (where, value))
    _assert_same_tree(params, ref_params)
    _assert_same_tree(stats, ref_stats)


def test_layerwise_selection_with_huge_gradients():
  """The layer with the larger gradient is chosen whatever the scale."""
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
  for scale in (1.0, 1e20):
    def loss_fn(p, x, s=scale):
      return s * (jnp.sum(p["a"]["kernel"] * x) + 3.0 * jnp.sum(p["b"]["kernel"] * x))
    tx = sam_optax.layerwise_sam(loss_fn, num_layers=1, select_by="gradient")
    x = jnp.ones((2, 2))
    st = tx.init(params)
    _, st = tx.update(jax.grad(loss_fn)(params, x), st, params, batch=x)
    _, st = tx.update(jax.grad(loss_fn)(params, x), st, params, batch=x)
    names = sam_optax.layer_paths(params)
    assert names[int(sam_optax.stats(st)["selected_layers"][0])] == "b", scale
    ranked = sam_optax.rank_layers(loss_fn, params, [x])
    assert ranked[0][0] == "b" and np.isfinite(ranked[0][1]), (scale, ranked)


@pytest.mark.parametrize("name", ["sam", "fsam", "looksam"])
@pytest.mark.parametrize("scale", [1e30, 5e36, 1e38])
def test_perturbation_does_not_vanish_for_huge_gradients(name, scale):
  """L = scale * |w|² / 2: g = scale * w and the SAM gradient is scale *
  (w + e) with |e| = rho, so |out - g| / (scale * rho) = 1 exactly in real
  arithmetic. rho / |g| underflowed to 0 (flushed) once |g| > 4e36 and
  the step was silently SGD; now it is computed in two scaled factors."""
  w = jnp.asarray([0.3, -0.6, 0.2, 0.5], jnp.float32)
  loss = lambda p, b: b * 0.5 * jnp.sum(p ** 2)  # noqa: E731
  b = jnp.float32(scale)
  tx = getattr(sam_optax, name)(loss, rho=0.05)
  g = jax.grad(loss)(w, b)
  assert bool(jnp.all(jnp.isfinite(g)))
  out, _ = jax.jit(lambda g, s: tx.update(g, s, w, batch=b))(g, tx.init(w))
  diff = np.asarray(out, np.float64) - np.asarray(g, np.float64)
  ratio = np.linalg.norm(diff) / scale / 0.05  # in NumPy: 1/1e38 is subnormal
  assert abs(ratio - 1.0) < 1e-5, (ratio, out, g)


def test_vsam_injected_max_rate_nan_for_one_step_is_not_stored():
  """optax.inject_hyperparams: max_rate NaN at the one step that draws the
  next window, then restored. The rate was clipped to [1, NaN] = NaN and
  stored, and no second gradient was ever computed again (outputs finite,
  nothing flagged). Now the bad value bounds that window's rate to 1 and
  sampling goes on."""
  tx = optax.inject_hyperparams(
      sam_optax.vsam, static_args=("loss_fn", "window", "blocks"))(
          mlp_loss, rho=0.05, warmup_steps=4, window=4, blocks=2,
          max_rate=1.0, initial_rate=2.0)
  params = mlp_params()
  state = tx.init(params)
  step = jax.jit(lambda s, b: tx.update(jax.grad(mlp_loss)(params, b), s,
                                        params, batch=b))
  late = 0
  for c in range(40):
    state.hyperparams["max_rate"] = jnp.float32(np.nan if c == 6 else 1.0)
    before = int(sam_optax.stats(state)["grad_evals"])
    _, state = step(state, make_batch(seed=c))
    late += (int(sam_optax.stats(state)["grad_evals"]) - before) * (c >= 12)
  gate = state.inner_state.gate
  assert np.isfinite(float(gate.rate)) and np.isfinite(float(gate.next_rate))
  assert float(gate.rate) >= 1.0
  assert late >= 7  # at least one second gradient per window of 4 after it


def test_fsam_non_finite_lmbda_for_one_step_is_not_stored():
  """A lmbda schedule that is NaN at step 1 only: step 1's output was
  finite but NaN went into the momentum, and every later step was NaN (the
  count stuck at 2). The momentum now keeps its value that step, and the
  run equals one whose lmbda is 1 at step 1."""
  def run(bad):
    lm = lambda c: jnp.where(c == 1, bad, 0.9)  # noqa: E731
    tx = sam_optax.fsam(mlp_loss, lmbda=lm)
    p, s = mlp_params(), None
    s = tx.init(p)
    outs = []
    for t in range(5):
      b = make_batch(seed=t)
      u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
      outs.append(u)
      p = optax.apply_updates(p, jax.tree.map(lambda x: -0.1 * x, u))
    return outs, s
  outs, state = run(jnp.nan)
  assert int(sam_optax.stats(state)["count"]) == 5
  for u in outs:
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  ref, _ = run(1.0)
  chex.assert_trees_all_equal(outs, ref)


@pytest.mark.parametrize("bad", [np.inf, np.nan, -1.0, 2.0])
def test_ssam_dynamic_injected_drop_rate_out_of_range_keeps_k(bad):
  """An injected drop_rate out of [0, 1] at one refresh: the mask keeps
  exactly K entries (an infinite rate emptied it; NaN went through an
  int32 cast whose result depends on the platform). Out-of-range values are
  clipped, NaN read as 0 (nothing dropped: the mask as it was)."""
  tx = optax.inject_hyperparams(
      sam_optax.ssam_dynamic,
      static_args=("loss_fn", "update_every", "total_steps", "seed"))(
          mlp_loss, 0.05, 0.5, update_every=1, total_steps=100)
  params = mlp_params()
  state = tx.init(params)
  n = sum(x.size for x in jax.tree.leaves(params))
  k = n - n // 2
  # Under jit (eagerly the concrete value is range-checked, with an error).
  step = jax.jit(lambda s, b: tx.update(jax.grad(mlp_loss)(params, b), s,
                                        params, batch=b))
  masks = []
  for c in range(3):
    state.hyperparams["drop_rate"] = jnp.float32(bad if c == 1 else 0.5)
    _, state = step(state, make_batch(seed=c))
    mask = state.inner_state.region.mask
    assert sum(int(jnp.sum(m)) for m in jax.tree.leaves(mask)) == k
    masks.append(mask)
  if np.isnan(bad) or bad < 0:  # nothing dropped at step 1
    chex.assert_trees_all_equal(masks[1], masks[0])


@pytest.mark.parametrize("seed", [0, 7])
def test_ssam_dynamic_seed_may_be_injected(seed):
  """ssam_dynamic's seed, like vSAM's, may arrive as an array (what
  optax.inject_hyperparams passes for an argument not in static_args): it
  only draws the initial mask and key, so the run equals the one built
  with the Python int (it was refused as if it fixed a shape)."""
  kw = dict(update_every=2, total_steps=10)
  direct = sam_optax.ssam_dynamic(mlp_loss, 0.05, 0.5, seed=seed, **kw)
  injected = optax.inject_hyperparams(
      sam_optax.ssam_dynamic,
      static_args=("loss_fn", "update_every", "total_steps"))(
          mlp_loss, 0.05, 0.5, seed=seed, **kw)
  params = mlp_params()
  s_direct, s_injected = direct.init(params), injected.init(params)
  for t in range(4):
    b = make_batch(seed=t)
    g = jax.grad(mlp_loss)(params, b)
    u_direct, s_direct = direct.update(g, s_direct, params, batch=b)
    u_injected, s_injected = injected.update(g, s_injected, params, batch=b)
    chex.assert_trees_all_equal(u_injected, u_direct)
  chex.assert_trees_all_equal(s_injected.inner_state.region,
                              s_direct.region)
  with pytest.raises(ValueError, match=r"seed must be an integer in \[0, "):
    sam_optax.ssam_dynamic(mlp_loss, seed=jnp.int32(-1), **kw)


def test_sparsity_schedule_nan_is_read_as_zero():
  """A sparsity schedule that is NaN at a refresh: read as 0 (every entry
  perturbed), the same on every platform, not an int32 cast of NaN."""
  sched = lambda c: jnp.where(c == 1, jnp.nan, 0.5)  # noqa: E731
  tx = sam_optax.ssam_fisher(mlp_loss, sparsity=sched, num_samples=2,
                             update_every=1)
  params = mlp_params()
  state = tx.init(params)
  dens = []
  for c in range(3):
    b = make_batch(seed=c)
    _, state = tx.update(jax.grad(mlp_loss)(params, b), state, params, batch=b)
    dens.append(float(sam_optax.stats(state)["mask_density"]))
  assert dens[1] == 1.0 and abs(dens[0] - 0.5) < 0.05 and abs(dens[2] - 0.5) < 0.05
