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
    assert st["selected_layers"].tolist() == [1]  # the frozen l1 ranks last


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
