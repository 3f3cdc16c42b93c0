"""Issue 19: layer grouping, layer names, and the output side's tracing.

Expectations are hand-written groupings of small trees, and the GNP rule
restricted to a hand-chosen set of leaves computed with plain ``jax.grad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax
from sam_optax._src import layers as layers_lib
from tests.helpers import METHODS, make_batch, mlp_loss, mlp_params


def _groups(params, **kw):
  """{layer name: sorted '/'-joined leaf paths}, from the library."""
  names, ids = layers_lib.leaf_layers(params, kw.get("group_fn"))
  paths = [jax.tree_util.keystr(p, simple=True, separator="/")
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out = {n: [] for n in names}
  for i, p in zip(ids, paths):
    out[names[i]].append(p)
  return out


# --------------------------------------------------------------------------
# A leaf directly under the root is its own layer.
# --------------------------------------------------------------------------


def _flat_params():
  rng = np.random.default_rng(0)
  return {
      "w1": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
      "w2": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32),
      "w3": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
  }


def _flat_loss(p, b):
  h = jnp.tanh(b[0] @ p["w1"])
  h = jnp.tanh(h @ p["w2"])
  return jnp.mean((h @ p["w3"] - b[1]) ** 2)


def _flat_batch():
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
          jnp.asarray(rng.standard_normal((8, 2)), jnp.float32))


def test_flat_dict_of_weights_is_one_layer_per_leaf():
  p = _flat_params()
  assert _groups(p) == {"w1": ["w1"], "w2": ["w2"], "w3": ["w3"]}
  assert sam_optax.layer_paths(p) == ["w1", "w2", "w3"]
  assert _groups([jnp.ones(1), jnp.ones(2)]) == {"0": ["0"], "1": ["1"]}
  # a leaf under the root beside a module; a nested mapping still groups
  mixed = {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)},
           "scale": jnp.ones(2),
           "block": {"inner": {"kernel": jnp.ones(1)}, "gain": jnp.ones(1)}}
  assert _groups(mixed) == {
      "block": ["block/gain"], "block/inner": ["block/inner/kernel"],
      "dense": ["dense/bias", "dense/kernel"], "scale": ["scale"],
  }


def _gnp_on(params, batch, chosen, rho=0.1, alpha=0.8, eps=1e-12):
  """GNP restricted to the leaves ``chosen``, ``e`` over the whole gradient
  (layerwise_sam's default normalize="global"), by plain jax.grad."""
  g = jax.grad(_flat_loss)(params, batch)
  norm = np.sqrt(sum(np.sum(np.float64(x) ** 2) for x in jax.tree.leaves(g)))
  pert = {k: v + (rho * g[k] / (norm + eps) if k in chosen else 0.0)
          for k, v in params.items()}
  h = jax.grad(_flat_loss)(pert, batch)
  return {k: (1 - alpha) * g[k] + alpha * h[k] if k in chosen else g[k]
          for k in params}


def test_flat_dict_num_layers_two_selects_two_weights():
  """Was refused (one layer); now the default output side is w2 and w3."""
  p, b = _flat_params(), _flat_batch()
  tx = sam_optax.layerwise_sam(_flat_loss, num_layers=2)
  out, st = tx.update(jax.grad(_flat_loss)(p, b), tx.init(p), p, batch=b)
  assert sam_optax.stats(st)["selected_layers"].tolist() == [1, 2]
  want = _gnp_on(p, b, {"w2", "w3"})
  for k in p:
    np.testing.assert_allclose(out[k], want[k], rtol=2e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Keys containing "/".
# --------------------------------------------------------------------------


def test_key_with_slash_does_not_merge_two_modules():
  k = jnp.ones(2)
  # "enc/dense" is one key; "enc" -> "dense" two: both join to "enc/dense"
  clash = {"enc/dense": {"kernel": k}, "enc": {"dense": {"kernel": k}}}
  with pytest.raises(ValueError, match=r"two layers named 'enc/dense'"):
    sam_optax.layer_paths(clash)
  with pytest.raises(ValueError, match=r"two layers named 'enc/dense'"):
    sam_optax.layerwise_sam(lambda p, b: 0.0, num_layers=1).init(clash)
  # grouped on keys: each module its own layer, even when names differ
  # only by where the '/' sits
  two = {"a/b": {"c": {"kernel": k}}, "a": {"b/c": {"kernel": k}}}
  with pytest.raises(ValueError, match=r"two layers named 'a/b/c'"):
    sam_optax.layer_paths(two)
  fine = {"enc/dense": {"kernel": k, "bias": k}, "head": {"kernel": k}}
  assert _groups(fine) == {
      "enc/dense": ["enc/dense/bias", "enc/dense/kernel"],
      "head": ["head/kernel"],
  }


def test_suffix_matching_stops_at_key_boundaries():
  k = jnp.ones(2)
  params = {"enc/dense": {"kernel": k}, "dense": {"kernel": k}}
  names = sam_optax.layer_paths(params)
  assert names == ["dense", "enc/dense"]  # jax.tree order: sorted keys
  # "dense" is the layer "dense" only: "enc/dense" is one key, no suffix
  assert _selected(params, "dense") == ["dense"]
  assert _selected(params, "enc/dense") == ["enc/dense"]
  nested = {"model": {"enc": {"dense": {"kernel": k}}}}
  assert _selected(nested, "enc/dense") == ["model/enc/dense"]
  assert _selected(nested, "dense") == ["model/enc/dense"]
  with pytest.raises(ValueError, match="names no layer"):
    _selected(nested, "c/dense")  # not a key-boundary suffix of "enc/dense"


def _selected(params, layers):
  tx = sam_optax.layerwise_sam(lambda p, b: 0.0, layers=layers)
  state = tx.init(params)
  names = sam_optax.layer_paths(params)
  return [names[i] for i in sam_optax.stats(state)["selected_layers"].tolist()]


# --------------------------------------------------------------------------
# An ambiguous name is an error, exact or not.
# --------------------------------------------------------------------------


def test_ambiguous_name_raises_even_with_an_exact_match():
  k = jnp.ones(2)
  params = {"Dense_0": {"kernel": k}, "ScanBlock_0": {"Dense_0": {"kernel": k}}}
  with pytest.raises(
      ValueError,
      match=r"'Dense_0' matches several layers \['Dense_0', "
      r"'ScanBlock_0/Dense_0'\].*lambda path: path == 'Dense_0'",
  ):
    _selected(params, "Dense_0")
  assert _selected(params, "ScanBlock_0/Dense_0") == ["ScanBlock_0/Dense_0"]
  # the message's way out: a predicate
  assert _selected(params, lambda path: path == "Dense_0") == ["Dense_0"]


# --------------------------------------------------------------------------
# The output side with static (non-array) batch leaves.
# --------------------------------------------------------------------------


def _flag_loss(p, b):
  loss = mlp_loss(p, b["xy"])
  if b["train"]:  # a Python bool: branches in Python
    loss = loss * b["weight"]
  if b["name"] != "digits":  # a string
    raise AssertionError(b["name"])
  return loss


def test_output_side_with_a_bool_flag_and_a_string_in_the_batch():
  """Was TracerBoolConversionError / a dtype error: the loss was traced on
  abstract versions of every batch leaf. Expectation: the same selection
  and output as for the loss without the flags (SAM handles them too)."""
  p = mlp_params()
  xy = make_batch()
  batch = {"xy": xy, "train": True, "weight": 1.0, "name": "digits"}
  tx = sam_optax.layerwise_sam(_flag_loss, num_layers=1)
  ref = sam_optax.layerwise_sam(mlp_loss, num_layers=1)
  out, st = tx.update(jax.grad(_flag_loss)(p, batch), tx.init(p), p,
                      batch=batch)
  want, st_ref = ref.update(jax.grad(mlp_loss)(p, xy), ref.init(p), p,
                            batch=xy)
  assert sam_optax.stats(st)["selected_layers"].tolist() == [1]
  assert sam_optax.stats(st_ref)["selected_layers"].tolist() == [1]
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)

  # under jit, with the flags built inside the step (static there)
  @jax.jit
  def step(p, s, xy):
    b = {"xy": xy, "train": True, "weight": 1.0, "name": "digits"}
    return tx.update(jax.grad(_flag_loss)(p, b), s, p, batch=b)

  out_j, st_j = step(p, tx.init(p), xy)
  assert sam_optax.stats(st_j)["selected_layers"].tolist() == [1]
  for a, b in zip(jax.tree.leaves(out_j), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_static_batch_leaves(name):
  """The same class for every method: a batch holding a Python bool, a
  float and a string (built inside the jitted step, so static there) gives
  the method's output on the plain loss."""


  ctor, kw = METHODS[name]
  flagged, plain = dict(kw), dict(kw)
  if ctor == "ssam_fisher":
    flagged["batch_axes"] = {"xy": 0, "train": None, "weight": None,
                             "name": None}
  tx = getattr(sam_optax, ctor)(_flag_loss, **flagged)
  ref = getattr(sam_optax, ctor)(mlp_loss, **plain)
  p = mlp_params()

  @jax.jit
  def step(p, s, xy):
    b = {"xy": xy, "train": True, "weight": 1.0, "name": "digits"}
    return tx.update(jax.grad(_flag_loss)(p, b), s, p, batch=b)

  @jax.jit
  def ref_step(p, s, xy):
    return ref.update(jax.grad(mlp_loss)(p, xy), s, p, batch=xy)

  s, s_ref = tx.init(p), ref.init(p)
  for t in range(3):
    xy = make_batch(seed=20 + t)
    u, s = step(p, s, xy)
    u_ref, s_ref = ref_step(p, s_ref, xy)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rank_layers_takes_static_batch_leaves():
  """rank_layers jitted the gradient over the whole batch: a bool flag
  became a tracer. The ranking and norms equal those of the plain loss."""
  p = mlp_params()
  xys = [make_batch(seed=s) for s in (3, 4)]
  flagged = [{"xy": xy, "train": True, "weight": 1.0, "name": "digits"}
             for xy in xys]
  got = sam_optax.rank_layers(_flag_loss, p, flagged)
  want = sam_optax.rank_layers(mlp_loss, p, xys)
  assert [n for n, _ in got] == [n for n, _ in want]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want],
                             rtol=1e-6)


