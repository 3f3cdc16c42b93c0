"""Layer-wise SAM: perturb only the critical layers, and pay only for them.

Lee, "Layer-wise gradient norm penalizing method for efficient and accurate
deep learning training", KDD 2024 (arXiv 2503.14205). The rule (ALGORITHMS.md
§4) is a gradient-norm penalty (:func:`sam_optax.gnp`) restricted to a few
layers ``S``::

    n_l   = ‖g_l‖                                    (float32)
    e_l   = rho * g_l / (sqrt(Σ_{j∈S} n_j²) + eps)    for l ∈ S, else 0
    h_S   = ∇_{w_S} L_B(w + e)
    out_l = (1 - alpha) * g_l + alpha * h_l           for l ∈ S
    out_l = g_l                                       otherwise (bit for bit)

Here it is a preset over the engine with two new regions:

* :class:`FixedLayers`: ``S`` is known before tracing (``layers=``). The
  region returns a pytree of Python bools, so the engine differentiates the
  selected leaves only and hands the others to ``loss_fn`` as the very same
  arrays: XLA shares the forward pass below ``S`` with the caller's clean
  pass and backpropagates nothing below the lowest selected layer.
* :class:`TopLayers`: ``S`` is the ``num_layers`` layers with the largest
  clean-gradient norm, re-chosen every ``select_every`` steps and kept in
  state. The mask is data-dependent, so the second gradient is a full one (the
  cost of GNP); only the perturbation and the output are restricted.

A *layer* is a group of leaves. By default it is the innermost mapping that
holds the leaf (a Flax module's ``{kernel, bias}``), named by the keys from
the root joined by "/" (``"fc"`` for ``variables["params"]``,
``"params/fc"`` for the whole variables dict, ``"layers/0"`` for an NNX
``nnx.List``). ``group_fn(leaf_path) -> layer_name`` replaces that grouping.
Layers are numbered in order of first appearance in ``jax.tree.leaves`` order
(:func:`layer_paths`); ``stats()`` reports the selection as those indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax._src import base
from sam_optax._src import combine as combine_lib
from sam_optax._src import engine
from sam_optax._src import geometry as geometry_lib

PyTree = Any
GroupFn = Callable[[str], str]
LayerSpec = Union[str, Sequence[str], Callable[[str], bool]]


# --------------------------------------------------------------------------
# Grouping leaves into layers.
# --------------------------------------------------------------------------


def _default_layer(path: tuple[Any, ...]) -> str:
  """The path of the innermost mapping holding the leaf at ``path``.

  The leaf's own entry is the last mapping key on its path; whatever follows
  it (an NNX ``Variable``'s ``.value``) belongs to the leaf. A leaf reached
  through sequences and attributes only belongs to its immediate container.
  """
  last = None
  for i, k in enumerate(path):
    if isinstance(k, jax.tree_util.DictKey):
      last = i
  if last is None:
    return base.path_str(path[:-1])
  return base.path_str(path[:last])


def _leaf_layers(params: PyTree, group_fn: Optional[GroupFn]):
  """(layer names in order of first appearance, layer index of every leaf)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names: list[str] = []
  index: dict[str, int] = {}
  ids: list[int] = []
  for path, _ in flat:
    if group_fn is None:
      name = _default_layer(path)
    else:
      name = group_fn(base.path_str(path))
      if not isinstance(name, str):
        raise ValueError(
            "group_fn must return a layer name (str) for every leaf path; got "
            f"{name!r} for {base.path_str(path)!r}"
        )
    if name not in index:
      index[name] = len(names)
      names.append(name)
    ids.append(index[name])
  if not names:
    raise ValueError("params has no leaves: there is no layer to select")
  return names, ids


def layer_paths(
    params: PyTree, *, group_fn: Optional[GroupFn] = None
) -> list[str]:
  """The layer names of a params tree, in the order ``stats()`` indexes them.

  A layer is the innermost mapping holding arrays (a Flax module's ``{kernel,
  bias}``), named by its keys from the root joined by "/"; ``group_fn`` maps
  a leaf's "/"-joined path to its layer name instead.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> p = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...      "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}
    >>> sam_optax.layer_paths(p)
    ['fc', 'head']
    >>> sam_optax.layer_paths(p, group_fn=lambda path: path.split("/")[-1])
    ['bias', 'kernel']
  """
  _check_group_fn(group_fn)
  return _leaf_layers(params, group_fn)[0]


def _check_group_fn(group_fn):
  if group_fn is not None and not callable(group_fn):
    raise ValueError(
        "group_fn must be a callable (leaf path str -> layer name str) or "
        f"None, got {group_fn!r}"
    )


# --------------------------------------------------------------------------
# Regions.
# --------------------------------------------------------------------------


class LayerSelection(NamedTuple):
  """The selected layers (indices into :func:`layer_paths`).

  Attributes:
    selected: int32 ``[n]``, the selected layer indices; for a runtime
      selection in decreasing order of gradient norm (-1 before the first).
    refreshes: how many times the selection was (re)computed; None for a
      fixed selection.
  """

  selected: jax.Array
  refreshes: Optional[jax.Array] = None

  def stats(self):
    out = {"selected_layers": self.selected}
    if self.refreshes is not None:
      out["layer_refreshes"] = self.refreshes
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class FixedLayers(engine.Region):
  """A fixed set of layers, known before tracing (the fast path).

  ``layers`` is a layer path, a sequence of them, or a predicate
  ``layer_path -> bool``. ``select`` builds, at trace time from the params'
  structure, a pytree of Python bools: the engine then differentiates the
  selected leaves only and passes the others to ``loss_fn`` as the very same
  arrays, so nothing below the lowest selected layer is backpropagated.
  """

  layers: Any = ()
  group_fn: Optional[GroupFn] = None
  normalize_over_region: bool = True
  clean_outside: bool = True

  def selected_indices(self, params: PyTree) -> list[int]:
    """Indices (into :func:`layer_paths`) of the selected layers."""
    names, _ = _leaf_layers(params, self.group_fn)
    if callable(self.layers):
      chosen = []
      for i, n in enumerate(names):
        keep = self.layers(n)
        if not isinstance(keep, (bool, np.bool_)):
          raise ValueError(
              "layers, as a predicate, must return a Python bool for every "
              f"layer path; got {keep!r} for {n!r}"
          )
        if keep:
          chosen.append(i)
      if not chosen:
        raise ValueError(
            f"layers: the predicate selects no layer; valid paths: {names}"
        )
      return chosen
    unknown = [p for p in self.layers if p not in names]
    if unknown:
      raise ValueError(
          f"layers: {unknown} name no layer of params; valid paths: {names}"
      )
    return sorted({names.index(p) for p in self.layers})

  def static_mask_for(self, params: PyTree) -> PyTree:
    """The pytree of Python bools marking the selected leaves."""
    chosen = set(self.selected_indices(params))
    _, ids = _leaf_layers(params, self.group_fn)
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(treedef, [i in chosen for i in ids])

  def init(self, params):
    idx = self.selected_indices(params)
    return LayerSelection(selected=jnp.asarray(idx, jnp.int32))

  def select(self, step, state):
    return self.static_mask_for(step.params), state, jnp.zeros((), jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class TopLayers(engine.Region):
  """The ``num_layers`` layers with the largest clean-gradient norm.

  Re-chosen on steps with ``count % select_every == 0`` (step 0 included),
  under a ``lax.cond`` when ``select_every > 1``, from ``step.grads`` (already
  averaged over ``axis_name``, so every device makes the same choice); kept
  in state in between. Ties go to the layer with the lower index (``lax.top_k``
  order); a NaN norm ranks last. The mask has one boolean scalar per leaf.
  """

  num_layers: int = 2
  select_every: int = 1
  group_fn: Optional[GroupFn] = None
  normalize_over_region: bool = True
  clean_outside: bool = True

  def _layers(self, params):
    names, ids = _leaf_layers(params, self.group_fn)
    if self.num_layers > len(names):
      raise ValueError(
          f"num_layers must be an integer in [1, {len(names)}] (the number "
          f"of layers of params: {names}), got {self.num_layers}"
      )
    return names, ids

  def init(self, params):
    self._layers(params)
    return LayerSelection(
        selected=jnp.full((self.num_layers,), -1, jnp.int32),
        refreshes=jnp.zeros((), jnp.int32),
    )

  def select(self, step, state):
    names, ids = self._layers(step.params)
    num = len(names)
    leaves, treedef = jax.tree.flatten(step.grads)

    def choose(_):
      sq = [jnp.zeros((), jnp.float32) for _ in range(num)]
      for i, x in zip(ids, leaves):
        sq[i] = sq[i] + jnp.sum(jnp.square(x.astype(jnp.float32)))
      norms = jnp.stack(sq)
      norms = jnp.where(jnp.isnan(norms), -jnp.inf, norms)
      _, top = jax.lax.top_k(norms, self.num_layers)
      return LayerSelection(
          selected=top.astype(jnp.int32),
          refreshes=state.refreshes + 1,
      )

    if self.select_every == 1:
      state = choose(None)
    else:
      state = jax.lax.cond(
          step.count % self.select_every == 0, choose, lambda _: state, None
      )
    chosen = jnp.zeros((num,), bool).at[state.selected].set(True, mode="drop")
    mask = jax.tree.unflatten(treedef, [chosen[i] for i in ids])
    return mask, state, jnp.zeros((), jnp.int32)


def fixed_layers(
    layers: LayerSpec, *, group_fn: Optional[GroupFn] = None
) -> FixedLayers:
  """A fixed layer region (see :class:`FixedLayers`); paths checked at init."""
  _check_group_fn(group_fn)
  if isinstance(layers, str):
    layers = (layers,)
  if callable(layers):
    return FixedLayers(layers=layers, group_fn=group_fn)
  try:
    layers = tuple(layers)
  except TypeError:
    layers = None
  if layers is None or not all(isinstance(p, str) for p in layers):
    raise ValueError(
        "layers must be None, a layer path (str), a sequence of layer paths "
        f"or a predicate on the path; got {layers!r}"
    )
  if not layers:
    raise ValueError("layers must name at least one layer; got an empty list")
  return FixedLayers(layers=layers, group_fn=group_fn)


def top_layers(
    num_layers: int = 2,
    *,
    select_every: int = 1,
    group_fn: Optional[GroupFn] = None,
) -> TopLayers:
  """A runtime layer selection (see :class:`TopLayers`)."""
  num_layers = base.static_int("num_layers", num_layers, 1)
  select_every = base.static_int("select_every", select_every, 1)
  _check_group_fn(group_fn)
  return TopLayers(
      num_layers=num_layers, select_every=select_every, group_fn=group_fn
  )


# --------------------------------------------------------------------------
# The preset and the ranking helper.
# --------------------------------------------------------------------------


def layerwise_sam(
    loss_fn: Callable,
    rho: base.ScalarOrSchedule = 0.1,
    alpha: base.ScalarOrSchedule = 0.8,
    *,
    num_layers: int = 2,
    select_every: int = 1,
    layers: Optional[LayerSpec] = None,
    group_fn: Optional[GroupFn] = None,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    eps: float = base.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Layer-wise SAM (Lee, KDD 2024, arXiv 2503.14205).

  A gradient-norm penalty over a few critical layers ``S`` only::

      e_l   = rho * g_l / (sqrt(Σ_{j∈S} ‖g_j‖²) + eps)   for l ∈ S, else 0
      h_S   = ∇_{w_S} L_B(w + e)
      out_l = (1 - alpha) * g_l + alpha * h_l            for l ∈ S
      out_l = g_l                                        otherwise (exactly)

  ``S`` is either

  * fixed, ``layers=``: layer paths or a predicate on the path. The second
    evaluation differentiates the selected leaves only; the other leaves enter
    it as the very same arrays, so XLA shares the forward pass below ``S``
    with the caller's clean pass and backpropagates nothing below the lowest
    selected layer. This is the fast path: a step costs SGD plus the
    forward/backward of the layers from the lowest selected one up. Pick the
    set once from data with :func:`rank_layers`.
  * runtime (``layers=None``): the ``num_layers`` layers with the largest
    clean-gradient norm, re-chosen every ``select_every`` steps and kept in
    state (ties go to the lower layer index). Because the choice is
    data-dependent, the second gradient is a full one: a step costs about
    what :func:`sam_optax.gnp` costs.

  A layer is by default the innermost mapping holding arrays (a Flax module's
  ``{kernel, bias}``), named by its keys joined by "/"; see
  :func:`layer_paths`. With every layer selected and ``alpha = 1`` this is
  SAM with radius ``rho``.

  The paper's algorithm box was not available to us; the rule above is ours
  (ALGORITHMS.md §4), consistent with the paper's description and the
  author's GNP code. Defaults ``rho`` 0.1, ``alpha`` 0.8 (the GNP recipe),
  ``num_layers`` 2, ``select_every`` 1 [ours].

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    rho: radius, float or schedule.
    alpha: mixing weight in [0, 1], float or schedule.
    num_layers: runtime selection: how many layers, in [1, number of
      layers] (the upper bound is checked at ``init``).
    select_every: runtime selection: re-choose on steps with
      ``count % select_every == 0``; >= 1.
    layers: a fixed selection: a layer path, a sequence of paths, or a
      predicate ``path -> bool``; paths that name no layer fail at ``init``
      with the list of valid ones. ``num_layers`` and ``select_every`` are
      then unused.
    group_fn: ``leaf_path -> layer_name``, replacing the default grouping.
    has_aux, axis_name, eps: as in :func:`sam_optax.sam`. Under
      ``axis_name`` the layer norms come from the averaged gradient, so all
      devices select the same layers.

  Under ``optax.inject_hyperparams``, ``rho`` and ``alpha`` may be injected;
  the structural arguments must be static: ``static_args=("loss_fn",
  "num_layers", "select_every", "layers", "group_fn")``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``sam_optax.stats`` reports
    ``selected_layers`` (indices into :func:`layer_paths`), ``grad_evals``
    and, for a runtime selection, ``layer_refreshes``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(p, x):
    ...   h = jnp.tanh(x @ p["fc"]["kernel"] + p["fc"]["bias"])
    ...   return jnp.sum((h @ p["head"]["kernel"]) ** 2)
    >>> p = {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
    ...      "head": {"kernel": jnp.ones((4, 1))}}
    >>> tx = optax.chain(sam_optax.layerwise_sam(loss_fn, layers=["head"]),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(p)
    >>> x = jnp.ones((2, 3))
    >>> u, state = tx.update(jax.grad(loss_fn)(p, x), state, p, batch=x)
    >>> sam_optax.stats(state)["selected_layers"].tolist()
    [1]
  """
  num_layers = base.static_int("num_layers", num_layers, 1)
  select_every = base.static_int("select_every", select_every, 1)
  _check_group_fn(group_fn)
  if layers is None:
    region = top_layers(
        num_layers, select_every=select_every, group_fn=group_fn
    )
  else:
    region = fixed_layers(layers, group_fn=group_fn)
  return engine.sharpness_aware(
      loss_fn,
      rho,
      geometry=geometry_lib.global_norm(),
      region=region,
      combine=combine_lib.mix(alpha),
      has_aux=has_aux,
      axis_name=axis_name,
      eps=eps,
  )


def rank_layers(
    loss_fn: Callable,
    params: PyTree,
    batches: Iterable[Any],
    *,
    has_aux: bool = False,
    group_fn: Optional[GroupFn] = None,
) -> list[tuple[str, float]]:
  """Layers ranked by clean-gradient norm, averaged over a few batches.

  For each batch, ``n_l = ‖∇_{w_l} L_B(w)‖`` (float32); the result is every
  layer with the mean of its ``n_l`` over the batches, largest first (ties:
  lower layer index first). Use it to choose a fixed set for
  :func:`layerwise_sam`'s ``layers=``. One compiled gradient serves every
  batch of the same shapes.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    params: the parameters to rank at (e.g. after a short warm-up).
    batches: an iterable of batches (at least one).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    group_fn: as in :func:`layer_paths`.

  Returns:
    ``[(layer_path, mean_norm), ...]`` sorted by decreasing norm.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(x @ p["a"]["w"] + 3 * x @ p["b"]["w"])
    >>> p = {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(2)}}
    >>> [n for n, _ in sam_optax.rank_layers(loss_fn, p, [jnp.ones((1, 2))])]
    ['b', 'a']
  """
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
  _check_group_fn(group_fn)
  names, ids = _leaf_layers(params, group_fn)

  @jax.jit
  def layer_norms(p, batch):
    g = jax.grad(loss_fn, has_aux=has_aux)(p, batch)
    if has_aux:
      g = g[0]
    sq = [jnp.zeros((), jnp.float32) for _ in names]
    for i, x in zip(ids, jax.tree.leaves(g)):
      sq[i] = sq[i] + jnp.sum(jnp.square(x.astype(jnp.float32)))
    return jnp.sqrt(jnp.stack(sq))

  total = np.zeros(len(names), np.float64)
  count = 0
  for batch in batches:
    total += np.asarray(layer_norms(params, batch), np.float64)
    count += 1
  if count == 0:
    raise ValueError("batches must hold at least one batch, got none")
  mean = total / count
  order = sorted(range(len(names)), key=lambda i: (-mean[i], i))
  return [(names[i], float(mean[i])) for i in order]
