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
}
# Arguments that a constructor takes positionally-or-keyword but which the
# fuzz should not vary (the problem fixes them).
FIXED: dict[str, dict] = {}


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
  params, batch = mlp_params(), make_batch(n=8)
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
      with pytest.raises(ValueError) as err:
        build()
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