def test_vsam_stat_leaves_prefix_stops_at_key_boundaries():
  """The same '/' class in vSAM's stat_leaves: the prefix "enc" selected
  the leaf under the key "enc/dense" too (a string prefix)."""
  from sam_optax import parts  # pylint: disable=g-import-not-at-top
  from tests.helpers import engine_step  # pylint: disable=g-import-not-at-top

  params = {"enc/dense": {"kernel": jnp.zeros(2)},
            "enc": {"kernel": jnp.zeros(2)}}
  g = {"enc/dense": {"kernel": jnp.array([1.0, 1.0])},
       "enc": {"kernel": jnp.array([1.0, 0.0])}}
  second = {"enc/dense": {"kernel": jnp.array([4.0, 5.0])},   # psf (3, 4)
            "enc": {"kernel": jnp.array([1.0, 2.0])}}         # psf (0, 2)
  for stat_leaves, p_want in [(["enc"], 2.0), (["enc/dense"], 5.0),
                              (["enc/kernel"], 2.0), (None, np.sqrt(29.0))]:
    gate = parts.variation_sampling(warmup_steps=0, window=4, blocks=2,
                                    stat_leaves=stat_leaves)
    state = gate.observe(engine_step(g, params), second, gate.init(params))
    np.testing.assert_allclose(float(state.norm[0]), p_want, rtol=1e-6,
                               err_msg=str(stat_leaves))


