"""The engine and its first presets (SAM, ASAM, GNP) against their formulas."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests.helpers import (
    flat, grad_np, make_batch, mlp_loss, mlp_params, one_update, ref_asam,
    ref_gnp, ref_sam, unflat,
)

# --------------------------------------------------------------------------
# Formulas.
# --------------------------------------------------------------------------


class FormulaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sam_matches_formula(self):
    params, batch = mlp_params(), make_batch()
    g = jax.grad(mlp_loss)(params, batch)
    for rho in (0.01, 0.05, 0.3):
      tx = sam_optax.sam(mlp_loss, rho=rho)
      out, state = self.variant(
          lambda g, s, p, b: tx.update(g, s, p, batch=b)
      )(g, tx.init(params), params, batch)
      np.testing.assert_allclose(flat(out), ref_sam(params, batch, rho), rtol=2e-5, atol=1e-6)
      assert int(state.grad_evals) == 1 and int(state.count) == 1

  @chex.variants(with_jit=True, without_jit=True)
  def test_asam_matches_formula(self):
    params, batch = mlp_params(), make_batch()
    g = jax.grad(mlp_loss)(params, batch)
    for rho, eta in ((0.1, 0.01), (0.5, 0.01), (1.0, 0.1)):
      tx = sam_optax.asam(mlp_loss, rho=rho, eta=eta)
      out, _ = self.variant(lambda g, s, p, b: tx.update(g, s, p, batch=b))(
          g, tx.init(params), params, batch
      )
      np.testing.assert_allclose(
          flat(out), ref_asam(params, batch, rho, eta), rtol=2e-5, atol=1e-6
      )

  @chex.variants(with_jit=True, without_jit=True)
  def test_gnp_matches_formula(self):
    params, batch = mlp_params(), make_batch()
    g = jax.grad(mlp_loss)(params, batch)
    for rho, alpha in ((0.05, 0.8), (0.1, 0.3), (0.2, 1.0), (0.1, 0.0)):
      tx = sam_optax.gnp(mlp_loss, rho=rho, alpha=alpha)
      out, _ = self.variant(lambda g, s, p, b: tx.update(g, s, p, batch=b))(
          g, tx.init(params), params, batch
      )
      np.testing.assert_allclose(
          flat(out), ref_gnp(params, batch, rho, alpha), rtol=2e-5, atol=1e-6
      )


def test_gnp_alpha_one_is_sam():
  params, batch = mlp_params(), make_batch()
  a, _ = one_update(sam_optax.gnp(mlp_loss, rho=0.1, alpha=1.0), params, batch)
  b, _ = one_update(sam_optax.sam(mlp_loss, rho=0.1), params, batch)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda rho: sam_optax.sam(mlp_loss, rho=rho),
        lambda rho: sam_optax.asam(mlp_loss, rho=rho),
        lambda rho: sam_optax.gnp(mlp_loss, rho=rho, alpha=0.8),
    ],
    ids=["sam", "asam", "gnp"],
)
def test_rho_zero_returns_clean_gradient_exactly(make):
  params, batch = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(params, batch)
  for rho in (0.0, optax.constant_schedule(0.0), jnp.float32(0.0)):
    out, state = one_update(make(rho), params, batch)
    chex.assert_trees_all_equal(out, g)
    assert int(state.grad_evals) == 0


def test_rho_schedule_reaching_zero_is_exact_and_not_counted():
  params, batch = mlp_params(), make_batch()
  sched = optax.piecewise_constant_schedule(0.1, {2: 0.0})
  tx = sam_optax.gnp(mlp_loss, rho=sched, alpha=0.8)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  g = jax.grad(mlp_loss)(params, batch)
  for i in range(4):
    out, state = step(g, state, params, batch)
    if i < 2:
      np.testing.assert_allclose(flat(out), ref_gnp(params, batch, 0.1, 0.8), rtol=2e-5, atol=1e-6)
    else:
      chex.assert_trees_all_equal(out, g)
  assert int(state.grad_evals) == 2


@pytest.mark.parametrize("ctor", [sam_optax.sam, sam_optax.asam, sam_optax.gnp])
def test_zero_gradient_gives_finite_output(ctor):
  params = jax.tree.map(jnp.zeros_like, mlp_params())
  zero_loss = lambda p, b: 0.0 * mlp_loss(p, b)  # noqa: E731
  tx = ctor(zero_loss)
  g = jax.tree.map(jnp.zeros_like, params)
  out, _ = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))(
      g, tx.init(params), params, make_batch()
  )
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_equal(out, g)


def test_grad_evals_counts_every_step():
  params, batch = mlp_params(), make_batch()
  tx = optax.chain(sam_optax.sam(mlp_loss), optax.sgd(0.1))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(mlp_loss)(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return optax.apply_updates(p, u), s

  for _ in range(7):
    params, state = step(params, state)
  st = sam_optax.stats(state)
  assert int(st["grad_evals"]) == 7 and int(st["count"]) == 7


def test_output_dtype_follows_updates():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mlp_params())
  batch = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_batch())
  g = jax.grad(mlp_loss)(params, batch)
  for tx in (sam_optax.sam(mlp_loss), sam_optax.asam(mlp_loss), sam_optax.gnp(mlp_loss)):
    out, _ = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))(
        g, tx.init(params), params, batch
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    chex.assert_tree_all_finite(out)


# --------------------------------------------------------------------------
# Against optax.contrib.sam.
# --------------------------------------------------------------------------


def test_same_trajectory_as_optax_contrib_sam():
  params0, batch = mlp_params(), make_batch()
  rho, lr = 0.05, 0.1
  ours = optax.chain(sam_optax.sam(mlp_loss, rho=rho), optax.sgd(lr))
  theirs = optax.contrib.sam(
      optax.sgd(lr),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2,
      opaque_mode=True,
  )
  grad_fn = lambda p, _: jax.grad(mlp_loss)(p, batch)  # noqa: E731

  @jax.jit
  def step_ours(p, s):
    u, s = ours.update(jax.grad(mlp_loss)(p, batch), s, p, batch=batch)
    return optax.apply_updates(p, u), s

  @jax.jit
  def step_theirs(p, s):
    u, s = theirs.update(jax.grad(mlp_loss)(p, batch), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  p1, s1 = params0, ours.init(params0)
  p2, s2 = params0, theirs.init(params0)
  for _ in range(10):
    p1, s1 = step_ours(p1, s1)
    p2, s2 = step_theirs(p2, s2)
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Tracing.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctor", [sam_optax.sam, sam_optax.asam, sam_optax.gnp])
def test_jitted_step_traces_once(ctor):
  params, batch = mlp_params(), make_batch()
  tx = optax.chain(ctor(mlp_loss, rho=optax.linear_schedule(0.05, 0.0, 5)), optax.sgd(0.1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, s, b):
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for i in range(8):
    params, state = step(params, state, make_batch(seed=i))
  chex.clear_trace_counter()


# --------------------------------------------------------------------------
# Composition.
# --------------------------------------------------------------------------


def test_chain_with_reduce_on_plateau_passes_value_through():
  params, batch = mlp_params(), make_batch()
  tx = optax.chain(
      sam_optax.sam(mlp_loss, rho=0.05),
      optax.sgd(0.1),
      optax.contrib.reduce_on_plateau(patience=1, factor=0.5, cooldown=0),
  )
  state = tx.init(params)

  @jax.jit
  def step(p, s, value):
    g = jax.grad(mlp_loss)(p, batch)
    u, s = tx.update(g, s, p, batch=batch, value=value)
    return u, s

  u0, state = step(params, state, jnp.float32(1.0))
  for _ in range(3):  # no improvement: the plateau scale drops
    u, state = step(params, state, jnp.float32(1.0))
  plateau = state[2]
  assert float(plateau.scale) < 1.0
  np.testing.assert_allclose(flat(u), float(plateau.scale) * flat(u0), rtol=1e-5)


def test_inject_hyperparams_rho_schedule():
  params, batch = mlp_params(), make_batch()
  sched = optax.piecewise_constant_schedule(0.05, {1: 4.0})  # 0.05 then 0.2
  tx = optax.inject_hyperparams(sam_optax.sam, static_args=("loss_fn",))(
      mlp_loss, rho=sched
  )
  state = tx.init(params)
  g = jax.grad(mlp_loss)(params, batch)
  step = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))
  out0, state = step(g, state)
  out1, state = step(g, state)
  np.testing.assert_allclose(flat(out0), ref_sam(params, batch, 0.05), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(flat(out1), ref_sam(params, batch, 0.2), rtol=2e-5, atol=1e-6)
  st = sam_optax.stats(state)
  np.testing.assert_allclose(float(st["hyperparams/rho"]), 0.2)
  assert int(st["grad_evals"]) == 2


def test_inject_hyperparams_numeric_rho_and_alpha():
  params, batch = mlp_params(), make_batch()
  tx = optax.inject_hyperparams(sam_optax.gnp, static_args=("loss_fn",))(
      mlp_loss, rho=0.1, alpha=0.5
  )
  out, state = one_update(tx, params, batch)
  np.testing.assert_allclose(flat(out), ref_gnp(params, batch, 0.1, 0.5), rtol=2e-5, atol=1e-6)
  state.hyperparams["alpha"] = jnp.float32(1.0)
  g = jax.grad(mlp_loss)(params, batch)
  out, _ = tx.update(g, state, params, batch=batch)
  np.testing.assert_allclose(flat(out), ref_sam(params, batch, 0.1), rtol=2e-5, atol=1e-6)


def test_gradient_accumulation_recipe():
  """SAM per micro-batch, MultiSteps around the base optimizer only."""
  params, k, lr, rho = mlp_params(), 3, 0.1, 0.05
  micro = [make_batch(seed=10 + i, n=8) for i in range(k)]
  tx = optax.chain(
      sam_optax.sam(mlp_loss, rho=rho),
      optax.MultiSteps(optax.sgd(lr), every_k_schedule=k).gradient_transformation(),
  )
  state = tx.init(params)

  @jax.jit
  def step(p, s, b):
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  p = params
  for i, b in enumerate(micro):
    p, state = step(p, state, b)
    if i < k - 1:
      chex.assert_trees_all_equal(p, params)  # nothing applied yet
  expected = flat(params) - lr * np.mean([ref_sam(params, b, rho) for b in micro], axis=0)
  np.testing.assert_allclose(flat(p), expected, rtol=1e-5, atol=1e-6)
  assert int(sam_optax.stats(state)["grad_evals"]) == k


def test_stats_walks_nested_states():
  params = mlp_params()
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(sam_optax.sam, static_args=("loss_fn",))(mlp_loss, rho=0.1),
      optax.apply_if_finite(optax.sgd(0.1), 3),
  )
  st = sam_optax.stats(tx.init(params))
  assert set(st) == {"count", "grad_evals", "hyperparams/rho", "hyperparams/eps"}
  two = optax.chain(sam_optax.sam(mlp_loss), sam_optax.gnp(mlp_loss))
  st2 = sam_optax.stats(two.init(params))
  assert set(st2) == {"0/count", "0/grad_evals", "1/count", "1/grad_evals"}


# --------------------------------------------------------------------------
# has_aux and Flax BatchNorm.
# --------------------------------------------------------------------------


def test_has_aux_discards_perturbed_aux_and_keeps_clean_batch_stats():
  import flax.linen as nn

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(8)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
      return nn.Dense(3)(nn.relu(x))

  net = Net()
  x, y = make_batch(n=16)
  variables = net.init(jax.random.PRNGKey(0), x, train=False)
  params, bstats = variables["params"], variables["batch_stats"]

  def loss_fn(p, batch):
    out, upd = net.apply(
        {"params": p, "batch_stats": batch["batch_stats"]}, batch["x"],
        train=True, mutable=["batch_stats"],
    )
    return jnp.mean((out - batch["y"]) ** 2), upd["batch_stats"]

  tx = optax.chain(sam_optax.sam(loss_fn, rho=0.5, has_aux=True), optax.sgd(0.1))
  state = tx.init(params)

  @jax.jit
  def train_step(p, bs, s, x, y):
    batch = {"x": x, "y": y, "batch_stats": bs}
    (loss, new_bs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return optax.apply_updates(p, u), new_bs, s

  new_params, new_bs, state = train_step(params, bstats, state, x, y)
  # Clean pass alone, with the same params and statistics.
  _, clean_bs = loss_fn(params, {"x": x, "y": y, "batch_stats": bstats})
  chex.assert_trees_all_close(new_bs, clean_bs, rtol=0, atol=0)
  # The update itself used the perturbed gradient (not the clean one).
  g = jax.grad(lambda p: loss_fn(p, {"x": x, "y": y, "batch_stats": bstats})[0])(params)
  clean_step = optax.apply_updates(params, jax.tree.map(lambda v: -0.1 * v, g))
  assert not np.allclose(flat(new_params), flat(clean_step))
  assert int(sam_optax.stats(state)["grad_evals"]) == 1


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: sam_optax.sam(mlp_loss, rho=-0.1), "rho"),
        (lambda: sam_optax.asam(mlp_loss, rho=-1.0), "rho"),
        (lambda: sam_optax.asam(mlp_loss, eta=0.0), "eta"),
        (lambda: sam_optax.asam(mlp_loss, eta=-0.5), "eta"),
        (lambda: sam_optax.gnp(mlp_loss, alpha=1.5), "alpha"),
        (lambda: sam_optax.gnp(mlp_loss, alpha=-0.1), "alpha"),
        (lambda: sam_optax.sam(mlp_loss, rho=float("nan")), "rho"),
        (lambda: sam_optax.sam(mlp_loss, eps=0.0), "eps"),
        (lambda: sam_optax.sam("not a function"), "loss_fn"),
        (lambda: sam_optax.sam(mlp_loss, axis_name=3), "axis_name"),
    ],
)
def test_bad_arguments_raise_at_construction(build, name):
  with pytest.raises(ValueError, match=name):
    build()


def test_missing_batch_or_params_is_a_clear_error():
  params, batch = mlp_params(), make_batch()
  tx = sam_optax.sam(mlp_loss)
  state = tx.init(params)
  g = jax.grad(mlp_loss)(params, batch)
  with pytest.raises(ValueError, match="batch"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, state, batch=batch)
  chained = optax.chain(sam_optax.sam(mlp_loss), optax.sgd(0.1))
  with pytest.raises(ValueError, match="batch"):
    chained.update(g, chained.init(params), params)
