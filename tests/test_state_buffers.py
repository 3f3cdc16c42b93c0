"""Issue 19: no state may alias (one buffer in two leaves, or a params array).

A train step that donates its optimizer state (``jax.jit(...,
donate_argnums=...)``, the usual way to update in place) fails with
"donate the same buffer twice" when two state leaves are one array, and
deletes the caller's array when a state leaf is one of the params (or of
the user's arguments). Checked for every public transform, alone and under
``optax.inject_hyperparams`` (which puts its hyperparameters in the state,
where an ``init`` that keeps ``jnp.asarray(hyperparameter)`` aliased them).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from tests.helpers import ALL, FULL_OPTIMIZERS, METHODS, batches, mlp_loss
from tests.helpers import mlp_params


def _buffers(tree):
  """(path, buffer pointer) of every array leaf (PRNG keys by their data)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(x, jax.Array):
      continue
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out.append((jax.tree_util.keystr(path), x.unsafe_buffer_pointer()))
  return out


def assert_no_alias(state, params):
  seen = {}
  for path, ptr in _buffers(params):
    seen[ptr] = "params" + path
  for path, ptr in _buffers(state):
    assert ptr not in seen, (
        f"state{path} is the same buffer as {seen[ptr]}"
    )
    seen[ptr] = "state" + path


def _statics(ctor, kwargs):
  """Structural arguments (ints fixing shapes or periods, tuples, strings,
  masks) are static under inject_hyperparams, as the README says."""
  sig = inspect.signature(getattr(sam_optax, ctor)).parameters
  values = {k: p.default for k, p in sig.items()
            if p.default is not inspect.Parameter.empty}
  values.update(kwargs)
  return ("loss_fn",) + tuple(
      k for k, v in values.items()
      if (isinstance(v, (int, tuple, str)) and not isinstance(v, bool))
      or k == "mask"
  )


def _transform(name, injected):
  ctor, kwargs = METHODS[name]
  fn = getattr(sam_optax, ctor)
  if injected:
    fn = optax.inject_hyperparams(fn, static_args=_statics(ctor, kwargs))
  tx = fn(mlp_loss, **kwargs)
  if name in FULL_OPTIMIZERS:
    return tx
  return optax.chain(tx, optax.sgd(0.05, momentum=0.9))


def _donating_run(tx, params, steps=3):
  state = tx.init(params)
  assert_no_alias(state, params)

  @jax.jit
  def grads(p, b):
    return jax.grad(mlp_loss)(p, b)

  def step(p, s, b):
    u, s = tx.update(grads(p, b), s, p, batch=b)
    return optax.apply_updates(p, u), s

  donating = jax.jit(step, donate_argnums=(1,))
  p = params
  for b in batches(n=steps):
    p, state = donating(p, state, b)
    assert_no_alias(state, p)
  # the caller's params were not donated with the state
  assert all(not x.is_deleted() for x in jax.tree.leaves(params))
  return state


@pytest.mark.parametrize("injected", [False, True], ids=["plain", "injected"])
@pytest.mark.parametrize("name", ALL)
def test_state_has_no_aliased_buffers_and_can_be_donated(name, injected):
  _donating_run(_transform(name, injected), mlp_params())


@pytest.mark.parametrize("injected", [False, True], ids=["plain", "injected"])
def test_scale_by_adagrad_norm_state_can_be_donated(injected):
  fn = sam_optax.scale_by_adagrad_norm
  if injected:
    fn = optax.inject_hyperparams(fn)
  _donating_run(optax.chain(fn(), optax.sgd(0.1)), mlp_params())


def test_issue_case_lightsam_under_inject_hyperparams():
  """The reported case, as written in the issue."""
  tx = optax.inject_hyperparams(sam_optax.lightsam, static_args=("loss_fn",))(
      mlp_loss, learning_rate=0.1
  )
  _donating_run(tx, mlp_params())


def _scalar_loss(p, b):
  return jnp.sum((p["a"] * b + p["b"] - 1.0) ** 2) + p["c"] ** 2


@pytest.mark.parametrize("variant", ["adagrad_norm", "adagrad", "adam"])
def test_lightsam_scalar_leaves_under_inject_hyperparams(variant):
  """Scalar params: ``jnp.full((), eps)`` returned the injected eps array
  itself, one buffer in every scalar leaf's accumulator."""
  tx = optax.inject_hyperparams(
      sam_optax.lightsam, static_args=("loss_fn", "variant")
  )(_scalar_loss, learning_rate=0.1, variant=variant)
  params = {"a": jnp.float32(0.5), "b": jnp.float32(-0.2),
            "c": jnp.float32(0.3)}
  state = tx.init(params)
  assert_no_alias(state, params)
  b = jnp.arange(3.0)
  # eager: the returned state has no shared buffers either
  _, eager = tx.update(jax.grad(_scalar_loss)(params, b), state, params,
                       batch=b)
  assert_no_alias(eager, params)
  donating = jax.jit(
      lambda p, s: tx.update(jax.grad(_scalar_loss)(p, b), s, p, batch=b),
      donate_argnums=(1,),
  )
  for _ in range(2):
    _, state = donating(params, state)
    assert_no_alias(state, params)


@pytest.mark.parametrize("name", ALL)
def test_eager_update_returns_a_state_without_shared_buffers(name):
  tx = _transform(name, injected=True)
  params = mlp_params()
  state = tx.init(params)
  b = batches(n=1)[0]
  for _ in range(2):
    _, state = tx.update(jax.grad(mlp_loss)(params, b), state, params, batch=b)
    assert_no_alias(state, params)
