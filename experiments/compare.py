"""Compare every method with the same base settings: ``python -m experiments.compare``.

With no arguments it runs the quick default (about 5 minutes on 2 free
cores, see ``--jobs`` below):
the core rows (:data:`CORE_METHODS`: SGD, SAM, ASAM, GNP, layer-wise SAM,
Sparse SAM with both masks, LookSAM, vSAM, LightSAM, each at its registry
default) with 3 seeds on the digits and MNIST-1D (their ``long`` regime),
into ``runs/compare/``:

* ``digits``: scikit-learn's digits with 30% symmetric label noise and the
  small CNN (``digits_cnn``);
* ``mnist1d``: MNIST-1D as published (no label noise) and its MLP
  (``mnist1d_mlp``);

both for 60 epochs, batch 64, SGD momentum 0.9, lr 0.05 cosine, weight decay
5e-4. Three seeds give wide intervals; it says so, and where the committed
evidence is. The first run of each row compiles its programs; a status
line ("compiling looksam ...", then its compile time) says so.

``--committed`` runs the committed tables' configuration (:data:`PROTOCOLS`):
Fashion-MNIST (``fashion_mnist``, the small residual CNN), the digits and
MNIST-1D, each in two regimes (:data:`REGIMES`: ``short``, clean labels
and few epochs, the model under-fitting; ``long``, the model fitting its
training set, with label noise memorising it), with SGD's learning-rate
grid (the best SGD row is the reference of every paired difference), each
method's default row and a grid of its main setting (:data:`TUNING_GRID`,
:data:`CHEAP_GRID`). Like every protocol it writes under ``runs/`` by
default (``runs/committed/<dataset>/<regime>``); the committed copies are
replaced only on purpose: ``--committed --dataset fashion_mnist --out
experiments/results/fashion_mnist --overwrite`` (:mod:`experiments.outputs`
refuses any output under ``experiments/results/`` that holds files
otherwise). ``--dataset`` runs one dataset, ``--regime`` one regime.
``--add-missing`` adds to a stored result only the rows it lacks (new
methods of the protocol, :data:`ADDED_ROWS`) without rerunning the others:
it refuses a file made with another configuration, other seeds, another
CPU or other XLA settings (naming each difference), reruns SGD on every
seed and refuses unless it reproduces the stored numbers bit for bit, then
recomputes the summary, paired intervals, tables and figures from all the
runs (:func:`add_missing`); the protocol's command still reproduces the
whole file. ``--rerun ROWS`` (with ``--add-missing``) also reruns the
named stored rows on every seed and replaces their runs, under the same
checks: how a row is brought up to date after a library change that moved
its numbers (``additions`` records which rows were replaced).
``--long`` runs the digits for 240 epochs with every registry method and
the older, wider rho grids (:data:`RHO_GRIDS`), enough for vSAM's sampling
schedule to reach its working rate. Each output directory gets

* ``results.json``: the settings, the command, the CPU model and its
  instruction-set flags, the XLA flags, every run (per-epoch history,
  wall-clock, CPU and compile time, gradient evaluations, the method's
  diagnostics) and the per-method summary with its paired differences;
* ``results.md``: the table (test accuracy mean ± standard error over
  seeds, training accuracy, the paired difference against the best SGD
  row and against the best SAM row with 95% t-intervals, CPU time relative
  to SGD, gradients per step) and the findings: which rows are above or
  below the best SGD row by their interval, each method's default row and
  its best row against it (default-vs-best-SGD, best-vs-best), and for each
  efficient method (:data:`EFFICIENT_METHODS`) whether it reaches the best
  SAM row minus 0.5 points at a lower cost;
* ``accuracy_vs_cost.png``, ``rho_grids.png`` (when there are rho grids),
  ``paired_vs_sgd.png`` (the forest plot; with several datasets or
  regimes the forest plot of all of them goes to the parent directory) and
  ``train_loss.png`` (the training loss per epoch of SGD's, SAM's and
  LookSAM's rows, when there is a LookSAM row).

Pairing: a seed fixes the label noise, the initialisation and the batches,
so a method's accuracy minus SGD's on the same seed removes what the seed
alone decides; the interval is Student's t over the seeds' differences.
The best SGD row is chosen by its mean over the same seeds, which favours
it slightly (a conservative reference).

``--full`` runs the papers' protocol instead (CIFAR-10, ResNet-18, 200
epochs, batch 128, lr 0.1, weight decay 5e-4, crop+flip, 3 seeds; needs the
data prepared for TFDS and an accelerator). Any base setting can be
overridden (``--dataset``, ``--model``, ``--epochs``, ``--train-size``,
...). Methods are ``--methods sgd,sam,looksam`` with optional overrides,
``--methods "sam:rho=0.1,looksam:k=10,sgd:lr=0.1"`` (a comma before a name
starts a new method; ``lr`` sets that row's base learning rate);
``--rho-grid 0.05,0.1,0.2`` runs every method at each rho instead of its
default.

Steps are planned (``sam_optax.planner``) unless ``--no-planned``; the
setting is in ``results.json``'s ``base_config``.

Runs are interleaved (for each seed, every method, in an order rotated per
seed: :func:`run_order`) so that a drift in the machine's load spreads over
all methods, and each method is compiled once for all its seeds. Wall-clock
(and CPU time) exclude compilation and evaluation; the test set is
evaluated once, after the last epoch.

``--jobs N`` (default ``auto``: the CPUs this process may use,
``os.sched_getaffinity``, at most one per unit; on an accelerator 1): the
pinned XLA flags make a process single-threaded, so the independent units
(a row of a dataset and regime with all its seeds: it compiles once) run in
N worker processes (:mod:`experiments.workers`: ``spawn``, each adopting
and reporting the parent's XLA settings, checked equal and recorded in
``results.json``'s ``jobs``). Each run is bit for bit what ``--jobs 1``
(everything in this process, interleaved as above) gives, and
``results.json`` lists the runs in :func:`run_order` whichever worker
finished first. A line per finished unit (``[3/20] digits/long sam: ...``)
replaces the progress bar. A unit that fails in its worker or a worker
that dies stops the command (exit 1) naming the unit; Ctrl-C stops the
workers (exit 130); a ``results.json`` not finished says ``complete:
false``. A method that raises on its runs is recorded as a failed row, as
with ``--jobs 1``. ``--add-missing`` and ``--committed`` run with jobs too
(the SGD rerun is a unit of its own, checked as soon as it finishes).
CPU times (``train_cpu_s``, ``compile_cpu_s``) are per process, so the
"CPU time / SGD" column means the same; wall-clock times of different
rows are not comparable with N > 1 (they share the cores differently).
Measured from a fresh clone (the quick default, 2 workers, this project's
2-core AMD EPYC, nothing else running until its last two minutes): 4.6
minutes wall, 402 s user + 10 s system CPU (6.9 CPU-minutes). The units'
compiling took 149 CPU s (vSAM's planned programs 22 on the digits and 11
on MNIST-1D, Sparse SAM's 16-19 and 7-10, the others 2-11), their training
220 CPU s (the digits 178, MNIST-1D 42); the rest is starting the
processes, loading the data, evaluating and the figures. On a loaded
machine both grow: an earlier run shared with two
benchmark processes (load average 6-7) took 12.5 CPU-minutes and 16.5
minutes wall.
"""

from __future__ import annotations

from experiments import xla_env  # first: XLA reads its flags when jax starts
xla_env.pin_if_command(__name__)

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from experiments import methods as methods_lib
from experiments import plots
from experiments import checkpoints
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import outputs
from experiments import trainer as trainer_lib
from experiments import workers

#: The rho grids of the digits protocols, beside each method's registry
#: default: SAM's ("the best SAM row" is the best of these and its default
#: 0.05, the paper's CIFAR value), and those of the methods whose papers
#: tuned rho: ASAM (default 0.5; the paper uses 0.5 on CIFAR-10 and 1.0 on
#: CIFAR-100), GNP (default 0.1), LookSAM (default 0.1), and Sparse SAM with
#: the Fisher mask at its authors' argparse default 0.05 beside the recipe's
#: 0.1.
RHO_GRIDS = {
    "sam": (0.02, 0.1, 0.2),
    "asam": (0.2, 1.0, 2.0),
    "gnp": (0.05, 0.2),
    "looksam": (0.05, 0.2),
    "ssam_fisher": (0.05,),
}
SAM_RHO_GRID = RHO_GRIDS["sam"]
DIGITS_GRID = [(name, {"rho": r}) for name, rhos in RHO_GRIDS.items()
               for r in rhos]

#: The core rows: SGD, SAM, each method of the library at its registry
#: default (Sparse SAM with both masks, LightSAM-I), LookSAM among them.
CORE_METHODS = ("sgd", "sam", "asam", "gnp", "layerwise_sam", "ssam_fisher",
                "ssam_dynamic", "looksam", "vsam", "lightsam")

#: The methods whose papers offer them as cheaper than SAM: for each, the
#: findings answer whether it reaches the best SAM row minus
#: :data:`REACH_MARGIN` at a lower cost.
EFFICIENT_METHODS = ("layerwise_sam", "ssam_fisher", "ssam_dynamic",
                     "looksam", "vsam")
REACH_MARGIN = 0.005  # 0.5 points of accuracy

