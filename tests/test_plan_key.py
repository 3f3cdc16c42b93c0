"""A plan's key covers every setting that changes a plan's meaning.

Every argument of every constructor (read from ``inspect.signature``) is
either in the key (changing it changes the key, so ``update`` refuses the
other transform's plans), or cannot change a plan: the two transforms then
have the same key and their planners make the same plans from the same
state, step after step."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from experiments import methods as registry
from sam_optax import parts
from sam_optax._src import engine
from tests.helpers import make_batch, mlp_loss, mlp_params

HEAD = {"l1": {"kernel": False, "bias": False},
        "l2": {"kernel": True, "bias": True}}
OTHER_MASK = jax.tree.map(lambda x: np.ones(x.shape, bool), mlp_params())
COMMON_ALT = {
    "loss_fn": lambda p, b: 2.0 * mlp_loss(p, b),
    "rho": optax.linear_schedule(0.1, 0.0, 8),  # a schedule: in the key
    "has_aux": True,
    "axis_name": "d",
    "eps": 1e-6,
    "trainable": HEAD,
    # m-sharpness changes how the second gradient is computed, not when.
    "num_splits": 2,
    "batch_axes": (0, 0),
}
COMMON_KEY = {"rho", "trainable"}

# ctor -> (base kwargs, {argument: another value}, the arguments in the key)
CASES = {
    "sam": ({}, {}, set()),
    "asam": ({}, {"eta": 0.1}, set()),
    "gnp": ({}, {"alpha": 0.5}, set()),
    "layerwise_sam": (
        {"select_by": "gradient", "num_layers": 1, "select_every": 2},
        {"alpha": 0.5, "num_layers": 2, "select_every": 1,
         "layers": ("l2",), "select_by": "sharpness",
         "group_fn": lambda p: p, "normalize": "selection", "second": "all"},
        {"num_layers", "select_every", "layers", "select_by", "group_fn"}),
    "ssam_fisher": (
        {"update_every": 2, "num_samples": 8},
        {"sparsity": 0.3, "num_samples": 4, "update_every": 3,
         "chunk_size": 2, "batch_axes": (0, 0)},
        {"update_every"}),
    "ssam_dynamic": (
        {"update_every": 2, "total_steps": 6},
        {"sparsity": 0.3, "drop_rate": 0.3, "update_every": 3,
         "total_steps": 10, "drop_criterion": "weight",
         "grow_criterion": "gradient", "seed": 1, "exact_count": False},
        {"update_every"}),
    "ssam": ({"mask": HEAD}, {"mask": OTHER_MASK}, set()),
    "looksam": ({"k": 2}, {"k": 3, "alpha": 0.5, "per_leaf": True}, {"k"}),
    "vsam": (
        {"warmup_steps": 2, "window": 4, "blocks": 2},
        {"warmup_steps": 3, "window": 6, "blocks": 1, "max_rate": 0.5,
         "gains": (0.2, 0.2), "decay": 0.5, "max_reuse": 1,
         "initial_rate": 2.0, "seed": 1, "stat_leaves": ("l2",)},
        {"warmup_steps", "window"}),
    "gsam": ({}, {"alpha": 0.5, "minimize_fp": False}, set()),
    "wsam": (
        {"base_optimizer": optax.sgd(0.1), "learning_rate": 0.1},
        {"gamma": 0.8, "base_optimizer": optax.sgd(0.2, momentum=0.9),
         "learning_rate": 0.2},
        set()),
    "fsam": ({}, {"sigma": 0.5, "lmbda": 0.5}, set()),
    "lightsam": (
        {"learning_rate": 0.1},
        {"learning_rate": 0.2, "variant": "adam", "b1": 0.8, "b2": 0.99},
        set()),
    "sharpness_aware": (
        {"geometry": parts.global_norm()},
        {"geometry": parts.adaptive(0.1), "combine": parts.mix(0.5),
         "region": parts.fisher_mask(0.5, num_samples=4, update_every=2),
         "gate": parts.every_k(2)},
        {"region", "gate"}),
}


def test_every_registry_constructor_is_covered():
  ctors = {s.constructor for s in registry.METHODS.values() if s.constructor}
  assert ctors <= set(CASES), sorted(ctors - set(CASES))


def _key(tx):
  return engine.spec_of(tx).key


def _with_count(state, count):
  """``state`` with its engine state's count set to ``count``."""
  if isinstance(state, engine.SharpnessAwareState):
    return state._replace(count=jnp.int32(count))
  if isinstance(state, tuple) and not hasattr(state, "_fields"):
    return tuple(_with_count(s, count) for s in state)
  return state


def _plans(planner, state, steps=12):
  return [planner(c, _with_count(state, c))._replace(owner=None)
          for c in range(steps)]


def _cases():
  for ctor, (base, alt, key) in CASES.items():
    for name in inspect.signature(getattr(sam_optax, ctor)).parameters:
      yield ctor, name


@pytest.mark.parametrize("ctor,arg", list(_cases()))
def test_each_argument_changes_the_key_or_cannot_change_a_plan(ctor, arg):
  base, alt, key = CASES[ctor]
  alt = {**COMMON_ALT, **alt}
  assert arg in alt, f"{ctor}({arg}=...) is not classified"
  fn = getattr(sam_optax, ctor)
  kw0 = {"loss_fn": mlp_loss, **base}
  tx0 = fn(**kw0)
  tx1 = fn(**{**kw0, arg: alt[arg]})
  if arg in key | COMMON_KEY:
    assert _key(tx0) != _key(tx1), (ctor, arg)
    return
  assert _key(tx0) == _key(tx1), (ctor, arg)
  # The same plans, from the same state, step after step.
  state = tx1.init(mlp_params())
  assert (_plans(sam_optax.planner(tx0), state)
          == _plans(sam_optax.planner(tx1), state)), (ctor, arg)


def test_a_plan_made_with_trainable_is_refused_without_it():
  """The issue's case: a runtime layer selection restricted by trainable=
  plans indices into the trainable layers; a transform without trainable=
  refuses that plan, naming trainable=."""
  kw = {"select_by": "gradient", "num_layers": 1, "select_every": 1}
  with_t = sam_optax.layerwise_sam(mlp_loss, **kw, trainable=HEAD)
  without = sam_optax.layerwise_sam(mlp_loss, **kw)
  p, b = mlp_params(), make_batch()
  s = with_t.init(p)
  g = jax.grad(mlp_loss)(p, b)
  _, s = with_t.update(g, s, p, batch=b)
  plan = sam_optax.planner(with_t)(1, s)
  with pytest.raises(ValueError, match=r"trainable=.*layer indices count"):
    without.update(g, without.init(p), p, batch=b, plan=plan)
  # the same mask built again (another dict) shares the plans
  again = sam_optax.layerwise_sam(
      mlp_loss, **kw, trainable=jax.tree.map(lambda x: x, HEAD))
  again.update(g, s, p, batch=b, plan=plan)
