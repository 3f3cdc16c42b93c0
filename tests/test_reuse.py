"""LookSAM and vSAM against their rules, computed independently here.

The references use only ``jax.grad`` of the loss and NumPy: the SAM gradient
by its formula, LookSAM's orthogonal component, vSAM's PSF, its R/P/V
statistics and its rate update.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import parts
from sam_optax._src import engine
from tests import helpers

EPS = 1e-12

# --------------------------------------------------------------------------
# A tiny MLP, batches, and reference gradients.
# --------------------------------------------------------------------------


mlp_params = functools.partial(
    helpers.mlp_params, din=4, hidden=6, dout=3, scale=0.6,
    names=("dense1", "head"),
)
mlp_loss = helpers.mlp_loss
make_batch = functools.partial(helpers.make_batch, n=16, din=4, dout=3)


BATCHES = [make_batch(s) for s in range(7)]


def batch_at(t):
  return BATCHES[t % len(BATCHES)]


flat = helpers.flat


grad_fn = jax.jit(jax.grad(mlp_loss))


def sam_gradient(params, batch, rho):
  """∇L(w + rho g/‖g‖) by the formula."""
  g = grad_fn(params, batch)
  n = np.sqrt(np.sum(flat(g) ** 2))
  perturbed = jax.tree.map(lambda w, x: w + rho * x / (n + EPS), params, g)
  return grad_fn(perturbed, batch)


def run(tx, params, steps, lr=0.1):
  """Runs the transform alone; returns per-step params, outputs and stats."""

  @jax.jit
  def step(p, s, batch):
    g = jax.grad(mlp_loss)(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return u, s

  state = tx.init(params)
  ps, outs, stats = [], [], []
  p = params
  for t in range(steps):
    u, state = step(p, state, batch_at(t))
    ps.append(p)
    outs.append(u)
    stats.append({k: np.asarray(v) for k, v in sam_optax.stats(state).items()})
    p = jax.tree.map(lambda w, x: w - lr * x, p, u)
  return ps, outs, stats


def assert_close(actual, desired, tol=2e-5):
  """Close relative to the vector's norm (float32 noise of a whole step)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired)
  err = np.linalg.norm(actual - desired)
  assert err <= tol * max(np.linalg.norm(desired), 1e-6), (err, desired)


def sampled_steps(stats):
  evals = [0] + [int(s["grad_evals"]) for s in stats]
  return [evals[i + 1] > evals[i] for i in range(len(stats))]


# --------------------------------------------------------------------------
# LookSAM.
# --------------------------------------------------------------------------


def test_looksam_k1_equals_sam_along_a_trajectory():
  params = mlp_params()
  tx_l = optax.chain(sam_optax.looksam(mlp_loss, 0.1, k=1), optax.sgd(0.1))
  tx_s = optax.chain(sam_optax.sam(mlp_loss, 0.1), optax.sgd(0.1))

  def trajectory(tx):
    @jax.jit
    def step(p, s, batch):
      g = jax.grad(mlp_loss)(p, batch)
      u, s = tx.update(g, s, p, batch=batch)
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    out = []
    for t in range(8):
      p, s = step(p, s, batch_at(t))
      out.append(flat(p))
    return out, s

  a, sa = trajectory(tx_l)
  b, _ = trajectory(tx_s)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert int(sam_optax.stats(sa)["grad_evals"]) == 8


