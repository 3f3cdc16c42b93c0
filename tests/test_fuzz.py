"""Property-based tests of every constructor's arguments (hypothesis).

For each constructor, every argument has a strategy of valid values and one
of invalid values. A drawn case mixes them: with any invalid argument the
constructor must raise ``ValueError`` naming one of the invalid arguments;
with none it must build, init and take a step with a finite output. The
number of cases tried is reported at the end of the run.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import sam_optax
from tests.test_core import make_batch, mlp_loss, mlp_params

CASES = collections.Counter()

finite = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
nan = st.just(float("nan"))
neg = st.floats(-1e3, -1e-6, allow_nan=False)
not_number = st.sampled_from(["0.1", None, [0.1]])

# constructor -> {argument: (valid strategy, invalid strategy)}
SPECS: dict[str, dict[str, tuple]] = {
    "sam": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
        "eps": (finite(1e-12, 1e-3), st.one_of(st.just(0.0), neg)),
    },
    "asam": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
        "eta": (finite(1e-6, 1.0), st.one_of(st.just(0.0), neg)),
    },
    "gnp": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
        "alpha": (finite(0.0, 1.0), st.one_of(finite(1.0001, 10.0), neg, nan)),
    },
    "layerwise_sam": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
        "alpha": (finite(0.0, 1.0), st.one_of(finite(1.0001, 10.0), neg)),
        # the test MLP has 2 layers
        "num_layers": (st.integers(1, 2), st.one_of(st.integers(-3, 0), st.integers(3, 50))),
        "select_every": (st.integers(1, 100), st.integers(-3, 0)),
        "layers": (st.sampled_from([None, "l2", ("l1",), ("l1", "l2")]),
                   st.sampled_from(["l3", ("l1", "nope"), ()])),
    },
    "ssam_fisher": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
        "sparsity": (finite(0.0, 1.0), st.one_of(finite(1.0001, 5.0), neg)),
        # the fuzz batch has 16 examples
        "num_samples": (st.integers(1, 16), st.one_of(st.integers(-3, 0), st.integers(17, 100))),
        "update_every": (st.integers(1, 50), st.integers(-3, 0)),
        "chunk_size": (st.integers(1, 16), st.integers(-3, 0)),
    },
    "ssam_dynamic": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
        "sparsity": (finite(0.0, 1.0), st.one_of(finite(1.0001, 5.0), neg)),
        "drop_rate": (finite(0.0, 1.0), st.one_of(finite(1.0001, 5.0), neg)),
        "update_every": (st.integers(1, 50), st.integers(-3, 0)),
        "total_steps": (st.integers(1, 10_000), st.integers(-3, 0)),
        "drop_criterion": (st.sampled_from(["gradient", "weight", "random"]), st.sampled_from(["magnitude", "grad", ""])),
        "grow_criterion": (st.sampled_from(["random", "gradient", "weight"]), st.sampled_from(["magnitude", "Random"])),
        "seed": (st.integers(0, 2**31 - 1), st.just("seed")),
    },
    "looksam": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
        "k": (st.integers(1, 20), st.integers(-3, 0)),
        "alpha": (finite(0.0, 5.0), neg),
    },
    "vsam": {
        "rho": (finite(0.0, 2.0), st.one_of(neg, nan)),
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
        "learning_rate": (finite(1e-4, 1.0), st.one_of(st.just(0.0), neg)),
        "rho": (finite(0.0, 1.0), st.one_of(neg, nan)),
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
  return kwargs, invalid


def _step(tx):
  params, batch = mlp_params(), make_batch(n=16)
  g = jax.grad(mlp_loss)(params, batch)
  state = tx.init(params)
  return tx.update(g, state, params, batch=batch)


@pytest.mark.parametrize("ctor", sorted(SPECS))
def test_constructor_arguments_fuzzed(ctor):
  @settings(
      max_examples=40, deadline=None, derandomize=True,
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
  assert CASES[ctor] >= 20


def test_report_case_counts(capsys):
  # Runs last in this module (pytest keeps file order): prints what was tried.
  total = sum(v for k, v in CASES.items() if ":" not in k)
  with capsys.disabled():
    print(f"\n[fuzz] constructors: {len(SPECS)}, cases tried: {total} "
          f"({dict(CASES)})")
  assert total >= 20 * len(SPECS)
