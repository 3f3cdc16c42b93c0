"""Numbers at the edges, against float64 NumPy (review of session 9).

- Finite gradients whose global norm is past float32's range (about
  3.4e38): every norm-normalised perturbation and ratio is the rule's, not
  ``rho * g / inf = 0`` (which silently returned the clean gradient) or
  ASAM's ``T**2 g = inf``.
- A step that the engine rejects (a non-finite clean or second gradient: the
  state and its count stay as they were) has a non-finite output for every
  method, also when no non-finite value reaches the method's own output
  (Sparse SAM and layer-wise SAM do not read the clean gradient outside
  their mask), so ``optax.apply_if_finite`` skips it.
- Low-precision parameters with float32 gradients: the methods' arithmetic
  and stored gradients are float32 (the docs' promise); a radius schedule
  under ``jit`` runs (the two branches of its ``lax.cond`` had different
  output dtypes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers

F32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------
# 1. Norms past float32's range.
# --------------------------------------------------------------------------

# grad L = c * w + w**2 (element-wise): the gradient at any point is exact
# to compute in float64.
def cubic_loss(w, c):
  return sum(jnp.sum(c[k] * w[k] ** 2) / 2 + jnp.sum(w[k] ** 3) / 3 for k in w)


def cubic_grad64(w, c):
  return {k: np.asarray(c[k], np.float64) * w[k] + w[k] ** 2 for k in w}


W = {"a": np.array([0.5, -0.3, 0.2]), "b": np.array([[0.1, -0.4], [0.3, 0.25]])}
C = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([[4.0, 1.0], [2.0, 3.0]])}
# Every entry finite (the largest 2e38), the norm about 4.1e38 > 3.4e38.
HUGE = {"a": np.array([2e38, -1.5e38, 1e38]),
        "b": np.array([[1.7e38, -2e38], [1.2e38, 0.5e38]])}


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _norm64(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def _at(e):
  """The rule's output when it is the gradient at ``W + e``."""
  return cubic_grad64({k: W[k] + e[k] for k in W}, C)


def _assert_close(got, want, rtol=2e-5):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k],
                               rtol=rtol, atol=1e-6, err_msg=k)


def _one(tx, g=HUGE, state=None):
  params = _f32(W)
  state = tx.init(params) if state is None else state
  out, state = tx.update(_f32(g), state, params, batch=_f32(C))
  return out, state


def test_huge_gradient_norm_is_past_float32_range():
  assert _norm64(HUGE) > F32_MAX
  assert all(np.all(np.isfinite(np.float32(x))) for x in HUGE.values())


@pytest.mark.parametrize("name", ["sam", "fsam", "looksam", "vsam"])
def test_sam_step_perturbs_at_radius_rho_past_float32_range(name):
  """e = rho g / ‖g‖ (FSAM's first step: d = g), the output ∇L(w + e)."""
  rho = 0.05
  tx = getattr(sam_optax, name)(cubic_loss, rho=rho)
  out, state = _one(tx)
  n = _norm64(HUGE)
  _assert_close(out, _at({k: rho * HUGE[k] / n for k in W}))
  assert int(sam_optax.stats(state)["count"]) == 1


def test_asam_perturbation_past_float32_range():
  """e = rho T² g / ‖T g‖ with T = |w| + eta: T² g (here 1e4² x 1e31) and
  ‖T g‖ are past float32's range, e is not."""
  rho, eta = 0.5, 0.01
  w = {"a": np.array([1e4, -1e4, 2e4]), "b": np.array([[1.0, -2.0], [3.0, 0.5]])}
  g = {"a": np.array([1e31, 2e31, -1e31]), "b": np.array([[1e38, 2e38], [-1e38, 3e38]])}
  tx = sam_optax.asam(cubic_loss, rho=rho, eta=eta)
  params = _f32(w)
  out, state = tx.update(_f32(g), tx.init(params), params, batch=_f32(C))
  t = {k: np.abs(w[k]) + eta for k in w}
  n = _norm64({k: t[k] * g[k] for k in w})
  e = {k: rho * t[k] ** 2 * g[k] / n for k in w}
  want = cubic_grad64({k: w[k] + e[k] for k in w}, C)
  _assert_close(out, want)
  assert int(sam_optax.stats(state)["count"]) == 1


