"""Planned steps: every method, planned against unplanned.

For every row of the shared method table (``tests/helpers.py``) plus a
radius schedule that reaches 0 and a parts combination (Fisher mask with
vSAM sampling): N planned steps give the same parameters and state as N
unplanned ones; no planned lowering holds a conditional (``stablehlo.case``);
a method has the expected handful of distinct plans, each traced once; the
planner reads the device only where a decision depends on device state;
plans agree across devices under pmap and sharded jit.
"""

from __future__ import annotations

import collections
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sam_optax
from sam_optax import parts
from sam_optax._src import engine as engine_lib
from sam_optax._src import planner as planner_lib
from tests import helpers as tm
from tests.helpers import mlp_loss, mlp_params

STEPS = 12  # vSAM (warm-up 2, window 4): warm-up, two and a half windows


def _rho_schedule(count):
  """0 on steps 3 and 4, 0.1 elsewhere: a planned step knows it on the host."""
  return jnp.where((count == 3) | (count == 4), 0.0, 0.1)


def _rho_warmup(count):
  """0 on the first two steps: a selection by sharpness has no ranking yet
  when its first computed step comes."""
  return jnp.where(count < 2, 0.0, 0.1)


# Extra rows beyond the method table.
EXTRA = {
    "looksam_rho_schedule": lambda: sam_optax.looksam(
        mlp_loss, _rho_schedule, k=2
    ),
    "fisher_vsam_parts": lambda: sam_optax.sharpness_aware(
        mlp_loss, 0.05,
        geometry=parts.global_norm(),
        region=parts.fisher_mask(0.5, num_samples=4, update_every=3),
        gate=parts.variation_sampling(warmup_steps=2, window=4, blocks=2),
        combine=parts.decayed_reuse(),
    ),
    "layerwise_select_every_1": lambda: sam_optax.layerwise_sam(
        mlp_loss, 0.1, num_layers=1, select_by="gradient"
    ),
    "layerwise_sharpness_rho_warmup": lambda: sam_optax.layerwise_sam(
        mlp_loss, _rho_warmup, num_layers=1, select_by="sharpness"
    ),
}

# Distinct plans over STEPS steps (the "handful" the README promises).
EXPECTED_PLANS = {
    "sam": 1, "asam": 1, "gnp": 1, "layerwise_sam": 1,
    "layerwise_sam_fixed": 1, "ssam_mask": 1,
    "lightsam": 1, "lightsam_adagrad": 1, "lightsam_adam": 1,
    "looksam": 2, "looksam_per_leaf": 2,  # SAM step, reuse step
    "ssam_fisher": 2, "ssam_dynamic": 2,  # refresh or not
    "vsam": 4,  # sampled or not x ends a window (draws the next) or not
    "looksam_rho_schedule": 4,  # (SAM, reuse) x (rho > 0, rho = 0)
    # rho = 0 (every layer, nothing computed); the first computed step
    # (every layer); then the selections of the one layer (here 2)
    "layerwise_sharpness_rho_warmup": 4,
}


def build(name):
  """(the SAM transform, the full optimizer) for a row."""
  if name in EXTRA:
    sam_tx = EXTRA[name]()
    return sam_tx, optax.chain(sam_tx, optax.sgd(0.05, momentum=0.9))
  sam_tx = tm.sam_transform(name)
  if name in tm.FULL_OPTIMIZERS:
    return sam_tx, sam_tx
  return sam_tx, optax.chain(sam_tx, optax.sgd(0.05, momentum=0.9))


ROWS = tm.ALL + sorted(EXTRA)


def _batches():
  return tm.batches(n=STEPS)


def _run(name, planned, traces=None):
  sam_tx, tx = build(name)
  plan_of = sam_optax.planner(sam_tx)

  @functools.partial(jax.jit, static_argnames="plan")
  def step(p, s, b, plan=None):
    if traces is not None:
      traces[plan] += 1
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, batch=b, plan=plan)
    return optax.apply_updates(p, u), s

  p = mlp_params()
  s = tx.init(p)
  plans = []
  for count, b in enumerate(_batches()):
    plan = plan_of(count, s) if planned else None
    plans.append(plan)
    p, s = step(p, s, b, plan=plan)
  return p, s, plans, plan_of, step


#: Runtime layer selections: under a plan, one program per distinct
#: selection; without one, an array mask and no conditional at all.
RUNTIME_LAYERS = ("layerwise_sam_runtime", "layerwise_sam_sharpness",
                  "layerwise_select_every_1", "layerwise_sharpness_rho_warmup")


@pytest.mark.parametrize("name", ROWS)
def test_planned_equals_unplanned_with_few_plans_each_traced_once(name):
  p0, s0, _, _, _ = _run(name, planned=False)
  traces = collections.Counter()
  p1, s1, plans, plan_of, step = _run(name, planned=True, traces=traces)
  chex.assert_trees_all_close(p1, p0, rtol=2e-5, atol=2e-6)
  # The states hold stored directions, differences of two gradients (h - g
  # and its projections): the planned and unplanned programs round them
  # differently (they fuse differently), and the difference cancels most of
  # the digits, so an absolute bound of 1e-5 (the gradients are O(1)).
  chex.assert_trees_all_close(
      jax.tree.map(
          lambda x: jax.random.key_data(x)
          if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, s1,
      ),
      jax.tree.map(
          lambda x: jax.random.key_data(x)
          if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, s0,
      ),
      rtol=2e-5, atol=1e-5,
  )
  distinct = set(plans)
  assert all(n == 1 for n in traces.values()), traces  # one trace per plan
  assert set(traces) == distinct
  if name in EXPECTED_PLANS:
    assert len(distinct) == EXPECTED_PLANS[name], distinct
  if name in RUNTIME_LAYERS and name not in EXPECTED_PLANS:
    # One program per distinct selection, plus step 0 (every layer).
    assert 2 <= len(distinct) <= 3, distinct
  # No conditional in any planned program.
  p = mlp_params()
  _, tx = build(name)
  s = tx.init(p)
  b = _batches()[0]
  for plan in distinct:
    text = step.lower(p, s, b, plan=plan).as_text()
    assert "stablehlo.case" not in text, (name, plan)
  # Without a plan, a method with a decision keeps its lax.cond.
  if len(distinct) > 1 and name not in RUNTIME_LAYERS:
    assert "stablehlo.case" in step.lower(p, s, b, plan=None).as_text()


