"""trainable= in the forms Equinox and Flax NNX users build (an eqx.Module
of bools, an nnx.State of bools, NNX filters), and trainable= / group_fn
under optax.inject_hyperparams."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
from tests.helpers import flat, make_batch, mlp_loss, mlp_params

RHO = 0.2


def _sam_out(loss, params, batch, **kw):
  tx = sam_optax.sam(loss, RHO, **kw)
  g = jax.grad(loss)(params, batch)
  return tx.update(g, tx.init(params), params, batch=batch)[0]


def _alone_out(loss, params, batch, keep):
  """SAM on the trainable leaves alone (the frozen ones closed over in the
  loss), written without trainable=: the contract's reference."""
  leaves, treedef = jax.tree.flatten(params)
  idx = [i for i, k in enumerate(keep) if k]

  def alone_loss(sub, b):
    full = list(leaves)
    for j, i in enumerate(idx):
      full[i] = sub[j]
    return loss(jax.tree.unflatten(treedef, full), b)

  sub = [leaves[i] for i in idx]
  out = _sam_out(alone_loss, sub, batch)
  res = [jnp.zeros_like(x) for x in leaves]
  for j, i in enumerate(idx):
    res[i] = out[j]
  return res


# --------------------------------------------------------------------------
# Equinox.
# --------------------------------------------------------------------------


def _eqx_problem():
  model = eqx.nn.MLP(5, 3, 7, 1, key=jax.random.PRNGKey(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss(p, batch):
    x, y = batch
    out = jax.vmap(eqx.combine(p, static))(x)
    return jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  return params, loss


def test_equinox_module_of_bools_is_a_mask():
  """The Equinox way of building a mask gives an eqx.Module (callable):
  it is a mask, not a predicate, and freezes what it says."""
  params, loss = _eqx_problem()
  mask = jax.tree.map(lambda _: False, params)
  assert callable(mask)
  mask = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias),
                     mask, replace=(True, True))
  b = make_batch()
  out = _sam_out(loss, params, b, trainable=mask)
  keep = jax.tree.leaves(mask)
  want = _alone_out(loss, params, b, keep)
  for o, w, k in zip(jax.tree.leaves(out), want, keep):
    np.testing.assert_allclose(o, w, rtol=2e-5, atol=2e-6)
    if not k:
      np.testing.assert_array_equal(o, 0.0)
  # the same as the path predicate
  pred = _sam_out(loss, params, b, trainable=lambda p: p.startswith("layers/1/"))
  np.testing.assert_array_equal(flat(out), flat(pred))


# --------------------------------------------------------------------------
# Flax NNX.
# --------------------------------------------------------------------------


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.body = nnx.Linear(5, 7, rngs=rngs)
    self.head = nnx.Linear(7, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.body(x)))


def _nnx_problem():
  graphdef, params = nnx.split(_Net(nnx.Rngs(0)), nnx.Param)

  def loss(p, batch):
    x, y = batch
    out = nnx.merge(graphdef, p)(x)
    return jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  return params, loss


