"""Issue 19: error messages in the user's terms, and LightSAM's freezing
recipe as its docstring gives it."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests.helpers import make_batch, mlp_loss, mlp_params


def _labels(params):
  return {k: jax.tree.map(lambda _: "train" if k == "l2" else "frozen", v)
          for k, v in params.items()}


def test_masked_error_names_trainable():
  params = mlp_params()
  tx = optax.multi_transform(
      {"train": optax.chain(sam_optax.sam(mlp_loss), optax.sgd(0.1)),
       "frozen": optax.set_to_zero()},
      _labels(params),
  )
  with pytest.raises(ValueError, match=r"MaskedNode.*pass trainable= to it"):
    tx.init(params)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "returned, has_aux, message",
    [
        (lambda l: (l, 1.0, 2.0), True,
         r"must return a pair \(loss, aux\), got a tuple of 3"),
        (lambda l: l, True,
         r"must return a pair \(loss, aux\), got a scalar array"),
        (lambda l: jnp.stack([l, l]), True, r"got an array of shape \(2,\)"),
        (lambda l: {"loss": l}, True, r"got a dict with keys \['loss'\]"),
        (lambda l: [l, l, l], False, r"returned a list of 3: pass has_aux=True"),
        (lambda l: jnp.stack([l, l]), False,
         r"must return a scalar loss, got an array of shape \(2,\)"),
    ],
    ids=["tuple3", "scalar", "array", "dict", "list3", "vector"],
)
def test_loss_output_errors_describe_what_was_returned(returned, has_aux,
                                                       message, jit):
  """The message names what loss_fn returned, not a tracer's type (it was
  'got JVPTracer' / 'DynamicJaxprTracer')."""
  params, batch = mlp_params(), make_batch()
  bad = lambda p, b: returned(mlp_loss(p, b))  # noqa: E731
  tx = sam_optax.sam(bad, has_aux=has_aux)
  g = jax.grad(mlp_loss)(params, batch)
  update = lambda g, s, p, b: tx.update(g, s, p, batch=b)  # noqa: E731
  if jit:
    update = jax.jit(update)
  with pytest.raises(ValueError, match=message) as info:
    update(g, tx.init(params), params, batch)
  assert "Tracer" not in str(info.value)


def test_lightsam_docstring_does_not_recommend_multi_transform():
  doc = sam_optax.lightsam.__doc__
  section = " ".join(doc[doc.index("    trainable:"):doc.index("  Returns:")]
                     .split())
  # the only mention of masked / multi_transform says they cannot be used;
  # the recipe (trainable= alone) is the one tested below
  assert "multi_transform" not in section.replace(
      "cannot go inside ``optax.masked`` or ``optax.multi_transform``", ""
  )
  assert "Frozen leaves get a zero update" in section


def test_lightsam_inside_multi_transform_raises_naming_trainable():
  params = mlp_params()
  tx = optax.multi_transform(
      {"train": sam_optax.lightsam(mlp_loss, 0.1),
       "frozen": optax.set_to_zero()},
      _labels(params),
  )
  with pytest.raises(ValueError, match="trainable="):
    tx.init(params)


@pytest.mark.parametrize("variant", ["adagrad_norm", "adagrad", "adam"])
def test_lightsam_freezing_recipe_of_its_docstring(variant):
  """The docstring's recipe: trainable= alone. Frozen leaves stay exactly
  as they were, and the trained leaf follows LightSAM run on that leaf
  alone (the loss with the frozen leaves closed over)."""
  params = mlp_params()
  tx = sam_optax.lightsam(mlp_loss, 0.1, variant=variant,
                          trainable=lambda path: path.startswith("l2/"))
  alone_loss = lambda q, b: mlp_loss({"l1": params["l1"], "l2": q}, b)  # noqa
  alone = sam_optax.lightsam(alone_loss, 0.1, variant=variant)
  p, q = params, params["l2"]
  s, s_alone = tx.init(p), alone.init(q)
  for t in range(4):
    b = make_batch(seed=10 + t)
    u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
    p = optax.apply_updates(p, u)
    u2, s_alone = alone.update(jax.grad(alone_loss)(q, b), s_alone, q,
                               batch=b)
    q = optax.apply_updates(q, u2)
  for a, b in zip(jax.tree.leaves(p["l1"]), jax.tree.leaves(params["l1"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(p["l2"]), jax.tree.leaves(q)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _stats_loss(params, batch):
  """A model whose batch carries 8 statistics (not per example), one per
  input feature."""
  x, y, stats = batch["x"], batch["y"], batch["stats"]
  return jnp.mean(((x @ jnp.diag(stats) @ params["w"]) - y) ** 2)


_FIXED = {"x": 0, "y": 0, "stats": None}


@pytest.mark.parametrize("make", [
    lambda **kw: sam_optax.sam(_stats_loss, num_splits=2, **kw),
    lambda **kw: sam_optax.ssam_fisher(_stats_loss, num_samples=2,
                                       update_every=1, **kw),
], ids=["num_splits", "fisher"])
def test_a_sliced_leaf_that_is_not_per_example_names_batch_axes(make):
  """The batch size equals the statistics' length, so the default
  batch_axes=0 slices the statistics too and the model fails with a shape
  error of its own: the error carries a note that says what was sliced and
  how to mark the leaf None; marked None, the same step runs."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((8, 1)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal((8, 1)), jnp.float32),
           "stats": jnp.asarray(rng.standard_normal(8), jnp.float32)}
  g = jax.grad(_stats_loss)(params, batch)
  tx = make()
  with pytest.raises(Exception) as info:
    tx.update(g, tx.init(params), params, batch=batch)
  notes = "".join(getattr(info.value, "__notes__", []))
  assert "must be marked None" in notes, (info.value, notes)
  assert "batch_axes={'x': 0, 'y': 0, 'state': None}" in notes
  tx = make(batch_axes=_FIXED)
  out, _ = tx.update(g, tx.init(params), params, batch=batch)
  assert np.all(np.isfinite(out["w"]))


