"""Planned against unplanned training on the digits, epochs interleaved.

    python -m experiments.digits_planned sam,looksam,vsam,layerwise_sam

For each method: the digits' default run (``Config()``: 60 epochs, batch 64,
seed 0) twice, unplanned (each epoch one jitted ``lax.scan``) and planned
(segments of same-plan steps, ``experiments/trainer.py``), their epochs
interleaved so that a drift of the machine's load hits both. Prints one JSON
line per method: median epoch time of each mode (the first, compiling,
epoch left out), their sums, final test accuracy of each, the largest
parameter difference, the planner's reads, the planned programs, compile
times. ``name:key=value`` overrides method arguments (``compare``'s
``--methods`` syntax). The lines also go to ``--out`` (default
``runs/digits_planned.jsonl``). The committed run, measured on the
project's shared 2-core CPU, is ``experiments/results/digits_planned.jsonl``
(replaced only with ``--out`` there and ``--overwrite``).
"""

from experiments import xla_env  # first: XLA reads its flags when jax starts
xla_env.pin_if_command(__name__)

import argparse
import json
import os
import sys

import jax
import numpy as np

import sam_optax
from experiments import compare
from experiments import methods as methods_lib
from experiments import outputs
from experiments.config import Config
from experiments.trainer import Trainer


def main(argv):
  p = argparse.ArgumentParser(
      prog="python -m experiments.digits_planned",
      description="Planned against unplanned training on the digits.")
  p.add_argument("methods", help="comma-separated, compare's --methods "
                 "syntax, e.g. sam,looksam:k=2,vsam")
  p.add_argument("--out", default="runs/digits_planned.jsonl",
                 help="where the JSON lines go (default "
                 "runs/digits_planned.jsonl)")
  outputs.add_arguments(p)
  args = p.parse_args(argv)
  try:
    outputs.check_output(args.out, args.overwrite)
  except outputs.OverwriteError as e:
    p.error(str(e))
  try:
    specs = compare.parse_methods(args.methods)
    for method, margs in specs:  # the method's own checks, before training
      Trainer(Config(method=method, method_args=margs, epochs=1))
  except (ValueError, TypeError) as e:
    p.error(str(e))
  out = []
  for method, margs in specs:
    item = methods_lib.label(method, margs)
    trs = {pl: Trainer(Config(method=method, method_args=margs, planned=pl)) for pl in (False, True)}
    E = trs[False].cfg.epochs
    ds = trs[False].dataset
    st, times = {}, {False: [], True: []}
    for pl, tr in trs.items():
      st[pl] = tr.init_state(0)
      tr.planner = sam_optax.planner(tr.sam_tx) if tr.planned else None
    arrays = trs[False].replicate((ds.train_images, ds.train_labels))
    for e in range(E):
      for pl in ((False, True) if e % 2 == 0 else (True, False)):
        st[pl], m = trs[pl].train_epoch(st[pl], e, 0, arrays, progress=False)
        times[pl].append(m["epoch_s"])
    acc = {pl: trs[pl].evaluate(st[pl], (ds.test_images, ds.test_labels))["test_acc"] for pl in (False, True)}
    d = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(st[False].params), jax.tree.leaves(st[True].params)))
    r = dict(method=item, scan_epoch_ms=1e3*float(np.median(times[False][1:])), planned_epoch_ms=1e3*float(np.median(times[True][1:])),
             scan_total_s=float(sum(times[False][1:])), planned_total_s=float(sum(times[True][1:])),
             acc_scan=acc[False], acc_planned=acc[True], max_param_diff=d,
             reads=trs[True].planner.reads, programs=len(trs[True]._programs), steps=E*trs[True].steps_per_epoch,
             compile_scan_s=trs[False].compile_s, compile_planned_s=trs[True].compile_s)
    r["ratio"] = r["planned_epoch_ms"] / r["scan_epoch_ms"]
    print(json.dumps(r), flush=True)
    out.append(r)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
