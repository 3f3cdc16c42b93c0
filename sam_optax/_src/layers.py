"""Layers: how leaves group into layers, and a data-driven ranking of them.

A *layer* is a group of leaves. By default it is the object that holds the
leaf (a Flax module's ``{kernel, bias}``, an Equinox ``Linear``), named by
the keys from the root joined by "/" (``"fc"`` for ``variables["params"]``,
``"params/fc"`` for the whole variables dict, ``"layers/0"`` for an NNX
``nnx.List`` or an Equinox MLP's list of layers); a leaf directly under the
root (``{"w1": ..., "w2": ...}``) is a layer of its own. Leaves are grouped by their keys, not by the joined
name: two layers whose names coincide (a key holding "/") are refused.
``group_fn(leaf_path) -> layer_name`` replaces that grouping.
Layers are numbered in order of first appearance in ``jax.tree.leaves`` order
(:func:`layer_paths`); ``stats()`` reports a selection as those indices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np

from sam_optax._src import base

PyTree = Any
GroupFn = Callable[[str], str]


def _default_layer(path: tuple[Any, ...]) -> tuple[Any, ...]:
  """The path of the object holding the leaf at ``path``.

  The leaf's own entry is the last named key on its path (a mapping key or
  an attribute); what the leaf's object adds after a mapping key (an NNX
  ``Variable``'s ``.value``, a registered dataclass's field) belongs to
  that key's entry. So a Flax module's ``{kernel, bias}`` is one layer,
  and so is an Equinox ``Linear``'s ``weight`` and ``bias``, at the root
  or under a dict key. A leaf reached through sequences only belongs to
  its immediate container; a leaf directly under the root
  (``{"w1": ..., "w2": ...}``, a tuple of arrays) is a layer of its own.
  """
  named = (jax.tree_util.DictKey, jax.tree_util.GetAttrKey)
  own = None
  for i, k in enumerate(path):
    if isinstance(k, named):
      own = i
  if (own is not None and own == len(path) - 1 and own > 0
      and isinstance(path[own], jax.tree_util.GetAttrKey)
      and isinstance(path[own - 1], jax.tree_util.DictKey)):
    own -= 1
  end = len(path) - 1 if own is None else own
  return tuple(path[: max(end, 1)])


def layer_groups(params: PyTree, group_fn: Optional[GroupFn]):
  """(layer names, each layer's keys from the root, layer index of every
  leaf), layers in order of first appearance.

  With the default grouping a layer's keys are its path's entries as text
  (``("params", "fc")``), and leaves are grouped on them, so a key holding
  "/" never merges two modules; two layers whose '/'-joined names coincide
  are refused (a name must say which layer it is). With ``group_fn`` a
  layer is the name it returns, its keys that name split on "/".
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names: list[str] = []
  keys: list[tuple[str, ...]] = []
  index: dict[Any, int] = {}
  ids: list[int] = []
  for path, _ in flat:
    if group_fn is None:
      entries = _default_layer(path)
      group = entries
      name = base.path_str(entries)
      text = tuple(base.key_name(k) for k in entries)
    else:
      name = group_fn(base.path_str(path))
      if not isinstance(name, str):
        raise ValueError(
            "group_fn must return a layer name (str) for every leaf path; got "
            f"{name!r} for {base.path_str(path)!r}"
        )
      group, text = name, tuple(name.split("/")) if name else ()
    if group not in index:
      index[group] = len(names)
      names.append(name)
      keys.append(text)
    ids.append(index[group])
  if not names:
    raise ValueError("params has no leaves: there is no layer to select")
  if len(set(names)) < len(names):
    seen: dict[str, tuple[str, ...]] = {}
    for name, k in zip(names, keys):
      if name in seen:
        raise ValueError(
            f"params has two layers named {name!r}: the keys {seen[name]} and "
            f"{k} join to the same path (a key contains '/'). Rename the key, "
            "or pass group_fn (leaf path -> layer name) to name the layers."
        )
      seen[name] = k
  return names, keys, ids


def leaf_layers(params: PyTree, group_fn: Optional[GroupFn]):
  """(layer names in order of first appearance, layer index of every leaf)."""
  names, _, ids = layer_groups(params, group_fn)
  return names, ids


