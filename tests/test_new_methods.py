"""GSAM, WSAM, Friendly SAM, m-sharpness on one device (``num_splits``) and
late-phase SAM, each against an independent NumPy implementation of its
formula (the tiny MLP of ``tests/helpers.py``; gradients from
``jax.grad`` of the loss, everything else in float64 NumPy)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import sam_optax
from tests.helpers import (
    flat, grad_np, make_batch, mlp_loss, mlp_params, needs8, ref_asam,
    ref_gnp, ref_sam, unflat,
)

RTOL, ATOL = 2e-5, 2e-6


def _np_perturbed_grad(params, batch, e):
  return grad_np(unflat(flat(params) + e, params), batch)


def _run(tx, params, bs, jit=True, lr=0.1):
  """SGD(lr) after ``tx`` for len(bs) steps; the params after each step."""
  opt = optax.chain(tx, optax.sgd(lr))
  s = opt.init(params)

  def step(p, s, b):
    u, s = opt.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  out = []
  for b in bs:
    params, s = step(params, s, b)
    out.append(params)
  return out, s


def _batches(n=3, size=16):
  return [make_batch(seed=10 + i, n=size) for i in range(n)]


# --------------------------------------------------------------------------
# GSAM.
# --------------------------------------------------------------------------


def ref_gsam(params, batch, rho, alpha, minimize_fp=True):
  g = grad_np(params, batch)
  h = _np_perturbed_grad(params, batch, rho * g / np.linalg.norm(g))
  if minimize_fp:
    g_perp = g - (g @ h) / (h @ h) * h
    return h - alpha * g_perp
  h_perp = h - (h @ g) / (g @ g) * g
  return g + alpha * h_perp


@pytest.mark.parametrize("minimize_fp", [True, False])
def test_gsam_equals_numpy_over_steps(minimize_fp):
  """Three jitted steps of GSAM + SGD against the formula in NumPy."""
  params, bs, lr = mlp_params(), _batches(), 0.1
  got, state = _run(sam_optax.gsam(mlp_loss, rho=0.1, alpha=0.3,
                                   minimize_fp=minimize_fp), params, bs)
  w = flat(params)
  for b, p in zip(bs, got):
    w = w - lr * ref_gsam(unflat(w, params), b, 0.1, 0.3, minimize_fp)
    np.testing.assert_allclose(flat(p), w, rtol=RTOL, atol=ATOL)
  assert int(sam_optax.stats(state)["grad_evals"]) == 3


def _big_vision_gsam_gradient(params, batch, rho_max, rho_min, alpha, lr,
                              lr_max, lr_min, eps=1e-12):
  """Our NumPy reading of the authors' ``gsam_gradient`` (big_vision,
  trainers/proj/gsam/gsam.py; minimize_fp=True, no adaptive perturbation):
  the radius from the learning rate, the perturbation ``rho g / (‖g‖ +
  eps)``, and ``g``'s residual against the *normalised* ``h`` (no guard)."""
  g = grad_np(params, batch)
  if lr_max == lr_min:
    rho = rho_max
  else:
    rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
  h = _np_perturbed_grad(params, batch, rho * g / (np.linalg.norm(g) + eps))
  h_unit = h / np.sqrt(np.sum(h * h))
  residual = g - np.vdot(h_unit, g) * h_unit
  return h - alpha * residual


def test_gsam_step_equals_the_authors_code_with_lr_tied_radius():
  """One step at a point of a decaying learning-rate schedule: our GSAM
  with ``rho_from_lr`` equals the authors' step (read from big_vision)."""
  lr_sched = optax.linear_schedule(0.3, 0.01, 10)
  rho = sam_optax.rho_from_lr(lr_sched, rho_max=0.2, rho_min=0.05,
                              lr_max=0.3, lr_min=0.01)
  params, batch = mlp_params(), make_batch()
  tx = sam_optax.gsam(mlp_loss, rho=rho, alpha=0.6)
  state = tx.init(params)
  state = state._replace(count=jnp.asarray(4, jnp.int32))  # mid-schedule
  g = jax.grad(mlp_loss)(params, batch)
  out, _ = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(g, state)
  expected = _big_vision_gsam_gradient(
      params, batch, 0.2, 0.05, 0.6, float(lr_sched(4)), 0.3, 0.01)
  np.testing.assert_allclose(flat(out), expected, rtol=RTOL, atol=ATOL)
  # and the radius itself, by hand: 0.05 + 0.15 * (lr_4 - 0.01) / 0.29
  np.testing.assert_allclose(
      float(rho(4)), 0.05 + 0.15 * (float(lr_sched(4)) - 0.01) / 0.29,
      rtol=1e-6)


