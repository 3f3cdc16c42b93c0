"""Compare every method with the same base settings: ``python -m experiments.compare``.

With no arguments it runs the embedded default (well under 10 minutes on a
2-core CPU): the scikit-learn digits with 30% symmetric label noise, the
small CNN (``digits_cnn``), 60 epochs, batch 64, SGD momentum 0.9, lr 0.05
cosine, weight decay 5e-4, SGD and every method in the registry
(``experiments/methods.py``) at its published defaults, plus a rho grid
(:data:`RHO_GRIDS`) for SAM (0.02, 0.1 and 0.2 beside its default 0.05: "the
best SAM row" is the best of the four) and for the methods whose papers
tuned rho (ASAM, GNP, LookSAM, Sparse SAM-Fisher), 5 seeds. ``--long`` runs the same for 240 epochs,
about 100 of vSAM's 50-step windows after its warm-up, enough for its
sampling schedule to reach its working rate (the table's findings report the
rate it reached and its share of SAM steps). It writes

* ``OUT/results.json``: the settings, the command, every run (per-epoch
  history, wall-clock, compile time, gradient evaluations, the method's
  diagnostics) and the per-method summary;
* ``OUT/results.md``: the table (test accuracy mean ± standard error over
  seeds, the std,
  wall-clock time relative to SGD, second-gradient evaluations relative to
  SGD's gradient count);
* ``OUT/accuracy_vs_cost.png``: accuracy against relative cost.

``--full`` runs the papers' protocol instead (CIFAR-10, ResNet-18, 200
epochs, batch 128, lr 0.1, weight decay 5e-4, crop+flip, 3 seeds; needs the
data prepared for TFDS and an accelerator). Any base setting can be
overridden (``--dataset``, ``--model``, ``--epochs``, ...). Methods are
``--methods sgd,sam,looksam`` with optional overrides,
``--methods "sam:rho=0.1,looksam:k=10"`` (a comma before a name starts a new
method); ``--rho-grid 0.05,0.1,0.2`` runs every method at each rho instead of
its default.

Steps are planned (``sam_optax.planner``) unless ``--no-planned``; the
setting is in ``results.json``'s ``base_config``.

Runs are interleaved (for each seed, every method, in an order rotated per
seed) so that a drift in the machine's load spreads over all methods, and
each method is compiled once for all its seeds. Wall-clock (and CPU time)
exclude compilation and evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import traceback
from typing import Any, Optional

import jax
import numpy as np

from experiments import methods as methods_lib
from experiments import plots
from experiments import checkpoints
from experiments import config as config_lib
from experiments import trainer as trainer_lib

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

#: The base settings of each protocol (command-line flags override them).

PROTOCOLS = {
    "default": dict(
        dataset="digits", model="digits_cnn", epochs=60, batch_size=64,
        lr=0.05, weight_decay=5e-4, label_noise=0.3, seeds=5,
        out="experiments/results/digits",
        extra_methods=DIGITS_GRID,
    ),
    # Long enough for vSAM's schedule to reach its working rate: with 22
    # steps an epoch, 3 warm-up epochs and windows of 50 steps, 240 epochs
    # are about 100 windows (the authors' CIFAR logs need that many).
    "long": dict(
        dataset="digits", model="digits_cnn", epochs=240, batch_size=64,
        lr=0.05, weight_decay=5e-4, label_noise=0.3, seeds=5,
        out="experiments/results/digits_long",
        extra_methods=DIGITS_GRID,
    ),
    "full": dict(
        dataset="cifar10", model="resnet18", epochs=200, batch_size=128,
        lr=0.1, weight_decay=5e-4, label_noise=0.0, seeds=3,
        out="experiments/results/{dataset}_{model}",
        extra_methods=[],
    ),
}


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


def summarise(runs: list[dict], order: list[str]) -> list[dict]:
  """Per-method rows: accuracy mean/std, cost relative to SGD."""
  by_label: dict[str, list[dict]] = {lab: [] for lab in order}
  for r in runs:
    by_label[r["label"]].append(r)
  sgd_runs = [r for r in by_label.get("sgd", []) if "error" not in r]
  sgd_time = {r["seed"]: r["train_s"] for r in sgd_runs}
  sgd_mean_time = np.mean(list(sgd_time.values())) if sgd_time else None
  sgd_cpu = [r.get("train_cpu_s") for r in sgd_runs]
  sgd_mean_cpu = (float(np.mean(sgd_cpu))
                  if sgd_cpu and None not in sgd_cpu else None)
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
    times = [r["train_s"] for r in ok]
    cpu = [r.get("train_cpu_s") for r in ok]
    second = [r["second_grads_per_step"] for r in ok]
    # Relative wall-clock per seed (same seed's SGD run), then averaged.
    per_seed = [
        r["train_s"] / sgd_time[r["seed"]] for r in ok if r["seed"] in sgd_time
    ]
    row.update(
        acc_mean=float(np.mean(accs)),
        acc_std=_std(accs),
        acc_se=_se(accs),
        accs=accs,
        train_s_mean=float(np.mean(times)),
        compile_s=float(np.mean([r["compile_s"] for r in ok])),
        time_rel=(
            float(np.mean(times) / sgd_mean_time) if sgd_mean_time else None
        ),
        time_rel_std=_std(per_seed) if per_seed else None,
        cpu_rel=(
            float(np.mean(cpu) / sgd_mean_cpu)
            if sgd_mean_cpu and None not in cpu else None
        ),
        second_rel=float(np.mean(second)),
        grads_rel=1.0 + float(np.mean(second)),
    )
    rates = [r.get("method_stats", {}).get("samples_per_window") for r in ok]
    if rates and None not in rates:  # vSAM: the rate its schedule reached
      row["samples_per_window"] = float(np.mean(rates))
    rows.append(row)
  return rows


def _fmt(x, spec, dash="–", suffix=""):
  return dash if x is None else format(x, spec) + suffix


def table(rows: list[dict]) -> str:
  """The markdown table of :func:`summarise`'s rows."""
  lines = [
      "| method | test accuracy (%, mean ± SE) | std | wall-clock vs SGD "
      "| CPU time vs SGD | second-gradient evals / SGD gradients "
      "| train s / run | compile s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if r.get("acc_mean") is None:
      lines.append(f"| {r['label']} | failed: {r.get('error', '')[:80]} "
                   "| | | | | | |")
      continue
    lines.append(
        f"| {r['label']} | {100 * r['acc_mean']:.2f} ± "
        f"{100 * r.get('acc_se', 0.0):.2f} | {100 * r['acc_std']:.2f}"
        f" | {_fmt(r['time_rel'], '.2f', suffix='×')}"
        f" | {_fmt(r.get('cpu_rel'), '.2f', suffix='×')}"
        f" | {r['second_rel']:.2f}"
        f" | {r['train_s_mean']:.1f} | {r['compile_s']:.1f} |"
    )
  return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
  """Plain statements read off the table (no judgement beyond the numbers).

  Each SAM row is compared with SGD; every other method with the most
  accurate SAM row: above its mean, within one of its standard deviations
  below, or further below.
  """
  ok = {r["label"]: r for r in rows if r.get("acc_mean") is not None}
  out = []
  sgd = ok.get("sgd")
  sams = [r for r in ok.values() if r["method"] == "sam"]
  pct = lambda x: f"{100 * x:.2f}"  # pylint: disable=unnecessary-lambda-assignment
  if sgd:
    for sam in sams:
      d = sam["acc_mean"] - sgd["acc_mean"]
      noise = max(sam["acc_se"], sgd["acc_se"])
      if d > noise:
        verdict = "beats SGD"
      elif d > 0:
        verdict = "is ahead of SGD by less than one standard error"
      else:
        verdict = "does not beat SGD"
      out.append(
          f"{sam['label']} {verdict}: {pct(sam['acc_mean'])} ± "
          f"{pct(sam['acc_se'])}% vs {pct(sgd['acc_mean'])} ± "
          f"{pct(sgd['acc_se'])}% ({100 * d:+.2f} points)."
      )
  if sams:
    best = max(sams, key=lambda r: r["acc_mean"])
    groups: dict[str, list[str]] = {"above": [], "within": [], "below": []}
    for lab, r in ok.items():
      if r["method"] in ("sgd", "sam"):
        continue
      desc = (f"{lab} ({pct(r['acc_mean'])}%, "
              f"{_fmt(r['time_rel'], '.2f')}× SGD time, "
              f"{r['grads_rel']:.2f} gradients/step)")
      if r["acc_mean"] >= best["acc_mean"]:
        groups["above"].append(desc)
      elif r["acc_mean"] >= best["acc_mean"] - best["acc_se"]:
        groups["within"].append(desc)
      else:
        groups["below"].append(desc)
    ref = f"the best SAM row, {best['label']} ({pct(best['acc_mean'])}%)"
    if groups["above"]:
      out.append(f"At or above {ref}: " + "; ".join(groups["above"]) + ".")
    if groups["within"]:
      out.append(f"Within one standard error below {ref}: "
                 + "; ".join(groups["within"]) + ".")
    if groups["below"]:
      out.append(f"Further below {ref}: " + "; ".join(groups["below"]) + ".")
  out += _best_of_grids(ok.values())
  for lab, r in ok.items():
    if "samples_per_window" in r:
      out.append(
          f"{lab}: its schedule ended at {r['samples_per_window']:.2f} "
          f"samples per window and took a second gradient on "
          f"{100 * r['second_rel']:.1f}% of the steps (warm-up included)."
      )
  return out


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
  settings = (
      f"{cfg['dataset']}, label noise {meta['label_noise']}, "
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
      table(rows),
      "",
      "Test accuracy after the last epoch, mean ± standard error over seeds "
      "(the sample std in its own column). "
      "Wall-clock: training time (compilation and evaluation excluded) "
      "divided by SGD's, averaged over seeds; CPU time: the same with the "
      "process's CPU time, less sensitive to other load on a shared machine. "
      "Second-gradient evals / SGD "
      "gradients: the gradient evaluations a method makes inside its "
      "transform (`sam_optax.stats(...)['grad_evals']`) per training step, "
      "i.e. relative to SGD's one gradient per step (SAM: 1.00).",
      "",
  ]
  md += [f"- {s}" for s in findings(rows)]
  md += ["", "Method settings (registry defaults, run-length arguments and "
         "overrides):", ""]
  for r in rows:
    kw = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())
    md.append(f"- {r['label']}: {kw or '(base optimizer only)'}")
  md += ["", "![accuracy vs cost](accuracy_vs_cost.png)", ""]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md))
  plots.accuracy_vs_cost(
      rows, os.path.join(out, "accuracy_vs_cost.png"),
      title=f"{settings}",
  )


