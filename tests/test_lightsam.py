"""LightSAM (ALGORITHMS.md §8, arXiv 2505.24399) and scale_by_adagrad_norm.

Every expected number is computed here, independently of the library: the
update rules in float64 NumPy, with gradients from plain ``jax.grad`` of the
loss at the points the rule names.
"""

import functools

import chex

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax._src import engine
from sam_optax._src import lightsam as lightsam_lib
from tests import helpers

VARIANTS = ("adagrad_norm", "adagrad", "adam")
EPS = 1e-8


# --------------------------------------------------------------------------
# A tiny MLP and a float64 reference of the three rules.
# --------------------------------------------------------------------------


mlp_params = functools.partial(
    helpers.mlp_params, din=3, hidden=5, dout=2, scale=0.7,
    names=("hidden", "out"),
)
mlp_loss = helpers.mlp_loss


def make_batch(seed, n=8, din=3, dout=2):
  kx, ky = jax.random.split(jax.random.PRNGKey(100 + seed))
  return (jax.random.normal(kx, (n, din)), jax.random.normal(ky, (n, dout)))


flat, unflat = helpers.flat, helpers.unflat


def grad64(w, like, batch):
  return flat(jax.grad(mlp_loss)(unflat(w, like), batch))


def reference(variant, params, batches, lr_fn, rho_fn, b1=0.9, b2=0.999,
              eps=EPS):
  """The ALGORITHMS.md §8 rule, step by step, in float64; the trajectory."""
  w = flat(params)
  n = w.size
  if variant == "adagrad_norm":
    u = v = eps**2
  else:
    u, v = np.full(n, eps**2), np.full(n, eps**2)
  r, m = np.zeros(n), np.zeros(n)
  traj = []
  for t, batch in enumerate(batches):
    s = grad64(w, params, batch)
    rho, lr = rho_fn(t), lr_fn(t)
    if variant == "adagrad_norm":
      u = u + s @ s
      e = rho * s / np.sqrt(u)
    elif variant == "adagrad":
      u = u + s * s
      e = rho * s / np.sqrt(u)
    else:
      r = b1 * r + (1 - b1) * s
      u = b2 * u + (1 - b2) * s * s
      e = rho * r / np.sqrt(u)
    gs = grad64(w + e, params, batch) if rho > 0 else s
    if variant == "adagrad_norm":
      v = v + gs @ gs
      d = gs / np.sqrt(v)
    elif variant == "adagrad":
      v = v + gs * gs
      d = gs / np.sqrt(v)
    else:
      m = b1 * m + (1 - b1) * gs
      v = b2 * v + (1 - b2) * gs * gs
      d = m / np.sqrt(v)
    w = w - lr * d
    traj.append(w)
  return np.stack(traj)


def run(tx, params, batches, *, jit=True, max_traces=None):
  """The library's trajectory (flattened params after every step)."""

  def step(p, s, b):
    g = jax.grad(mlp_loss)(p, b)
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  if max_traces is not None:
    step = chex.assert_max_traces(step, n=max_traces)
  if jit:
    step = jax.jit(step)
  p, s = params, tx.init(params)
  traj = []
  for b in batches:
    p, s = step(p, s, b)
    traj.append(flat(p))
  return np.stack(traj), s


# --------------------------------------------------------------------------
# The rules, step by step.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_trajectory_matches_rule_with_schedules(variant):
  """Six steps on changing batches, lr and rho both schedules; one trace."""
  chex.clear_trace_counter()
  params = mlp_params()
  batches = [make_batch(i) for i in range(6)]
  base_lr = {"adagrad_norm": 0.3, "adagrad": 0.05, "adam": 0.02}[variant]
  base_rho = {"adagrad_norm": 0.5, "adagrad": 0.05, "adam": 0.02}[variant]
  lr = lambda t: base_lr * (1.0 - 0.1 * t)  # noqa: E731
  rho = lambda t: base_rho * (1.0 + 0.2 * t)  # noqa: E731
  tx = sam_optax.lightsam(mlp_loss, lr, rho, variant=variant)
  got, state = run(tx, params, batches, max_traces=1)
  want = reference(variant, params, batches, lr, rho)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  # The perturbation really moved the point: plain adaptive steps differ.
  plain = reference(variant, params, batches, lr, lambda t: 0.0)
  assert np.max(np.abs(plain - want)) > 1e-4
  st = sam_optax.stats(state)
  assert int(st["count"]) == 6 and int(st["grad_evals"]) == 6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("planned", [False, True])
