"""The loss at update time: ``sam(rho=...)`` then ``update(..., loss_fn=...)``.

Every method takes ``loss_fn`` at construction or at ``update``; the
update-time one wins where both are given. The update-time form is checked
against the construction-time form (itself checked against NumPy elsewhere)
for every method, unplanned, planned and under ``shard_map``, with a loss
that closes over a value traced in the user's jitted ``train_step``; and
SAM's update-time form against NumPy directly.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sam_optax
from tests import helpers as tm
from tests.helpers import flat, make_batch, mlp_loss, mlp_params, ref_sam

HEAD_ONLY = {"l1": {"kernel": False, "bias": False},
             "l2": {"kernel": True, "bias": True}}
STEPS = 6


def _chain(sam_tx, name):
  if name in tm.FULL_OPTIMIZERS:
    return sam_tx
  return optax.chain(sam_tx, optax.sgd(0.05, momentum=0.9))


def _run(name, *, at_update, planned=False, sharded=False, **over):
  """Params and state after STEPS jitted steps. ``at_update``: the
  transform is built without a loss and each step passes a closure defined
  inside the jitted step (closing over a traced scale, 1.0), traced once."""
  axis = "d" if sharded else None
  sam_tx = tm.sam_transform(name, loss=None if at_update else mlp_loss,
                            axis_name=axis, **over)
  tx = _chain(sam_tx, name)
  plan_of = sam_optax.planner(sam_tx)

  def step(p, s, b, scale, plan):
    loss = lambda q, x: mlp_loss(q, x) * scale  # noqa: E731  # a closure
    g = jax.grad(loss)(p, b)
    if sharded:
      g = jax.lax.pmean(g, "d")
    extra = {"loss_fn": loss} if at_update else {}
    u, s = tx.update(g, s, p, batch=b, plan=plan, **extra)
    return optax.apply_updates(p, u), s

  if sharded:
    mesh = Mesh(np.array(jax.devices()[:tm.NDEV]), ("d",))
    inner = step

    def step(p, s, b, scale, plan):  # pylint: disable=function-redefined
      return jax.shard_map(
          functools.partial(inner, plan=plan), mesh=mesh,
          in_specs=(P(), P(), P("d"), P()), out_specs=(P(), P()),
          check_vma=False,
      )(p, s, b, scale)

  traces = []

  def counted(*args):
    traces.append(args[-1])  # at trace time only
    return step(*args)

  jitted = jax.jit(counted, static_argnums=4)
  p = mlp_params()
  s = tx.init(p)
  if sharded:  # replicated from the start: no retrace on the second call
    p, s = jax.device_put((p, s), NamedSharding(mesh, P()))
  plans = []
  for count, b in enumerate(tm.batches(n=STEPS)):
    plans.append(plan_of(count, s) if planned else None)
    p, s = jitted(p, s, b, jnp.float32(1.0), plans[-1])
  # The step (the loss closure inside it) is traced once per distinct plan.
  assert len(traces) == len(set(plans)), (len(traces), len(set(plans)))
  return p, s


@functools.lru_cache(maxsize=None)
def _reference(name):
  """The construction-time form, unplanned, one device."""
  return _run(name, at_update=False)


def _as_data(tree):
  return jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


# Every method and region; the variants that differ only in the arithmetic
# of a part (LookSAM per leaf, LightSAM II and III) read the loss the same
# way and are left out to save their compiles.
EVERY = [n for n in tm.ALL
         if n not in ("looksam_per_leaf", "lightsam_adagrad", "lightsam_adam")]


@pytest.mark.parametrize("name", EVERY)
def test_update_time_loss_equals_construction_time_loss(name):
  """Every method: the same params and state from the update-time loss as
  from the construction-time one (to float rounding: the closure
  multiplies by a traced 1.0), the step traced once."""
  p0, s0 = _reference(name)
  p1, s1 = _run(name, at_update=True)
  chex.assert_trees_all_close(p1, p0, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(_as_data(s1), _as_data(s0), rtol=1e-6,
                              atol=1e-7)


# The methods whose plans change the compiled program (a skipped second
# gradient, a mask refresh, a static layer selection per plan).
PLANNED = ["looksam", "vsam", "ssam_fisher", "layerwise_sam_runtime"]


@pytest.mark.parametrize("name", PLANNED)
def test_update_time_loss_planned(name):
  """Planned steps with the update-time loss equal the unplanned
  construction-time run (to the planned path's tolerance), with the same
  gradient evaluations, each plan traced once."""
  p0, s0 = _reference(name)
  p2, s2 = _run(name, at_update=True, planned=True)
  chex.assert_trees_all_close(p2, p0, rtol=2e-5, atol=2e-6)
  assert (int(sam_optax.stats(s2)["grad_evals"])
          == int(sam_optax.stats(s0)["grad_evals"]))


# SAM; the output side found from the loss's graph; per-example gradients
# of the loss; a full optimizer.
SHARDED = ["sam", "layerwise_sam", "ssam_fisher", "lightsam"]


@tm.needs8
@pytest.mark.parametrize("name", SHARDED)
def test_update_time_loss_under_shard_map(name):
  """shard_map over 8 devices (axis_name, the batch split), the loss a
  closure inside the step: equal to the one-device construction-time run."""
  p0, s0 = _reference(name)
  p3, s3 = _run(name, at_update=True, sharded=True)
  chex.assert_trees_all_close(p3, p0, rtol=1e-4, atol=1e-5)
  assert (int(sam_optax.stats(s3)["grad_evals"])
          == int(sam_optax.stats(s0)["grad_evals"]))


@pytest.mark.parametrize("name", ["sam", "layerwise_sam", "ssam_fisher",
                                  "lightsam"])
def test_update_time_loss_with_trainable(name):
  """trainable= with the loss at update time: the same as at construction
  (the sub-tree loss is built from the update's loss)."""
  p0, s0 = _run(name, at_update=False, trainable=HEAD_ONLY)
  p1, s1 = _run(name, at_update=True, trainable=HEAD_ONLY)
  chex.assert_trees_all_close(p1, p0, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(_as_data(s1), _as_data(s0), rtol=1e-6,
                              atol=1e-7)
  np.testing.assert_array_equal(p1["l1"]["kernel"], mlp_params()["l1"]["kernel"])


def test_update_time_sam_against_numpy():
  """SAM from an update-time loss equals the NumPy reference."""
  p, b, rho = mlp_params(), make_batch(), 0.2
  tx = sam_optax.sam(rho=rho)
  g = jax.grad(mlp_loss)(p, b)
  out, _ = jax.jit(
      lambda g, s: tx.update(g, s, p, batch=b, loss_fn=mlp_loss)
  )(g, tx.init(p))
  np.testing.assert_allclose(flat(out), ref_sam(p, b, rho), rtol=2e-5,
                             atol=2e-6)


def test_update_time_loss_wins_over_construction_time_loss():
  p, b, rho = mlp_params(), make_batch(), 0.2
  wrong = lambda q, x: 3.0 * mlp_loss(q, x)  # noqa: E731
  tx = sam_optax.sam(wrong, rho=rho)
  g = jax.grad(mlp_loss)(p, b)
  out, _ = tx.update(g, tx.init(p), p, batch=b, loss_fn=mlp_loss)
  np.testing.assert_allclose(flat(out), ref_sam(p, b, rho), rtol=2e-5,
                             atol=2e-6)
  out, _ = tx.update(g, tx.init(p), p, batch=b)  # the construction-time one
  np.testing.assert_allclose(flat(out), 3 * ref_sam(p, b, rho), rtol=2e-5,
                             atol=2e-6)


def test_update_time_loss_with_has_aux():
  """has_aux=True at construction applies to the update-time loss; the aux
  of the perturbed pass is discarded."""
  p, b, rho = mlp_params(), make_batch(), 0.2
  tx = optax.chain(sam_optax.gnp(rho=rho, alpha=0.5, has_aux=True),
                   optax.sgd(0.1))
  aux_loss = lambda q, x: (mlp_loss(q, x), {"n": jnp.ones(3)})  # noqa: E731
  g = jax.grad(mlp_loss)(p, b)
  out, _ = jax.jit(
      lambda g, s: tx.update(g, s, p, batch=b, loss_fn=aux_loss)
  )(g, tx.init(p))
  want = 0.5 * flat(g) + 0.5 * ref_sam(p, b, rho)
  np.testing.assert_allclose(flat(out), -0.1 * want, rtol=2e-5, atol=2e-6)
  with pytest.raises(ValueError, match="has_aux=True: loss_fn must return"):
    tx.update(g, tx.init(p), p, batch=b, loss_fn=mlp_loss)


def test_update_time_loss_under_inject_hyperparams():
  """No loss at construction: inject_hyperparams needs no static_args for
  it, and the update's loss_fn passes through to the method."""
  p, b = mlp_params(), make_batch()
  tx = optax.inject_hyperparams(sam_optax.sam)(rho=0.2)
  g = jax.grad(mlp_loss)(p, b)
  out, s = jax.jit(
      lambda g, s: tx.update(g, s, p, batch=b, loss_fn=mlp_loss)
  )(g, tx.init(p))
  np.testing.assert_allclose(flat(out), ref_sam(p, b, 0.2), rtol=2e-5,
                             atol=2e-6)
  s.hyperparams["rho"] = jnp.float32(0.0)  # injected: rho 0, the clean g
  out, _ = tx.update(g, s, p, batch=b, loss_fn=mlp_loss)
  np.testing.assert_allclose(flat(out), flat(g), rtol=1e-6)


def test_missing_and_bad_loss_errors():
  p, b = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(p, b)
  for tx in (sam_optax.sam(), sam_optax.lightsam(learning_rate=0.1),
             tm.sam_transform("vsam", loss=None)):
    with pytest.raises(ValueError, match=(
        r"built without a loss_fn and update got none.*sam_optax.sam\(loss_fn"
        r".*loss_fn=loss_fn\)")):
      tx.update(g, tx.init(p), p, batch=b)
  tx = sam_optax.sam()
  with pytest.raises(ValueError, match="update's loss_fn must be callable"):
    tx.update(g, tx.init(p), p, batch=b, loss_fn=1.0)
  with pytest.raises(ValueError, match=r"pass the radius by keyword"):
    sam_optax.sam(0.05)
  with pytest.raises(ValueError, match="lightsam needs learning_rate"):
    sam_optax.lightsam()
  with pytest.raises(ValueError, match="TrainState.apply_gradients"):
    tx.update(g, tx.init(p), p)
