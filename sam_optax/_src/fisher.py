"""The empirical Fisher diagonal from per-example gradients (Sparse SAM-F),
and the slicing of a batch into examples or sub-batches (``batch_axes``)
that it shares with m-sharpness (``num_splits``).

Per-example gradients are computed in chunks (``vmap`` inside a
``fori_loop``), so at most ``chunk_size`` gradient copies exist at once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax._src import base

PyTree = Any


def check_batch_axes(batch_axes: Any) -> None:
  """Construction-time check: ``batch_axes`` is 0, None, or a pytree of
  Python 0/None."""
  for ax in jax.tree.leaves(batch_axes, is_leaf=lambda x: x is None):
    if isinstance(ax, jax.Array):  # what inject_hyperparams makes of a 0
      raise ValueError(
          "batch_axes must be given as Python 0/None (it fixes how the batch "
          "is sliced), got a JAX array; under optax.inject_hyperparams list "
          "'batch_axes' in static_args"
      )
    if ax is not None and (isinstance(ax, bool) or ax != 0):
      raise ValueError(f"batch_axes leaves must be 0 or None, got {ax!r}")


def split_batch(batch: Any, batch_axes: Any, num_splits: int):
  """The batch as ``num_splits`` contiguous sub-batches, for ``lax.scan``.

  Returns ``(parts, rebuild)``: ``parts`` is the list of the batched leaves
  (``batch_axes`` 0), each reshaped to ``(num_splits, size // num_splits,
  ...)``; ``rebuild(slices)`` turns one slice of each (what ``scan`` gives
  its body) back into a batch, with the leaves marked None passed whole.
  Sub-batch ``i`` holds examples ``[i*m, (i+1)*m)``, ``m = size //
  num_splits``: the split of ``shard_map`` with ``P(axis)`` over
  ``num_splits`` devices.
  """
  leaves, treedef, axes, size = batched_leaves(
      batch, batch_axes, "num_splits sub-batches"
  )
  if size % num_splits:
    raise ValueError(
        f"num_splits must divide the batch size: got num_splits={num_splits} "
        f"for a batch of {size} examples (on this device); use a batch size "
        "that is a multiple of num_splits"
    )
  per = size // num_splits
  parts = [
      jnp.reshape(x, (num_splits, per) + tuple(np.shape(x)[1:]))
      for x, ax in zip(leaves, axes) if ax == 0
  ]

  def rebuild(slices):
    it = iter(slices)
    return jax.tree.unflatten(
        treedef, [next(it) if ax == 0 else x for x, ax in zip(leaves, axes)]
    )

  return parts, rebuild


@contextlib.contextmanager
def slicing_hint(purpose: str):
  """Adds a note to an error raised while ``loss_fn`` runs on a sliced
  batch (``purpose``: what the slices are): a leaf that is not per example
  but was sliced (the default ``batch_axes=0`` slices every leaf) fails
  inside the user's model with a shape error that does not say so."""
  try:
    yield
  except Exception as err:  # pylint: disable=broad-except
    if hasattr(err, "add_note"):
      err.add_note(
          f"(raised while sam_optax evaluated loss_fn on {purpose}: every "
          "batch leaf marked 0 in batch_axes, every leaf by default, was "
          "sliced on its leading axis. A leaf that is not per example, such "
          "as model state (BatchNorm statistics), a PRNG key or a lookup "
          "table, must be marked None, e.g. batch_axes={'x': 0, 'y': 0, "
          "'state': None}.)"
      )
    raise


def _expand_axes(batch_axes: Any, batch: Any) -> PyTree:
  """``batch_axes`` (0/None, a prefix of ``batch``) broadcast to every leaf."""
  try:
    return jax.tree.map(
        lambda ax, sub: jax.tree.map(lambda _: ax, sub),
        batch_axes,
        batch,
        is_leaf=lambda x: x is None,
    )
  except ValueError as err:
    raise ValueError(
        "batch_axes must be 0, None, or a prefix of the batch's structure "
        f"with 0/None leaves: {err}"
    ) from None


def batched_leaves(
    batch: Any, batch_axes: Any, purpose: str = "per-example gradients"
):
  """(leaves, treedef, axis per leaf, per-example count), with clear errors
  for batch leaves that cannot be sliced per example (``purpose`` names
  what slices them in the messages)."""
  axes = _expand_axes(batch_axes, batch)
  leaves, treedef = jax.tree.flatten(batch)
  ax_leaves = treedef.flatten_up_to(axes)
  for x, ax in zip(leaves, ax_leaves):
    if ax not in (0, None):
      raise ValueError(f"batch_axes entries must be 0 or None, got {ax!r}")
  sizes = {int(np.shape(x)[0]) for x, ax in zip(leaves, ax_leaves)
           if ax == 0 and np.ndim(x) > 0}
  scalars = [path for path, x, ax in
             zip(base.leaf_paths(batch), leaves, ax_leaves)
             if ax == 0 and np.ndim(x) == 0]
  if scalars:
    raise ValueError(
        f"{purpose} slice every batch leaf marked 0 in batch_axes (every "
        f"leaf by default), but these are scalars: {scalars}; mark them "
        "None in batch_axes (a prefix of the batch's structure, e.g. "
        "batch_axes={'x': 0, 'y': 0, 'state': None})"
    )
  if not sizes:
    raise ValueError(
        f"{purpose} need at least one batched leaf in the batch "
        "(batch_axes 0)"
    )
  if len(sizes) > 1:
    paths = base.leaf_paths(batch)
    found = {
        path: int(np.shape(x)[0])
        for path, x, ax in zip(paths, leaves, ax_leaves)
        if ax == 0 and np.ndim(x) > 0
    }
    raise ValueError(
        f"{purpose} slice every batch leaf marked 0 in batch_axes "
        f"on its leading axis, but their sizes differ: {found}; mark the "
        "leaves that are not per example (model state, a PRNG key) None in "
        "batch_axes, e.g. batch_axes={'x': 0, 'y': 0, 'state': None}"
    )
  return leaves, treedef, ax_leaves, sizes.pop()