#: The tuning grid of the committed tables, beside each method's default
#: row: SGD's learning rate (the best SGD row is the reference of every
#: paired difference), SAM's rho ("the best SAM row" is the best of these
#: and the default 0.05), LookSAM's alpha (the weight of its reused
#: component: 0 is SAM every k-th step and plain SGD between), LightSAM's
#: learning rate. A row's ``lr`` sets the base optimizer's peak learning
#: rate (:data:`BASE_ROW_KEYS`); every other key is a method argument.
TUNING_GRID = [
    ("sgd", {"lr": 0.02}), ("sgd", {"lr": 0.1}),
    ("sam", {"rho": 0.1}),
    ("looksam", {"alpha": 0.0}), ("looksam", {"alpha": 0.3}),
    ("lightsam", {"learning_rate": 0.3}),
]
#: More of the grid where runs are cheap (the digits and MNIST-1D): SAM at
#: rho 0.2, LookSAM's reuse period k and a smaller LightSAM learning rate.
CHEAP_GRID = [("sam", {"rho": 0.2}), ("looksam", {"k": 2}),
              ("lightsam", {"learning_rate": 0.1})]
#: The grid of the older committed tables (SAM's and LookSAM's rho), kept
#: for ``--methods`` users who want them.
COMMITTED_GRID = ([("sam", {"rho": r}) for r in RHO_GRIDS["sam"]]
                  + [("looksam", {"rho": r}) for r in RHO_GRIDS["looksam"]])

#: The rows added to the committed tables after their first runs, each at
#: its registry default: issue #28's methods (GSAM, WSAM coupled and
#: decoupled, Friendly SAM, late-phase SAM, SAM with m-sharpness over 2
#: sub-batches) and the methods the first runs left out (ASAM, GNP, Sparse
#: SAM with the Fisher mask). ``--add-missing`` runs them into a committed
#: file without rerunning its rows (:func:`add_missing`); the README's
#: command runs them with the rest.
ADDED_ROWS = [("gsam", {}), ("wsam", {}), ("wsam_decoupled", {}),
              ("fsam", {}), ("sam_late", {}), ("sam", {"num_splits": 2}),
              ("asam", {}), ("gnp", {}), ("ssam_fisher", {})]

#: Row keys that set the base configuration rather than a method argument.
BASE_ROW_KEYS = ("lr",)

#: The methods whose defaults the committed evidence decides, with SGD and
#: SAM: the committed default rows (ASAM, GNP and Sparse SAM are left out
#: of the committed runs to fit them in a working session of a 2-core
#: machine; their older evidence is the 60-epoch digits and MNIST-1D runs
#: of the quick protocol's settings).
DECIDED_METHODS = ("sgd", "sam", "layerwise_sam", "looksam", "vsam",
                   "lightsam")

_BASE = dict(batch_size=64, lr=0.05, weight_decay=5e-4, train_size=None)

#: The two regimes of each offline dataset (command-line flags override
#: them). ``short``: clean labels and few epochs, the model still
#: under-fitting (training accuracy below 100%); ``long``: many epochs, the
#: model fitting its training set (with label noise: memorising wrong
#: labels). The digits' ``long`` regime is the earlier protocol (30%
#: symmetric noise, 60 epochs), MNIST-1D's is the benchmark as published
#: (clean, 60 epochs: the MLP reaches 100% training accuracy and about 67%
#: test). Fashion-MNIST (the small residual CNN, ``fashion_resnet``):
#: ``short`` trains on a fixed 5,000-image subset for 3 epochs (SGD: about
#: 83% training accuracy), ``long`` on a 600-image subset with 25% wrong
#: labels for 40 epochs (SGD memorises them); both test on the whole
#: 10,000.
REGIMES = {
    "digits": {
        "short": dict(_BASE, model="digits_cnn", epochs=2, label_noise=0.0),
        "long": dict(_BASE, model="digits_cnn", epochs=60, label_noise=0.3),
    },
    "mnist1d": {
        "short": dict(_BASE, model="mnist1d_mlp", epochs=10,
                      label_noise=0.0),
        "long": dict(_BASE, model="mnist1d_mlp", epochs=60, label_noise=0.0),
    },
    "fashion_mnist": {
        "short": dict(_BASE, model="fashion_resnet", epochs=3,
                      label_noise=0.0, train_size=5000),
        "long": dict(_BASE, model="fashion_resnet", epochs=40,
                     label_noise=0.25, train_size=600),
    },
}
#: The base settings of the quick default (each dataset's ``long`` regime):
#: the digits with 30% symmetric label noise and the small CNN; MNIST-1D as
#: published (no label noise) with its published MLP.
OFFLINE_BASE = {d: REGIMES[d]["long"] for d in ("digits", "mnist1d")}

#: The protocols. ``datasets``: what runs without ``--dataset``;
#: ``methods``: the rows without ``--methods`` (None: every available
#: method), then ``extra_methods``; ``seeds``: per dataset; ``out``: per
#: dataset. ``quick`` is the default, ``committed`` made the committed
#: tables (``--committed``).
PROTOCOLS = {
    "quick": dict(
        datasets=("digits", "mnist1d"), regimes=("long",),
        methods=CORE_METHODS, extra_methods=[],
        seeds={"digits": 3, "mnist1d": 3, "fashion_mnist": 3},
        out="runs/compare/{dataset}", base=REGIMES,
    ),
    # Fashion-MNIST first (the standard benchmark, the costliest runs), then
    # the digits and MNIST-1D; each in both regimes, SGD tuned, each
    # method's default row and its grid.
    "committed": dict(
        datasets=("fashion_mnist", "digits", "mnist1d"),
        regimes=("short", "long"),
        methods=DECIDED_METHODS,
        extra_methods={"fashion_mnist": TUNING_GRID + ADDED_ROWS,
                       "digits": TUNING_GRID + CHEAP_GRID + ADDED_ROWS,
                       "mnist1d": TUNING_GRID + CHEAP_GRID + ADDED_ROWS},
        seeds={"digits": 5, "mnist1d": 5, "fashion_mnist": 3},
        out="runs/committed/{dataset}/{regime}", base=REGIMES,
    ),
    # Long enough for vSAM's schedule to reach its working rate: with 22
    # steps an epoch, 3 warm-up epochs and windows of 50 steps, 240 epochs
    # are about 100 windows (the authors' CIFAR logs need that many).
    "long": dict(
        datasets=("digits",), regimes=("long",), methods=None,
        extra_methods=DIGITS_GRID, seeds={"digits": 5},
        out="runs/long/{dataset}",
        base={"digits": {"long": dict(REGIMES["digits"]["long"],
                                      epochs=240)}},
    ),
    "full": dict(
        datasets=("cifar10",), regimes=("long",), methods=None,
        extra_methods=[], seeds=3, out="runs/full/{dataset}_{model}",
        base=dict(model="resnet18", epochs=200, batch_size=128, lr=0.1,
                  weight_decay=5e-4, label_noise=0.0, train_size=None),
    ),
}

#: Where each protocol's committed results are (``--out`` for
#: ``--overwrite`` to replace them).
COMMITTED_OUT = "experiments/results/{dataset}/{regime}"

#: What the quick default says about itself (printed, and in its tables).
QUICK_NOTE = (
    "This is the quick default: the core rows with 3 seeds, one regime, "
    "SGD untuned, so its paired intervals are wide (with 2 degrees of "
    "freedom the 95% t-interval is 4.3 standard errors either side). The "
    "committed evidence (Fashion-MNIST, the digits and MNIST-1D, each in a "
    "short and a long regime, SGD's learning rate tuned, each method's "
    "default and a grid of its main setting) is in "
    "experiments/results/<dataset>/<regime>/ (results.md, results.json, "
    "the figures), made by `python -m experiments.compare --committed`; "
    "docs/choosing.md reads it."
)


#: A TFDS dataset outside ``--full``: the papers' model, no label noise,
#: every available method.
_TFDS_BASE = dict(model="resnet18", epochs=60, batch_size=64, lr=0.05,
                  weight_decay=5e-4, label_noise=0.0, train_size=None)


class Plan(NamedTuple):
  """One dataset's run in one regime: its parsed flags, output directory,
  the methods ``[(name, overrides)]`` and their row labels."""

  args: argparse.Namespace
  out: str
  specs: list
  labels: list
  regime: str = "long"


def parse_methods(
    text: Optional[str], extra_names: tuple[str, ...] = ()
) -> list[tuple[str, dict]]:
  """``"sgd,sam:rho=0.1,k=2,looksam"`` -> ``[(sgd, {}), (sam, {rho: .1,
  k: 2}), (looksam, {})]``: an item with ``=`` belongs to the method before
  it. None: SGD and every available method at its defaults. Names outside
  the registry are refused, except ``extra_names`` (the bench's anchor)."""
  if not text:
    return [(m, {}) for m in methods_lib.available()]
  out: list[tuple[str, dict]] = []
  for item in (s.strip() for s in text.split(",") if s.strip()):
    if "=" in item and ":" not in item:
      if not out:
        raise ValueError(f"--methods: {item!r} comes before any method name")
      k, v = item.split("=", 1)
      out[-1][1][k.strip()] = config_lib.parse_value(v.strip())
      continue
    name, _, first = item.partition(":")
    name = name.strip()
    if name not in methods_lib.METHODS and name not in extra_names:
      raise ValueError(
          f"--methods: unknown method {name!r}; choose from "
          f"{sorted(methods_lib.METHODS) + list(extra_names)}"
      )
    if name not in methods_lib.available() and name not in extra_names:
      raise ValueError(
          f"--methods: {name!r} is not in this sam_optax yet; available: "
          f"{methods_lib.available()}"
      )
    args = {}
    if first:
      k, sep, v = first.partition("=")
      if not sep:
        raise ValueError(f"--methods: expected key=value after {name}:")
      args[k.strip()] = config_lib.parse_value(v.strip())
    out.append((name, args))
  return out