# --------------------------------------------------------------------------
# The output side through checkpointed, scanned and branched models.
# --------------------------------------------------------------------------


def _named_mlp_params():
  """Layer names in the reverse of their depth, so that ties (an opaque
  step) and depth disagree: the output layer sorts first."""
  rng = np.random.default_rng(2)
  shapes = {"z_in": (3, 4), "m_mid": (4, 4), "a_out": (4, 2)}
  return {k: {"kernel": jnp.asarray(rng.standard_normal(s), jnp.float32)}
          for k, s in shapes.items()}


def _named_mlp(p, b):
  h = jnp.tanh(b[0] @ p["z_in"]["kernel"])
  h = jnp.tanh(h @ p["m_mid"]["kernel"])
  return jnp.mean((h @ p["a_out"]["kernel"] - b[1]) ** 2)


_WRAPPED = {
    "checkpoint": jax.checkpoint(_named_mlp),
    "checkpoint_policy": jax.checkpoint(
        _named_mlp, policy=jax.checkpoint_policies.nothing_saveable),
    "cond": lambda p, b: jax.lax.cond(
        b[0][0, 0] > 0, _named_mlp, lambda q, c: 2.0 * _named_mlp(q, c), p, b),
    "scan": lambda p, b: jax.lax.scan(
        lambda c, _: (c + _named_mlp(p, b), None), 0.0, None, length=2)[0],
    "while": lambda p, b: jax.lax.fori_loop(
        0, (b[0][0, 0] > 0).astype(jnp.int32) + 1,
        lambda i, c: c + _named_mlp(p, b), 0.0),
    "jit_in_checkpoint": jax.checkpoint(jax.jit(_named_mlp)),
}