@pytest.mark.parametrize("per_leaf", [False, True])
def test_looksam_reuse_steps_follow_the_formula(per_leaf):
  k, alpha, rho = 3, 0.7, 0.1
  tx = sam_optax.looksam(mlp_loss, rho, k=k, alpha=alpha, per_leaf=per_leaf)
  ps, outs, stats = run(tx, mlp_params(), 10)
  gv = None
  for t, (p, out, st) in enumerate(zip(ps, outs, stats)):
    batch = batch_at(t)
    g = grad_fn(p, batch)
    if t % k == 0:
      gs = sam_gradient(p, batch, rho)
      if per_leaf:
        gv = [
            np.ravel(a) - np.dot(np.ravel(a), np.ravel(b))
            / (np.dot(np.ravel(b), np.ravel(b)) + EPS) * np.ravel(b)
            for a, b in zip(
                map(np.float64, jax.tree.leaves(gs)),
                map(np.float64, jax.tree.leaves(g)),
            )
        ]
      else:
        a, b = flat(gs), flat(g)
        gv = a - np.dot(a, b) / (np.dot(b, b) + EPS) * b
      want = flat(gs)
    elif per_leaf:
      want = np.concatenate([
          np.ravel(np.float64(a))
          + alpha * np.linalg.norm(a) / (np.linalg.norm(v) + EPS) * v
          for a, v in zip(jax.tree.leaves(g), gv)
      ])
    else:
      gf = flat(g)
      want = gf + alpha * np.linalg.norm(gf) / (np.linalg.norm(gv) + EPS) * gv
    assert_close(flat(out), want)
    assert int(st["steps_since_sample"]) == t % k
  assert int(stats[-1]["grad_evals"]) == 4  # steps 0, 3, 6, 9


def test_looksam_projection_is_orthogonal_and_stored():
  # The stored component is orthogonal to the clean gradient of its step.
  tx = sam_optax.looksam(mlp_loss, 0.5, k=4)
  p = mlp_params()
  batch = batch_at(0)
  g = grad_fn(p, batch)
  _, state = tx.update(g, tx.init(p), p, batch=batch)
  gv = flat(state.combine.gv)
  assert abs(np.dot(gv, flat(g))) < 1e-5 * np.linalg.norm(gv) * np.linalg.norm(
      flat(g)
  )
  assert np.linalg.norm(gv) > 0


# --------------------------------------------------------------------------
# A reuse step does not call loss_fn; no retracing.
# --------------------------------------------------------------------------


def test_reuse_steps_do_not_evaluate_loss_fn():
  calls = []

  def counted_loss(params, batch):
    jax.debug.callback(lambda: calls.append(1))
    return mlp_loss(params, batch), {"aux": jnp.zeros(())}

  def user_loss(params, batch):
    return counted_loss(params, batch)[0]

  for tx, want_evals in [
      (sam_optax.looksam(counted_loss, k=3, has_aux=True), 4),  # 0, 3, 6, 9
      (
          sam_optax.vsam(
              counted_loss, warmup_steps=2, window=4, blocks=2, max_rate=0.25,
              has_aux=True,
          ),
          4,  # 2 warm-up + one per window (steps 2-5, 6-9)
      ),
  ]:

    @jax.jit
    def step(p, s, batch, tx=tx):
      g = jax.grad(user_loss)(p, batch)
      return tx.update(g, s, p, batch=batch)

    p = mlp_params()
    s = tx.init(p)
    calls.clear()
    for t in range(10):
      _, s = step(p, s, batch_at(t))
    jax.effects_barrier()
    # 10 clean gradients by the caller plus one per second gradient.
    assert len(calls) == 10 + want_evals
    assert int(sam_optax.stats(s)["grad_evals"]) == want_evals


def test_no_retrace_across_warmup_windows_and_reuse():
  """One trace over warm-up, windows and reuse; state buffers donatable."""
  tx = sam_optax.vsam(mlp_loss, warmup_steps=3, window=4, blocks=2)
  tx_l = sam_optax.looksam(mlp_loss, k=3)

  for t_ in (tx, tx_l):
    chex.clear_trace_counter()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    @chex.assert_max_traces(n=1)
    def step(p, s, batch, t_=t_):
      g = jax.grad(mlp_loss)(p, batch)
      u, s = t_.update(g, s, p, batch=batch)
      return jax.tree.map(lambda w, x: w - 0.1 * x, p, u), s

    p = mlp_params()
    s = t_.init(p)
    for t in range(14):
      p, s = step(p, s, batch_at(t))
    assert int(sam_optax.stats(s)["count"]) == 14


# --------------------------------------------------------------------------
# vSAM: warm-up, reuse rule, schedule.
# --------------------------------------------------------------------------