def expand_rho_grid(
    specs: list[tuple[str, dict]], grid: Optional[list[float]]
) -> list[tuple[str, dict]]:
  """Every method other than SGD (and other than a full optimizer, whose rho
  means something else) at each rho of ``grid``."""
  if not grid:
    return specs
  out = []
  for name, args in specs:
    spec = methods_lib.METHODS[name]
    if spec.constructor is None or spec.full_optimizer or "rho" in args:
      out.append((name, args))
      continue
    for rho in grid:
      out.append((name, dict(args, rho=rho)))
  return out


def method_settings(name: str, args: dict, trainer) -> dict:
  """The keyword arguments the method was really built with."""
  spec = methods_lib.METHODS[name]
  out = dict(spec.defaults)
  out.update(spec.run_args(trainer.steps_per_epoch, trainer.total_steps))
  out.update(args)
  return {k: (v if isinstance(v, (int, float, str, bool, tuple, list))
              else repr(v)) for k, v in out.items()}


def _std(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.std(x, ddof=1)) if x.size > 1 else 0.0


def _se(x) -> float:
  """The standard error of the mean over seeds."""
  x = np.asarray(x, np.float64)
  return _std(x) / float(np.sqrt(x.size)) if x.size > 1 else 0.0


def paired_interval(diffs, level: float = 0.95) -> dict:
  """The mean of paired differences and its two-sided t-interval.

  ``diffs``: one difference per seed (a method's accuracy minus the
  reference's on the same seed: same label noise, initialisation and
  batches). Returns ``{"n", "mean", "lo", "hi", "t"}``: ``mean ± t *
  sd / sqrt(n)`` with ``t`` the ``(1 + level) / 2`` quantile of Student's
  t with ``n - 1`` degrees of freedom and ``sd`` the sample standard
  deviation; ``lo``, ``hi`` and ``t`` are None below two seeds.
  """
  d = np.asarray(diffs, np.float64)
  n = int(d.size)
  if n == 0:
    return {"n": 0, "mean": None, "lo": None, "hi": None, "t": None}
  mean = float(d.mean())
  if n < 2:
    return {"n": 1, "mean": mean, "lo": None, "hi": None, "t": None}
  from scipy import stats as sp_stats  # pylint: disable=g-import-not-at-top

  t = float(sp_stats.t.ppf((1.0 + level) / 2.0, n - 1))
  half = t * float(d.std(ddof=1)) / float(np.sqrt(n))
  return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "t": t}


def _paired(row: dict, ref: dict) -> dict:
  """``row``'s per-seed accuracy minus ``ref``'s, on their common seeds."""
  a = dict(zip(row["seeds"], row["accs"]))
  b = dict(zip(ref["seeds"], ref["accs"]))
  common = sorted(set(a) & set(b))
  return dict(paired_interval([a[s] - b[s] for s in common]), seeds=common)


def best_of(rows: list[dict], method: str,
            keys: Optional[tuple[str, ...]] = None) -> Optional[dict]:
  """``method``'s row (default or grid) of highest mean accuracy; with
  ``keys``, among the rows that set no other argument."""
  mine = [r for r in rows if r["method"] == method
          and r.get("acc_mean") is not None
          and (keys is None or set(r.get("method_args", {})) <= set(keys))]
  return max(mine, key=lambda r: r["acc_mean"]) if mine else None


def best_sam(rows: list[dict]) -> Optional[dict]:
  """The SAM row of highest mean accuracy among its default and its rho
  grid (SAM with m-sharpness, ``num_splits``, is a row of its own, not a
  candidate: the reference stays the one method)."""
  return best_of(rows, "sam", keys=("rho",))


def best_sgd(rows: list[dict]) -> Optional[dict]:
  """The SGD row (of the learning-rate grid) of highest mean accuracy: the
  reference of every paired difference."""
  return best_of(rows, "sgd")


def add_paired(rows: list[dict]) -> list[dict]:
  """Adds to each row its paired difference against the best SGD row
  (``vs_sgd``, :func:`best_sgd`: SGD at its best learning rate; its
  ``ref`` names that row) and against the best SAM row (``vs_best_sam``),
  and to each efficient
  method's default row (:data:`EFFICIENT_METHODS`) the answer to "does it
  reach the best SAM row minus :data:`REACH_MARGIN` at a lower cost?"
  (``reach``: accuracy by the paired mean, and by the interval's lower end;
  cost by CPU time relative to SGD, wall-clock where CPU time is missing,
  and by gradient evaluations)."""
  ok = [r for r in rows if r.get("acc_mean") is not None]
  sgd = best_sgd(ok)
  best = best_sam(ok)
  for r in ok:
    if sgd is not None and r is not sgd:
      r["vs_sgd"] = dict(_paired(r, sgd), ref=sgd["label"])
    if best is not None and r is not best:
      r["vs_best_sam"] = _paired(r, best)
    if (best is not None and r["method"] in EFFICIENT_METHODS
        and r["label"] == r["method"]):
      # The process's CPU time: on a shared machine wall-clock ratios move
      # with the others' load, CPU time much less.
      cost = ("cpu_rel" if r.get("cpu_rel") is not None
              and best.get("cpu_rel") is not None else "time_rel")
      d = r["vs_best_sam"]
      r["reach"] = {
          "best_sam": best["label"],
          "margin": REACH_MARGIN,
          "accuracy": d["mean"] >= -REACH_MARGIN,
          "accuracy_in_interval": (d["lo"] is not None
                                   and d["lo"] >= -REACH_MARGIN),
          "cost_measure": cost,
          "cheaper_time": (r.get(cost) is not None
                           and best.get(cost) is not None
                           and r[cost] < best[cost]),
          "cheaper_grads": r["grads_rel"] < best["grads_rel"],
      }
      r["reach"]["answer"] = bool(r["reach"]["accuracy"] and (
          r["reach"]["cheaper_time"]))
  return rows


def _sgd_reference(sgd_runs: list[dict]) -> dict:
  """The cost reference of one session: SGD's training seconds per seed,
  their mean, and its mean CPU time (None where a run lacks it)."""
  ok = [r for r in sgd_runs if "error" not in r]
  per_seed = {r["seed"]: r["train_s"] for r in ok}
  cpu = [r.get("train_cpu_s") for r in ok]
  return {"time": per_seed,
          "mean_time": np.mean(list(per_seed.values())) if per_seed else None,
          "mean_cpu": float(np.mean(cpu)) if cpu and None not in cpu
                      else None}


def _relative(ok: list[dict], key: str, refs: dict, ref_key: str):
  """The row's mean ``key`` over the mean of its session's SGD (each
  session's share weighted by its runs): with one session, exactly
  ``mean(key) / SGD's mean``."""
  by_session: dict[int, list] = {}
  for r in ok:
    by_session.setdefault(r.get("session", 0), []).append(r.get(key))
  total = 0.0
  for session, xs in by_session.items():
    ref = refs.get(session, {}).get(ref_key)
    if not ref or None in xs:
      return None
    total += (len(xs) / len(ok)) * float(np.mean(xs) / ref)
  return total


def summarise(runs: list[dict], order: list[str],
              sgd_reruns: Optional[dict] = None) -> list[dict]:
  """Per-method rows: accuracy mean/std, cost relative to SGD, paired
  differences (:func:`add_paired`).

  A run's cost is relative to SGD's in the same session: ``runs`` without
  a ``session`` key are session 0, timed against the SGD row's runs; the
  rows :func:`add_missing` added later carry their session's number and
  are timed against SGD rerun in that session (``sgd_reruns``: session ->
  its SGD runs), since the machine's load differs between sessions."""
  by_label: dict[str, list[dict]] = {lab: [] for lab in order}
  for r in runs:
    by_label[r["label"]].append(r)
  refs = {0: _sgd_reference(by_label.get("sgd", []))}
  for session, rs in (sgd_reruns or {}).items():
    refs[int(session)] = _sgd_reference(rs)
  rows = []
  for lab in order:
    rs = by_label[lab]
    ok = [r for r in rs if "error" not in r]
    row: dict[str, Any] = {
        "label": lab,
        "method": rs[0]["method"] if rs else lab.split(" ")[0],
        "method_args": rs[0]["method_args"] if rs else {},
        "seeds": [r["seed"] for r in ok],
        "settings": ok[0].get("settings", {}) if ok else {},
    }
    if not ok:
      row.update(acc_mean=None, error=rs[0].get("error") if rs else "no runs")
      rows.append(row)
      continue
    accs = [r["final_test_acc"] for r in ok]
    train_accs = [r.get("final_train_acc") for r in ok]
    times = [r["train_s"] for r in ok]
    second = [r["second_grads_per_step"] for r in ok]
    # Relative wall-clock per seed (same seed's SGD run, same session),
    # then averaged.
    per_seed = [
        r["train_s"] / refs[r.get("session", 0)]["time"][r["seed"]]
        for r in ok if r["seed"] in refs.get(r.get("session", 0), {}).get(
            "time", {})
    ]
    row.update(
        acc_mean=float(np.mean(accs)),
        acc_std=_std(accs),
        acc_se=_se(accs),
        accs=accs,
        train_acc_mean=(float(np.mean(train_accs))
                        if None not in train_accs else None),
        train_s_mean=float(np.mean(times)),
        compile_s=float(np.mean([r["compile_s"] for r in ok])),
        compile_cpu_s=(float(np.mean([r["compile_cpu_s"] for r in ok]))
                       if all("compile_cpu_s" in r for r in ok) else None),
        time_rel=_relative(ok, "train_s", refs, "mean_time"),
        time_rel_std=_std(per_seed) if per_seed else None,
        cpu_rel=_relative(ok, "train_cpu_s", refs, "mean_cpu"),
        second_rel=float(np.mean(second)),
        grads_rel=1.0 + float(np.mean(second)),
    )
    rates = [r.get("method_stats", {}).get("samples_per_window") for r in ok]
    if rates and None not in rates:  # vSAM: the rate its schedule reached
      row["samples_per_window"] = float(np.mean(rates))
    rows.append(row)
  return add_paired(rows)


