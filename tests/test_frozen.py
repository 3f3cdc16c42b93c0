"""Frozen parameters: ``trainable=`` for every method, and the recipe with
``optax.multi_transform`` after the SAM transform."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from tests import helpers as tm
from tests.helpers import flat, grad_np, make_batch, mlp_loss, mlp_params, unflat

HEAD_ONLY = {"l1": {"kernel": False, "bias": False},
             "l2": {"kernel": True, "bias": True}}


def _head_only_sam(params, batch, rho, eps=1e-12):
  """NumPy: SAM on the head only (the backbone a constant); the backbone's
  output is its clean gradient."""
  g = grad_np(params, batch)
  m = flat(jax.tree.map(lambda x, t: np.full(x.shape, t), params, HEAD_ONLY)) > 0
  gh = np.where(m, g, 0.0)
  e = rho * gh / (np.linalg.norm(gh) + eps)
  h = grad_np(unflat(flat(params) + e, params), batch)
  return np.where(m, h, g)


@pytest.mark.parametrize(
    "trainable", [HEAD_ONLY, lambda path: path.startswith("l2/")],
    ids=["tree", "predicate"],
)
def test_frozen_backbone_equals_hand_written_sam_on_the_head(trainable):
  p, b, rho = mlp_params(), make_batch(), 0.2
  tx = sam_optax.sam(mlp_loss, rho, trainable=trainable)
  g = jax.grad(mlp_loss)(p, b)
  out, _ = jax.jit(lambda g, s: tx.update(g, s, p, batch=b))(g, tx.init(p))
  want = _head_only_sam(p, b, rho)
  m = flat(jax.tree.map(lambda x, t: np.full(x.shape, t), p, HEAD_ONLY)) > 0
  np.testing.assert_allclose(flat(out)[m], want[m], rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(flat(out)[~m], 0.0)  # frozen: zero


def test_no_backward_pass_into_the_frozen_backbone():
  """The second gradient differentiates the head only: one dot_general in
  the backward of the perturbed pass, against SAM's three."""
  p, b = mlp_params(), make_batch()

  def dots(tx):
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, p, batch=b))(
        p, tx.init(p)
    )
    return str(jaxpr).count("dot_general")

  full = dots(sam_optax.sam(mlp_loss))
  frozen = dots(sam_optax.sam(mlp_loss, trainable=HEAD_ONLY))
  # forward: 2 dots; backward: d/dW2, d/dh (into the backbone), d/dW1.
  assert full == 5 and frozen == 3, (full, frozen)


@pytest.mark.parametrize("name", tm.ALL)
def test_every_method_freezes_with_a_plain_base_optimizer(name):
  """trainable= freezes: every method's output on frozen leaves is zero
  (LightSAM, a full optimizer, and every transform alike), so
  chain(method(trainable=mask), sgd) leaves them exactly as they were and
  trains the others."""
  sam_tx = tm.sam_transform(name, trainable=HEAD_ONLY)
  tx = (sam_tx if name in tm.FULL_OPTIMIZERS
        else optax.chain(sam_tx, optax.sgd(0.1)))
  p0 = mlp_params()

  @jax.jit
  def step(p, s, b):
    u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p, batch=b)
    return optax.apply_updates(p, u), s, u

  p, s = p0, tx.init(p0)
  for b in tm.batches(n=4):
    p, s, u = step(p, s, b)
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(u["l1"][leaf], 0.0)
  chex.assert_trees_all_equal(p["l1"], p0["l1"])
  assert not np.allclose(p["l2"]["kernel"], p0["l2"]["kernel"])
  st = sam_optax.stats(s)
  if "selected_layers" in st and name == "layerwise_sam":
    # indices into the trainable layers' paths: ["l2"] (l1 is frozen)
    assert st["selected_layers"].tolist() == [0]


def test_recipe_with_multi_transform_trains_the_head_only():
  p, b = mlp_params(), make_batch()
  labels = jax.tree.map(lambda t: "train" if t else "frozen", HEAD_ONLY)
  tx = optax.chain(
      sam_optax.sam(mlp_loss, 0.1, trainable=HEAD_ONLY),
      optax.multi_transform(
          {"train": optax.sgd(0.1), "frozen": optax.set_to_zero()}, labels
      ),
  )
  s = tx.init(p)
  q = p
  for _ in range(3):
    u, s = tx.update(jax.grad(mlp_loss)(q, b), s, q, batch=b)
    q = optax.apply_updates(q, u)
  np.testing.assert_array_equal(q["l1"]["kernel"], p["l1"]["kernel"])
  assert not np.allclose(q["l2"]["kernel"], p["l2"]["kernel"])