def test_vsam_warmup_and_decayed_reuse():
  warmup, window, decay, max_reuse, rho = 3, 10, 0.5, 3, 0.05
  tx = sam_optax.vsam(
      mlp_loss, rho, warmup_steps=warmup, window=window, blocks=5,
      max_rate=0.1, decay=decay, max_reuse=max_reuse,
  )  # floor(10 * 0.1) = 1: exactly one sample per window
  steps = warmup + 2 * window
  ps, outs, stats = run(tx, mlp_params(), steps)
  sampled = sampled_steps(stats)
  assert all(sampled[:warmup])
  for w0 in range(warmup, steps, window):
    assert sum(sampled[w0:w0 + window]) == 1
  psf, since, n_reuse_checked = None, 0, 0
  for t, (p, out, st) in enumerate(zip(ps, outs, stats)):
    batch = batch_at(t)
    g = flat(grad_fn(p, batch))
    if sampled[t]:
      gs = flat(sam_gradient(p, batch, rho))
      psf, since = gs - g, 0
      want, lam = gs, 1.0
    else:
      since += 1
      if since <= max_reuse:
        lam = decay**since
        want = g + lam * psf
        n_reuse_checked += 1
      else:
        lam = 0.0
        want = g
    if since > max_reuse:  # the plain gradient, exactly
      np.testing.assert_array_equal(flat(out), np.float32(want))
    else:
      assert_close(flat(out), want)
    assert int(st["steps_since_sample"]) == since
    np.testing.assert_allclose(st["reuse_weight"], lam, rtol=1e-6)
    assert st["sampling_rate"] == np.float32(1.0 if t < warmup else 0.1)
  assert n_reuse_checked >= 2 * max_reuse - 2


def np_block_variance(p_buffer, blocks):
  s = np.sort(np.asarray(p_buffer, np.float64)).reshape(blocks, -1)
  return float(np.mean(np.var(s, axis=1, ddof=1)))


def np_rate_update(rate, r_seq, v_seq, gains, max_quota):
  def rel(seq):
    seq = np.asarray(seq, np.float64)
    if len(seq) < 2:
      return 0.0
    return float(np.clip(np.mean((seq[1:] - seq[:-1]) / seq[:-1]), -1, 1))

  new = rate * (1 + gains[0] * rel(r_seq) + gains[1] * rel(v_seq))
  return float(min(max(new, 1.0), max_quota))


def test_vsam_schedule_along_a_trajectory():
  """Rates, quotas and statistics against a NumPy replay of the rules."""
  warmup, window, blocks, gains, max_rate, rho = 6, 6, 3, (3.0, 2.0), 1.0, 0.5
  tx = sam_optax.vsam(
      mlp_loss, rho, warmup_steps=warmup, window=window, blocks=blocks,
      max_rate=max_rate, gains=gains, initial_rate=2.0, seed=3,
  )
  steps = warmup + 6 * window
  ps, _, stats = run(tx, mlp_params(), steps, lr=0.3)
  sampled = sampled_steps(stats)
  assert all(sampled[:warmup])

  rate, max_quota = 2.0, math.floor(window * max_rate)
  r_hist, v_hist = [], []
  p_buf = np.zeros(window)
  n = 0
  rates = []
  for t in range(steps):
    if t >= warmup and (t - warmup) % window == 0:
      # Drawn at the end of step t - 2: step t - 1's sample is not in yet.
      k = n - int(t >= 1 and sampled[t - 1])
      rate = np_rate_update(
          rate, r_hist[:k][-window:], v_hist[:k][-window:], gains, max_quota
      )
      rates.append(rate)
      taken = sum(sampled[t:t + window])
      assert taken == math.floor(rate), (t, rate, taken)
    if t >= warmup:
      np.testing.assert_allclose(
          stats[t]["samples_per_window"], rate, rtol=1e-5
      )
      np.testing.assert_allclose(
          stats[t]["sampling_rate"], rate / window, rtol=1e-5
      )
    if sampled[t]:
      batch = batch_at(t)
      g = flat(grad_fn(ps[t], batch))
      psf = flat(sam_gradient(ps[t], batch, rho)) - g
      p_now = np.linalg.norm(psf)
      r_hist.append(p_now / np.linalg.norm(g))
      p_buf[n % window] = p_now
      v_hist.append(np_block_variance(p_buf, blocks))
      n += 1
  # The schedule moved: not every window had the same quota.
  assert len(set(math.floor(r) for r in rates)) > 1, rates
  np.testing.assert_allclose(
      stats[-1]["samples_per_window"], rate, rtol=1e-5
  )


