"""``axis_name`` against the mapped axes the transform runs under.

A batch split over a ``shard_map`` axis that ``axis_name`` leaves out, with
replicated parameters, used to give a step as many times too large as the
axis has devices (JAX sums the transform's own gradients over the axis);
parameters that differ over a named axis were averaged together; an
axis_name bound nowhere failed with JAX's own NameError. Each is now a
ValueError at trace time, and a batch split over several mesh axes takes a
tuple ``axis_name``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import sam_optax
from tests.helpers import (
    ALL, NDEV, assert_run_matches, batches, build, mlp_loss, mlp_params, needs8, run_single,
)


def _mesh(shape=(NDEV,), names=("d",)):
  return Mesh(np.array(jax.devices()[:NDEV]).reshape(shape), names)


def _shard_map_step(tx, mesh, batch_spec):
  """One jitted shard_map train step, JAX's default check_vma (the gradient
  of the loss pmean'd over the batch's axes)."""
  data_axes = batch_spec[0]

  def local(p, s, b):
    g = jax.grad(lambda q: jax.lax.pmean(mlp_loss(q, b), data_axes))(p)
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), batch_spec),
      out_specs=(P(), P())))


@needs8
@pytest.mark.parametrize("name", ALL)
def test_forgotten_axis_name_under_shard_map_is_an_error(name):
  """shard_map with JAX's default check_vma: the batch varies over 'd',
  the parameters do not, axis_name is None. Before: no error, and every
  second gradient summed over the 8 devices (SAM's output 8x)."""
  tx = build(name)  # axis_name=None
  step = _shard_map_step(tx, _mesh(), P("d"))
  p = mlp_params()
  with pytest.raises(ValueError, match=(
      r"the batch varies over the mapped axis 'd' \(shard_map\) but "
      r"axis_name=None does not name it.*Pass axis_name='d'")):
    step(p, tx.init(p), batches(n=1)[0])


@needs8
@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_m_sharpness_under_default_check_vma(name):
  """JAX's idiom for per-device gradients under the default check_vma: the
  replicated parameters cast to varying (``pcast``), then the gradient.
  Passed with the un-cast parameters, this is m-sharpness and equals the
  same step under check_vma=False; the cast parameters themselves are
  refused (they look like parameters sharded over the axis), with a
  message that says to pass them un-cast."""
  tx = build(name, axis_name="d")
  mesh = _mesh()

  def typed(p, s, b):
    cast = jax.tree.map(lambda x: jax.lax.pcast(x, ("d",), to="varying"), p)
    return tx.update(jax.grad(mlp_loss)(cast, b), s, p, batch=b)[0]

  def untyped(p, s, b):
    return tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)[0]

  def cast_params(p, s, b):
    p = jax.tree.map(lambda x: jax.lax.pcast(x, ("d",), to="varying"), p)
    return tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)[0]

  def mapped(f, check=True):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), P("d")),
                                 out_specs=P(), check_vma=check))

  p, b = mlp_params(), batches(n=1)[0]
  chex.assert_trees_all_close(mapped(typed)(p, tx.init(p), b),
                              mapped(untyped, False)(p, tx.init(p), b),
                              rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match=(
      r"params vary over the mapped axis 'd', which axis_name='d' names\. "
      r"If they are replicated and were cast to varying.*pass the un-cast "
      r"params")):
    mapped(cast_params)(p, tx.init(p), b)


@needs8
@pytest.mark.parametrize("name", ["sam", "gnp", "looksam"])
def test_loss_closing_over_the_device_batch(name):
  """The loss defined inside the mapped step, closing over the device's
  batch (``batch=None``), under the default check_vma: the step equals the
  one-device run (the method's own gradient was summed over the devices,
  8x, because only a varying ``batch`` made it per device)."""
  bs = batches(n=3)
  p1, s1 = run_single(name, bs)
  tx = build(name, axis_name="d")

  def local(p, s, b):
    loss = lambda q, _: mlp_loss(q, b)  # noqa: E731
    g = jax.grad(lambda q: jax.lax.pmean(mlp_loss(q, b), "d"))(p)
    u, s = tx.update(g, s, p, batch=None, loss_fn=loss)
    return optax.apply_updates(p, u), s

  step = jax.jit(jax.shard_map(local, mesh=_mesh(),
                               in_specs=(P(), P(), P("d")),
                               out_specs=(P(), P())))
  assert_run_matches(step, tx, bs, p1, s1)


@needs8
def test_per_device_models_without_axis_name_still_run():
  """A model per device (parameters varying over 'd', no axis_name) is a
  legitimate use: each device trains its own model; no error, and each
  equals the one-device run on its own shard."""
  tx = sam_optax.sam(mlp_loss, rho=0.1)
  mesh = _mesh()
  b = batches(n=1)[0]

  def local(p, s, b):
    p = jax.tree.map(lambda x: jax.lax.pcast(x, ("d",), to="varying"), p)
    u, _ = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
    return jax.tree.map(lambda x: x[None], u)

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("d")),
                               out_specs=P("d")))
  p = mlp_params()
  out = step(p, tx.init(p), b)
  per = len(b[0]) // NDEV
  for d in (0, NDEV - 1):
    shard = jax.tree.map(lambda x: x[d * per:(d + 1) * per], b)
    want, _ = tx.update(jax.grad(mlp_loss)(p, shard), tx.init(p), p,
                        batch=shard)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[d], out), want,
                                rtol=1e-5, atol=1e-6)