def _fmt(x, spec, dash="–", suffix="", scale=1.0):
  return dash if x is None else format(scale * x, spec) + suffix


def _interval(d: Optional[dict]) -> str:
  """``+1.23 [+0.40, +2.06]`` in points (``–`` without a paired mean)."""
  if not d or d.get("mean") is None:
    return "–"

  def pts(x):  # "+0.00", never "-0.00" for a rounding-size negative
    return f"{0.0 if abs(100 * x) < 0.005 else 100 * x:+.2f}"

  if d["lo"] is None:
    return pts(d["mean"])
  return f"{pts(d['mean'])} [{pts(d['lo'])}, {pts(d['hi'])}]"


def table(rows: list[dict]) -> str:
  """The markdown table of :func:`summarise`'s rows: test and training
  accuracy, the paired differences against the best SGD and the best SAM
  row, CPU time and gradients per step relative to SGD, compile time (the
  wall-clock ratio, the std and the training seconds are in
  ``results.json``)."""
  lines = [
      "| method | test acc. % (± SE) | train acc. % "
      "| Δ vs best SGD (95% CI) | Δ vs best SAM (95% CI) "
      "| CPU time / SGD | grads / step | compile CPU s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if r.get("acc_mean") is None:
      lines.append(f"| {r['label']} | failed: {r.get('error', '')[:80]} "
                   "| | | | | | |")
      continue
    cost = r.get("cpu_rel") if r.get("cpu_rel") is not None else r.get(
        "time_rel")
    ref = "(reference)" if "vs_sgd" not in r and r["method"] == "sgd" else (
        _interval(r.get("vs_sgd")))
    lines.append(
        f"| {r['label']} | {100 * r['acc_mean']:.2f} ± "
        f"{100 * r.get('acc_se', 0.0):.2f}"
        f" | {_fmt(r.get('train_acc_mean'), '.1f', scale=100)}"
        f" | {ref} | {_interval(r.get('vs_best_sam'))}"
        f" | {_fmt(cost, '.2f', suffix='×')}"
        f" | {r['grads_rel']:.2f}"
        f" | {_fmt(r.get('compile_cpu_s', r['compile_s']), '.0f')} |"
    )
  return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
  """Plain statements read off the table (no judgement beyond the numbers).

  Against SGD, each row's paired difference and its 95% t-interval: above
  SGD when the interval lies above 0, below when below, otherwise not
  distinguishable from SGD with these seeds. For each efficient method
  (:data:`EFFICIENT_METHODS`), whether it reaches the best SAM row minus
  0.5 points at a lower cost (:func:`add_paired`).
  """
  ok = [r for r in rows if r.get("acc_mean") is not None]
  out = []
  pct = lambda x: f"{100 * x:.2f}"  # pylint: disable=unnecessary-lambda-assignment
  groups: dict[str, list[str]] = {"above": [], "below": [], "neither": []}
  for r in ok:
    d = r.get("vs_sgd")
    if not d or d["lo"] is None:
      continue
    desc = f"{r['label']} {_interval(d)}"
    key = ("above" if d["lo"] > 0 else "below" if d["hi"] < 0
           else "neither")
    groups[key].append(desc)
  n = max((r["vs_sgd"]["n"] for r in ok if r.get("vs_sgd")), default=0)
  sgd = best_sgd(ok)
  if sgd is not None:
    grid = [r for r in ok if r["method"] == "sgd"]
    if len(grid) > 1:
      out.append(
          f"The reference is the best SGD row, {sgd['label']} "
          f"({pct(sgd['acc_mean'])}% test accuracy) of "
          + ", ".join(f"{r['label']} ({pct(r['acc_mean'])}%)" for r in grid)
          + " (the best by its mean over the same seeds, which favours it "
          "slightly).")
  head = (f"Paired difference against the best SGD row in points, 95% "
          f"t-interval over {n} seeds")
  if groups["above"]:
    out.append(f"Above SGD ({head}): " + "; ".join(groups["above"]) + ".")
  if groups["below"]:
    out.append(f"Below SGD ({head}): " + "; ".join(groups["below"]) + ".")
  if groups["neither"]:
    out.append(f"Not distinguishable from SGD with these seeds (the "
               f"interval holds 0): " + "; ".join(groups["neither"]) + ".")
  best = best_sam(ok)
  if best is not None:
    cost = "cpu_rel" if best.get("cpu_rel") is not None else "time_rel"
    out.append(
        f"The best SAM row is {best['label']}: {pct(best['acc_mean'])} ± "
        f"{pct(best['acc_se'])}%, {_fmt(best[cost], '.2f')}× SGD's "
        f"{'CPU ' if cost == 'cpu_rel' else ''}time, {best['grads_rel']:.2f} "
        "gradients per step."
    )
  for r in ok:
    if "reach" not in r:
      continue
    c = r["reach"]
    d = r["vs_best_sam"]
    if c["answer"] and c["accuracy_in_interval"]:
      verdict = "yes, and the whole interval is above the bar"
    elif c["answer"]:
      verdict = "yes by its mean (the interval reaches below the bar)"
    elif c["accuracy"]:
      verdict = "no: accurate enough, not cheaper"
    else:
      verdict = "no"
    what = "CPU time" if c["cost_measure"] == "cpu_rel" else "time"
    if c["accuracy"]:
      verdict += (" (by gradient evaluations per step it is "
                  + ("cheaper" if c["cheaper_grads"] else "not cheaper")
                  + ")")
    out.append(
        f"{r['label']}: reaches the best SAM row minus "
        f"{100 * c['margin']:.1f} points at lower cost? {verdict}. Paired "
        f"difference to {c['best_sam']}: {_interval(d)} points; {what} "
        f"{_fmt(r.get(c['cost_measure']), '.2f')}× vs "
        f"{_fmt(best.get(c['cost_measure']), '.2f')}× SGD's; "
        f"{r['grads_rel']:.2f} vs {best['grads_rel']:.2f} gradients per step."
    )
  for v in method_verdicts(ok):
    text = f"{v['method']}: the default row {_interval(v['default'])}"
    if v["best_label"] != v["method"]:
      text += (f"; its best row, {v['best_label']}, "
               f"{_interval(v['best'])}")
    out.append(text + " against the best SGD row (best-vs-best and "
               "default-vs-best-SGD).")
  out += _best_of_grids(ok)
  for r in ok:
    if "samples_per_window" in r:
      out.append(
          f"{r['label']}: its schedule ended at "
          f"{r['samples_per_window']:.2f} samples per window and took a "
          f"second gradient on {100 * r['second_rel']:.1f}% of the steps "
          f"(warm-up included)."
      )
  return out


def method_verdicts(rows: list[dict]) -> list[dict]:
  """For each method but SGD with a default row (the row labelled with the
  method's name): that row's paired difference against the best SGD row
  (``default``) and its best row's (``best``, ``best_label``; the default
  itself when it is the best), each with ``verdict`` ``above`` / ``below``
  / ``level`` (the 95% interval above 0, below 0, or holding it)."""
  ok = [r for r in rows if r.get("acc_mean") is not None]
  out = []
  for name in dict.fromkeys(r["method"] for r in ok):
    default = next((r for r in ok if r["label"] == name), None)
    if name == "sgd" or default is None or "vs_sgd" not in default:
      continue
    best = best_of(ok, name)
    out.append({
        "method": name, "default": default["vs_sgd"],
        "default_verdict": _verdict(default["vs_sgd"]),
        "best_label": best["label"], "best": best.get("vs_sgd"),
        "best_verdict": _verdict(best.get("vs_sgd")),
    })
  return out


def _verdict(d: Optional[dict]) -> Optional[str]:
  if not d or d.get("lo") is None:
    return None
  return "above" if d["lo"] > 0 else "below" if d["hi"] < 0 else "level"


def _best_of_grids(rows) -> list[str]:
  """For each method run at several rhos and otherwise the same settings (a
  grid), the best of them."""
  grids: dict[tuple, list[dict]] = {}
  for r in rows:
    settings = r.get("settings", {})
    if "rho" in settings:
      others = tuple(sorted((k, repr(v)) for k, v in settings.items()
                            if k != "rho"))
      grids.setdefault((r["method"], others), []).append(r)
  out = []
  for (name, _), rs in grids.items():
    if len(rs) < 2:
      continue
    best = max(rs, key=lambda r: r["acc_mean"])
    tried = ", ".join(str(r["settings"]["rho"]) for r in
                      sorted(rs, key=lambda r: r["settings"]["rho"]))
    out.append(
        f"{name}: the best of rho {tried} is {best['settings']['rho']} "
        f"({100 * best['acc_mean']:.2f} ± {100 * best['acc_se']:.2f}%)."
    )
  return out


def _panel(meta: dict, with_regime: bool) -> str:
  return (f"{meta['dataset']}, {meta['regime']}" if with_regime
          else meta["dataset"])


def write_outputs(out: str, meta: dict, runs: list[dict], rows: list[dict],
                  done: bool = True) -> None:
  os.makedirs(out, exist_ok=True)
  checkpoints.write_json(
      os.path.join(out, "results.json"),
      dict(meta, complete=done, summary=rows, runs=runs),
  )
  if not done:
    return
  cfg = meta["base_config"]
  subset = (f" ({cfg['train_size']} training images)"
            if cfg.get("train_size") else "")
  settings = (
      f"{cfg['dataset']}{subset}, {meta.get('regime', 'long')} regime, "
      f"label noise {meta['label_noise']}, "
      f"{cfg['model']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
      f"SGD momentum {cfg['momentum']}, lr {cfg['lr']} cosine, weight decay "
      f"{cfg['weight_decay']}, {meta['seeds']} seeds"
  )
  md = [
      f"# Comparison on {cfg['dataset']}",
      "",
      f"Command: `{meta['command']}`",
      "",
      f"Settings: {settings}. Every method at its registry defaults "
      "(`experiments/methods.py`) unless the row says otherwise.",
      f"Machine: {meta['machine']}; total {meta['total_s'] / 60:.1f} min.",
      "",
  ]
  for a in meta.get("additions", []):
    md += [
        f"Rows added later by `{a['command']}` ({a['total_s'] / 60:.1f} "
        f"min, {a['finished_utc']}): {', '.join(a['rows'])}. Same "
        "configuration, seeds, CPU and XLA settings (checked); SGD rerun "
        "in that session gave every seed's stored accuracy exactly and is "
        "the reference of these rows' CPU time.",
        "",
    ]
  md += [
      table(rows),
      "",
      "Test accuracy after the last epoch, mean ± standard error over "
      "seeds. Train acc.: the accuracy on the training labels (the noisy "
      "ones where there is label noise) during the last epoch, mean over "
      "seeds: near 100% the model fits (memorises) its training set. "
      "Δ vs best SGD: the mean over seeds of the row's test accuracy minus "
      "the best SGD row's (SGD at its best learning rate of the grid) on "
      "the same seed (same label noise, initialisation and batches), in "
      "points, with its 95% Student-t interval; Δ vs best SAM: the same "
      "against the best SAM row. CPU time / SGD: the process's training "
      "CPU time (compilation and evaluation excluded) divided by the "
      "default SGD row's (wall-clock where CPU time is missing; both, and "
      "the std, are in results.json). Grads / step: gradient evaluations "
      "per training step (SGD 1, SAM 2; `sam_optax.stats(...)"
      "['grad_evals']`).",
      "",
  ]
  if meta.get("protocol") == "quick":
    md += [QUICK_NOTE, ""]
  md += [f"- {s}" for s in findings(rows)]
  md += ["", "Method settings (registry defaults, run-length arguments and "
         "overrides):", ""]
  for r in rows:
    kw = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())
    md.append(f"- {r['label']}: {kw or '(base optimizer only)'}")
  title = f"{settings}"
  plots.accuracy_vs_cost(
      rows, os.path.join(out, "accuracy_vs_cost.png"), title=title)
  md += ["", "![accuracy vs cost, the core rows](accuracy_vs_cost.png)"]
  if plots.rho_grids(rows, os.path.join(out, "rho_grids.png"), title=title):
    md += ["", "![the rho grids](rho_grids.png)"]
  plots.paired_forest({_panel(meta, "regime" in meta): rows},
                      os.path.join(out, "paired_vs_sgd.png"))
  md += ["", "![paired difference against SGD](paired_vs_sgd.png)", ""]
  if plots.train_loss_curves(rows, runs, os.path.join(out, "train_loss.png"),
                             title=title):
    md += ["![training loss per epoch: SGD, SAM, LookSAM](train_loss.png)",
           ""]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md))