def _step(count, grads=None):
  """A Step carrying only what the vSAM gate reads."""
  return engine.Step(
      updates=grads, grads=grads, params=None, batch=None,
      count=jnp.asarray(count, jnp.int32), rho=jnp.float32(0.05),
      axis_name=None, eps=EPS, loss=None,
  )


def _ring(seq, samples, window):
  """Places a chronological sequence into a ring buffer after ``samples``."""
  buf = np.zeros(window, np.float32)
  n = len(seq)
  for i, x in enumerate(seq):
    buf[(samples - n + i) % window] = x
  return jnp.asarray(buf)


RATE_GATE = parts.variation_sampling(
    warmup_steps=5, window=6, blocks=3, max_rate=1.0, gains=(0.13, 0.4),
    initial_rate=1.0, eps=EPS,
)
_prepare = jax.jit(RATE_GATE.prepare)


@pytest.mark.parametrize(
    "r_seq, v_seq, rate",
    [
        ([1.0, 1.1, 1.0, 1.2, 1.3, 1.2], [0.5, 0.4, 0.45, 0.5, 0.6, 0.55], 2.0),
        ([1.0, 3.0, 9.0, 20.0, 50.0, 90.0], [1.0, 2.0, 4.0, 8.0, 16.0, 40.0],
         5.5),  # dR, dV clipped to 1; rate clipped to the max quota
        ([2.0, 1.0, 0.5, 0.2, 0.1, 0.05], [1.0, 0.5, 0.2, 0.1, 0.1, 0.1],
         1.2),  # falling: the rate floors at 1
        ([1.0, 1.5, 1.2], [0.3, 0.2, 0.25], 3.0),  # buffer not full yet
        ([1.0], [0.3], 3.0),  # one value: no change
    ],
)
def test_vsam_rate_update_from_hand_made_sequences(r_seq, v_seq, rate):
  gate, window, warmup = RATE_GATE, 6, 5
  samples = len(r_seq) + (7 if len(r_seq) == window else 0)  # wrap the ring
  state = gate.init(mlp_params())._replace(
      rate=jnp.float32(rate),
      samples=jnp.int32(samples),
      ratio=_ring(r_seq, samples, window),
      root_variance=_ring(np.sqrt(v_seq), samples, window),
      taken=jnp.int32(4),
  )
  want = np_rate_update(rate, r_seq, v_seq, gate.gains, window)
  prepared = _prepare(state)
  np.testing.assert_allclose(prepared.next_rate, want, rtol=1e-5)
  assert prepared.rate == np.float32(rate)  # the current window's, until it ends
  assert int(np.sum(prepared.pattern)) == math.floor(want)  # exactly the quota
  # The window's first step takes the new rate and resets the count taken.
  for count in (warmup, warmup + 3 * window):  # window boundaries
    go, new = gate.decide(_step(count), prepared)
    np.testing.assert_allclose(new.rate, want, rtol=1e-5)
    assert int(new.taken) == int(prepared.pattern[0]) and bool(go) == bool(
        prepared.pattern[0]
    )
  _, new = gate.decide(_step(warmup + 2), prepared)  # inside a window
  assert new.rate == np.float32(rate) and int(new.taken) >= 4
  go, new = gate.decide(_step(warmup - 1), state)  # warm-up: always sampled
  assert bool(go) and float(new.probability) == 1.0


def np_window(key, rate, window):
  """The window's decisions replayed step by step with the same draws."""
  quota, taken, out = math.floor(rate), 0, []
  for pos in range(window):
    key, sub = jax.random.split(key)
    u = float(jax.random.uniform(sub))
    go = (taken < quota and u < np.float32(rate) / window) or (
        window - pos <= quota - taken
    )
    taken += int(go)
    out.append(go)
  return out, key