def test_rho_from_lr_constant_learning_rate_is_rho_max():
  rho = sam_optax.rho_from_lr(0.1, rho_max=0.3, lr_max=0.1, lr_min=0.1)
  assert float(rho(7)) == pytest.approx(0.3)


def test_rho_from_lr_stays_in_its_range():
  """A learning rate outside [lr_min, lr_max]: a constant one is refused
  at construction, a schedule's value gives rho_min or rho_max (not a
  radius extrapolated past them, which an lr_max below the schedule's peak
  gave: 0.4 against lr_max 0.1 read 0.4, four times rho_max)."""
  with pytest.raises(ValueError, match=r"learning_rate 1.0 is outside \[lr_min, lr_max\]"):
    sam_optax.rho_from_lr(1.0, rho_max=0.1, rho_min=0.02, lr_max=0.1)
  with pytest.raises(ValueError, match="is outside"):
    sam_optax.rho_from_lr(0.01, rho_max=0.1, lr_max=0.1, lr_min=0.05)
  # in range: 0.02 + 0.08 * (0.05 - 0) / 0.1 = 0.06
  assert float(sam_optax.rho_from_lr(0.05, rho_max=0.1, rho_min=0.02,
                                     lr_max=0.1)(3)) == pytest.approx(0.06)
  lr = lambda count: 0.04 * count  # 0 at count 0, 0.4 at count 10
  rho = sam_optax.rho_from_lr(lr, rho_max=0.1, rho_min=0.02, lr_max=0.1,
                              lr_min=0.02)
  # lr 0, 0.04, 0.08, 0.4: below lr_min, rho_min; inside, 0.02 + 0.08 *
  # (lr - 0.02) / 0.08 (0.04 and 0.08); above lr_max, rho_max
  got = [float(rho(jnp.asarray(c))) for c in (0, 1, 2, 10)]
  np.testing.assert_allclose(got, [0.02, 0.04, 0.08, 0.1], rtol=1e-6)


def test_gsam_alpha_zero_is_sam():
  params, batch = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(params, batch)
  a = sam_optax.gsam(mlp_loss, rho=0.1, alpha=0.0)
  b = sam_optax.sam(mlp_loss, rho=0.1)
  out_a = a.update(g, a.init(params), params, batch=batch)[0]
  out_b = b.update(g, b.init(params), params, batch=batch)[0]
  chex.assert_trees_all_close(out_a, out_b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# WSAM.
# --------------------------------------------------------------------------


def test_wsam_coupled_equals_numpy():
  params, bs, lr, gamma = mlp_params(), _batches(), 0.1, 0.8
  got, _ = _run(sam_optax.wsam(mlp_loss, rho=0.1, gamma=gamma), params, bs)
  a = gamma / (1 - gamma)
  w = flat(params)
  for b, p in zip(bs, got):
    wp = unflat(w, params)
    g = grad_np(wp, b)
    h = ref_sam(wp, b, 0.1)
    w = w - lr * (g + a * (h - g))
    np.testing.assert_allclose(flat(p), w, rtol=RTOL, atol=ATOL)


def test_wsam_decoupled_keeps_the_sharpness_term_out_of_momentum():
  """Decoupled WSAM with SGD + momentum: the momentum trace holds the clean
  gradients only; the sharpness term is added with the learning rate."""
  params, bs, lr, mu, gamma = mlp_params(), _batches(), 0.1, 0.9, 0.9
  tx = sam_optax.wsam(mlp_loss, rho=0.1, gamma=gamma,
                      base_optimizer=optax.sgd(lr, momentum=mu),
                      learning_rate=lr)
  s = tx.init(params)
  step = jax.jit(lambda p, s, b: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)))
  a = gamma / (1 - gamma)
  w, trace, p = flat(params), 0.0, params
  for b in bs:
    p, s = step(p, s, b)
    wp = unflat(w, params)
    g = grad_np(wp, b)
    h = ref_sam(wp, b, 0.1)
    trace = mu * trace + g
    w = w - lr * trace - lr * a * (h - g)
    np.testing.assert_allclose(flat(p), w, rtol=RTOL, atol=ATOL)
  assert int(sam_optax.stats(s)["grad_evals"]) == 3


