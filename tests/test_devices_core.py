"""SAM, ASAM and GNP on 8 forced CPU devices: pmap, m-sharpness, sharded jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sam_optax
from tests.test_core import flat, make_batch, mlp_loss, mlp_params, ref_sam, grad_np, unflat

NDEV = 8
pytestmark = pytest.mark.skipif(
    jax.device_count() < NDEV, reason="needs 8 (forced CPU) devices"
)

CTORS = {
    "sam": lambda **kw: sam_optax.sam(mlp_loss, rho=0.1, **kw),
    "asam": lambda **kw: sam_optax.asam(mlp_loss, rho=0.5, **kw),
    "gnp": lambda **kw: sam_optax.gnp(mlp_loss, rho=0.1, alpha=0.8, **kw),
}


def shard(tree):
  return jax.tree.map(lambda x: x.reshape((NDEV, -1) + x.shape[1:]), tree)


def replicate(tree):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (NDEV,) + x.shape), tree)


@pytest.mark.parametrize("name", sorted(CTORS))
def test_pmap_global_gradient_equals_single_device(name):
  params, batch = mlp_params(), make_batch(n=32)
  tx = optax.chain(CTORS[name](axis_name="d"), optax.sgd(0.1))
  tx1 = optax.chain(CTORS[name](), optax.sgd(0.1))

  @functools.partial(jax.pmap, axis_name="d")
  def pstep(p, s, b):
    g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "d")
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  @jax.jit
  def step(p, s, b):
    u, s = tx1.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
    return optax.apply_updates(p, u), s

  pp, ps = replicate(params), replicate(tx.init(params))
  p1, s1 = params, tx1.init(params)
  for i in range(3):
    b = make_batch(seed=i, n=32)
    pp, ps = pstep(pp, ps, shard(b))
    p1, s1 = step(p1, s1, b)
  for d in range(NDEV):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[d], pp), p1, rtol=2e-5, atol=2e-6)
  assert np.all(np.asarray(sam_optax.stats(ps)["grad_evals"]) == 3)


def test_pmap_per_device_gradient_is_m_sharpness():
  params, batch = mlp_params(), make_batch(n=32)
  rho = 0.1
  tx = sam_optax.sam(mlp_loss, rho=rho, axis_name="d")

  @functools.partial(jax.pmap, axis_name="d")
  def pupdate(p, s, b):
    g = jax.grad(mlp_loss)(p, b)  # per-device gradient: m-sharpness
    return tx.update(g, s, p, batch=b)[0]

  out = pupdate(replicate(params), replicate(tx.init(params)), shard(batch))
  shards = [jax.tree.map(lambda x: x[d * 4:(d + 1) * 4], batch) for d in range(NDEV)]
  expected = np.mean([ref_sam(params, b, rho) for b in shards], axis=0)
  for d in range(NDEV):
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[d], out)), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", sorted(CTORS))
def test_sharded_jit_equals_unsharded(name):
  params, batch = mlp_params(), make_batch(n=32)
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("data",))
  tx = optax.chain(CTORS[name](), optax.sgd(0.1))

  def step(p, s, b):
    u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
    return optax.apply_updates(p, u), s

  b_sh = jax.device_put(batch, NamedSharding(mesh, P("data")))
  p_rep = jax.device_put(params, NamedSharding(mesh, P()))
  out_sh, _ = jax.jit(step)(p_rep, tx.init(p_rep), b_sh)
  out, _ = jax.jit(step)(params, tx.init(params), batch)
  assert len(jax.tree.leaves(b_sh)[0].sharding.device_set) == NDEV
  chex.assert_trees_all_close(out_sh, out, rtol=2e-5, atol=2e-6)
