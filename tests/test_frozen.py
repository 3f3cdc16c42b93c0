"""Frozen parameters: ``trainable=`` for every method, and the recipe with
``optax.multi_transform`` after the SAM transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers as tm
from tests.helpers import flat, grad_np, make_batch, mlp_loss, mlp_params, unflat

HEAD_ONLY = {"l1": {"kernel": False, "bias": False},
             "l2": {"kernel": True, "bias": True}}


def _head_only_sam(params, batch, rho, eps=1e-12):
  """NumPy: SAM on the head only (the backbone a constant); the backbone's
  output is its clean gradient."""
  g = grad_np(params, batch)
  m = flat(jax.tree.map(lambda x, t: np.full(x.shape, t), params, HEAD_ONLY)) > 0
  gh = np.where(m, g, 0.0)
  e = rho * gh / (np.linalg.norm(gh) + eps)
  h = grad_np(unflat(flat(params) + e, params), batch)
  return np.where(m, h, g)


@pytest.mark.parametrize(
    "trainable", [HEAD_ONLY, lambda path: path.startswith("l2/")],
    ids=["tree", "predicate"],
)
def test_frozen_backbone_equals_hand_written_sam_on_the_head(trainable):
  p, b, rho = mlp_params(), make_batch(), 0.2
  tx = sam_optax.sam(mlp_loss, rho, trainable=trainable)
  g = jax.grad(mlp_loss)(p, b)
  out, _ = jax.jit(lambda g, s: tx.update(g, s, p, batch=b))(g, tx.init(p))
  want = _head_only_sam(p, b, rho)
  np.testing.assert_allclose(flat(out), want, rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(out["l1"]["kernel"], g["l1"]["kernel"])


def test_no_backward_pass_into_the_frozen_backbone():
  """The second gradient differentiates the head only: one dot_general in
  the backward of the perturbed pass, against SAM's three."""
  p, b = mlp_params(), make_batch()

  def dots(tx):
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, p, batch=b))(
        p, tx.init(p)
    )
    return str(jaxpr).count("dot_general")

  full = dots(sam_optax.sam(mlp_loss))
  frozen = dots(sam_optax.sam(mlp_loss, trainable=HEAD_ONLY))
  # forward: 2 dots; backward: d/dW2, d/dh (into the backbone), d/dW1.
  assert full == 5 and frozen == 3, (full, frozen)


@pytest.mark.parametrize("name", tm.ALL)
def test_every_method_leaves_frozen_leaves_alone(name):
  tx = tm.sam_transform(name, trainable=HEAD_ONLY)
  p = mlp_params()
  s = tx.init(p)
  step = jax.jit(lambda g, s, b: tx.update(g, s, p, batch=b))
  for b in tm.batches(n=4):
    g = jax.grad(mlp_loss)(p, b)
    out, s = step(g, s, b)
    if name not in tm.FULL_OPTIMIZERS:
      np.testing.assert_array_equal(out["l1"]["kernel"], g["l1"]["kernel"])
      np.testing.assert_array_equal(out["l1"]["bias"], g["l1"]["bias"])
  st = sam_optax.stats(s)
  if "selected_layers" in st and name == "layerwise_sam":
    # indices into the trainable layers' paths: ["l2"] (l1 is frozen)
    assert st["selected_layers"].tolist() == [0]


def test_recipe_with_multi_transform_trains_the_head_only():
  p, b = mlp_params(), make_batch()
  labels = jax.tree.map(lambda t: "train" if t else "frozen", HEAD_ONLY)
  tx = optax.chain(
      sam_optax.sam(mlp_loss, 0.1, trainable=HEAD_ONLY),
      optax.multi_transform(
          {"train": optax.sgd(0.1), "frozen": optax.set_to_zero()}, labels
      ),
  )
  s = tx.init(p)
  q = p
  for _ in range(3):
    u, s = tx.update(jax.grad(mlp_loss)(q, b), s, q, batch=b)
    q = optax.apply_updates(q, u)
  np.testing.assert_array_equal(q["l1"]["kernel"], p["l1"]["kernel"])
  assert not np.allclose(q["l2"]["kernel"], p["l2"]["kernel"])


def test_trainable_errors():
  p = mlp_params()
  with pytest.raises(ValueError, match="trainable must be None, a predicate"):
    sam_optax.sam(mlp_loss, trainable={"l1": 1})
  with pytest.raises(ValueError, match="trainable does not match the structure"):
    sam_optax.sam(mlp_loss, trainable={"l1": True}).init(p)
  with pytest.raises(ValueError, match="trainable freezes every leaf"):
    sam_optax.sam(mlp_loss, trainable=lambda path: False).init(p)


# --------------------------------------------------------------------------
# The contract: the method on the trainable leaves equals the same method run
# on those leaves alone (a loss over them, the frozen leaves closed over).
# --------------------------------------------------------------------------


