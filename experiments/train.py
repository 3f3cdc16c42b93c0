"""Train one model with one method: ``python -m experiments.train``.

Example (the embedded default: the digits, 30% label noise, a small CNN)::

    python -m experiments.train --method sam --rho 0.1 --out /tmp/run

A paper setting on a machine that has CIFAR-10 prepared for TFDS::

    python -m experiments.train --dataset cifar10 --model resnet18 \\
        --method sam --rho 0.05 --epochs 200 --batch-size 128 --lr 0.1 \\
        --weight-decay 5e-4 --out runs/c10_r18_sam

It trains data-parallel over every device it sees (``--perturbation``
chooses per-device or global SAM perturbation), across hosts too: run the
same command on every host with ``--distributed`` (the cluster's environment
gives jax the coordinator) or with ``--coordinator-address``,
``--num-processes`` and ``--process-id``.

Steps are planned by default (``sam_optax.planner``: each compiled step
holds only that step's work, no ``lax.cond``, which is what GPUs need);
``--no-planned`` runs the ``lax.cond`` path, with in-memory epochs as one
``lax.scan``. Both give the same run to float rounding.

It logs per epoch the training loss and accuracy (on the labels it trains
on, noisy ones included), the test loss and accuracy, images/s and the
gradient evaluations so far (1 per step for the clean gradient plus the
method's own, read with ``sam_optax.stats``); it writes ``OUT/results.json``
after every epoch and orbax checkpoints under ``OUT/checkpoints``, each with
the run's record (settings, history, planner reads). ``--resume`` continues
from the latest one, bit-exact at epoch boundaries; it refuses, before any
training, an ``OUT`` with nothing to resume and a run trained under other
settings (every setting but ``--data-dir``, ``--workers``, ``--eval-every``,
``--checkpoint-every`` and, under global perturbation, the device count),
naming each setting with its stored and its new value. A new run refuses an
``OUT`` that holds one already. Bad values are usage errors (exit code 2)
naming the flag and its range; a damaged checkpoint exits with code 1,
naming the checkpoint and what to delete.

The pieces: ``config.py`` (the run's settings and flags), ``trainer.py``
(the loop), ``steps.py`` (the compiled train and eval steps, shared with the
benchmark), ``parallel.py`` (mesh, sharding, ``jax.distributed``),
``checkpoints.py`` (results.json and orbax).
"""

from __future__ import annotations

from experiments import xla_env  # first: XLA reads its flags when jax starts
xla_env.pin_if_command(__name__)

import argparse
import sys
from typing import Optional

import jax

from experiments import checkpoints
from experiments import methods as methods_lib
from experiments import outputs
from experiments import parallel
from experiments.config import add_base_arguments
from experiments.config import add_number
from experiments.config import config_from_args
from experiments.config import parse_method_args
from experiments.trainer import Trainer


def _host_port(text: str) -> str:
  """``HOST:PORT`` with a port in [1, 65535] (argparse ``type=``)."""
  host, _, port = text.rpartition(":")
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise argparse.ArgumentTypeError(
        f"must be HOST:PORT with a port in [1, 65535], got {text!r}"
    )
  return text


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.train",
      description="Train one model with one sharpness-aware method.",
  )
  add_base_arguments(p)
  p.add_argument("--method", default="sgd", choices=sorted(methods_lib.METHODS))
  add_number(p, "rho", default=None,
             help="the method's rho (default: its registry default)")
  p.add_argument("--method-arg", action="append", default=[],
                 metavar="KEY=VALUE",
                 help="any other method keyword, e.g. --method-arg k=5")
  add_number(p, "seed", default=0)
  p.add_argument("--out", default=None, help="results/checkpoint directory "
                 "(default: none, nothing written)")
  outputs.add_arguments(p)
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out (the "
                 "same settings; only --data-dir, --workers, --eval-every, "
                 "--checkpoint-every and, under --perturbation global, the "
                 "device count may change)")
  add_number(p, "checkpoint_every", default=1,
             help="epochs (the last epoch is always saved)")
  add_number(p, "eval_every", default=1,
             help="epochs (the last epoch is always evaluated)")
  p.add_argument("--no-progress", action="store_true")
  g = p.add_argument_group(
      "many hosts", "one process per host; jax.distributed.initialize() is "
      "called when one of these is given or JAX_COORDINATOR_ADDRESS is set")
  g.add_argument("--distributed", action="store_true",
                 help="initialise from the cluster's environment (Cloud TPU "
                 "pods, SLURM, Open MPI, GKE)")
  g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                 type=_host_port)
  add_number(g, "num_processes", default=None)
  add_number(g, "process_id", default=None)
  return p


def main(argv: Optional[list[str]] = None) -> dict:
  """Parses ``argv``, trains, prints the log; returns the results dict."""
  p = parser()
  args = p.parse_args(argv)
  if args.resume and args.out is None:
    p.error("--resume needs --out")
  if args.out is not None:
    try:  # committed results are replaced only on purpose
      outputs.check_output(args.out, args.overwrite)
    except outputs.OverwriteError as e:
      p.error(str(e))
  if (args.process_id is not None and args.num_processes is not None
      and args.process_id >= args.num_processes):
    p.error(f"--process-id {args.process_id} must be < --num-processes "
            f"{args.num_processes}")
  try:
    parallel.maybe_initialize(args.coordinator_address, args.num_processes,
                              args.process_id, force=args.distributed)
    method_args = parse_method_args(args.method_arg)
    if args.rho is not None:
      method_args["rho"] = args.rho
    cfg = config_from_args(
        args, method=args.method, method_args=method_args, seed=args.seed
    )
    trainer = Trainer(cfg)
  except (ValueError, TypeError) as e:
    # A setting the parser cannot check alone (--method-arg, --model-arg,
    # a method's own checks, the batch over the devices).
    p.error(str(e))
  lead = jax.process_index() == 0
  if lead:
    print(
        f"{cfg.dataset} ({trainer.dataset.num_train} train / "
        f"{trainer.dataset.num_test} test, label noise {cfg.noise}), "
        f"{cfg.model}, {cfg.method} {method_args or ''}, "
        f"{trainer.steps_per_epoch} steps/epoch; {trainer.mesh.size} "
        f"device(s) in {jax.process_count()} process(es), "
        f"{cfg.perturbation} perturbation",
        flush=True,
    )
  try:
    result = trainer.run(
        out=args.out,
        resume=args.resume,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        log=lambda s: print(s, flush=True),
    )
  except checkpoints.ResumeError as e:  # the command does not fit --out
    p.error(str(e))
  except checkpoints.CheckpointError as e:  # a damaged checkpoint
    p.exit(1, f"{p.prog}: error: {e}\n")
  if lead:
    print(
        f"final test accuracy {100 * result['final_test_acc']:.2f}%  "
        f"train {result['train_s']:.1f}s (+{result['compile_s']:.1f}s "
        f"compile)  {result['grads_per_step']:.2f} gradients/step"
    )
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
