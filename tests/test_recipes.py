"""The recipes of docs/recipes.md (dropout, NNX in full, loss scaling, a
static configuration), run as written and checked against SAM computed by
hand from its formula: e = rho g / ||g||, out = grad L(w + e) on the same
batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import doc_blocks


def run(name):
  return doc_blocks.run(doc_blocks.example(name), f"example:{name}")


def sam_by_hand(loss_fn, params, batch, rho, has_aux=False):
  """SAM's output from its formula, with plain jax.grad calls."""
  grad = jax.grad(loss_fn, has_aux=has_aux)
  g = grad(params, batch)
  g = g[0] if has_aux else g
  norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, gi: w + rho * gi / norm, params, g)
  out = grad(perturbed, batch)
  return out[0] if has_aux else out


def assert_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_dropout_linen_uses_the_step_key_in_both_passes():
  scope = run("dropout_linen")
  sam_optax, loss_fn, params = scope["sam_optax"], scope["loss_fn"], scope["params"]
  assert int(sam_optax.stats(scope["opt_state"])["grad_evals"]) == 20
  batch = {"x": scope["x"], "y": scope["y"],
           "dropout_key": jax.random.PRNGKey(7)}
  other = dict(batch, dropout_key=jax.random.PRNGKey(8))
  # The key matters (dropout is on), so equality below needs the same key
  # in the clean and the perturbed pass.
  assert abs(float(loss_fn(params, batch)) - float(loss_fn(params, other))) > 1e-4
  tx = sam_optax.sam(loss_fn, rho=0.05)
  out, _ = tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params,
                     batch=batch)
  assert_close(out, sam_by_hand(loss_fn, params, batch, 0.05), rtol=1e-4, atol=1e-6)


def test_nnx_full_step_is_sam_and_keeps_the_clean_statistics():
  scope = run("nnx_full")
  nnx, sam_optax = scope["nnx"], scope["sam_optax"]
  stats = sam_optax.stats(scope["opt_state"])
  assert int(stats["count"]) == int(stats["grad_evals"]) == 20
  assert float(jnp.abs(scope["model"].bn.mean.value).sum()) > 0  # statistics moved
  acc = float(scope["accuracy"])
  assert 0.0 <= acc <= 1.0

  # One step of a fresh model, against the formula: SGD with momentum's
  # first step is -lr * out; the statistics are the clean pass's.
  model = scope["MLP"](nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, scope["optimizer"].tx, wrt=nnx.Param)
  # Copies: the states of nnx.split share their variables with the model.
  graphdef, params0, rest0 = jax.tree.map(jnp.copy, nnx.split(model, nnx.Param, ...))
  x, y = scope["x"], scope["y"]

  def loss_fn(params, batch):  # the recipe's loss, written out again
    m = nnx.merge(graphdef, params, rest0, copy=True)
    logits = m(batch["x"], rngs=nnx.Rngs(dropout=batch["dropout_key"]))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, nnx.state(m, nnx.Not(nnx.Param))

  batch = {"x": x, "y": y, "dropout_key": nnx.Rngs(dropout=1).dropout()}
  out = sam_by_hand(loss_fn, params0, batch, 0.05, has_aux=True)
  _, clean_rest = loss_fn(params0, batch)
  scope["train_step"](model, optimizer, nnx.Rngs(dropout=1), x, y)
  _, params1, rest1 = nnx.split(model, nnx.Param, ...)
  assert_close(params1, jax.tree.map(lambda w, g: w - 0.05 * g, params0, out),
               rtol=1e-4, atol=1e-6)
  assert_close(rest1, clean_rest, rtol=1e-6)