def test_vsam_window_pattern_replays_the_per_step_draws():
  window, warmup = 5, 2
  gate = parts.variation_sampling(
      warmup_steps=warmup, window=window, blocks=1, max_rate=1.0,
      initial_rate=3.0,
  )
  state = gate.init(mlp_params())
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    prepared = gate.prepare(state._replace(key=key))
    want, key_after = np_window(key, 3.0, window)
    assert [bool(x) for x in prepared.pattern] == want
    np.testing.assert_array_equal(prepared.key, key_after)
  keys = jax.random.split(jax.random.PRNGKey(7), 4000)
  patterns = np.asarray(
      jax.jit(jax.vmap(lambda k: gate.prepare(state._replace(key=k)).pattern))(
          keys
      )
  )
  assert (patterns.sum(axis=1) == 3).all()  # the quota, always
  share = patterns[:, 0].mean()  # the first step: a free draw, rate / window
  assert abs(share - 3.0 / window) < 0.03, share


def test_vsam_window_draw_is_a_rolled_loop_flat_in_the_window():
  # The window's draws are one loop body, not one copy per step: the
  # program (and XLA's compile time: 16 CPU-s unrolled at window 50 on the
  # project's machine, 1.2 s rolled) does not grow with the window, and the
  # draws are the per-step replay's at the default window too.
  def size(window):
    gate = parts.variation_sampling(warmup_steps=2, window=window, blocks=1)
    state = gate.init(mlp_params())
    return len(jax.make_jaxpr(gate.prepare)(state).jaxpr.eqns), gate, state

  small, _, _ = size(4)
  big, gate, state = size(400)
  assert big == small
  _, gate, state = size(50)
  rate = 7.5
  key = jax.random.PRNGKey(3)
  prepared = jax.jit(gate.prepare)(
      state._replace(key=key, rate=jnp.float32(rate), samples=jnp.int32(0)))
  want, key_after = np_window(key, float(prepared.next_rate), 50)
  assert [bool(x) for x in prepared.pattern] == want
  np.testing.assert_array_equal(prepared.key, key_after)


def test_vsam_observe_records_r_p_v_and_stat_leaves():
  window, blocks = 6, 3
  params = mlp_params()
  rng = np.random.default_rng(0)
  g = jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params
  )
  d = jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params
  )
  second = jax.tree.map(lambda a, b: a + b, g, d)
  step = _step(0, g)
  p_prev = [0.5, 0.7, 0.1, 0.9, 0.3, 0.2]
  for stat_leaves, sel in [
      (None, lambda path: True),
      (["head"], lambda path: path.startswith("head/")),
      (lambda path: path.endswith("kernel"), lambda path: path.endswith("kernel")),
  ]:
    gate = parts.variation_sampling(
        warmup_steps=0, window=window, blocks=blocks, stat_leaves=stat_leaves,
        max_rate=1.0,
    )
    state = gate.init(params)._replace(
        samples=jnp.int32(7), norm=jnp.asarray(p_prev, jnp.float32)
    )
    new = gate.observe(step, second, state)
    leaves = jax.tree_util.tree_flatten_with_path(d)[0]
    keep = [
        "/".join(str(k.key) for k in path) for path, _ in leaves
    ]
    dn = np.sqrt(sum(
        np.sum(np.float64(x) ** 2) for (_, x), p in zip(leaves, keep) if sel(p)
    ))
    gn = np.sqrt(sum(
        np.sum(np.float64(x) ** 2)
        for (_, x), p in zip(jax.tree_util.tree_flatten_with_path(g)[0], keep)
        if sel(p)
    ))
    i = 7 % window
    buf = list(p_prev)
    buf[i] = dn
    np.testing.assert_allclose(new.norm[i], dn, rtol=1e-5)
    np.testing.assert_allclose(new.ratio[i], dn / gn, rtol=1e-5)
    np.testing.assert_allclose(
        new.variance[i], np_block_variance(buf, blocks), rtol=1e-4
    )
    assert int(new.samples) == 8


# --------------------------------------------------------------------------
# Devices, dtypes, stats, errors.
# --------------------------------------------------------------------------