def test_accumulators_advance_on_steps_with_rho_zero(variant, planned):
  """rho 0 for the first steps (late_phase's shape) and again at step 4:
  the ascent's u (and r) still accumulate the clean gradient on those
  steps, as the rule's ``u += ‖s‖²`` says (before, they stood still, and
  the first perturbation after them came out about sqrt(steps) too large)."""
  params = mlp_params(seed=2)
  batches = [make_batch(40 + i) for i in range(7)]
  base_rho = {"adagrad_norm": 0.5, "adagrad": 0.05, "adam": 0.02}[variant]
  rho_of = lambda t: 0.0 if t < 3 or t == 4 else base_rho  # noqa: E731
  rho = lambda c: jnp.where((c < 3) | (c == 4), 0.0, base_rho)  # noqa: E731
  lr = {"adagrad_norm": 0.3, "adagrad": 0.05, "adam": 0.02}[variant]
  sam_tx = sam_optax.lightsam(mlp_loss, lr, rho, variant=variant)
  if planned:
    plan_of = sam_optax.planner(sam_tx)

    @functools.partial(jax.jit, static_argnames="plan")
    def step(p, s, b, plan):
      u, s = sam_tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b, plan=plan)
      return optax.apply_updates(p, u), s

    p, s, got = params, sam_tx.init(params), []
    for t, b in enumerate(batches):
      p, s = step(p, s, b, plan=plan_of(t, s))
      got.append(flat(p))
    got = np.stack(got)
  else:
    got, s = run(sam_tx, params, batches)
  want = reference(variant, params, batches, lambda t: lr, rho_of)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert int(sam_optax.stats(s)["grad_evals"]) == 3