def test_looksam_reuse_step_past_float32_range():
  """LookSAM's skipped step, out = g + alpha ‖g‖ / ‖gv‖ gv, with ‖g‖ past
  float32's range (before: inf / finite or inf / inf)."""
  rho, alpha = 0.05, 0.1
  tx = sam_optax.looksam(cubic_loss, rho=rho, k=2, alpha=alpha)
  _, state = _one(tx)                     # a SAM step: stores gv
  gv = np.concatenate([np.ravel(np.asarray(x, np.float64))
                       for x in jax.tree.leaves(state.combine.gv)])
  g2 = {k: 0.9 * HUGE[k] for k in W}       # the norm still past the range
  assert _norm64(g2) > F32_MAX
  out, state = _one(tx, g2, state)
  scale = alpha * _norm64(g2) / np.linalg.norm(gv)
  gv_tree = jax.tree.map(lambda x: np.asarray(x, np.float64), state.combine.gv)
  _assert_close(out, {k: g2[k] + scale * gv_tree[k] for k in W}, rtol=1e-5)
  assert int(sam_optax.stats(state)["count"]) == 2


def test_gsam_past_float32_range():
  """GSAM (minimize_fp): out = h - alpha (g - <g,h>/‖h‖² h), h = ∇L(w + e)."""
  rho, alpha = 0.05, 0.4
  tx = sam_optax.gsam(cubic_loss, rho=rho, alpha=alpha)
  out, _ = _one(tx)
  n = _norm64(HUGE)
  h = _at({k: rho * HUGE[k] / n for k in W})
  coef = sum(np.sum(HUGE[k] * h[k]) for k in W) / sum(np.sum(h[k] ** 2) for k in W)
  want = {k: h[k] - alpha * (HUGE[k] - coef * h[k]) for k in W}
  _assert_close(out, want, rtol=1e-5)


def test_lightsam_adagrad_norm_past_float32_range():
  """LightSAM-I: e = rho s / sqrt(eps² + ‖s‖²) is the rule's (was 0), the
  descent -lr gs / sqrt(eps² + ‖gs‖²); the ascent's accumulator is then
  past the range (inf), so the next ascent is the rule's float32 value 0."""
  rho, lr, eps = 0.1, 1.0, 1e-8
  tx = sam_optax.lightsam(cubic_loss, lr, rho, eps=eps)
  out, state = _one(tx)
  n = _norm64(HUGE)
  gs = _at({k: rho * HUGE[k] / np.hypot(eps, n) for k in W})
  ngs = np.hypot(eps, _norm64(gs))
  _assert_close(out, {k: -lr * gs[k] / ngs for k in W})
  assert int(sam_optax.stats(state)["count"]) == 1
  # The next step's ascent: rho s / sqrt(u) with u > 1e77: 0 in float32, so
  # the descent follows the clean gradient.
  small = {k: np.full_like(W[k], 0.5) for k in W}
  out2, _ = _one(tx, small, state)
  clean = cubic_grad64(W, C)
  root = np.hypot(ngs, _norm64(clean))
  _assert_close(out2, {k: -lr * clean[k] / root for k in W})


def test_vsam_sampled_ratio_past_float32_range():
  """vSAM's sampled ratio ‖gs - g‖ / ‖g‖ (both norms past the range)."""
  tx = sam_optax.vsam(cubic_loss, rho=0.05)
  _, state = _one(tx)
  assert int(state.gate.samples) == 1
  n = _norm64(HUGE)
  gs = _at({k: 0.05 * HUGE[k] / n for k in W})
  want = _norm64({k: gs[k] - HUGE[k] for k in W}) / n
  np.testing.assert_allclose(float(state.gate.ratio[0]), want, rtol=1e-5)


# --------------------------------------------------------------------------
# 2. A rejected step has a non-finite output, for every method.
# --------------------------------------------------------------------------


def _poisoned(grads, leaf):
  leaves, treedef = jax.tree.flatten(grads)
  leaves[leaf] = leaves[leaf].at[(0,) * leaves[leaf].ndim].set(jnp.inf)
  return jax.tree.unflatten(treedef, leaves)


def _rejected_output(name, leaf, **over):
  tx = helpers.sam_transform(name, **over)
  params, batch = helpers.mlp_params(), helpers.make_batch()
  g = _poisoned(jax.grad(helpers.mlp_loss)(params, batch), leaf)
  state = tx.init(params)
  out, state = tx.update(g, state, params, batch=batch)
  return out, state


