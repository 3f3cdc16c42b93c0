"""Equinox's MNIST example (a CNN, ``eqx.filter_jit``, ``eqx.filter_value_and_grad``)
with SAM.

Three versions of the same training step, side by side: the plain optax
step, the sam_optax port and the optax.contrib.sam port
(``tests/test_examples.py`` runs them and counts the lines each port
changes; docs/examples.md).

    python -m examples.equinox_mnist --sam sam_optax --steps 200

The data are synthetic (``examples/synthetic.py``).
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import sam_optax

from examples import synthetic


class CNN(eqx.Module):
  layers: list

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.layers = [
        eqx.nn.Conv2d(1, 3, kernel_size=4, key=k1), eqx.nn.MaxPool2d(kernel_size=2),
        jax.nn.relu, jnp.ravel,
        eqx.nn.Linear(3 * 24 * 24, 32, key=k2), jax.nn.sigmoid,
        eqx.nn.Linear(32, 10, key=k3), jax.nn.log_softmax,
    ]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def loss(model, x, y):
  pred_y = jax.vmap(model)(x)
  return -jnp.mean(jnp.take_along_axis(pred_y, y[:, None], axis=1))


def train_step_plain(model, learning_rate):
  optim = optax.adamw(learning_rate)

  @eqx.filter_jit
  def make_step(model, opt_state, x, y):
    loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss_value

  return optim, make_step


def train_step_sam_optax(model, learning_rate, rho=0.05):
  optim = optax.chain(sam_optax.sam(rho=rho), optax.adamw(learning_rate))

  @eqx.filter_jit
  def make_step(model, opt_state, x, y):
    loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    loss_fn = lambda p, batch: loss(eqx.combine(p, model), *batch)
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array), batch=(x, y), loss_fn=loss_fn)
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss_value

  return optim, make_step


def train_step_contrib(model, learning_rate, rho=0.05):
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  optim = optax.contrib.sam(optax.adamw(learning_rate), adv, opaque_mode=True)

  @eqx.filter_jit
  def make_step(model, opt_state, x, y):
    loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    grad_fn = lambda p, _: eqx.filter_grad(loss)(eqx.combine(p, model), x, y)
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array), grad_fn=grad_fn)
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss_value

  return optim, make_step


VARIANTS = {"plain": train_step_plain, "sam_optax": train_step_sam_optax,
            "contrib": train_step_contrib}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sam", choices=sorted(VARIANTS), default="sam_optax")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=3e-3)
  args = parser.parse_args(argv)

  x_all, y_all = synthetic.images(512, shape=(1, 28, 28))
  model = CNN(jax.random.PRNGKey(0))
  optim, make_step = VARIANTS[args.sam](model, args.lr)
  opt_state = optim.init(eqx.filter(model, eqx.is_array))
  losses = []
  for x, y in synthetic.batches((x_all, y_all), args.batch_size, args.steps):
    model, opt_state, loss_value = make_step(model, opt_state, x, y)
    losses.append(float(loss_value))
  x, y = synthetic.images(256, shape=(1, 28, 28), seed=1)
  accuracy = float((jax.vmap(model)(x).argmax(-1) == y).mean())
  print(f"{args.sam}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"held-out accuracy {accuracy:.3f}")
  return {"losses": losses, "params": eqx.filter(model, eqx.is_array),
          "accuracy": accuracy}


if __name__ == "__main__":
  main()
