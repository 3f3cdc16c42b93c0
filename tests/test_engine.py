"""The engine's protocols: parts written by a user are honoured or rejected,
never ignored; the code stays readable (no function over about 60 lines)."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import parts
from sam_optax._src.planner import find_state
from tests.helpers import flat, grad_np, make_batch, mlp_loss, mlp_params, unflat


@dataclasses.dataclass(frozen=True)
class OddSteps(parts.Gate):
  """A user's gate: the second gradient on odd steps only."""

  def decide(self, step, state):
    return step.count % 2 == 1, state


def test_a_user_gate_that_decides_is_honoured():
  calls = []

  def counted(p, b):
    jax.debug.callback(lambda: calls.append(1))
    return mlp_loss(p, b)

  tx = sam_optax.sharpness_aware(
      counted, 0.1, geometry=parts.global_norm(), gate=OddSteps()
  )
  p, b = mlp_params(), make_batch()
  s = tx.init(p)
  step = jax.jit(lambda g, s: tx.update(g, s, p, batch=b))
  g = jax.grad(mlp_loss)(p, b)
  outs = []
  for _ in range(10):
    out, s = step(g, s)
    outs.append(flat(out))
  jax.effects_barrier()
  assert int(s.grad_evals) == 5 and len(calls) == 5
  for t, out in enumerate(outs):  # even steps: the clean gradient, exactly
    if t % 2 == 0:
      np.testing.assert_array_equal(out, flat(g))
    else:
      assert not np.allclose(out, flat(g))


def test_gate_schedule_and_decide_must_agree():
  @dataclasses.dataclass(frozen=True)
  class StaticButDecides(parts.EveryStep):
    def decide(self, step, state):
      return step.count % 2 == 1, state

  with pytest.raises(ValueError, match="overrides decide.*schedule='always'"):
    sam_optax.sharpness_aware(
        mlp_loss, geometry=parts.global_norm(), gate=StaticButDecides()
    )

  @dataclasses.dataclass(frozen=True)
  class DynamicWithoutDecide(parts.Gate):
    pass

  with pytest.raises(ValueError, match="does not implement decide"):
    sam_optax.sharpness_aware(
        mlp_loss, geometry=parts.global_norm(), gate=DynamicWithoutDecide()
    )

  @dataclasses.dataclass(frozen=True)
  class Sometimes(parts.Gate):
    schedule: str = "sometimes"

  with pytest.raises(ValueError, match="gate.schedule must be one of"):
    sam_optax.sharpness_aware(
        mlp_loss, geometry=parts.global_norm(), gate=Sometimes()
    )
  with pytest.raises(ValueError, match="region must be a sam_optax Region"):
    sam_optax.sharpness_aware(
        mlp_loss, geometry=parts.global_norm(), region=object()
    )


@dataclasses.dataclass(frozen=True)
class Careless(parts.Geometry):
  """A user's geometry that ignores the region: rho * g / ‖g‖ everywhere."""

  def perturb(self, step, state, where):
    del where
    n = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(step.grads)))
    return jax.tree.map(lambda x: step.rho * x / n, step.grads), state


def test_a_user_geometry_cannot_escape_an_array_region():
  p, b, rho = mlp_params(), make_batch(), 0.3
  rng = np.random.default_rng(0)
  mask = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < 0.5), p)
  tx = sam_optax.sharpness_aware(
      mlp_loss, rho, geometry=Careless(), region=parts.fixed_mask(mask)
  )
  g = jax.grad(mlp_loss)(p, b)
  out, _ = tx.update(g, tx.init(p), p, batch=b)
  # NumPy: e = rho g / ‖g‖ on the mask only; the output is the dense
  # gradient at w + e.
  gf, m = flat(g), flat(mask).astype(bool)
  e = np.where(m, rho * gf / np.linalg.norm(gf), 0.0)
  want = flat(grad_np(unflat(flat(p) + e, p), b))
  np.testing.assert_allclose(flat(out), want, rtol=2e-5, atol=2e-6)
  dense = flat(grad_np(unflat(flat(p) + rho * gf / np.linalg.norm(gf), p), b))
  assert not np.allclose(flat(out), dense, rtol=1e-4)


def test_every_function_fits_in_a_screen():
  """The largest function in sam_optax, docstring aside, <= 60 lines."""
  root = pathlib.Path(sam_optax.__file__).parent
  sizes = []
  for f in root.rglob("*.py"):
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if ast.get_docstring(node, clean=False) is not None:
          doc = node.body[0]
          n -= doc.end_lineno - doc.lineno + 1
        sizes.append((n, f"{f.name}:{node.name}"))
  bad = [(n, name) for n, name in sizes if n > 60]
  assert not bad, sorted(sizes)[-5:]


