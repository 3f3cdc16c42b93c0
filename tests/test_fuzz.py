"""Property-based tests of every constructor (hypothesis).

1. Arguments: for each constructor, every argument has a strategy of valid
   values and one of invalid values. A drawn case mixes them: with any
   invalid argument the constructor must raise ``ValueError`` naming one of
   the invalid arguments; with none it must build, init and take a step with
   a finite output.
2. Parameter trees and non-finite steps: random trees (float32, bfloat16 and
   float16 leaves, scalars, zero-size leaves, ``None``, nesting) with a NaN or
   inf injected at a random step into the gradient or the batch. Steps before
   it must give finite outputs; the poisoned step's output must carry the
   non-finite value; later steps are recorded, and asserted finite where the
   non-finite handling is done (see ``RECOVERS``).
3. Integer leaves in params: a ValueError at init naming the leaf.

The number of cases tried per method is printed at the end of the run.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import sam_optax
from tests.helpers import make_batch, mlp_loss, mlp_params

CASES = collections.Counter()

finite = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
nan = st.just(float("nan"))
# rho: neither infinite nor complex (issue 13)
bad_rho = st.one_of(st.floats(-1e3, -1e-6, allow_nan=False), st.just(float("nan")),
                    st.sampled_from([float("inf"), 1j, 0.1 + 0j, "0.1", [0.1]]))
neg = st.floats(-1e3, -1e-6, allow_nan=False)
not_number = st.sampled_from(["0.1", None, [0.1]])

# constructor -> {argument: (valid strategy, invalid strategy)}
SPECS: dict[str, dict[str, tuple]] = {
    "sam": {
        "rho": (finite(0.0, 2.0), bad_rho),
        "eps": (finite(1e-12, 1e-3), st.one_of(st.just(0.0), neg)),
    },
    "asam": {
        "rho": (finite(0.0, 2.0), bad_rho),
        "eta": (finite(1e-6, 1.0), st.one_of(st.just(0.0), neg)),
    },
    "gnp": {
        "rho": (finite(0.0, 2.0), bad_rho),
        "alpha": (finite(0.0, 1.0), st.one_of(finite(1.0001, 10.0), neg, nan)),
    },
    "layerwise_sam": {
        "rho": (finite(0.0, 2.0), bad_rho),
        "alpha": (finite(0.0, 1.0), st.one_of(finite(1.0001, 10.0), neg)),
        # the test MLP has 2 layers
        "num_layers": (st.integers(1, 2), st.one_of(st.integers(-3, 0), st.integers(3, 50))),
        "select_every": (st.integers(1, 100), st.integers(-3, 0)),
        "select_by": (st.sampled_from(["depth", "gradient"]),
                      st.sampled_from(["norm", "", None])),
        "layers": (st.sampled_from([None, "l2", ("l1",), ("l1", "l2")]),
                   st.sampled_from(["l3", ("l1", "nope"), ()])),
    },
    "ssam_fisher": {
        "rho": (finite(0.0, 2.0), bad_rho),
        "sparsity": (finite(0.0, 1.0), st.one_of(finite(1.0001, 5.0), neg)),
        # the fuzz batch has 16 examples
        "num_samples": (st.integers(1, 16), st.one_of(st.integers(-3, 0), st.integers(17, 100))),
        "update_every": (st.integers(1, 50), st.integers(-3, 0)),
        "chunk_size": (st.integers(1, 16), st.integers(-3, 0)),
    },
    "ssam_dynamic": {
        "rho": (finite(0.0, 2.0), bad_rho),
        "sparsity": (finite(0.0, 1.0), st.one_of(finite(1.0001, 5.0), neg)),
        "drop_rate": (finite(0.0, 1.0), st.one_of(finite(1.0001, 5.0), neg)),
        "update_every": (st.integers(1, 50), st.integers(-3, 0)),
        "total_steps": (st.integers(1, 10_000), st.integers(-3, 0)),
        "drop_criterion": (st.sampled_from(["gradient", "weight", "random"]), st.sampled_from(["magnitude", "grad", ""])),
        "grow_criterion": (st.sampled_from(["random", "gradient", "weight"]), st.sampled_from(["magnitude", "Random"])),
        "seed": (st.integers(0, 2**31 - 1), st.just("seed")),
    },
    "looksam": {
        "rho": (finite(0.0, 2.0), bad_rho),
        "k": (st.integers(1, 20), st.integers(-3, 0)),
        "alpha": (finite(0.0, 5.0), neg),
    },
    "vsam": {
        "rho": (finite(0.0, 2.0), bad_rho),
        # blocks is fixed at 2 below: a window must be a multiple of it with at
        # least 2 values per block
        "window": (st.sampled_from([4, 8, 50]), st.sampled_from([0, -4, 2, 3, 7, 1])),
        # at least one sample per window (max_rate >= 1/window, window >= 4)
        "max_rate": (finite(0.25, 1.0), st.one_of(st.just(0.0), finite(1.0001, 3.0), neg)),
        "decay": (finite(0.01, 0.99), st.one_of(st.just(0.0), st.just(1.0), finite(1.0001, 3.0), neg)),
        "warmup_steps": (st.integers(0, 100), st.integers(-10, -1)),
        "max_reuse": (st.integers(0, 10), st.integers(-5, -1)),
    },
    "lightsam": {
        "learning_rate": (finite(1e-4, 1.0), st.one_of(st.just(0.0), neg, st.sampled_from([None, float("inf"), 1j]))),
        "rho": (finite(0.0, 1.0), bad_rho),
        "variant": (st.sampled_from(["adagrad_norm", "adagrad", "adam"]), st.sampled_from(["sgd", "Adam", ""])),
        "b1": (finite(0.0, 0.999), st.one_of(st.just(1.0), neg)),
        "b2": (finite(0.0, 0.9999), st.one_of(st.just(1.0), finite(1.0001, 2.0))),
        "eps": (finite(1e-10, 1e-3), st.one_of(st.just(0.0), neg)),
    },
}
# Arguments the fuzz does not vary (the problem fixes them, or they are
# required); a drawn value replaces them.
FIXED: dict[str, dict] = {
    "ssam_fisher": {"update_every": 1},
    "ssam_dynamic": {"update_every": 1, "total_steps": 10},
    "vsam": {"blocks": 2, "window": 4},
    "lightsam": {"learning_rate": 0.1},
}


@st.composite
def cases(draw, ctor):
  spec = SPECS[ctor]
  kwargs, invalid = {}, []
  for arg, (ok, bad) in spec.items():
    use_bad = draw(st.booleans()) and draw(st.booleans())  # ~25% per argument
    if use_bad:
      kwargs[arg] = draw(bad)
      invalid.append(arg)
    elif draw(st.booleans()):
      kwargs[arg] = draw(ok)
  if (ctor == "layerwise_sam" and kwargs.get("layers") is not None
      and "num_layers" in invalid and kwargs["num_layers"] > 0):
    # A fixed set of layers makes num_layers irrelevant: too many for the
    # model is then not an error (only a non-positive count is).
    del kwargs["num_layers"]
    invalid.remove("num_layers")
  return kwargs, invalid


def _step(tx):
  params, batch = mlp_params(), make_batch(n=16)
  g = jax.grad(mlp_loss)(params, batch)
  state = tx.init(params)
  return tx.update(g, state, params, batch=batch)


@pytest.mark.parametrize("ctor", sorted(SPECS))
def test_constructor_arguments_fuzzed(ctor):
  @settings(
      max_examples=16, deadline=None, derandomize=True,
      suppress_health_check=list(HealthCheck),
  )
  @given(cases(ctor))
  def check(case):
    kwargs, invalid = case
    kwargs = {**FIXED.get(ctor, {}), **kwargs}
    CASES[ctor] += 1
    build = lambda: getattr(sam_optax, ctor)(mlp_loss, **kwargs)  # noqa: E731
    if invalid:
      CASES[ctor + ":invalid"] += 1
      # At construction where the value alone decides; at init (or the first
      # trace) where the params or the batch decide (num_layers, layers,
      # num_samples against the model and the batch).
      with pytest.raises(ValueError) as err:
        _step(build())
      assert any(a in str(err.value) for a in invalid), (invalid, str(err.value))
    else:
      out, _ = _step(build())
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))

  check()
  assert CASES[ctor] >= 15


# --------------------------------------------------------------------------
# 2. Random parameter trees with a NaN / inf step.
# --------------------------------------------------------------------------

# Per constructor: arguments that fit the tree-fuzz problem (batch of 4
# examples, trees of 1 to 4 leaves).
TREE_KWARGS: dict[str, dict] = {
    "sam": {}, "asam": {}, "gnp": {},
    "layerwise_sam": {"num_layers": 1},
    "ssam_fisher": {"num_samples": 4, "update_every": 2},
    "ssam_dynamic": {"update_every": 2, "total_steps": 8},
    "looksam": {"k": 2},
    "vsam": {"window": 4, "blocks": 2, "warmup_steps": 1},
    "lightsam": {"learning_rate": 0.1},
}
# Every method's state ignores a non-finite step (the engine's guard, and
# LightSAM's accumulators); the later steps are recorded and asserted below.
RECOVERS = set(TREE_KWARGS)
STEPS = 4
RECOVERY: dict[str, list[bool]] = collections.defaultdict(list)

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SHAPES = ((), (3,), (2, 3), (0,), (0, 2), (1, 1, 2))


@st.composite
def param_trees(draw, allow_int=False):
  """A dict of 1 to 4 entries: leaves, lists with None, nested dicts; at
  least one leaf with entries."""
  def leaf(i):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    vals = np.linspace(-1.0, 1.0, max(int(np.prod(shape)), 1))[: int(np.prod(shape))]
    return jnp.asarray((vals * (1 + i)).reshape(shape), dtype)

  tree = {"base": jnp.asarray([0.5, -0.25, 1.0], draw(st.sampled_from(DTYPES)))}
  for i in range(draw(st.integers(0, 3))):
    kind = draw(st.sampled_from(["leaf", "list", "dict"]))
    if kind == "leaf":
      tree[f"p{i}"] = leaf(i)
    elif kind == "list":
      tree[f"p{i}"] = [leaf(i), None]
    else:
      tree[f"p{i}"] = {"kernel": leaf(i), "bias": leaf(i + 1)}
  if allow_int:
    tree["table"] = jnp.arange(3).astype(draw(st.sampled_from([jnp.int32, jnp.uint8, jnp.bool_])))
  return tree


def tree_loss(params, x):
  """Mean over the examples of ``x`` (shape (n,)) of a smooth loss of every leaf."""
  total = 0.0
  for leaf in jax.tree.leaves(params):
    w = leaf.astype(jnp.float32)
    xs = x.reshape((-1,) + (1,) * w.ndim)
    total = total + jnp.sum(jnp.sin(w[None] * xs)) / x.shape[0] + 0.05 * jnp.sum(w * w)
  return total


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32))))
             for x in jax.tree.leaves(tree))


@st.composite
def injections(draw):
  return (draw(param_trees()), draw(st.integers(0, STEPS - 2)),
          draw(st.sampled_from([float("nan"), float("inf"), -float("inf")])),
          draw(st.sampled_from(["grad", "batch"])))


@pytest.mark.parametrize("ctor", sorted(TREE_KWARGS))
def test_random_trees_and_non_finite_steps(ctor):
  @settings(max_examples=3, deadline=None, derandomize=True,
            phases=(Phase.explicit, Phase.generate),
            suppress_health_check=list(HealthCheck))
  @given(injections())
  def check(case):
    params, k, value, where = case
    CASES[ctor + ":trees"] += 1
    tx = getattr(sam_optax, ctor)(tree_loss, **TREE_KWARGS[ctor])
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
    later = []
    for t in range(STEPS):
      x = jnp.linspace(0.5, 2.0, 4) + 0.1 * t
      if t == k and where == "batch":
        x = x.at[1].set(value)
      g = jax.grad(tree_loss)(params, x)
      if t == k and where == "grad":
        g = dict(g, base=g["base"].at[1].set(value))
      out, state = update(g, state, params, x)
      assert jax.tree.structure(out) == jax.tree.structure(params)
      for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        assert o.shape == p.shape and o.dtype == p.dtype
      if t < k:
        assert _finite(out), (t, k)
      elif t == k:
        assert not _finite(out), "the non-finite step must stay visible"
        continue  # dropped, as apply_if_finite would
      else:
        later.append(_finite(out) and _finite(sam_optax.stats(state)))
      params = optax.apply_updates(params, out)
    RECOVERY[ctor].append(all(later))
    if ctor in RECOVERS:
      assert all(later), "a non-finite step poisoned the later steps"

  check()


@pytest.mark.parametrize("ctor", sorted(TREE_KWARGS))
def test_later_steps_finite_after_a_non_finite_step(ctor):
  """Reads what the test above recorded (pytest runs a file in order)."""
  if not RECOVERY[ctor]:
    pytest.skip("run with test_random_trees_and_non_finite_steps")
  assert all(RECOVERY[ctor]), RECOVERY[ctor]


@pytest.mark.parametrize("ctor", sorted(TREE_KWARGS))
def test_integer_leaves_rejected_at_init(ctor):
  @settings(max_examples=3, deadline=None, derandomize=True,
            phases=(Phase.explicit, Phase.generate),
            suppress_health_check=list(HealthCheck))
  @given(param_trees(allow_int=True))
  def check(params):
    CASES[ctor + ":int_leaves"] += 1
    tx = getattr(sam_optax, ctor)(tree_loss, **TREE_KWARGS[ctor])
    with pytest.raises(ValueError, match=r"table \((int32|uint8|bool)\)"):
      tx.init(params)

  check()


def test_report_case_counts(capsys):
  # Runs last in this module (pytest keeps file order): prints what was tried.
  total = sum(v for k, v in CASES.items() if ":" not in k)
  per_method = {c: {"arguments": CASES[c], "trees+non-finite": CASES[c + ":trees"],
                    "int_leaves": CASES[c + ":int_leaves"]} for c in sorted(SPECS)}
  with capsys.disabled():
    print(f"\n[fuzz] constructors: {len(SPECS)}, argument cases: {total}, "
          f"tree/non-finite cases: {sum(CASES[c + ':trees'] for c in SPECS)}, "
          f"integer-leaf cases: {sum(CASES[c + ':int_leaves'] for c in SPECS)}")
    for c, v in per_method.items():
      print(f"[fuzz]   {c}: {v}, recovered after the non-finite step: "
            f"{sum(RECOVERY[c])}/{len(RECOVERY[c])}")
  if total:  # the argument tests ran (not deselected with -k)
    assert total >= 15 * len(SPECS)