@pytest.mark.parametrize("make,purpose", [
    (lambda **kw: sam_optax.sam(_stats_loss, num_splits=2, **kw),
     "num_splits sub-batches"),
    (lambda **kw: sam_optax.ssam_fisher(_stats_loss, num_samples=2,
                                        update_every=1, **kw),
     "per-example gradients"),
], ids=["num_splits", "fisher"])
def test_scalar_batch_leaves_are_named(make, purpose):
  """A scalar deep in the batch (an RNG counter in a model's state): the
  error lists its path (it said only "a batch leaf")."""
  params = {"w": jnp.ones((8, 1))}
  batch = {"x": jnp.ones((4, 8)), "y": jnp.ones((4, 1)),
           "stats": jnp.ones(8), "state": {"rngs": {"count": jnp.uint32(3)}}}
  loss = lambda p, b: _stats_loss(p, b) + 0.0 * b["state"]["rngs"]["count"]  # noqa: E731
  tx = make(batch_axes={"x": 0, "y": 0, "stats": None, "state": 0})
  g = jax.grad(loss)(params, batch)
  with pytest.raises(ValueError, match=(
      purpose + r" slice every batch leaf marked 0 in batch_axes \(every "
      r"leaf by default\), but these are scalars: \['state/rngs/count'\]; "
      r"mark them None")):
    tx.update(g, tx.init(params), params, batch=batch, loss_fn=loss)


def test_python_float_leaf_is_refused_at_init():
  params = {"s": 1.5, "w": jnp.ones(3)}
  for tx in [sam_optax.sam(mlp_loss), sam_optax.asam(mlp_loss),
             sam_optax.lightsam(mlp_loss, 0.1)]:
    with pytest.raises(ValueError, match=r"Python floats.*'s' \(1.5\)|s \(1.5\)"):
      tx.init(params)


@pytest.mark.parametrize("name", ["sam", "layerwise_sam", "looksam"])
def test_params_are_checked_again_at_update(name):
  """A state made from float params, then an int leaf at update: the
  library's message naming the leaf (layerwise_sam used to return an int32
  output leaf; the others raised jax.grad's TypeError)."""
  params = mlp_params()
  tx = getattr(sam_optax, name)(mlp_loss)
  state = tx.init(params)
  bad = {**params, "l2": {**params["l2"], "bias": jnp.ones(3, jnp.int32)}}
  g = jax.grad(mlp_loss)(params, make_batch())
  with pytest.raises(ValueError, match=r"not floating point.*l2/bias \(int32\)"):
    tx.update(g, state, bad, batch=make_batch())


