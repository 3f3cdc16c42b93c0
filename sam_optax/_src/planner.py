"""Planned steps: the host decides each step's structure, the device runs it.

On GPUs a ``lax.cond`` in a compiled step makes the host wait for the device
once per step (XLA copies the predicate to the host). Every decision the
methods of this library take is known to the host without waiting: LookSAM's
``count % k``, the masks' refresh steps, vSAM's warm-up and the end of a
window, a layer re-selection, a radius schedule that is not > 0 and finite
are functions of the step count; vSAM's sampling pattern and a runtime layer
selection change only once per window or re-selection, and are read then,
from a host copy started one call earlier (never waiting for the step just
dispatched). A :class:`Planner`
turns ``(count, opt_state)`` into a small hashable :class:`engine.Plan`; the
transform's ``update(..., plan=plan)``, with ``plan`` static under ``jit``,
then compiles only that step's work, with no conditional, and gives the same
result as ``plan=None``.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import base
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


#: How many steps' radii :meth:`Planner.rho_skip` evaluates at once.
RHO_BLOCK = 1024
_RHO_EVALUATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rho_evaluator(rho: Callable) -> Callable:
  """``counts -> (rho(counts), rho_floor(rho, counts))``, compiled once per
  schedule and shared by its planners (a run makes one per seed). Batched
  values may differ from one-count calls in their last bits; rho_skip
  leaves a step within a quarter of the floor to the device anyway."""
  try:
    fn = _RHO_EVALUATORS.get(rho)
  except TypeError:  # not weakly referenceable: compiled per planner call
    fn = None
  if fn is None:
    fn = jax.jit(jax.vmap(
        lambda c: (base.resolve(rho, c, "rho"), engine.rho_floor(rho, c))))
    try:
      _RHO_EVALUATORS[rho] = fn
    except TypeError:
      pass
  return fn


class _NeedsRead(Exception):
  """A plan would read device state (see :meth:`Planner.peek`)."""


def _host(x: Any) -> np.ndarray:
  """A state leaf as NumPy, every member (leading axes included)."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:  # replicated over hosts: any local copy
      x = x.addressable_data(0)
  return np.asarray(x)


def _start_host_copy(x: Any) -> Any:
  """A state leaf's copy on its way to the host: its own device buffer
  (the state's may be donated to the next step), with the transfer
  started (``copy_to_host_async``); :func:`_host` then takes it without
  waiting for anything dispatched after it."""
  if isinstance(x, jax.Array):
    if not x.is_fully_addressable:  # replicated over hosts: any local copy
      x = x.addressable_data(0)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    x = jnp.copy(x)
    x.copy_to_host_async()
  return x


class _Differs:
  """A state leaf whose members (of a batched state) differ: any use of it
  in a plan raises, naming the cause."""

  def __init__(self, message: str):
    self.message = message

  def _raise(self, *args, **kwargs):
    raise ValueError(self.message)

  __array__ = __iter__ = __len__ = __getitem__ = _raise
  __bool__ = __int__ = __float__ = __index__ = _raise


def _step_number(count: Any) -> int:
  """``count`` as a Python int >= 0, or ValueError."""
  ok = isinstance(count, (int, np.integer)) and not isinstance(
      count, (bool, np.bool_)
  )
  if not ok and isinstance(count, (np.ndarray, jax.Array)):
    ok = np.ndim(count) == 0 and np.issubdtype(count.dtype, np.integer)
  if not ok:
    raise ValueError(
        "count must be the step number, a Python int >= 0 (or None: read "
        f"it from the device), got {count!r} ({type(count).__name__})"
    )
  count = int(count)
  if count < 0:
    raise ValueError(f"count must be a step number >= 0, got {count}")
  return count