def mlp3_params(seed=0):
  """Three dense layers l1 (5->7), l2 (7->6), l3 (6->3), tanh between."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  shapes = {"l1": (5, 7), "l2": (7, 6), "l3": (6, 3)}
  return {
      name: {"kernel": jax.random.normal(ks[2 * i], shape) * 0.5,
             "bias": jax.random.normal(ks[2 * i + 1], shape[1:]) * 0.1}
      for i, (name, shape) in enumerate(shapes.items())
  }


def mlp3_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  h = jnp.tanh(h @ params["l2"]["kernel"] + params["l2"]["bias"])
  out = h @ params["l3"]["kernel"] + params["l3"]["bias"]
  return jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


BODY_FROZEN = {"l1": {"kernel": False, "bias": False},
               "l2": {"kernel": True, "bias": True},
               "l3": {"kernel": True, "bias": True}}
# A user's fixed element-wise mask, given with the structure of the params.
MASK3 = jax.tree.map(
    lambda x: np.random.default_rng(x.size).random(x.shape) < 0.5,
    mlp3_params(),
)

# Every method and variant the library offers (the registry's short-run
# settings), the layer-wise selections and a fixed mask included.
CONTRACT = {
    **{name: tm.METHODS[name] for name in tm.ALL if name != "ssam_mask"},
    "layerwise_sam_two": ("layerwise_sam", {"rho": 0.1, "num_layers": 2}),
    "layerwise_sam_fixed_all": (
        "layerwise_sam", {"rho": 0.1, "layers": ("l2", "l3"),
                          "normalize": "selection", "second": "all"}),
    "ssam_mask": ("ssam", {"rho": 0.05, "mask": MASK3}),
}


def _alone(tree):
  """The trainable leaves of a tree shaped like mlp3_params: l2 and l3."""
  return {k: tree[k] for k in ("l2", "l3")}


def _run(name, loss, params, frozen_params, trainable, steps):
  """(outputs, states) of `steps` jitted updates, each followed by an SGD
  step on the leaves that train (frozen leaves stay as they are)."""
  ctor, kw = CONTRACT[name]
  kw = dict(kw)
  if "mask" in kw and trainable is None:
    kw["mask"] = _alone(kw["mask"])
  tx = getattr(sam_optax, ctor)(loss, **kw, trainable=trainable)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  outs, states, p = [], [], params
  for b in tm.batches(n=steps):
    g = jax.grad(loss)(p, b)
    out, state = step(g, state, p, b)
    outs.append(out)
    states.append(state)
    if ctor == "lightsam":  # the output is the parameter update
      new = optax.apply_updates(p, out)
    else:
      new = jax.tree.map(lambda w, u: w - 0.05 * u, p, out)
    p = new if frozen_params is None else {**new, **frozen_params}
  return outs, states


def _assert_stats_equal(got, want, err):
  assert sorted(got) == sorted(want), err
  for k in want:
    g, w = np.asarray(got[k]), np.asarray(want[k])
    if np.issubdtype(w.dtype, np.floating):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=f"{err} {k}")
    else:
      np.testing.assert_array_equal(g, w, err_msg=f"{err} {k}")


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_trainable_equals_the_method_on_the_trainable_leaves_alone(name):
  """Eight steps of every method with l1 frozen: on l2 and l3 the output,
  every statistic and every state array equal the method run on
  {l2, l3} alone (l1 closed over in the loss); l1 gets the incoming
  gradient (LightSAM, a full optimizer: a zero update)."""
  p = mlp3_params()
  frozen = {"l1": p["l1"]}
  alone_loss = lambda q, b: mlp3_loss({**q, **frozen}, b)  # noqa: E731
  outs, states = _run(name, mlp3_loss, p, frozen, BODY_FROZEN, 8)
  want_outs, want_states = _run(name, alone_loss, _alone(p), None, None, 8)
  ctor = CONTRACT[name][0]
  q = p
  for i, (out, state, want, want_state) in enumerate(
      zip(outs, states, want_outs, want_states)):
    err = f"{name} step {i}"
    for k in ("l2", "l3"):
      tm_close = dict(rtol=2e-5, atol=1e-6, err_msg=f"{err} {k}")
      np.testing.assert_allclose(flat(out[k]), flat(want[k]), **tm_close)
    g = jax.grad(mlp3_loss)(q, tm.batches(n=8)[i])
    for leaf in ("kernel", "bias"):
      expect = (np.zeros_like(g["l1"][leaf]) if ctor == "lightsam"
                else g["l1"][leaf])
      np.testing.assert_array_equal(out["l1"][leaf], expect, err_msg=err)
    _assert_stats_equal(sam_optax.stats(state), sam_optax.stats(want_state), err)
    got_leaves, want_leaves = jax.tree.leaves(state), jax.tree.leaves(want_state)
    assert len(got_leaves) == len(want_leaves), err
    for a, b in zip(got_leaves, want_leaves):
      if jnp.issubdtype(b.dtype, jnp.floating):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=err)
      else:
        np.testing.assert_array_equal(a, b, err_msg=err)
    upd = (optax.apply_updates(q, out) if ctor == "lightsam"
           else jax.tree.map(lambda w, u: w - 0.05 * u, q, out))
    q = {**upd, **frozen}
