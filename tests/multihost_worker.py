"""One process of the multi-host test (``tests/test_multihost.py``).

    python tests/multihost_worker.py --out DIR --phase train \\
        [--process-id I --num-processes 2 --port P] --local-devices 4

Every method of ``METHODS`` trains a small MLP for ``STEPS`` steps on one
global mesh over every device of every process (batch sharded over
``data``, parameters and optimizer state replicated), under sharded ``jit``
(``global`` perturbation) and under ``shard_map`` with ``axis_name="data"``
(``per-device``: each device perturbs with its own shard's gradient). Phases:

- ``train``: steps 1..STEPS; after step ``CKPT`` an orbax checkpoint (every
  process writes its part) under ``OUT/ckpt/<perturbation>_<method>`` for
  the perturbations of ``--checkpoint-perturbations``;
- ``resume``: a fresh process restores step ``CKPT`` and runs to STEPS.

Each process writes ``OUT/<phase>_p<I>.npz`` (the final state of every
method, host copies of the replicated arrays) and ``OUT/<phase>_p<I>.json``
(``sam_optax.stats`` after every step). Nothing happens at import (pytest
imports this file when it collects doctests).

``--planned global`` (a comma-separated list of perturbations) plans every
step of those runs on the host (``sam_optax.planner``,
``plan = planner(count, opt_state)``), passes the plan to a step jitted with
``static_argnames="plan"`` and logs it beside the stats, so the test can
require identical plans in both processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

STEPS = 6
CKPT = 3
GLOBAL_BATCH = 32
FEATURES, HIDDEN, CLASSES = 8, 16, 4

# Small settings so that 6 steps refresh, reuse and sample.
METHODS = {
    "sam": {"rho": 0.05},
    "looksam": {"rho": 0.1, "k": 2, "alpha": 0.7},
    "vsam": {"rho": 0.05, "warmup_steps": 2, "window": 4, "blocks": 2,
             "initial_rate": 2.0},
    "ssam_fisher": {"rho": 0.05, "sparsity": 0.5, "num_samples": 4,
                    "update_every": 2},
    "layerwise_sam": {"rho": 0.1, "alpha": 0.8, "num_layers": 1,
                      "select_every": 2, "select_by": "gradient"},
}


def parse(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--phase", choices=("train", "resume"), default="train")
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--local-devices", type=int, default=8)
  p.add_argument("--perturbations", default="global,per-device",
                 help="comma-separated: global and/or per-device")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--planned", default="",
                 help="comma-separated perturbations whose steps are planned "
                 "on the host (sam_optax.planner), the plans logged")
  p.add_argument("--checkpoint-perturbations", default="global",
                 help="the runs that write a checkpoint in phase train")
  return p.parse_args(argv)


def setup(args):
  """Devices and (with 2+ processes) jax.distributed over loopback."""
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={args.local_devices}"
  )
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top

  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = f"127.0.0.1:{args.port}"
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_bind_address=address,  # loopback only
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    _pin_gloo_to_loopback(jax)
  assert jax.process_count() == args.num_processes
  assert jax.device_count() == args.local_devices * args.num_processes
  return jax


def _pin_gloo_to_loopback(jax):
  """Gloo listens on the address the host name resolves to; make it
  127.0.0.1 whatever the host name (jax has no public flag for it, so this
  replaces the CPU backend factory before the backend starts, where this
  jax version allows)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top

    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=distributed.global_state.client,
        hostname="127.0.0.1")
    xla_bridge.register_backend_factory(
        "cpu", lambda: xla_bridge.make_cpu_client(collectives=collectives),
        priority=0, fail_quietly=False)
  except (ImportError, AttributeError, TypeError) as e:
    import socket  # pylint: disable=g-import-not-at-top

    addr = socket.gethostbyname(socket.gethostname())
    assert addr.startswith("127."), (
        f"cannot pin gloo to loopback ({e!r}) and the host name resolves "
        f"to {addr}")
  del jax