# Device reads over 200 steps (the README reports them per 1000, from the
# benchmark).
def _reads_per_200(sam_tx, params):
  tx = optax.chain(sam_tx, optax.sgd(0.1))
  plan_of = sam_optax.planner(sam_tx)
  s = tx.init(params)
  b = tm.batches(n=1)[0]

  @functools.partial(jax.jit, static_argnames="plan")
  def step(p, s, plan=None):
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, batch=b, plan=plan)
    return p, s  # params kept: only the plans are measured

  for count in range(200):
    s = step(params, s, plan=plan_of(count, s))[1]
  return plan_of.reads


def test_planner_reads_the_device_only_where_it_must():
  params = mlp_params()
  count_only = [
      sam_optax.sam(mlp_loss),
      sam_optax.looksam(mlp_loss, k=5),
      sam_optax.ssam_fisher(mlp_loss, num_samples=4, update_every=10),
      sam_optax.ssam_dynamic(mlp_loss, update_every=10, total_steps=1000),
      sam_optax.layerwise_sam(mlp_loss, layers=["l2"]),
      sam_optax.sam(mlp_loss, optax.linear_schedule(0.0, 0.1, 100)),
  ]
  for tx in count_only:
    assert _reads_per_200(tx, params) == 0
  # vSAM: once per window after warm-up, (200 - 40) / 20 = 8 windows.
  vsam = sam_optax.vsam(mlp_loss, warmup_steps=40, window=20)
  assert _reads_per_200(vsam, params) == 8
  # A runtime selection: once per re-selection, perturbed from the step
  # after next (read for steps 2, 12, 22, ...).
  lw = sam_optax.layerwise_sam(
      mlp_loss, num_layers=1, select_every=10, select_by="gradient"
  )
  assert _reads_per_200(lw, params) == 20


def test_plans_agree_across_pmap_devices_and_match_one_device():
  """Under pmap the planner reads device 0's copy of a replicated state;
  the planned pmap run equals the single-device run and its plans."""
  if jax.device_count() < tm.NDEV:
    pytest.skip("needs 8 devices")
  # The two whose plans read device state (count-only plans are the same
  # on every device by construction; the matrix checks their pmap runs).
  for name in ["vsam", "layerwise_sam_runtime"]:
    _, s_one, plans_one, _, _ = _run(name, planned=True)
    plan_of = sam_optax.planner(tm.sam_transform(name, axis_name="d"))
    sam_tx = tm.build(name, axis_name="d")

    @functools.partial(
        jax.pmap, axis_name="d", static_broadcasted_argnums=(3,)
    )
    def pstep(p, s, b, plan, tx=sam_tx):
      g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "d")
      u, s = tx.update(g, s, p, batch=b, plan=plan)
      return optax.apply_updates(p, u), s

    params = mlp_params()
    pp, ps = tm.replicate(params), tm.replicate(sam_tx.init(params))
    plans = []
    for count, b in enumerate(_batches()):
      plan = plan_of(count, ps)
      plans.append(plan)
      pp, ps = pstep(pp, ps, tm.shard(b), plan)
    tm.tree_rows_equal(ps)
    assert plans == plans_one, name
    st_one = sam_optax.stats(s_one)
    st_dev = sam_optax.stats(jax.tree.map(lambda x: x[0], ps))
    assert int(st_dev["grad_evals"]) == int(st_one["grad_evals"])


def test_plans_under_sharded_jit_match_one_device():
  if jax.device_count() < tm.NDEV:
    pytest.skip("needs 8 devices")
  mesh = Mesh(np.array(jax.devices()[:tm.NDEV]), ("d",))
  for name in ["vsam", "layerwise_sam_runtime"]:
    p_one, _, plans_one, _, _ = _run(name, planned=True)
    sam_tx, tx = build(name)
    plan_of = sam_optax.planner(sam_tx)

    @functools.partial(jax.jit, static_argnames="plan")
    def step(p, s, b, plan=None, tx=tx):
      u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b, plan=plan)
      return optax.apply_updates(p, u), s

    p = jax.device_put(mlp_params(), NamedSharding(mesh, P()))
    s = tx.init(p)
    plans = []
    for count, b in enumerate(_batches()):
      plan = plan_of(count, s)
      plans.append(plan)
      p, s = step(p, s, jax.device_put(b, NamedSharding(mesh, P("d"))), plan)
    assert plans == plans_one, name
    chex.assert_trees_all_close(p, p_one, rtol=1e-4, atol=1e-5)


def test_planner_errors():
  with pytest.raises(ValueError, match="built by sam_optax"):
    sam_optax.planner(optax.sgd(0.1))
  sam_tx = sam_optax.looksam(mlp_loss, k=2)
  plan_of = sam_optax.planner(sam_tx)
  with pytest.raises(ValueError, match="holds no sam_optax state"):
    plan_of(0, optax.sgd(0.1).init(mlp_params()))
  two = optax.chain(sam_tx, sam_optax.vsam(mlp_loss))
  with pytest.raises(ValueError, match="holds 2 sam_optax states"):
    sam_optax.planner(sam_tx)(3, two.init(mlp_params()))
  with pytest.raises(ValueError, match="count must be"):
    plan_of(-1, sam_tx.init(mlp_params()))
  p = mlp_params()
  g = jax.grad(mlp_loss)(p, tm.batches(n=1)[0])
  with pytest.raises(ValueError, match="plan must be None or"):
    sam_tx.update(g, sam_tx.init(p), p, batch=tm.batches(n=1)[0], plan=(1,))
  # The planner finds the state inside inject_hyperparams' wrapper too.
  inj = optax.inject_hyperparams(sam_optax.looksam, static_args=("loss_fn", "k"))(
      loss_fn=mlp_loss, rho=0.1, k=2
  )
  assert sam_optax.planner(sam_tx)(1, inj.init(p)).second is False