def filled_layers(params: PyTree, group_fn: Optional[GroupFn]) -> list[int]:
  """Indices of the layers that hold at least one entry. A layer whose
  leaves are all zero-size has nothing to perturb: the selections by depth,
  by gradient norm and by sharpness never choose one (it would take a
  slot from a real layer and leave the step SGD on it)."""
  names, ids = leaf_layers(params, group_fn)
  sizes = [0] * len(names)
  for i, x in zip(ids, jax.tree.leaves(params)):
    sizes[i] += int(np.size(x))
  return [i for i, n in enumerate(sizes) if n > 0]


def check_num_layers(params: PyTree, group_fn: Optional[GroupFn],
                     num_layers: int) -> None:
  """``num_layers`` against the layers with entries
  (:func:`filled_layers`)."""
  filled = filled_layers(params, group_fn)
  if num_layers > len(filled):
    names, _ = leaf_layers(params, group_fn)
    empty = [names[i] for i in range(len(names)) if i not in filled]
    without = (f"; without the layers that hold no entries: {empty}"
               if empty else "")
    raise ValueError(
        f"num_layers must be an integer in [1, {len(filled)}] (the number "
        f"of layers of params: {names}{without}), got {num_layers}"
    )


def layer_paths(
    params: PyTree, *, group_fn: Optional[GroupFn] = None
) -> list[str]:
  """The layer names of a params tree, in the order ``stats()`` indexes them.

  A layer is the innermost mapping holding arrays (a Flax module's ``{kernel,
  bias}``), named by its keys from the root joined by "/"; a leaf directly
  under the root is a layer of its own. ``group_fn`` maps a leaf's
  "/"-joined path to its layer name instead. Two layers whose names
  coincide (a key containing "/") raise a ValueError.

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> p = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...      "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}
    >>> sam_optax.layer_paths(p)
    ['fc', 'head']
    >>> sam_optax.layer_paths(p, group_fn=lambda path: path.split("/")[-1])
    ['bias', 'kernel']
    >>> sam_optax.layer_paths({"w1": jnp.ones(2), "w2": jnp.ones(2)})
    ['w1', 'w2']
  """
  check_group_fn(group_fn)
  return leaf_layers(params, group_fn)[0]