def test_stateful_nnx_object_in_batch_is_refused_by_name():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import sam_optax  # pylint: disable=g-import-not-at-top

  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss_fn(params, batch):
    m = nnx.merge(graphdef, params, copy=True)
    return jnp.mean(m(batch["x"]) ** 2)

  tx = sam_optax.sam(loss_fn, rho=0.05)
  state = tx.init(params)
  x = jnp.ones((4, 3))
  grads = jax.grad(loss_fn)(params, {"x": x})
  for bad, where in ((nnx.Rngs(dropout=0), "batch['extra'] (nnx.Rngs)"),
                     (model, "batch['extra'] (nnx.Linear)")):
    with pytest.raises(ValueError, match="stateful Flax NNX object") as e:
      tx.update(grads, state, params, batch={"x": x, "extra": bad})
    assert where in str(e.value)
    assert "nnx.Rngs(dropout=batch['key'])" in str(e.value)
  # The state of nnx.split (variables, not a module) is fine: the same
  # output as the arrays it holds.
  _, rest = nnx.split(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  a, _ = tx.update(grads, state, params, batch={"x": x, "rest": rest})
  b, _ = tx.update(grads, state, params, batch={"x": x})
  assert_close(a, b, rtol=0)


def test_loss_scaling_scales_and_checks_the_perturbed_gradient():
  scope = run("loss_scaling")
  sam_optax = scope["sam_optax"]
  assert float(scope["dynamic_scale"].scale) == 2.0 ** 14
  np.testing.assert_allclose(np.ravel(scope["params"]["w"]), [1.0, -2.0, 0.5],
                             atol=1e-2)

  # A float16 loss small enough that its backward pass underflows at scale
  # 1: the perturbed gradient is zero there, and right at scale 2**16.
  x, y = scope["x"], scope["y"]
  tiny = lambda p, b: 1e-7 * scope["loss_fn"](p, b)
  w0 = {"w": jnp.zeros((3, 1))}
  batch = {"x": x, "y": y, "scale": jnp.float32(2.0 ** 16)}
  xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
  grad = lambda w: 1e-7 * 2 * xn.T @ (xn @ w - yn) / len(xn)  # float64, by hand
  g = grad(np.zeros((3, 1)))
  expected = grad(0.05 * g / np.linalg.norm(g))
  clean = {"w": jnp.asarray(g, jnp.float32)}
  unscaled = sam_optax.sam(tiny, rho=0.05)
  out, _ = unscaled.update(clean, unscaled.init(w0), w0, batch=batch)
  assert float(jnp.abs(out["w"]).max()) == 0.0  # underflowed
  unscale_grad = scope["unscale_grad"]
  scaled = sam_optax.sam(
      lambda p, b: b["scale"] * tiny(unscale_grad(p, b["scale"]), b), rho=0.05)
  out, _ = scaled.update(clean, scaled.init(w0), w0, batch=batch)
  np.testing.assert_allclose(np.asarray(out["w"]), expected, rtol=2e-2)

  # A step whose perturbed gradient is inf (the clean one finite) is not
  # applied, and the scale backs off.
  penalty = lambda p, b: scope["scaled_loss_fn"](p, b) + jnp.sum(jnp.exp(1e4 * p["w"]))
  scope["tx"] = optax.chain(sam_optax.sam(penalty, rho=0.05), optax.sgd(0.1))
  step = jax.jit(scope["train_step"].__wrapped__)  # traced with the new tx
  ds = scope["DynamicScale"]()
  state = scope["tx"].init(w0)
  w1, state1, ds1, _ = step(w0, state, ds, x, y)
  assert_close(w1, w0, rtol=0)
  assert_close(state1, state, rtol=0)
  assert float(ds1.scale) == 2.0 ** 15 and int(ds1.fin_steps) == 0


def test_static_config_loss_is_sam():
  scope = run("static_config")
  sam_optax, loss_fn, params = scope["sam_optax"], scope["loss_fn"], scope["params"]
  batch = scope["batch"]
  tx = sam_optax.sam(loss_fn, rho=0.05)
  out, _ = tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params,
                     batch=batch)
  assert_close(out, sam_by_hand(loss_fn, params, batch, 0.05), rtol=1e-4, atol=1e-7)
  # The configuration is read: without the L2 term the loss is lower.
  no_l2 = scope["make_loss"](scope["Config"](l2=0.0))
  assert float(no_l2(params, batch)) < float(loss_fn(params, batch))
