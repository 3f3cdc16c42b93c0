"""Every method under every way users run it (one shared parametrization).

Rows: devices (pmap, shard_map, sharded jit vs one device; identical state on
every device), precision (bfloat16 / float16), checkpoints (orbax, restored in
a fresh process), composition (clipping + base optimizer, inject_hyperparams
with a rho schedule, gradient accumulation, apply_if_finite), tracing.

Each method is configured so that a short run exercises everything it does:
refreshes, reuse steps, selection changes (see ``METHODS``).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sam_optax
from tests.helpers import (
    ALL, BATCH, FULL_OPTIMIZERS, assert_run_matches, METHODS, NDEV, STEPS, batches, build,
    make_batch, mlp_loss, mlp_params, needs8, ref_sam, replicate as _rep,
    run_single, shard as _shard, train_step, tree_rows_equal, flat,
)

@needs8
@pytest.mark.parametrize("name", ALL)
def test_pmap_matches_single_device_and_devices_agree(name):
  bs = batches()
  p1, s1 = run_single(name, bs)
  tx = build(name, axis_name="d")
  step = train_step(tx)

  @functools.partial(jax.pmap, axis_name="d")
  def pstep(p, s, b):
    g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "d")
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  del step
  params = mlp_params()
  pp, ps = _rep(params), _rep(tx.init(params))
  for b in bs:
    pp, ps = pstep(pp, ps, _shard(b))
  tree_rows_equal(ps)
  tree_rows_equal(pp)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[0], pp), p1, rtol=1e-4, atol=1e-5
  )
  st1 = sam_optax.stats(s1)
  stp = sam_optax.stats(jax.tree.map(lambda x: x[0], ps))
  assert int(stp["grad_evals"]) == int(st1["grad_evals"])


@needs8
def test_pmap_per_device_gradient_is_m_sharpness():
  """Per-device clean gradients as ``updates``: each device perturbs with
  its own shard's gradient; the output is the mean of the per-shard SAM
  gradients (the original SAM code's m-sharpness)."""
  params, batch, rho = mlp_params(), make_batch(n=32), 0.1
  tx = sam_optax.sam(mlp_loss, rho=rho, axis_name="d")

  @functools.partial(jax.pmap, axis_name="d")
  def pupdate(p, s, b):
    g = jax.grad(mlp_loss)(p, b)  # per-device gradient: m-sharpness
    return tx.update(g, s, p, batch=b)[0]

  out = pupdate(_rep(params), _rep(tx.init(params)), _shard(batch))
  shards = [jax.tree.map(lambda x: x[d * 4:(d + 1) * 4], batch)
            for d in range(NDEV)]
  expected = np.mean([ref_sam(params, b, rho) for b in shards], axis=0)
  for d in range(NDEV):
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda x: x[d], out)), expected, rtol=2e-5, atol=2e-6
    )


@needs8
@pytest.mark.parametrize("name", ALL)
def test_shard_map_matches_single_device(name):
  from jax.experimental.shard_map import shard_map

  bs = batches()
  p1, _ = run_single(name, bs)
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))
  tx = build(name, axis_name="d")

  def local(p, s, b):
    g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "d")
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  step = jax.jit(
      shard_map(
          local, mesh=mesh, in_specs=(P(), P(), P("d")), out_specs=(P(), P()),
          check_rep=False,
      )
  )
  p = mlp_params()
  s = tx.init(p)
  for b in bs:
    p, s = step(p, s, b)
  chex.assert_trees_all_close(p, p1, rtol=1e-4, atol=1e-5)


#: Methods with per-example or per-device statistics: Fisher scores, the
#: dynamic mask's |g| drop, vSAM's statistics, layer rankings at runtime.
STATISTICS = ("ssam_fisher", "ssam_dynamic", "vsam", "layerwise_sam_runtime",
              "layerwise_sam_sharpness")


@needs8
@pytest.mark.parametrize("name", STATISTICS)
def test_shard_map_default_check_vma_matches_single_device(name):
  """``jax.shard_map`` with JAX's default ``check_vma=True`` (here) and with
  False (:func:`test_shard_map_matches_single_device` runs every method
  so): the per-example / per-device statistics and the parameters equal the
  one device run. Under check_vma=True the gradient of the replicated
  parameters is the global mean when the loss is pmean'd (what is passed as
  ``updates``); under False, the per-device gradient pmean'd."""
  check_vma = True
  bs = batches(n=4)
  p1, s1 = run_single(name, bs)
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))
  tx = build(name, axis_name="d")

  def local(p, s, b):
    if check_vma:
      g = jax.grad(lambda q: jax.lax.pmean(mlp_loss(q, b), "d"))(p)
    else:
      g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "d")
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  step = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P("d")), out_specs=(P(), P()),
      check_vma=check_vma))
  assert_run_matches(step, tx, bs, p1, s1)


