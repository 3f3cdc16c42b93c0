"""Planned steps: the host decides each step's structure, the device runs it.

On GPUs a ``lax.cond`` in a compiled step makes the host wait for the device
once per step (XLA copies the predicate to the host). Every decision the
methods of this library take is known to the host without waiting: LookSAM's
``count % k``, the masks' refresh steps, vSAM's warm-up and the end of a
window, a layer re-selection, a radius schedule reaching 0 are functions of
the step count; vSAM's sampling pattern and a runtime layer selection change
only once per window or re-selection, and are read then. A :class:`Planner`
turns ``(count, opt_state)`` into a small hashable :class:`engine.Plan`; the
transform's ``update(..., plan=plan)``, with ``plan`` static under ``jit``,
then compiles only that step's work, with no conditional, and gives the same
result as ``plan=None``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import jax
import numpy as np

from sam_optax._src import engine
from sam_optax._src import stats as stats_lib

PyTree = Any


def find_state(opt_state: Any) -> engine.SharpnessAwareState:
  """The one sam_optax engine state inside ``opt_state`` (any nesting)."""
  found = []

  def walk(node):
    if isinstance(node, engine.SharpnessAwareState):
      found.append(node)
      return
    for _, child in stats_lib.children(node) or ():
      walk(child)

  walk(opt_state)
  if len(found) == 1:
    return found[0]
  if not found:
    raise ValueError(
        "planner(count, opt_state): opt_state holds no sam_optax state; pass "
        "the state of the chain that contains the transform (or its own)"
    )
  raise ValueError(
      f"planner(count, opt_state): opt_state holds {len(found)} sam_optax "
      "states; pass the state of the planned transform itself (e.g. "
      "opt_state[0] for optax.chain(sam_tx, ...))"
  )


class _NeedsRead(Exception):
  """A plan would read device state (see :meth:`Planner.peek`)."""


def _host(x: Any, device_axis: bool) -> Any:
  """A state leaf as NumPy, one copy (device 0's under pmap)."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:  # replicated over hosts: any local copy
      x = x.addressable_data(0)
  x = np.asarray(x)
  return x[0] if device_axis else x


class Planner:
  """Host-side plans for one transform (see :func:`planner`).

  Attributes:
    reads: how many times a plan read device memory so far (each read waits
      for the steps already dispatched to finish).
  """

  def __init__(self, spec: engine.Spec):
    self._spec = spec
    self._memo: dict[str, dict] = {"gate": {}, "region": {}}
    self.reads = 0
    self._checked = False

  def _read(self, opt_state: Any, field: str) -> PyTree:
    """One field of the engine state, on the host (a counted device read)."""
    state = find_state(opt_state)
    device_axis = np.ndim(state.count) == 1  # pmap: a leading device axis
    self.reads += 1
    return jax.tree.map(
        lambda x: _host(x, device_axis), getattr(state, field)
    )

  def _reader(self, opt_state: Any, part: str) -> Callable[[], PyTree]:
    return lambda: self._read(opt_state, part)

  def peek(self, count: int, opt_state: Any) -> Optional[engine.Plan]:
    """The plan of step ``count`` if the host knows it without reading the
    device, else None; changes nothing (for looking ahead, e.g. to group
    consecutive steps with the same plan)."""
    probe = Planner(self._spec)
    probe._memo = copy.deepcopy(self._memo)  # pylint: disable=protected-access
    probe._checked = True  # pylint: disable=protected-access

    def refuse(opt_state, part):
      del opt_state, part

      def read():
        raise _NeedsRead

      return read

    probe._reader = refuse  # pylint: disable=protected-access
    try:
      return probe(count, opt_state)
    except _NeedsRead:
      return None

  def rho_zero(self, count: int):
    """Whether the radius is 0 at ``count`` (None: known to the engine, or
    injected and so only known on the device)."""
    rho = self._spec.rho
    if self._spec.static_rho is not None or not callable(rho):
      return None
    with jax.default_device(jax.devices("cpu")[0]):
      return float(rho(np.int32(count))) == 0.0

  def __call__(self, count: Any, opt_state: Any) -> engine.Plan:
    """The plan of step ``count``: the count in ``opt_state`` (the state
    before that step), which the host knows without asking the device as
    long as every step is finite (it counts the steps it ran). A step with
    a NaN or inf does not advance the state's count: after one, count the
    finite steps (e.g. from the loss scaler's finite flag), or pass
    ``count=None`` to read it from the device (one read per call)."""
    if count is None:
      count = self._read(opt_state, "count")
    count = int(count)
    if count < 0:
      raise ValueError(f"count must be a step number >= 0, got {count}")
    if not self._checked:  # once: a clear error for a wrong opt_state
      find_state(opt_state)
      self._checked = True
    spec = self._spec
    return engine.Plan(
        rho_zero=self.rho_zero(count),
        second=spec.gate.plan(
            count, self._reader(opt_state, "gate"), self._memo["gate"]
        ),
        gate_after=spec.gate.plan_after(count),
        region=spec.region.plan(
            count, self._reader(opt_state, "region"), self._memo["region"]
        ),
    )


def planner(tx: Any) -> Planner:
  r"""A host-side planner for a transform of this library.

  Use it where a ``lax.cond`` in the compiled step is expensive (GPUs: XLA
  waits for the predicate on the host). The plan of a step is a small
  hashable value; pass it as a static argument::

      sam_tx = sam_optax.looksam(loss_fn, k=5)
      tx = optax.chain(sam_tx, optax.sgd(0.1, momentum=0.9))
      plan_of = sam_optax.planner(sam_tx)

      @functools.partial(jax.jit, static_argnames="plan")
      def train_step(params, opt_state, batch, plan=None):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params,
                                       batch=batch, plan=plan)
        return optax.apply_updates(params, updates), opt_state

      for count, batch in enumerate(batches):
        plan = plan_of(count, opt_state)
        params, opt_state = train_step(params, opt_state, batch, plan=plan)

  With a plan the compiled update holds no conditional and gives the same
  result as ``plan=None`` at the same step. A method has a handful of
  distinct plans, each compiled once: LookSAM 2 (SAM step, reuse step),
  the Sparse SAM masks 2 (refresh or not), vSAM 4 (sampled or not, times
  whether the step ends a window and draws the next one), a radius schedule
  that reaches 0 doubles them; a runtime layer selection compiles one
  program per distinct selection.

  The planner reads device memory only where a decision depends on device
  state: vSAM once per window (its sampling pattern, drawn on the device
  when the previous window ends), a runtime layer selection once per
  re-selection (every step with ``select_every=1``). Counted in
  ``planner.reads``. Plans are a function of the count and of replicated
  state, so every device and every process computes the same plan.

  Args:
    tx: a transform returned by this library (a preset, a
      :func:`sharpness_aware` combination, or :func:`lightsam`). Under
      ``optax.inject_hyperparams``, build the planner from the transform
      built with the same structural arguments: only the parts' static
      settings are read.

  Returns:
    A :class:`Planner`: ``planner(count, opt_state) -> Plan``, where
    ``opt_state`` is the state of the transform or of any chain holding it.

  Example:
    >>> import functools, jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, b: jnp.sum((w * b) ** 2)
    >>> sam_tx = sam_optax.looksam(loss_fn, k=2)
    >>> tx = optax.chain(sam_tx, optax.sgd(0.1))
    >>> plan_of = sam_optax.planner(sam_tx)
    >>> @functools.partial(jax.jit, static_argnames="plan")
    ... def step(w, state, b, plan=None):
    ...   u, state = tx.update(jax.grad(loss_fn)(w, b), state, w, batch=b,
    ...                        plan=plan)
    ...   return optax.apply_updates(w, u), state
    >>> w, b = jnp.ones(3), jnp.arange(3.0)
    >>> state = tx.init(w)
    >>> for count in range(4):
    ...   w, state = step(w, state, b, plan=plan_of(count, state))
    >>> [plan_of(c, state).second for c in range(4)]
    [True, False, True, False]
  """
  spec = engine.spec_of(tx)
  if spec is None:
    raise ValueError(
        "planner(tx): tx must be a transform built by sam_optax (a method "
        "such as sam_optax.looksam(...), sharpness_aware(...) or "
        f"lightsam(...)), got {tx!r}"
    )
  return Planner(spec)