def test_wsam_decoupled_with_plain_sgd_equals_coupled():
  params, batch = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(params, batch)
  dec = sam_optax.wsam(mlp_loss, 0.1, 0.7, base_optimizer=optax.sgd(0.2),
                       learning_rate=0.2)
  cou = optax.chain(sam_optax.wsam(mlp_loss, 0.1, 0.7), optax.sgd(0.2))
  u1 = dec.update(g, dec.init(params), params, batch=batch)[0]
  u2 = cou.update(g, cou.init(params), params, batch=batch)[0]
  chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)


def test_wsam_gamma_half_is_sam():
  params, batch = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(params, batch)
  tx = sam_optax.wsam(mlp_loss, rho=0.1, gamma=0.5)
  out = tx.update(g, tx.init(params), params, batch=batch)[0]
  np.testing.assert_allclose(flat(out), ref_sam(params, batch, 0.1),
                             rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------
# Friendly SAM.
# --------------------------------------------------------------------------


def test_fsam_equals_numpy_over_steps():
  """The authors' order: d = g - sigma m (m before this step), then
  m = lmbda m + (1 - lmbda) g; step 0 perturbs along g and sets m = g."""
  params, bs, lr, rho, sigma, lmbda = mlp_params(), _batches(4), 0.1, 0.1, 0.8, 0.6
  got, state = _run(sam_optax.fsam(mlp_loss, rho, sigma, lmbda), params, bs)
  w, m = flat(params), None
  for b, p in zip(bs, got):
    wp = unflat(w, params)
    g = grad_np(wp, b)
    if m is None:
      d, m = g, g
    else:
      d = g - sigma * m
      m = lmbda * m + (1 - lmbda) * g
    h = _np_perturbed_grad(wp, b, rho * d / np.linalg.norm(d))
    w = w - lr * h
    np.testing.assert_allclose(flat(p), w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(flat(state[0].geometry.momentum), m,
                             rtol=RTOL, atol=ATOL)


def test_fsam_momentum_advances_on_steps_with_rho_zero():
  """rho 0 at steps 0 and 2: those steps return the clean gradient, and the
  moving average still takes their gradients (it stood still on them)."""
  params, bs, lr, rho0, sigma, lmbda = mlp_params(), _batches(5), 0.1, 0.1, 0.8, 0.6
  rho = lambda c: jnp.where((c == 0) | (c == 2), 0.0, rho0)  # noqa: E731
  got, state = _run(sam_optax.fsam(mlp_loss, rho, sigma, lmbda), params, bs)
  w, m = flat(params), None
  for t, (b, p) in enumerate(zip(bs, got)):
    wp = unflat(w, params)
    g = grad_np(wp, b)
    d = g if m is None else g - sigma * m
    m = g if m is None else lmbda * m + (1 - lmbda) * g
    h = g if t in (0, 2) else _np_perturbed_grad(
        wp, b, rho0 * d / np.linalg.norm(d))
    w = w - lr * h
    np.testing.assert_allclose(flat(p), w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(flat(state[0].geometry.momentum), m,
                             rtol=RTOL, atol=ATOL)
  assert int(sam_optax.stats(state)["grad_evals"]) == 3


def test_fsam_sigma_zero_is_sam():
  params, bs = mlp_params(), _batches(2)
  a, _ = _run(sam_optax.fsam(mlp_loss, 0.1, sigma=0.0), params, bs)
  b, _ = _run(sam_optax.sam(mlp_loss, 0.1), params, bs)
  chex.assert_trees_all_close(a[-1], b[-1], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# trainable=: the method on the trainable leaves equals the method run on
# those leaves alone (frozen ones closed over).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ctor,kwargs", [
    ("gsam", {"rho": 0.1, "alpha": 0.3}),
    ("fsam", {"rho": 0.1, "sigma": 0.8, "lmbda": 0.6}),
    ("wsam", {"rho": 0.1, "gamma": 0.8}),
])
def test_trainable_equals_the_method_on_the_trainable_leaves(ctor, kwargs):
  params, bs = mlp_params(), _batches(2)
  tx = getattr(sam_optax, ctor)(mlp_loss, trainable=lambda p: p.startswith("l2"),
                                **kwargs)
  # the complete freeze: the base optimizer leaves l1 alone
  opt = optax.chain(tx, optax.multi_transform(
      {"train": optax.sgd(0.1), "freeze": optax.set_to_zero()},
      {"l1": "freeze", "l2": "train"}))
  p, s = params, opt.init(params)
  for b in bs:
    u, s = jax.jit(lambda g, s, p, b: opt.update(g, s, p, batch=b))(
        jax.grad(mlp_loss)(p, b), s, p, b)
    p = optax.apply_updates(p, u)
  frozen = params["l1"]
  sub_loss = lambda q, b: mlp_loss({"l1": frozen, "l2": q}, b)  # noqa: E731
  alone = optax.chain(getattr(sam_optax, ctor)(sub_loss, **kwargs),
                      optax.sgd(0.1))
  q, sq = params["l2"], alone.init(params["l2"])
  for b in bs:
    u, sq = alone.update(jax.grad(sub_loss)(q, b), sq, q, batch=b)
    q = optax.apply_updates(q, u)
  chex.assert_trees_all_close(p["l2"], q, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(p["l1"], frozen)


# --------------------------------------------------------------------------
# m-sharpness on one device: num_splits.
# --------------------------------------------------------------------------


def _halves(batch, n):
  size = batch[0].shape[0] // n
  return [jax.tree.map(lambda x: x[i * size:(i + 1) * size], batch)
          for i in range(n)]


@pytest.mark.parametrize("ctor,kwargs,ref", [
    ("sam", {"rho": 0.1}, lambda p, b: ref_sam(p, b, 0.1)),
    ("asam", {"rho": 0.5, "eta": 0.01}, lambda p, b: ref_asam(p, b, 0.5, 0.01)),
    # gnp and gsam mix the whole batch's g with the mean of the h_i
    ("gnp", {"rho": 0.1, "alpha": 0.8}, None),
    ("gsam", {"rho": 0.1, "alpha": 0.3}, None),
])
def test_num_splits_is_the_mean_of_independently_perturbed_sub_batches(
    ctor, kwargs, ref):
  params, batch, n = mlp_params(), make_batch(n=16), 4
  tx = getattr(sam_optax, ctor)(mlp_loss, num_splits=n, **kwargs)
  g = jax.grad(mlp_loss)(params, batch)
  out, state = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(
      g, tx.init(params))
  parts = _halves(batch, n)
  if ref is not None:
    expected = np.mean([ref(params, b) for b in parts], axis=0)
  else:
    h = np.mean([ref_sam(params, b, 0.1) for b in parts], axis=0)
    gf = grad_np(params, batch)
    if ctor == "gnp":
      expected = 0.2 * gf + 0.8 * h
    else:
      expected = h - 0.3 * (gf - (gf @ h) / (h @ h) * h)
  np.testing.assert_allclose(flat(out), expected, rtol=RTOL, atol=ATOL)
  # n clean and n second sub-batch gradients: two batch gradients of work
  assert int(sam_optax.stats(state)["grad_evals"]) == 2


def test_num_splits_one_split_per_example_and_unsplit_leaves():
  """batch_axes None passes a leaf whole (here a scale every sub-batch
  uses); m = 1 example per sub-batch."""
  params, (x, y) = mlp_params(), make_batch(n=4)
  loss = lambda p, b: b["scale"] * mlp_loss(p, (b["x"], b["y"]))  # noqa: E731
  batch = {"x": x, "y": y, "scale": jnp.asarray(2.0)}
  tx = sam_optax.sam(loss, rho=0.1, num_splits=4,
                     batch_axes={"x": 0, "y": 0, "scale": None})
  g = jax.grad(loss)(params, batch)
  out = tx.update(g, tx.init(params), params, batch=batch)[0]
  expected = np.mean(
      [2.0 * ref_sam(params, (x[i:i + 1], y[i:i + 1]), 0.1) for i in range(4)],
      axis=0)
  # SAM's perturbation is scale-free: only the output carries the 2
  np.testing.assert_allclose(flat(out), expected, rtol=RTOL, atol=ATOL)


@needs8
@pytest.mark.parametrize("ctor,kwargs", [
    ("sam", {"rho": 0.1}),
    ("gnp", {"rho": 0.1, "alpha": 0.8}),
    ("gsam", {"rho": 0.1, "alpha": 0.3}),
])
def test_num_splits_equals_shard_map_with_per_device_gradients(ctor, kwargs):
  """num_splits=2 on one device == shard_map over 2 devices, each with its
  half of the batch and its own gradient as ``updates`` (m-sharpness)."""
  from jax.experimental.shard_map import shard_map

  params, batch = mlp_params(), make_batch(n=16)
  one = getattr(sam_optax, ctor)(mlp_loss, num_splits=2, **kwargs)
  g = jax.grad(mlp_loss)(params, batch)
  expected, _ = jax.jit(lambda g, s: one.update(g, s, params, batch=batch))(
      g, one.init(params))
  tx = getattr(sam_optax, ctor)(mlp_loss, axis_name="d", **kwargs)
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))

  def local(p, s, b):
    g_local = jax.grad(mlp_loss)(p, b)  # per device: m-sharpness
    return tx.update(g_local, s, p, batch=b)[0]

  out = jax.jit(shard_map(local, mesh=mesh, in_specs=(P(), P(), P("d")),
                          out_specs=P(), check_rep=False))(
      params, tx.init(params), batch)
  chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)