@needs8
@pytest.mark.parametrize("name", ALL)
def test_sharded_jit_matches_single_device(name):
  bs = batches()
  p1, s1 = run_single(name, bs)
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))
  tx = build(name)
  step = jax.jit(train_step(tx))
  p = jax.device_put(mlp_params(), NamedSharding(mesh, P()))
  s = tx.init(p)
  for b in bs:
    p, s = step(p, s, jax.device_put(b, NamedSharding(mesh, P("d"))))
  chex.assert_trees_all_close(p, p1, rtol=1e-4, atol=1e-5)
  assert int(sam_optax.stats(s)["grad_evals"]) == int(sam_optax.stats(s1)["grad_evals"])


# --------------------------------------------------------------------------
# Precision.
# --------------------------------------------------------------------------

# bfloat16 keeps 8 bits of mantissa (relative error ~4e-3 per op), float16 11
# bits; after a few steps the parameters agree with float32 to about this.
PRECISION_TOL = {jnp.bfloat16: 5e-2, jnp.float16: 1e-2}


# Every method in bfloat16; float16 (a narrower exponent range, the same
# float32 statistics inside) for one method of each kind of state and
# statistic: a norm (sam), an adaptive geometry (asam), per-layer norms
# (layerwise_sam_sharpness), a mask (ssam_fisher, ssam_dynamic), a stored
# gradient (looksam), sampling statistics (vsam), accumulators (lightsam,
# lightsam_adam).
F16 = ("asam", "layerwise_sam_sharpness", "lightsam", "lightsam_adam",
       "looksam", "sam", "ssam_dynamic", "ssam_fisher", "vsam")
_PRECISION_CASES = [
    pytest.param(name, jnp.bfloat16, id=f"{name}-bf16") for name in ALL
] + [pytest.param(name, jnp.float16, id=f"{name}-f16") for name in F16]


@pytest.mark.parametrize("name,dtype", _PRECISION_CASES)
def test_low_precision_dtype_finite_and_close(name, dtype):
  bs32 = batches(n=3)
  p32, _ = run_single(name, bs32)
  params = jax.tree.map(lambda x: x.astype(dtype), mlp_params())
  tx = build(name)
  s = tx.init(params)

  @jax.jit
  def update(p, s, b):
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, batch=b)
    return u, s

  p = params
  for b in batches(n=3, dtype=dtype):
    u, s = update(p, s, b)
    assert all(x.dtype == dtype for x in jax.tree.leaves(u))
    chex.assert_tree_all_finite(u)
    p = optax.apply_updates(p, u)
  # Norms, statistics and accumulators in state are float32 (or integer).
  for x in jax.tree.leaves(s):
    if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim == 0:
      assert x.dtype == jnp.float32, x.dtype
  tol = PRECISION_TOL[dtype]
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), p), p32, rtol=tol, atol=tol
  )


# --------------------------------------------------------------------------
# Composition.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_chain_with_clipping_before_and_base_after(name):
  bs = batches(n=3)
  tx = optax.chain(optax.clip_by_global_norm(0.5), build(name))
  p, s = mlp_params(), None
  s = tx.init(p)
  step = jax.jit(train_step(tx))
  for b in bs:
    p, s = step(p, s, b)
  chex.assert_tree_all_finite(p)
  assert int(sam_optax.stats(s)["count"]) == 3


@pytest.mark.parametrize("name", ALL)
def test_inject_hyperparams_rho_schedule(name):
  """rho on a schedule through inject_hyperparams equals rho given directly."""
  sched = optax.linear_schedule(0.1, 0.02, 4)
  ctor, kwargs = METHODS[name]
  kwargs = {k: v for k, v in kwargs.items() if k != "rho"}
  # Structural arguments (ints that fix shapes or periods, tuples, strings)
  # belong in static_args, as the README says; rho is the injected one.
  sig = inspect.signature(getattr(sam_optax, ctor)).parameters
  values = {k: p.default for k, p in sig.items() if p.default is not inspect.Parameter.empty}
  values.update(kwargs)
  statics = ("loss_fn",) + tuple(
      k for k, v in values.items()
      if isinstance(v, (int, tuple, str)) and not isinstance(v, bool) and k != "rho"
  )
  injected = optax.inject_hyperparams(getattr(sam_optax, ctor), static_args=statics)(
      mlp_loss, rho=sched, **kwargs
  )
  tx = injected if name in FULL_OPTIMIZERS else optax.chain(injected, optax.sgd(0.05, momentum=0.9))
  p, s = mlp_params(), None
  s = tx.init(p)
  step = jax.jit(train_step(tx))
  bs = batches(n=4)
  for b in bs:
    p, s = step(p, s, b)
  p_ref, _ = run_single(name, bs, rho=sched)
  # inject_hyperparams hands every float hyperparameter (b1, b2, alpha, ...)
  # over as a float32 array instead of a Python float: rounding at 1e-7,
  # which Adam's division by sqrt(v) lifts to ~1e-6 on near-zero weights.
  chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(sam_optax.stats(s)["hyperparams/rho"]), float(sched(3)), rtol=1e-6)  # value used by the last update


