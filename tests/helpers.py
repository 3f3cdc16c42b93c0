"""Shared test helpers: a tiny MLP, batches, NumPy references, and the
method table (read from the one registry, ``experiments/methods.py``).

Test files import from here, never from one another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from experiments import methods as registry

# --------------------------------------------------------------------------
# A tiny MLP (tanh hidden layer), batches, and NumPy references.
# --------------------------------------------------------------------------


def mlp_params(seed=0, din=5, hidden=7, dout=3, *, scale=0.5,
               names=("l1", "l2"), dtype=jnp.float32):
  """Two dense layers ``names`` (hidden, output), weights ~ N(0, scale²)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  p = {
      names[0]: {
          "kernel": jax.random.normal(k1, (din, hidden)) * scale,
          "bias": jnp.zeros(hidden),
      },
      names[1]: {
          "kernel": jax.random.normal(k2, (hidden, dout)) * scale,
          "bias": jax.random.normal(k3, (dout,)) * 0.1,
      },
  }
  return jax.tree.map(lambda x: x.astype(dtype), p)


def mlp_loss(params, batch):
  """Mean squared error of the MLP; layers in key order, tanh between."""
  x, y = batch
  first, last = sorted(params)
  h = jnp.tanh(x @ params[first]["kernel"] + params[first]["bias"])
  out = h @ params[last]["kernel"] + params[last]["bias"]
  return jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def make_batch(seed=1, n=16, din=5, dout=3):
  rng = np.random.default_rng(seed)
  return (
      jnp.asarray(rng.standard_normal((n, din)), jnp.float32),
      jnp.asarray(rng.standard_normal((n, dout)), jnp.float32),
  )