def test_accumulators_advance_with_a_constant_rho_zero():
  """rho = 0.0 as a plain number (no step ever perturbs): the ascent's
  accumulator still sums the clean gradients, so a state carried into a
  phase with rho > 0 is the rule's; no second gradient is evaluated."""
  params = mlp_params(seed=4)
  batches = [make_batch(60 + i) for i in range(3)]
  tx = sam_optax.lightsam(mlp_loss, 0.1, 0.0)
  got, state = run(tx, params, batches)
  want = reference("adagrad_norm", params, batches, lambda t: 0.1,
                   lambda t: 0.0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  u = EPS**2 + sum(float(grad64(w, params, b) @ grad64(w, params, b))
                   for w, b in zip([flat(params)] + list(want[:-1]), batches))
  ascent = state[0].geometry
  np.testing.assert_allclose(float(ascent.root_accumulator) ** 2, u,
                             rtol=1e-5)
  assert int(sam_optax.stats(state)["grad_evals"]) == 0


def test_float_hyperparameters_and_defaults():
  """Floats (not schedules) and the per-variant default rho."""
  params = mlp_params(seed=3)
  batches = [make_batch(10 + i) for i in range(3)]
  for variant in VARIANTS:
    rho = lightsam_lib.DEFAULT_RHO[variant]
    tx = sam_optax.lightsam(mlp_loss, 0.05, variant=variant)
    got, _ = run(tx, params, batches, jit=False)
    want = reference(variant, params, batches, lambda t: 0.05,
                     lambda t: rho)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_rho_zero_is_the_plain_adaptive_optimizer():
  params = mlp_params(seed=1)
  batches = [make_batch(20 + i) for i in range(3)]
  for variant in VARIANTS:
    tx = sam_optax.lightsam(mlp_loss, 0.1, 0.0, variant=variant)
    got, state = run(tx, params, batches, jit=False)
    want = reference(variant, params, batches, lambda t: 0.1, lambda t: 0.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert int(sam_optax.stats(state)["grad_evals"]) == 0


def test_custom_b1_b2_eps():
  params = mlp_params(seed=2)
  batches = [make_batch(30 + i) for i in range(4)]
  tx = sam_optax.lightsam(mlp_loss, 0.01, 0.01, variant="adam", b1=0.5,
                          b2=0.9, eps=1e-3)
  got, _ = run(tx, params, batches, jit=False)
  want = reference("adam", params, batches, lambda t: 0.01, lambda t: 0.01,
                   b1=0.5, b2=0.9, eps=1e-3)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_has_aux_gives_the_same_updates():
  params = mlp_params()
  batches = [make_batch(40 + i) for i in range(2)]
  aux_loss = lambda p, b: (mlp_loss(p, b), {"n": b[0].shape[0]})  # noqa: E731
  tx = sam_optax.lightsam(aux_loss, 0.1, 0.05, has_aux=True)
  got, _ = run(tx, params, batches, jit=False)
  want = reference("adagrad_norm", params, batches, lambda t: 0.1,
                   lambda t: 0.05)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_inject_hyperparams():
  params = mlp_params()
  batches = [make_batch(50 + i) for i in range(3)]
  tx = optax.inject_hyperparams(
      sam_optax.lightsam, static_args=("loss_fn", "variant")
  )(loss_fn=mlp_loss, learning_rate=0.05, rho=0.01, variant="adagrad")
  got, state = run(tx, params, batches)
  want = reference("adagrad", params, batches, lambda t: 0.05,
                   lambda t: 0.01)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  st = sam_optax.stats(state)
  np.testing.assert_allclose(st["hyperparams/rho"], 0.01)


# --------------------------------------------------------------------------
# The building blocks alone.
# --------------------------------------------------------------------------


def test_scale_by_adagrad_norm_alone():
  rng = np.random.default_rng(0)
  shapes = {"a": (3, 2), "b": (4,)}
  tx = sam_optax.scale_by_adagrad_norm(eps=1e-3)
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = tx.init(params)
  acc = 1e-6
  for t in range(4):
    g = {k: rng.standard_normal(s) * 10.0**(t - 1) for k, s in shapes.items()}
    out, state = tx.update(jax.tree.map(jnp.asarray, g, ), state)
    gv = flat(g)
    acc = acc + gv @ gv
    np.testing.assert_allclose(flat(out), gv / np.sqrt(acc), rtol=1e-5)
    np.testing.assert_allclose(state.sum_of_squares, acc, rtol=1e-5)
  # The first step of a fresh one is g / sqrt(eps² + ‖g‖²): norm just below 1.
  tx = sam_optax.scale_by_adagrad_norm()
  g = {"a": jnp.full((3, 2), 1e-3), "b": jnp.full((4,), -2e-3)}
  out, _ = tx.update(g, tx.init(g))
  gv = flat(g)
  np.testing.assert_allclose(flat(out), gv / np.sqrt(1e-16 + gv @ gv),
                             rtol=1e-6)


def test_scale_by_adagrad_norm_zero_and_dtype():
  tx = sam_optax.scale_by_adagrad_norm()
  z = {"a": jnp.zeros(3, jnp.bfloat16)}
  out, state = tx.update(z, tx.init(z))
  assert out["a"].dtype == jnp.bfloat16
  assert state.sum_of_squares.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out["a"], np.float32), 0.0)