def check_group_fn(group_fn):
  if group_fn is not None and not callable(group_fn):
    raise ValueError(
        "group_fn must be a callable (leaf path str -> layer name str) or "
        f"None, got {group_fn!r}{base.inject_hint('group_fn', group_fn)}"
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
  check_group_fn(group_fn)
  names, ids = leaf_layers(params, group_fn)

  # The batch's non-array leaves (a Python bool flag, a string) are static:
  # loss_fn may branch on them in Python, as in the user's own call.
  @functools.partial(jax.jit, static_argnums=2)
  def layer_norms(p, arrays, rest):
    g = jax.grad(loss_fn, has_aux=has_aux)(p, split_batch(rest, arrays))
    if has_aux:
      g = g[0]
    scale = base.tree_scale(g)  # a power of two: exact, no overflow
    return jnp.sqrt(layer_sq_norms(g, ids, len(names), scale)) / scale

  total = np.zeros(len(names), np.float64)
  count = 0
  for batch in batches:
    arrays, rest = split_batch(batch)
    total += np.asarray(layer_norms(params, arrays, rest), np.float64)
    count += 1
  if count == 0:
    raise ValueError("batches must hold at least one batch, got none")
  mean = total / count
  order = sorted(range(len(names)), key=lambda i: (-mean[i], i))
  return [(names[i], float(mean[i])) for i in order]


def layer_sq_norms(
    tree: PyTree, ids: list[int], num: int, scale: Any = None
) -> jax.Array:
  """float32 ``[num]``: the squared norm of each layer's leaves of ``tree``
  times ``scale`` (default: ``base.tree_scale``, a power of two that keeps
  the squares of 1e20 gradients finite and the order of the layers)."""
  scale = base.tree_scale(tree) if scale is None else scale
  sq = [jnp.zeros((), jnp.float32) for _ in range(num)]
  for i, x in zip(ids, jax.tree.leaves(tree)):
    sq[i] = sq[i] + jnp.sum(jnp.square(x.astype(jnp.float32) * scale))
  return jnp.stack(sq)


def match_layers(
    names: list[str],
    wanted: Iterable[str],
    keys: Optional[list[tuple[str, ...]]] = None,
) -> list[int]:
  """Indices of the layers named by ``wanted``, matched on a path suffix.

  ``"head"`` names the layer ``"head"`` and also ``"params/head"`` (a Flax
  linen variables dict) or ``"model/head"``: every layer whose last keys,
  joined by "/", are ``"head"`` (a suffix ends at a key boundary: ``"b"``
  does not name the layer under the key ``"a/b"``). A name matching no
  layer raises a ValueError listing the layer paths; a name matching more
  than one (``"Dense_0"`` with layers ``"Dense_0"`` and
  ``"ScanBlock_0/Dense_0"``, even though one is exact) raises one listing
  the candidates: give a longer path, or a predicate (``layers=lambda
  path: path == "Dense_0"``).

  Args:
    names: the layer names (:func:`layer_paths`).
    wanted: the names to find.
    keys: each layer's keys from the root (:func:`layer_groups`); by
      default its name split on "/".
  """
  if keys is None:
    keys = [tuple(n.split("/")) if n else () for n in names]
  chosen = set()
  for w in wanted:
    hits = [
        i for i, k in enumerate(keys)
        if any("/".join(k[j:]) == w for j in range(len(k)))
        or (w == "" and not k)
    ]
    if not hits:
      raise ValueError(
          f"layers: {w!r} names no layer of params; valid paths: {names}"
      )
    if len(hits) > 1:
      raise ValueError(
          f"layers: {w!r} matches several layers {[names[i] for i in hits]} "
          "(an ambiguous name); give a longer path to choose one, or "
          f"a predicate (layers=lambda path: path == {names[hits[0]]!r})"
      )
    chosen.add(hits[0])
  return sorted(chosen)


# --------------------------------------------------------------------------
# The output side, from the loss's computation graph.
# --------------------------------------------------------------------------

def _bodies(eqn) -> list:
  """The sub-programs of an equation, each with the equation's inputs that
  feed its inputs and the outputs its outputs feed: a call-like one (a
  jitted module, ``jax.checkpoint``), a ``scan`` (one iteration: consts,
  carry and slices in, carry and slices out), each branch of a ``cond``
  (after the index) and a ``while``'s body; none for a custom derivative
  (see :data:`_CUSTOM`)."""
  params = eqn.params
  name = eqn.primitive.name
  if name in _CUSTOM:
    return []
  if name == "cond":
    return [(b, eqn.invars[1:], eqn.outvars) for b in params["branches"]]
  if name == "while":
    skip = params["cond_nconsts"]
    return [(params["body_jaxpr"], eqn.invars[skip:], eqn.outvars)]
  return [(v, eqn.invars, eqn.outvars) for v in params.values()
          if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]


#: Primitives whose body is the primal of a custom derivative: the gradient
#: follows the custom rule, which the walk cannot see, so such a call is
#: one step from its inputs to its outputs (a quantized layer's integer
#: forward, an activation with its own derivative).
_CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def _edges(jaxpr, edges: list, scope: tuple = ()) -> None:
  """(inputs, outputs) per equation, with the sub-programs of equations
  that have them inlined (every primitive that carries a program in its
  parameters, so a checkpointed, scanned or branched model is walked like
  a plain one); an equation whose sub-program does not line up with its
  inputs and outputs is one step. Only paths a gradient can take count:
  none through ``stop_gradient`` or into a non-float value (a comparison,
  an integer cast), so a layer used only behind them is not near the
  loss; a custom derivative's call is one step (its gradient follows its
  own rule, not its forward). Variables are keyed by ``scope`` (the
  inlining sites above them): JAX shares one program between the call
  sites of a function traced once (a ``jax.checkpoint`` or ``jit``
  function, a scan body used twice), and each site's copy has its own
  depth."""
  key = lambda v: v if isinstance(v, jex_core.Literal) else (scope, v)  # noqa: E731
  for n, eqn in enumerate(jaxpr.eqns):
    inlined = False
    for j, (body, ins, outs) in enumerate(_bodies(eqn)):
      inner = getattr(body, "jaxpr", body)
      if len(inner.invars) != len(ins) or len(inner.outvars) != len(outs):
        continue
      site = scope + ((n, j),)
      inner_key = lambda v, site=site: (  # noqa: E731
          v if isinstance(v, jex_core.Literal) else (site, v))
      for a, b in zip(ins, inner.invars):
        edges.append(([key(a)], [inner_key(b)]))
      _edges(inner, edges, site)
      for a, b in zip(inner.outvars, outs):
        edges.append(([inner_key(a)], [key(b)]))
      inlined = True
    if inlined:
      continue
    if eqn.primitive.name == "stop_gradient":
      continue  # no gradient flows back through stop_gradient
    # Only float outputs carry a gradient back (a comparison, an argmax,
    # an integer cast do not).
    outs = [key(v) for v in eqn.outvars if _carries_gradient(v)]
    if outs:
      edges.append(([key(v) for v in eqn.invars], outs))


def _carries_gradient(v) -> bool:
  aval = getattr(v, "aval", None)
  dtype = getattr(aval, "dtype", None)
  return dtype is None or jnp.issubdtype(dtype, jnp.inexact)


def _is_array(x: Any) -> bool:
  """An array leaf (a JAX array or tracer, a NumPy array or scalar)."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


class _StaticLeaves:
  """A batch's structure and its non-array leaves, hashable (a jit static
  argument) when those leaves are."""

  def __init__(self, treedef, where, leaves):
    self.treedef, self.where, self.leaves = treedef, tuple(where), leaves

  def _key(self):
    return (self.treedef, self.where,
            tuple(x for i, x in enumerate(self.leaves) if i not in self.where))

  def __hash__(self):
    try:
      return hash(self._key())
    except TypeError:
      return id(self)  # an unhashable leaf: no cache across batches

  def __eq__(self, other):
    if not isinstance(other, _StaticLeaves):
      return False
    try:
      return self._key() == other._key()
    except Exception:  # pylint: disable=broad-except
      return self is other


def split_batch(batch: Any, arrays: Optional[list] = None) -> Any:
  """``split_batch(batch) -> (arrays, rest)``: the batch's array leaves,
  and the rest (its structure and non-array leaves: a Python bool flag, a
  string, a float, which ``loss`` may branch on in Python).
  ``split_batch(rest, arrays)`` puts a batch back together."""
  if arrays is not None:
    full = list(batch.leaves)
    for i, x in zip(batch.where, arrays):
      full[i] = x
    return jax.tree.unflatten(batch.treedef, full)
  leaves, treedef = jax.tree.flatten(batch)
  where = [i for i, x in enumerate(leaves) if _is_array(x)]
  statics = [None if i in where else x for i, x in enumerate(leaves)]
  return [leaves[i] for i in where], _StaticLeaves(treedef, where, statics)


def _shape_of(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def leaf_depths(loss: Callable, params: PyTree, batch: Any) -> list[float]:
  """For every leaf of ``params``: the longest chain of operations from it
  to the loss (inf when the loss does not use it). Traced once from shapes;
  nothing runs.

  The batch's array leaves are traced from their shapes; its other leaves
  (a Python bool flag, a string, a float), which ``loss`` may branch on in
  Python, are passed as they are, as in the user's own call.
  """
  arrays, rest = split_batch(batch)
  closed = jax.make_jaxpr(lambda p, a: loss(p, split_batch(rest, a)))(
      jax.tree.map(_shape_of, params), [_shape_of(x) for x in arrays]
  )
  jaxpr = closed.jaxpr
  edges: list = []
  _edges(jaxpr, edges)
  depth = {}
  for v in jaxpr.outvars:
    if not isinstance(v, jex_core.Literal):
      depth[((), v)] = 0
  for ins, outs in reversed(edges):
    d = max((depth[o] for o in outs if o in depth), default=None)
    if d is None:
      continue
    for v in ins:
      if not isinstance(v, jex_core.Literal):
        depth[v] = max(depth.get(v, -1), d + 1)
  n = len(jax.tree.leaves(params))
  return [float(depth.get(((), v), np.inf)) for v in jaxpr.invars[:n]]


def output_layers(
    loss: Callable, params: PyTree, batch: Any, num: int,
    group_fn: Optional[GroupFn] = None,
) -> list[int]:
  """The ``num`` layers nearest the loss (the output side), as indices into
  :func:`layer_paths`: ranked by the longest chain of operations from any of
  their leaves to the loss, shortest first (ties: the later layer)."""
  names, ids = leaf_layers(params, group_fn)
  layer_depth = [np.inf] * len(names)
  for i, d in zip(ids, leaf_depths(loss, params, batch)):
    layer_depth[i] = min(layer_depth[i], d)
  filled = filled_layers(params, group_fn)
  order = sorted(filled, key=lambda i: (layer_depth[i], -i))
  return sorted(order[:num])