@pytest.mark.parametrize("wrap", sorted(_WRAPPED))
def test_output_side_is_found_inside_checkpoint_scan_and_cond(wrap):
  """The default selection (the layers nearest the loss) walks into
  jax.checkpoint (remat), scan, while and both branches of a cond. Before,
  such a step was one opaque operation: every layer inside tied and the
  tie went to the later layer in leaf order, here the input layer."""
  params, batch = _named_mlp_params(), _flat_batch()
  names = sam_optax.layer_paths(params)
  for num, want in ((1, ["a_out"]), (2, ["a_out", "m_mid"])):
    got = layers_lib.output_layers(_WRAPPED[wrap], params, batch, num)
    assert sorted(names[i] for i in got) == sorted(want), (wrap, num)
  depths = layers_lib.leaf_depths(_WRAPPED[wrap], params, batch)
  order = [names[i] for i in np.argsort(depths)]
  assert order == ["a_out", "m_mid", "z_in"], (wrap, depths)


def test_flax_remat_blocks_are_walked():
  """nn.remat(Block) in a linen model: the selection equals the same model
  without remat."""
  import flax.linen as nn

  def model(remat):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.tanh(nn.Dense(4, name="z_first")(x))
        return nn.tanh(nn.Dense(4, name="a_second")(x))

    block = nn.remat(Block) if remat else Block

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(2, name="head")(block(name="block")(x))

    return Net()

  x, y = _flat_batch()
  chosen = []
  for remat in (False, True):
    net = model(remat)
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    loss = lambda p, b, net=net: jnp.mean((net.apply({"params": p}, b[0]) - b[1]) ** 2)  # noqa: E731
    names = sam_optax.layer_paths(params)
    chosen.append(sorted(names[i] for i in
                         layers_lib.output_layers(loss, params, (x, y), 2)))
  assert chosen[0] == chosen[1] == ["block/a_second", "head"]


def test_equinox_layers_are_grouped_under_a_dict_key_too():
  """An Equinox model's layers are its Linear modules whether the model is
  the root or sits under a dict key (under a key the whole model was one
  layer)."""
  eqx = pytest.importorskip("equinox")
  mlp = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.PRNGKey(0))
  head = eqx.nn.Linear(2, 1, key=jax.random.PRNGKey(1))
  alone = eqx.filter(mlp, eqx.is_array)
  assert sam_optax.layer_paths(alone) == ["layers/0", "layers/1", "layers/2"]
  tree = eqx.filter({"backbone": mlp, "head": head}, eqx.is_array)
  assert sam_optax.layer_paths(tree) == [
      "backbone/layers/0", "backbone/layers/1", "backbone/layers/2", "head"]
  groups = _groups(tree)
  assert groups["head"] == ["head/weight", "head/bias"]
  assert groups["backbone/layers/1"] == ["backbone/layers/1/weight",
                                         "backbone/layers/1/bias"]