class Planner:
  """Host-side plans for one transform (see :func:`planner`).

  What it remembers between calls: the last count it planned, and what it
  read from the device (vSAM's window and its sampling pattern, a runtime
  layer selection and the step that made it), which later plans of the same
  window or re-selection period reuse without reading again. That memory is
  dropped when the count goes backwards or jumps forward (more than one step
  ahead of the last one planned); a read checks that the state's count is
  the count given. Make a new planner for a new run (or call it with counts
  that restart from 0), and plan each step from the state before that step.

  Its device reads never wait for the step dispatched last: the value a
  plan reads (vSAM's pattern, drawn two steps before its window; a runtime
  layer selection, perturbed from the step after next) is already in the
  state before the previous step, so the planner starts copying it to the
  host (``copy_to_host_async``, on a copy of its own: the state may be
  donated) when it plans that previous step, and takes the copy at the
  next call, while the step in between runs. Only the first call of a run
  (a new planner, or after a restart or a jump) reads the state it is
  given, which holds no step dispatched by this loop; ``count=None`` reads
  the state given at every call.

  Attributes:
    reads: how many times a plan read device memory so far (started copies
      and reads of the state given).
    blocking_reads: how many reads waited for the steps dispatched before
      the call: reads of the state given to a call that follows a planned
      step (``count=None`` after the first call); 0 in a loop that plans
      every step with the host's count.
  """

  def __init__(self, spec: engine.Spec):
    self._spec = spec
    self._key = spec.key
    self._memo: dict[str, dict] = {"gate": {}, "region": {}}
    self._last: Optional[int] = None  # the last count planned
    self._lookahead = False  # peek: a look-ahead from an older state
    self.reads = 0
    self.blocking_reads = 0
    self._checked = False
    # part -> (count, its state's count, the part's state): host copies
    # started when planning step ``count``, taken by the plan of count + 1
    self._started: dict[str, tuple[int, Any, Any]] = {}
    self._prefetching = True  # False in peek's probe
    self._fresh = True  # no step planned since construction or forgetting
    # The radius schedule's values, a block of steps at a time, shared
    # with the probes of peek (see rho_skip).
    self._rho_block: dict = {}

  def _read(
      self, opt_state: Any, field: Optional[str], count: Optional[int]
  ) -> Any:
    """One field of the engine state on the host (a counted device read),
    or the state's count when ``field`` is None.

    The state's count must be ``count`` (when given). A batched state
    (leading axes on ``count``: pmap's devices, or the members of a
    ``jax.vmap`` ensemble) is read member by member: a leaf equal in every
    member is that value, one that differs raises when a plan uses it."""
    state = find_state(opt_state)
    self.reads += 1
    if not self._fresh:  # waits for the steps dispatched since
      self.blocking_reads += 1
    return self._decode(_host(state.count), getattr(state, field or "count"),
                        field, count)

  def _read_lagged(self, part: str, count: int) -> Any:
    """``part``'s state before step ``count - 1``, from the copy started
    when that step was planned; None if it was not, or if the state given
    then was not the state before that step (a look-ahead from an older
    state, a pipelined loop, an uncounted NaN step): the part then reads
    the state given now, which checks its count."""
    started = self._started.pop(part, None)
    if started is None or started[0] != count - 1:
      return None
    counts = _host(started[1])
    if np.any(counts != count - 1):
      return None
    self.reads += 1
    return self._decode(counts, started[2], part, count - 1)

  def _start_reads(self, count: int, opt_state: Any) -> None:
    """Starts the host copies the next plan takes
    (:meth:`Component.prefetch`)."""
    for name in ("gate", "region"):
      if getattr(self._spec, name).prefetch(count):
        state = find_state(opt_state)
        self._started[name] = (
            count, _start_host_copy(state.count),
            jax.tree.map(_start_host_copy, getattr(state, name)))

  def _decode(self, counts: np.ndarray, tree: Any, field: Optional[str],
              count: Optional[int]) -> Any:
    """``tree`` (a state field) on the host, for the state whose count is
    ``counts``; see :meth:`_read`."""
    batch = counts.shape  # () for one state
    if field is None:
      if np.any(counts != counts.flat[0]):
        raise ValueError(self._batched_message(batch, "counts", counts))
      return int(counts.flat[0])
    if np.any(counts != count):
      raise ValueError(
          f"planner(count={count}, opt_state): the state's count is "
          f"{_show(counts)}, so it is not the state before step {count} and "
          f"cannot decide that step's plan (its {field} state may belong to "
          "another step: a stale vSAM window or layer selection). Plan each "
          "step from the state before it (not one step ahead, as a "
          "pipelined loop would). A step with a NaN or inf does not advance "
          "the state's count: count the finite steps, or pass count=None "
          "to read the count from the device"
      )

    def member(x):
      x = _host(x)
      if not batch:
        return x
      first = x[(0,) * len(batch)]
      if np.array_equal(x, np.broadcast_to(first, x.shape), equal_nan=True):
        return first
      return _Differs(self._batched_message(batch, f"{field} state", None))

    return jax.tree.map(member, tree)

  def _batched_message(self, batch, what, values) -> str:
    shown = "" if values is None else f" ({_show(values)})"
    return (
        f"planner: opt_state is batched (leading axes of shape {batch} on "
        "every state leaf: pmap's devices without axis_name, or the members "
        f"of a jax.vmap ensemble) and its members hold different {what}"
        f"{shown}, from which their plans would differ. A plan is one "
        "decision for every member, so it cannot plan these steps: run them "
        "unplanned (plan=None; each member decides on the device), plan each "
        "member with its own planner and unbatched state, or pass "
        "axis_name under pmap so that the devices share one state"
    )

  def _reader(
      self, opt_state: Any, part: str, count: int
  ) -> Callable[..., PyTree]:
    def read(lagged: bool = False):
      if lagged:
        return self._read_lagged(part, count)
      return self._read(opt_state, part, count)

    return read

  def reset(self) -> None:
    """Forgets every count planned and everything read, as a new planner.

    Call it when the state given next does not continue the last one given
    (another run's state or checkpoint at the next count, e.g. a
    population-based-training exploit): the planner cannot tell from the
    count, and would plan from what it read of the old run (a runtime layer
    selection, vSAM's window)."""
    self._memo = {"gate": {}, "region": {}}
    self._started = {}
    self._fresh = True
    self._last = None
    self._rho_block = {}

  def _moved_to(self, count: int) -> None:
    """Forgets what was read when ``count`` does not follow the last count
    planned (backwards: a new run or a restart; a jump: steps this planner
    did not see)."""
    last, self._last = self._last, count
    if last is None:
      return
    if count < last or (count > last + 1 and not self._lookahead):
      self._memo = {"gate": {}, "region": {}}
      self._started = {}
      self._fresh = True

  def peek(self, count: int, opt_state: Any) -> Optional[engine.Plan]:
    """The plan of step ``count`` if the host knows it without reading the
    device, else None; changes nothing (for looking ahead from the state of
    an earlier step of the same run, e.g. to group consecutive steps with
    the same plan)."""
    probe = Planner(self._spec)
    probe._memo = copy.deepcopy(self._memo)  # pylint: disable=protected-access
    probe._last = self._last  # pylint: disable=protected-access
    probe._lookahead = True  # pylint: disable=protected-access
    probe._checked = True  # pylint: disable=protected-access
    probe._prefetching = False  # pylint: disable=protected-access
    probe._rho_block = self._rho_block  # pylint: disable=protected-access

    def refuse(opt_state, part, count):
      del opt_state, part, count

      def read(lagged=False):
        del lagged
        raise _NeedsRead

      return read

    probe._reader = refuse  # pylint: disable=protected-access
    try:
      return probe(count, opt_state)
    except _NeedsRead:
      return None

  def rho_skip(self, count: int) -> Optional[bool]:
    """Whether the step ``count`` is skipped for its radius (not above
    ``engine.rho_floor`` and finite: ``engine.rho_active``, the device's
    rule on the same float32 values); None when rho is not a schedule
    (fixed, known to the engine; or injected, known only on the device),
    and when the value is within a quarter of the floor of the floor
    (``RHO_FLOOR / 4`` of the schedule's scale, far above the last bits in
    which the host's and the device's evaluations differ): the host cannot
    tell the device's side, so the step decides on the device, as without
    a plan."""
    rho = self._spec.rho
    if self._spec.static_rho is not None or not callable(rho):
      return None
    # One call of the compiled schedule per RHO_BLOCK steps, not one per
    # step (a call costs about 0.3 ms on a CPU host: as much as a small
    # model's SGD step); compiled once per schedule, not once per planner.
    block = self._rho_block
    if not block or not 0 <= count - block["start"] < RHO_BLOCK:
      counts = np.minimum(np.arange(count, count + RHO_BLOCK),
                          np.iinfo(np.int32).max).astype(np.int32)
      with jax.default_device(jax.devices("cpu")[0]):
        values, floors = map(np.asarray, _rho_evaluator(rho)(counts))
      block.update(start=count, values=values, floors=floors)
    i = count - block["start"]
    value, floor = float(block["values"][i]), float(block["floors"][i])
    if np.isfinite(value) and abs(value - floor) < floor / 4:
      return None
    return not engine.rho_active(value, floor)

  def __call__(self, count: Any, opt_state: Any) -> engine.Plan:
    """The plan of step ``count`` from ``opt_state``, the state before that
    step (its count is ``count``), which the host knows without asking the
    device as long as every step is finite (it counts the steps it ran). A
    step with a NaN or inf does not advance the state's count: after one,
    count the finite steps (e.g. from the loss scaler's finite flag), or
    pass ``count=None`` to read it from the device (one read per call).
    Where a plan reads the device it checks the state's count against
    ``count`` and raises on a mismatch."""
    if count is None:
      count = self._read(opt_state, None, None)
    count = _step_number(count)
    if not self._checked:  # once: a clear error for a wrong opt_state
      find_state(opt_state)
      self._checked = True
    self._moved_to(count)
    spec = self._spec
    plan = engine.Plan(
        rho_skip=self.rho_skip(count),
        second=spec.gate.plan(
            count, self._reader(opt_state, "gate", count), self._memo["gate"]
        ),
        gate_after=spec.gate.plan_after(count),
        region=spec.region.plan(
            count, self._reader(opt_state, "region", count),
            self._memo["region"],
        ),
        owner=self._key,
    )
    if self._prefetching:
      self._start_reads(count, opt_state)
    self._fresh = False
    return plan


