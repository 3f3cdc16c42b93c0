"""``stats(opt_state)``: the diagnostics of any (chained, wrapped) optax state."""

from __future__ import annotations

import collections.abc
import sys
from typing import Any

import jax
import numpy as np


def children(node: Any):
  """(name, child) pairs of a container node, or None for a leaf."""
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    return [(f, getattr(node, f)) for f in node._fields]
  if isinstance(node, (tuple, list)):
    return [(str(i), c) for i, c in enumerate(node)]
  if isinstance(node, collections.abc.Mapping):  # dict, nnx.State
    return [(str(k), v) for k, v in node.items()]
  return None


def _unwrap(tree: Any) -> Any:
  """Replaces Flax NNX variables (``nnx.OptState``, ``nnx.Variable``) by the
  arrays they hold; other trees are returned as they are. Flax is not
  imported here: without it loaded there is nothing to unwrap."""
  nnx = sys.modules.get("flax.nnx")
  variable = getattr(nnx, "Variable", None)
  if variable is None:
    return tree
  is_var = lambda x: isinstance(x, variable)  # noqa: E731
  return jax.tree.map(
      lambda x: x.value if is_var(x) else x, tree, is_leaf=is_var
  )


def _node_stats(node: Any) -> dict[str, Any]:
  """``node.stats()``, per device for a state stacked by ``pmap``.

  A sam_optax state's ``count`` is a scalar; a leading axis on it means the
  state was returned by ``pmap`` (one copy per device). Some diagnostics
  reduce over a whole tree (``mask_density``), so they are computed for each
  copy (``vmap``) and every value keeps the device axis.
  """
  count = getattr(node, "count", None)
  ndim = np.ndim(count) if count is not None else 0
  fn = lambda n: n.stats()  # noqa: E731
  for _ in range(ndim):
    fn = jax.vmap(fn)
  return fn(node)


def stats(opt_state: Any) -> dict[str, Any]:
  """A flat dict of the diagnostics found anywhere in an optax state.

  Walks chains, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``
  and any other nesting of tuples, lists, dicts and NamedTuples. Every
  sam_optax state contributes ``count`` and ``grad_evals`` plus its method's
  own entries (mask density, sampling rate, ...); ``inject_hyperparams``
  contributes its hyperparameters as ``hyperparams/<name>``.

  The counters (``count``, ``grad_evals``, ``mask_refreshes``,
  ``layer_refreshes``, ``steps_since_sample``, ...) are int32 and saturate
  at ``2**31 - 1`` (``optax.safe_increment``'s rule): they never wrap to a
  negative value. Past that many steps, ``count`` stays at its largest
  value, and so does every decision read from it.

  With one sam_optax state the keys are bare (``"grad_evals"``); with several,
  each key is prefixed by the state's path (``"1/grad_evals"``). Values are
  JAX arrays:

  - for a state returned by ``pmap`` (leaves with a leading device axis),
    every value has that device axis, ``mask_density`` included (it is
    computed per device); with ``axis_name`` set the copies are identical,
    so ``v[0]`` is the value;
  - under ``shard_map``, sharded ``jit``, or inside the compiled step, the
    values are the unstacked (global) ones;
  - for a Flax ``nnx.Optimizer``'s ``opt_state`` (or an ``nnx.State``), the
    ``nnx.OptState`` / ``nnx.Variable`` wrappers are unwrapped: the values
    are the arrays they hold.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.sam(lambda w, b: jnp.sum(w * b)),
    ...                  optax.sgd(0.1))
    >>> sorted(sam_optax.stats(tx.init(jnp.ones(2))))
    ['count', 'grad_evals']
  """
  found: list[tuple[str, dict[str, Any]]] = []
  hyper: dict[str, Any] = {}

  def walk(node, path):
    if hasattr(node, "stats") and hasattr(node, "_fields"):
      found.append(("/".join(path), _node_stats(node)))
      return
    if hasattr(node, "hyperparams") and isinstance(
        getattr(node, "hyperparams"), dict
    ):
      for k, v in node.hyperparams.items():
        hyper[f"hyperparams/{k}"] = v
    kids = children(node)
    if kids is None:
      return
    for name, child in kids:
      walk(child, path + [name])

  walk(_unwrap(opt_state), [])
  out: dict[str, Any] = {}
  if len(found) == 1:
    out.update(found[0][1])
  else:
    for path, entries in found:
      for k, v in entries.items():
        out[f"{path}/{k}" if path else k] = v
  out.update(hyper)
  return out
