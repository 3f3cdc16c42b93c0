"""Flax's MNIST example (NNX: a CNN with BatchNorm and dropout) with SAM.

Three versions of the same training step, side by side: the plain optax
step (``train_step_plain``), the sam_optax port and the optax.contrib.sam
port. ``tests/test_examples.py`` runs each, checks that the two SAM ports
follow the same trajectory, and counts the lines each port changes
(docs/examples.md).

    python -m examples.flax_mnist_nnx --sam sam_optax --steps 200

The data are synthetic (``examples/synthetic.py``); put MNIST from
tensorflow-datasets in their place for the real run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
import sam_optax
from flax import nnx

from examples import synthetic


class CNN(nnx.Module):
  """Flax's MNIST CNN, narrower: conv (no bias: BatchNorm follows), BatchNorm,
  pool, dropout, dense."""

  def __init__(self, rngs: nnx.Rngs, width: int = 8):
    self.conv1 = nnx.Conv(1, width, kernel_size=(3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, kernel_size=(3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
    self.dropout = nnx.Dropout(0.1)
    self.linear1 = nnx.Linear(7 * 7 * 2 * width, 32, rngs=rngs)
    self.linear2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs=None):
    pool = lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.bn1(self.conv1(x))))
    x = pool(nnx.relu(self.bn2(self.conv2(x))))
    x = self.dropout(x.reshape(x.shape[0], -1), rngs=rngs)
    return self.linear2(nnx.relu(self.linear1(x)))


def loss_fn(graphdef, params, rest, batch, key):
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits = model(batch[0], rngs=nnx.Rngs(dropout=key))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
  return loss, nnx.state(model, nnx.Not(nnx.Param))


def train_step_plain(model, learning_rate):
  optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, rngs, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = rngs.dropout()
    def loss(params):
      return loss_fn(graphdef, params, rest, batch, key)
    (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
    optimizer.update(model, grads)
    nnx.update(model, new_rest)
    return value

  return optimizer, train_step


def train_step_sam_optax(model, learning_rate, rho=0.05):
  tx = optax.chain(sam_optax.sam(rho=rho, has_aux=True), optax.adamw(learning_rate))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, rngs, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = rngs.dropout()
    def loss(params, batch):
      return loss_fn(graphdef, params, rest, batch, key)
    (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    optimizer.update(model, grads, batch=batch, loss_fn=loss)
    nnx.update(model, new_rest)
    return value

  return optimizer, train_step


def train_step_contrib(model, learning_rate, rho=0.05):
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  tx = optax.contrib.sam(optax.adamw(learning_rate), adv, opaque_mode=True)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, rngs, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = rngs.dropout()
    def loss(params):
      return loss_fn(graphdef, params, rest, batch, key)
    (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
    grad_fn = lambda p, _: jax.grad(loss, has_aux=True)(p)[0]
    optimizer.update(model, grads, grad_fn=grad_fn)
    nnx.update(model, new_rest)
    return value

  return optimizer, train_step


VARIANTS = {"plain": train_step_plain, "sam_optax": train_step_sam_optax,
            "contrib": train_step_contrib}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sam", choices=sorted(VARIANTS), default="sam_optax")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=3e-3)
  args = parser.parse_args(argv)

  data = synthetic.images(512)
  model = CNN(nnx.Rngs(0))
  optimizer, train_step = VARIANTS[args.sam](model, args.lr)
  rngs = nnx.Rngs(dropout=1)
  losses = []
  for batch in synthetic.batches(data, args.batch_size, args.steps):
    losses.append(float(train_step(model, optimizer, rngs, batch)))
  model.eval()
  x, y = synthetic.images(256, seed=1)
  accuracy = float((model(x).argmax(-1) == y).mean())
  print(f"{args.sam}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"held-out accuracy {accuracy:.3f}")
  return {"losses": losses, "params": nnx.state(model, nnx.Param),
          "accuracy": accuracy}


if __name__ == "__main__":
  main()