@pytest.mark.parametrize("name", [n for n in ALL if n not in FULL_OPTIMIZERS])
def test_gradient_accumulation_recipe(name):
  """Method per micro-batch, MultiSteps around the base optimizer: k micro
  steps give one base step on the mean of the method's outputs."""
  k = 2
  ctor, kwargs = METHODS[name]
  method = getattr(sam_optax, ctor)(mlp_loss, **kwargs)
  tx = optax.chain(
      method, optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k).gradient_transformation()
  )
  p0 = mlp_params()
  s = tx.init(p0)
  step = jax.jit(train_step(tx))
  ms = method.init(p0)
  outs = []
  p = p0
  for b in batches(n=k):
    outs.append(method.update(jax.grad(mlp_loss)(p0, b), ms, p0, batch=b))
    ms = outs[-1][1]
    p, s = step(p, s, b)
  mean = jax.tree.map(lambda *x: sum(x) / k, *[o[0] for o in outs])
  expected = jax.tree.map(lambda w, u: w - 0.1 * u, p0, mean)
  chex.assert_trees_all_close(p, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_apply_if_finite_skips_nan_step_and_keeps_state(name):
  tx = optax.apply_if_finite(build(name), max_consecutive_errors=3)
  p = mlp_params()
  s = tx.init(p)
  step = jax.jit(train_step(tx))
  bs = batches(n=3)
  p, s = step(p, s, bs[0])
  p, s = step(p, s, bs[1])

  @jax.jit
  def nan_step(p, s, b):
    g = jax.tree.map(lambda x: x * jnp.nan, jax.grad(mlp_loss)(p, b))
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  p2, s2 = nan_step(p, s, bs[2])
  chex.assert_trees_all_equal(p2, p)
  chex.assert_trees_all_equal(s2.inner_state, s.inner_state)
  assert int(s2.total_notfinite) == 1


# --------------------------------------------------------------------------
# Tracing.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_jitted_step_compiles_once(name):
  tx = build(name)
  traces = []

  @jax.jit
  def step(p, s, b):
    traces.append(1)
    return train_step(tx)(p, s, b)

  p = mlp_params()
  s = tx.init(p)
  for b in batches(n=8):
    p, s = step(p, s, b)
  assert len(traces) == 1


# --------------------------------------------------------------------------
# Checkpoints: save mid-run, restore in a fresh process, continue exactly.
# --------------------------------------------------------------------------

_RESTORE = r"""
import os, sys, json
sys.path.insert(0, {root!r})
import jax, numpy as np, orbax.checkpoint as ocp
from tests import helpers as tm
out = {{}}
for name in {names!r}:
    tx = tm.build(name)
    p0 = tm.mlp_params()
    target = {{"params": p0, "state": tx.init(p0)}}
    restored = ocp.StandardCheckpointer().restore(os.path.join({ckpt!r}, name), target)
    p, s = restored["params"], restored["state"]
    step = jax.jit(tm.train_step(tx))
    for b in tm.batches()[3:]:
        p, s = step(p, s, b)
    np.savez(os.path.join({ckpt!r}, name + ".npz"), *[np.asarray(x) for x in jax.tree.leaves(p)])
print("restored", len({names!r}))
"""


# One method per kind of state a checkpoint must carry: none beyond the
# count (sam), a layer selection (by gradient, by sharpness), masks, a PRNG
# key, stored reuse directions, sampling windows, accumulators.
STATEFUL = ["sam", "layerwise_sam_runtime", "layerwise_sam_sharpness",
            "ssam_fisher", "ssam_dynamic", "ssam_mask", "looksam",
            "looksam_per_leaf", "vsam", "lightsam", "lightsam_adam"]


def test_checkpoint_restore_in_fresh_process_continues_exactly():
  import orbax.checkpoint as ocp

  root = str(pathlib.Path(__file__).resolve().parent.parent)
  with tempfile.TemporaryDirectory() as ckpt:
    finals = {}
    ckptr = ocp.StandardCheckpointer()
    for name in STATEFUL:
      tx = build(name)
      p = mlp_params()
      s = tx.init(p)
      step = jax.jit(train_step(tx))
      bs = batches()
      for i, b in enumerate(bs):
        if i == 3:
          ckptr.save(os.path.join(ckpt, name), {"params": p, "state": s})
        p, s = step(p, s, b)
      finals[name] = [np.asarray(x) for x in jax.tree.leaves(p)]
    ckptr.wait_until_finished()
    code = _RESTORE.format(root=root, names=STATEFUL, ckpt=ckpt)
    # The fresh process compiles with this one's XLA flags (conftest's):
    # "exactly" compares one program, not two XLA settings.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in STATEFUL:
      got = np.load(os.path.join(ckpt, name + ".npz"))
      for i, want in enumerate(finals[name]):
        np.testing.assert_array_equal(got[f"arr_{i}"], want, err_msg=name)