@needs8
@pytest.mark.parametrize("ctor", ["sam", "asam", "gnp"])
def test_num_splits_on_devices_under_default_check_vma(ctor):
  """num_splits with axis_name under shard_map's default check_vma equals
  the same step under check_vma=False (the sub-batch loop's sum started
  typed as the same on every device while the gradients it adds vary:
  JAX's "carry input and carry output must have equal types")."""
  params, batch = mlp_params(), make_batch(n=16)
  tx = getattr(sam_optax, ctor)(mlp_loss, rho=0.1, num_splits=2,
                                axis_name="d")
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))

  def typed(p, s, b):
    g = jax.grad(lambda q: jax.lax.pmean(mlp_loss(q, b), "d"))(p)
    return tx.update(g, s, p, batch=b)[0]

  def untyped(p, s, b):
    g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "d")
    return tx.update(g, s, p, batch=b)[0]

  outs = [jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), P("d")),
                                out_specs=P(), check_vma=check))(
                                    params, tx.init(params), batch)
          for f, check in ((typed, True), (untyped, False))]
  chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_num_splits_planned_and_trainable():
  """With a plan (no conditional) and with trainable=, num_splits gives the
  same as the NumPy mean over sub-batches of the frozen-closed method."""
  params, batch = mlp_params(), make_batch(n=8)
  tx = sam_optax.sam(mlp_loss, rho=0.1, num_splits=2,
                     trainable=lambda p: p.startswith("l2"))
  plan = sam_optax.planner(tx)(0, tx.init(params))
  g = jax.grad(mlp_loss)(params, batch)
  out = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch, plan=plan))(
      g, tx.init(params))[0]
  frozen = params["l1"]
  sub_loss = lambda q, b: mlp_loss({"l1": frozen, "l2": q}, b)  # noqa: E731
  expected = []
  for b in _halves(batch, 2):
    gq = flat(jax.grad(sub_loss)(params["l2"], b))
    e = 0.1 * gq / np.linalg.norm(gq)
    expected.append(flat(jax.grad(sub_loss)(unflat(flat(params["l2"]) + e,
                                                   params["l2"]), b)))
  np.testing.assert_allclose(flat(out["l2"]), np.mean(expected, axis=0),
                             rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_equal(out["l1"], jax.tree.map(jnp.zeros_like, g["l1"]))


def test_num_splits_bad_input():
  with pytest.raises(ValueError, match="num_splits must be an integer"):
    sam_optax.sam(mlp_loss, num_splits=0)
  with pytest.raises(ValueError, match="batch_axes leaves must be 0 or None"):
    sam_optax.gsam(mlp_loss, num_splits=2, batch_axes=1)
  params, batch = mlp_params(), make_batch(n=6)
  tx = sam_optax.sam(mlp_loss, num_splits=4)
  with pytest.raises(ValueError, match="num_splits must divide the batch"):
    tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params,
              batch=batch)