def fisher_scores(
    loss: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    num_samples: int,
    *,
    chunk_size: int = 8,
    batch_axes: Any = 0,
    axis_name: Optional[base.AxisName] = None,
    scale: Any = 1.0,
) -> PyTree:
  """Empirical Fisher diagonal ``F = Σ_{i<num_samples} (scale ∇ℓ_i(w))²``,
  float32.

  ``scale`` multiplies every per-example gradient before it is squared:
  a power of two (``base.tree_scale`` of the batch gradient) keeps the
  squares of huge gradients finite without changing the order of the
  entries, which is all a mask needs.

  Example ``i`` is the batch with every leaf whose axis is 0 sliced to
  ``[i:i+1]`` (leaves whose ``batch_axes`` entry is None, such as model state
  or a PRNG key, are passed whole). Per-example gradients are computed
  ``chunk_size`` at a time (``vmap`` inside a ``fori_loop`` that accumulates
  the squares), so at most ``chunk_size`` gradient copies exist at once.

  Under ``axis_name`` the examples are the first ``num_samples`` of the
  GLOBAL batch, taken to be split contiguously over the axis (device ``d``
  holds examples ``[d*b, (d+1)*b)``, as with ``pmap`` over a reshaped batch
  or ``shard_map`` with ``P(axis)``): each device computes ``min(num_samples,
  b)`` per-example gradients of its own examples and weights by 0 those past
  ``num_samples``. The result is this device's part; ``psum`` it over the
  axis for the Fisher of the single-device run.

  Args:
    loss: ``loss(params, batch) -> scalar``.
    params: where the gradients are taken.
    batch: the batch; the first ``num_samples`` examples are used.
    num_samples: how many examples (static, at most the (global) batch size).
    chunk_size: per-example gradients computed together.
    batch_axes: 0 (every leaf is batched on its leading axis), None, or a
      prefix pytree of the batch with 0/None per leaf.
    axis_name: the ``pmap``/``shard_map`` axis the batch is split over.
  """
  leaves, treedef, ax_leaves, local = batched_leaves(batch, batch_axes)
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  if num_samples > local * devices:
    where = "" if devices == 1 else f" = {devices} devices x {local}"
    raise ValueError(
        f"num_samples must be in [1, batch size{where} = {local * devices}], "
        f"got {num_samples}"
    )
  per_device = min(num_samples, local)
  chunk = min(chunk_size, per_device)
  first = (
      jnp.int32(0)
      if axis_name is None
      else jax.lax.axis_index(axis_name).astype(jnp.int32) * local
  )

  # Each device's own per-example gradients (see base.per_device).
  params = base.per_device(params, axis_name)
  sq_sum = _chunk_squares(loss, params, (leaves, treedef, ax_leaves), scale,
                          axis_name, first, num_samples)
  # Zeros typed like the per-device params, as the squares they sum.
  zeros = base.zeros_like_f32(params)
  return _sum_in_chunks(sq_sum, zeros, per_device, chunk)


def _chunk_squares(loss, params, sliced, scale, axis_name, first,
                   num_samples) -> Callable[[Any, int], PyTree]:
  """``sq_sum(start, size)``: the sum over the batch's examples ``[start,
  start + size)`` of ``(scale ∇ℓ_i)²``, float32 (``vmap`` of the
  per-example gradient). ``sliced``: :func:`batched_leaves`' (leaves,
  treedef, axes). Under ``axis_name`` examples whose global index (``first``
  + local index) is ``num_samples`` or more weigh 0."""
  leaves, treedef, ax_leaves = sliced

  def example_grad(*example_leaves):
    ex = [
        x[None] if ax == 0 else x for x, ax in zip(example_leaves, ax_leaves)
    ]
    return jax.grad(loss)(params, jax.tree.unflatten(treedef, ex))

  def sq_sum(start, size):
    part = [
        jax.lax.dynamic_slice_in_dim(x, start, size, 0) if ax == 0 else x
        for x, ax in zip(leaves, ax_leaves)
    ]
    with slicing_hint("single examples, for the Fisher"):
      g = jax.vmap(example_grad, in_axes=tuple(ax_leaves))(*part)
    if axis_name is None:
      return jax.tree.map(
          lambda y: jnp.sum(jnp.square(y.astype(jnp.float32) * scale), axis=0), g
      )
    # Global index of each example; those past num_samples weigh 0.
    weight = (first + start + jnp.arange(size) < num_samples).astype(
        jnp.float32
    )
    return jax.tree.map(
        lambda y: jnp.tensordot(
            weight, jnp.square(y.astype(jnp.float32) * scale), 1
        ),
        g,
    )

  return sq_sum


def _sum_in_chunks(sq_sum, zeros, total: int, chunk: int) -> PyTree:
  """``Σ sq_sum(start, size)`` over ``total`` examples, ``chunk`` at a time
  (``zeros``: the float32 zeros it starts from)."""
  acc = zeros
  full, rest = divmod(total, chunk)
  if full == 1:
    acc = sq_sum(0, chunk)
  elif full > 1:
    acc = jax.lax.fori_loop(
        0,
        full,
        lambda i, a: jax.tree.map(jnp.add, a, sq_sum(i * chunk, chunk)),
        acc,
    )
  if rest:
    acc = jax.tree.map(jnp.add, acc, sq_sum(full * chunk, rest))
  return acc
