"""Shared pieces: argument checks, tree helpers, float32 norms, schedules.

Everything a method needs more than once lives here, so that the engine and
the presets never carry a second copy of a mechanism.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, Iterable, Optional, Union

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
  """The value as a Python float, or None when it is traced or a schedule.

  Raises ValueError (the caller adds the argument's name) for what is not a
  real number: a complex number, a string, None, a list.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    raise ValueError(
        f"expected a real number or a schedule, got {value!r}"
    ) from None
  if arr.dtype.kind == "c":
    raise ValueError(f"expected a real number, got the complex {value!r}")
  if arr.dtype.kind == "b":
    # True would otherwise be read as 1.0: rho=True is a slip, not a radius.
    raise ValueError(f"expected a real number, got the boolean {value!r}")
  if arr.dtype.kind not in "biuf" and not jnp.issubdtype(arr.dtype, jnp.floating):
    raise ValueError(
        f"expected a real number or a schedule, got {value!r}"
    )
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
  [0, inf), got -1.0``. The value must be finite: ``inf`` and ``nan`` are
  outside every range (an unbounded side is written open). A complex number,
  a string or None is refused naming ``name``. Traced values are accepted
  unchecked. A callable is refused: these hyperparameters take a number (a
  schedule is checked by :func:`check_scalar_or_schedule`, for those that
  take one).
  """
  if callable(value):
    raise ValueError(
        f"{name} takes a number, not a schedule or other callable (only "
        f"the hyperparameters documented as 'float or schedule' take one), "
        f"got {value!r}")
  try:
    v = _concrete_float(value)
  except ValueError as err:
    raise ValueError(f"{name}: {err}") from None
  if v is None:
    return
  lo_s = "(" if low_open or low is None else "["
  hi_s = ")" if high_open or high is None else "]"
  rng = (
      f"{lo_s}{'-inf' if low is None else format(low, 'g')}, "
      f"{'inf' if high is None else format(high, 'g')}{hi_s}"
  )
  ok = bool(np.isfinite(v))
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


def inject_hint(name: str, value: Any) -> str:
  """The end of an error message for an argument that should be a callable
  and is an array: what ``optax.inject_hyperparams`` passes when it called
  the callable as a schedule of the step count."""
  if not (hasattr(value, "dtype") or isinstance(value, bool)):
    return ""
  return (
      f". Under optax.inject_hyperparams, a callable {name} (a predicate, a "
      "filter, an eqx.Module mask) is called as a schedule of the step count "
      f"and its value passed on: list {name!r} in static_args, "
      f"optax.inject_hyperparams(method, static_args=({name!r},))"
  )


def check_scalar_or_schedule(
    name: str, value: Any, low: Optional[float] = 0.0, **kw
) -> None:
  """Checks a hyperparameter that may be a float, an array or a schedule."""
  if callable(value):
    return
  check_range(name, value, low, **kw)


#: Seeds are 32-bit: ``jax.random.PRNGKey`` takes an unsigned 32-bit integer.
SEED_MAX = 2**32 - 1


def check_seed(name: str, value: Any) -> Any:
  """A random seed: an integer in [0, 2**32 - 1], checked at construction.

  A traced value (``optax.inject_hyperparams``) passes unchecked; a concrete
  JAX integer array is checked and returned as it is; a Python or NumPy
  integer is returned as a Python int.
  """
  if isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, jax.Array):
    arr = np.asarray(value)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(
          f"{name} must be an integer in [0, {SEED_MAX}], got an array "
          f"of dtype {arr.dtype} and shape {arr.shape}"
      )
    check_int(name, int(arr), 0, SEED_MAX)
    return value
  if (
      isinstance(value, (np.ndarray, np.generic))
      and np.ndim(value) == 0
      and np.issubdtype(np.asarray(value).dtype, np.integer)
  ):
    value = int(value)
  return check_int(name, value, 0, SEED_MAX)


def _leaf_dtype(x: Any) -> Any:
  dtype = getattr(x, "dtype", None)
  return np.dtype(dtype) if dtype is not None else np.result_type(x)


def check_params(params: PyTree, name: str = "params") -> None:
  """Raises ValueError naming the leaves of ``params`` that are not real floats.

  Every leaf is perturbed and differentiated, so it must be a floating-point
  array (float16, bfloat16, float32, float64). Refused, with the paths and
  dtypes of the offending leaves:

  - complex leaves: the perturbation geometry is real (a norm ball in
    ``R^n``); keep a complex weight as two real leaves (real and imaginary
    parts) and rebuild it inside ``loss_fn``;
  - integer and boolean leaves (step counters, embeddings' index tables, the
    gradient of ``jax.grad(..., allow_int=True)``): they cannot be
    perturbed. Freeze them: keep them out of the params the optimizer sees
    (put them in ``batch``, or split the model so that only float leaves are
    trained).

  - Python floats: every leaf must be an array (``jnp.asarray``).

  Empty and zero-size leaves and ``None`` (no leaf) are fine. Checked at
  ``init`` and again at ``update`` (a leaf's dtype can differ there).
  """
  complex_leaves, other_leaves, python_floats = [], [], []
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    try:
      dtype = _leaf_dtype(x)
    except Exception:  # pylint: disable=broad-except
      other_leaves.append(f"{path_str(path) or '<root>'} ({type(x).__name__})")
      continue
    where = f"{path_str(path) or '<root>'} ({dtype})"
    if jnp.issubdtype(dtype, jnp.complexfloating):
      complex_leaves.append(where)
    elif not jnp.issubdtype(dtype, jnp.floating):
      other_leaves.append(where)
    elif not hasattr(x, "dtype"):
      python_floats.append(f"{path_str(path) or '<root>'} ({x!r})")
  if complex_leaves:
    raise ValueError(
        f"{name} has complex leaves, which sam_optax does not support (the "
        f"perturbation is built in a real geometry): {complex_leaves}. Keep "
        f"each complex weight as two real leaves (real and imaginary parts) "
        f"and combine them inside loss_fn."
    )
  if other_leaves:
    raise ValueError(
        f"{name} has leaves that are not floating point: {other_leaves}. "
        f"Integer and boolean leaves cannot be perturbed or differentiated: "
        f"freeze them, i.e. keep them out of the params the optimizer sees "
        f"(pass them in batch, or split the model so that only the float "
        f"leaves are trained)."
    )
  if python_floats:
    raise ValueError(
        f"{name} has leaves that are Python floats, not arrays: "
        f"{python_floats}. Make them arrays (jnp.asarray(x, jnp.float32)) "
        f"or keep them out of the params the optimizer sees."
    )


def check_updates(updates: PyTree, params: PyTree) -> None:
  """Raises ValueError unless ``updates`` (the clean gradient given to
  ``update``) is shaped like ``params``: the same tree structure and the
  same shape leaf by leaf (:func:`check_same_structure`, no scalar standing
  for a tensor), and floating-point leaves (their dtype may differ from the
  parameter's, e.g. float32 gradients of bfloat16 weights).

  Otherwise a gradient leaf of shape ``(1, n)`` for an ``(n,)`` weight, or
  a scalar, would broadcast into the perturbed point ``w + e`` and into the
  output (``apply_updates`` then changes the weight's shape for good), and
  an integer gradient would have the method's float result cast back to
  integers (truncated, usually to 0). Checked when the step is traced.
  """
  name = "updates (the gradient passed to tx.update)"
  check_same_structure(updates, params, name, scalars=False)
  bad = []
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    try:
      dtype = _leaf_dtype(u)
    except Exception:  # pylint: disable=broad-except
      dtype = type(u).__name__
    if not isinstance(dtype, np.dtype) or not jnp.issubdtype(dtype, jnp.floating):
      bad.append(f"{path_str(path) or '<root>'} ({dtype})")
  if bad:
    raise ValueError(
        f"{name} must have floating-point leaves (the method's result would "
        f"otherwise be cast to their dtype): {bad}"
    )


def resolve(value: ScalarOrSchedule, count: Array,
            name: str = "a hyperparameter") -> Array:
  """The value of hyperparameter ``name`` at step ``count``, as float32.

  Its shape is checked when the step is traced (a schedule's value or an
  ``optax.inject_hyperparams`` value of shape ``(1,)`` would otherwise
  broadcast into the update and change its shape). Its range is not: see
  the docs' "Hyperparameters" section for what a value out of range at run
  time does.
  """
  if callable(value):
    value = value(count)
  out = jnp.asarray(value, jnp.float32)
  if out.shape != ():
    raise ValueError(
        f"{name} must be a scalar at every step: its value at step count "
        f"(from a schedule or optax.inject_hyperparams) has shape "
        f"{out.shape}; return a scalar (e.g. jnp.squeeze(x) or x[0])"
    )
  return out


# --------------------------------------------------------------------------
# Tree helpers.
# --------------------------------------------------------------------------


def raw_key(key: Any) -> Any:
  """One path entry as its key: a dict key, an attribute name or an index
  (what Flax NNX paths hold)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def key_name(key: Any) -> str:
  """One path entry as text: a dict key, an attribute name or an index."""
  return str(raw_key(key))


def path_str(path: tuple[Any, ...]) -> str:
  """A tree path as the keys from the root joined by '/' ("params/dense/kernel")."""
  return "/".join(key_name(k) for k in path)


def leaf_paths(tree: PyTree) -> list[str]:
  """The '/'-joined path of every leaf, in ``jax.tree.leaves`` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(
    tree: PyTree, params: PyTree, name: str, *, shapes: bool = True,
    scalars: bool = True,
) -> None:
  """Raises ValueError naming ``name`` and the paths where trees differ.

  ``tree`` must have the structure of ``params`` and, when ``shapes`` is
  True, every leaf the shape of the matching parameter (with ``scalars``, a
  scalar leaf stands for a whole parameter tensor and is accepted too).
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
        if np.shape(t_paths[k]) != np.shape(p_paths[k])
        and not (scalars and np.shape(t_paths[k]) == ())
    ]
    if bad:
      raise ValueError(f"{name} leaves differ in shape from params: {bad}")


def tree_sq_norm(tree: PyTree) -> Array:
  """Sum of squares over all leaves, accumulated in float32.

  Cheap, and right whenever the result is representable, but the true value
  of a gradient with entries of 1e19 or more exceeds float32's range and
  this returns ``inf`` (and entries below ~1e-19 square to 0). Anything that
  only needs the norm, a ratio of norms or a projection must use the
  overflow-safe forms: :func:`tree_norm`, :func:`tree_projection_coef`,
  or scale by :func:`tree_scale` first.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def _maxima(leaves) -> list[Array]:
  """``max |x|`` of each leaf, float32 scalars: the one per-leaf reduction
  that the norm, the finiteness checks and the step's check share (XLA
  computes each once)."""
  return [jnp.max(jnp.abs(x.astype(jnp.float32))) for x in leaves]


def tree_max_abs(tree: PyTree) -> Array:
  """Largest absolute entry over all leaves, float32 (NaN if any is NaN;
  0 for a tree without entries)."""
  parts = _maxima(x for x in jax.tree.leaves(tree) if np.size(x))
  if not parts:
    return jnp.zeros((), jnp.float32)
  if len(parts) == 1:
    return parts[0]
  # The leaves' maxima are combined as uint32 bit patterns: for floats >= 0
  # (and NaN of either sign, whose patterns lie above inf's) the unsigned
  # order is the float order, so the result is the same. A float max of
  # the stacked maxima is rewritten by XLA into a chain of one max per leaf,
  # which its fusion then copies into every consumer of the result: a step
  # that keeps or drops 200 mask leaves on the gradients' finiteness
  # compiled 200 kernels of 200 maxima each (about 15 s on XLA:CPU). An
  # integer reduction stays one reduction.
  bits = jax.lax.bitcast_convert_type(jnp.stack(parts), jnp.uint32)
  return jax.lax.bitcast_convert_type(jnp.max(bits), jnp.float32)


def pow2_exponent(m: Array) -> Array:
  """The int32 exponent ``k`` with ``m * 2**-k`` in [0.5, 1): 0 for ``m``
  zero, negative or non-finite, clamped to [-125, 125] (float32's normal
  range). Read from the float32 bit pattern (``frexp``'s exponent), a few
  integer operations."""
  m = jnp.asarray(m, jnp.float32)
  ok = jnp.isfinite(m) & (m > 0)
  biased = (jax.lax.bitcast_convert_type(m, jnp.int32) >> 23) & 0xFF
  return jnp.where(ok, jnp.clip(biased - 126, -125, 125), 0)


def two_pow(k: Array) -> Array:
  """``2.0**k`` in float32 for an int32 ``k`` in [-126, 127], built as its
  bit pattern: two integer operations, where ``jnp.ldexp`` (which also
  handles subnormal and out-of-range results) is a few dozen."""
  return jax.lax.bitcast_convert_type(
      (jnp.asarray(k, jnp.int32) + 127) << 23, jnp.float32)


def pow2_scale(m: Array) -> Array:
  """A power of two ``s`` with ``m * s`` in [0.5, 1) (float32).

  Multiplying by a power of two is exact, so a tree scaled by ``s`` has the
  very same digits, only an exponent that cannot overflow or underflow when
  squared. ``s = 1`` for ``m`` zero or non-finite (so that NaN and inf
  propagate as they are); the exponent is clamped to float32's normal range.
  """
  return two_pow(-pow2_exponent(m))


def leaf_exponent(x: Array) -> Array:
  """:func:`pow2_exponent` of a leaf's ``max |x|`` (the same reduction as
  the norm's and the finiteness check's, which XLA computes once); 0 for an
  empty leaf."""
  if not np.size(x):
    return jnp.zeros((), jnp.int32)
  return pow2_exponent(_maxima([x])[0])


def times_pow2(x: Array, k: Array) -> Array:
  """``x * 2**k`` for an int32 ``k`` in [-252, 252] (clamped to it), as
  two multiplications by powers of two in float32's normal range (each
  exact), so neither scale overflows or flushes to 0 on its own: the
  result is ``inf`` or 0 only when ``x * 2**k`` itself is out of range."""
  k = jnp.clip(jnp.asarray(k, jnp.int32), -252, 252)
  half = k >> 1  # floor(k / 2): both halves in [-126, 126]
  return x * two_pow(half) * two_pow(k - half)


def tree_scale(tree: PyTree) -> Array:
  """``pow2_scale(tree_max_abs(tree))``: the exact rescaling of a whole tree
  that keeps its squared norm in float32's range."""
  return pow2_scale(tree_max_abs(tree))


#: The exponent given to a leaf without a nonzero entry by
#: :func:`tree_norm_exp`: below every real one, so it never sets the scale.
_NO_EXPONENT = -(2**20)


def tree_norm_exp(tree: PyTree, exps: Optional[PyTree] = None
                  ) -> tuple[Array, Array]:
  """The global L2 norm over all leaves as ``(n, k)``, ``‖tree‖ = n * 2**k``
  (``n`` float32, ``k`` int32), finite whenever the leaves are.

  The norm of finite float32 gradients can exceed float32's range (four
  entries of 2e38 have norm 4e38): ``n`` keeps the digits and ``k`` the
  exponent, so a ratio such as ``rho * g / ‖g‖`` is still computed
  (:func:`times_over_norm`). ``exps`` (optional, one int32 scalar per leaf,
  a tree of the structure of ``tree``) says that leaf ``i`` stands for
  ``leaf_i * 2**exps_i``: a tree already scaled leaf by leaf to keep a
  product such as ASAM's ``T**2 * g`` in range.

  Two levels, each scaled by a power of two before squaring: every leaf's
  norm is taken with the leaf scaled by :func:`pow2_scale` of its own
  ``max |x|``; the leaves' norms are then added as squares scaled by the
  largest leaf's exponent. So gradients of 1e19 to 3e38 and of 1e-20 give
  their true norm instead of ``inf`` or 0. Scaling by a power of two is
  exact, so for ordinary magnitudes the norm is the plain
  ``sqrt(sum(x**2))`` up to the order of summation and one more rounding
  (a leaf's norm is rounded once before it is squared again: a few float32
  ulps).

  Why per leaf: a leaf's sum of squares then waits only for that leaf's own
  maximum. With one scale for the whole tree, every leaf's sum waited for
  every leaf's maximum, and XLA:CPU's depth-first memory scheduler kept more
  of the gradient alive (SAM's peak on the benchmark's ResNet-50 layout was
  above ``optax.contrib.sam``'s with that scheduler, now below it). The
  leaves' exponents and norms are combined as vectors: a chain of one
  scalar term per leaf made SAM's step compile 1.8x slower on a 200-leaf
  model.

  A zero or empty tree gives ``(0, 0)``; a NaN entry gives a NaN ``n``; an
  infinite entry (and no NaN) an infinite ``n``.
  """
  leaves = jax.tree.leaves(tree)
  extra = ([None] * len(leaves) if exps is None
           else jax.tree.structure(tree).flatten_up_to(exps))
  pairs = [(x, e) for x, e in zip(leaves, extra) if np.size(x)]
  if not pairs:
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
  norms, leads = [], []
  for (x, e), mx in zip(pairs, _maxima([x for x, _ in pairs])):
    ex = pow2_exponent(mx)  # 0 for a zero, inf or NaN leaf: they pass through
    own = two_pow(-ex)
    norms.append(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32) * own))))
    lead = ex if e is None else ex + jnp.asarray(e, jnp.int32)
    # A leaf without a nonzero entry (norm 0) must not set the scale.
    leads.append(jnp.where(mx == 0, jnp.int32(_NO_EXPONENT), lead))
  leads = jnp.stack(leads)
  # The largest by a sort: XLA fuses a max over these scalars (each made
  # from its leaf's reduction) into every consumer, here every leaf's
  # output: SAM's step on a 100-leaf MLP compiled 4x slower (see
  # step_finite).
  top = jnp.sort(leads)[-1]
  top = jnp.where(top == _NO_EXPONENT, 0, top)
  n = jnp.sqrt(jnp.sum(jnp.square(times_pow2(jnp.stack(norms), leads - top))))
  return n, top