@pytest.mark.parametrize("name", helpers.ALL)
def test_a_rejected_step_has_a_non_finite_output(name):
  """inf in the first leaf (the input layer's bias): outside a fixed
  Sparse SAM mask (``ssam_mask``), whose output, the second gradient, then
  never reads it. The state is left as it was, and the output says so
  (before: a finite output for ``ssam_mask``, which ``apply_if_finite``
  applied)."""
  out, state = _rejected_output(name, 0)
  assert int(sam_optax.stats(state)["count"]) == 0
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


def test_apply_if_finite_skips_a_rejected_sparse_step():
  params, batch = helpers.mlp_params(), helpers.make_batch()
  mask = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
  leaves, treedef = jax.tree.flatten(mask)
  leaves[0] = jnp.zeros(leaves[0].shape, bool)  # the poisoned leaf unmasked
  mask = jax.tree.unflatten(treedef, leaves)
  tx = optax.chain(sam_optax.ssam(helpers.mlp_loss, 0.05, mask=mask),
                   optax.apply_if_finite(optax.sgd(0.1), 3))
  state = tx.init(params)
  g = _poisoned(jax.grad(helpers.mlp_loss)(params, batch), 0)
  updates, state = jax.jit(
      lambda g, s: tx.update(g, s, params, batch=batch))(g, state)
  assert int(state[1].notfinite_count) == 1
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(updates))


def test_a_finite_step_output_keeps_its_bits():
  """The check changes nothing on an accepted step: signed zeros included."""
  params = {"w": jnp.array([0.0, 1.0, -2.0])}
  loss = lambda w, b: jnp.sum(b * w["w"])  # gradient b, whatever w
  b = jnp.array([-0.0, 0.0, 3.0])
  tx = sam_optax.sam(loss, rho=0.1)
  out, _ = tx.update({"w": b}, tx.init(params), params, batch=b)
  np.testing.assert_array_equal(np.signbit(out["w"]), np.signbit(b))
  np.testing.assert_array_equal(out["w"], b)


# --------------------------------------------------------------------------
# 3. Low-precision parameters, float32 gradients.
# --------------------------------------------------------------------------

# The gradient of a linear loss is its coefficient, whatever the point, so
# the second gradient is exactly C_LIN (representable in bfloat16) and the
# reference needs no model arithmetic.
C_LIN = np.array([1.5, -0.75, 2.0, 0.5], np.float64)


def linear_loss(w, c):
  return jnp.sum(c * w["w"].astype(jnp.float32))


def _lin_params(dtype):
  return {"w": jnp.array([0.3, -0.2, 0.1, 0.4], dtype)}


def _digits_grad(seed=0):
  """float32 clean gradients with digits bfloat16 cannot hold."""
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(1.0 + rng.random(4) / 3, jnp.float32)}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name,kw,mix", [
    ("gnp", {"alpha": 0.8}, lambda g, h: 0.2 * g + 0.8 * h),
    ("wsam", {"gamma": 0.9}, lambda g, h: (1 - 9.0) * g + 9.0 * h),
])
def test_mixing_is_float32_with_low_precision_params(dtype, name, kw, mix):
  """(1 - a) g + a h in float32: g was rounded to the params' dtype first
  (GNP 3.5e-4, WSAM 1.4% off with bfloat16)."""
  params = _lin_params(dtype)
  g = _digits_grad()
  c = jnp.asarray(C_LIN, jnp.float32)
  tx = getattr(sam_optax, name)(linear_loss, rho=0.05, **kw)
  out, _ = tx.update(g, tx.init(params), params, batch=c)
  assert out["w"].dtype == jnp.float32
  want = mix(np.asarray(g["w"], np.float64), C_LIN)
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), want, rtol=1e-6)