def plan(argv: list[str]):
  """Parses the command line: (args, output dir, [(method, overrides)],
  row labels). Flags left out take the protocol's value."""
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
  p.add_argument("--full", action="store_true",
                 help="the papers' protocol: CIFAR-10 (or --dataset), "
                 "ResNet-18 (or --model), 200 epochs, batch 128, lr 0.1")
  p.add_argument("--long", action="store_true",
                 help="the digits for 240 epochs: enough for vSAM's "
                 "sampling schedule to reach its working rate")
  p.add_argument("--methods", default=None,
                 help="comma-separated, e.g. sgd,sam:rho=0.1,looksam "
                 "(default: SGD and every available method)")
  p.add_argument("--rho-grid", default=None,
                 help="comma-separated rhos: every method at each")
  p.add_argument("--seeds", type=int, default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--verbose", action="store_true", help="per-epoch logs")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)

  if args.full and args.long:
    p.error("--full and --long are two protocols: choose one")
  proto = dict(
      PROTOCOLS["full" if args.full else "long" if args.long else "default"]
  )
  if not args.full and args.dataset not in (None, "digits"):
    # The embedded default's digits-specific settings do not carry over.
    proto.update(model="resnet18", label_noise=0.0, extra_methods=[],
                 out="experiments/results/{dataset}_{model}")
  for key in ("dataset", "model", "epochs", "batch_size", "lr",
              "weight_decay", "label_noise", "seeds"):
    if getattr(args, key) is None:
      setattr(args, key, proto[key])
  out = args.out or proto["out"].format(dataset=args.dataset, model=args.model)
  if args.seeds < 1:
    p.error("--seeds must be >= 1")

  try:
    specs = parse_methods(args.methods)
  except ValueError as e:
    p.error(str(e))
  if args.methods is None and not args.rho_grid:
    specs += [(n, dict(a)) for n, a in proto["extra_methods"]
              if n in methods_lib.available()]
  grid = ([float(x) for x in args.rho_grid.split(",")]
          if args.rho_grid else None)
  specs = expand_rho_grid(specs, grid)
  if not any(n == "sgd" and not a for n, a in specs):
    specs.insert(0, ("sgd", {}))  # the reference every ratio is taken to
  labels = [methods_lib.label(n, a) for n, a in specs]
  if len(set(labels)) != len(labels):
    p.error(f"--methods lists a method twice: {labels}")
  return args, out, specs, labels


def main(argv: Optional[list[str]] = None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, out, specs, labels = plan(argv)
  base = config_lib.config_from_args(args)
  meta = {
      "command": "python -m experiments.compare"
                 + ("" if not argv else " " + shlex.join(argv)),
      "base_config": base.to_dict(),
      "label_noise": base.noise,
      "methods": [{"label": lab, "method": n, "method_args": a}
                  for lab, (n, a) in zip(labels, specs)],
      "seeds": args.seeds,
      "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                 f"jax {jax.__version__} on {jax.default_backend()}",
      "registry_defaults": {
          n: dict(methods_lib.METHODS[n].defaults) for n, _ in specs
      },
  }
  print(f"compare: {len(specs)} methods x {args.seeds} seeds -> {out}",
        flush=True)
  t_start = time.perf_counter()
  trainers: dict[str, trainer_lib.Trainer] = {}
  runs: list[dict] = []
  bar = None
  if not args.no_progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm(total=len(specs) * args.seeds, dynamic_ncols=True)
  for seed in range(args.seeds):
    # Rotate the order per seed so a drift in machine load does not always
    # favour the same methods.
    shift = (seed * len(specs)) // args.seeds
    order = list(zip(labels, specs))
    order = order[shift:] + order[:shift]
    for lab, (name, margs) in order:
      if bar is not None:
        bar.set_description(f"seed {seed} {lab}")
      run = {"label": lab, "method": name, "method_args": margs, "seed": seed}
      try:
        if lab not in trainers:
          cfg = config_lib.Config(**dict(
              base.to_dict(), method=name, method_args=margs, seed=0
          ))
          trainers[lab] = trainer_lib.Trainer(cfg)
        res = trainers[lab].run(
            seed,
            log=(lambda s, lab=lab, seed=seed: print(f"[{lab} s{seed}] {s}"))
            if args.verbose else None,
            progress=False,
        )
        res.pop("state")
        res.pop("config")
        run.update(res)
        run["settings"] = method_settings(name, margs, trainers[lab])
      except Exception as e:  # pylint: disable=broad-except
        # One broken method must not lose the others' results.
        run["error"] = f"{type(e).__name__}: {e}"
        print(f"\n{lab} seed {seed} failed:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
      runs.append(run)
      if bar is not None:
        bar.update(1)
        if "final_test_acc" in run:
          bar.set_postfix(acc=f"{100 * run['final_test_acc']:.1f}")
      write_outputs(out, meta, runs, summarise(runs, labels), done=False)
  if bar is not None:
    bar.close()
  meta["total_s"] = time.perf_counter() - t_start
  rows = summarise(runs, labels)
  write_outputs(out, meta, runs, rows)
  print(table(rows))
  for s in findings(rows):
    print("-", s)
  print(f"wrote {out}/results.json, results.md, accuracy_vs_cost.png "
        f"({meta['total_s'] / 60:.1f} min)")
  return {"rows": rows, "runs": runs, "out": out}


if __name__ == "__main__":
  main()
