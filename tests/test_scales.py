"""Issue 19, item 8: every statistic at gradient scales 1e30 and 1e-30.

A statistic that squares or multiplies gradient-scale numbers (a norm, a
variance, a projection, a Fisher score, an accumulator) overflows float32
at 1e30 (squares of 1e19 and more are ``inf``) and underflows at 1e-30.
Each one is checked against an independent computation:

- vSAM's statistics (``mean_relative_change``, ``sqrt(V)``, the next
  window's rate) against NumPy float64 evaluations of their formulas;
- every method, end to end: run on ``s * loss`` with ``s = 2**100`` or
  ``2**-100`` (powers of two, so the scaled gradients are exact in float32
  and bfloat16), its output divided by ``s`` (LightSAM: as it is, the rule
  is scale-free) and its diagnostics must equal the run on ``loss`` itself.
  ``eps`` guards a division (``‖g‖ + eps``), so it is scaled with the
  gradients where the formula needs it to be negligible at both scales.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import parts
from sam_optax._src import engine
from sam_optax._src import gate as gate_lib
from tests import helpers
from tests.helpers import METHODS, make_batch, mlp_loss, mlp_params

EPS = 1e-12
BIG, SMALL = 2.0**100, 2.0**-100  # about 1.3e30 and 7.9e-31


# --------------------------------------------------------------------------
# vSAM's statistics against NumPy float64.
# --------------------------------------------------------------------------


def np_mean_relative_change(seq, eps, power=1):
  y = np.asarray(seq, np.float64) ** power
  if len(y) < 2:
    return 0.0
  return float(np.mean((y[1:] - y[:-1]) / (y[:-1] + eps)))


def np_root_block_variance(p_buffer, blocks):
  s = np.sort(np.asarray(p_buffer, np.float64)).reshape(blocks, -1)
  return float(np.sqrt(np.mean(np.var(s, axis=1, ddof=1))))


SEQ = [1.0, 1.3, 0.9, 1.6, 1.2, 2.0]


@pytest.mark.parametrize("scale", [1e30, 1e20, 1.0, 1e-20, 1e-30])
@pytest.mark.parametrize("power", [1, 2])
def test_mean_relative_change_matches_float64(scale, power):
  values = jnp.asarray(np.asarray(SEQ) * scale, jnp.float32)
  valid = jnp.ones(len(SEQ), bool)
  got = float(jax.jit(
      gate_lib.mean_relative_change, static_argnums=(2, 3)
  )(values, valid, EPS, power))
  # the float64 formula on the float32 values actually stored
  want = np_mean_relative_change(np.asarray(values, np.float64), EPS, power)
  assert np.isfinite(got), (scale, power, got)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  if scale**power > 1e-6:  # eps negligible: the scale-free value
    np.testing.assert_allclose(
        got, np_mean_relative_change(SEQ, 0.0, power), rtol=1e-5
    )


def test_mean_relative_change_pairs_of_very_different_sizes():
  """A pair 1e30 apart: its squares' ratio is 1e60, beyond float32; the
  change is clipped by the rate update anyway, but must not be NaN; two
  tiny entries next to a huge one change by their own ratio."""
  values = jnp.asarray([1e30, 1e-30, 2e-30, 1e30], jnp.float32)
  valid = jnp.ones(4, bool)
  got = float(gate_lib.mean_relative_change(values, valid, 0.0, 2))
  assert got == np.inf  # 1e-30 -> 1e30 squared: 1e120, one term inf
  got = float(gate_lib.mean_relative_change(values[:3], valid[:3], 0.0, 2))
  want = np_mean_relative_change(np.asarray(values[:3], np.float64), 0.0, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e30, 1e20, 1.0, 1e-20, 1e-30])
def test_root_block_variance_matches_float64(scale):
  p = np.asarray([0.5, 0.7, 0.1, 0.9, 0.3, 0.2]) * scale
  got = float(gate_lib.block_root_variance(jnp.asarray(p, jnp.float32), 3))
  assert np.isfinite(got) and got > 0
  np.testing.assert_allclose(got, np_root_block_variance(p, 3), rtol=1e-5)


def _ring(seq, samples, window):
  buf = np.zeros(window, np.float32)
  for i, x in enumerate(seq):
    buf[(samples - len(seq) + i) % window] = x
  return jnp.asarray(buf)


@pytest.mark.parametrize("scale", [1e30, 1.0, 1e-30])
def test_vsam_rate_from_a_window_of_huge_or_tiny_statistics(scale):
  """The next window's rate from P buffers at the scale, against float64:
  R is a ratio (scale-free); V = mean block variance of sort(P) is about
  scale**2 (1e60 at 1e30: inf in float32, and the rate was NaN)."""
  window, blocks, gains, rate = 6, 3, (0.13, 0.4), 2.0
  gate = parts.variation_sampling(
      warmup_steps=0, window=window, blocks=blocks, max_rate=1.0,
      gains=gains, initial_rate=rate, eps=EPS,
  )
  r_seq = [1.0, 1.1, 1.0, 1.2, 1.3, 1.2]
  p_hist = np.asarray([0.5, 0.7, 0.1, 0.9, 0.3, 0.2, 0.6, 0.4]) * scale
  # observe the last 6 P values one by one, as the gate does
  state = gate.init(mlp_params())
  params_g = {"w": jnp.ones(1)}
  v_hist, r_hist = [], []
  buf = np.zeros(window)
  for n, (p, r) in enumerate(zip(p_hist[-window:], r_seq)):
    g32, h32 = np.float32(p / r), np.float32(p / r + p)
    step = helpers.engine_step({"w": jnp.asarray([g32])}, params_g)
    state = gate.observe(step, {"w": jnp.asarray([h32])}, state)
    p_now = np.float64(h32) - np.float64(g32)
    buf[n % window] = p_now
    r_hist.append(p_now / (np.float64(g32) + EPS))
    v_hist.append(np_root_block_variance(buf, blocks) ** 2)
  assert np.all(np.isfinite(np.asarray(state.root_variance)))
  d_r = np.clip(np_mean_relative_change(r_hist, EPS), -1, 1)
  d_v = np.clip(np_mean_relative_change(v_hist, EPS), -1, 1)
  want = min(max(rate * (1 + gains[0] * d_r + gains[1] * d_v), 1.0), window)
  got = float(jax.jit(gate.updated_rate)(state))
  assert np.isfinite(got), got
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if scale >= 1.0:  # eps negligible: dV moved the rate
    assert abs(d_v) > 0.05, d_v


# --------------------------------------------------------------------------
# Every method, end to end, at 2**100 and 2**-100.
# --------------------------------------------------------------------------

# Diagnostics in gradient units (the rest are counts, rates, densities).
GRADIENT_UNITS = {"layer_sharpness"}
# The smallest normal float32: negligible beside the norms at every scale
# tested (1e-8 of a norm of 1e-30), so the formulas are scale-free.
TINY_EPS = 2.0**-126
# eps beside a SQUARED gradient quantity (the formula, not the arithmetic):
# LookSAM's <gs, g> / (‖g‖² + eps) and vSAM's dV = ΔV / (V + eps), V ~
# ‖psf‖². At 2**-100 those squares are ~1e-60, below any float32 eps, so
# the formula itself (float64 agrees) is not scale-free there: checked
# against float64 below instead.
EPS_BESIDE_SQUARES = {"looksam", "looksam_per_leaf", "vsam"}


@functools.lru_cache(maxsize=None)
def _jitted(name, dtype_name, eps):
  ctor, kw = METHODS[name]
  loss = lambda p, b: b["s"] * mlp_loss(p, b["xy"])  # noqa: E731
  kw = {**kw, "eps": eps}
  if ctor == "ssam_fisher":  # the scale is not per example
    kw["batch_axes"] = {"xy": 0, "s": None}
  tx = getattr(sam_optax, ctor)(loss, **kw)
  return tx, jax.jit(lambda g, st, p, b: tx.update(g, st, p, batch=b)), loss


def _run(name, s, eps=TINY_EPS, dtype=jnp.float32, steps=5):
  """Outputs (divided by ``s``, LightSAM's as they are) and diagnostics of
  ``steps`` updates on ``s * mlp_loss``; ``s`` is traced, so every scale
  runs one compiled update."""
  tx, upd, loss = _jitted(name, jnp.dtype(dtype).name, eps)
  out_unit = 1.0 if name in helpers.FULL_OPTIMIZERS else s
  p = mlp_params(dtype=dtype)
  st = tx.init(p)
  outs = []
  for t in range(steps):
    xy = jax.tree.map(lambda x: x.astype(dtype), make_batch(100 + t))
    b = {"xy": xy, "s": jnp.float32(s)}
    g = jax.grad(loss)(p, b)
    u, st = upd(g, st, p, b)
    d = jax.tree.map(lambda x: x / out_unit, u)
    outs.append(helpers.flat(d))
    p = jax.tree.map(lambda a, x: (a - 0.05 * x).astype(a.dtype), p, d)
  stats = {k: np.asarray(v, np.float64) / (s if k in GRADIENT_UNITS else 1)
           for k, v in sam_optax.stats(st).items()}
  return np.stack(outs), stats


# bfloat16 has float32's exponent range, so the overflow cases are the same;
# it runs for the methods whose statistics were the (vSAM) and two
# that reduce in float32 from a low-precision input (SAM's norm, LookSAM's
# projection). tests/test_matrix.py runs every method in bf16 and f16.
_CASES = [(name, "float32") for name in sorted(METHODS)] + [
    (name, "bfloat16") for name in ("sam", "looksam", "vsam")]


@pytest.mark.parametrize("name,dtype", _CASES)
def test_every_method_is_scale_equivariant(name, dtype):
  """On ``s * loss`` with ``s = 2**100`` and ``2**-100`` (exact in float32
  and bfloat16), output / s and the diagnostics equal the run on ``loss``
  (eps negligible at every scale: :data:`TINY_EPS`). vSAM at 2**100 was
  the issue's case: a NaN rate and no sample after the first window."""
  dtype = getattr(jnp, dtype)
  ref_out, ref_stats = _run(name, 1.0, dtype=dtype)
  scales = [BIG] if name in EPS_BESIDE_SQUARES else [BIG, SMALL]
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  for s in scales:
    out, stats = _run(name, s, dtype=dtype)
    assert np.all(np.isfinite(out)), (name, s)
    np.testing.assert_allclose(
        out, ref_out, rtol=tol, atol=tol * np.max(np.abs(ref_out)),
        err_msg=f"scale {s}",
    )
    assert set(stats) == set(ref_stats)
    for k, v in stats.items():
      np.testing.assert_allclose(v, ref_stats[k], rtol=tol, atol=1e-6,
                                 err_msg=f"{k} at scale {s}")


def _np_looksam(g, gs, alpha, eps):
  """LookSAM's stored gv and a reuse step's output, float64 (global)."""
  g, gs = np.float64(g), np.float64(gs)
  gv = gs - (np.dot(gs, g) / (np.dot(g, g) + eps)) * g

  def reuse(g2):
    g2 = np.float64(g2)
    return g2 + alpha * (np.linalg.norm(g2) / (np.linalg.norm(gv) + eps)) * gv

  return gv, reuse


@pytest.mark.parametrize("scale", [1e30, 1.0, 1e-30])
def test_looksam_reuse_step_matches_float64(scale):
  """LookSAM's projection and reuse at 1e30 and 1e-30 against the float64
  formula (with eps beside ‖g‖²: at 1e-30 the formula keeps almost all of
  gs in gv, and so must the code). A cubic, so gs is not parallel to g."""
  x = jnp.array([1.0, -2.0, 0.5])

  def loss_fn(w, b):
    return scale * (jnp.sum((w["w"] - b) ** 2) + jnp.sum(w["w"] ** 3))

  rho, alpha = 0.1, 0.7
  tx = sam_optax.looksam(loss_fn, rho=rho, k=2, alpha=alpha, eps=EPS)
  w = {"w": jnp.array([0.3, -0.1, 0.2])}
  st = tx.init(w)
  g = jax.grad(loss_fn)(w, x)
  u1, st = tx.update(g, st, w, batch=x)  # computed step
  g32 = np.asarray(g["w"])
  gn = np.linalg.norm(np.float64(g32))
  w_pert = {"w": w["w"] + jnp.asarray(rho * np.float64(g32) / (gn + EPS),
                                      jnp.float32)}
  gs = np.asarray(jax.grad(loss_fn)(w_pert, x)["w"])
  np.testing.assert_allclose(np.asarray(u1["w"], np.float64), gs, rtol=1e-5)
  gv, reuse = _np_looksam(g32, gs, alpha, EPS)
  np.testing.assert_allclose(np.asarray(st.combine.gv["w"], np.float64), gv,
                             rtol=1e-4, atol=1e-6 * np.max(np.abs(gv)))
  w2 = {"w": w["w"] - 0.01 * jnp.asarray(np.float64(g32) / scale,
                                         jnp.float32)}
  g2 = jax.grad(loss_fn)(w2, x)
  u2, _ = tx.update(g2, st, w2, batch=x)  # reuse step
  want = reuse(np.asarray(g2["w"]))
  np.testing.assert_allclose(np.asarray(u2["w"], np.float64), want,
                             rtol=1e-4, atol=1e-6 * np.max(np.abs(want)))


def test_vsam_tiny_gradients_follow_the_formula():
  """At 2**-100 with the default eps the formula itself changes: ``V`` is
  about 1e-62, so ``dV = (V1 - V0) / (V0 + eps)`` is about 0 (float64 says
  so too) and only ``dR`` moves the rate. What matters here: no NaN, no
  inf, and the method keeps sampling (floor(rate) >= 1 per window)."""
  out, stats = _run("vsam", SMALL, EPS, steps=16)
  assert np.all(np.isfinite(out))
  assert np.isfinite(stats["samples_per_window"])
  assert stats["samples_per_window"] >= 1.0
  # the window of 4 steps after 2 warm-up steps took floor(rate) samples
  assert stats["grad_evals"] >= 2 + 3  # warm-up, then >= 1 per window


def test_vsam_keeps_sampling_at_1e30():
  """The issue's case: gradients of 1e30 (finite in float32). The rate was
  NaN after the first window and vSAM never sampled again; now it samples
  exactly as the same run at scale 1 (the test above, with a longer run)."""
  ref_out, ref_stats = _run("vsam", 1.0, EPS, steps=20)
  out, stats = _run("vsam", 1e30, EPS, steps=20)
  assert np.isfinite(stats["samples_per_window"])
  assert stats["grad_evals"] == ref_stats["grad_evals"]
  np.testing.assert_allclose(
      stats["samples_per_window"], ref_stats["samples_per_window"], rtol=1e-4
  )
  np.testing.assert_allclose(out, ref_out, rtol=1e-3,
                             atol=1e-3 * np.max(np.abs(ref_out)))


def test_vsam_state_reads_v_from_its_root():
  state = parts.variation_sampling(window=4, blocks=2).init(mlp_params())
  state = state._replace(root_variance=jnp.asarray([0.0, 2.0, 3e19, 1.0]))
  np.testing.assert_allclose(state.variance, [0.0, 4.0, np.inf, 1.0])


@pytest.mark.parametrize("scale", [1e30, 1.0, 1e-30])
def test_fisher_scores_match_float64(scale):
  """Sparse SAM-F's scores Σ_i (c ∇ℓ_i)², with c the power of two the
  region passes (base.tree_scale of the batch gradient), against float64
  per-example gradients: the same values times c², and the same order."""
  from sam_optax._src import base  # pylint: disable=g-import-not-at-top
  from sam_optax._src import fisher  # pylint: disable=g-import-not-at-top

  loss = lambda p, b: scale * mlp_loss(p, b)  # noqa: E731
  params, batch = mlp_params(), make_batch(n=8)
  c = base.tree_scale(jax.grad(loss)(params, batch))
  got = helpers.flat(fisher.fisher_scores(loss, params, batch, 8,
                                          chunk_size=3, scale=c))
  per_example = [
      helpers.flat(jax.grad(loss)(params, jax.tree.map(
          lambda x, i=i: x[i:i + 1], batch)))
      for i in range(8)
  ]
  want = np.sum(np.square(np.stack(per_example)), axis=0) * float(c) ** 2
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max())
  top = np.argsort(-want)[:10]
  assert set(np.argsort(-got)[:10]) == set(top)


@pytest.mark.parametrize("scale", [1e30, 1.0, 1e-30])
def test_rank_layers_norms_match_float64(scale):
  loss = lambda p, b: scale * mlp_loss(p, b)  # noqa: E731
  params = mlp_params()
  bs = [make_batch(seed=s) for s in (1, 2)]
  got = dict(sam_optax.rank_layers(loss, params, bs))
  want = {}
  for name in params:
    norms = [np.sqrt(sum(np.sum(np.float64(x) ** 2) for x in
                         jax.tree.leaves(jax.grad(loss)(params, b)[name])))
             for b in bs]
    want[name] = float(np.mean(norms))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