def test_layerwise_mix_is_float32_with_bfloat16_params():
  params = {"a": _lin_params(jnp.bfloat16)["w"], "b": _lin_params(jnp.bfloat16)["w"]}
  loss = lambda w, c: jnp.sum(c * w["a"].astype(jnp.float32)) + jnp.sum(
      c * w["b"].astype(jnp.float32))
  g = {"a": _digits_grad(0)["w"], "b": _digits_grad(1)["w"]}
  tx = sam_optax.layerwise_sam(loss, rho=0.05, num_layers=2, alpha=0.5)
  out, _ = tx.update(g, tx.init(params), params, batch=jnp.asarray(C_LIN, jnp.float32))
  for k in params:
    want = 0.5 * np.asarray(g[k], np.float64) + 0.5 * C_LIN
    np.testing.assert_allclose(np.asarray(out[k], np.float64), want, rtol=1e-6)


@pytest.mark.parametrize("name", ["looksam", "vsam"])
def test_stored_gradients_are_float32_with_bfloat16_params(name):
  params = _lin_params(jnp.bfloat16)
  tx = getattr(sam_optax, name)(linear_loss, rho=0.05)
  state = tx.init(params)
  stored = state.combine.gv if name == "looksam" else state.combine.psf
  assert stored["w"].dtype == jnp.float32


def test_looksam_reuse_keeps_float32_digits_with_bfloat16_params():
  """gv = gs - <gs,g>/‖g‖² g stored in float32, and the skipped step's
  g + alpha ‖g‖/‖gv‖ gv from it (bfloat16 storage: 8.6e-4 off)."""
  params = _lin_params(jnp.bfloat16)
  c = jnp.asarray(C_LIN, jnp.float32)
  alpha = 0.7
  tx = sam_optax.looksam(linear_loss, rho=0.05, k=2, alpha=alpha)
  g1, g2 = _digits_grad(0), _digits_grad(1)
  _, state = tx.update(g1, tx.init(params), params, batch=c)
  out, _ = tx.update(g2, state, params, batch=c)
  a = np.asarray(g1["w"], np.float64)
  gv = C_LIN - (C_LIN @ a) / (a @ a) * a
  b = np.asarray(g2["w"], np.float64)
  want = b + alpha * np.linalg.norm(b) / np.linalg.norm(gv) * gv
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), want, rtol=2e-6)


@pytest.mark.parametrize("name", ["sam", "asam", "gnp", "looksam", "gsam"])
def test_radius_schedule_under_jit_with_bfloat16_params(name):
  """A radius schedule makes the step a lax.cond between the computed and
  the skipped branch; with bfloat16 params and float32 gradients their
  outputs differed in dtype and tracing failed."""
  params = _lin_params(jnp.bfloat16)
  c = jnp.asarray(C_LIN, jnp.float32)
  tx = getattr(sam_optax, name)(linear_loss,
                                rho=optax.linear_schedule(0.1, 0.0, 1))
  step = jax.jit(lambda g, s: tx.update(g, s, params, batch=c))
  g = _digits_grad()
  out, state = step(g, tx.init(params))      # rho = 0.1: computed
  assert out["w"].dtype == jnp.float32
  out, state = step(g, state)                # rho = 0: the clean gradient
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(g["w"]))


# --------------------------------------------------------------------------
# 4. A rejected step leaves every part of the whole optimizers' state.
# --------------------------------------------------------------------------


def _nan_run(tx, seeds, nan_at=(), poison="clean"):
  """Steps of ``tx`` on the MLP, one per batch seed; at the steps in
  ``nan_at`` the clean gradient (``poison="clean"``) or only the loss away
  from the params (the perturbed point, ``"perturbed"``) is NaN, and the
  update is not applied. Returns the params and the state."""
  params = helpers.mlp_params()
  state = tx.init(params)
  for t, seed in enumerate(seeds):
    batch = helpers.make_batch(seed=seed)
    g = jax.grad(helpers.mlp_loss)(params, batch)
    loss = helpers.mlp_loss
    if t in nan_at and poison == "clean":
      g = jax.tree.map(lambda x: x * jnp.nan, g)
    if t in nan_at and poison == "perturbed":
      p0 = params
      loss = lambda p, b, p0=p0: helpers.mlp_loss(p, b) * jnp.where(
          jnp.all(p["l1"]["kernel"] == p0["l1"]["kernel"]), 1.0, jnp.nan)
    out, state = tx.update(g, state, params, batch=batch, loss_fn=loss)
    if t not in nan_at:
      params = optax.apply_updates(params, out)
  return params, state