def test_scale_by_adagrad_matches_optax_scale_by_rss():
  """The per-coordinate AdaGrad is scale_by_rss(eps², 0) in float32."""
  rng = np.random.default_rng(1)
  ours = lightsam_lib.scale_by_adagrad(eps=1e-4)
  theirs = optax.scale_by_rss(initial_accumulator_value=1e-8, eps=0.0)
  p = {"w": jnp.zeros((5, 3))}
  s1, s2 = ours.init(p), theirs.init(p)
  for _ in range(3):
    g = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}
    o1, s1 = ours.update(g, s1)
    o2, s2 = theirs.update(g, s2)
    np.testing.assert_allclose(o1["w"], o2["w"], rtol=1e-6)


def _perturb(geo, st, grads, params, rho=1.0, mask=None, normalize=False):
  """What the engine does with a geometry: perturb, then restrict."""
  where = engine.Where(mask, normalize)
  e, st = geo.perturb(helpers.engine_step(grads, params, rho), st, where)
  return where.restrict(e), st


def test_zero_gradient_and_underflowed_accumulator_stay_finite():
  """A coordinate that never saw a gradient: Adam's b2^t eps² reaches 0."""
  params = {"w": jnp.ones(3)}
  zero = {"w": jnp.zeros(3)}
  for variant in VARIANTS:
    geo = sam_optax.parts.adaptive_perturbation(variant)
    st = geo.init(params)
    # Exhausted accumulators (as after ~10^5 Adam steps on a dead unit).
    st = st._replace(root_accumulator=jax.tree.map(jnp.zeros_like, st.root_accumulator))
    e, _ = _perturb(geo, st, zero, params)
    np.testing.assert_array_equal(e["w"], 0.0)
  upd = lightsam_lib.scale_by_adam_no_bias_correction()
  st = upd.init(params)._replace(nu_root={"w": jnp.zeros(3)})
  out, _ = upd.update(zero, st)
  np.testing.assert_array_equal(out["w"], 0.0)


def test_perturbation_respects_a_mask():
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  g = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([4.0, 5.0])}
  mask = {"a": jnp.array([True, False, True]), "b": jnp.array([False, False])}
  s = flat(g)
  m = flat(mask).astype(bool)
  for variant, want in [
      ("adagrad_norm", 0.5 * s / np.sqrt(EPS**2 + s @ s)),
      ("adagrad", 0.5 * s / np.sqrt(EPS**2 + s * s)),
      ("adam", 0.5 * 0.1 * s / np.sqrt(0.999 * EPS**2 + 0.001 * s * s)),
  ]:
    geo = sam_optax.parts.adaptive_perturbation(variant)
    e, _ = _perturb(geo, geo.init(params), g, params, 0.5, mask)
    np.testing.assert_allclose(flat(e), np.where(m, want, 0.0), rtol=1e-6)
  # adagrad_norm over the region only, when the region asks for it.
  geo = sam_optax.parts.adaptive_perturbation("adagrad_norm")
  e, st = _perturb(geo, geo.init(params), g, params, 0.5, mask, True)
  sm = np.where(m, s, 0.0)
  np.testing.assert_allclose(flat(e), 0.5 * sm / np.sqrt(EPS**2 + sm @ sm),
                             rtol=1e-6)
  np.testing.assert_allclose(st.accumulator, EPS**2 + sm @ sm, rtol=1e-6)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "sgd"}, r"variant.*'adagrad_norm', 'adagrad', 'adam'"),
        ({"rho": -0.1}, r"rho must be in \[0, inf\)"),
        ({"learning_rate": 0.0}, r"learning_rate must be in \(0, inf\)"),
        ({"learning_rate": -1.0}, r"learning_rate must be in \(0, inf\)"),
        ({"b1": 1.0}, r"b1 must be in \[0, 1\)"),
        ({"b2": -0.5}, r"b2 must be in \[0, 1\)"),
        ({"eps": 0.0}, r"eps must be in \(0, inf\)"),
    ],
)
def test_bad_arguments(kwargs, match):
  args = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=match):
    sam_optax.lightsam(mlp_loss, **args)


