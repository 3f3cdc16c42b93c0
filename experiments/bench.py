"""Step time of every method relative to SGD, on the same model, one process.

    python -m experiments.bench                       # small CNN, CIFAR-shaped batch 64
    python -m experiments.bench --model resnet18      # ResNet-18-sized, for GPUs
    python -m experiments.bench --methods sgd,sam,looksam --rounds 7

Every method is a jitted train step (clean value-and-grad, the method's
transform, SGD with momentum, apply) on one fixed synthetic batch. Rounds are
interleaved (round r runs every method in turn), so drifts of the machine hit
every method alike. Each step is timed alone (dispatch to
``block_until_ready``) and classified from ``sam_optax.stats`` by what it did:

- ``second``: a second gradient was computed (``grad_evals`` grew),
- ``skip``: no second gradient (a reuse step, or a gate that said no),
- ``refresh``: a mask or selection was refreshed (a ``*_refreshes`` stat grew).

The table gives, per method, the median step over all its steps, the mean
step (what a run costs on average), and the median of each kind of step, all
as ratios to SGD's median step; the share of steps with a second gradient;
and the same for ``optax.contrib.sam`` (opaque mode) as an anchor row.
Results are printed as a markdown table and written as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from experiments import methods as methods_lib
from experiments import models

ANCHOR = "optax_contrib_sam"

# The fixed layer set of `layerwise_sam_fixed` per model: the output side.
# SmallCNN: its two output layers. ResNet-18: the last conv with its norm, and
# the head.
FIXED_LAYERS = {
    "small": ("fc", "head"),
    "resnet18": ("stage4_1/Conv_1", "stage4_1/BatchNorm_1", "head"),
}


def make_problem(model_name: str, batch_size: int, seed: int = 0):
  """(params, loss_fn, batch) for the benchmark model on a synthetic batch."""
  rng = np.random.default_rng(seed)
  if model_name == "small":
    model = models.SmallCNN(num_classes=10)
    shape = (batch_size, 32, 32, 3)
  elif model_name == "resnet18":
    model = models.ResNet(num_classes=10)  # ResNet-18, CIFAR variant
    shape = (batch_size, 32, 32, 3)
  else:
    raise ValueError(f"--model must be 'small' or 'resnet18', got {model_name!r}")
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  variables = model.init(jax.random.PRNGKey(seed), x[:2], train=False)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}

  if extra:  # BatchNorm models: statistics through has_aux.

    def loss_fn(p, batch):
      logits, new_state = model.apply(
          {"params": p, **batch["state"]}, batch["x"], train=True,
          mutable=list(batch["state"]),
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["y"]
      ).mean()
      return loss, new_state

    batch = {"x": x, "y": y, "state": extra}
    has_aux = True
  else:

    def loss_fn(p, batch):
      logits = model.apply({"params": p}, batch["x"], train=True)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["y"]
      ).mean()

    batch = {"x": x, "y": y}
    has_aux = False
  return params, loss_fn, batch, has_aux


def build_steps(
    names: list[str], loss_fn: Callable, has_aux: bool, lr: float, steps_per_epoch: int,
    total_steps: int, model_name: str = "small",
) -> dict[str, Callable]:
  """A jitted ``(params, opt_state, batch) -> (params, opt_state)`` per method."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
  steps = {}

  def make(tx, opaque=False):
    def step(params, opt_state, batch):
      _, grads = grad_fn(params, batch)
      if opaque:
        adv_grad = lambda p, _: jax.grad(loss_fn, has_aux=has_aux)(p, batch)[0] if has_aux else jax.grad(loss_fn)(p, batch)  # noqa: E731
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=adv_grad)
      else:
        updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
      return optax.apply_updates(params, updates), opt_state

    return tx, jax.jit(step, donate_argnums=(0, 1))

  base = lambda: optax.sgd(lr, momentum=0.9)  # noqa: E731
  for name in names:
    if name == ANCHOR:
      tx = optax.contrib.sam(
          base(),
          optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
          sync_period=2,
          opaque_mode=True,
      )
      steps[name] = make(tx, opaque=True)
    else:
      overrides = {}
      if name == "layerwise_sam_fixed":
        overrides["layers"] = FIXED_LAYERS[model_name]
      if name == "ssam_fisher" and has_aux:  # model state is not per example
        overrides["batch_axes"] = {"x": 0, "y": 0, "state": None}
      tx = methods_lib.build(
          name, loss_fn, base(), steps_per_epoch=steps_per_epoch,
          total_steps=total_steps, has_aux=has_aux, overrides=overrides,
      )
      steps[name] = make(tx)
  return steps


def _snapshot(opt_state) -> dict[str, float]:
  out = {}
  for k, v in sam_optax.stats(opt_state).items():
    try:
      out[k] = float(np.asarray(v).reshape(-1)[0])
    except (TypeError, ValueError):
      pass
  return out


