"""The compiled work of a run: loss, forward pass, train step, eval step.

Shared by :mod:`experiments.trainer` (training, comparison) and
:mod:`experiments.bench` (step times), so both time and train the same step.

A train step is ``step(state, batch) -> (state, (loss, correct))``:

- the clean pass gives the loss, the accuracy, the gradient the method
  receives and the new BatchNorm statistics;
- the method (a ``sam_optax`` transform chained with the base optimizer)
  turns the clean gradient into the update.

With ``axis_name`` the step is the per-device body of a ``shard_map`` over
that axis (m-sharpness, see :mod:`experiments.parallel`): the gradient given
to the method is the device's own; the method, built with the same
``axis_name``, averages its output over the axis; a method with no
sam_optax transform (SGD) gets the averaged gradient; the loss and the
BatchNorm statistics are averaged and the correct count summed, so every
output is identical on every device.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

PyTree = Any


class TrainState(NamedTuple):
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float
) -> jax.Array:
  """Mean softmax cross-entropy against ``(1 - s) * onehot + s / K``."""
  targets = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def make_forward(model, num_classes: int, smoothing: float, has_bn: bool):
  """``forward(params, batch) -> (loss, (logits, new_batch_stats))``.

  ``batch`` is ``{"image", "label"}`` (+ ``"batch_stats"`` with BatchNorm).
  With BatchNorm ``batch["batch_stats"]`` holds the running statistics and
  the model runs in training mode (batch statistics), returning the updated
  running statistics; without, ``new_batch_stats`` is ``{}``.
  """

  def forward(params, batch):
    if has_bn:
      logits, mutated = model.apply(
          {"params": params, "batch_stats": batch["batch_stats"]},
          batch["image"],
          train=True,
          mutable=["batch_stats"],
      )
      new_stats = mutated["batch_stats"]
    else:
      logits = model.apply({"params": params}, batch["image"], train=True)
      new_stats = {}
    loss = cross_entropy(logits, batch["label"], num_classes, smoothing)
    return loss, (logits, new_stats)

  return forward


def method_loss_fn(forward: Callable, has_bn: bool) -> Callable:
  """The ``loss_fn(params, batch)`` given to the method.

  BatchNorm models: ``(loss, new_batch_stats)`` (``has_aux=True``); the
  method discards the aux of its perturbed evaluations, and the statistics
  kept are those of the clean pass in :func:`make_train_step`.
  """
  if has_bn:

    def loss_fn(params, batch):
      loss, (_, new_stats) = forward(params, batch)
      return loss, new_stats

    return loss_fn
  return lambda params, batch: forward(params, batch)[0]


def make_train_step(
    forward: Callable,
    tx: optax.GradientTransformationExtraArgs,
    has_bn: bool,
    *,
    axis_name: Optional[str] = None,
    reduce_grads: bool = False,
    plan: Any = None,
):
  """``step(state, batch) -> (state, (loss, correct))`` for one batch.

  Args:
    forward: from :func:`make_forward`.
    tx: the method over the base optimizer (built with ``axis_name`` when
      the step runs per device).
    has_bn: the model has BatchNorm statistics (they travel in the batch).
    axis_name: the ``shard_map`` axis when the step is a per-device body;
      None under ``jit`` (sharded or not).
    reduce_grads: with ``axis_name``, average the clean gradient over the
      axis before ``tx`` (for a ``tx`` that would not average it itself,
      i.e. plain SGD).
    plan: the step's ``sam_optax.Plan`` (from ``sam_optax.planner``), passed
      to ``tx.update``; the step then holds no conditional. None: the
      ``lax.cond`` path. A plan is static: build one step per plan.
  """
  extra = {} if plan is None else {"plan": plan}

  def step(state: TrainState, batch: dict):
    b = dict(batch, batch_stats=state.batch_stats) if has_bn else batch
    (loss, (logits, new_stats)), grads = jax.value_and_grad(
        forward, has_aux=True
    )(state.params, b)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
      if reduce_grads:
        grads = jax.lax.pmean(grads, axis_name)
      loss = jax.lax.pmean(loss, axis_name)
      correct = jax.lax.psum(correct, axis_name)
      new_stats = jax.lax.pmean(new_stats, axis_name)
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, batch=b, **extra
    )
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(
        params, new_stats if has_bn else state.batch_stats, opt_state
    )
    return new_state, (loss, correct)

  return step


def make_eval_step(model, num_classes: int, has_bn: bool):
  """``eval(params, batch_stats, images, labels, weights) -> (loss, correct)``
  sums over the batch (``weights`` masks padding)."""

  def evaluate(params, batch_stats, images, labels, weights):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = batch_stats
    logits = model.apply(variables, images, train=False)
    losses = optax.softmax_cross_entropy(
        logits, jax.nn.one_hot(labels, num_classes)
    )
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights)

  return evaluate


def grad_evals(opt_state: PyTree) -> int:
  """Gradient evaluations the method made (sum over its sam_optax states)."""
  st = sam_optax.stats(opt_state)
  return int(sum(int(np.asarray(v)) for k, v in st.items()
                 if k.endswith("grad_evals")))


def scalar_stats(opt_state: PyTree) -> dict[str, float]:
  """The scalar diagnostics of ``sam_optax.stats`` as floats."""
  out = {}
  for k, v in sam_optax.stats(opt_state).items():
    a = np.asarray(v)
    if a.size == 1 and np.issubdtype(a.dtype, np.number):
      out[k] = float(a.reshape(()))
  return out