def test_bad_eps_for_scale_by_adagrad_norm():
  with pytest.raises(ValueError, match=r"eps must be in \(0, inf\)"):
    sam_optax.scale_by_adagrad_norm(eps=-1.0)


# --------------------------------------------------------------------------
# pmap: identical state on every device, m-sharpness semantics.
# --------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_pmap_adam_state_agrees_and_matches_rule():
  ndev, per = 8, 2
  params = mlp_params()
  batches = [make_batch(60 + i, n=ndev * per) for i in range(2)]
  lr, rho, b1, b2 = 0.02, 0.01, 0.9, 0.999
  tx = sam_optax.lightsam(mlp_loss, lr, rho, variant="adam", axis_name="d")

  def step(p, s, b, pre_average):
    g = jax.grad(mlp_loss)(p, b)
    g = jax.tree.map(
        lambda x, y: jnp.where(pre_average, y, x), g, jax.lax.pmean(g, "d")
    )
    u, s = tx.update(g, s, p, batch=b)
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, axis_name="d", in_axes=(0, 0, 0, None))
  split = lambda b: jax.tree.map(  # noqa: E731
      lambda x: x.reshape((ndev, per) + x.shape[1:]), b)
  rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * ndev), t)  # noqa: E731

  # 1. The caller averages first: the global rule on the whole batch.
  p, s = rep(params), rep(tx.init(params))
  for b in batches:
    p, s = pstep(p, s, split(b), True)
  want = reference("adam", params, batches, lambda t: lr, lambda t: rho)[-1]
  for d in range(ndev):
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda x: x[d], p)), want, rtol=2e-5, atol=2e-6)

  # 2. Per-device gradients (m-sharpness): each device perturbs with its own
  # fresh gradient; the accumulators come from the averaged gradient.
  p, s = rep(params), rep(tx.init(params))
  for b in batches:
    p, s = pstep(p, s, split(b), False)
  for leaf in jax.tree.leaves((p, s)):
    x = np.asarray(leaf)
    assert all(np.array_equal(x[0], x[d]) for d in range(1, ndev))
  w = flat(params)
  n = w.size
  r, u, m, v = np.zeros(n), np.full(n, EPS**2), np.zeros(n), np.full(n, EPS**2)
  for b in batches:
    shards = [jax.tree.map(lambda x: x[k * per:(k + 1) * per], b)
              for k in range(ndev)]
    s_dev = [grad64(w, params, sh) for sh in shards]
    s_avg = np.mean(s_dev, axis=0)
    r_dev = [b1 * r + (1 - b1) * sk for sk in s_dev]
    r = b1 * r + (1 - b1) * s_avg
    u = b2 * u + (1 - b2) * s_avg**2
    gs = np.mean([grad64(w + rho * rk / np.sqrt(u), params, sh)
                  for rk, sh in zip(r_dev, shards)], axis=0)
    m = b1 * m + (1 - b1) * gs
    v = b2 * v + (1 - b2) * gs**2
    w = w - lr * m / np.sqrt(v)
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[0], p)), w,
                             rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------
# The parameter-agnostic claim, made concrete.
# --------------------------------------------------------------------------

SWEEP_RHO = (0.01, 0.1, 1.0)
SWEEP_LR = (0.1, 1.0, 10.0)
SWEEP_STEPS = 3000
#: "Converges": finite, and the loss after SWEEP_STEPS full-batch steps is at
#: most this fraction of the initial loss (the minimum is 0: realizable).
SWEEP_TOL = 1e-4


def _least_squares():
  kx, kw = jax.random.split(jax.random.PRNGKey(7))
  x = jax.random.normal(kx, (64, 8))
  y = x @ jax.random.normal(kw, (8, 1)) + 1.0
  params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros(1)}

  def loss(p, batch):
    xb, yb = batch
    return 0.5 * jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

  return params, loss, (x, y)