def test_axis_name_bound_nowhere_is_a_clear_error():
  tx = sam_optax.sam(mlp_loss, axis_name="d")
  p, b = mlp_params(), batches(n=1)[0]
  g = jax.grad(mlp_loss)(p, b)
  for run in (lambda: tx.update(g, tx.init(p), p, batch=b),
              lambda: jax.jit(lambda s: tx.update(g, s, p, batch=b))(
                  tx.init(p))):
    with pytest.raises(ValueError, match=(
        r"axis_name='d': no mapped axis 'd' is bound where update runs")):
      run()


@needs8
def test_axis_name_other_than_the_mapped_one_is_a_clear_error():
  tx = sam_optax.sam(mlp_loss, axis_name="data")
  p, b = mlp_params(), batches(n=1)[0]

  @jax.pmap
  def step(b):
    return tx.update(jax.grad(mlp_loss)(p, b), tx.init(p), p, batch=b)[0]

  shards = jax.tree.map(lambda x: x.reshape(NDEV, -1, *x.shape[1:]), b)
  with pytest.raises(ValueError, match=r"no mapped axis 'data' is bound"):
    step(shards)


@pytest.mark.parametrize("bad", [(), ("a", "a"), ("a", 1), 3, ["a"]])
def test_axis_name_must_be_a_name_or_tuple_of_names(bad):
  with pytest.raises(ValueError, match=(
      r"axis_name must be None, a string or a non-empty tuple of distinct "
      r"strings")):
    sam_optax.sam(mlp_loss, axis_name=bad)


TWO_AXES = ("sam", "gnp", "ssam_fisher", "vsam", "layerwise_sam_runtime")


@needs8
def test_tuple_axis_name_in_the_batch_specs_order():
  """A batch split over ('b', 'a') with axis_name=('b', 'a'): the Fisher's
  examples are counted in that order, and the run equals one device."""
  mesh = _mesh((2, 4), ("a", "b"))
  bs = batches(n=2)
  p1, s1 = run_single("ssam_fisher", bs)
  tx = build("ssam_fisher", axis_name=("b", "a"))
  assert_run_matches(_shard_map_step(tx, mesh, P(("b", "a"))), tx, bs, p1, s1)


@needs8
@pytest.mark.parametrize("name", TWO_AXES)
def test_batch_over_two_mesh_axes(name):
  """A batch split over both axes of a 2x4 mesh: axis_name=('a', 'b')
  equals the one-device run (Fisher examples counted over both axes);
  axis_name='a' alone is refused naming 'b' (before: a sum over 'b',
  silently)."""
  mesh = _mesh((2, 4), ("a", "b"))
  bs = batches(n=4)
  p1, s1 = run_single(name, bs)
  tx = build(name, axis_name=("a", "b"))
  assert_run_matches(_shard_map_step(tx, mesh, P(("a", "b"))), tx, bs, p1, s1)

  only_a = build(name, axis_name="a")
  step = _shard_map_step(only_a, mesh, P(("a", "b")))
  p = mlp_params()
  with pytest.raises(ValueError, match=(
      r"the batch varies over the mapped axis 'b' \(shard_map\) but "
      r"axis_name='a' does not name it.*Pass axis_name=\('a', 'b'\)")):
    step(p, only_a.init(p), bs[0])


@needs8
@pytest.mark.parametrize("name", ["ssam_fisher", "ssam_dynamic", "looksam",
                                  "vsam"])
def test_model_per_row_with_data_over_the_other_axis(name):
  """Two models on the rows ('a') of a 2x4 mesh, each row's batch split
  over its 4 devices ('b', named in axis_name), default check_vma: each
  model's step equals the one-device step on the whole batch. Sparse
  SAM's top-k loop carried invariant values while its counts varied with
  the models ("carry input and carry output must have equal types"), and
  LookSAM's / vSAM's lax.cond branches typed their outputs differently
  ("cond branches must have equal output types")."""
  mesh = _mesh((2, 4), ("a", "b"))
  tx = build(name, axis_name="b")
  b = batches(n=1)[0]
  models = [mlp_params(seed=0), mlp_params(seed=5)]
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731

  def local(p, s, b):
    p, s = jax.tree.map(lambda x: x[0], (p, s))
    g = jax.grad(lambda q: jax.lax.pmean(mlp_loss(q, b), "b"))(p)
    return jax.tree.map(lambda x: x[None], tx.update(g, s, p, batch=b)[0])

  step = jax.jit(jax.shard_map(local, mesh=mesh,
                               in_specs=(P("a"), P("a"), P("b")),
                               out_specs=P("a")))
  out = step(stack(models), stack([tx.init(p) for p in models]), b)
  one = build(name)  # the one-device run: no axis
  for row, p in enumerate(models):
    want, _ = jax.jit(lambda p, s: one.update(jax.grad(mlp_loss)(p, b), s, p,
                                              batch=b))(p, one.init(p))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[row], out), want,
                                rtol=1e-5, atol=1e-6)


@needs8
def test_a_real_branch_mismatch_keeps_jax_first_error():
  """Branches that differ in dtype under shard_map: JAX's own first error,
  naming the branch functions (the typing retry must not replace it with
  one about its wrappers)."""
  from sam_optax._src import base

  def as_float(x):
    return x * 1.0

  def as_int(x):
    return x.astype(jnp.int32)

  step = jax.jit(jax.shard_map(
      lambda x: base.cond(jnp.sum(x) > 0, as_float, as_int, x),
      mesh=_mesh(), in_specs=P("d"), out_specs=P("d")))
  with pytest.raises(TypeError, match=r"equal output types") as info:
    step(jnp.ones(NDEV))
  assert "as_int" in str(info.value) and "base.py" not in str(info.value)