def _per_dataset(value, dataset):
  return value.get(dataset, ()) if isinstance(value, dict) else value


def plans(argv: list[str]) -> list[Plan]:
  """Parses the command line: one :class:`Plan` per dataset and regime.
  Flags left out take the protocol's value; ``--dataset`` runs that
  dataset alone, ``--regime`` that regime alone. Refuses (a usage error)
  an output directory under ``experiments/results/`` that holds results
  unless ``--overwrite`` (:func:`experiments.outputs.check_output`)."""
  p = argparse.ArgumentParser(
      prog="python -m experiments.compare",
      description="Train SGD and every method with the same base settings.",
  )
  config_lib.add_base_arguments(p)
  # Protocol-dependent defaults are filled in below.
  for action in p._actions:  # pylint: disable=protected-access
    if action.dest in ("dataset", "model", "epochs", "batch_size", "lr",
                       "weight_decay"):
      action.default = None
  seeds = PROTOCOLS["committed"]["seeds"]
  p.add_argument("--committed", action="store_true",
                 help="the committed tables' configuration: Fashion-MNIST, "
                 "the digits and MNIST-1D (or --dataset), each in a short "
                 "and a long regime (or --regime), SGD's learning-rate grid, "
                 "each method's default and grid; "
                 f"{seeds['fashion_mnist']} seeds on Fashion-MNIST, "
                 f"{seeds['digits']} on the others; into "
                 "runs/committed/<dataset>/<regime> (the committed copies: "
                 "--out experiments/results/<dataset> --overwrite)")
  p.add_argument("--full", action="store_true",
                 help="the papers' protocol: CIFAR-10 (or --dataset), "
                 "ResNet-18 (or --model), 200 epochs, batch 128, lr 0.1")
  p.add_argument("--long", action="store_true",
                 help="the digits for 240 epochs: enough for vSAM's "
                 "sampling schedule to reach its working rate")
  p.add_argument("--regime", default=None, choices=("short", "long"),
                 help="an offline dataset's regime: short (clean labels, "
                 "few epochs, under-fitting) or long (many epochs, "
                 "fitting the training set); default: the protocol's "
                 "(quick: long; --committed: both)")
  p.add_argument("--methods", default=None,
                 help="comma-separated, e.g. sgd,sam:rho=0.1,looksam,"
                 "sgd:lr=0.1 (lr: the base learning rate of that row; "
                 "default: the protocol's rows)")
  p.add_argument("--rho-grid", default=None,
                 help="comma-separated rhos: every method at each")
  config_lib.add_number(p, "seeds", default=None)
  p.add_argument("--out", default=None,
                 help="output directory (several datasets or regimes: one "
                 "subdirectory each); default under runs/")
  outputs.add_arguments(p)
  p.add_argument("--add-missing", action="store_true",
                 help="add to the results.json in --out (or the protocol's "
                 "directory) only the rows it lacks, without rerunning "
                 "the others; refused when its configuration, seeds, CPU "
                 "or XLA settings differ from this command's")
  p.add_argument("--rerun", default=None, metavar="ROWS",
                 help="with --add-missing: also rerun these stored rows "
                 "(comma-separated labels, e.g. vsam), replacing their runs "
                 "on every seed (after a library change that moved their "
                 "numbers), with the same checks")
  p.add_argument("--jobs", type=workers.parse_jobs, default="auto",
                 help="worker processes for the independent units (a row "
                 "with all its seeds): auto (the default) = the CPUs this "
                 "process may use, at most one per unit; 1 = every run in "
                 "this process, interleaved. The runs are the same either "
                 "way; wall-clock times of different rows are comparable "
                 "only with 1 (CPU times are per process either way)")
  p.add_argument("--verbose", action="store_true", help="per-epoch logs")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.rerun is not None and not args.add_missing:
    p.error("--rerun needs --add-missing (it replaces rows of a stored "
            "result)")
  args.rerun = ([] if args.rerun is None else
                [x.strip() for x in args.rerun.split(",") if x.strip()])
  if args.rerun and "sgd" in args.rerun:
    p.error("--rerun: sgd is rerun (and must reproduce) on every "
            "--add-missing; it cannot be replaced")

  chosen = [n for n in ("committed", "full", "long") if getattr(args, n)]
  if len(chosen) > 1:
    p.error(f"--{' and --'.join(chosen)} are protocols: choose one")
  proto = PROTOCOLS[chosen[0] if chosen else "quick"]
  if args.seeds is not None and args.seeds < 1:
    p.error("--seeds must be >= 1")
  offline = data_lib.OFFLINE_DATASETS
  if args.dataset is not None and not args.full and args.dataset not in (
      offline):
    if args.committed or args.long:
      p.error(f"--{chosen[0]} runs the offline datasets {list(offline)}, "
              f"not {args.dataset!r}")
    # A TFDS dataset: the embedded protocols' settings do not carry over.
    proto = dict(proto, methods=None, extra_methods=[], seeds=3,
                 regimes=("long",), out="runs/compare/{dataset}_{model}",
                 base=_TFDS_BASE)
  if args.regime is not None and (args.full or proto["base"] is _TFDS_BASE):
    p.error("--regime is for the offline datasets "
            f"{list(offline)}")
  datasets = (args.dataset,) if args.dataset else proto["datasets"]
  if args.long and datasets != ("digits",):
    p.error("--long runs the digits only")
  if args.long and args.regime not in (None, "long"):
    p.error("--long runs the digits' long regime only")
  regimes = (args.regime,) if args.regime else proto["regimes"]
  several = len(datasets) * len(regimes) > 1
  out: list[Plan] = []
  for dataset in datasets:
    for regime in regimes:
      a = argparse.Namespace(**vars(args))
      a.dataset = dataset
      a.regime = regime
      # Per dataset and regime, or (--full, TFDS) one base for any dataset.
      base = proto["base"]
      if dataset in base:
        base = base[dataset][regime]
      for key in ("model", "epochs", "batch_size", "lr", "weight_decay",
                  "label_noise", "train_size"):
        if getattr(a, key) is None:
          setattr(a, key, base[key])
      seeds = proto["seeds"]
      if a.seeds is None:
        a.seeds = seeds[dataset] if isinstance(seeds, dict) else seeds
      if args.out is None:
        path = proto["out"].format(dataset=dataset, model=a.model,
                                   regime=regime)
      elif not several:
        path = args.out
      else:
        parts = ([dataset] if len(datasets) > 1 else []) + (
            [regime] if len(regimes) > 1 else [])
        path = os.path.join(args.out, *parts)
      try:
        specs = parse_methods(args.methods)
      except ValueError as e:
        p.error(str(e))
      if args.methods is None and not args.rho_grid:
        names = _per_dataset(proto["methods"], dataset)
        if names is not None:
          specs = [(n, {}) for n in names if n in methods_lib.available()]
        specs += [(n, dict(m)) for n, m in
                  _per_dataset(proto["extra_methods"], dataset)
                  if n in methods_lib.available()]
      try:
        grid = ([config_lib.RUN_RANGES["rho"].arg(x.strip())
                 for x in args.rho_grid.split(",")] if args.rho_grid
                else None)
      except argparse.ArgumentTypeError as e:
        p.error(f"argument --rho-grid: each rho {e}")
      specs = expand_rho_grid(specs, grid)
      for name, margs in specs:
        for key in BASE_ROW_KEYS:
          if key in margs:
            try:
              config_lib.check_range(key, margs[key])
            except ValueError as e:
              p.error(f"--methods: {name}: {e}")
      if not any(n == "sgd" and not m for n, m in specs):
        specs.insert(0, ("sgd", {}))  # the reference every ratio is taken to
      labels = [methods_lib.label(n, m) for n, m in specs]
      if len(set(labels)) != len(labels):
        p.error(f"--methods lists a method twice: {labels}")
      out.append(Plan(a, path, specs, labels, regime))
  for pl in out:
    unknown = [lab for lab in args.rerun if lab not in pl.labels]
    if unknown:
      p.error(f"--rerun: {', '.join(unknown)} not among this command's rows "
              f"({', '.join(pl.labels)})")
  try:
    # --add-missing keeps every stored run (add_missing checks the file)
    outputs.check_output([pl.out for pl in out],
                         args.overwrite or args.add_missing)
  except outputs.OverwriteError as e:
    p.error(str(e))
  return out