def _kind(name: str, before: dict, after: dict) -> str:
  if name == ANCHOR:  # optax.contrib.sam computes its second gradient every step
    return "second"
  if any(
      k.endswith("_refreshes") and after.get(k, 0) > before.get(k, 0)
      for k in after
  ):
    return "refresh"
  evals = [k for k in after if k.endswith("grad_evals")]
  if evals and any(after[k] > before.get(k, 0) for k in evals):
    return "second"
  return "skip" if evals else "plain"


def run(args) -> dict[str, Any]:
  names = args.methods
  params0, loss_fn, batch, has_aux = make_problem(args.model, args.batch_size)
  total = args.warmup + args.rounds * args.steps
  steps = build_steps(
      names, loss_fn, has_aux, args.lr, args.steps_per_epoch, total, args.model
  )
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731

  carry, times, kinds = {}, {n: [] for n in names}, {n: [] for n in names}
  compile_s = {}
  for name in names:
    tx, step = steps[name]
    p = copy(params0)
    s = tx.init(p)
    t0 = time.perf_counter()
    for _ in range(max(args.warmup, 1)):  # compile, and leave warm-up behind
      p, s = step(p, s, batch)
    jax.block_until_ready(p)
    compile_s[name] = time.perf_counter() - t0
    carry[name] = (p, s)

  for _ in range(args.rounds):
    for name in names:
      _, step = steps[name]
      p, s = carry[name]
      for _ in range(args.steps):
        before = _snapshot(s)
        t0 = time.perf_counter()
        p, s = step(p, s, batch)
        jax.block_until_ready((p, s))
        times[name].append(time.perf_counter() - t0)
        kinds[name].append(_kind(name, before, _snapshot(s)))
      carry[name] = (p, s)

  sgd_med = statistics.median(times["sgd"])
  rows = {}
  for name in names:
    t = np.asarray(times[name])
    k = np.asarray(kinds[name])
    row = {
        "median_ms": 1e3 * float(np.median(t)),
        "ratio_median": float(np.median(t)) / sgd_med,
        "ratio_mean": float(np.mean(t)) / sgd_med,
        "steps": int(t.size),
        "second_share": float(np.mean((k == "second") | (k == "refresh"))),
        "compile_s": compile_s[name],
        "final_stats": _snapshot(carry[name][1]),
    }
    for kind in ("second", "skip", "refresh"):
      sel = t[k == kind]
      row[f"ratio_{kind}"] = float(np.median(sel)) / sgd_med if sel.size else None
      row[f"n_{kind}"] = int(sel.size)
    rows[name] = row
  return {
      "config": {
          "model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
          "steps_per_round": args.steps, "warmup": args.warmup,
          "steps_per_epoch": args.steps_per_epoch,
          "device": str(jax.devices()[0]), "backend": jax.default_backend(),
          "machine": platform.machine(), "jax": jax.__version__, "optax": optax.__version__,
      },
      "sgd_median_ms": 1e3 * sgd_med,
      "rows": rows,
  }


def to_markdown(result: dict[str, Any]) -> str:
  cfg = result["config"]
  fmt = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731
  lines = [
      f"Model `{cfg['model']}`, batch {cfg['batch_size']}, {cfg['backend']} "
      f"({cfg['device']}); SGD median step {result['sgd_median_ms']:.2f} ms; "
      f"{cfg['rounds']} interleaved rounds x {cfg['steps_per_round']} steps.",
      "",
      "| method | median step | mean step | second-grad step | skipped step "
      "| refresh step | steps with 2nd grad | ms (median) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in result["rows"].items():
    lines.append(
        f"| {name} | {fmt(r['ratio_median'])} | {fmt(r['ratio_mean'])} | "
        f"{fmt(r['ratio_second'])} | {fmt(r['ratio_skip'])} | "
        f"{fmt(r['ratio_refresh'])} | {100 * r['second_share']:.0f}% | "
        f"{r['median_ms']:.2f} |"
    )
  return "\n".join(lines)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument(
      "--methods", default=None,
      help="comma-separated registry names (default: sgd, the optax anchor "
      "and every method available)",
  )
  ap.add_argument("--model", default="small", choices=["small", "resnet18"])
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  ap.add_argument(
      "--steps-per-epoch", type=int, default=25,
      help="sets mask refresh periods and warm-ups that are given in epochs",
  )
  ap.add_argument("--lr", type=float, default=0.01)
  ap.add_argument("--json", default="bench_out/bench.json")
  args = ap.parse_args(argv)
  if args.methods is None:
    names = ["sgd", ANCHOR] + [n for n in methods_lib.available() if n != "sgd"]
  else:
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if "sgd" not in names:
      names.insert(0, "sgd")
  unknown = [n for n in names if n != ANCHOR and n not in methods_lib.METHODS]
  if unknown:
    ap.error(f"unknown methods {unknown}; known: {sorted(methods_lib.METHODS)} and {ANCHOR}")
  missing = [n for n in names if n != ANCHOR and n not in methods_lib.available()]
  if missing:
    ap.error(f"methods not in this sam_optax yet: {missing}")
  args.methods = names
  return args


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  print(to_markdown(result))
  if args.json:
    import os

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