@pytest.mark.parametrize("form", ["state", "path_contains", "all", "param"])
def test_nnx_state_and_filters(form):
  """An nnx.State of bools and NNX filters select the same leaves as the
  path predicate; the result is SAM on the head alone."""
  params, loss = _nnx_problem()
  head = lambda path: path.startswith("head/")  # noqa: E731
  trainable = {
      "state": jax.tree_util.tree_map_with_path(
          lambda path, _: "head" in jax.tree_util.keystr(path), params),
      "path_contains": nnx.PathContains("head"),
      "all": nnx.All(nnx.Param, nnx.PathContains("head")),
      "param": nnx.Param,  # every Param: nothing frozen
  }[form]
  b = make_batch()
  out = _sam_out(loss, params, b, trainable=trainable)
  if form == "param":
    want = _sam_out(loss, params, b)
    np.testing.assert_array_equal(flat(out), flat(want))
    return
  keep = [p.startswith("head/") for p in
          [jax.tree_util.keystr(k, simple=True, separator="/")
           for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]]
  assert sum(keep) == 2
  want = _alone_out(loss, params, b, keep)
  np.testing.assert_allclose(flat(out), flat(want), rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(
      flat(out), flat(_sam_out(loss, params, b, trainable=head)))


def test_nnx_filter_that_freezes_everything_fails_at_init():
  params, loss = _nnx_problem()
  tx = sam_optax.sam(loss, trainable=nnx.PathContains("nothing"))
  with pytest.raises(ValueError, match="trainable freezes every leaf"):
    tx.init(params)


# --------------------------------------------------------------------------
# optax.inject_hyperparams.
# --------------------------------------------------------------------------

HEAD = {"l1": {"kernel": False, "bias": False},
        "l2": {"kernel": True, "bias": True}}


def _injected_out(tx, p, b, **extra):
  g = jax.grad(mlp_loss)(p, b)
  return jax.jit(lambda g, s: tx.update(g, s, p, batch=b, **extra))(
      g, tx.init(p))[0]


@pytest.mark.parametrize("trainable", [HEAD, "l2", ("l2/kernel", "l2/bias")],
                         ids=["mask", "prefix", "prefixes"])
def test_inject_hyperparams_with_a_mask_needs_no_static_args(trainable):
  """A mask or path prefixes (not callable) and the loss at update time:
  nothing static; the same as the head-only transform built directly."""
  p, b = mlp_params(), make_batch()
  tx = optax.inject_hyperparams(sam_optax.sam)(rho=RHO, trainable=trainable)
  out = _injected_out(tx, p, b, loss_fn=mlp_loss)
  keep = [False, False, True, True]  # l1/bias, l1/kernel, l2/bias, l2/kernel
  want = _alone_out(mlp_loss, p, b, keep)
  np.testing.assert_allclose(flat(out), flat(want), rtol=2e-5, atol=2e-6)


def test_path_prefixes_match_at_boundaries_and_unknown_ones_fail():
  p = {"enc": {"w": jnp.ones(2)}, "enc2": {"w": jnp.ones(2)}}
  loss = lambda q, b: jnp.sum(q["enc"]["w"] ** 2) + jnp.sum(q["enc2"]["w"])  # noqa
  out = _sam_out(loss, p, None, trainable="enc")
  np.testing.assert_array_equal(out["enc2"]["w"], 0.0)  # not a prefix match
  assert np.all(np.asarray(out["enc"]["w"]) != 0.0)
  with pytest.raises(ValueError, match=r"trainable names paths that are not "
                     r"in params: \['dec'\]"):
    sam_optax.sam(loss, trainable=("enc", "dec")).init(p)


# The integer arguments layer-wise SAM and vSAM need static in any case.
LAYERWISE_STATIC = ("num_layers", "select_every")
VSAM_STATIC = ("window", "blocks")


@pytest.mark.parametrize("kind", ["trainable", "group_fn"])
def test_inject_hyperparams_with_a_callable_in_static_args(kind):
  """A predicate trainable= or a group_fn listed in static_args works under
  inject_hyperparams and equals the transform built directly."""
  p, b = mlp_params(), make_batch()
  if kind == "trainable":
    ctor, kw = sam_optax.sam, {"trainable": lambda q: q.startswith("l2/")}
  else:  # every leaf its own layer: the bias is the output-side layer
    ctor, kw = sam_optax.layerwise_sam, {"group_fn": lambda q: q,
                                         "num_layers": 1}
  static = (kind,) + LAYERWISE_STATIC * (kind == "group_fn")
  tx = optax.inject_hyperparams(ctor, static_args=static)(rho=RHO, **kw)
  out = _injected_out(tx, p, b, loss_fn=mlp_loss)
  direct = ctor(mlp_loss, rho=RHO, **kw)
  g = jax.grad(mlp_loss)(p, b)
  want = direct.update(g, direct.init(p), p, batch=b)[0]
  np.testing.assert_allclose(flat(out), flat(want), rtol=1e-6, atol=1e-7)
  assert not np.allclose(flat(out), flat(g))


@pytest.mark.parametrize("kind", ["trainable", "group_fn", "stat_leaves",
                                  "layers"])
def test_inject_hyperparams_calls_a_callable_as_a_schedule_clear_error(kind):
  """Without static_args inject_hyperparams calls the callable with the
  step count and passes its value on; the method's check names the fix."""
  ctor = {"trainable": sam_optax.sam, "group_fn": sam_optax.layerwise_sam,
          "stat_leaves": sam_optax.vsam,
          "layers": sam_optax.layerwise_sam}[kind]
  fn = {"trainable": lambda q: q == "l2/kernel",
        "group_fn": lambda q: jnp.asarray(q) + 1,
        "stat_leaves": lambda q: jnp.asarray(q) > 0,
        "layers": lambda q: jnp.asarray(q) > 0}[kind]
  static = {"trainable": (), "stat_leaves": VSAM_STATIC}.get(
      kind, LAYERWISE_STATIC)
  tx = optax.inject_hyperparams(ctor, static_args=static)(rho=RHO,
                                                          **{kind: fn})
  with pytest.raises(ValueError, match=(
      rf"optax.inject_hyperparams.*static_args=\('{kind}',\)")):
    tx.init(mlp_params())