def test_rho_zero_evaluates_nothing_for_every_method():
  """rho = 0: the clean gradient, no second gradient, no Fisher, no mask."""
  calls = []

  def counted(p, b):
    jax.debug.callback(lambda: calls.append(1))
    return mlp_loss(p, b)

  p, b = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(p, b)
  for make in [
      lambda: sam_optax.sam(counted, 0.0),
      lambda: sam_optax.ssam_fisher(counted, 0.0, num_samples=4, update_every=1),
      lambda: sam_optax.ssam_dynamic(counted, 0.0, update_every=1, total_steps=9),
      lambda: sam_optax.looksam(counted, 0.0, k=2),
      lambda: sam_optax.vsam(counted, 0.0, warmup_steps=1, window=4, blocks=2),
      lambda: sam_optax.layerwise_sam(counted, 0.0, num_layers=1),
  ]:
    tx = make()
    s = tx.init(p)
    calls.clear()
    for _ in range(3):
      out, s = jax.jit(lambda g, s, tx=tx: tx.update(g, s, p, batch=b))(g, s)
      np.testing.assert_array_equal(flat(out), flat(g))
    jax.effects_barrier()
    assert not calls and int(s.grad_evals) == 0 and int(s.count) == 3


def test_clear_errors_for_aux_and_masked_nodes():
  p, b = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(p, b)
  tx = sam_optax.sam(mlp_loss, has_aux=True)
  with pytest.raises(ValueError, match="has_aux=True: loss_fn must return"):
    tx.update(g, tx.init(p), p, batch=b)
  tx = sam_optax.sam(lambda p, b: (mlp_loss(p, b), {}))
  with pytest.raises(ValueError, match="pass has_aux=True"):
    tx.update(g, tx.init(p), p, batch=b)
  masked = optax.masked(
      sam_optax.sam(mlp_loss), {"l1": False, "l2": True}
  )
  with pytest.raises(ValueError, match="optax.masked or optax.multi_transform"):
    masked.init(p)
  # update refuses it too (a state made outside the mask, then masked).
  inner = sam_optax.sam(mlp_loss)
  masked_p = {"l1": optax.MaskedNode(), "l2": p["l2"]}
  with pytest.raises(ValueError, match="optax.masked or optax.multi_transform"):
    inner.update(g, inner.init(p), masked_p, batch=b)


def test_masked_is_refused_at_init_before_counts_are_checked():
  """Inside optax.masked a count such as layerwise_sam's num_layers would
  be checked against the unmasked leaves alone ('num_layers must be an
  integer in [1, 1]'): the masked message comes first, at init."""
  p = mlp_params()
  for tx in [sam_optax.layerwise_sam(mlp_loss, num_layers=2),
             sam_optax.lightsam(mlp_loss, 0.1),
             sam_optax.ssam_fisher(mlp_loss, update_every=2)]:
    masked = optax.masked(tx, {"l1": False, "l2": True})
    with pytest.raises(ValueError,
                       match="optax.masked or optax.multi_transform"):
      masked.init(p)


# --------------------------------------------------------------------------
# A non-finite step leaves the state (count and every part) as it was.
# --------------------------------------------------------------------------


def _poisoned_loss(p, b):
  """The transform's loss: NaN (and NaN gradients) when b[2] is set, which
  the caller's clean gradient (plain mlp_loss on b[:2]) never sees."""
  x, y, poison = b
  return mlp_loss(p, (x, y)) * jnp.where(jnp.mean(poison) > 0, jnp.nan, 1.0)


@pytest.mark.parametrize("name", sorted(__import__("tests.helpers", fromlist=["METHODS"]).METHODS))
def test_non_finite_step_leaves_part_states_unchanged(name):
  from tests import helpers as tm  # pylint: disable=g-import-not-at-top

  tx = tm.sam_transform(name, loss=_poisoned_loss)
  p = mlp_params()
  s = tx.init(p)

  @jax.jit
  def step(s, x, y, poison, g_scale):
    g = jax.grad(mlp_loss)(p, (x, y))
    g = jax.tree.map(lambda a: a * g_scale, g)
    return tx.update(g, s, p, batch=(x, y, poison))

  def sam_parts(state):
    st = find_state(state)
    return (st.geometry, st.region, st.gate, st.combine), st

  bs = tm.batches(n=8)
  clean = jnp.zeros(tm.BATCH)
  for b in bs[:3]:
    _, s = step(s, *b, clean, 1.0)
  nan_x = bs[3][0].at[0, 0].set(jnp.nan)
  for kind, args in {
      "gradient": (*bs[3], clean, jnp.inf),
      "batch": (nan_x, bs[3][1], clean, 1.0),
      "perturbed point": (*bs[3], jnp.ones(tm.BATCH), 1.0),
  }.items():
    out, s2 = step(s, *args)
    before, st = sam_parts(s)
    after, st2 = sam_parts(s2)
    if kind == "perturbed point" and int(st2.grad_evals) == int(st.grad_evals):
      continue  # a reuse step never evaluates the perturbed point
    for a, c in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
      a = jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
      c = jax.random.key_data(c) if jnp.issubdtype(c.dtype, jax.dtypes.prng_key) else c
      np.testing.assert_array_equal(a, c, err_msg=f"{name}: {kind}")
    assert int(st2.count) == int(st.count)  # as if it never happened
    carried = name not in tm.FULL_OPTIMIZERS  # LightSAM: the update's own rule
    if carried:
      # The output carries the non-finite value (apply_if_finite sees it).
      assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out)), kind
  # Then the run goes on, finite.
  _, s3 = step(s, *bs[4], clean, 1.0)
  assert all(
      bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(sam_parts(s3)[0])
      if jnp.issubdtype(x.dtype, jnp.floating)
  )