def _assert_same_run(a, b):
  """Params and state equal, leaf by leaf, except the work counter
  (``grad_evals`` counts the gradients of rejected steps too)."""
  left = jax.tree_util.tree_flatten_with_path(a)[0]
  right = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in left] == [p for p, _ in right]
  for (path, x), (_, y) in zip(left, right):
    if "grad_evals" in jax.tree_util.keystr(path):
      continue
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("poison", ["clean", "perturbed"])
def test_decoupled_wsam_keeps_base_state_on_a_rejected_step(poison):
  """The base optimizer's momentum kept the NaN for good (clean), or
  advanced on a step the count did not (perturbed)."""
  make = lambda: sam_optax.wsam(rho=0.05, gamma=0.9,
                                base_optimizer=optax.sgd(0.05, momentum=0.9),
                                learning_rate=0.05)
  p_nan, s_nan = _nan_run(make(), [200, 201, 202, 203, 204, 205], {2, 3},
                          poison=poison)
  p_ref, s_ref = _nan_run(make(), [200, 201, 204, 205])
  _assert_same_run((p_nan, s_nan), (p_ref, s_ref))


def test_lightsam_learning_rate_schedule_skips_rejected_steps():
  """optax.scale_by_learning_rate's own counter counted every call: two NaN
  steps moved the schedule two steps ahead of the method's count."""
  make = lambda: sam_optax.lightsam(
      learning_rate=optax.linear_schedule(0.5, 0.05, 6), rho=0.1)
  seeds = list(range(200, 208))
  p_nan, s_nan = _nan_run(make(), seeds, {1, 3})
  p_ref, s_ref = _nan_run(make(), [s for i, s in enumerate(seeds)
                                   if i not in (1, 3)])
  _assert_same_run((p_nan, s_nan), (p_ref, s_ref))
  assert int(s_nan[2].count) == 6


# --------------------------------------------------------------------------
# 5. LookSAM: a gv at the rounding level is 0.
# --------------------------------------------------------------------------


def _head_loss(p, b):
  x, y = b
  return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] + p["c"] - y) ** 2)


@pytest.mark.parametrize("jit", [False, True])
def test_looksam_per_leaf_one_entry_leaf_reuses_nothing(jit):
  """A one-entry leaf's gs is parallel to its g: gv = 0 by definition. The
  computed gv was a rounding residue (about 1e-8) that the reuse step
  rescaled to alpha ‖g‖: the bias of a one-output head got g times 1.7 or
  0.3 (here 1.7 on the first reuse step), the sign depending on the
  compiled program."""
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(k[0], (4, 8)),
            "v": jax.random.normal(k[1], (8,)), "c": jnp.zeros(1)}
  x = jax.random.normal(k[2], (32, 4))
  y = jnp.sin(x.sum(-1)) * 3
  tx = sam_optax.looksam(_head_loss, rho=0.1, k=2, per_leaf=True, alpha=0.7)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for t in range(4):
    b = (x[t::2][:16], y[t::2][:16])
    g = jax.grad(_head_loss)(params, b)
    out, state = update(g, state, params, batch=b)
    assert float(state.combine.gv["c"][0]) == 0.0
    if t % 2:
      np.testing.assert_array_equal(np.asarray(out["c"]), np.asarray(g["c"]))
    params = jax.tree.map(lambda a, u: a - 0.05 * u, params, out)


def test_looksam_parallel_gradients_reuse_nothing():
  """A quadratic whose gradient is a Hessian eigenvector: gs = (1 + rho
  lambda / ‖g‖) g, gv = 0, and the rule's reuse step is g (was 0.3 g)."""
  loss = lambda w, b: 0.5 * b * jnp.sum(w ** 2)
  w = jnp.array([1.0, 1.0, 1.0])
  tx = sam_optax.looksam(loss, rho=0.1, k=2)
  g = jax.grad(loss)(w, 3.0)
  _, state = tx.update(g, tx.init(w), w, batch=3.0)
  out, _ = tx.update(g, state, w, batch=3.0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(g))