def test_peek_looks_ahead_without_reading_or_changing_the_planner():
  p = mlp_params()
  sam_tx = sam_optax.vsam(mlp_loss, warmup_steps=2, window=4, blocks=2)
  plan_of = sam_optax.planner(sam_tx)
  s = sam_tx.init(p)
  assert plan_of.peek(1, s) == plan_of(1, s)  # warm-up: the count alone
  assert plan_of.peek(2, s) is None  # a new window: needs the device
  assert plan_of.reads == 0
  looksam = sam_optax.planner(sam_optax.looksam(mlp_loss, k=3))
  s = sam_optax.looksam(mlp_loss, k=3).init(p)
  assert [looksam.peek(c, s).second for c in range(4)] == [
      True, False, False, True]


# --------------------------------------------------------------------------
# One rho rule, planned or not: a step perturbs only where rho > 0 and
# finite; 0, negative, NaN and inf make skipped steps (clean gradient).
# --------------------------------------------------------------------------

WILD_RHO = np.array(
    [0.1, -0.05, np.nan, 0.2, np.inf, 0.0, -np.inf, 0.15, np.nan, 0.05,
     -1.0, 0.1], np.float32)


def _shifted(schedule, by):
  return lambda count: schedule(count + by)


# Schedules that end at 0 or cross it, at a step where XLA's jit evaluation
# (c / T becomes c * (1 / T), multiply-adds fuse) rounds to a tiny value of
# the other sign than the host's eager one; then one piece of each other
# family reaching 0. (schedule, its steps, whether it perturbs at its local
# count: by hand from the formula).
EDGE_PIECES = [
    # 1.1e-9 on the device at its end (local count 3), 0.0 on the host
    (_shifted(optax.linear_schedule(0.05, 0.0, 25), 22), 5,
     lambda c: c + 22 < 25),
    (optax.polynomial_schedule(0.05, 0.0, 2, 3), 5, lambda c: c < 3),  # 4e-17
    # crosses 0 at 3: +6e-10 on the device, -1.9e-9 on the host
    (optax.linear_schedule(0.01, -0.02, 9), 5, lambda c: 3 * c < 9),
    (optax.cosine_decay_schedule(0.05, 2), 3, lambda c: c < 2),
    (optax.warmup_cosine_decay_schedule(0.0, 0.05, 1, 3), 4,
     lambda c: 0 < c < 3),
    (optax.piecewise_constant_schedule(0.05, {2: 0.0}), 3, lambda c: c < 2),
]
_EDGE_STARTS = np.cumsum([len(WILD_RHO)] + [n for _, n, _ in EDGE_PIECES])
RULE_STEPS = int(_EDGE_STARTS[-1])


def _wild_rho(count):
  """WILD_RHO on the first 12 steps, then the EDGE_PIECES one after another
  (``optax.join_schedules``)."""
  return optax.join_schedules(
      [lambda c: jnp.asarray(WILD_RHO)[c % len(WILD_RHO)]]
      + [piece for piece, _, _ in EDGE_PIECES],
      [int(b) for b in _EDGE_STARTS[:-1]],
  )(count)


def _active(count):
  if count < len(WILD_RHO):
    r = WILD_RHO[count]
    return bool(np.isfinite(r) and r > 0)
  i = int(np.searchsorted(_EDGE_STARTS, count, side="right")) - 1
  return EDGE_PIECES[i][2](count - int(_EDGE_STARTS[i]))


def _sam_outputs(sam_tx, planned, steps, full=False):
  """Per-step outputs of ``sam_tx`` (chained to plain SGD unless ``full``),
  the clean gradients, the final params and state."""
  plan_of = sam_optax.planner(sam_tx)

  @functools.partial(jax.jit, static_argnames="plan")
  def step(p, s, b, plan=None):
    g = jax.grad(mlp_loss)(p, b)
    u, s = sam_tx.update(g, s, p, batch=b, plan=plan)
    new = optax.apply_updates(p, u if full else jax.tree.map(
        lambda x: -0.05 * x, u))
    return new, s, u, g

  p = mlp_params()
  s = sam_tx.init(p)
  outs, grads = [], []
  for count, b in enumerate(tm.batches(n=steps)):
    plan = plan_of(count, s) if planned else None
    p, s, u, g = step(p, s, b, plan=plan)
    outs.append(u)
    grads.append(g)
  return outs, grads, p, s


def test_rho_rule_sam_planned_unplanned_and_numpy_agree():
  """rho going negative, NaN, inf and 0, then schedules of every optax
  family ending at 0 or crossing it (the device's value within rounding of
  0, of either sign): planned and unplanned SAM equal the NumPy run of the
  rule (perturb iff rho > 0 and finite, 0 being the exact formula's value;
  otherwise the clean gradient, no second gradient, the count advances)."""
  steps = RULE_STEPS
  sam_tx = sam_optax.sam(mlp_loss, _wild_rho)
  runs = [_sam_outputs(sam_tx, planned, steps) for planned in (False, True)]
  params = mlp_params()
  w = tm.flat(params)
  for count, b in enumerate(tm.batches(n=steps)):
    p = tm.unflat(w, params)
    r = float(_wild_rho(count))
    out = tm.ref_sam(p, b, r) if _active(count) else tm.grad_np(p, b)
    for outs, _, _, _ in runs:
      np.testing.assert_allclose(tm.flat(outs[count]), out, rtol=2e-4,
                                 atol=2e-6)
    w = w - 0.05 * out
  active = sum(_active(c) for c in range(steps))
  for _, _, p, s in runs:
    np.testing.assert_allclose(tm.flat(p), w, rtol=2e-4, atol=2e-6)
    assert int(s.count) == steps
    assert int(s.grad_evals) == active