def test_ssam_fisher_under_inject_hyperparams_names_batch_axes():
  p, b = mlp_params(), make_batch()
  kw = dict(num_samples=4, update_every=2)
  with pytest.raises(ValueError, match="'batch_axes' in static_args"):
    optax.inject_hyperparams(
        sam_optax.ssam_fisher,
        static_args=("loss_fn", "num_samples", "update_every", "chunk_size"),
    )(mlp_loss, 0.05, 0.5, **kw).init(p)
  tx = optax.inject_hyperparams(
      sam_optax.ssam_fisher,
      static_args=("loss_fn", "num_samples", "update_every", "chunk_size",
                   "batch_axes"),
  )(mlp_loss, 0.05, 0.5, **kw)
  s = tx.init(p)
  g = jax.grad(mlp_loss)(p, b)
  out, s = jax.jit(lambda g, s: tx.update(g, s, p, batch=b))(g, s)
  ref, _ = sam_optax.ssam_fisher(mlp_loss, 0.05, 0.5, **kw).update(
      g, sam_optax.ssam_fisher(mlp_loss, 0.05, 0.5, **kw).init(p), p, batch=b
  )
  np.testing.assert_allclose(flat(out), flat(ref), rtol=1e-5, atol=1e-6)


def test_fisher_mask_is_the_same_for_huge_gradients():
  """Per-example gradients of 1e20 square to inf unscaled; the mask is
  scale-free: a loss times 2**66 gives the same mask as the loss."""
  p, b = mlp_params(), make_batch()
  masks = []
  for scale in (1.0, 2.0**66):
    loss = lambda q, x, s=scale: s * mlp_loss(q, x)  # noqa: E731
    tx = sam_optax.ssam_fisher(loss, 0.05, 0.5, num_samples=8, update_every=1)
    _, s = tx.update(jax.grad(loss)(p, b), tx.init(p), p, batch=b)
    masks.append(flat(s.region.mask))
  np.testing.assert_array_equal(masks[0], masks[1])
  assert 0 < masks[0].sum() < masks[0].size


def test_ssam_state_does_not_alias_the_users_mask():
  """A train step that donates its state must not delete the user's mask."""
  p, b = mlp_params(), make_batch()
  mask = jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)
  tx = sam_optax.ssam(mlp_loss, mask=mask)
  step = jax.jit(lambda s, g: tx.update(g, s, p, batch=b), donate_argnums=0)
  s = tx.init(p)
  for _ in range(2):
    _, s = step(s, jax.grad(mlp_loss)(p, b))
  assert all(bool(jnp.all(x)) for x in jax.tree.leaves(mask))  # still alive
  assert not any(x.is_deleted() for x in jax.tree.leaves(mask))


def test_eager_steps_take_their_branch_in_python_and_match_jit():
  """Without jit a decision is a concrete value: the engine runs the chosen
  branch in Python (no lax.cond traced anew each call), so a skipped step
  does not call loss_fn at all (a lax.cond would trace the computed branch,
  and so loss_fn, on every call); the results equal the jitted steps'."""
  from tests import helpers as tm  # pylint: disable=g-import-not-at-top

  calls = []

  def loss(p, b):
    calls.append(1)
    return mlp_loss(p, b)

  tx = sam_optax.looksam(loss, rho=0.1, k=2)
  p, b = mlp_params(), make_batch()
  s = tx.init(p)
  for _ in range(4):  # SAM steps 0 and 2, reuse steps 1 and 3
    _, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
  assert len(calls) == 2
  # Eager against jit, 6 steps: vSAM (the engine's and its window's
  # conditionals), a refreshed mask (the region's).
  for name in ["vsam", "ssam_dynamic"]:
    tx = tm.build(name)
    step = tm.train_step(tx)
    jstep = jax.jit(step)
    pe = pj = mlp_params()
    se = sj = tx.init(pe)
    for bt in tm.batches():
      pe, se = step(pe, se, bt)
      pj, sj = jstep(pj, sj, bt)
    for a, c in zip(jax.tree.leaves((pe, se)), jax.tree.leaves((pj, sj))):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, c = jax.random.key_data(a), jax.random.key_data(c)
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-5,
                                 atol=2e-6, err_msg=name)