@pytest.mark.parametrize("wrap", ["none", "checkpoint", "jit"])
def test_a_function_reused_at_several_depths(wrap):
  """One traced function used at several places (JAX shares its program
  between the call sites): each site has its own depth. An auxiliary head
  right after the first block is near the loss; before, the shared
  program's variables took the deepest site's depth and the aux head was
  ranked with the input layer."""
  def block(h, w):
    return jnp.tanh(h @ w)

  blk = {"none": block, "checkpoint": jax.checkpoint(block),
         "jit": jax.jit(block)}[wrap]
  rng = np.random.default_rng(3)
  params = {k: jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
            for k in ("aux", "l0", "l1", "l2", "l3")}

  def loss(p, b):
    h = blk(b, p["l0"])
    side = blk(h, p["aux"])
    for k in ("l1", "l2", "l3"):
      h = blk(h, p[k])
    return jnp.sum(h) + jnp.sum(side)

  x = jnp.ones((2, 4))
  names = sam_optax.layer_paths(params)
  got = sorted(names[i] for i in layers_lib.output_layers(loss, params, x, 2))
  assert got == ["aux", "l3"]


def test_layers_behind_stop_gradient_or_comparisons_are_not_near_the_loss():
  """A target network behind stop_gradient (BYOL-style) is near the loss
  by operations but gets no gradient: it is ranked last (it took a slot
  of the selection, which then perturbed nothing there). A path through a
  comparison (a mask from the weights) carries no gradient either."""
  rng = np.random.default_rng(4)
  w = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  params = {"online": {"kernel": w(3, 4)}, "pred": {"kernel": w(4, 4)},
            "target": {"kernel": w(3, 4)}}

  def loss(p, x):
    z = jnp.tanh(x @ p["online"]["kernel"]) @ p["pred"]["kernel"]
    t = jax.lax.stop_gradient(jnp.tanh(x @ p["target"]["kernel"]))
    gate = (p["online"]["kernel"] > 0).astype(jnp.float32)
    return jnp.sum((z - t) ** 2) + jnp.sum(gate)

  x = jnp.ones((2, 3))
  names = sam_optax.layer_paths(params)
  depths = dict(zip(names, layers_lib.leaf_depths(loss, params, x)))
  assert depths["target"] == np.inf
  assert depths["pred"] < depths["online"] < np.inf
  got = sorted(names[i] for i in layers_lib.output_layers(loss, params, x, 2))
  assert got == ["online", "pred"]
  tx = sam_optax.layerwise_sam(loss, num_layers=2)
  _, state = tx.update(jax.grad(loss)(params, x), tx.init(params), params,
                       batch=x)
  assert sorted(names[i] for i in np.asarray(
      sam_optax.stats(state)["selected_layers"])) == ["online", "pred"]


def test_custom_derivative_bodies_count_every_path():
  """A quantized head: a custom_vjp whose forward runs in int8 with its
  scale behind stop_gradient, and a straight-through gradient. The
  gradient follows the custom rule, so the head is still the layer nearest
  the loss (filtering the integer forward made every layer unreachable,
  and the selection fell back to leaf order: the input side)."""
  @jax.custom_vjp
  def qmatmul(h, w):
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(w)) / 127.0)
    wq = jnp.round(w / scale).astype(jnp.int8)
    return (h @ wq.astype(jnp.float32)) * scale

  qmatmul.defvjp(lambda h, w: (qmatmul(h, w), (h, w)),
                 lambda res, ct: (ct @ res[1].T, res[0].T @ ct))
  params = _named_mlp_params()

  def loss(p, b):
    h = jnp.tanh(b[0] @ p["z_in"]["kernel"])
    h = jnp.tanh(qmatmul(h, p["m_mid"]["kernel"]))
    return jnp.mean((qmatmul(h, p["a_out"]["kernel"]) - b[1]) ** 2)

  names = sam_optax.layer_paths(params)
  depths = layers_lib.leaf_depths(loss, params, _flat_batch())
  assert [names[i] for i in np.argsort(depths)] == ["a_out", "m_mid", "z_in"]
  assert max(depths) < np.inf