@pytest.mark.parametrize("name", [n for n in tm.ALL if n != "sam"])
def test_rho_rule_planned_equals_unplanned_for_every_kind_of_method(name):
  """Every method (gates, mask refreshes, layer selections, LightSAM's
  chain) under the wild schedule and the schedules ending at or crossing 0:
  planned equals unplanned step by step (outputs and grad_evals), a
  skipped step's output is the clean gradient exactly, nothing is NaN."""
  steps = RULE_STEPS
  full = name in tm.FULL_OPTIMIZERS
  sam_tx = tm.sam_transform(name, rho=_wild_rho)
  o0, g0, p0, s0 = _sam_outputs(sam_tx, False, steps, full)
  o1, g1, p1, s1 = _sam_outputs(sam_tx, True, steps, full)
  chex.assert_tree_all_finite(p1)
  for count in range(steps):
    chex.assert_trees_all_close(o1[count], o0[count], rtol=2e-5, atol=2e-6)
    if not _active(count) and not full:
      for outs, grads in ((o0, g0), (o1, g1)):
        chex.assert_trees_all_equal(outs[count], grads[count])
  chex.assert_trees_all_close(p1, p0, rtol=2e-5, atol=2e-6)
  assert int(s0[0].count if full else s0.count) == steps
  st0, st1 = sam_optax.stats(s0), sam_optax.stats(s1)
  assert int(st1["grad_evals"]) == int(st0["grad_evals"])


# Every optax family that reaches 0 (or crosses it), for a range of lengths
# T: (schedule of T, the local counts around where it reaches 0, whether it
# perturbs at a local count: by hand from the formula).
ZERO_FAMILIES = {
    "linear": (lambda t: optax.linear_schedule(0.05, 0.0, t),
               lambda t: [t], lambda c, t: c < t),
    "polynomial": (lambda t: optax.polynomial_schedule(0.05, 0.0, 2, t),
                   lambda t: [t], lambda c, t: c < t),
    "cosine_decay": (lambda t: optax.cosine_decay_schedule(0.05, t),
                     lambda t: [t], lambda c, t: c < t),
    "warmup_cosine_decay": (
        lambda t: optax.warmup_cosine_decay_schedule(0.0, 0.05, 1, t + 1),
        lambda t: [0, t + 1], lambda c, t: 0 < c < t + 1),
    "piecewise_constant": (
        lambda t: optax.piecewise_constant_schedule(0.05, {t: 0.0}),
        lambda t: [t], lambda c, t: c < t),
    "join_schedules": (
        lambda t: optax.join_schedules(
            [optax.constant_schedule(0.05), optax.linear_schedule(0.05, 0.0, t)],
            [2]),
        lambda t: [t + 2], lambda c, t: c < t + 2),
    # 0.01 -> -0.02 over 3T: crosses 0 at T, ends negative
    "crossing_zero": (lambda t: optax.linear_schedule(0.01, -0.02, 3 * t),
                      lambda t: [t, 3 * t], lambda c, t: c < t),
}
ZERO_T = (1, 2, 3, 5, 9, 25, 29, 100)


def test_schedules_reaching_zero_decide_alike_planned_and_unplanned():
  """For every family of ZERO_FAMILIES and every T in ZERO_T, the steps
  around where the schedule reaches 0 (or crosses it): the unplanned step
  under jit (its count on the device, every step vmapped in one compiled
  update) counts a second gradient exactly where the formula's value is
  > 0, and so does the planner. All of them run one after another in one
  ``optax.join_schedules`` (one compiled step)."""
  pieces, counts, want, start = [], [], [], 0
  for family in sorted(ZERO_FAMILIES):
    make, near, active = ZERO_FAMILIES[family]
    for t in ZERO_T:
      span = max(near(t)) + 3
      local = sorted({c for n in near(t) for c in range(n - 2, n + 3)
                      if 0 <= c < span})
      pieces.append((start, make(t)))
      counts += [start + c for c in local]
      want += [(family, t, c, active(c, t)) for c in local]
      start += span
  schedule = optax.join_schedules([p for _, p in pieces],
                                  [b for b, _ in pieces[1:]])
  loss = lambda w, b: jnp.sum((w - b) ** 2)  # noqa: E731
  w, b = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  sam_tx = sam_optax.sam(loss, schedule)
  s0 = sam_tx.init(w)

  @jax.jit
  @jax.vmap
  def device_decides(count):
    _, s = sam_tx.update(jax.grad(loss)(w, b), s0._replace(count=count), w,
                         batch=b)
    return s.grad_evals

  unplanned = np.asarray(device_decides(jnp.asarray(counts, jnp.int32))) == 1
  plan_of = sam_optax.planner(sam_tx)
  skips = [plan_of(c, s0._replace(count=jnp.int32(c))).rho_skip
           for c in counts]
  assert None not in skips  # far from the floor: the host decides
  planned = [not skip for skip in skips]
  for i, (family, t, c, active) in enumerate(want):
    assert (unplanned[i], planned[i]) == (active, active), (family, t, c)


# --------------------------------------------------------------------------
# A plan belongs to the transform that made it.
# --------------------------------------------------------------------------


def _plans(sam_tx, counts):
  """Plans of ``sam_tx``'s planner for ``counts``, from its init state."""
  plan_of = sam_optax.planner(sam_tx)
  s = sam_tx.init(mlp_params())
  return [plan_of(c, s._replace(count=jnp.int32(c))) for c in counts]


def _update(sam_tx, plan):
  p = mlp_params()
  b = tm.batches(n=1)[0]
  g = jax.grad(mlp_loss)(p, b)
  return sam_tx.update(g, sam_tx.init(p), p, batch=b, plan=plan)