def tree_norm(tree: PyTree) -> Array:
  """Global L2 norm over all leaves, in float32, overflow-safe
  (:func:`tree_norm_exp`); a norm beyond float32's range is ``inf``, one
  below it 0. A zero or empty tree gives 0; a NaN entry gives NaN; an
  infinite entry (and no NaN) gives ``inf``. To divide by a norm, use
  :func:`times_over_norm`, which never forms it."""
  n, k = tree_norm_exp(tree)
  return times_pow2(n, k)


def times_over_norm(tree: PyTree, num: Array, norm: tuple[Array, Array],
                    eps: Any = 0.0, *, exps: Optional[PyTree] = None,
                    num_exp: Any = 0) -> PyTree:
  """``x * (num * 2**num_exp) / (‖.‖ + eps)`` for every leaf ``x`` of
  ``tree``, float32, with the norm given as :func:`tree_norm_exp`'s ``(n,
  k)`` and leaf ``i`` standing for ``x * 2**exps_i`` (``exps`` as there).

  Every factor is kept as digits and a power of two: ``‖.‖ + eps = d *
  2**k`` (``d = n + eps * 2**-k``, at least 0.5 for a nonzero tree and, for
  ``eps < 1``, at most ``sqrt(size) + 2**125``, as ``k >= -125`` without
  ``exps``) and ``num = m * 2**M`` with ``m`` in [0.5, 1), so ``q = m /
  d`` is a normal float32; leaf ``i`` is then ``x * q * 2**E_i``, ``E_i =
  M + num_exp + exps_i - k``, computed as ``(x * c1) * c2``: ``c1`` is
  ``q`` times the part of ``2**E_i`` that keeps it a normal float32, ``c2``
  the power of two left over (1 unless the result is near or past
  float32's range). So the result overflows or underflows only where its
  exact value does: a norm past float32's range, or so small that ``num /
  norm`` or ``eps``'s share would leave it, still gives the rule's value.
  For ordinary values ``c1`` is exactly ``num / (norm + eps)`` and ``c2`` is
  1: bit for bit ``x * (num / (norm + eps))``.

  Without ``exps`` the two scalars are the same for every leaf (XLA makes
  them once): two multiplications per entry. Scaling every leaf by its own
  power of two first (one scalar of its own per leaf) gave the same values
  and similar compiled peaks, but SAM's step compiled about 15% slower on
  the benchmark's transformer; the shared scales of an earlier version
  (``x * 2**h1 * 2**h2 * f``, three multiplications) held more memory
  (``docs/benchmark.md``).
  """
  n, k = norm
  num = jnp.asarray(num, jnp.float32)
  d = n + times_pow2(jnp.asarray(eps, jnp.float32), -k)
  # q = m / d with num = m * 2**M; then q = q1 * 2**Q, q1 in [0.5, 1).
  # (A zero, inf or NaN has exponent 0, so it passes through.)
  m_exp = pow2_exponent(jnp.abs(num))
  q = num * two_pow(-m_exp) / d
  q_exp = pow2_exponent(jnp.abs(q))
  q1 = q * two_pow(-q_exp)
  shared = q_exp + m_exp + num_exp - k

  def scales(total):
    e1 = jnp.clip(total, -120, 120)  # q1 * 2**e1 is a normal float32
    return q1 * two_pow(e1), two_pow(jnp.clip(total - e1, -126, 127))

  if exps is None:
    c1, c2 = scales(shared)
    return jax.tree.map(lambda x: x.astype(jnp.float32) * c1 * c2, tree)

  def one(x, e):
    c1, c2 = scales(shared + jnp.asarray(e, jnp.int32))
    return x.astype(jnp.float32) * c1 * c2

  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
      treedef, [one(x, e) for x, e in zip(leaves, treedef.flatten_up_to(exps))])


