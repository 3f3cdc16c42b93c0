"""Layer-wise SAM (issue 5) against references computed in the test."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import parts
from tests import helpers

LAYERS = ["l1", "l2", "l3"]

# --------------------------------------------------------------------------
# A three-layer MLP whose loss carries a batch-controlled L2 term per layer:
# ``batch["pen"][l]`` makes layer l's gradient large, so a test can steer the
# runtime selection from the data.
# --------------------------------------------------------------------------


def mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  dims = [(4, 6), (6, 5), (5, 3)]
  return {
      name: {
          "kernel": jnp.asarray(rng.standard_normal(d) * 0.5, jnp.float32),
          "bias": jnp.asarray(rng.standard_normal(d[1:]) * 0.1, jnp.float32),
      }
      for name, d in zip(LAYERS, dims)
  }


def loss_fn(p, batch):
  h = batch["x"]
  for i, name in enumerate(LAYERS):
    h = h @ p[name]["kernel"] + p[name]["bias"]
    if i < len(LAYERS) - 1:
      h = jnp.tanh(h)
  fit = jnp.mean(jnp.sum((h - batch["y"]) ** 2, axis=-1))
  pen = sum(
      batch["pen"][i] * jnp.sum(p[name]["kernel"] ** 2)
      for i, name in enumerate(LAYERS)
  )
  return (fit + pen).astype(jnp.float32)



def lw(*args, **kwargs):
  """layerwise_sam with the rule these references compute: the perturbation
  normalised over the selection and, without ``layers=``, the runtime
  selection by gradient norm (the defaults are tested below)."""
  kwargs.setdefault("normalize", "selection")
  if kwargs.get("layers") is None:
    kwargs.setdefault("select_by", "gradient")
  return sam_optax.layerwise_sam(*args, **kwargs)

grad_fn = jax.jit(jax.grad(loss_fn))


def make_batch(seed=1, n=8, pen=(0.0, 0.0, 0.0)):
  rng = np.random.default_rng(seed)
  return {
      "x": jnp.asarray(rng.standard_normal((n, 4)), jnp.float32),
      "y": jnp.asarray(rng.standard_normal((n, 3)), jnp.float32),
      "pen": jnp.asarray(pen, jnp.float32),
  }


def np_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def layer_norms(g):
  """Per-layer L2 norms in LAYERS order, in float64 NumPy."""
  g = np_tree(g)
  return np.array(
      [np.sqrt(sum(np.sum(v**2) for v in g[n].values())) for n in LAYERS]
  )


def top_k(norms, k):
  """Largest k, ties to the lower index (stable sort of -norms)."""
  return list(np.argsort(-norms, kind="stable")[:k])


def reference(params, batch, selected, rho, alpha, eps=1e-12, normalize="selection"):
  """The layer-wise rule in NumPy plus plain jax.grad: the perturbation on
  the selected layers, its norm over them ("selection") or over the whole
  gradient ("global"); the mix on the selected layers, g elsewhere."""
  g = np_tree(grad_fn(params, batch))
  names = [LAYERS[i] for i in selected]
  over = names if normalize == "selection" else list(g)
  norm = np.sqrt(sum(np.sum(v**2) for n in over for v in g[n].values()))
  scale = rho / (norm + eps)
  perturbed = {
      n: {
          k: jnp.asarray(
              np.asarray(w, np.float64) + (scale * g[n][k] if n in names else 0),
              jnp.float32,
          )
          for k, w in layer.items()
      }
      for n, layer in params.items()
  }
  h = np_tree(grad_fn(perturbed, batch))
  return {
      n: {
          k: (1 - alpha) * g[n][k] + alpha * h[n][k] if n in names else g[n][k]
          for k in g[n]
      }
      for n in g
  }


def assert_close(tree, ref, atol=2e-6, rtol=2e-5):
  for a, b in zip(jax.tree.leaves(np_tree(tree)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


def one_update(tx, params, batch, state=None, loss=loss_fn):
  state = tx.init(params) if state is None else state
  g = (grad_fn if loss is loss_fn else jax.jit(jax.grad(loss)))(params, batch)
  out, state = jax.jit(
      lambda g, s, p, b: tx.update(g, s, p, batch=b)
  )(g, state, params, batch)
  return g, out, state


# --------------------------------------------------------------------------
# Layers: grouping and naming.
# --------------------------------------------------------------------------


def test_layer_paths_default_grouping_and_group_fn():
  p = mlp_params()
  assert sam_optax.layer_paths(p) == LAYERS
  assert sam_optax.layer_paths({"params": p}) == [
      "params/l1", "params/l2", "params/l3"
  ]
  # A leaf directly under the root is a layer of its own.
  mixed = {"dense": {"kernel": jnp.ones(2)}, "scale": jnp.ones(2)}
  assert sam_optax.layer_paths(mixed) == ["dense", "scale"]
  # Sequences: a list of modules, and a bare tuple (a layer per array).
  assert sam_optax.layer_paths([{"w": jnp.ones(1)}, {"w": jnp.ones(1)}]) == [
      "0", "1"
  ]
  assert sam_optax.layer_paths((jnp.ones(1), jnp.ones(2))) == ["0", "1"]
  # A user grouping: kernels in one group, biases in another.
  by_kind = sam_optax.layer_paths(p, group_fn=lambda s: s.split("/")[-1])
  assert by_kind == ["bias", "kernel"]


def test_layer_paths_flax_nnx_state():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.fc = nnx.Linear(3, 4, rngs=rngs)
      self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs)])

  _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  assert sam_optax.layer_paths(state) == ["blocks/0", "fc"]


# --------------------------------------------------------------------------
# The rule against the reference.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers", [("l3", "l2"), "l2", lambda path: path != "l1"]
)
def test_fixed_selection_matches_reference(layers):
  params, batch = mlp_params(), make_batch()
  tx = lw(loss_fn, rho=0.3, alpha=0.7, layers=layers)
  g, out, state = one_update(tx, params, batch)
  sel = [1] if layers == "l2" else [1, 2]
  assert_close(out, reference(params, batch, sel, 0.3, 0.7))
  # Unselected layers: the clean gradient, bit for bit.
  chex.assert_trees_all_equal(out["l1"], g["l1"])
  st = sam_optax.stats(state)
  assert st["selected_layers"].tolist() == sel
  assert int(st["grad_evals"]) == 1 and "layer_refreshes" not in st


def test_runtime_selection_reference_select_every_and_no_retrace():
  """Top-2 by norm of the clean gradient of steps 0, 2, 4, used from the
  step after next on (step t: the ranking of the last even step <= t - 2);
  steps 0 and 1 perturb every layer; one trace for all steps."""
  params = mlp_params()
  tx = lw(
      loss_fn, rho=0.2, alpha=0.8, num_layers=2, select_every=2
  )
  state = tx.init(params)
  assert sam_optax.stats(state)["selected_layers"].tolist() == [-1, -1]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, s, p, b):
    return tx.update(g, s, p, batch=b)

  # Even steps rank ({l1, l3}, {l2, l3}, {l1, l2}); odd steps' data would
  # rank differently but no ranking is made there.
  pens = [(5.0, 0, 5.0), (0, 9.0, 9.0), (0, 9.0, 9.0), (9.0, 9.0, 0),
          (9.0, 9.0, 0)]
  made, seen, rankings = None, set(), {}
  for t, pen in enumerate(pens):
    batch = make_batch(seed=t, pen=pen)
    g = grad_fn(params, batch)
    used = [0, 1, 2] if t < 2 else rankings[(t - 2) // 2 * 2]
    if t % 2 == 0:
      made = rankings[t] = top_k(layer_norms(g), 2)
    else:
      assert top_k(layer_norms(g), 2) != made  # a ranking would change it
    out, state = step(g, state, params, batch)
    st = sam_optax.stats(state)
    assert st["selected_layers"].tolist() == made, t
    assert int(st["layer_refreshes"]) == t // 2 + 1
    assert int(st["grad_evals"]) == t + 1
    assert_close(out, reference(params, batch, used, 0.2, 0.8))
    for unselected in set(range(3)) - set(used):
      chex.assert_trees_all_equal(
          out[LAYERS[unselected]], g[LAYERS[unselected]]
      )
    seen.add(tuple(sorted(used)))
    params = jax.tree.map(lambda w, u: w - 0.01 * u, params, out)
  assert len(seen) >= 3  # the selection really changed, with one trace


def test_runtime_ties_go_to_the_lower_layer_index():
  # Identical layers give identical norms: the first two win, in order.
  w = {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}
  params = {"a": w, "b": w, "c": w}
  lf = lambda p, x: sum(jnp.sum(jnp.sin(x @ p[k]["kernel"])) for k in p)
  tx = lw(lf, num_layers=2)
  x = jnp.ones((3, 2))
  _, _, state = one_update(tx, params, x, loss=lf)
  assert sam_optax.stats(state)["selected_layers"].tolist() == [0, 1]


def test_all_layers_with_alpha_one_is_sam():
  params, batch = mlp_params(), make_batch(pen=(0.1, 0.2, 0.0))
  _, ref, _ = one_update(sam_optax.sam(loss_fn, rho=0.05), params, batch)
  for tx in [
      lw(
          loss_fn, rho=0.05, alpha=1.0, layers=lambda path: True
      ),
      lw(loss_fn, rho=0.05, alpha=1.0, num_layers=3),
  ]:
    _, out, _ = one_update(tx, params, batch)
    chex.assert_trees_all_close(out, ref, atol=1e-6, rtol=1e-6)


def test_has_aux_bf16_and_rho_zero():
  params, batch = mlp_params(), make_batch()
  aux_loss = lambda p, b: (loss_fn(p, b), {"junk": jnp.ones(3)})
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

  @jax.jit
  def run_all(params, p16, batch):
    g = grad_fn(params, batch)
    res = []
    for layers in [None, ("l3",)]:
      tx = lw(loss_fn, layers=layers)
      tx_aux = lw(aux_loss, layers=layers, has_aux=True)
      tx0 = lw(loss_fn, rho=0.0, layers=layers)
      out, _ = tx.update(g, tx.init(params), params, batch=batch)
      out_aux, _ = tx_aux.update(g, tx_aux.init(params), params, batch=batch)
      out0, st0 = tx0.update(g, tx0.init(params), params, batch=batch)
      res.append((out, out_aux, out0, st0.grad_evals))
    g16 = grad_fn(p16, batch)
    tx = lw(loss_fn, num_layers=2)
    out16, _ = tx.update(g16, tx.init(p16), p16, batch=batch)
    return g, res, out16

  g, res, out16 = run_all(params, p16, batch)
  for out, out_aux, out0, evals0 in res:
    chex.assert_trees_all_equal(out, out_aux)  # aux is discarded
    # rho = 0: the clean gradient exactly, no second gradient.
    chex.assert_trees_all_equal(out0, g)
    assert int(evals0) == 0
  # bf16 params and updates: outputs in bf16 and finite.
  chex.assert_trees_all_equal_dtypes(out16, p16)
  chex.assert_tree_all_finite(out16)


def test_parts_compose_with_a_gate():
  """The fixed region inside the engine with an every-2nd-step gate."""
  params = mlp_params()
  tx = sam_optax.sharpness_aware(
      loss_fn,
      0.3,
      geometry=parts.global_norm(),
      region=functools.partial(parts.fixed_layers, normalize="selection")(["l2", "l3"]),
      gate=parts.every_k(2),
      combine=parts.mix(0.5),
  )
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  for t in range(2):
    batch = make_batch(seed=t)
    g = grad_fn(params, batch)
    out, state = step(g, state, params, batch)
    if t == 0:
      assert_close(out, reference(params, batch, [1, 2], 0.3, 0.5))
    else:
      chex.assert_trees_all_equal(out, g)
  assert int(sam_optax.stats(state)["grad_evals"]) == 1


def test_inject_hyperparams_rho_schedule_and_alpha():
  params = mlp_params()
  sched = optax.piecewise_constant_schedule(0.05, {1: 4.0})  # 0.05, then 0.2
  static = ("loss_fn", "num_layers", "select_every", "layers", "group_fn",
            "normalize")
  tx = optax.inject_hyperparams(sam_optax.layerwise_sam, static_args=static)(
      loss_fn, rho=sched, alpha=0.6, layers=lambda path: path != "l1",
      normalize="selection",
  )
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  for t, rho in enumerate([0.05, 0.2]):
    batch = make_batch(seed=t)
    out, state = step(grad_fn(params, batch), state, params, batch)
    assert_close(out, reference(params, batch, [1, 2], rho, 0.6))
  st = sam_optax.stats(state)
  assert float(st["hyperparams/alpha"]) == pytest.approx(0.6)
  assert st["selected_layers"].tolist() == [1, 2]
  with pytest.raises(ValueError, match="static_args"):
    optax.inject_hyperparams(
        sam_optax.layerwise_sam, static_args=("loss_fn",)
    )(loss_fn, num_layers=2).init(params)


# --------------------------------------------------------------------------
# Devices: every device selects the same layers, from the averaged gradient.
# --------------------------------------------------------------------------


def test_pmap_selection_agreement_and_reference():
  n = 4
  params = mlp_params()
  # Per-device data pulling the selection different ways: device 3 alone
  # would pick l2, the average picks l1 and l3.
  pens = [(10.0, 0, 0), (10.0, 0, 0), (0, 0, 12.0), (0, 3.0, 0)]
  batches = [make_batch(seed=10 + d, pen=pens[d]) for d in range(n)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  tx = lw(loss_fn, rho=0.2, alpha=0.6, axis_name="d")
  rep = jax.tree.map(lambda x: jnp.stack([x] * n), params)
  state = jax.pmap(tx.init)(rep)

  def step(p, s, b):
    g = grad_fn(p, b)  # per-device gradient: m-sharpness
    return tx.update(g, s, p, batch=b)

  pstep = jax.pmap(step, axis_name="d")
  out0, state = pstep(rep, state, stacked)  # step 0: every layer, then ranks
  sel = np.asarray(sam_optax.stats(state)["selected_layers"])
  assert (sel == sel[0]).all()  # every device agrees
  _, state = pstep(rep, state, stacked)  # step 1: still every layer
  out, state = pstep(rep, state, stacked)  # step 2: step 0's ranking

  # Reference: top-2 of the averaged gradient; per-device perturbations
  # normalised over the selection; second gradients averaged.
  gs = [np_tree(grad_fn(params, b)) for b in batches]
  gbar = jax.tree.map(lambda *x: np.mean(x, axis=0), *gs)
  chosen = top_k(layer_norms(gbar), 2)
  assert chosen == [0, 2] and top_k(layer_norms(gs[3]), 2)[0] == 1
  assert sel[0].tolist() == chosen
  refs = [reference(params, b, chosen, 0.2, 1.0) for b in batches]
  hbar = jax.tree.map(lambda *x: np.mean(x, axis=0), *refs)
  names = [LAYERS[i] for i in chosen]
  expect = {
      n_: {
          k: 0.4 * gbar[n_][k] + 0.6 * hbar[n_][k] if n_ in names
          else gbar[n_][k]
          for k in gbar[n_]
      }
      for n_ in gbar
  }
  for d in range(n):
    assert_close(jax.tree.map(lambda x: x[d], out), expect, atol=1e-5)
  # Step 0 perturbed every layer (normalised over all of them).
  refs0 = [reference(params, b, [0, 1, 2], 0.2, 1.0) for b in batches]
  hbar0 = jax.tree.map(lambda *x: np.mean(x, axis=0), *refs0)
  expect0 = jax.tree.map(lambda g_, h_: 0.4 * g_ + 0.6 * h_, gbar, hbar0)
  for d in range(n):
    assert_close(jax.tree.map(lambda x: x[d], out0), expect0, atol=1e-5)


# --------------------------------------------------------------------------
# Cost: with a fixed set, XLA drops the backward pass below it.
# --------------------------------------------------------------------------


def _cnn():
  from experiments.models import SmallCNN  # pylint: disable=g-import-not-at-top

  model = SmallCNN(num_classes=3, widths=(4, 4, 4), hidden=8)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)))
  batch = (x.astype(jnp.float32), jnp.array([0, 2]))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch[0])["params"]

  def cnn_loss(p, b):
    logits = model.apply({"params": p}, b[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

  return params, batch, cnn_loss


def test_fixed_layers_drop_backward_below_the_selection():
  params, batch, cnn_loss = _cnn()
  assert sam_optax.layer_paths(params) == [
      "conv1", "conv2", "conv3", "fc", "head"
  ]

  def convs_in_update(tx):
    jaxpr = jax.make_jaxpr(lambda g, s, p, b: tx.update(g, s, p, batch=b))(
        params, tx.init(params), params, batch
    )
    return str(jaxpr).count("conv_general_dilated")

  # SAM: 3 forward convs + 3 kernel cotangents + 2 input cotangents.
  assert convs_in_update(sam_optax.sam(cnn_loss)) == 8
  # Runtime selection is data-dependent: a full second gradient.
  assert convs_in_update(lw(cnn_loss)) == 8
  # fc + head: the three forward convs only, no conv is differentiated.
  fixed = lw(cnn_loss, layers=("fc", "head"))
  assert convs_in_update(fixed) == 3
  # conv3 + head: one kernel cotangent more, still nothing below conv3.
  assert convs_in_update(
      lw(cnn_loss, layers=("conv3", "head"))
  ) == 4

  # In the compiled train step, the second evaluation's forward convs are
  # shared with the clean pass: exactly SGD's convolutions remain.
  def compiled_convs(tx):
    def train_step(p, s, b):
      g = jax.grad(cnn_loss)(p, b)
      u, s = tx.update(g, s, p, batch=b)
      return optax.apply_updates(p, u), s

    hlo = jax.jit(train_step).lower(params, tx.init(params), batch)
    return hlo.compile().as_text().count(" convolution(")

  sgd = optax.with_extra_args_support(optax.sgd(0.1))
  assert compiled_convs(sgd) == 8
  assert compiled_convs(optax.chain(fixed, optax.sgd(0.1))) == 8


# --------------------------------------------------------------------------
# The ranking helper.
# --------------------------------------------------------------------------


def test_rank_layers_against_numpy():
  params = mlp_params()
  batches = [make_batch(seed=s, pen=(0, 0.5 * s, 0)) for s in range(3)]
  ranked = sam_optax.rank_layers(loss_fn, params, batches)
  mean = np.mean(
      [layer_norms(grad_fn(params, b)) for b in batches], axis=0
  )
  order = top_k(mean, 3)
  assert [n for n, _ in ranked] == [LAYERS[i] for i in order]
  np.testing.assert_allclose([v for _, v in ranked], mean[order], rtol=1e-5)
  aux = sam_optax.rank_layers(
      lambda p, b: (loss_fn(p, b), 0.0), params, batches, has_aux=True
  )
  assert aux == ranked


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_layers": 0}, r"num_layers must be an integer in \[1, inf\]"),
        ({"num_layers": 1.5}, "num_layers must be an integer"),
        ({"select_every": 0}, r"select_every must be an integer in \[1"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"rho": -1.0}, r"rho must be in \[0, inf\)"),
        ({"layers": []}, "at least one layer"),
        ({"layers": [3]}, "layers must be None, a layer path"),
        ({"group_fn": 3}, "group_fn must be a callable"),
    ],
)
def test_construction_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lw(loss_fn, **kwargs)


def test_init_errors_name_the_valid_layers():
  params = mlp_params()
  with pytest.raises(
      ValueError, match=r"num_layers must be an integer in \[1, 3\].*'l1'"
  ):
    lw(loss_fn, num_layers=4).init(params)
  with pytest.raises(
      ValueError, match=r"'fc' names no layer.*\['l1', 'l2', 'l3'\]"
  ):
    lw(loss_fn, layers=["l3", "fc"]).init(params)
  with pytest.raises(ValueError, match="predicate selects no layer"):
    lw(loss_fn, layers=lambda p: False).init(params)
  with pytest.raises(ValueError, match="group_fn must return a layer name"):
    lw(loss_fn, group_fn=lambda p: 1).init(params)
  with pytest.raises(ValueError, match="at least one batch"):
    sam_optax.rank_layers(loss_fn, params, [])


# --------------------------------------------------------------------------
# The defaults: the output side from the graph, the global norm.
# --------------------------------------------------------------------------


def test_default_is_the_output_side_with_the_global_norm():
  params = mlp_params()
  batch = make_batch(seed=3, pen=(1.0, 0.0, 0.0))  # l1 has the largest gradient
  out, state = jax.jit(
      lambda g, s: sam_optax.layerwise_sam(loss_fn, rho=0.3, alpha=0.7).update(
          g, s, params, batch=batch)
  )(grad_fn(params, batch), sam_optax.layerwise_sam(loss_fn).init(params))
  assert sam_optax.stats(state)["selected_layers"].tolist() == [1, 2]
  assert_close(out, reference(params, batch, [1, 2], 0.3, 0.7,
                              normalize="global"))
  chex.assert_trees_all_equal(out["l1"], grad_fn(params, batch)["l1"])


def test_output_side_of_a_cnn_is_found_from_the_graph_and_costs_no_conv():
  params, batch, cnn_loss = _cnn()
  tx = sam_optax.layerwise_sam(cnn_loss)
  _, state = tx.update(jax.grad(cnn_loss)(params, batch), tx.init(params),
                       params, batch=batch)
  names = sam_optax.layer_paths(params)
  chosen = [names[i] for i in sam_optax.stats(state)["selected_layers"].tolist()]
  assert chosen == ["fc", "head"]
  jaxpr = jax.make_jaxpr(lambda g, s, p, b: tx.update(g, s, p, batch=b))(
      params, tx.init(params), params, batch
  )
  assert str(jaxpr).count("conv_general_dilated") == 3  # the forward only


def test_layer_paths_match_a_suffix_in_a_linen_variables_dict():
  params = {"params": mlp_params()}

  def lf(v, b):
    return loss_fn(v["params"], b)

  batch = make_batch(seed=1)
  tx = sam_optax.layerwise_sam(lf, layers=("l2", "l3"), normalize="selection")
  out, state = tx.update(jax.grad(lf)(params, batch), tx.init(params),
                         params, batch=batch)
  assert sam_optax.stats(state)["selected_layers"].tolist() == [1, 2]
  assert_close(out["params"], reference(params["params"], batch, [1, 2], 0.1, 0.8))
  two = {"a": {"head": mlp_params()["l1"]}, "b": {"head": mlp_params()["l2"]}}
  with pytest.raises(ValueError, match=r"'head' matches several layers.*'a/head'.*'b/head'"):
    sam_optax.layerwise_sam(lambda p, b: 0.0, layers="head").init(two)


@pytest.mark.parametrize("normalize,select_every,k", [("global", 1, 1),
                                                      ("selection", 2, 1),
                                                      ("global", 1, 2)])
def test_selection_by_sharpness_against_numpy(normalize, select_every, k):
  """select_by="sharpness": each layer's estimate ‖h_l - g_l‖ is updated on
  the steps that perturb it (every layer on step 0) and kept otherwise; the
  top-k of the estimates after a due step is used from the step after next
  on (steps 0 and 1 perturb every layer). References: plain jax.grad at
  the perturbed point and NumPy."""
  params = mlp_params()
  rho, alpha = 0.3, 0.8
  tx = lw(loss_fn, rho=rho, alpha=alpha, num_layers=k, normalize=normalize,
          select_by="sharpness", select_every=select_every)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  sharp = np.zeros(3)
  made, seen, rankings = None, set(), {}
  # Step 0 makes l1 and l2 sharp (a large L2 term each); without it later,
  # the selected layer's estimate drops and the other's stale one wins.
  pens = [(3.0, 3.0, 0)] + [(0, 0, 0)] * 7
  for t, pen in enumerate(pens):
    batch = make_batch(seed=t, pen=pen)
    g = np_tree(grad_fn(params, batch))
    due = [m for m in rankings if m <= t - 2]
    used = rankings[max(due)] if due else [0, 1, 2]
    names = [LAYERS[i] for i in used]
    over = names if normalize == "selection" else LAYERS
    norm = np.sqrt(sum(np.sum(v**2) for n in over for v in g[n].values()))
    perturbed = {
        n: {key: jnp.asarray(np.asarray(w, np.float64)
                             + (rho * g[n][key] / norm if n in names else 0),
                             jnp.float32)
            for key, w in layer.items()}
        for n, layer in params.items()
    }
    h = np_tree(grad_fn(perturbed, batch))
    for i in used:
      n = LAYERS[i]
      sharp[i] = np.sqrt(sum(np.sum((h[n][key] - g[n][key]) ** 2)
                             for key in g[n]))
    if t % select_every == 0:
      made = rankings[t] = top_k(sharp, k)
    out, state = step(grad_fn(params, batch), state, params, batch)
    st = sam_optax.stats(state)
    np.testing.assert_allclose(st["layer_sharpness"], sharp, rtol=2e-4,
                               atol=1e-6)
    assert st["selected_layers"].tolist() == made, t
    assert int(st["layer_refreshes"]) == t // select_every + 1
    assert_close(out, reference(params, batch, used, rho, alpha,
                                normalize=normalize), atol=1e-5, rtol=1e-4)
    seen.add(tuple(sorted(used)))
    params = jax.tree.map(lambda w, u: w - 0.05 * u, params, out)
  assert len(seen) >= 3, seen  # the estimates really moved the selection


def _with_empty_layers(params):
  """params with two zero-size layers in front (first in layer order)."""
  return {"a_empty": {"bias": jnp.zeros((0,))},
          "b_empty": {"kernel": jnp.zeros((5, 0))}, **params}


@pytest.mark.parametrize("select_by", ["depth", "gradient", "sharpness"])
def test_layers_without_entries_are_never_selected(select_by):
  """Zero-size layers (the loss reads them; they add exactly 0) rank
  nearest the loss and, by norm, tie at 0: they used to take the
  selection's slots, leaving every real layer with the clean gradient (the
  step SGD, grad_evals still counting a second gradient). The run with
  them equals the run without them on the real leaves, step by step, and
  the selection names real layers only."""
  def loss_empty(p, b):
    x = b[0]
    return (helpers.mlp_loss({k: p[k] for k in ("l1", "l2")}, b)
            + jnp.sum(p["a_empty"]["bias"]) + jnp.sum(x @ p["b_empty"]["kernel"]))

  params = helpers.mlp_params()
  padded = _with_empty_layers(params)
  kw = dict(num_layers=1, select_by=select_by)
  plain = sam_optax.layerwise_sam(helpers.mlp_loss, **kw)
  empty = sam_optax.layerwise_sam(loss_empty, **kw)
  sp, se = plain.init(params), empty.init(padded)
  p, q = params, padded
  for t in range(4):
    b = helpers.make_batch(seed=t)
    up, sp = plain.update(jax.grad(helpers.mlp_loss)(p, b), sp, p, batch=b)
    ue, se = empty.update(jax.grad(loss_empty)(q, b), se, q, batch=b)
    chex.assert_trees_all_close({k: ue[k] for k in ("l1", "l2")}, up,
                                atol=1e-6, rtol=1e-6)
    p = optax.apply_updates(p, up)
    q = optax.apply_updates(q, ue)
    sel_p = np.asarray(sam_optax.stats(sp)["selected_layers"])
    sel_e = np.asarray(sam_optax.stats(se)["selected_layers"])
    # The same layers, two places later in the padded order (-1: none yet).
    np.testing.assert_array_equal(np.where(sel_e >= 0, sel_e - 2, -1), sel_p)
  with pytest.raises(ValueError, match=r"\[1, 2\].*no entries.*a_empty"):
    sam_optax.layerwise_sam(loss_empty, num_layers=3,
                            select_by=select_by).init(padded)


def test_fixed_layers_that_hold_no_entries_are_refused():
  padded = _with_empty_layers(helpers.mlp_params())
  loss = lambda p, b: helpers.mlp_loss({k: p[k] for k in ("l1", "l2")}, b)  # noqa: E731
  with pytest.raises(ValueError, match=r"only layers that hold no entries.*a_empty"):
    sam_optax.layerwise_sam(loss, layers=("a_empty", "b_empty")).init(padded)
  # One real layer among them is fine.
  sam_optax.layerwise_sam(loss, layers=("a_empty", "l2")).init(padded)
