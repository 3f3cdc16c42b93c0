"""Flax's lm1b example (a linen decoder-only transformer with dropout,
trained under sharded ``jit``) with SAM, at toy size.

Three versions of the same training step, side by side: the plain optax
step, the sam_optax port and the optax.contrib.sam port
(``tests/test_examples.py`` runs them and counts the lines each port
changes; docs/examples.md). The batch is sharded over every device on a
``Mesh`` axis ``data``, the parameters replicated; with no axis name the
SAM step is the step of the whole batch.

    python -m examples.transformer_lm --sam sam_optax --steps 200

The data are a synthetic counting language (``examples/synthetic.py``).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sam_optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from examples import synthetic


class Decoder(nn.Module):
  vocab: int = 16
  dim: int = 32
  heads: int = 2
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    x = nn.Embed(self.vocab, self.dim)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (tokens.shape[1], self.dim))
    mask = nn.make_causal_mask(tokens)
    y = nn.MultiHeadDotProductAttention(  # no biases, as in lm1b
        self.heads, dropout_rate=self.dropout_rate, deterministic=not train,
        use_bias=False)(nn.LayerNorm()(x), mask=mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def next_token_loss(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def train_step_plain(model, params, learning_rate):
  tx = optax.adamw(learning_rate, weight_decay=0.1)

  @jax.jit
  def train_step(params, opt_state, tokens, dropout_rng, step):
    dropout_rng = jax.random.fold_in(dropout_rng, step)
    def loss_fn(params):
      logits = model.apply({"params": params}, tokens, rngs={"dropout": dropout_rng})
      return next_token_loss(logits, tokens)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


def train_step_sam_optax(model, params, learning_rate, rho=0.05):
  tx = optax.chain(sam_optax.sam(rho=rho), optax.adamw(learning_rate, weight_decay=0.1))

  @jax.jit
  def train_step(params, opt_state, tokens, dropout_rng, step):
    dropout_rng = jax.random.fold_in(dropout_rng, step)
    def loss_fn(params, tokens):
      logits = model.apply({"params": params}, tokens, rngs={"dropout": dropout_rng})
      return next_token_loss(logits, tokens)
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, batch=tokens, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


def train_step_contrib(model, params, learning_rate, rho=0.05):
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  tx = optax.contrib.sam(optax.adamw(learning_rate, weight_decay=0.1), adv, opaque_mode=True)

  @jax.jit
  def train_step(params, opt_state, tokens, dropout_rng, step):
    dropout_rng = jax.random.fold_in(dropout_rng, step)
    def loss_fn(params):
      logits = model.apply({"params": params}, tokens, rngs={"dropout": dropout_rng})
      return next_token_loss(logits, tokens)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    grad_fn = lambda p, _: jax.grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


VARIANTS = {"plain": train_step_plain, "sam_optax": train_step_sam_optax,
            "contrib": train_step_contrib}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sam", choices=sorted(VARIANTS), default="sam_optax")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=16,
                      help="the global batch; a multiple of the device count")
  parser.add_argument("--lr", type=float, default=3e-3)
  args = parser.parse_args(argv)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  data = (synthetic.tokens(512, length=16, vocab=16),)
  model = Decoder()
  params = jax.jit(model.init, static_argnames="train")(
      jax.random.PRNGKey(0), data[0][:1], train=False)["params"]
  params = jax.device_put(params, replicated)
  tx, train_step = VARIANTS[args.sam](model, params, args.lr)
  opt_state = tx.init(params)
  dropout_rng = jax.random.PRNGKey(1)
  losses = []
  for step, (tokens,) in enumerate(synthetic.batches(data, args.batch_size, args.steps)):
    tokens = jax.device_put(tokens, sharded)
    params, opt_state, loss = train_step(params, opt_state, tokens, dropout_rng, step)
    losses.append(float(loss))
  print(f"{args.sam}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"on {len(jax.devices())} devices")
  return {"losses": losses, "params": params}


if __name__ == "__main__":
  main()
