"""Gates: when the second gradient is really computed.

* :class:`EveryStep` (SAM, ASAM, GNP, ...): ``schedule="always"``.
* :class:`Never`: ``schedule="never"`` (Sparse SAM with ``sparsity=1``).
* :class:`EveryK` (LookSAM): steps with ``count % k == 0``.
* :class:`VariationSampling` (vSAM): adaptive sampling from the variation of
  statistics of the sampled steps.

A gate with ``schedule="dynamic"`` makes the engine emit a ``lax.cond`` (on a
skipped step the branch that calls ``loss_fn`` does not run), unless a plan
fixes the decision on the host (see :func:`sam_optax.planner`). Every gate
here can be planned: EveryK from the count alone, VariationSampling from one
read of its state per window.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import base
from sam_optax._src import protocols

PyTree = Any
LeafSelection = Union[None, Callable[[str], bool], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class EveryStep(protocols.Gate):
  """The second gradient every step (SAM, ASAM, GNP)."""

  schedule: str = "always"


@dataclasses.dataclass(frozen=True)
class Never(protocols.Gate):
  """Never a second gradient (e.g. Sparse SAM with ``sparsity=1``)."""

  schedule: str = "never"


@dataclasses.dataclass(frozen=True)
class EveryK(protocols.Gate):
  """The second gradient on steps with ``count % k == 0`` (step 0 included)."""

  k: int = 1

  def decide(self, step, state):
    return step.count % self.k == 0, state

  def plan(self, count, read, memo):
    del read, memo
    return count % self.k == 0

  def advance(self, step, state, go):
    del step, go
    return state

  def plan_key(self):
    return protocols.part_key(self, k=self.k)

  def check_planned(self, second, after):
    protocols.check_flag("plan.second", second)
    if after is not None:
      raise ValueError(f"plan.gate_after must be None for EveryK, got {after!r}")


def every_step() -> EveryStep:
  return EveryStep()


def never() -> Never:
  return Never()


def every_k(k: int) -> protocols.Gate:
  """Every k-th step; ``k=1`` is every step, with no ``lax.cond`` emitted."""
  k = base.static_int("k", k, 1)
  return EveryStep() if k == 1 else EveryK(k=k)


# --------------------------------------------------------------------------
# vSAM's variation-based sampling.
# --------------------------------------------------------------------------


class VariationSamplingState(NamedTuple):
  """vSAM's schedule and statistics (all arrays, identical on every device).

  Attributes:
    rate: expected second gradients per window in the current window (the
      authors' ``base_sr``), float32; the quota of a window is
      ``floor(rate)``.
    next_rate: the rate of the next window, set when it is prepared.
    pattern: bool ``[window]``: which steps of the window drawn last are
      sampled (the current window's, or the next one's once it is drawn,
      two steps before it starts).
    current: bool ``[window]``: the current window's ``pattern``, copied at
      its first step.
    taken: second gradients taken in the current window (int32).
    probability: the probability of a sampled step at the last decision (1
      during warm-up, ``rate / window`` after), float32.
    since: steps since the last sampled step (int32).
    samples: sampled steps recorded so far (int32); the ring buffers' write
      position is ``samples % window``.
    key: PRNG key of the random draws (advanced once per warm-up step, and
      by a whole window when a window is prepared).
    ratio: ring buffer of ``R = ‖psf‖ / ‖g‖`` over the last ``window`` samples.
    norm: ring buffer of ``P = ‖psf‖``.
    root_variance: ring buffer of ``sqrt(V)``, ``V`` the mean block variance
      of ``sort(P)``. Kept as the root so that it cannot overflow (``V`` of
      gradients of 1e20 or more exceeds float32's range); the property
      ``variance`` reads ``V`` itself (``inf`` past float32's range).
  """

  rate: jax.Array
  next_rate: jax.Array
  pattern: jax.Array
  current: jax.Array
  taken: jax.Array
  probability: jax.Array
  since: jax.Array
  samples: jax.Array
  key: jax.Array
  ratio: jax.Array
  norm: jax.Array
  root_variance: jax.Array

  @property
  def variance(self) -> jax.Array:
    """The ring buffer of ``V`` (the square of ``root_variance``)."""
    return jnp.square(self.root_variance)

  def stats(self) -> dict[str, jax.Array]:
    return {
        "sampling_rate": self.probability,
        "samples_per_window": self.rate,
        "steps_since_sample": self.since,
    }


def leaf_keys(tree: PyTree) -> list[tuple[str, ...]]:
  """Every leaf's path as its keys' text (``("params", "fc", "kernel")``)."""
  return [
      tuple(base.key_name(k) for k in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def select_leaves(
    paths: list[Union[str, tuple[str, ...]]], stat_leaves: LeafSelection
) -> list[bool]:
  """Which leaf paths a selection (None, predicate, path prefixes) keeps.

  A path is its '/'-joined text or its keys (:func:`leaf_keys`). Given as
  keys, a prefix ends at a key boundary: ``"enc"`` selects
  ``("enc", "kernel")`` but not the key ``"enc/dense"``. A predicate gets
  the '/'-joined path.
  """
  keys = [p if isinstance(p, tuple) else None for p in paths]
  text = [p if isinstance(p, str) else "/".join(p) for p in paths]
  if stat_leaves is None:
    return [True] * len(paths)
  if callable(stat_leaves):
    return [bool(stat_leaves(p)) for p in text]

  def keeps(t, k, s):
    s = s.rstrip("/")
    if k is None:
      return t == s or t.startswith(s + "/")
    return any("/".join(k[:j]) == s for j in range(1, len(k) + 1))

  return [
      any(keeps(t, k, s) for s in stat_leaves) for t, k in zip(text, keys)
  ]


def chronological(buffer: jax.Array, samples: jax.Array) -> jax.Array:
  """A ring buffer, oldest entry first (never-written entries come first)."""
  size = buffer.shape[0]
  return jnp.roll(buffer, -(samples % size))


def mean_relative_change(
    values: jax.Array, valid: jax.Array, eps: float, power: int = 1
) -> jax.Array:
  """Mean of ``(y[i+1] - y[i]) / (y[i] + eps)``, ``y = values**power``, over
  pairs of valid entries.

  ``values`` in chronological order; ``valid`` marks the recorded entries.
  Zero when fewer than two entries are valid. Overflow-safe: each pair is
  first scaled by the power of two ``c`` that brings its larger entry into
  ``[0.5, 1)`` (:func:`base.pow2_scale`, at most ``2**(126 // power)``;
  the ratio is unchanged:
  ``((c x1)^p - (c x0)^p) / ((c x0)^p + eps c^p)``), so the squares of
  1e30 values (``power=2``) give their true relative change instead of
  ``inf / inf``. A pair whose scaled terms are both 0 changes by 0.
  """
  x0, x1 = values[:-1], values[1:]
  pair = valid[:-1] & valid[1:]
  # At most 2**(126 // power), so that c**power (and eps c**power) is finite.
  c = jnp.minimum(
      base.pow2_scale(jnp.maximum(jnp.abs(x0), jnp.abs(x1))),
      2.0 ** (126 // power),
  )
  y0, y1 = (x0 * c) ** power, (x1 * c) ** power
  num, den = y1 - y0, y0 + jnp.asarray(eps, jnp.float32) * c**power
  change = jnp.where(num == 0, 0.0, num / jnp.where(num == 0, 1.0, den))
  change = jnp.where(pair, change, 0.0)
  n = jnp.sum(pair.astype(jnp.float32))
  return jnp.where(n > 0, jnp.sum(change) / jnp.maximum(n, 1.0), 0.0)


def block_root_variance(norms: jax.Array, blocks: int) -> jax.Array:
  """``sqrt(V)``, ``V`` the mean over ``blocks`` equal blocks of the variance
  of ``sort(P)``.

  The unbiased variance (``ddof=1``), as ``torch.var`` in the authors' code.
  Overflow-safe: ``P`` is scaled by the power of two that brings its
  largest entry into ``[0.5, 1)`` before squaring, and the root is scaled
  back, so ``P`` of 1e30 gives ``sqrt(V)`` of about 1e30 (``V`` itself,
  about 1e60, is not representable in float32) and ``P`` of 1e-30 does not
  underflow to 0.
  """
  s = base.pow2_scale(jnp.max(jnp.abs(norms)))
  x = jnp.sort(norms * s).reshape(blocks, -1)
  return jnp.sqrt(jnp.mean(jnp.var(x, axis=1, ddof=1))) / s


def _concrete_int(value: Any) -> Optional[int]:
  v = base._concrete_float(value)  # pylint: disable=protected-access
  return None if v is None else int(v)


@dataclasses.dataclass(frozen=True, eq=False)
class VariationSampling(protocols.Gate):
  r"""vSAM's sampling gate (Deng, Pang, Zhang, Wang, arXiv 2403.08821).

  During the first ``warmup_steps`` steps every step is sampled. Then the
  steps are cut into windows of ``window`` steps, the first one starting at
  step ``warmup_steps``. Each window's rate (expected samples per window)
  comes from the statistics of the last ``window`` samples::

      dR   = clip(mean relative change of consecutive R values, -1, 1)
      dV   = clip(mean relative change of consecutive V values, -1, 1)
      rate = clip(rate * (1 + gains[0] * dR + gains[1] * dV),
                  1, floor(window * max_rate))

  and within the window a step is sampled with probability ``rate / window``
  while fewer than ``floor(rate)`` were taken, and forced when the steps left
  in the window (this one included) are no more than the quota left, so
  every window takes exactly ``floor(rate)`` samples.

  The whole window is drawn at once, on the device, at the end of the step
  two steps before it starts (``prepare``; at ``init`` when that step
  would come before step 0): the new rate from the statistics known then
  (a sample taken on the window's last step counts for the window after
  next), and the window's decisions with the draws of a key split once per
  step, the same draws as deciding step by step. A step then reads its
  decision from the stored pattern. The lag lets a planner read the
  pattern once per window while the step before the window runs, without
  waiting for it.

  On every sampled step (warm-up included), with ``psf = gs - g`` over the
  leaves chosen by ``stat_leaves``: ``R = ‖psf‖ / (‖g‖ + eps)``,
  ``P = ‖psf‖`` go into ring buffers of length ``window``, then
  ``V = mean_b var(block_b(sort(P buffer)))`` over ``blocks`` equal blocks.
  """

  warmup_steps: int = 100
  window: int = 50
  blocks: int = 5
  max_rate: float = 0.8
  gains: tuple[float, float] = (0.13, 0.13)
  initial_rate: float = 1.0
  seed: int = 0
  stat_leaves: LeafSelection = None
  eps: float = base.DEFAULT_EPS

  @property
  def max_quota(self) -> Union[int, jax.Array]:
    """``floor(window * max_rate)``: the most samples a window may take."""
    mr = base._concrete_float(self.max_rate)  # pylint: disable=protected-access
    if mr is None:  # injected by optax.inject_hyperparams
      # Not range-checked (traced): a value out of range, NaN included,
      # bounds the rate to [1, window] and is never stored in the state (a
      # NaN stored in the rate turned sampling off for the rest of the run).
      q = jnp.floor(self.window * jnp.asarray(self.max_rate, jnp.float32))
      return jnp.clip(jnp.nan_to_num(q, nan=1.0), 1.0, float(self.window))
    return int(math.floor(self.window * mr))

  def _check_stat_leaves(self, params):
    paths = leaf_keys(params)
    if self.stat_leaves is None:
      return
    if not callable(self.stat_leaves):
      unknown = [
          s for s in self.stat_leaves if not any(select_leaves(paths, [s]))
      ]
      if unknown:
        raise ValueError(
            f"stat_leaves names paths that are not in params: {unknown}; "
            f"params have the leaf paths {base.leaf_paths(params)}"
        )
    if not any(select_leaves(paths, self.stat_leaves)):
      raise ValueError(
          "stat_leaves selects no leaf of params; params have the leaf "
          f"paths {base.leaf_paths(params)}"
      )

  def init(self, params):
    self._check_stat_leaves(params)
    # Separate buffers: one array in two slots cannot be donated (nor one
    # that optax.inject_hyperparams keeps in its own state).
    zeros = lambda: jnp.zeros((self.window,), jnp.float32)  # noqa: E731
    rate = lambda: base.new_array(self.initial_rate, jnp.float32)  # noqa: E731
    state = VariationSamplingState(
        rate=rate(),
        next_rate=rate(),
        pattern=jnp.zeros((self.window,), bool),
        current=jnp.zeros((self.window,), bool),
        taken=jnp.zeros((), jnp.int32),
        probability=jnp.ones((), jnp.float32),
        since=jnp.zeros((), jnp.int32),
        samples=jnp.zeros((), jnp.int32),
        key=jax.random.PRNGKey(self.seed),
        ratio=zeros(),
        norm=zeros(),
        root_variance=zeros(),
    )
    # A first window that starts at step 0 or 1 is drawn now (two steps
    # before it would be before step 0).
    warmup = _concrete_int(self.warmup_steps)
    if warmup is not None:
      return self.prepare(state) if warmup <= 1 else state
    return base.tree_select(
        jnp.asarray(self.warmup_steps) <= 1, self.prepare(state), state
    )

  def updated_rate(self, state: VariationSamplingState):
    """The next window's rate, from the state's ring buffers."""
    idx = jnp.arange(self.window)
    valid = idx >= self.window - jnp.minimum(state.samples, self.window)
    d_r = mean_relative_change(
        chronological(state.ratio, state.samples), valid, self.eps
    )
    d_v = mean_relative_change(  # of V = root_variance**2
        chronological(state.root_variance, state.samples), valid, self.eps,
        power=2,
    )
    d_r = jnp.clip(d_r, -1.0, 1.0)
    d_v = jnp.clip(d_v, -1.0, 1.0)
    rate = state.rate * (1.0 + self.gains[0] * d_r + self.gains[1] * d_v)
    return jnp.clip(rate, 1.0, jnp.asarray(self.max_quota, jnp.float32))

  def prepare(self, state: VariationSamplingState) -> VariationSamplingState:
    """Draws the next window: its rate and which of its steps are sampled.

    Step ``pos`` of the window splits the key once and samples when
    ``taken < quota and uniform < rate / window``, or when the steps left
    (``window - pos``) are no more than the quota left. The steps are a
    rolled loop (``lax.scan`` of ``window`` iterations, its trip count
    known to XLA): the draws are the same as unrolled, and the program's
    size and compile time do not grow with the window (unrolled, the 50
    key splits of the default window made vSAM's window-drawing programs
    compile 4-5x longer than its other ones).
    """
    rate = self.updated_rate(state)
    quota = jnp.floor(rate).astype(jnp.int32)
    prob = rate / self.window

    def draw(carry, pos):
      key, taken = carry
      key, sub = jax.random.split(key)
      go = ((taken < quota) & (jax.random.uniform(sub) < prob)) | (
          (self.window - pos) <= (quota - taken))
      return (key, taken + go.astype(jnp.int32)), go

    # Under shard_map the carry is typed like the rate it is drawn with
    # (varying over an axis of models, each with its own statistics).
    axes = base.tree_varying_axes((state.key, quota, prob))
    carry = (base.to_varying(state.key, axes),
             base.to_varying(jnp.zeros((), jnp.int32), axes))
    (key, _), pattern = jax.lax.scan(
        draw, carry, jnp.arange(self.window, dtype=jnp.int32))
    return state._replace(next_rate=rate, pattern=pattern, key=key)

  def _position(self, count):
    warm = count < self.warmup_steps
    pos = jnp.maximum(count - self.warmup_steps, 0) % self.window
    return warm, pos

  def decide(self, step, state):
    warm, pos = self._position(step.count)
    # A window's first step reads the pattern just drawn; the others, the
    # copy it made (the next window may be drawn before this one ends).
    go = warm | jnp.where(pos == 0, state.pattern[0], state.current[pos])
    return go, self.advance(step, state, go)

  def advance(self, step, state, go):
    warm, pos = self._position(step.count)
    boundary = ~warm & (pos == 0)
    go = jnp.asarray(go)
    rate = jnp.where(boundary, state.next_rate, state.rate)
    # Warm-up steps split the key once each (the draws are unused), so the
    # first window's draws do not depend on how the warm-up was run.
    key = jnp.where(warm, jax.random.split(state.key)[0], state.key)
    taken = jnp.where(boundary, 0, state.taken)
    return state._replace(
        current=jnp.where(boundary, state.pattern, state.current),
        rate=rate,
        key=key,
        taken=taken + (go & ~warm).astype(jnp.int32),
        probability=jnp.where(warm, 1.0, rate / self.window).astype(
            jnp.float32
        ),
        since=jnp.where(go, 0, base.saturating_add(state.since, 1)).astype(
            jnp.int32),
    )

  def observe(self, step, second, state):
    flat_g, _ = jax.tree_util.tree_flatten_with_path(step.grads)
    flat_h = jax.tree.leaves(second)
    paths = [tuple(base.key_name(k) for k in p) for p, _ in flat_g]
    keep = select_leaves(paths, self.stat_leaves)
    g = [x for (_, x), k in zip(flat_g, keep) if k]
    psf = [
        h.astype(jnp.float32) - x.astype(jnp.float32)
        for (_, x), h, k in zip(flat_g, flat_h, keep)
        if k
    ]
    n_p, k_p = base.tree_norm_exp(psf)
    p_now = base.times_pow2(n_p, k_p)
    # ‖psf‖ / (‖g‖ + eps) from the (n, k) pairs: in range when the norms
    # themselves are not.
    r_now = base.times_over_norm(jnp.ones((), jnp.float32), n_p,
                                 base.tree_norm_exp(g), step.eps, num_exp=k_p)
    i = state.samples % self.window
    norm = state.norm.at[i].set(p_now)
    ratio = state.ratio.at[i].set(r_now)
    root_variance = state.root_variance.at[i].set(
        block_root_variance(norm, self.blocks)
    )
    return state._replace(
        samples=base.saturating_add(state.samples, 1), ratio=ratio, norm=norm,
        root_variance=root_variance,
    )

  def prepares_after(self, count):
    """Whether a window starts two steps after step ``count`` (whose end
    then draws it)."""
    # count + 2 >= warmup and (count + 2 - warmup) % window == 0, written
    # without count + 2, which would wrap at a saturated count (2**31 - 1)
    return (count >= self.warmup_steps - 2) & (
        (count - self.warmup_steps) % self.window == self.window - 2
    )

  def prefetch(self, count):
    """Whether a window starts at the step after ``count``: its pattern,
    drawn two steps before, is in the state before step ``count``."""
    warmup = _concrete_int(self.warmup_steps)
    if warmup is None:
      return False
    start = count + 1
    return start >= warmup and (start - warmup) % self.window == 0

  def after(self, step, state, planned=None):
    if planned is None:
      return base.cond(
          self.prepares_after(step.count), self.prepare, lambda s: s, state
      )
    return self.prepare(state) if planned else state

  def plan_after(self, count: int) -> Optional[bool]:
    if _concrete_int(self.warmup_steps) is None:
      return None
    return bool(self.prepares_after(count))

  def plan(self, count, read, memo):
    warmup = _concrete_int(self.warmup_steps)
    if warmup is None:  # injected: decided on the device
      return None
    if count < warmup:
      return True
    w, pos = divmod(count - warmup, self.window)
    if memo.get("window") != w:
      memo["window"] = w
      before = read(lagged=True) if pos == 0 else None
      if before is not None:  # drawn two steps before the window
        pattern = before.pattern
      else:  # waits for the step dispatched last
        now = read()
        pattern = now.pattern if pos == 0 else now.current
      memo["pattern"] = tuple(bool(x) for x in np.asarray(pattern))
    return memo["pattern"][pos]

  def plan_key(self):
    # What decides the plans: the warm-up (None when injected: then only
    # the device decides) and the window; the pattern is read from state.
    return protocols.part_key(
        self, warmup_steps=_concrete_int(self.warmup_steps),
        window=self.window,
    )

  def check_planned(self, second, after):
    protocols.check_flag("plan.second", second)
    protocols.check_flag("plan.gate_after", after)


def _check_gains(gains: Any) -> tuple[float, float]:
  try:
    gains = tuple(float(x) for x in gains)
  except TypeError:
    raise ValueError(f"gains must be a pair of floats, got {gains!r}") from None
  if len(gains) != 2 or not all(math.isfinite(x) and x >= 0 for x in gains):
    raise ValueError(
        f"gains must be two finite floats in [0, inf), got {gains!r}"
    )
  return gains


def _check_stat_leaves_arg(stat_leaves: LeafSelection) -> LeafSelection:
  if stat_leaves is not None and not callable(stat_leaves):
    if isinstance(stat_leaves, str):
      stat_leaves = (stat_leaves,)
    elif not hasattr(stat_leaves, "dtype"):  # an array: the message below
      stat_leaves = tuple(stat_leaves)
    if not stat_leaves or not all(isinstance(s, str) for s in stat_leaves):
      raise ValueError(
          "stat_leaves must be None, a predicate on the '/'-joined leaf path, "
          f"or a non-empty sequence of leaf paths or path prefixes; got "
          f"{stat_leaves!r}{base.inject_hint('stat_leaves', stat_leaves)}"
      )
  return stat_leaves


def variation_sampling(
    *,
    warmup_steps: int = 100,
    window: int = 50,
    blocks: int = 5,
    max_rate: float = 0.8,
    gains: tuple[float, float] = (0.13, 0.13),
    initial_rate: float = 1.0,
    seed: int = 0,
    stat_leaves: LeafSelection = None,
    eps: float = base.DEFAULT_EPS,
) -> VariationSampling:
  """vSAM's sampling gate (see :class:`VariationSampling`), with checks."""
  warmup_steps = base.int_or_traced("warmup_steps", warmup_steps, 0)
  window = base.static_int("window", window, 2)
  blocks = base.static_int("blocks", blocks, 1)
  if window < blocks or window % blocks or window // blocks < 2:
    raise ValueError(
        "window must be a multiple of blocks with at least 2 values per block "
        f"(window >= 2 * blocks, window % blocks == 0); got window={window}, "
        f"blocks={blocks}"
    )
  # max_rate, initial_rate and seed may arrive as arrays (inject_hyperparams
  # injects every numeric argument): checked when concrete.
  base.check_range("max_rate", max_rate, 0.0, 1.0, low_open=True)
  concrete = base._concrete_float  # pylint: disable=protected-access
  max_quota = window
  if concrete(max_rate) is not None:
    max_rate = concrete(max_rate)
    max_quota = int(math.floor(window * max_rate))
    if max_quota < 1:
      raise ValueError(
          "max_rate must allow at least one sample per window: "
          f"floor(window * max_rate) = floor({window} * {max_rate}) = "
          f"{max_quota}; max_rate must be in [1/window, 1] = "
          f"[{1 / window:g}, 1]"
      )
  gains = _check_gains(gains)
  base.check_range("initial_rate", initial_rate, 1.0, float(max_quota))
  if concrete(initial_rate) is not None:
    initial_rate = concrete(initial_rate)
  seed = base.check_seed("seed", seed)
  stat_leaves = _check_stat_leaves_arg(stat_leaves)
  return VariationSampling(
      warmup_steps=warmup_steps,
      window=window,
      blocks=blocks,
      max_rate=max_rate,
      gains=gains,
      initial_rate=initial_rate,
      seed=seed,
      stat_leaves=stat_leaves,
      eps=eps,
  )