def test_looksam_keeps_a_small_but_real_orthogonal_part():
  """The threshold is the rounding level, not a size: a gv of 2e-5 ‖gs‖
  on 16 entries (20 times the threshold) is kept."""
  c = np.linspace(1.0, 1.003, 16)
  loss = lambda w, b: 0.5 * jnp.sum(b * w ** 2)
  w = jnp.ones(16)
  tx = sam_optax.looksam(loss, rho=0.1, k=2, alpha=0.5)
  g = jax.grad(loss)(w, jnp.asarray(c, jnp.float32))
  _, state = tx.update(g, tx.init(w), w, batch=jnp.asarray(c, jnp.float32))
  gv = np.asarray(state.combine.gv, np.float64)
  g64 = np.asarray(c)
  e = 0.1 * g64 / np.linalg.norm(g64)
  gs = c * (1 + e)
  want = gs - (gs @ g64) / (g64 @ g64) * g64
  assert np.linalg.norm(want) > 1e-5 * np.linalg.norm(gs)
  assert np.linalg.norm(gv) > 0
  np.testing.assert_allclose(gv, want, atol=2e-3 * np.linalg.norm(want))


# --------------------------------------------------------------------------
# 6. Construction: number-only arguments, masks under inject_hyperparams.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda s: sam_optax.vsam(helpers.mlp_loss, decay=s),
    lambda s: sam_optax.vsam(helpers.mlp_loss, max_rate=s),
    lambda s: sam_optax.vsam(helpers.mlp_loss, initial_rate=s),
    lambda s: sam_optax.sam(helpers.mlp_loss, eps=s),
    lambda s: sam_optax.lightsam(helpers.mlp_loss, 0.1, b2=s, variant="adam"),
])
def test_a_schedule_for_a_number_only_argument_fails_at_construction(make):
  """Accepted before, then a TypeError inside the first update."""
  with pytest.raises(ValueError, match="takes a number, not a schedule"):
    make(optax.linear_schedule(0.7, 0.5, 10))


def test_ssam_mask_under_inject_hyperparams_under_jit():
  """optax.inject_hyperparams rebuilds ssam inside the step: np.any on the
  (concrete) mask staged a jnp.any under the trace, and `not` failed."""
  params, batch = helpers.mlp_params(), helpers.make_batch()
  mask = jax.tree.map(lambda x: jnp.arange(x.size).reshape(x.shape) % 2 == 0,
                      params)
  tx = optax.inject_hyperparams(sam_optax.ssam, static_args=("loss_fn",))(
      helpers.mlp_loss, rho=0.05, mask=mask)
  plain = sam_optax.ssam(helpers.mlp_loss, rho=0.05, mask=mask)
  g = jax.grad(helpers.mlp_loss)(params, batch)
  out, _ = jax.jit(lambda s: tx.update(g, s, params, batch=batch))(
      tx.init(params))
  want, _ = plain.update(g, plain.init(params), params, batch=batch)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# --------------------------------------------------------------------------
# 7. A planner handed another run's state.
# --------------------------------------------------------------------------


def test_planner_reset_after_another_runs_state():
  """Run A's planner given run B's state at the next count plans from what
  it read of A (a runtime layer selection) unless reset."""
  tx = sam_optax.layerwise_sam(helpers.mlp_loss, rho=0.1, num_layers=1,
                               select_by="gradient", select_every=3)
  params = helpers.mlp_params()

  def run(seed0, steps, planner):
    state = tx.init(params)
    for t in range(steps):
      b = helpers.make_batch(seed=seed0 + t)
      g = jax.grad(helpers.mlp_loss)(params, b)
      _, state = tx.update(g, state, params, batch=b, plan=planner(t, state))
    return state

  found = False
  for steps in range(4, 10):
    plan_a = sam_optax.planner(tx)
    run(400, steps, plan_a)
    state_b = run(500, steps, sam_optax.planner(tx))
    own = sam_optax.planner(tx)(steps, state_b)
    if plan_a(steps, state_b) != own:
      found = True
      plan_a.reset()
      assert plan_a(steps, state_b) == own
  assert found, "no count where the stale plan differs: the test checks nothing"