def test_pmap_decisions_and_state_agree_across_devices():
  """Per-device batches under pmap: one state on every device, equal to the
  single-device run on the whole batch (the loss is a mean)."""
  n_dev, n_steps = 4, 10
  full = make_batch(11, n=32)
  shards = jax.tree.map(lambda x: x.reshape((n_dev, -1) + x.shape[1:]), full)
  params = mlp_params()
  for make in [
      lambda axis: sam_optax.looksam(mlp_loss, 0.1, k=3, axis_name=axis),
      lambda axis: sam_optax.vsam(
          mlp_loss, 0.1, warmup_steps=2, window=4, blocks=2, max_rate=0.5,
          gains=(1.0, 1.0), axis_name=axis,
      ),
  ]:

    def run_steps(p, s, batch, tx, axis):
      def body(carry, _):
        p, s = carry
        g = jax.grad(mlp_loss)(p, batch)
        if axis is not None:
          g = jax.lax.pmean(g, axis)  # the global gradient perturbs
        u, s = tx.update(g, s, p, batch=batch)
        return (jax.tree.map(lambda w, x: w - 0.2 * x, p, u), s), None

      return jax.lax.scan(body, (p, s), None, length=n_steps)[0]

    tx_p, tx_1 = make("d"), make(None)
    step_p = jax.pmap(
        lambda p, s, b: run_steps(p, s, b, tx_p, "d"),
        axis_name="d", devices=jax.devices()[:n_dev],
    )
    rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * n_dev), t)  # noqa
    pp, sp = step_p(rep(params), rep(tx_p.init(params)), shards)
    p1, s1 = jax.jit(lambda p, s, b: run_steps(p, s, b, tx_1, None))(
        params, tx_1.init(params), full
    )
    for leaf in jax.tree.leaves(sp):  # every device holds the same state
      leaf = np.asarray(leaf)
      assert (leaf == leaf[:1]).all()
    st_p, st_1 = sam_optax.stats(sp), sam_optax.stats(s1)
    assert int(st_p["grad_evals"][0]) == int(st_1["grad_evals"])
    assert 1 < int(st_1["grad_evals"]) < n_steps
    for k in st_1:
      np.testing.assert_allclose(st_p[k][0], st_1[k], rtol=1e-4, err_msg=k)
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda x: x[0], pp)), flat(p1), rtol=1e-4, atol=1e-5
    )


def test_bfloat16_params_keep_their_dtype():
  params = mlp_params(dtype=jnp.bfloat16)
  batch = jax.tree.map(lambda x: x.astype(jnp.bfloat16), batch_at(0))
  for tx in [
      sam_optax.looksam(mlp_loss, k=2),
      sam_optax.vsam(mlp_loss, warmup_steps=1, window=4, blocks=2),
  ]:

    @jax.jit
    def step(p, s, tx=tx):
      g = jax.grad(mlp_loss)(p, batch)
      return tx.update(g, s, p, batch=batch)

    s = tx.init(params)
    for _ in range(4):  # computed and reuse steps
      u, s = step(params, s)
      assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
      chex.assert_tree_all_finite(u)


def test_stats_keys():
  p = mlp_params()
  s_l = optax.chain(sam_optax.looksam(mlp_loss), optax.sgd(0.1)).init(p)
  s_v = optax.chain(
      sam_optax.vsam(mlp_loss, warmup_steps=0), optax.sgd(0.1)
  ).init(p)
  assert set(sam_optax.stats(s_l)) == {
      "count", "grad_evals", "steps_since_sample"
  }
  assert set(sam_optax.stats(s_v)) == {
      "count", "grad_evals", "sampling_rate", "samples_per_window",
      "steps_since_sample", "reuse_weight",
  }