def test_a_plan_of_another_transform_is_refused():
  looksam_reuse = _plans(sam_optax.looksam(mlp_loss, k=2), [1])[0]
  assert looksam_reuse.second is False  # would skip a second gradient
  for other in [sam_optax.sam(mlp_loss), sam_optax.gnp(mlp_loss),
                sam_optax.lightsam(mlp_loss, 0.1),
                sam_optax.looksam(mlp_loss, k=3)]:
    with pytest.raises(ValueError, match="another transform or other static"):
      _update(other, looksam_reuse)
  # A layer selection's plan passed to Sparse SAM (would skip its refresh).
  lw = sam_optax.layerwise_sam(mlp_loss, num_layers=1, select_by="gradient")
  lw_plan = _plans(lw, [1])[0]
  fisher = sam_optax.ssam_fisher(mlp_loss, num_samples=4, update_every=2)
  with pytest.raises(ValueError, match="another transform"):
    _update(fisher, lw_plan)
  # Another static setting that decides plans: the vSAM window, the mask's
  # refresh period, a rho schedule that is not the same function.
  vsam = lambda w: sam_optax.vsam(mlp_loss, warmup_steps=2, window=w, blocks=2)  # noqa: E731
  with pytest.raises(ValueError, match="window=4"):
    _update(vsam(6), _plans(vsam(4), [0])[0])
  fisher3 = sam_optax.ssam_fisher(mlp_loss, num_samples=4, update_every=3)
  with pytest.raises(ValueError, match="update_every=2"):
    _update(fisher3, _plans(fisher, [1])[0])
  with pytest.raises(ValueError, match="schedule"):
    _update(sam_optax.sam(mlp_loss, _rho_warmup),
            _plans(sam_optax.sam(mlp_loss, _rho_schedule), [0])[0])
  with pytest.raises(ValueError, match="another transform"):
    _update(sam_optax.sam(mlp_loss),
            _plans(sam_optax.sam(mlp_loss, _rho_schedule), [0])[0])


def test_transforms_with_equal_settings_share_plans():
  """A looksam(k=2) planner drives another looksam(k=2) (settings that do
  not decide plans may differ: rho, alpha); the run equals the unplanned
  one, whose reuse steps are checked against the paper's rule elsewhere."""
  made_by = sam_optax.looksam(mlp_loss, k=2)
  runs = []
  for planner_tx in (None, made_by):
    sam_tx = sam_optax.looksam(mlp_loss, 0.2, k=2, alpha=0.5)
    plan_of = sam_optax.planner(planner_tx) if planner_tx else None
    p, s = mlp_params(), sam_tx.init(mlp_params())
    for count, b in enumerate(tm.batches(n=5)):
      plan = plan_of(count, s) if plan_of else None
      u, s = sam_tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b, plan=plan)
      p = optax.apply_updates(p, jax.tree.map(lambda x: -0.1 * x, u))
    runs.append(p)
  chex.assert_trees_all_close(runs[1], runs[0], rtol=1e-6, atol=1e-7)


def test_malformed_or_hand_made_plans_are_refused():
  sam = sam_optax.sam(mlp_loss)
  lw = sam_optax.layerwise_sam(mlp_loss, num_layers=1, select_by="gradient")
  looksam = sam_optax.looksam(mlp_loss, k=2)
  fisher = sam_optax.ssam_fisher(mlp_loss, num_samples=4, update_every=2)
  vsam = sam_optax.vsam(mlp_loss, warmup_steps=2, window=4, blocks=2)
  # Hand-made: no owner.
  for tx, plan in [(lw, sam_optax.Plan(region=(5,))),
                   (sam, sam_optax.Plan(second=False)),
                   (looksam, sam_optax.Plan(second=False))]:
    with pytest.raises(ValueError, match="not made by sam_optax.planner"):
      _update(tx, plan)
  # The owner copied from a real plan, fields that its parts never plan.
  own = {name: _plans(tx, [1])[0] for name, tx in
         [("lw", lw), ("looksam", looksam), ("fisher", fisher), ("sam", sam),
          ("vsam", vsam)]}
  bad = [
      ("lw", dict(region=(5,)), "selects layer 5"),
      ("lw", dict(region=(True,)), "Python ints"),
      ("lw", dict(region=("1",)), "Python ints"),
      ("lw", dict(region=(0.0,)), "Python ints"),
      ("lw", dict(region=(-1,)), "Python ints"),
      ("lw", dict(region=(0, 1)), "tuple of 1"),
      ("lw", dict(region=[0]), "tuple of 1"),
      ("looksam", dict(second="3"), "plan.second"),
      ("looksam", dict(second=1), "plan.second"),
      ("looksam", dict(second=np.bool_(True)), "plan.second"),
      ("looksam", dict(gate_after=True), "gate_after"),
      ("looksam", dict(rho_skip=True), "rho_skip"),
      ("looksam", dict(region=True), "plan.region"),
      ("fisher", dict(region=1), "plan.region"),
      ("fisher", dict(region="yes"), "plan.region"),
      ("sam", dict(second=False), "plan.second"),
      ("vsam", dict(second=2.7), "plan.second"),
      ("vsam", dict(gate_after=3), "gate_after"),
  ]
  txs = dict(lw=lw, looksam=looksam, fisher=fisher, sam=sam, vsam=vsam)
  for name, fields, match in bad:
    with pytest.raises(ValueError, match=match):
      _update(txs[name], own[name]._replace(**fields))
  # A well-formed plan of its own transform still runs.
  _update(lw, own["lw"]._replace(region=(1,)))


def test_planner_counts_must_be_step_numbers():
  sam_tx = sam_optax.looksam(mlp_loss, k=2)
  plan_of = sam_optax.planner(sam_tx)
  s = sam_tx.init(mlp_params())
  for bad in ["3", 2.7, True, np.float32(2.0), -1, np.int32(-2),
              np.arange(2)]:
    with pytest.raises(ValueError, match="count must be"):
      plan_of(bad, s)
  assert plan_of(np.int64(3), s).second is False
  assert plan_of(jnp.int32(4), s).second is True


# --------------------------------------------------------------------------
# Batched states (a jax.vmap ensemble, pmap without axis_name): a plan is
# one decision for every member.
# --------------------------------------------------------------------------


def _ab_params():
  """Two layers, "a" (index 0) and "b" (index 1)."""
  return {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.full(3, 0.5)}}


def _ab_loss(p, c):
  """c[0] |a|² + c[1] |b|²: c decides which layer has the larger gradient."""
  return c[0] * jnp.sum(p["a"]["w"] ** 2) + c[1] * jnp.sum(p["b"]["w"] ** 2)


def _ab_layerwise(**kw):
  return sam_optax.layerwise_sam(
      _ab_loss, 0.1, num_layers=1, select_by="gradient", **kw)