@pytest.mark.parametrize("variant", ["ascent", "descent"])
def test_adagrad_norm_root_keeps_a_large_accumulator_for_a_tiny_gradient(
    variant):
  """sqrt(u + ‖g‖²) scaled by the norm's power of two alone overflowed a
  root of 1e20 for a gradient of 1e-19 (root 2**63 too large): the stored
  root became inf and every later step 0. It is the larger one's power."""
  big = {"w": jnp.full(4, 0.5e20, jnp.float32)}      # ‖big‖ = 1e20
  tiny = {"w": jnp.full(4, 0.5e-19, jnp.float32)}    # ‖tiny‖ = 1e-19
  if variant == "descent":
    tx = sam_optax.scale_by_adagrad_norm(eps=1e-8)
    state = tx.init(big)
    _, state = tx.update(big, state)
    _, state = tx.update(tiny, state)
    root = float(state.root_sum_of_squares)
    # the next step follows the root: g / sqrt(1e40 + ‖g‖²), not 0
    out, _ = tx.update({"w": jnp.full(4, 0.5e19, jnp.float32)}, state)
  else:
    loss = lambda w, b: jnp.sum(b * w["w"])
    tx = sam_optax.lightsam(loss, 0.1, 0.1)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    _, state = tx.update(big, state, params, batch=jnp.ones(4))
    _, state = tx.update(tiny, state, params, batch=jnp.ones(4))
    root = float(state[0].geometry.root_accumulator)
    out = None
  np.testing.assert_allclose(root, 1e20, rtol=1e-6)
  if out is not None:
    np.testing.assert_allclose(np.asarray(out["w"]),
                               0.5e19 / np.hypot(1e20, 1e19), rtol=1e-5)


# --- base.times_over_norm against float64, over float32's whole range -------

# Normal float32 magnitudes only: XLA flushes subnormal inputs to 0 on CPU
# (and GPUs), so a subnormal leaf is a zero leaf there.
_SCALES = [1e-37, 1e-30, 1e-3, 1.0, 1e20, 3e38]


def _entries(rng, shape, scale):
  """Random signs, magnitudes in [scale / 2, scale]: no subnormal entry."""
  mag = rng.uniform(0.5, 1.0, shape) * scale
  return (np.where(rng.random(shape) < 0.5, -mag, mag)).astype(np.float32)


def _ratio_cases():
  rng = np.random.default_rng(7)
  for a in _SCALES:
    for b in (1e-37, 1.0, 3e38):
      for num, num_exp in ((0.05, 0), (1e-20, 100), (1e20, -100), (1.0, 0)):
        for eps in (1e-30, 1e-12):  # the methods' eps is > 0
          tree = {"a": _entries(rng, 5, a), "b": _entries(rng, (2, 3), b)}
          yield tree, num, num_exp, eps


def _ratio64(tree, num, num_exp, eps):
  leaves = {k: np.asarray(v, np.float64) for k, v in tree.items()}
  norm = np.sqrt(sum(np.sum(v * v) for v in leaves.values()))
  return {k: v * (num * 2.0**num_exp / (norm + eps)) for k, v in leaves.items()}


@pytest.mark.parametrize("jit", [False, True])
def test_times_over_norm_matches_float64_everywhere(jit):
  """x * num 2**num_exp / (‖tree‖ + eps), float32, for leaves from
  1e-37 to 3e38 and ratios far outside float32's range: a few ulps
  wherever the exact value is a normal float32, that subnormal or 0 below
  it, inf exactly where it is past float32's range (never a 0 or inf from
  an intermediate scale)."""
  from sam_optax._src import base

  def f(tree, num, num_exp, eps):
    norm = base.tree_norm_exp(tree)
    return base.times_over_norm(tree, num, norm, eps, num_exp=num_exp)

  run = jax.jit(f) if jit else f
  tiny, top = float(np.finfo(np.float32).tiny), float(F32_MAX)
  checked = 0
  for tree, num, num_exp, eps in _ratio_cases():
    got = run({k: jnp.asarray(v) for k, v in tree.items()},
              jnp.float32(num), jnp.int32(num_exp), jnp.float32(eps))
    want = _ratio64(tree, num, num_exp, eps)
    for k in want:
      g = np.asarray(got[k], np.float64)
      w = want[k]
      normal = (np.abs(w) >= tiny) & (np.abs(w) < top)
      np.testing.assert_allclose(g[normal], w[normal], rtol=2e-6, atol=0,
                                 err_msg=f"{k} {num} {num_exp} {eps}")
      # Below float32's normal range: the subnormal or 0 (XLA flushes
      # subnormal results to 0 on CPU).
      small = np.abs(w) < tiny
      np.testing.assert_allclose(g[small], w[small], rtol=0, atol=tiny)
      assert np.all(np.isinf(g[np.abs(w) >= top * (1 + 2**-23)]))
      checked += int(normal.sum())
  assert checked > 1000