def main(argv=None):
  args = parse(argv)
  jax = setup(args)
  import sam_optax  # pylint: disable=g-import-not-at-top

  if args.planned and not hasattr(sam_optax, "planner"):
    raise SystemExit("--planned: this sam_optax has no planner yet")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from experiments import checkpoints  # pylint: disable=g-import-not-at-top
  from experiments import parallel  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  repl, shard = parallel.replicated(mesh), parallel.sharded(mesh)

  def loss_fn(params, batch):
    h = batch["x"]
    for name in ("l1", "l2"):
      h = jnp.tanh(h @ params[name]["kernel"] + params[name]["bias"])
    logits = h @ params["head"]["kernel"] + params["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  def init_params():
    rng = np.random.default_rng(0)
    dims = [("l1", FEATURES, HIDDEN), ("l2", HIDDEN, HIDDEN),
            ("head", HIDDEN, CLASSES)]
    return {n: {"kernel": rng.normal(0, 1 / np.sqrt(i), (i, o)).astype(
        np.float32), "bias": np.zeros((o,), np.float32)} for n, i, o in dims}

  def batch_at(step):
    """The global batch of ``step``: the same in every process; each
    process materialises only its own devices' shards."""
    rng = np.random.default_rng(1000 + step)
    x = rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
    return parallel.host_to_global({"x": x, "y": y}, shard)

  def make_step(tx, per_device):
    """``step(params, opt_state, batch, plan) -> (params, opt_state)``; one
    compiled program per distinct ``plan`` (None: the lax.cond path)."""

    def body(params, opt_state, batch, plan):
      grads = jax.grad(loss_fn)(params, batch)
      extra = {} if plan is None else {"plan": plan}
      updates, opt_state = tx.update(grads, opt_state, params, batch=batch,
                                     **extra)
      return optax.apply_updates(params, updates), opt_state

    def step(params, opt_state, batch, plan=None):
      fn = functools.partial(body, plan=plan)
      if per_device:
        fn = jax.shard_map(fn, mesh=mesh,
                           in_specs=(P(), P(), P(parallel.AXIS)),
                           out_specs=(P(), P()), check_vma=False)
      return fn(params, opt_state, batch)

    return jax.jit(step, static_argnames="plan", donate_argnums=(0, 1),
                   out_shardings=repl)

  def host_stats(opt_state):
    return {k: np.asarray(v).tolist()
            for k, v in sam_optax.stats(opt_state).items()}

  def run_steps(step, params, opt_state, start, stop, log, on_step=None,
                planner=None):
    for i in range(start, stop):
      # Planned steps: the host's plan of step i, from the step count and
      # replicated state, so every process computes the same one.
      plan = None if planner is None else planner(i, opt_state)
      params, opt_state = step(params, opt_state, batch_at(i), plan=plan)
      log.append(host_stats(opt_state) | (
          {} if plan is None else {"plan": repr(plan)}))
      if on_step is not None:
        on_step(i + 1, params, opt_state)
    return params, opt_state

  finals, logs = {}, {}
  runs = [(pert, name) for pert in args.perturbations.split(",")
          for name in args.methods.split(",")]
  import time  # pylint: disable=g-import-not-at-top
  for pert, name in runs:
    t_run = time.perf_counter()
    label = f"{pert}/{name}"
    per_device = pert == "per-device"
    axis = parallel.AXIS if per_device else None
    ctor = getattr(sam_optax, name)
    sam_tx = ctor(loss_fn, axis_name=axis, **METHODS[name])
    tx = optax.chain(sam_tx, optax.sgd(0.1, momentum=0.9))
    planned = pert in args.planned.split(",")
    planner = sam_optax.planner(sam_tx) if planned else None
    params = parallel.host_to_global(init_params(), repl)
    opt_state = jax.jit(tx.init, out_shardings=repl)(params)
    step = make_step(tx, per_device)
    manager = checkpoints.checkpoint_manager(
        os.path.join(args.out, "ckpt", f"{pert}_{name}"))
    log = logs[label] = []

    checkpointed = pert in args.checkpoint_perturbations.split(",")

    def save(i, p, s, manager=manager, checkpointed=checkpointed):
      if i == CKPT and checkpointed:
        checkpoints.save(manager, i, {"params": p, "opt_state": s})

    if args.phase == "train":
      params, opt_state = run_steps(step, params, opt_state, 0, STEPS, log,
                                    save, planner)
    else:
      back = checkpoints.restore(
          manager, CKPT, {"params": params, "opt_state": opt_state})
      params, opt_state = run_steps(step, back["params"], back["opt_state"],
                                    CKPT, STEPS, log, planner=planner)
    manager.close()
    finals[label] = {"params": params, "opt_state": opt_state}
    print(f"{label}: {time.perf_counter() - t_run:.1f}s", flush=True)

  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(finals):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
  stem = os.path.join(args.out, f"{args.phase}_p{args.process_id}")
  np.savez(stem + ".npz", **flat)
  with open(stem + ".json", "w") as f:
    json.dump(logs, f)
  print(f"process {args.process_id}: done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