def tree_projection_coef(a: PyTree, b: PyTree, eps: float = 0.0) -> Array:
  """``<a, b> / (‖b‖² + eps)``, overflow-safe (float32).

  ``a`` and ``b`` are each scaled by the power of two that brings their
  largest entry to [0.5, 1) (``2**-ka``, ``2**-kb``), and the ratio
  ``<a', b'> / (‖b'‖² + eps 2**-2kb)`` is scaled back by ``2**(ka - kb)``:
  exact, so the coefficient is the rule's when ``b`` is 1e19 or more
  (instead of ``x / inf = 0`` or ``inf / inf = NaN``) and when ``a`` is
  many orders larger than ``b`` (GSAM's clean gradient of 1e38 against a
  second gradient of 1: ``<a, b>`` was ``inf``). It is ``inf`` only when
  the coefficient itself is past float32's range. A zero ``b`` with ``eps =
  0`` gives 0, not NaN.
  """
  ka = pow2_exponent(tree_max_abs(a))
  kb = pow2_exponent(tree_max_abs(b))
  a_s = jax.tree.map(lambda x: times_pow2(x.astype(jnp.float32), -ka), a)
  b_s = jax.tree.map(lambda x: times_pow2(x.astype(jnp.float32), -kb), b)
  den = tree_sq_norm(b_s) + times_pow2(jnp.asarray(eps, jnp.float32), -2 * kb)
  num = tree_vdot(a_s, b_s)
  ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), num * 0.0)
  return times_pow2(ratio, ka - kb)


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