cpu_model = xla_env.cpu_model


def row_config(base: config_lib.Config, name: str,
               margs: dict) -> config_lib.Config:
  """The configuration of one row: ``base`` with the method, its
  arguments, and the row's base settings (:data:`BASE_ROW_KEYS`, e.g. the
  learning rate of an SGD grid row)."""
  base_keys = {k: v for k, v in margs.items() if k in BASE_ROW_KEYS}
  method_args = {k: v for k, v in margs.items() if k not in BASE_ROW_KEYS}
  return config_lib.Config(**dict(
      base.to_dict(), method=name, method_args=method_args, seed=0,
      **base_keys))


def plan_meta(plan_: Plan, command: str, protocol: str) -> dict:
  """What ``results.json`` records about the plan before its runs: the
  command, the configuration, the rows, the seeds, the CPU and XLA."""
  args, _, specs, labels, regime = plan_
  base = config_lib.config_from_args(args)
  return {
      "command": command,
      "protocol": protocol,
      "dataset": args.dataset,
      "regime": regime,
      "base_config": base.to_dict(),
      "label_noise": base.noise,
      "methods": [{"label": lab, "method": n, "method_args": a}
                  for lab, (n, a) in zip(labels, specs)],
      "seeds": args.seeds,
      "cpu": cpu_model(),
      "xla": xla_env.describe(),  # the CPU's ISA and the effective XLA_FLAGS
      "machine": f"{cpu_model()}, {platform.machine()} {os.cpu_count()} "
                 f"CPUs, jax {jax.__version__} on {jax.default_backend()}",
      "registry_defaults": {
          n: dict(methods_lib.METHODS[n].defaults) for n, _ in specs
      },
  }


def _bar(args: argparse.Namespace, total: int):
  if args.no_progress:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, dynamic_ncols=True)


def run_order(seeds: int, rows: int) -> list[tuple[int, int]]:
  """The order of a plan's runs, ``(seed, row index)``: for each seed every
  row, in an order rotated per seed so that a drift in the machine's load
  does not always favour the same rows. ``results.json`` lists the runs in
  this order however they were computed (``--jobs``)."""
  out = []
  for seed in range(seeds):
    shift = (seed * rows) // seeds
    out += [(seed, i) for i in list(range(rows))[shift:] + list(
        range(rows))[:shift]]
  return out


def run_plan(plan_: Plan, command: str, protocol: str,
             trained: Optional[dict] = None,
             t_start: Optional[float] = None,
             jobs: Optional[dict] = None) -> dict:
  """Trains one dataset's rows for every seed and writes its outputs.

  ``trained`` (``--jobs``): the runs, already computed by worker processes
  (row label -> its runs in seed order), to assemble instead of training;
  ``t_start``: when they started (``perf_counter``); ``jobs``: how they
  ran, for ``results.json`` (:func:`_jobs_meta`)."""
  args, out, specs, labels, regime = plan_
  base = config_lib.config_from_args(args)
  meta = plan_meta(plan_, command, protocol)
  if trained is None:
    print(f"compare: {args.dataset} ({regime} regime), {len(specs)} rows x "
          f"{args.seeds} seeds -> {out}", flush=True)
  t_start = time.perf_counter() if t_start is None else t_start
  trainers: dict[str, trainer_lib.Trainer] = {}
  runs: list[dict] = []
  bar = _bar(args, len(specs) * args.seeds) if trained is None else None
  for seed, i in run_order(args.seeds, len(specs)):
    lab, (name, margs) = labels[i], specs[i]
    if trained is not None:
      runs.append(trained[lab][seed])
      continue
    runs.append(_train_row(trainers, base, lab, name, margs, seed, args, bar))
    write_outputs(out, meta, runs, summarise(runs, labels), done=False)
  if bar is not None:
    bar.close()
  meta["total_s"] = time.perf_counter() - t_start
  meta["jobs"] = jobs or _jobs_meta(1)
  return _finish(out, meta, runs, summarise(runs, labels), meta["total_s"])


def _finish(out: str, meta: dict, runs: list[dict], rows: list[dict],
            seconds: float) -> dict:
  """Writes the outputs, prints the table and the findings."""
  write_outputs(out, meta, runs, rows)
  print(table(rows))
  for line in findings(rows):
    print("-", line)
  print(f"wrote {out}/results.json, results.md and the figures "
        f"({seconds / 60:.1f} min)")
  return {"rows": rows, "runs": runs, "out": out, "meta": meta}


#: What a stored result and the command adding rows to it must share
#: (:func:`mismatches`): the protocol, dataset and regime, every base
#: setting, the seeds, the CPU model and the XLA settings (instruction set,
#: effective flags, pinning, jax and jaxlib versions, core count).
MATCHED_KEYS = ("protocol", "dataset", "regime", "base_config",
                "label_noise", "seeds", "cpu", "xla")
#: The numbers of a run the SGD rerun must reproduce exactly.
REPRODUCED_KEYS = ("final_test_acc", "final_train_acc", "final_test_loss")


def _jsonable(x):
  """``x`` as ``results.json`` stores it (tuples as lists, ...)."""
  return json.loads(json.dumps(x, default=checkpoints._json_default))  # pylint: disable=protected-access


def _differences(name: str, stored, now) -> list[str]:
  if stored == now:
    return []
  if isinstance(stored, dict) and isinstance(now, dict):
    keys = sorted(k for k in set(stored) | set(now)
                  if stored.get(k) != now.get(k))
    return [f"{name}.{k}: stored {stored.get(k)!r}, now {now.get(k)!r}"
            for k in keys]
  return [f"{name}: stored {stored!r}, now {now!r}"]


def mismatches(saved: dict, meta: dict) -> list[str]:
  """Why rows cannot be added to ``saved`` (a ``results.json``) by the
  command whose :func:`plan_meta` is ``meta``: each difference named, with
  both values (empty when they agree). They agree when the stored file is
  complete, every :data:`MATCHED_KEYS` value is equal, and every stored
  row is one of the command's rows with the same method and arguments,
  its method's registry defaults unchanged."""
  now = _jsonable(meta)
  out = [] if saved.get("complete") else [
      "complete: the stored file is an interrupted run"]
  for key in MATCHED_KEYS:
    out += _differences(key, saved.get(key), now[key])
  planned = {m["label"]: m for m in now["methods"]}
  for m in saved.get("methods", []):
    mine = planned.get(m["label"])
    if mine is None:
      out.append(f"row {m['label']!r}: stored, not among this command's "
                 "rows")
    elif (mine["method"], mine["method_args"]) != (m["method"],
                                                    m["method_args"]):
      out.append(f"row {m['label']!r}: stored {m['method']} "
                 f"{m['method_args']}, now {mine['method']} "
                 f"{mine['method_args']}")
  stored_defaults = saved.get("registry_defaults", {})
  for name in dict.fromkeys(m["method"] for m in saved.get("methods", [])):
    if name in now["registry_defaults"]:
      out += _differences(f"registry_defaults.{name}",
                          stored_defaults.get(name),
                          now["registry_defaults"][name])
  return out