def flat(tree):
  """Every leaf, raveled and concatenated, in float64."""
  return np.concatenate(
      [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
  )


def unflat(vec, like):
  """The inverse of :func:`flat`, with the leaves' dtypes of ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  out, i = [], 0
  for x in leaves:
    out.append(jnp.asarray(vec[i:i + x.size].reshape(x.shape), x.dtype))
    i += x.size
  return jax.tree.unflatten(treedef, out)


def grad_np(params, batch):
  return flat(jax.grad(mlp_loss)(params, batch))


def ref_sam(params, batch, rho, eps=1e-12):
  g = grad_np(params, batch)
  e = rho * g / (np.linalg.norm(g) + eps)
  return grad_np(unflat(flat(params) + e, params), batch)


def ref_asam(params, batch, rho, eta, eps=1e-12):
  g = grad_np(params, batch)
  t = np.abs(flat(params)) + eta
  e = rho * t * t * g / (np.linalg.norm(t * g) + eps)
  return grad_np(unflat(flat(params) + e, params), batch)


def ref_gnp(params, batch, rho, alpha):
  g = grad_np(params, batch)
  return (1 - alpha) * g + alpha * ref_sam(params, batch, rho)


def engine_step(grads, params, rho=1.0, count=0):
  """An engine Step for calling a part directly (no loss, no batch)."""
  from sam_optax._src import engine  # pylint: disable=g-import-not-at-top

  return engine.Step(
      updates=grads, grads=grads, params=params, batch=None,
      count=jnp.asarray(count, jnp.int32), rho=jnp.asarray(rho, jnp.float32),
      axis_name=None, eps=1e-12, loss=None,
  )


def one_update(tx, params, batch, jit=True):
  g = jax.grad(mlp_loss)(params, batch)
  state = tx.init(params)
  fn = lambda g, s, p, b: tx.update(g, s, p, batch=b)  # noqa: E731
  if jit:
    fn = jax.jit(fn)
  return fn(g, state, params, batch)


# --------------------------------------------------------------------------
# The method table: every registry method at its short-run settings, plus
# two variants of registry rows.
# --------------------------------------------------------------------------

NDEV = 8
STEPS = 6
BATCH = 32

# name -> (sam_optax constructor, kwargs); called as
# ctor(mlp_loss, **kwargs, axis_name=...).
# Registry rows whose machinery another row already runs through every
# test below (suite time on the 2-core CI): wsam's coupled form is gnp's
# mix with alpha = gamma / (1 - gamma), its decoupled form is that ascent
# (sam's) around the base optimizer, sam_late is sam with a radius
# schedule (the matrix runs schedules). tests/test_new_methods.py tests them
# against NumPy, planned, sharded and with trainable=; the decoupled
# registry row is built and trained by tests/test_experiments.py.
COVERED_ELSEWHERE = {"wsam", "wsam_decoupled", "sam_late"}
METHODS: dict[str, tuple[str, dict]] = {
    name: (spec.constructor, dict(spec.short_run))
    for name, spec in registry.METHODS.items()
    if spec.constructor is not None and name not in COVERED_ELSEWHERE
}
METHODS.update({
    "looksam_per_leaf": ("looksam", {"rho": 0.1, "k": 2, "alpha": 0.7,
                                     "per_leaf": True}),
    # a fixed element-wise mask given by the user
    "ssam_mask": ("ssam", {"rho": 0.05, "mask": jax.tree.map(
        lambda x: np.random.default_rng(x.size).random(x.shape) < 0.5,
        mlp_params())}),
})
# constructors that return the whole optimizer (no base optimizer after them)
FULL_OPTIMIZERS = {
    name for name, spec in registry.METHODS.items() if spec.full_optimizer
}
ALL = sorted(METHODS)


def sam_transform(name: str, loss=mlp_loss, **over):
  """The method's own transform (what ``sam_optax.planner`` takes)."""
  ctor, kwargs = METHODS[name]
  return getattr(sam_optax, ctor)(loss, **{**kwargs, **over})


def build(name: str, *, axis_name=None, base=None, **over):
  """The full optimizer: the method's transform, then SGD with momentum."""
  tx = sam_transform(name, axis_name=axis_name, **over)
  if name in FULL_OPTIMIZERS:
    return tx
  return optax.chain(tx, base or optax.sgd(0.05, momentum=0.9))


def batches(n=STEPS, size=BATCH, dtype=jnp.float32):
  return [
      jax.tree.map(lambda x: x.astype(dtype), make_batch(seed=100 + i, n=size))
      for i in range(n)
  ]


def train_step(tx):
  def step(p, s, b):
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  return step


def run_single(name, bs, params=None, **over):
  tx = build(name, **over)
  p = mlp_params() if params is None else params
  s = tx.init(p)
  step = jax.jit(train_step(tx))
  for b in bs:
    p, s = step(p, s, b)
  return p, s


def assert_run_matches(step, tx, bs, p1, s1):
  """``step(params, state, batch)`` from ``mlp_params()`` and
  ``tx.init`` over ``bs``: the parameters close to ``p1`` and the
  decisions' stats (gradient evaluations, mask density, selected layers)
  equal to those of ``s1`` (the one-device run)."""
  p = mlp_params()
  s = tx.init(p)
  for b in bs:
    p, s = step(p, s, b)
  np.testing.assert_allclose(flat(p), flat(p1), rtol=1e-4, atol=1e-5)
  st, st1 = sam_optax.stats(s), sam_optax.stats(s1)
  for key in ("grad_evals", "mask_density", "selected_layers"):
    if key in st1:
      np.testing.assert_array_equal(np.asarray(st[key]), np.asarray(st1[key]))


def tree_rows_equal(tree):
  """Every device's copy (leading axis) equals device 0's, bit for bit."""
  for x in jax.tree.leaves(tree):
    x = np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
    assert all(np.array_equal(x[0], x[d]) for d in range(1, x.shape[0]))


def shard(tree, n=NDEV):
  """A batch split on its leading axis into ``n`` device rows (pmap)."""
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), tree)


def replicate(tree, n=NDEV):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


needs8 = pytest.mark.skipif(
    jax.device_count() < NDEV, reason="needs 8 (forced CPU) devices"
)