def tree_select(pred: Array, a: PyTree, b: PyTree) -> PyTree:
  """``a`` where the scalar ``pred`` holds, else ``b``, leaf by leaf (a
  select, no ``lax.cond``)."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def concrete_bool(pred: Any) -> Any:
  """``pred`` as a Python bool when its value is known (a Python bool, or an
  array outside any trace: an eager call), else ``pred`` unchanged (a
  tracer, under jit, pmap, shard_map, grad)."""
  if isinstance(pred, (bool, np.bool_)):
    return bool(pred)
  if isinstance(pred, jax.core.Tracer):
    return pred
  return bool(pred)


def cond(pred: Any, true_fn: Callable, false_fn: Callable, operand: Any):
  """``lax.cond``, except that a ``pred`` known on the host (an eager call)
  runs its branch in Python: the same result, without tracing both
  branches again on every eager call (each call builds new closures, which
  ``lax.cond`` cannot cache), and without evaluating the other one."""
  pred = concrete_bool(pred)
  if isinstance(pred, bool):
    return true_fn(operand) if pred else false_fn(operand)
  try:
    return jax.lax.cond(pred, true_fn, false_fn, operand)
  except TypeError as err:
    if not _manual_axes() or "equal output types" not in str(err):
      raise
    mismatch = err
  # Under shard_map's typed values one branch may type an output as
  # varying over a mesh axis where the other does not (it keeps a state
  # leaf that the other computes from per-device values, e.g. with one
  # model per device): both branches' outputs are typed as their join.
  # Any other mismatch (shapes, dtypes, structure) is JAX's first error.
  shapes = [jax.eval_shape(f, operand) for f in (true_fn, false_fn)]
  if jax.tree.structure(shapes[0]) != jax.tree.structure(shapes[1]):
    raise mismatch
  left, right = (jax.tree.leaves(t) for t in shapes)
  if any(a.shape != b.shape or a.dtype != b.dtype
         for a, b in zip(left, right)) or all(
             _typed_axes(a) == _typed_axes(b) for a, b in zip(left, right)):
    raise mismatch
  axes = jax.tree.map(lambda a, b: _typed_axes(a) | _typed_axes(b), *shapes)

  def joined(f):
    @functools.wraps(f)
    def branch(x):
      return jax.tree.map(to_varying, f(x), axes)
    return branch

  return jax.lax.cond(pred, joined(true_fn), joined(false_fn), operand)


def _typed_axes(aval: Any) -> frozenset:
  """The mapped axes an abstract value (``jax.typeof``'s, or a
  ``jax.eval_shape`` result) is typed as varying over."""
  mat = getattr(aval, "manual_axis_type", None)
  varying = getattr(mat, "varying", None)
  if varying is None:
    varying = getattr(aval, "vma", ())
  return frozenset(varying or ())


INT32_MAX = int(np.iinfo(np.int32).max)


def saturating_add(counter: Array, n: Any) -> Array:
  """``counter + n`` for an int32 counter and an increment ``n >= 0``,
  stopping at int32's largest value instead of wrapping to a negative
  number (``optax.safe_increment``'s rule, for any increment)."""
  n = jnp.asarray(n, jnp.int32)
  return jnp.minimum(counter, INT32_MAX - n) + n


#: A mapped axis's name, or a tuple of names (a batch split over several).
AxisName = Union[str, tuple[str, ...]]


def pmean(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
  """``lax.pmean`` over ``axis_name``; the identity when it is None."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def check_axis_name(axis_name: Any) -> Optional[AxisName]:
  """``axis_name`` at construction: None, a name, or a non-empty tuple of
  distinct names (a batch split over several mesh axes; ``lax.pmean``
  reduces over all of them)."""
  if axis_name is None or isinstance(axis_name, str):
    return axis_name
  if (isinstance(axis_name, tuple) and axis_name
      and all(isinstance(a, str) for a in axis_name)
      and len(set(axis_name)) == len(axis_name)):
    return axis_name
  raise ValueError(
      "axis_name must be None, a string or a non-empty tuple of distinct "
      f"strings (the mapped axes the batch is split over), got {axis_name!r}")


def axis_names(axis_name: Optional[AxisName]) -> tuple[str, ...]:
  """``axis_name`` as a tuple of names (empty for None)."""
  if axis_name is None:
    return ()
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def varying_axes(x: Any) -> frozenset:
  """The mapped axes ``x`` is typed as varying over: known under
  ``shard_map`` with ``check_vma=True`` (JAX's default); empty under
  ``pmap``, ``shard_map(check_vma=False)`` and outside any map; empty
  for what is not a JAX array (a NumPy array, a string or a flag in the
  batch)."""
  if not isinstance(x, jax.Array):  # tracers are jax.Arrays too
    return frozenset()
  return _typed_axes(jax.typeof(x))


def tree_varying_axes(tree: PyTree) -> frozenset:
  """The mapped axes any leaf of ``tree`` is typed as varying over."""
  out = frozenset()
  for x in jax.tree.leaves(tree):
    out |= varying_axes(x)
  return out


def _axes_text(axes) -> str:
  return ", ".join(repr(a) for a in sorted(axes))


def _manual_axes() -> frozenset:
  """The mesh axes that are manual here: inside ``shard_map`` (and
  ``pmap``, which JAX runs as one); empty outside, and under a named
  ``vmap``."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  if get is None:
    return frozenset()
  return frozenset(getattr(get(), "manual_axes", ()) or ())


def check_mapped_axes(axis_name: Optional[AxisName], params: PyTree,
                      batch: PyTree) -> None:
  """At ``update`` (trace time): ``axis_name`` against the mapped axes.

  Every named axis must be bound (inside ``pmap`` / ``shard_map`` / a
  named ``vmap``). Where JAX types values by the mapped axes they vary
  over (``shard_map`` with ``check_vma=True``, its default), the batch
  must not vary over an axis that ``axis_name`` leaves out while the
  parameters do not: JAX would sum the transform's own gradients over it
  (a step as many times too large as the axis has devices); and the
  parameters must not vary over a named axis: sharded over it (FSDP by
  hand) or one model per device, the average over it would mix different
  parameters. Replicated parameters cast to varying for per-device
  gradients look the same, so the error says to pass them un-cast. Under
  ``pmap`` and ``shard_map(check_vma=False)`` nothing is typed, and a
  missing ``axis_name`` cannot be seen (the devices' states then drift
  apart).
  """
  names = axis_names(axis_name)
  for name in names:
    try:
      jax.lax.axis_size(name)
    except NameError:
      raise ValueError(
          f"axis_name={axis_name!r}: no mapped axis {name!r} is bound where "
          "update runs. Call update inside jax.pmap(..., axis_name=...) or "
          "jax.shard_map over a mesh with that axis, with the same name; "
          "under plain jax.jit (sharded arrays or one device) leave "
          "axis_name=None") from None
  param_axes = tree_varying_axes(params)
  shared = param_axes & set(names)
  if shared:
    raise ValueError(
        f"params vary over the mapped axis {_axes_text(shared)}, which "
        f"axis_name={axis_name!r} names. If they are replicated and were "
        "cast to varying (jax.lax.pcast) for a per-device gradient, pass "
        "the un-cast params to update: the transform makes its own "
        "gradients per device. Parameters sharded over that axis (FSDP "
        "inside shard_map) or one model per device are not supported with "
        "axis_name, since averaging over the axis would mix different "
        "parameters: shard them under jax.jit instead (no axis_name)")
  missing = tree_varying_axes(batch) - param_axes - set(names)
  if missing:
    hint = tuple(names) + tuple(sorted(missing))
    hint = repr(hint[0]) if len(hint) == 1 else repr(hint)
    raise ValueError(
        f"the batch varies over the mapped axis {_axes_text(missing)} "
        f"(shard_map) but axis_name={axis_name!r} does not name it, and the "
        "parameters are replicated over it: JAX would sum the transform's "
        "own gradients over those devices instead of averaging them (a "
        "step as many times too large as the axis has devices). Pass "
        f"axis_name={hint}: every axis the batch is split over, in the "
        "order of the batch's PartitionSpec")


def per_device(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
  """``tree`` typed as varying over every manual axis of ``axis_name``:
  a gradient w.r.t. it is then this device's own, whatever the batch is
  (also when the loss closes over the device's data).

  Under ``shard_map`` with ``check_vma=True`` (JAX's default), the gradient
  of a device-varying loss w.r.t. replicated (invariant) parameters is
  summed over the axis by the transpose of JAX's implicit ``pvary``: a
  per-example gradient would mix the devices' examples before it is
  squared, and a ``pmean`` after it would count the devices twice. Under
  ``pmap`` and ``shard_map(check_vma=False)`` the cast changes nothing;
  under a named ``vmap`` (no manual axis) nothing is cast.
  """
  if axis_name is None:
    return tree
  manual = _manual_axes()
  wanted = [a for a in axis_names(axis_name) if a in manual]
  if not wanted:
    return tree
  return jax.tree.map(lambda x: to_varying(x, wanted), tree)


def to_varying(x: Any, axes: Iterable[str]) -> Any:
  """``x`` typed as varying over ``axes`` too (``shard_map`` with
  ``check_vma=True``): a loop's initial carry must be typed like the
  values its body makes from varying inputs. Where JAX has no typed
  values (before ``pvary``), ``x`` as it is."""
  add = tuple(a for a in axes if a not in varying_axes(x))
  if not add:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, add, to="varying")
  if hasattr(jax.lax, "pvary"):  # the JAX releases before pcast
    return jax.lax.pvary(x, add)
  return x


def psum(tree: PyTree, axis_name: Optional[AxisName]) -> PyTree:
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def tree_f32(tree: PyTree) -> PyTree:
  """Every leaf as float32 (norms and statistics are kept in float32)."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def new_array(value: Any, dtype: Any) -> Array:
  """``value`` as a new array of ``dtype``, never the caller's own object.

  For a state leaf built from a hyperparameter: ``jnp.asarray`` returns its
  argument itself when it already has the dtype, and
  ``optax.inject_hyperparams`` passes every numeric hyperparameter as an
  array that it also keeps in its state; two state leaves would then be one
  buffer, and a train step that donates the state fails ("donate the same
  buffer twice").
  """
  return jnp.array(value, dtype, copy=True)


def full_like_f32(tree: PyTree, value: Any) -> PyTree:
  """A new float32 array filled with ``value`` per leaf of ``tree`` (each
  its own buffer, even for scalar leaves and an array ``value``: see
  :func:`new_array`)."""
  return jax.tree.map(
      lambda x: new_array(jnp.broadcast_to(value, jnp.shape(x)), jnp.float32),
      tree,
  )


def zeros_like_f32(tree: PyTree) -> PyTree:
  """float32 zeros shaped like each leaf, and typed like it under
  ``shard_map`` (varying over the axes it varies over), so that a sum
  started from them can be a loop's carry."""
  return jax.tree.map(
      lambda x: to_varying(jnp.zeros(jnp.shape(x), jnp.float32),
                           varying_axes(x)), tree)


def tree_all_finite(tree: PyTree) -> Array:
  """True when every entry of every floating leaf is finite (bool scalar).

  Computed as ``isfinite(tree_max_abs(...))`` (a NaN propagates through the
  max, an inf is the max): the per-leaf max-reductions are the very ones
  :func:`tree_norm` makes, so a step that checks a gradient it also takes
  the norm of compiles one reduction per leaf for both, not two.
  """
  leaves = [
      x for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  if not leaves:
    return jnp.ones((), bool)
  return jnp.isfinite(tree_max_abs(leaves))


# --------------------------------------------------------------------------
# The finiteness check of a step, in a form memory schedulers can interleave.
# --------------------------------------------------------------------------


def _checked(x: Any) -> bool:
  return bool(np.size(x)) and jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def num_checked(tree: PyTree) -> int:
  """The length of :func:`leaf_max_abs` of ``tree`` (static)."""
  return sum(1 for x in jax.tree.leaves(tree) if _checked(x))


def leaf_max_abs(tree: PyTree) -> Array:
  """``max |x|`` of every non-empty floating leaf of ``tree``, a float32
  vector in leaf order (NaN for a leaf with a NaN, inf for one with an inf
  and no NaN; shape ``(0,)`` for a tree without such leaves). The
  reductions are the very ones :func:`tree_max_abs` and :func:`tree_norm`
  make, so XLA computes each once."""
  parts = _maxima(x for x in jax.tree.leaves(tree) if _checked(x))
  if not parts:
    return jnp.zeros((0,), jnp.float32)
  return jnp.stack(parts)


def tie(x: Array, r: Array) -> Array:
  """``x`` unchanged, computed after the float scalar ``r``, which must be
  ``>= 0``, ``+inf`` or NaN (a ``max |.|``): ``where(not r < 0, x, -x)``,
  whose condition always holds, so every entry (signed zeros, NaN and inf
  included) is the one of ``x``. A data dependence the compiler keeps (an
  ``optimization_barrier`` is removed before XLA schedules), so that
  whatever consumes ``x`` (an optimizer's update of that leaf) is scheduled
  after ``r``; it fuses into that consumer."""
  return jnp.where(jnp.logical_not(r < 0), x, -x)


def tie_leaves(tree: PyTree, like: PyTree, maxabs: Array) -> PyTree:
  """``tree`` with each leaf :func:`tie`-d to the entry of ``maxabs`` (the
  :func:`leaf_max_abs` of ``like``, a tree of the same structure) of the
  matching leaf of ``like``; a leaf whose match is not checked (empty, not
  floating) is unchanged."""
  treedef = jax.tree.structure(like)
  out, j = [], 0
  for x, y in zip(treedef.flatten_up_to(tree), jax.tree.leaves(like)):
    if _checked(y):
      x, j = tie(x, maxabs[j]), j + 1
    out.append(x)
  return jax.tree.unflatten(treedef, out)


def step_finite(maxabs: Array) -> tuple[Array, Array]:
  """``(ok, top)`` from the per-leaf ``max |.|`` of everything a step
  checks (a float32 vector): ``top`` is the largest entry, NaN if any is
  NaN, taken by a sort (``jnp.sort`` orders NaN last), and ``ok`` is
  ``isfinite(top)``, true when every checked entry is finite.

  Why a sort: XLA fuses a max over scalars into each of its consumers,
  copying every leaf's reduction into them; a sort stays one instruction.
  The step makes its first output leaf depend on ``top`` (:func:`tie`) and
  its state's count on ``ok``: XLA:CPU's memory scheduler
  (``--xla_cpu_enable_concurrency_optimized_scheduler=false``, a depth-first
  order that visits first the output whose inputs are largest) then finds
  the count no larger than an update of a parameter, so it applies each
  leaf's update as soon as that leaf's gradient and check exist, instead of
  making every leaf of the gradient before the first update.
  """
  maxabs = jnp.ravel(maxabs).astype(jnp.float32)
  if maxabs.shape[0] == 0:
    return jnp.ones((), bool), jnp.zeros((), jnp.float32)
  top = jnp.sort(maxabs)[-1]
  return jnp.isfinite(top), top


def tie_first(tree: PyTree, r: Array, poison: bool = False) -> PyTree:
  """:func:`tie` of the first floating leaf of ``tree`` to ``r`` (the
  others unchanged); with ``poison``, that leaf is also all NaN when ``r``
  is not finite.

  ``r`` is the step's check (:func:`step_finite`'s ``top``): a step whose
  clean or second gradient is not finite leaves the state as it was, and
  its output must say so to ``optax.apply_if_finite`` and loss scalers.
  The engine poisons only where the output may not read the bad value (a
  perturbation restricted to a mask: Sparse SAM's second gradient does not
  read the clean gradient outside it); elsewhere a non-finite value reaches
  the output by itself, and an extra operation on the first leaf changed
  how XLA compiled its producer (planned and unplanned LookSAM then
  differed in rounding)."""
  leaves, treedef = jax.tree.flatten(tree)
  for i, x in enumerate(leaves):
    if _checked(x):
      x = tie(x, r)
      leaves[i] = jnp.where(jnp.isfinite(r), x, x * jnp.nan) if poison else x
      break
  return jax.tree.unflatten(treedef, leaves)