def sgd_reruns(saved: dict) -> dict:
  """Session -> the SGD runs rerun in that session (the cost reference of
  the rows it added, :func:`summarise`)."""
  return {a["session"]: a["sgd_reruns"] for a in saved.get("additions", [])}


def resummarise(saved: dict) -> list[dict]:
  """A ``results.json``'s summary recomputed from its runs."""
  return summarise(saved["runs"], [m["label"] for m in saved["methods"]],
                   sgd_reruns(saved))


_ADD_PROG = "python -m experiments.compare: error: --add-missing"


def _addition(plan_: Plan, command: str, protocol: str):
  """What ``--add-missing`` adds to ``plan_``'s stored result, checked
  before anything trains: ``(saved, meta_now, todo)`` (``todo``: the rows
  ``[(label, (name, args))]`` it lacks, and those ``--rerun`` names).
  Raises ``SystemExit`` (writing nothing) when there is no file or it was
  made with another configuration (:func:`mismatches` names each
  difference)."""
  out = plan_.out
  path = os.path.join(out, "results.json")
  if not os.path.isfile(path):
    raise SystemExit(f"{_ADD_PROG}: {path} does not exist; run the command "
                     "without --add-missing to make it")
  with open(path) as f:
    saved = json.load(f)
  meta_now = plan_meta(plan_, command, protocol)
  diffs = mismatches(saved, meta_now)
  if diffs:
    raise SystemExit(
        f"{_ADD_PROG}: {path} was made with another configuration than this "
        "command's; refusing to add rows to it (run the whole command "
        "instead): " + "; ".join(diffs))
  have = {m["label"] for m in saved["methods"]}
  rerun = set(getattr(plan_.args, "rerun", None) or ())
  todo = [(lab, spec) for lab, spec in zip(plan_.labels, plan_.specs)
          if lab not in have or lab in rerun]
  return saved, meta_now, todo


def check_reproduced(path: str, saved: dict, seed: int, run: dict) -> None:
  """Refuses (``SystemExit``) unless SGD rerun on ``seed`` gave the stored
  run's :data:`REPRODUCED_KEYS` bit for bit."""
  old = next((r for r in saved["runs"]
              if r["label"] == "sgd" and r["seed"] == seed), {})
  differ = [f"{k} stored {old.get(k)!r}, now {run.get(k)!r}"
            for k in REPRODUCED_KEYS if old.get(k) != run.get(k)]
  if differ:
    raise SystemExit(
        f"{_ADD_PROG}: this machine does not reproduce {path}: SGD on seed "
        f"{seed}: " + "; ".join(differ) + ". Nothing was written.")


#: The key of the SGD rerun among ``--add-missing``'s units.
SGD_RERUN = "sgd (rerun)"


def add_missing(plan_: Plan, command: str, protocol: str,
                trained: Optional[dict] = None,
                t_start: Optional[float] = None,
                jobs: Optional[dict] = None) -> dict:
  """Adds to ``plan_.out``'s ``results.json`` the rows of the plan it
  lacks, without rerunning its rows (``--add-missing``).

  Refuses (``SystemExit``, writing nothing) a file made with another
  configuration (:func:`mismatches` names each difference), and a machine
  that does not reproduce it: before the new rows, the default SGD row is
  rerun on every seed and must give the stored accuracies and test loss
  bit for bit (:data:`REPRODUCED_KEYS`). Those SGD reruns are the cost
  reference of the added rows. Then the summary (paired intervals against
  the best SGD row included), the tables and the figures are recomputed
  from all the runs; ``results.json`` records the addition (``additions``:
  its command, rows, time, machine, XLA settings and SGD reruns) and keeps
  the command that made the file, which (its protocol now listing the
  added rows) reproduces the whole file.

  ``trained``, ``t_start``, ``jobs``: as for :func:`run_plan` (the SGD
  reruns under :data:`SGD_RERUN`)."""
  args, out, specs, labels, regime = plan_
  path = os.path.join(out, "results.json")
  saved, meta_now, todo = _addition(plan_, command, protocol)
  meta = {k: v for k, v in saved.items()
          if k not in ("summary", "runs", "complete")}
  if not todo:
    print(f"compare: {path} has every row of this command; nothing to add")
    return {"rows": saved["summary"], "runs": saved["runs"], "out": out,
            "meta": meta}
  session = len(saved.get("additions", [])) + 1
  replaced = [lab for lab, _ in todo
              if lab in {m["label"] for m in saved["methods"]}]
  if trained is None:
    print(f"compare: adding {len(todo)} rows x {args.seeds} seeds to {path} "
          f"(session {session}): {', '.join(lab for lab, _ in todo)}"
          + (f" (replacing the stored {', '.join(replaced)})" if replaced
             else ""), flush=True)
  base = config_lib.config_from_args(args)
  t_start = time.perf_counter() if t_start is None else t_start
  trainers: dict[str, trainer_lib.Trainer] = {}
  reruns, new = [], []
  bar = _bar(args, (len(todo) + 1) * args.seeds) if trained is None else None
  for seed in range(args.seeds):
    check = (trained[SGD_RERUN][seed] if trained is not None else
             _train_row(trainers, base, "sgd", "sgd", {}, seed, args, bar))
    check_reproduced(path, saved, seed, check)
    reruns.append(dict(check, session=session))
    for lab, (name, margs) in todo:
      run = (trained[lab][seed] if trained is not None else
             _train_row(trainers, base, lab, name, margs, seed, args, bar))
      new.append(dict(run, session=session))
  if bar is not None:
    bar.close()
  meta["methods"] = meta_now["methods"]
  meta["registry_defaults"] = dict(meta.get("registry_defaults", {}),
                                   **meta_now["registry_defaults"])
  meta["additions"] = list(meta.get("additions", [])) + [{
      "session": session, "command": command,
      "rows": [lab for lab, _ in todo], "replaced": replaced,
      "seeds": args.seeds,
      "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "total_s": time.perf_counter() - t_start,
      "machine": meta_now["machine"], "cpu": meta_now["cpu"],
      "xla": meta_now["xla"], "jobs": jobs or _jobs_meta(1),
      "sgd_reruns": reruns,
  }]
  runs = [r for r in saved["runs"] if r["label"] not in replaced] + new
  return _finish(out, meta, runs, summarise(runs, labels, sgd_reruns(meta)),
                 meta["additions"][-1]["total_s"])


def _train_row(trainers: dict, base: config_lib.Config, lab: str, name: str,
               margs: dict, seed: int, args: argparse.Namespace,
               bar, tag: str = "") -> dict:
  """One row's run on one seed (its trainer, made and compiled on the
  row's first run, is kept in ``trainers`` for the other seeds). A failure
  is recorded in the run (``error``) so one broken method loses nothing
  else. ``tag`` (``"digits/long: "`` in a worker) prefixes its lines."""
  if bar is not None:
    bar.set_description(f"seed {seed} {lab}")
  run = {"label": lab, "method": name, "method_args": margs, "seed": seed}
  try:
    first = lab not in trainers
    if first:
      trainers[lab] = trainer_lib.Trainer(row_config(base, name, margs))
      # The first run of a row compiles its programs (reused by the
      # other seeds): say so, it can take a while.
      _status(bar, f"{tag}compiling {lab} (and training seed {seed})")
    res = trainers[lab].run(
        seed,
        log=(lambda s, lab=lab, seed=seed: say(f"[{tag}{lab} s{seed}] {s}"))
        if args.verbose else None,
        progress=False,
        # The test set once, after the last epoch (the table's number);
        # the per-epoch training loss and accuracy are in the history.
        eval_every=trainers[lab].cfg.epochs,
    )
    if first:
      _status(bar, f"{tag}compiled {lab} in {trainers[lab].compile_s:.1f} s")
    res.pop("state")
    res.pop("config")
    run.update(res)
    run["settings"] = method_settings(name, margs, trainers[lab])
  except Exception as e:  # pylint: disable=broad-except
    run["error"] = f"{type(e).__name__}: {e}"
    say(f"\n{tag}{lab} seed {seed} failed:\n{traceback.format_exc()}",
        sys.stderr)
  if bar is not None:
    bar.update(1)
    if "final_test_acc" in run:
      bar.set_postfix(acc=f"{100 * run['final_test_acc']:.1f}")
  return run


def _status(bar, text: str) -> None:
  """A status line: above the progress bar, or printed."""
  if bar is not None:
    bar.set_description(text[:60])
    bar.write(text)
  else:
    say(text)


def say(text: str, file=None) -> None:
  """Prints ``text`` and its newline in one write, flushed: the lines of
  ``--jobs``'s worker processes, which share the terminal, stay whole."""
  file = sys.stdout if file is None else file
  file.write(text + "\n")
  file.flush()


def _tag(plan_: Plan) -> str:
  """``dataset/regime``: how ``--jobs``'s lines name a plan."""
  return f"{plan_.args.dataset}/{plan_.regime}"


def _run_unit(tag: str, base: config_lib.Config, lab: str, name: str,
              margs: dict, seeds: int, verbose: bool) -> list[dict]:
  """One work unit of ``--jobs``, in a worker process: a row's runs on
  every seed, in seed order, with one trainer (the row compiles once), as
  :func:`run_plan` trains them in one process."""
  trainers: dict[str, trainer_lib.Trainer] = {}
  args = argparse.Namespace(verbose=verbose)
  return [_train_row(trainers, base, lab, name, margs, seed, args, None,
                     tag=f"{tag}: ") for seed in range(seeds)]