def test_trainable_errors():
  p = mlp_params()
  with pytest.raises(ValueError, match="trainable must be None, a predicate"):
    sam_optax.sam(mlp_loss, trainable={"l1": 1})
  with pytest.raises(ValueError, match="trainable does not match the structure"):
    sam_optax.sam(mlp_loss, trainable={"l1": True}).init(p)
  with pytest.raises(ValueError, match="trainable freezes every leaf"):
    sam_optax.sam(mlp_loss, trainable=lambda path: False).init(p)


# --------------------------------------------------------------------------
# The contract: the method on the trainable leaves equals the same method run
# on those leaves alone (a loss over them, the frozen leaves closed over).
# --------------------------------------------------------------------------


def mlp3_params(seed=0):
  """Three dense layers l1 (5->7), l2 (7->6), l3 (6->3), tanh between."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  shapes = {"l1": (5, 7), "l2": (7, 6), "l3": (6, 3)}
  return {
      name: {"kernel": jax.random.normal(ks[2 * i], shape) * 0.5,
             "bias": jax.random.normal(ks[2 * i + 1], shape[1:]) * 0.1}
      for i, (name, shape) in enumerate(shapes.items())
  }


def mlp3_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  h = jnp.tanh(h @ params["l2"]["kernel"] + params["l2"]["bias"])
  out = h @ params["l3"]["kernel"] + params["l3"]["bias"]
  return jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


BODY_FROZEN = {"l1": {"kernel": False, "bias": False},
               "l2": {"kernel": True, "bias": True},
               "l3": {"kernel": True, "bias": True}}
# A user's fixed element-wise mask, given with the structure of the params.
MASK3 = jax.tree.map(
    lambda x: np.random.default_rng(x.size).random(x.shape) < 0.5,
    mlp3_params(),
)

# Every method and variant the library offers (the registry's short-run
# settings), the layer-wise selections and a fixed mask included.
CONTRACT = {
    **{name: tm.METHODS[name] for name in tm.ALL if name != "ssam_mask"},
    "layerwise_sam_two": ("layerwise_sam", {"rho": 0.1, "num_layers": 2}),
    "layerwise_sam_fixed_all": (
        "layerwise_sam", {"rho": 0.1, "layers": ("l2", "l3"),
                          "normalize": "selection", "second": "all"}),
    "ssam_mask": ("ssam", {"rho": 0.05, "mask": MASK3}),
}


def _alone(tree):
  """The trainable leaves of a tree shaped like mlp3_params: l2 and l3."""
  return {k: tree[k] for k in ("l2", "l3")}


def _run(name, loss, params, frozen_params, trainable, steps):
  """(outputs, states) of `steps` jitted updates, each followed by an SGD
  step on the leaves that train (frozen leaves stay as they are)."""
  ctor, kw = CONTRACT[name]
  kw = dict(kw)
  if "mask" in kw and trainable is None:
    kw["mask"] = _alone(kw["mask"])
  tx = getattr(sam_optax, ctor)(loss, **kw, trainable=trainable)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  outs, states, p = [], [], params
  for b in tm.batches(n=steps):
    g = jax.grad(loss)(p, b)
    out, state = step(g, state, p, b)
    outs.append(out)
    states.append(state)
    if ctor == "lightsam":  # the output is the parameter update
      new = optax.apply_updates(p, out)
    else:
      new = jax.tree.map(lambda w, u: w - 0.05 * u, p, out)
    p = new if frozen_params is None else {**new, **frozen_params}
  return outs, states


def _assert_stats_equal(got, want, err):
  assert sorted(got) == sorted(want), err
  for k in want:
    g, w = np.asarray(got[k]), np.asarray(want[k])
    if np.issubdtype(w.dtype, np.floating):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=f"{err} {k}")
    else:
      np.testing.assert_array_equal(g, w, err_msg=f"{err} {k}")


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_trainable_equals_the_method_on_the_trainable_leaves_alone(name):
  """Eight steps of every method with l1 frozen: on l2 and l3 the output,
  every statistic and every state array equal the method run on
  {l2, l3} alone (l1 closed over in the loss); l1 gets a zero output
  (every method, LightSAM included)."""
  p = mlp3_params()
  frozen = {"l1": p["l1"]}
  alone_loss = lambda q, b: mlp3_loss({**q, **frozen}, b)  # noqa: E731
  outs, states = _run(name, mlp3_loss, p, frozen, BODY_FROZEN, 8)
  want_outs, want_states = _run(name, alone_loss, _alone(p), None, None, 8)
  ctor = CONTRACT[name][0]
  q = p
  for i, (out, state, want, want_state) in enumerate(
      zip(outs, states, want_outs, want_states)):
    err = f"{name} step {i}"
    for k in ("l2", "l3"):
      tm_close = dict(rtol=2e-5, atol=1e-6, err_msg=f"{err} {k}")
      np.testing.assert_allclose(flat(out[k]), flat(want[k]), **tm_close)
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(out["l1"][leaf], 0.0, err_msg=err)
    _assert_stats_equal(sam_optax.stats(state), sam_optax.stats(want_state), err)
    got_leaves, want_leaves = jax.tree.leaves(state), jax.tree.leaves(want_state)
    assert len(got_leaves) == len(want_leaves), err
    for a, b in zip(got_leaves, want_leaves):
      if jnp.issubdtype(b.dtype, jnp.floating):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=err)
      else:
        np.testing.assert_array_equal(a, b, err_msg=err)
    upd = (optax.apply_updates(q, out) if ctor == "lightsam"
           else jax.tree.map(lambda w, u: w - 0.05 * u, q, out))
    q = {**upd, **frozen}


# --------------------------------------------------------------------------
# The cases, with numbers computed independently.
# --------------------------------------------------------------------------


def _quad_loss(params, batch):
  """mean_i ½‖w - x_i‖² over every leaf: ∇L(w + e) - ∇L(w) = e exactly, so
  the perturbation is read off the output of Sparse SAM (out = ∇L(w + e))."""
  total = 0.0
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = batch[jax.tree_util.keystr(path)]
    total = total + 0.5 * jnp.mean(jnp.sum((w[None] - x) ** 2,
                                           axis=tuple(range(1, x.ndim))))
  return total


def _quad_problem(seed=0):
  """A frozen body of 60 entries and a trainable head of 12 whose entries
  are 10x larger (they would win any global top-k over all entries)."""
  rng = np.random.default_rng(seed)
  p = {"body": {"kernel": rng.standard_normal((6, 10)).astype(np.float32)},
       "head": {"kernel": 10 * rng.standard_normal((3, 3)).astype(np.float32),
                "bias": 10 * rng.standard_normal(3).astype(np.float32)}}
  p = jax.tree.map(jnp.asarray, p)

  def batch(i):
    r = np.random.default_rng(100 + i)
    return {jax.tree_util.keystr(path): jnp.asarray(
        0.1 * r.standard_normal((8,) + w.shape), jnp.float32)
        for path, w in jax.tree_util.tree_flatten_with_path(p)[0]}

  trainable = {"body": {"kernel": False},
               "head": {"kernel": True, "bias": True}}
  return p, batch, trainable


@pytest.mark.parametrize("ctor,kw", [
    ("ssam_fisher", {"num_samples": 4, "update_every": 1}),
    ("ssam_dynamic", {"update_every": 2, "total_steps": 6, "seed": 1}),
], ids=["fisher", "dynamic"])
def test_sparse_mask_counts_trainable_entries_only(ctor, kw):
  """sparsity=0.5 with a trainable head of 12 entries: every step perturbs
  exactly floor(0.5 * 12) = 6 of them (read off the output: e = out - g),
  none of the body, and stats() reports mask_density 6 / 12 = 0.5."""
  p, batch, trainable = _quad_problem()
  tx = getattr(sam_optax, ctor)(_quad_loss, rho=0.5, sparsity=0.5, **kw,
                                trainable=trainable)
  state = tx.init(p)
  step = jax.jit(lambda g, s, b: tx.update(g, s, p, batch=b))
  n_head = 12
  for i in range(6):
    b = batch(i)
    g = jax.grad(_quad_loss)(p, b)
    out, state = step(g, state, b)
    e = jax.tree.map(lambda o, x: np.asarray(o) - np.asarray(x), out, g)
    assert np.count_nonzero(flat(e["head"])) == n_head // 2, (ctor, i)
    assert np.count_nonzero(flat(out["body"])) == 0, (ctor, i)  # frozen
    assert float(sam_optax.stats(state)["mask_density"]) == 0.5, (ctor, i)


def test_fisher_refresh_does_not_differentiate_frozen_leaves():
  """The frozen l1 kernel passes through an identity whose backward rule
  records every time it is traced: tracing the update (a Fisher refresh
  at step 0, the second gradient) must never differentiate it."""
  seen = []

  @jax.custom_vjp
  def tap(w):
    return w

  def tap_fwd(w):
    return w, None

  def tap_bwd(_, ct):
    seen.append(1)
    return (ct,)

  tap.defvjp(tap_fwd, tap_bwd)

  def loss(params, batch):
    params = {**params, "l1": {**params["l1"],
                               "kernel": tap(params["l1"]["kernel"])}}
    return mlp_loss(params, batch)

  p, b = mlp_params(), make_batch()
  g = jax.grad(mlp_loss)(p, b)
  for name in ("ssam_fisher", "sam", "looksam", "vsam", "layerwise_sam"):
    tx = tm.sam_transform(name, loss=loss, trainable=HEAD_ONLY)
    seen.clear()
    jax.make_jaxpr(lambda g, s: tx.update(g, s, p, batch=b))(g, tx.init(p))
    assert not seen, name
  # The tap works: differentiating the whole loss does trace it.
  jax.make_jaxpr(jax.grad(loss))(p, b)
  assert seen


def _layerwise_reference(params, batch, rho, alpha, selected, trainable_layers):
  """Layer-wise SAM by hand: e = rho g_S / ‖g over the trainable layers‖,
  out_S = (1 - alpha) g_S + alpha ∇_S L(w + e), g elsewhere."""
  g = jax.grad(mlp3_loss)(params, batch)
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                     for k in trainable_layers for x in jax.tree.leaves(g[k])))
  w = {k: (jax.tree.map(lambda a, d: a + rho * d / norm, v, g[k])
           if k in selected else v) for k, v in params.items()}
  h = jax.grad(mlp3_loss)(w, batch)
  return {k: (jax.tree.map(lambda a, c: (1 - alpha) * a + alpha * c, g[k], h[k])
              if k in selected else g[k]) for k in params}


@pytest.mark.parametrize("num_layers,selected", [(1, ["l2"]), (2, ["l1", "l2"])])
def test_layerwise_output_side_selects_among_trainable_layers(num_layers,
                                                              selected):
  """A frozen head (l3) with the default output-side selection: the
  selection is the trainable layers nearest the loss (l2; then l1), not the
  frozen head, and the output is layer-wise SAM on them."""
  p, b = mlp3_params(), tm.batches(n=1)[0]
  head_frozen = {"l1": {"kernel": True, "bias": True},
                 "l2": {"kernel": True, "bias": True},
                 "l3": {"kernel": False, "bias": False}}
  tx = sam_optax.layerwise_sam(mlp3_loss, 0.1, 0.8, num_layers=num_layers,
                               trainable=head_frozen)
  g = jax.grad(mlp3_loss)(p, b)
  out, state = jax.jit(lambda g, s: tx.update(g, s, p, batch=b))(g, tx.init(p))
  want = _layerwise_reference(p, b, 0.1, 0.8, selected, ["l1", "l2"])
  want["l3"] = jax.tree.map(np.zeros_like, want["l3"])  # frozen: zero
  np.testing.assert_allclose(flat(out), flat(want), rtol=2e-5, atol=1e-6)
  assert not np.allclose(flat(out["l2"]), flat(g["l2"]))  # perturbed
  # indices into the trainable layers ["l1", "l2"]
  idx = {"l1": 0, "l2": 1}
  assert (sam_optax.stats(state)["selected_layers"].tolist()
          == [idx[k] for k in selected])


@pytest.mark.parametrize("kw,match", [
    ({"layers": "l1"}, r"layers: 'l1' names no layer.*trainable="),
    ({"layers": lambda name: name == "l1"}, r"layers.*trainable="),
    ({"num_layers": 2}, r"num_layers.*trainable="),
    ({"num_layers": 2, "select_by": "gradient"}, r"num_layers.*trainable="),
])
def test_layer_settings_naming_frozen_layers_fail_at_init(kw, match):
  tx = sam_optax.layerwise_sam(mlp_loss, trainable=HEAD_ONLY, **kw)
  with pytest.raises(ValueError, match=match):
    tx.init(mlp_params())
  # The same settings are valid on the full params.
  sam_optax.layerwise_sam(mlp_loss, **kw).init(mlp_params())


def test_stat_leaves_naming_frozen_leaves_fail_at_init():
  tx = sam_optax.vsam(mlp_loss, stat_leaves=("l1",), trainable=HEAD_ONLY)
  with pytest.raises(ValueError, match=r"stat_leaves.*trainable="):
    tx.init(mlp_params())


def test_fixed_mask_of_another_structure_fails_at_init():
  mask = {"l1": {"kernel": True, "bias": True}}
  tx = sam_optax.ssam(mlp_loss, mask=mask, trainable=HEAD_ONLY)
  with pytest.raises(ValueError, match="mask does not match the structure"):
    tx.init(mlp_params())


PLANNED = ["looksam", "vsam", "ssam_fisher", "ssam_dynamic",
           "layerwise_sam_runtime", "layerwise_sam_sharpness"]


def _trainable_run(name, *, planned=False, pmapped=False):
  """Params and state after 6 steps of SGD after the method with l1 frozen;
  planned or not, on one device or pmapped over 8 (axis_name="d", the
  batch split over devices)."""
  ctor, kw = CONTRACT[name]
  axis = "d" if pmapped else None
  sam_tx = getattr(sam_optax, ctor)(mlp3_loss, **kw, trainable=BODY_FROZEN,
                                     axis_name=axis)
  tx = optax.chain(sam_tx, optax.sgd(0.05))
  plan_of = sam_optax.planner(sam_tx)

  def step(p, s, b, plan):
    g = jax.grad(mlp3_loss)(p, b)
    if pmapped:
      g = jax.lax.pmean(g, "d")
    u, s = tx.update(g, s, p, batch=b, plan=plan)
    return optax.apply_updates(p, u), s

  if pmapped:
    step = jax.pmap(step, axis_name="d", static_broadcasted_argnums=(3,))
  else:
    step = jax.jit(step, static_argnums=(3,))
  p = mlp3_params()
  s = tx.init(p)
  if pmapped:
    p, s = tm.replicate(p), tm.replicate(s)
  for count, b in enumerate(tm.batches(n=6)):
    plan = plan_of(count, s) if planned else None
    p, s = step(p, s, tm.shard(b) if pmapped else b, plan)
  if pmapped:
    tm.tree_rows_equal(s)
    p, s = jax.tree.map(lambda x: x[0], (p, s))
  return p, s


def _keys_as_data(tree):
  return jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


@pytest.mark.parametrize("name", PLANNED)
def test_trainable_planned_equals_unplanned(name):
  """The planner reads the parts' states on the trainable sub-tree (a
  runtime layer selection indexes the trainable layers) and takes the
  same decisions as the unplanned step."""
  p0, s0 = _trainable_run(name)
  p1, s1 = _trainable_run(name, planned=True)
  chex.assert_trees_all_close(p1, p0, rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(_keys_as_data(s1), _keys_as_data(s0),
                              rtol=2e-5, atol=2e-6)


@tm.needs8
@pytest.mark.parametrize("name", ["ssam_fisher", "layerwise_sam_runtime"])
def test_trainable_under_pmap_matches_one_device(name):
  """axis_name with trainable=: every device keeps the same sub-tree state,
  equal to the one-device run on the whole batch."""
  p0, s0 = _trainable_run(name)
  p1, s1 = _trainable_run(name, planned=True, pmapped=True)
  chex.assert_trees_all_close(p1, p0, rtol=1e-4, atol=1e-5)
  _assert_stats_equal(sam_optax.stats(s1), sam_optax.stats(s0), name)
