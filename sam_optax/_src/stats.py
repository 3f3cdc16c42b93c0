"""``stats(opt_state)``: the diagnostics of any (chained, wrapped) optax state."""

from __future__ import annotations

from typing import Any

import jax


def _children(node: Any):
  """(name, child) pairs of a container node, or None for a leaf."""
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    return [(f, getattr(node, f)) for f in node._fields]
  if isinstance(node, (tuple, list)):
    return [(str(i), c) for i, c in enumerate(node)]
  if isinstance(node, dict):
    return [(str(k), v) for k, v in node.items()]
  return None


def stats(opt_state: Any) -> dict[str, Any]:
  """A flat dict of the diagnostics found anywhere in an optax state.

  Walks chains, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``
  and any other nesting of tuples, lists, dicts and NamedTuples. Every
  sam_optax state contributes ``count`` and ``grad_evals`` plus its method's
  own entries (mask density, sampling rate, ...); ``inject_hyperparams``
  contributes its hyperparameters as ``hyperparams/<name>``.

  With one sam_optax state the keys are bare (``"grad_evals"``); with several,
  each key is prefixed by the state's path (``"1/grad_evals"``). Values are
  the arrays as stored (a leading device axis under ``pmap``).

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
      found.append(("/".join(path), node.stats()))
      return
    if hasattr(node, "hyperparams") and isinstance(
        getattr(node, "hyperparams"), dict
    ):
      for k, v in node.hyperparams.items():
        hyper[f"hyperparams/{k}"] = v
    kids = _children(node)
    if kids is None:
      return
    for name, child in kids:
      walk(child, path + [name])

  walk(opt_state, [])
  out: dict[str, Any] = {}
  if len(found) == 1:
    out.update(found[0][1])
  else:
    for path, entries in found:
      for k, v in entries.items():
        out[f"{path}/{k}" if path else k] = v
  out.update(hyper)
  return out