def _show(values: np.ndarray) -> str:
  """A count (or the members' counts) for a message."""
  return str(values.item()) if values.ndim == 0 else str(values.tolist())


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
  that reaches 0 (or any value not > 0 and finite) doubles them; a runtime layer selection compiles one
  program per distinct selection.

  The planner reads device memory only where a decision depends on device
  state: vSAM once per window (its sampling pattern, drawn on the device
  at the end of the step two steps before the window starts), a runtime
  layer selection once per re-selection (every step with
  ``select_every=1``; a ranking is perturbed from the step after next).
  Counted in ``planner.reads``. No read waits for the step just
  dispatched: the value is in the state before the previous step, whose
  host copy the planner started (``copy_to_host_async``) when it planned
  that step; only the first call of a run reads the state it is given
  (``planner.blocking_reads`` counts reads that waited). Plans are a
  function of the count and of replicated state, so every device and
  every process computes the same plan.

  The rules a plan follows (the same as without a plan):

  * **The radius.** A step perturbs only where rho is > 0 and finite; a
    schedule that is 0, negative, NaN or inf at a step makes it a skipped
    step (no second gradient, the output is the clean gradient, the count
    advances), planned or not. A schedule's value counts as 0 up to
    ``2**-16`` of its scale, so the host's and the device's evaluations,
    which differ in the last bits, take the same decision; a value too
    close to that floor is left to the device (``rho_skip=None``).
  * **A plan belongs to its transform.** It carries the key of the
    transform it was made for (the region's and gate's types and the
    settings that decide plans: ``k``, the vSAM warm-up and window, the
    masks' ``update_every``, ``num_layers``, ``select_every`` and
    ``group_fn``, the rho schedule, and ``trainable=``, which renumbers the
    layers a selection indexes); ``update`` raises ValueError for a plan of another transform
    or other settings, and for a malformed or hand-made one. Transforms
    with equal settings share plans.
  * **One state, the one before the step.** Where a plan reads the device,
    the state's count must be ``count`` (else ValueError): plan each step
    from the state before it. A batched state (``jax.vmap`` over an
    ensemble, or ``pmap`` without ``axis_name``: leading axes on every
    leaf) is planned only where its members take the same decision: plans
    from the count alone (LookSAM, the masks' refreshes, a rho schedule)
    are the same for every member, and a read value (vSAM's pattern, a
    layer selection) is used only when every member holds the same one;
    otherwise ValueError.
  * **What a planner remembers**: the last count planned and what it read
    (vSAM's current window and its pattern, a layer selection and the step
    that made it), reused for the later steps of that window or period,
    and the host copies it started for the next plan. It forgets them when
    the count goes backwards or jumps ahead by more than one step. Make a
    new planner for each run (a planner reused from count 0 re-reads, so a
    reused one is safe too, at the cost of a read).

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
        f"lightsam(...)), got {tx!r}. For an optax.chain, plan the method "
        "itself; for a method inside optax.inject_hyperparams, build the "
        "planner from the same method built without the wrapper, with the "
        "same settings (its plans fit the wrapped transform)"
    )
  return Planner(spec)
