"""Counters never wrap: ``count``, ``grad_evals`` and every integer counter
of a part (refreshes, steps since a sample, samples) saturate at 2**31 - 1,
as ``optax.safe_increment`` does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax
from sam_optax._src import base
from sam_optax._src import engine
from tests import helpers as tm
from tests.helpers import mlp_loss, mlp_params

TOP = 2**31 - 1
START = 2**31 - 3


@pytest.mark.parametrize("counter,n,want", [
    (0, 8, 8), (START, 1, START + 1), (START, 2, TOP), (START, 16, TOP),
    (TOP, 0, TOP), (TOP, 1, TOP), (TOP, 2**31 - 1, TOP),
])
def test_saturating_add(counter, n, want):
  got = base.saturating_add(jnp.int32(counter), jnp.int32(n))
  assert got.dtype == jnp.int32 and int(got) == want


def _engine_state(state):
  found = []

  def walk(x):
    if isinstance(x, engine.SharpnessAwareState):
      found.append(x)
    elif isinstance(x, (tuple, list)):
      for y in x:
        walk(y)

  walk(state)
  assert len(found) == 1
  return found[0]


def _scalar_counters(tree):
  return [x for x in jax.tree.leaves(tree)
          if isinstance(x, jax.Array) and x.dtype == jnp.int32 and x.ndim == 0]


def _set_counters(tree, value):
  return jax.tree.map(
      lambda x: jnp.full_like(x, value)
      if isinstance(x, jax.Array) and x.dtype == jnp.int32 and x.ndim == 0
      else x, tree)


@pytest.mark.parametrize("name", ["sam", "ssam_fisher", "ssam_dynamic",
                                  "looksam", "vsam", "layerwise_sam_runtime",
                                  "lightsam"])
def test_counters_saturate(name):
  """Every scalar int32 counter of the method's state set to 2**31 - 3,
  then 4 steps: none wraps to a negative value; count stops at 2**31 - 1;
  grad_evals stops there too (or counts the evaluations made, when fewer
  than 2 were made)."""
  tx = tm.build(name)
  p = mlp_params()
  state = tx.init(p)
  sam_state = _engine_state(state)
  assert len(_scalar_counters(sam_state)) >= 2
  state = _replace_engine_state(state, _set_counters(sam_state, START))
  step = jax.jit(tm.train_step(tx))
  for b in tm.batches(n=4):
    before = int(_engine_state(state).grad_evals)
    p, state = step(p, state, b)
    assert int(_engine_state(state).grad_evals) >= before, name
  after = _engine_state(state)
  assert int(after.count) == TOP, name
  for x in _scalar_counters(after):
    assert int(x) >= 0, (name, jax.tree.map(int, after))
  if name in ("sam", "ssam_fisher", "lightsam"):  # >= 2 evaluations made
    assert int(after.grad_evals) == TOP, name


def _replace_engine_state(state, new):
  if isinstance(state, engine.SharpnessAwareState):
    return new
  if isinstance(state, tuple) and not hasattr(state, "_fields"):
    return tuple(_replace_engine_state(s, new) for s in state)
  return state


def test_stats_doc_says_counters_saturate():
  doc = " ".join(sam_optax.stats.__doc__.split())
  assert "saturate" in doc
  np.testing.assert_equal(
      int(sam_optax.stats(_set_counters(
          sam_optax.sam(mlp_loss).init(mlp_params()), TOP))["count"]), TOP)