def test_vsam_default_warmup_is_two_windows():
  tx = sam_optax.vsam(mlp_loss, window=4, blocks=2)
  ps, _, stats = run(tx, mlp_params(), 9)
  sampled = sampled_steps(stats)
  assert all(sampled[:8]) and int(stats[8]["grad_evals"]) <= 9
  assert float(stats[7]["sampling_rate"]) == 1.0
  assert float(stats[8]["sampling_rate"]) < 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sam_optax.looksam(mlp_loss, k=0), r"k must be an integer in \[1"),
        (lambda: sam_optax.looksam(mlp_loss, k=2.5), "k must be an integer"),
        (lambda: sam_optax.looksam(mlp_loss, alpha=-0.1), r"alpha must be in \[0"),
        (lambda: sam_optax.looksam(mlp_loss, rho=-1.0), "rho"),
        (lambda: sam_optax.vsam(mlp_loss, window=4, blocks=5), "window must be a multiple of blocks"),
        (lambda: sam_optax.vsam(mlp_loss, window=50, blocks=7), "window must be a multiple of blocks"),
        (lambda: sam_optax.vsam(mlp_loss, window=5, blocks=5), "at least 2 values per block"),
        (lambda: sam_optax.vsam(mlp_loss, max_rate=0.0), r"max_rate must be in \(0, 1\]"),
        (lambda: sam_optax.vsam(mlp_loss, max_rate=1.5), r"max_rate must be in \(0, 1\]"),
        (lambda: sam_optax.vsam(mlp_loss, max_rate=0.01), "at least one sample per window"),
        (lambda: sam_optax.vsam(mlp_loss, decay=1.0), r"decay must be in \(0, 1\)"),
        (lambda: sam_optax.vsam(mlp_loss, decay=0.0), r"decay must be in \(0, 1\)"),
        (lambda: sam_optax.vsam(mlp_loss, warmup_steps=-1), r"warmup_steps must be an integer in \[0"),
        (lambda: sam_optax.vsam(mlp_loss, max_reuse=-1), "max_reuse"),
        (lambda: sam_optax.vsam(mlp_loss, gains=(0.1,)), "gains must be two"),
        (lambda: sam_optax.vsam(mlp_loss, gains=(0.1, -1.0)), "gains must be two"),
        (lambda: sam_optax.vsam(mlp_loss, initial_rate=0.5), r"initial_rate must be in \[1, 40\]"),
        (lambda: sam_optax.vsam(mlp_loss, stat_leaves=[]), "stat_leaves must be"),
    ],
)
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_stat_leaves_checked_at_init():
  p = mlp_params()
  with pytest.raises(ValueError, match=r"not in params: \['nope'\]"):
    sam_optax.vsam(mlp_loss, stat_leaves=["head", "nope"]).init(p)
  with pytest.raises(ValueError, match="selects no leaf"):
    sam_optax.vsam(mlp_loss, stat_leaves=lambda path: False).init(p)
  sam_optax.vsam(mlp_loss, stat_leaves=["head/kernel", "dense1"]).init(p)


def test_inject_hyperparams_decay_and_alpha():
  p = mlp_params()
  for ctor, kw, hp in [
      (sam_optax.vsam, dict(window=4, blocks=2), "decay"),
      (sam_optax.looksam, dict(k=4), "alpha"),
  ]:
    outs = []
    for value in (0.3, 0.6):
      extra = dict(warmup_steps=1, max_rate=0.25) if hp == "decay" else {}
      direct = ctor(mlp_loss, **kw, **extra, **{hp: value})
      statics = ("loss_fn",) + tuple(kw)
      # warmup_steps and max_rate injected too (inject_hyperparams injects
      # every numeric argument not in static_args)
      injected = optax.inject_hyperparams(ctor, static_args=statics)(
          mlp_loss, **kw, **extra, **{hp: 0.9}
      )

      @jax.jit
      def step(s, si, batch, direct=direct, injected=injected):
        g = jax.grad(mlp_loss)(p, batch)
        u, s = direct.update(g, s, p, batch=batch)
        ui, si = injected.update(g, si, p, batch=batch)
        return u, s, ui, si

      s, si = direct.init(p), injected.init(p)
      si.hyperparams[hp] = jnp.float32(value)
      for t in range(3):  # a computed step, then reuse steps
        u, s, ui, si = step(s, si, batch_at(t))
        chex.assert_trees_all_close(u, ui, rtol=1e-6, atol=1e-7)
      outs.append(flat(u))
    assert not np.allclose(outs[0], outs[1])  # the value really mattered
  with pytest.raises(ValueError, match="list 'window' in static_args"):
    tx = optax.inject_hyperparams(sam_optax.vsam, static_args=("loss_fn",))(
        mlp_loss
    )
    jax.jit(lambda s: tx.update(p, s, p, batch=batch_at(0)))(tx.init(p))


# --------------------------------------------------------------------------
# Convolutions in a skipped-able branch stay on XLA:CPU's fast path.
# --------------------------------------------------------------------------