def _jobs_meta(jobs: int, workers_xla: Optional[list] = None) -> dict:
  """How the runs were computed, for ``results.json``: ``jobs`` worker
  processes (1: all in the command's own process) and each worker's XLA
  flags (checked equal to the command's: :func:`experiments.workers.run`).
  """
  out: dict[str, Any] = {"jobs": jobs}
  if workers_xla:
    out["workers"] = [{k: d.get(k) for k in xla_env.COMPILE_KEYS}
                      for d in workers_xla]
  return out


def _units(todo: list[Plan], command: str, protocol: str,
           add: bool) -> list[tuple]:
  """The independent work units of the plans, ``(plan index, key, name,
  args)``: a row of a plan with all its seeds (``key``: its label); with
  ``add`` (``--add-missing``) the rows each stored file lacks, after the
  SGD rerun (:data:`SGD_RERUN`), none where nothing is missing. Checks
  every stored file first (:func:`_addition`, ``SystemExit``)."""
  units = []
  for i, pl in enumerate(todo):
    if add:
      rows = _addition(pl, command, protocol)[2]
      rows = [(SGD_RERUN, ("sgd", {}))] + rows if rows else []
    else:
      rows = list(zip(pl.labels, pl.specs))
    units += [(i, key, name, margs) for key, (name, margs) in rows]
  return units


def _unit_line(done: int, total: int, tag: str, key: str,
               runs: list[dict]) -> str:
  """``--jobs``'s line for a finished unit: its accuracies, compile and
  training time, or its failure."""
  failed = [r for r in runs if "error" in r]
  head = f"[{done:{len(str(total))}d}/{total}] {tag} {key}:"
  if failed:
    return (f"{head} FAILED on seed"
            f"{'s' if len(failed) > 1 else ''} "
            f"{', '.join(str(r['seed']) for r in failed)}: "
            f"{failed[0]['error']}")
  accs = " ".join(f"{100 * r['final_test_acc']:.2f}" for r in runs)
  first = runs[0]
  return (f"{head} test acc. {accs} %; compile {first['compile_s']:.1f} s "
          f"(CPU {first.get('compile_cpu_s', 0.0):.1f} s), training "
          f"{sum(r['train_s'] for r in runs):.1f} s (CPU "
          f"{sum(r.get('train_cpu_s', 0.0) for r in runs):.1f} s)")


def run_jobs(todo: list[Plan], units: list[tuple], jobs: int, command: str,
             protocol: str, add: bool) -> list[dict]:
  """``--jobs N`` (N > 1): the plans' work units (:func:`_units`) in ``jobs``
  worker processes (:func:`experiments.workers.run`); each plan's outputs
  are written as soon as its units are done, assembled by :func:`run_plan`
  (or :func:`add_missing`) in the order one process runs them
  (:func:`run_order`), so they hold the same runs as ``--jobs 1``.

  Until then a plan's ``results.json`` says ``complete: false`` (with the
  runs of its finished units); ``--add-missing`` writes nothing until its
  rows are done, and stops everything as soon as the SGD rerun differs
  from the stored runs (:func:`check_reproduced`). A unit that fails in its
  worker raises :class:`experiments.workers.UnitError`, Ctrl-C
  :class:`experiments.workers.Interrupted`."""
  step = add_missing if add else run_plan
  t_start = time.perf_counter()
  results: dict[int, dict] = {}
  left = [0] * len(todo)
  for i, *_ in units:
    left[i] += 1
  for i, pl in enumerate(todo):
    if not left[i]:  # --add-missing with nothing to add
      results[i] = step(pl, command, protocol)
      continue
    rows = sum(1 for u in units if u[0] == i)
    if add:
      print(f"compare: adding to {pl.out}/results.json: "
            f"{', '.join(u[1] for u in units if u[0] == i)} x "
            f"{pl.args.seeds} seeds", flush=True)
    else:
      print(f"compare: {pl.args.dataset} ({pl.regime} regime), {rows} rows "
            f"x {pl.args.seeds} seeds -> {pl.out}", flush=True)
      # Whatever an earlier command left there is not this one's result.
      write_outputs(pl.out, plan_meta(pl, command, protocol), [],
                    summarise([], pl.labels), done=False)
  print(f"compare: {len(units)} units (a row with its seeds) in {jobs} "
        "worker processes; a line per finished unit", flush=True)
  trained: dict[int, dict] = {i: {} for i in range(len(todo))}
  metas = {}
  workers_xla: list = []
  bases = [config_lib.config_from_args(pl.args) for pl in todo]
  args = [(_tag(todo[i]), bases[i], "sgd" if key == SGD_RERUN else key,
           name, margs, todo[i].args.seeds, todo[i].args.verbose)
          for i, key, name, margs in units]
  label = lambda k: f"{_tag(todo[units[k][0]])} {units[k][1]}"  # pylint: disable=unnecessary-lambda-assignment
  done = 0
  runner = workers.run(_run_unit, args, jobs, label=label,
                       workers_xla=workers_xla)
  with contextlib.closing(runner):
    for k, runs in runner:
      i, key, _, _ = units[k]
      pl = todo[i]
      trained[i][key] = runs
      left[i] -= 1
      done += 1
      say(_unit_line(done, len(units), _tag(pl), key, runs))
      if add and key == SGD_RERUN:
        saved = _addition(pl, command, protocol)[0]
        for seed, run in enumerate(runs):
          check_reproduced(os.path.join(pl.out, "results.json"), saved,
                           seed, run)
      elif not add and left[i]:
        meta = metas.setdefault(i, plan_meta(pl, command, protocol))
        partial = [trained[i][pl.labels[r]][seed]
                   for seed, r in run_order(pl.args.seeds, len(pl.specs))
                   if pl.labels[r] in trained[i]]
        write_outputs(pl.out, meta, partial,
                      summarise(partial, pl.labels), done=False)
      if not left[i]:
        results[i] = step(pl, command, protocol, trained=trained[i],
                          t_start=t_start,
                          jobs=_jobs_meta(jobs, workers_xla))
  return [results[i] for i in range(len(todo))]


def _jobs_error(e: BaseException, todo: list[Plan]) -> str:
  """The message of a ``--jobs`` run stopped by a failing unit or Ctrl-C:
  what failed (or was running) and which outputs are incomplete."""
  incomplete = []
  for pl in todo:
    try:
      with open(os.path.join(pl.out, "results.json")) as f:
        if not json.load(f).get("complete"):
          incomplete.append(pl.out)
    except (OSError, ValueError):
      pass
  tail = (" Incomplete (results.json says complete: false): "
          + ", ".join(incomplete) + "." if incomplete else "")
  if isinstance(e, workers.Interrupted):
    return (f"python -m experiments.compare: interrupted after {e.finished} "
            f"of {e.total} units; the workers were stopped while running: "
            f"{', '.join(e.running) or 'none'}.{tail}")
  if isinstance(e, KeyboardInterrupt):  # between two units: none running
    return ("python -m experiments.compare: interrupted; the workers were "
            f"stopped.{tail}")
  return (f"python -m experiments.compare: error: the unit {e.label} failed "
          f"in its worker process, so the command stopped (the other "
          f"workers too): {e.detail}{tail}")


def main(argv: Optional[list[str]] = None) -> list[dict]:
  """Runs every dataset's plan; returns one result per dataset."""
  argv = sys.argv[1:] if argv is None else list(argv)
  todo = plans(argv)
  args = todo[0].args
  protocol = next((n for n in ("committed", "full", "long")
                   if getattr(args, n)), "quick")
  if protocol == "quick" and (args.methods or args.rho_grid):
    protocol = "custom"  # the rows are the caller's, not the quick ones
  command = "python -m experiments.compare" + (
      "" if not argv else " " + shlex.join(argv))
  t0 = time.perf_counter()
  parent = os.path.commonpath([pl.out for pl in todo])
  if len(todo) > 1:  # refused before any training, like the plans' outs
    try:
      outputs.check_output(os.path.join(parent, "paired_vs_sgd.png"),
                           args.overwrite or args.add_missing)
    except outputs.OverwriteError as e:
      raise SystemExit(f"python -m experiments.compare: error: {e}")
  units = _units(todo, command, protocol, args.add_missing)
  jobs = workers.resolve_jobs(args.jobs, len(units))
  if jobs > 1 and jax.default_backend() != "cpu":
    if args.jobs != "auto":
      raise SystemExit(
          "python -m experiments.compare: error: --jobs runs CPU worker "
          f"processes; this jax runs on {jax.default_backend()}: use "
          "--jobs 1")
    jobs = 1  # one process drives the accelerator
  if jobs > 1:
    try:
      results = run_jobs(todo, units, jobs, command, protocol,
                         args.add_missing)
    except (workers.UnitError, KeyboardInterrupt) as e:
      say(_jobs_error(e, todo), sys.stderr)
      raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else 1)
  else:
    step = add_missing if args.add_missing else run_plan
    results = [step(pl, command, protocol) for pl in todo]
  if len(results) > 1:
    plots.paired_forest(
        {_panel(r["meta"], len({x["meta"]["regime"] for x in results}) > 1):
         r["rows"] for r in results},
        os.path.join(parent, "paired_vs_sgd.png"),
    )
    print(f"wrote {parent}/paired_vs_sgd.png")
  print(f"compare: {(time.perf_counter() - t0) / 60:.1f} min in all")
  if protocol == "quick":
    print(QUICK_NOTE)
  return results


if __name__ == "__main__":
  main()