# --------------------------------------------------------------------------
# Late-phase SAM.
# --------------------------------------------------------------------------


def _sgd_and_late_steps(start):
  sam_tx = sam_optax.sam(mlp_loss, rho=sam_optax.late_phase(0.1, start=start))
  tx = optax.chain(sam_tx, optax.sgd(0.1))
  sgd = optax.sgd(0.1)

  @functools.partial(jax.jit, static_argnames="plan")
  def late(p, s, b, plan=None):
    u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b, plan=plan)
    return optax.apply_updates(p, u), s

  @jax.jit
  def plain(p, s, b):
    u, s = sgd.update(jax.grad(mlp_loss)(p, b), s, p)
    return optax.apply_updates(p, u), s

  return sam_tx, tx, sgd, late, plain


def test_late_phase_is_sgd_before_start_and_sam_from_it():
  start, bs, params = 2, _batches(4), mlp_params()
  sam_tx, tx, sgd, late, plain = _sgd_and_late_steps(start)
  plan_of = sam_optax.planner(sam_tx)
  p1 = p2 = p3 = params
  s1, s2, s3 = tx.init(params), tx.init(params), sgd.init(params)
  w = flat(params)
  for count, b in enumerate(bs):
    p1, s1 = late(p1, s1, b, plan=plan_of(count, s1))  # planned
    p2, s2 = late(p2, s2, b)  # lax.cond
    wp = unflat(w, params)
    w = w - 0.1 * (grad_np(wp, b) if count < start else ref_sam(wp, b, 0.1))
    np.testing.assert_allclose(flat(p1), w, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
    if count < start:
      p3, s3 = plain(p3, s3, b)
      chex.assert_trees_all_equal(p1, p3)  # SGD's step, bit for bit
      assert int(sam_optax.stats(s1)["grad_evals"]) == 0
      assert int(sam_optax.stats(s2)["grad_evals"]) == 0
  assert int(sam_optax.stats(s1)["grad_evals"]) == len(bs) - start


def _op_counts(hlo: str, ops=("dot", "convolution", "conditional", "while")):
  import re
  return {op: len(re.findall(rf"= [^=]*\b{op}\(", hlo)) for op in ops}


def test_late_phase_planned_early_program_is_sgds():
  """Before ``start`` the planned step has no conditional and no second
  evaluation of the loss: its compiled program does exactly SGD's
  matrix products; from ``start`` on, SAM's (twice the backward's)."""
  sam_tx, tx, sgd, late, plain = _sgd_and_late_steps(start=5)
  params, b = mlp_params(), make_batch()
  plan_of = sam_optax.planner(sam_tx)
  s = tx.init(params)
  early = plan_of(0, s)
  assert early.rho_skip is True
  jaxpr = str(jax.make_jaxpr(
      lambda p, s, b: late.__wrapped__(p, s, b, plan=early))(params, s, b))
  assert "cond[" not in jaxpr and "while[" not in jaxpr
  hlo_early = late.lower(params, s, b, plan=early).compile().as_text()
  hlo_sgd = plain.lower(params, sgd.init(params), b).compile().as_text()
  counts_early, counts_sgd = _op_counts(hlo_early), _op_counts(hlo_sgd)
  assert counts_early == counts_sgd, (counts_early, counts_sgd)
  assert counts_early["conditional"] == 0 and counts_sgd["dot"] > 0
  # from start on, the planned step is SAM's: more matrix products
  hlo_sam = late.lower(params, s, b, plan=plan_of(5, s)).compile().as_text()
  assert _op_counts(hlo_sam)["dot"] > counts_sgd["dot"]
  # the unplanned step traces a lax.cond (the planner is what removes it)
  unplanned = str(jax.make_jaxpr(
      lambda p, s, b: late.__wrapped__(p, s, b))(params, s, b))
  assert "cond[" in unplanned


def test_late_phase_bad_input():
  with pytest.raises(ValueError, match="start must be an integer"):
    sam_optax.late_phase(0.05, start=-1)
  with pytest.raises(ValueError, match="rho must be in"):
    sam_optax.late_phase(-0.1, start=3)


# --------------------------------------------------------------------------
# Construction errors.
# --------------------------------------------------------------------------


def test_new_methods_bad_input():
  with pytest.raises(ValueError, match="alpha must be in"):
    sam_optax.gsam(mlp_loss, alpha=-1.0)
  with pytest.raises(ValueError, match="minimize_fp must be a bool"):
    sam_optax.gsam(mlp_loss, minimize_fp=1)
  with pytest.raises(ValueError, match="gamma must be in"):
    sam_optax.wsam(mlp_loss, gamma=1.0)
  with pytest.raises(ValueError, match="needs learning_rate="):
    sam_optax.wsam(mlp_loss, base_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="learning_rate is used only"):
    sam_optax.wsam(mlp_loss, learning_rate=0.1)
  with pytest.raises(ValueError, match="base_optimizer must be an optax"):
    sam_optax.wsam(mlp_loss, base_optimizer="sgd", learning_rate=0.1)
  with pytest.raises(ValueError, match="lmbda must be in"):
    sam_optax.fsam(mlp_loss, lmbda=1.5)
  with pytest.raises(ValueError, match="sigma must be in"):
    sam_optax.fsam(mlp_loss, sigma=-1.0)
  with pytest.raises(ValueError, match="rho_max must be in"):
    sam_optax.rho_from_lr(0.1, rho_max=0.01, rho_min=0.1, lr_max=0.1)


# --------------------------------------------------------------------------
# Sharded: the rows tests/helpers.py leaves out of the matrix (the decoupled
# WSAM and late-phase SAM), on 2 devices.
# --------------------------------------------------------------------------


@needs8
def test_wsam_decoupled_under_shard_map_equals_one_device():
  from jax.experimental.shard_map import shard_map

  params, bs = mlp_params(), _batches(2)

  def make(axis_name=None):
    return sam_optax.wsam(mlp_loss, 0.1, 0.8, axis_name=axis_name,
                          base_optimizer=optax.sgd(0.1, momentum=0.9),
                          learning_rate=0.1)

  one, two = make(), make("d")
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))

  def local(p, s, b):
    g = jax.lax.pmean(jax.grad(mlp_loss)(p, b), "d")
    u, s = two.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  step2 = jax.jit(shard_map(local, mesh=mesh, in_specs=(P(), P(), P("d")),
                            out_specs=(P(), P()), check_rep=False))
  step1 = jax.jit(lambda p, s, b: (lambda u, s: (optax.apply_updates(p, u), s))(
      *one.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)))
  p1, s1, p2, s2 = params, one.init(params), params, two.init(params)
  for b in bs:
    p1, s1 = step1(p1, s1, b)
    p2, s2 = step2(p2, s2, b)
  chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-6)