def conv_params(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  return {
      "c1": jax.random.normal(ks[0], (3, 3, 2, 4)) * 0.3,  # HWIO, stride 2
      "c2": jax.random.normal(ks[1], (3, 3, 1, 4)) * 0.3,  # depthwise, dilated
      "c3": jax.random.normal(ks[2], (4, 4, 2, 2)) * 0.3,  # OIHW on NCHW
      "c4": jax.random.normal(ks[3], (3, 4, 4)) * 0.3,  # 1-D, WIO
      "head": jax.random.normal(ks[4], (4, 3)) * 0.3,
  }


@jax.jit
def _nested_conv(x, k):  # a jit inside the loss: its convolutions count too
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", rhs_dilation=(2, 2), feature_group_count=4,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def conv_loss(p, batch):
  x, y = batch
  h = jax.lax.conv_general_dilated(
      x, p["c1"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  h = jnp.tanh(_nested_conv(jnp.tanh(h), p["c2"]))
  h = jnp.transpose(h, (0, 3, 1, 2))  # NCHW
  h = jax.lax.conv_general_dilated(
      h, p["c3"], (1, 1), [(1, 1), (0, 0)],
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
  )
  h = jnp.transpose(h, (0, 2, 3, 1)).reshape(h.shape[0], -1, 4)  # N, W, C
  h = jax.lax.conv_general_dilated(
      jnp.tanh(h), p["c4"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
  )
  out = jnp.mean(h, axis=1) @ p["head"]
  return jnp.mean((out - y) ** 2)


def conv_batch(seed=0):
  rng = np.random.default_rng(seed)
  return (
      jnp.asarray(rng.standard_normal((2, 8, 8, 2)), jnp.float32),
      jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
  )


def _conv_dim_labels(compiled_text):
  import re  # pylint: disable=g-import-not-at-top

  return re.findall(r"convolution\(.*dim_labels=([^,\s]+)", compiled_text)


def test_canonical_conv_grad_values_and_compiled_form():
  from sam_optax._src import canonical_conv  # pylint: disable=g-import-not-at-top

  p, batch = conv_params(), conv_batch()
  want = jax.jit(jax.grad(conv_loss))(p, batch)

  def in_cond(grad):
    return jax.jit(
        lambda p, b, c: jax.lax.cond(
            c, lambda: grad(conv_loss)(p, b),
            lambda: jax.tree.map(jnp.zeros_like, p),
        )
    )

  fast, slow = in_cond(canonical_conv.grad), in_cond(jax.grad)
  chex.assert_trees_all_close(
      fast(p, batch, True), want, rtol=1e-5, atol=1e-6
  )
  labels = _conv_dim_labels(fast.lower(p, batch, True).compile().as_text())
  # 4 forward, 4 kernel-gradient and 3 input-gradient convolutions (the
  # input itself is not differentiated), all canonical
  assert len(labels) == 11, labels
  assert set(labels) <= {"b01f_01io->b01f", "b0f_0io->b0f"}, labels
  # the control: without the rewrite XLA:CPU leaves them as they are
  labels = _conv_dim_labels(slow.lower(p, batch, True).compile().as_text())
  assert not set(labels) <= {"b01f_01io->b01f", "b0f_0io->b0f"}, labels


def test_gated_second_gradient_of_a_cnn_is_canonical():
  p, batch = conv_params(), conv_batch()
  tx = sam_optax.looksam(conv_loss, k=2)

  def step(p, s, b):
    return tx.update(jax.grad(conv_loss)(p, b), s, p, batch=b)

  step = jax.jit(step)
  s = tx.init(p)
  labels = _conv_dim_labels(step.lower(p, s, batch).compile().as_text())
  assert set(labels) <= {"b01f_01io->b01f", "b0f_0io->b0f"}, labels
  for t in range(3):  # SAM, reuse, SAM: values of the formula
    u, s = step(p, s, batch)
    if t % 2 == 0:
      g = jax.grad(conv_loss)(p, batch)
      n = np.sqrt(np.sum(flat(g) ** 2))
      w = jax.tree.map(lambda a, b: a + 0.1 * b / n, p, g)
      np.testing.assert_allclose(
          flat(u), flat(jax.grad(conv_loss)(w, batch)), rtol=1e-5, atol=1e-6
      )