def sweep(make_tx):
  """Final loss / initial loss on the (rho, lr) grid; one vmapped scan."""
  params, loss, batch = _least_squares()

  def one(rho, lr):
    tx = make_tx(loss, rho, lr)

    def body(carry, _):
      p, s = carry
      g = jax.grad(loss)(p, batch)
      u, s = tx.update(g, s, p, batch=batch)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None,
                             length=SWEEP_STEPS)
    return loss(p, batch) / loss(params, batch)

  rho, lr = np.meshgrid(SWEEP_RHO, SWEEP_LR, indexing="ij")
  out = jax.jit(jax.vmap(one))(jnp.asarray(rho.ravel(), jnp.float32),
                               jnp.asarray(lr.ravel(), jnp.float32))
  return np.asarray(out).reshape(rho.shape)


def converged(ratio):
  return np.isfinite(ratio) & (ratio <= SWEEP_TOL)


def test_parameter_agnostic_sweep():
  """rho and lr over two orders of magnitude on a least-squares problem.

  Rows rho (0.01, 0.1, 1), columns lr (0.1, 1, 10), 3000 full-batch steps.
  SAM + SGD diverges at lr = 10 (past 2/L) and elsewhere stalls at a loss
  floor that grows like rho² (its perturbation keeps length rho as the
  gradient vanishes), above the criterion at lr = 1 and at rho = 1; it
  converges on 2 of the 9 points (lr = 0.1, rho <= 0.1). LightSAM's
  perturbation and step both shrink with the accumulated gradients, so I
  and II converge on the whole grid. III (Adam) is agnostic to lr here but
  not to rho: its accumulators are averages, not sums, so ``r / sqrt(u)``
  stays O(1) near the minimum and a large rho stalls it like SAM.
  """
  sam_sgd = sweep(lambda loss, rho, lr: optax.chain(
      sam_optax.sam(loss, rho), optax.sgd(lr)))
  light = {
      v: sweep(lambda loss, rho, lr, v=v: sam_optax.lightsam(
          loss, lr, rho, variant=v))
      for v in VARIANTS
  }
  print("\nloss ratio, rows rho", SWEEP_RHO, "cols lr", SWEEP_LR)
  for name, table in [("sam+sgd", sam_sgd), *light.items()]:
    print(name, "\n", np.array2string(table, precision=2))

  assert converged(light["adagrad_norm"]).all(), light["adagrad_norm"]
  assert converged(light["adagrad"]).all(), light["adagrad"]
  assert converged(light["adam"][0]).all(), light["adam"]  # rho = 0.01
  # SAM + SGD: converges where lr and rho are small (the criterion is not
  # out of reach), diverges at lr = 10, stalls at rho = 1.
  assert converged(sam_sgd[0, 0]), sam_sgd
  assert not np.isfinite(sam_sgd[:, 2]).any(), sam_sgd
  assert not converged(sam_sgd[2]).any(), sam_sgd
  assert (sam_sgd[2, :2] > 10 * SWEEP_TOL).all(), sam_sgd
  assert converged(sam_sgd).sum() <= 3, sam_sgd


# --------------------------------------------------------------------------
# The registry entries used by the benchmark and training.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, variant",
    [("lightsam", "adagrad_norm"), ("lightsam_adagrad", "adagrad"),
     ("lightsam_adam", "adam")],
)
def test_registry_entries_build_full_optimizers(name, variant):
  from experiments import methods  # pylint: disable=import-outside-toplevel
  spec = methods.METHODS[name]
  assert spec.full_optimizer
  tx = methods.build(name, mlp_loss, optax.sgd(123.0))  # base is ignored
  params = mlp_params()
  batches = [make_batch(70)]
  got, _ = run(tx, params, batches, jit=False)
  lr = spec.defaults["learning_rate"]
  rho = spec.defaults.get("rho", lightsam_lib.DEFAULT_RHO[variant])
  want = reference(variant, params, batches, lambda t: lr, lambda t: rho)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
