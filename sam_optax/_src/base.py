"""Shared pieces: argument checks, tree helpers, float32 norms, schedules.

Everything a method needs more than once lives here, so that the engine and
the presets never carry a second copy of a mechanism.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
ScalarOrSchedule = Union[float, Array, Callable[[Array], Array]]

#: Guard added to every norm that divides; only avoids a division by zero.
DEFAULT_EPS = 1e-12


# --------------------------------------------------------------------------
# Argument checks. They run at construction time on Python numbers and on
# concrete arrays; a traced value (``optax.inject_hyperparams`` rebuilds the
# transform inside ``update`` with traced hyperparameters) or a schedule is
# not checked here: schedules are the caller's responsibility.
# --------------------------------------------------------------------------


def _concrete_float(value: Any) -> Optional[float]:
  """The value as a Python float, or None when it is traced or a schedule."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.shape != ():
    raise ValueError(f"expected a scalar, got an array of shape {arr.shape}")
  return float(arr)


def check_range(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """Raises ValueError naming ``name`` unless ``value`` lies in the range.

  The range is written the usual way in the message, e.g. ``rho must be in
  [0, inf), got -1.0``. Traced values and schedules are accepted unchecked.
  """
  try:
    v = _concrete_float(value)
  except ValueError as err:
    raise ValueError(f"{name}: {err}") from None
  if v is None:
    return
  lo_s = "(" if low_open else "["
  hi_s = ")" if high_open or high is None else "]"
  rng = (
      f"{lo_s}{'-inf' if low is None else format(low, 'g')}, "
      f"{'inf' if high is None else format(high, 'g')}{hi_s}"
  )
  ok = not np.isnan(v)
  if low is not None:
    ok &= v > low if low_open else v >= low
  if high is not None:
    ok &= v < high if high_open else v <= high
  if not ok:
    raise ValueError(f"{name} must be in {rng}, got {value!r}")


def check_int(
    name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None
) -> int:
  """A Python int in [low, high]; raises ValueError naming ``name`` if not."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if (low is not None and value < low) or (high is not None and value > high):
    rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(f"{name} must be an integer in {rng}, got {value}")
  return value


def static_int(
    name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None
) -> int:
  """A Python int for an argument that fixes a shape or a period.

  NumPy integer scalars are accepted. A JAX array, concrete or traced, is what
  ``optax.inject_hyperparams`` passes for every numeric argument not listed in
  its ``static_args``; it is refused here, at construction, with that hint.
  """
  if isinstance(value, jax.Array):  # tracers are jax.Arrays too
    raise ValueError(
        f"{name} must be an integer given as a Python int (it fixes a shape "
        f"or a period), got a JAX array; under optax.inject_hyperparams list "
        f"{name!r} in static_args"
    )
  if (
      isinstance(value, (np.ndarray, np.generic))
      and np.ndim(value) == 0
      and np.issubdtype(np.asarray(value).dtype, np.integer)
  ):
    value = int(value)
  return check_int(name, value, low, high)


def int_or_traced(name: str, value: Any, low: Optional[int] = None) -> Any:
  """An integer used only in arithmetic and comparisons, so it may be
  injected by ``optax.inject_hyperparams``: a traced value passes unchecked,
  a concrete array is checked and returned as it is."""
  if isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, jax.Array):
    arr = np.asarray(value)
    checked = int(arr) if arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer) else value
    check_int(name, checked, low)
    return value
  return static_int(name, value, low)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
    )
  return value


def check_scalar_or_schedule(
    name: str, value: Any, low: Optional[float] = 0.0, **kw
) -> None:
  """Checks a hyperparameter that may be a float, an array or a schedule."""
  if callable(value):
    return
  check_range(name, value, low, **kw)


def resolve(value: ScalarOrSchedule, count: Array) -> Array:
  """The value of a hyperparameter at step ``count``, as float32."""
  if callable(value):
    value = value(count)
  return jnp.asarray(value, jnp.float32)


# --------------------------------------------------------------------------
# Tree helpers.
# --------------------------------------------------------------------------


def key_name(key: Any) -> str:
  """One path entry as text: a dict key, an attribute name or an index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  """A tree path as the keys from the root joined by '/' ("params/dense/kernel")."""
  return "/".join(key_name(k) for k in path)


def leaf_paths(tree: PyTree) -> list[str]:
  """The '/'-joined path of every leaf, in ``jax.tree.leaves`` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(
    tree: PyTree, params: PyTree, name: str, *, shapes: bool = True
) -> None:
  """Raises ValueError naming ``name`` and the paths where trees differ.

  ``tree`` must have the structure of ``params`` and, when ``shapes`` is
  True, every leaf the shape of the matching parameter (a scalar leaf stands
  for a whole parameter tensor and is accepted too).
  """
  t_paths = dict(
      (path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  )
  p_paths = dict(
      (path_str(p), x)
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  )
  missing = sorted(set(p_paths) - set(t_paths))
  extra = sorted(set(t_paths) - set(p_paths))
  if missing or extra:
    raise ValueError(
        f"{name} does not match the structure of params: "
        f"missing paths {missing or 'none'}, unexpected paths {extra or 'none'}"
    )
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
        f"{name} has the leaf paths of params but another tree type: "
        f"{jax.tree.structure(tree)} vs {jax.tree.structure(params)}"
    )
  if shapes:
    bad = [
        f"{k}: {np.shape(t_paths[k])} vs {np.shape(p_paths[k])}"
        for k in p_paths
        if np.shape(t_paths[k]) not in ((), np.shape(p_paths[k]))
    ]
    if bad:
      raise ValueError(f"{name} leaves differ in shape from params: {bad}")


def tree_sq_norm(tree: PyTree) -> Array:
  """Sum of squares over all leaves, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def tree_norm(tree: PyTree) -> Array:
  """Global L2 norm over all leaves, in float32."""
  return jnp.sqrt(tree_sq_norm(tree))


def tree_vdot(a: PyTree, b: PyTree) -> Array:
  """Inner product over all leaves, accumulated in float32."""
  parts = jax.tree.leaves(
      jax.tree.map(
          lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)),
          a,
          b,
      )
  )
  return sum(parts) if parts else jnp.zeros((), jnp.float32)


def tree_cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def tree_where(mask: PyTree, a: PyTree, b: PyTree) -> PyTree:
  """Element-wise select; a mask leaf may be a scalar for a whole leaf."""
  return jax.tree.map(jnp.where, mask, a, b)


def pmean(tree: PyTree, axis_name: Optional[str]) -> PyTree:
  """``lax.pmean`` over ``axis_name``; the identity when it is None."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def psum(tree: PyTree, axis_name: Optional[str]) -> PyTree:
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def tree_f32(tree: PyTree) -> PyTree:
  """Every leaf as float32 (norms and statistics are kept in float32)."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def zeros_like_f32(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def tree_all_finite(tree: PyTree) -> Array:
  """True when every entry of every floating leaf is finite (bool scalar)."""
  flags = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.stack(flags).all() if flags else jnp.ones((), bool)