def _stack(*trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def sam_tx_gate(sam_tx):
  from sam_optax._src import engine  # pylint: disable=g-import-not-at-top
  return engine.spec_of(sam_tx).gate


def _ensemble(sam_tx, loss, params, states, batches, planned, lr=0.01):
  """A jax.vmap ensemble: stacked params and states, one batch per member
  and step ([steps][members]); returns params, state, planner."""
  tx = optax.chain(sam_tx, optax.sgd(lr))
  plan_of = sam_optax.planner(sam_tx)

  @functools.partial(jax.jit, static_argnames="plan")
  def step(p, s, b, plan=None):
    def member(p, s, b):
      u, s = tx.update(jax.grad(loss)(p, b), s, p, batch=b, plan=plan)
      return optax.apply_updates(p, u), s
    return jax.vmap(member)(p, s, b)

  p, s = params, states
  for count, b in enumerate(batches):
    p, s = step(p, s, b, plan=plan_of(count, s) if planned else None)
  return p, s, plan_of


def _alone(sam_tx, loss, params, batches, lr=0.01):
  """One member run by itself, unplanned."""
  tx = optax.chain(sam_tx, optax.sgd(lr))
  step = jax.jit(lambda p, s, b: (lambda u, s: (
      optax.apply_updates(p, u), s))(*tx.update(
          jax.grad(loss)(p, b), s, p, batch=b)))
  s = tx.init(params)
  for b in batches:
    params, s = step(params, s, b)
  return params, s


def test_vmap_ensemble_with_differing_layer_selections_is_refused():
  sam_tx = _ab_layerwise()
  tx = optax.chain(sam_tx, optax.sgd(0.01))
  p = _stack(_ab_params(), _ab_params())
  s = jax.vmap(tx.init)(p)
  # member 0's gradient is larger on "a", member 1's on "b"
  bs = [jnp.array([[10.0, 1.0], [1.0, 10.0]])] * 3
  with pytest.raises(ValueError, match="batched.*different region state"):
    _ensemble(sam_tx, _ab_loss, p, s, bs, planned=True)


def test_vmap_ensemble_with_differing_vsam_patterns_is_refused():
  make = lambda seed: sam_optax.vsam(  # noqa: E731
      mlp_loss, warmup_steps=0, window=4, blocks=2, max_rate=0.25, seed=seed)
  states = [optax.chain(make(seed), optax.sgd(0.01)).init(mlp_params())
            for seed in (0, 1)]
  patterns = [np.asarray(st[0].gate.pattern) for st in states]
  assert not np.array_equal(*patterns)  # the members sample other steps
  p = _stack(mlp_params(), mlp_params())
  bs = [_stack(b, b) for b in tm.batches(n=3)]
  with pytest.raises(ValueError, match="batched.*different gate state"):
    _ensemble(make(0), mlp_loss, p, _stack(*states), bs, planned=True)


def test_vmap_ensemble_is_planned_where_every_member_decides_the_same():
  """Members with other params and data (so other statistics) whose reads
  agree: vSAM with one sample per window drawn from the same key, a layer
  selection ranked alike, LookSAM (count only). Planned equals unplanned
  and equals each member run alone."""
  cases = [
      (sam_optax.vsam(mlp_loss, warmup_steps=1, window=2, blocks=1,
                      max_rate=0.5), mlp_loss,
       [mlp_params(0), mlp_params(1)],
       [_stack(*tm.batches(n=2)) for _ in range(7)]),
      (_ab_layerwise(), _ab_loss, [_ab_params(), _ab_params()],
       [jnp.array([[10.0, 1.0], [20.0, 3.0]])] * 5),
      (sam_optax.looksam(mlp_loss, k=2), mlp_loss,
       [mlp_params(0), mlp_params(1)],
       [_stack(*tm.batches(n=2)) for _ in range(5)]),
  ]
  for sam_tx, loss, members, bs in cases:
    tx = optax.chain(sam_tx, optax.sgd(0.01))
    p = _stack(*members)
    s = jax.vmap(tx.init)(p)
    p1, s1, plan_of = _ensemble(sam_tx, loss, p, s, bs, planned=True)
    p0, s0, _ = _ensemble(sam_tx, loss, p, s, bs, planned=False)
    chex.assert_trees_all_close(p1, p0, rtol=1e-5, atol=1e-6)
    for i, member in enumerate(members):
      alone, _ = _alone(sam_tx, loss, member,
                        [jax.tree.map(lambda x, i=i: x[i], b) for b in bs])
      chex.assert_trees_all_close(
          jax.tree.map(lambda x, i=i: x[i], p1), alone, rtol=1e-5, atol=1e-6)
    gate = s1[0].gate
    if isinstance(sam_tx_gate(sam_tx), sam_optax.parts.EveryK):
      assert plan_of.reads == 0  # LookSAM: the count alone
      continue
    assert plan_of.reads > 0  # the plans read the batched state
    if hasattr(gate, "pattern"):  # vSAM: the members' statistics differ,
      assert not np.allclose(gate.ratio[0], gate.ratio[1])  # not the
      np.testing.assert_array_equal(gate.pattern[0], gate.pattern[1])


@tm.needs8
def test_pmap_without_axis_name_with_diverging_devices_is_refused():
  sam_tx = _ab_layerwise()
  tx = optax.chain(sam_tx, optax.sgd(0.01))
  plan_of = sam_optax.planner(sam_tx)

  @functools.partial(jax.pmap, static_broadcasted_argnums=(3,))
  def pstep(p, s, b, plan):
    u, s = tx.update(jax.grad(_ab_loss)(p, b), s, p, batch=b, plan=plan)
    return optax.apply_updates(p, u), s

  p = tm.replicate(_ab_params())
  s = tm.replicate(tx.init(_ab_params()))
  # even devices: "a" has the larger gradient; odd ones: "b"
  b = jnp.array([[10.0, 1.0], [1.0, 10.0]] * (tm.NDEV // 2))
  p, s = pstep(p, s, b, plan_of(0, s))  # ranks (differently per device)
  p, s = pstep(p, s, b, plan_of(1, s))  # every layer: no ranking in use yet
  with pytest.raises(ValueError, match="pmap's devices without axis_name"):
    plan_of(2, s)  # step 0's ranking


# --------------------------------------------------------------------------
# Stale decisions: a read checks the state's count; a planner forgets its
# reads when the count goes backwards or jumps.
# --------------------------------------------------------------------------


def _stepper(tx, loss):
  @functools.partial(jax.jit, static_argnames="plan")
  def step(p, s, b, plan=None):
    u, s = tx.update(jax.grad(loss)(p, b), s, p, batch=b, plan=plan)
    return optax.apply_updates(p, u), s
  return step


def test_planning_from_the_state_of_another_step_is_refused():
  """A pipelined loop plans step i+1 from the state before step i: at the
  first read (vSAM's first window at step 2, step 0's layer ranking used
  at step 2) the copy started when planning step 1 is not of the state
  before step 1, so the plan reads the state it is given, whose count is
  1, not 2."""
  for sam_tx, at in [
      (sam_optax.vsam(mlp_loss, warmup_steps=2, window=4, blocks=2), 2),
      (sam_optax.layerwise_sam(mlp_loss, num_layers=1, select_by="gradient"),
       2),
  ]:
    tx = optax.chain(sam_tx, optax.sgd(0.05))
    step = _stepper(tx, mlp_loss)
    plan_of = sam_optax.planner(sam_tx)
    p = mlp_params()
    s = tx.init(p)
    upcoming = plan_of(0, s)
    with pytest.raises(ValueError, match=f"count is {at - 1}, so it is not "
                       f"the state before step {at}"):
      for count, b in enumerate(tm.batches(n=6)):
        plan, upcoming = upcoming, plan_of(count + 1, s)  # s: before `count`
        p, s = step(p, s, b, plan=plan)


def test_after_a_non_finite_step_the_host_count_is_checked():
  """A NaN batch leaves the state (its count included) as it was: planning
  with the host's step number then raises at the next read (the window of
  step 6: the copy started at host step 5 is of a state whose count is 4,
  so the plan reads the state given, whose count is 5); count=None reads
  the count, and that run equals the unplanned one."""
  sam_tx = sam_optax.vsam(mlp_loss, warmup_steps=2, window=4, blocks=2)
  tx = optax.apply_if_finite(optax.chain(sam_tx, optax.sgd(0.05)), 10)
  step = _stepper(tx, mlp_loss)
  bs = tm.batches(n=9)
  bs[3] = (bs[3][0].at[0, 0].set(jnp.nan), bs[3][1])

  def run(mode):
    plan_of = sam_optax.planner(sam_tx)
    p = mlp_params()
    s = tx.init(p)
    for host_count, b in enumerate(bs):
      plan = {"host": lambda: plan_of(host_count, s),  # noqa: B023
              "device": lambda: plan_of(None, s),  # noqa: B023
              "none": lambda: None}[mode]()
      p, s = step(p, s, b, plan=plan)
    return p, s

  with pytest.raises(ValueError, match="count is 5, so it is not the state "
                     "before step 6"):
    run("host")
  p1, s1 = run("device")
  p0, s0 = run("none")
  chex.assert_trees_all_close(p1, p0, rtol=1e-6, atol=1e-7)
  assert int(sam_optax.stats(s1)["count"]) == len(bs) - 1


def test_a_reused_planner_does_not_carry_the_first_runs_decisions():
  # A layer selection re-made every 5 steps: run 1 ranks "a" first, run 2
  # (from count 0, the same planner) "b": |grad a| = 2 c0 |a|, |grad b| =
  # 2 c1 |b| with a = 1, b = 0.5.
  sam_tx = _ab_layerwise(select_every=5)
  tx = optax.chain(sam_tx, optax.sgd(0.01))
  step = _stepper(tx, _ab_loss)
  plan_of = sam_optax.planner(sam_tx)
  runs = {}
  for c, planned in [((10.0, 1.0), True), ((1.0, 10.0), True),
                     ((1.0, 10.0), False)]:
    p = _ab_params()
    s = tx.init(p)
    plans = []
    for count in range(4):
      plans.append(plan_of(count, s) if planned else None)
      p, s = step(p, s, jnp.array(c), plan=plans[-1])
    runs[c, planned] = p, [x and x.region for x in plans]
  # Step 0's ranking is perturbed from step 2 on.
  assert runs[(10.0, 1.0), True][1] == [(), (), (0,), (0,)]
  assert runs[(1.0, 10.0), True][1] == [(), (), (1,), (1,)]
  chex.assert_trees_all_close(runs[(1.0, 10.0), True][0],
                              runs[(1.0, 10.0), False][0])
  # vSAM: the same planner for a run of another (equal-settings) transform
  # whose key draws another pattern, restarted inside the first window.
  make = lambda seed: sam_optax.vsam(  # noqa: E731
      mlp_loss, warmup_steps=0, window=4, blocks=2, max_rate=0.25, seed=seed)
  plan_of = sam_optax.planner(make(0))
  for seed in (0, 1):
    tx = optax.chain(make(seed), optax.sgd(0.05))
    s = tx.init(mlp_params())
    pattern = [bool(x) for x in np.asarray(s[0].gate.pattern)]  # window 0
    step = _stepper(tx, mlp_loss)
    p = mlp_params()
    seconds = []
    for count, b in enumerate(tm.batches(n=3)):
      plan = plan_of(count, s)
      seconds.append(plan.second)
      p, s = step(p, s, b, plan=plan)
    assert seconds == pattern[:3], seed


def test_a_planner_forgets_its_reads_when_the_count_jumps():
  """Plan step 2 of one run, then step 5 of another run (select_every=10:
  both perturb step 0's ranking): the jump makes it read again."""
  sam_tx = _ab_layerwise(select_every=10)
  tx = optax.chain(sam_tx, optax.sgd(0.01))
  step = _stepper(tx, _ab_loss)
  states = {}
  for c in [(10.0, 1.0), (1.0, 10.0)]:
    p = _ab_params()
    s = tx.init(p)
    states[c] = []
    for _ in range(6):
      states[c].append(s)
      p, s = step(p, s, jnp.array(c))
    states[c].append(s)
  plan_of = sam_optax.planner(sam_tx)
  assert plan_of(2, states[10.0, 1.0][2]).region == (0,)
  assert plan_of(5, states[1.0, 10.0][5]).region == (1,)
  assert plan_of.reads == 2
  # Consecutive steps of one run reuse the read.
  assert plan_of(6, states[1.0, 10.0][6]).region == (1,)
  assert plan_of.reads == 2


# --------------------------------------------------------------------------
# Planned steps never wait on the device inside the loop: a plan's device
# reads are of copies started (asynchronously) one call earlier, before the
# step in between was dispatched.
# --------------------------------------------------------------------------

N_QUEUED = 200  # planned steps per method, none waited for


def _reads_the_device(sam_tx):
  """Whether the method's plans depend on device state (vSAM's pattern, a
  runtime layer selection): from its parts, not from a list of names."""
  spec = engine_lib.spec_of(sam_tx)
  return (isinstance(spec.gate, parts.VariationSampling)
          or isinstance(spec.region, parts.TopLayers))


def _queued_loop(name, transfers, host_calls, steps, prefetch=True,
                 built=None):
  """``steps`` planned steps of a registry method, each dispatched without
  waiting, params and state donated. Before each plan the arrays then alive
  are noted; every host transfer the planner makes (``host_calls``: the
  patched read) is classified: it waits for the step just dispatched iff
  it reads one of that step's outputs, or an array created during this
  planner call (queued behind that step on an in-order device). Returns
  the planner and ``built`` (the transforms and the compiled step, for a
  second loop)."""
  if built is None:
    sam_tx, tx = build(name)

    @functools.partial(jax.jit, static_argnames="plan",
                       donate_argnums=(0, 1))
    def step(p, s, b, plan=None):
      u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b, plan=plan)
      return optax.apply_updates(p, u), s

    built = sam_tx, tx, step
  sam_tx, tx, step = built
  plan_of = sam_optax.planner(sam_tx)
  plan_of._prefetching = prefetch  # pylint: disable=protected-access

  bs = tm.batches(n=4)
  p = mlp_params()
  s = tx.init(p)
  in_flight = []  # the outputs of the step dispatched last
  for count in range(steps):
    before = jax.live_arrays()  # held: their ids stay unique in the call
    host_calls.clear()
    plan = plan_of(count, s)
    known = {id(x) for x in before}
    flight = {id(x) for x in in_flight}
    for x in host_calls:
      transfers.append((count, id(x) in flight or id(x) not in known))
    del before
    p, s = step(p, s, bs[count % 4], plan=plan)  # not waited for
    in_flight = jax.tree.leaves((p, s))
  return plan_of, built


def test_planned_loops_never_read_the_step_just_dispatched(monkeypatch):
  """Every registry method, 200 planned steps with none waited for: no host
  transfer the planner makes reads the step just dispatched (counted with
  the planner's one read function patched, and by the planner itself,
  ``blocking_reads``); the methods whose plans depend on device state (vSAM,
  the runtime layer selections) do read it. A planner that reads the state
  it is given (no started copies) is caught by the same count."""
  host_calls = []
  real_host = planner_lib._host  # pylint: disable=protected-access

  def host(x):
    host_calls.append(x)
    return real_host(x)

  monkeypatch.setattr(planner_lib, "_host", host)
  readers, built = set(), {}
  for name in tm.ALL:
    transfers = []
    plan_of, built[name] = _queued_loop(name, transfers, host_calls,
                                        N_QUEUED)
    sam_tx = built[name][0]
    waited = [count for count, waits in transfers if waits]
    assert not waited, (name, waited[:5])
    assert plan_of.blocking_reads == 0, name
    if _reads_the_device(sam_tx):
      readers.add(name)
      assert plan_of.reads > 0 and transfers, name
    else:
      assert plan_of.reads == 0 and not transfers, name
  assert {"vsam", "layerwise_sam_runtime",
          "layerwise_sam_sharpness"} <= readers, readers
  # The stub can fail: the same loop, reading the state given to each call.
  for name in ("vsam", "layerwise_sam_runtime"):
    transfers = []
    plan_of, _ = _queued_loop(name, transfers, host_calls, 12,
                              prefetch=False, built=built[name])
    assert any(waits for _, waits in transfers), name
    assert plan_of.blocking_reads > 0, name


def test_rho_schedule_is_read_a_block_of_steps_at_a_time(monkeypatch):
  # A radius schedule's plans: the host evaluates the schedule once per
  # block of steps (not once per step: a call costs as much as a small
  # model's SGD step) with one compiled evaluator per schedule (not one per
  # planner: a run makes one per seed); plans across a block's end and
  # through peek are those of the schedule, step by step.
  from sam_optax._src import planner as planner_lib  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(planner_lib, "RHO_BLOCK", 4)
  traces, calls = [], []

  def schedule(c):
    traces.append(c)  # once per trace
    return jnp.where(c >= 6, 0.05, 0.0)

  real = planner_lib._rho_evaluator  # pylint: disable=protected-access

  def counted(rho):
    fn = real(rho)
    return lambda counts: (calls.append(counts.tolist()), fn(counts))[1]

  monkeypatch.setattr(planner_lib, "_rho_evaluator", counted)
  w, b = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  tx = sam_optax.sam(lambda w, b: jnp.sum((w * b) ** 2), schedule)
  s0 = tx.init(w)
  traced = None
  for _ in range(2):  # two runs, a planner each
    plan_of = sam_optax.planner(tx)
    skips = []
    for c in range(10):
      state = s0._replace(count=jnp.int32(c))
      assert plan_of.peek(c, state).rho_skip == (c < 6)
      skips.append(plan_of(c, state).rho_skip)
    assert skips == [c < 6 for c in range(10)]
    traced = len(traces) if traced is None else traced
    assert len(traces) == traced  # compiled once for both planners
  assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] * 2