@needs8
def test_late_phase_under_sharded_jit_equals_one_device():
  from jax.sharding import NamedSharding

  start, bs, params = 2, _batches(4), mlp_params()
  sam_tx, tx, _, late, _ = _sgd_and_late_steps(start)
  plan_of = sam_optax.planner(sam_tx)
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
  p1, s1 = params, tx.init(params)
  p2 = jax.device_put(params, NamedSharding(mesh, P()))
  s2, plan_of2 = tx.init(p2), sam_optax.planner(sam_tx)
  for count, b in enumerate(bs):
    p1, s1 = late(p1, s1, b, plan=plan_of(count, s1))
    p2, s2 = late(p2, s2, jax.device_put(b, NamedSharding(mesh, P("d"))),
                  plan=plan_of2(count, s2))
  chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-6)
  assert int(sam_optax.stats(s2)["grad_evals"]) == len(bs) - start


@pytest.mark.parametrize("make", [
    lambda f, **k: sam_optax.gsam(f, rho=0.1, alpha=0.3, **k),
    lambda f, **k: sam_optax.fsam(f, rho=0.1, **k),
    lambda f, **k: sam_optax.wsam(f, rho=0.1, gamma=0.8, **k),
    lambda f, **k: sam_optax.wsam(f, rho=0.1, gamma=0.8, learning_rate=0.1,
                                  base_optimizer=optax.sgd(0.1, momentum=0.9),
                                  **k),
    lambda f, **k: sam_optax.sam(f, rho=0.1, num_splits=2, **k),
])
def test_loss_at_update_time_and_frozen_leaves_get_zero(make):
  """The loss given to update equals the loss given at construction; with
  trainable= the frozen layer's output is zero (the decoupled WSAM too)."""
  params, batch = mlp_params(), make_batch(n=8)
  g = jax.grad(mlp_loss)(params, batch)
  built, late = make(mlp_loss), make(None)
  a = built.update(g, built.init(params), params, batch=batch)[0]
  b = late.update(g, late.init(params), params, batch=batch,
                  loss_fn=mlp_loss)[0]
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  frozen = make(mlp_loss, trainable=lambda p: p.startswith("l2"))
  out = frozen.update(g, frozen.init(params), params, batch=batch)[0]
  chex.assert_trees_all_equal(out["l1"], jax.tree.map(jnp.zeros_like, g["l1"]))
  assert np.all(np.abs(flat(out["l2"])) > 0)