@pytest.mark.parametrize("saved, resumed, where", [
    (lambda: sam_optax.layerwise_sam(mlp_loss, num_layers=2),
     lambda: sam_optax.layerwise_sam(mlp_loss, num_layers=1),
     r"region.selected it holds int32\[2\].*makes int32\[1\]"),
    (lambda: sam_optax.vsam(mlp_loss, window=10),
     lambda: sam_optax.vsam(mlp_loss, window=20),
     r"gate.pattern it holds bool\[10\].*makes bool\[20\]"),
    (lambda: sam_optax.lightsam(mlp_loss, 0.1, variant="adagrad_norm"),
     lambda: sam_optax.lightsam(mlp_loss, 0.1, variant="adam"),
     r"its structure is"),
    (lambda: sam_optax.sam(mlp_loss), lambda: sam_optax.looksam(mlp_loss),
     r"its structure is"),
])
def test_a_state_from_other_settings_is_refused(saved, resumed, where):
  """A checkpoint restored into a transform with other settings: refused
  at the first update with the place that differs (it ran with the saved
  arrays, or failed later with a broadcasting or attribute error)."""
  params, batch = mlp_params(), make_batch()
  state = jax.tree.map(np.asarray, saved().init(params))
  tx = resumed()
  g = jax.grad(mlp_loss)(params, batch)
  with pytest.raises(ValueError, match=r"opt_state does not fit this "
                     r"transform: .*" + where):
    tx.update(g, state, params, batch=batch)
  with pytest.raises(ValueError, match=r"opt_state does not fit"):
    jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(g, state)


def test_a_state_restored_without_a_template_says_so():
  """orbax restores a state without a template as dicts and lists (its
  NamedTuples lost): the error says to restore into tx.init(params)."""
  params, batch = mlp_params(), make_batch()
  tx = sam_optax.looksam(mlp_loss)

  def untyped(x):  # what a template-free restore returns
    if isinstance(x, tuple) and hasattr(x, "_fields"):
      return {f: untyped(v) for f, v in zip(x._fields, x)}
    if isinstance(x, (tuple, list)):
      return [untyped(v) for v in x]
    if isinstance(x, dict):
      return {k: untyped(v) for k, v in x.items()}
    return np.asarray(x)

  state = untyped(tx.init(params))
  with pytest.raises(ValueError, match=(
      r"its structure is .*restored without a template.*restore it with "
      r"tx.init\(params\) as the template")):
    tx.update(jax.grad(mlp_loss)(params, batch), state, params, batch=batch)


def test_fixed_layers_report_their_own_selection_after_a_resume():
  """layers='l1' saved, layers='l2' resumed (same state shapes): the step
  perturbs l2 and, from that step on, stats() says so."""
  params, batch = mlp_params(), make_batch()
  state = sam_optax.layerwise_sam(mlp_loss, layers="l1").init(params)
  tx = sam_optax.layerwise_sam(mlp_loss, layers="l2")
  g = jax.grad(mlp_loss)(params, batch)
  out, state = tx.update(g, state, params, batch=batch)
  assert np.asarray(sam_optax.stats(state)["selected_layers"]).tolist() == [1]
  chex.assert_trees_all_equal(out["l1"], g["l1"])  # l1 not perturbed


@pytest.mark.parametrize("make, name", [
    (lambda: sam_optax.gnp(mlp_loss, alpha=lambda c: jnp.full((1,), 0.8)), "alpha"),
    (lambda: sam_optax.sam(mlp_loss, rho=lambda c: jnp.full((1,), 0.05)), "rho"),
    (lambda: sam_optax.asam(mlp_loss, eta=lambda c: jnp.full((1,), 0.01)), "eta"),
    (lambda: sam_optax.wsam(mlp_loss, gamma=lambda c: jnp.full((1,), 0.9)), "gamma"),
])
def test_a_hyperparameter_value_that_is_not_a_scalar_is_refused(make, name):
  """A schedule (or injected value) of shape (1,) broadcast into the update:
  a scalar leaf's update became shape (1,) and apply_updates changed the
  parameter's shape, or an unrelated error came from deep inside. Refused
  when the step is traced, naming the hyperparameter, under jit too."""
  params = {**mlp_params(), "s": jnp.float32(0.5)}
  loss = lambda p, b: mlp_loss({k: p[k] for k in ("l1", "l2")}, b) + p["s"] ** 2  # noqa: E731
  batch = make_batch()
  tx = make()
  state = tx.init(params)
  g = jax.grad(loss)(params, batch)
  match = rf"{name} must be a scalar at every step: .*shape \(1,\)"
  with pytest.raises(ValueError, match=match):
    jax.jit(lambda g, s: tx.update(g, s, params, batch=batch,
                                   loss_fn=loss))(g, state)


def test_an_injected_value_that_is_not_a_scalar_is_refused():
  """optax.inject_hyperparams: a shape-(1,) value set between steps (the
  construction check saw a scalar)."""
  params, batch = mlp_params(), make_batch()
  tx = optax.inject_hyperparams(sam_optax.gnp, static_args=("loss_fn",))(
      mlp_loss, alpha=0.8)
  state = tx.init(params)
  state.hyperparams["alpha"] = jnp.full((1,), 0.8)
  g = jax.grad(mlp_loss)(params, batch)
  with pytest.raises(ValueError, match=r"alpha must be a scalar at every step"):
    jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(g, state)
