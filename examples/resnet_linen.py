"""Flax's ImageNet example (a linen ResNet with BatchNorm, ``TrainState``
with ``batch_stats``) with SAM, at toy size.

Three versions of the same training step, side by side: the plain optax
step, the sam_optax port and the optax.contrib.sam port
(``tests/test_examples.py`` runs them and counts the lines each port
changes; docs/examples.md).

    python -m examples.resnet_linen --sam sam_optax --steps 200

The data are synthetic 16x16 images (``examples/synthetic.py``).
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import sam_optax
from flax.training import train_state

from examples import synthetic


class ResidualBlock(nn.Module):
  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = ResidualBlock(self.width)(x, train)
    x = ResidualBlock(2 * self.width, strides=2)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class TrainState(train_state.TrainState):
  batch_stats: Any


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step_plain(model, variables, learning_rate):
  state = TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=optax.sgd(learning_rate, momentum=0.9, nesterov=True))

  @jax.jit
  def train_step(state, batch):
    def loss_fn(params):
      logits, new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, batch[0],
          mutable=["batch_stats"])
      return cross_entropy(logits, batch[1]), new_model_state
    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    return state, loss

  return state, train_step


def train_step_sam_optax(model, variables, learning_rate, rho=0.05):
  tx = optax.chain(sam_optax.sam(rho=rho, has_aux=True),
                   optax.sgd(learning_rate, momentum=0.9, nesterov=True))
  state = TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      batch_stats=variables["batch_stats"], tx=tx)

  @jax.jit
  def train_step(state, batch):
    def loss_fn(params, batch):
      logits, new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, batch[0],
          mutable=["batch_stats"])
      return cross_entropy(logits, batch[1]), new_model_state
    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, batch=batch, loss_fn=loss_fn)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, batch_stats=new_model_state["batch_stats"])
    return state, loss

  return state, train_step


def train_step_contrib(model, variables, learning_rate, rho=0.05):
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  tx = optax.contrib.sam(optax.sgd(learning_rate, momentum=0.9, nesterov=True), adv,
                         opaque_mode=True)
  state = TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      batch_stats=variables["batch_stats"], tx=tx)

  @jax.jit
  def train_step(state, batch):
    def loss_fn(params):
      logits, new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, batch[0],
          mutable=["batch_stats"])
      return cross_entropy(logits, batch[1]), new_model_state
    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_fn = lambda p, _: jax.grad(loss_fn, has_aux=True)(p)[0]
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, batch_stats=new_model_state["batch_stats"])
    return state, loss

  return state, train_step


VARIANTS = {"plain": train_step_plain, "sam_optax": train_step_sam_optax,
            "contrib": train_step_contrib}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sam", choices=sorted(VARIANTS), default="sam_optax")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.05)
  args = parser.parse_args(argv)

  data = synthetic.images(512, shape=(16, 16, 3))
  model = ResNet()
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.PRNGKey(0), data[0][:1], train=False)
  state, train_step = VARIANTS[args.sam](model, variables, args.lr)
  losses = []
  for batch in synthetic.batches(data, args.batch_size, args.steps):
    state, loss = train_step(state, batch)
    losses.append(float(loss))
  x, y = synthetic.images(256, shape=(16, 16, 3), seed=1)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       x, train=False)
  accuracy = float((logits.argmax(-1) == y).mean())
  print(f"{args.sam}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"held-out accuracy {accuracy:.3f}")
  return {"losses": losses, "params": state.params, "accuracy": accuracy}


if __name__ == "__main__":
  main()
