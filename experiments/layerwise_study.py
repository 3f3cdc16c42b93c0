"""The layer-wise SAM study: which rule delivers GNP's accuracy at SGD's cost.

    python -m experiments.layerwise_study            # into runs/layerwise
    python -m experiments.layerwise_study --seeds 2 --epochs 5 --out /tmp/lw
    python -m experiments.layerwise_study --out experiments/results/layerwise --overwrite

Every variant of :func:`sam_optax.layerwise_sam` in its own row, beside
SGD, SAM and GNP at the same radius (rho 0.1; GNP and layer-wise alpha 0.8),
on the digits with the small CNN (``experiments.compare``'s default
protocol), in two settings: the default 30% label noise and no label noise.
The variants cross

* the perturbation's norm: over the selection (``normalize="selection"``,
  ``‖e‖ = rho``) or over the whole gradient (``normalize="global"``: SAM's
  perturbation restricted to the selection, which is the same as scaling
  rho by the selection's share ``‖g_S‖ / ‖g‖`` of the gradient norm);
* where the second gradient is used: the selected layers only
  (``second="selected"``, partial backward) or every layer
  (``second="all"``, the penalty's full gradient, a full backward);
* the selection: the two layers of largest clean-gradient norm, ranked at
  run time (every step, or every 10 steps); the two of largest sharpness
  estimate ``‖h_l - g_l‖`` (``select_by="sharpness"``, from the last step
  that perturbed each layer); or the output side, named
  (``layers=("fc", "head")``) or found from the loss's graph (the
  default, the same two layers on this CNN).

Steps are planned (the compare default), so a runtime selection
differentiates only the selected layers, with a device read per
re-selection.

It writes ``OUT/<setting>/`` (``experiments.compare``'s files per setting)
and ``OUT/results.md`` / ``OUT/study.png``: accuracy (mean ± standard error
over seeds) and time relative to SGD per variant and setting. ``OUT`` is
``runs/layerwise`` by default; the committed study
(``experiments/results/layerwise``) is replaced only with ``--out`` there
and ``--overwrite`` (:mod:`experiments.outputs`).
"""

from __future__ import annotations

from experiments import xla_env  # first: XLA reads its flags when jax starts
xla_env.pin_if_command(__name__)

import argparse
import json
import os
from typing import Optional

import numpy as np

from experiments import compare
from experiments import config as config_lib
from experiments import methods as methods_lib
from experiments import outputs

RHO = 0.1

#: (row label, compare's method spec). Every layer-wise row is the registry
#: entry ``layerwise_sam`` (the output side found from the loss's graph,
#: global norm, second gradient on the selection) with one or two choices
#: changed; the runtime row names every choice.
SHARP2 = "layerwise_sam_sharpness"
VARIANTS = [
    ("sgd", "sgd"),
    ("sam", f"sam:rho={RHO}"),
    ("gnp", f"gnp:rho={RHO}"),
    ("output side, 2 layers (the default)", f"layerwise_sam:rho={RHO}"),
    ("output side, 1 layer (the head)",
     f"layerwise_sam:rho={RHO},num_layers=1"),
    ("output side, 3 layers", f"layerwise_sam:rho={RHO},num_layers=3"),
    ("output side, 2 layers, second gradient everywhere",
     f"layerwise_sam:rho={RHO},second=all"),
    ("output side, 1 layer, second gradient everywhere",
     f"layerwise_sam:rho={RHO},num_layers=1,second=all"),
    ("output side, 2 layers, alpha 0.5",
     f"layerwise_sam:rho={RHO},alpha=0.5"),
    ("output side, 2 layers, alpha 1 (SAM's gradient on the selection)",
     f"layerwise_sam:rho={RHO},alpha=1.0"),
    ("output side, 1 layer, alpha 1",
     f"layerwise_sam:rho={RHO},num_layers=1,alpha=1.0"),
    ("output side, 2 layers, norm over the selection",
     f"layerwise_sam:rho={RHO},normalize=selection"),
    ("top 2 by sharpness, global norm, second on the selection",
     f"{SHARP2}:rho={RHO},normalize=global,second=selected"),
]

#: name -> the setting: compare's flags, seeds, the rows it leaves out, and
#: whether rows the committed comparison of that dataset already ran with
#: the same settings (``python -m experiments.compare --committed``: SAM at
#: rho 0.1, GNP, the default) are read from it instead of run again. The
#: digits with 30% label noise and the small CNN (compare's digits
#: protocol; its two output-side layers hold 29% of the parameters), where
#: the earlier study measured the norm over the selection and the
#: sharpness ranking (README); MNIST-1D with its MLP (73%), as published
#: and with 30% label noise.
SETTINGS = {
    "digits": dict(flags=["--dataset", "digits"], seeds=5, reuse=True,
                   skip=(11, 12)),
    "mnist1d": dict(flags=["--dataset", "mnist1d"], seeds=10, reuse=False,
                    skip=()),
    "mnist1d_noise30": dict(
        flags=["--dataset", "mnist1d", "--label-noise", "0.3"], seeds=10,
        reuse=False, skip=()),
}
DEFAULT_SETTINGS = ("digits", "mnist1d", "mnist1d_noise30")
#: The committed comparison whose rows the study may read (the long regime:
#: the digits with 30% label noise, 60 epochs).
COMMITTED = "experiments/results/{dataset}/long"
#: The study's default output directory; the committed copy is
#: ``experiments/results/layerwise``.
DEFAULT_OUT = "runs/layerwise"


def _committed(setting: dict):
  """The committed comparison's plan for the setting's dataset, if its base
  settings are the setting's (else None)."""
  dataset = setting["flags"][setting["flags"].index("--dataset") + 1]
  (ref,) = compare.plans(["--committed", "--dataset", dataset, "--regime",
                          "long", "--out", COMMITTED.format(dataset=dataset),
                          "--overwrite"])
  (own,) = compare.plans(setting["flags"] + ["--out", "runs/layerwise"])
  same = (config_lib.config_from_args(ref.args).to_dict()
          == config_lib.config_from_args(own.args).to_dict())
  return ref if same else None


def _split(setting: dict, reuse: bool):
  """(VARIANTS indices to run here, {label: committed results dir} to
  read). SGD always runs here: the time ratios are taken to it."""
  ref = _committed(setting) if reuse and setting["reuse"] else None

  def effective(name, args):  # the arguments the method is built with
    return name, dict(methods_lib.METHODS[name].defaults, **args)

  theirs = ({repr(effective(n, a)): lab for (n, a), lab in
             zip(ref.specs, ref.labels)} if ref is not None else {})
  run, read = [], {}
  for i, (lab, (_, spec)) in enumerate(zip(_labels(), VARIANTS)):
    if i in setting["skip"]:
      continue
    key = repr(effective(*compare.parse_methods(spec)[0]))
    if key in theirs and lab != "sgd":
      read[lab] = (ref.out, theirs[key])
    else:
      run.append(i)
  return run, read


def _labels() -> list[str]:
  return [methods_lib.label(*compare.parse_methods(spec)[0])
          for _, spec in VARIANTS]


def _rows(summary: list[dict]) -> list[dict]:
  """The study's rows from one setting's summary rows: accuracy, its paired
  difference against SGD and against GNP (95% t-intervals), time."""
  by_label = {r["label"]: r for r in summary}
  gnp = by_label.get(_labels()[2])
  out = []
  for (name, _), lab in zip(VARIANTS, _labels()):
    row = by_label.get(lab, {})
    ok = row.get("acc_mean") is not None
    vs_gnp = (compare._paired(row, gnp)  # pylint: disable=protected-access
              if ok and gnp and gnp.get("acc_mean") is not None
              and row is not gnp else None)
    out.append({
        "variant": name,
        "label": lab,
        "acc_mean": row.get("acc_mean"),
        "acc_se": row.get("acc_se"),
        "vs_sgd": row.get("vs_sgd"),
        "vs_gnp": vs_gnp,
        "time_rel": row.get("time_rel"),
        "cpu_rel": row.get("cpu_rel"),
        "seeds": len(row.get("seeds", [])),
    })
  return out


def _summary(saved: dict, read: dict) -> list[dict]:
  """The setting's summary, with the rows in ``read`` taken from the
  committed comparison's runs of the same seeds."""
  if not read:
    return saved["summary"]
  runs = list(saved["runs"])
  for lab, (out, theirs) in read.items():
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      ref = json.load(f)
    runs += [dict(r, label=lab) for r in ref["runs"]
             if r["label"] == theirs and r["seed"] < saved["seeds"]]
  order = [lab for lab in _labels()
           if any(r["label"] == lab for r in runs)]
  return compare.summarise(runs, order)


def table(rows_by_setting: dict[str, list[dict]]) -> str:
  """One markdown table per setting's columns: accuracy, paired Δ against
  SGD and against GNP, time relative to SGD."""
  names = list(rows_by_setting)
  head = "| variant | " + " | ".join(
      f"{n}: acc % (± SE) | {n}: Δ vs SGD | {n}: Δ vs GNP | {n}: CPU / SGD"
      for n in names
  ) + " |"
  lines = [head, "|" + "---|" * (1 + 4 * len(names))]
  fmt = compare._interval  # pylint: disable=protected-access
  for i, (variant, _) in enumerate(VARIANTS):
    cells = []
    for n in names:
      r = rows_by_setting[n][i]
      acc = "–" if r["acc_mean"] is None else (
          f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_se']:.2f}"
      )
      t = "–" if r["cpu_rel"] is None else f"{r['cpu_rel']:.2f}x"
      cells += [acc, fmt(r["vs_sgd"]), fmt(r["vs_gnp"]), t]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def figure(rows_by_setting: dict[str, list[dict]], path: str) -> None:
  """Per setting, each variant's paired difference against SGD (points,
  95% interval) beside its time relative to SGD."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n = len(rows_by_setting)
  fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 6), squeeze=False,
                           sharey=True)
  for ax, (name, rows) in zip(axes[0], rows_by_setting.items()):
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
      d = r["vs_sgd"]
      if not d or d.get("lo") is None:
        continue
      m, lo, hi = 100 * d["mean"], 100 * d["lo"], 100 * d["hi"]
      color = "tab:blue" if lo > 0 else "tab:red" if hi < 0 else "dimgrey"
      ax.errorbar(m, y, xerr=[[m - lo], [hi - m]], fmt="o", color=color,
                  capsize=3)
      if r["cpu_rel"] is not None:
        ax.annotate(f"{r['cpu_rel']:.2f}x", (hi, y), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["variant"] for r in rows], fontsize=8)
    seeds = max(r["seeds"] for r in rows)
    ax.set_title(f"{name}: {seeds} paired seeds (x: CPU time / SGD)",
                 fontsize=10)
    ax.set_xlabel("accuracy minus SGD's (points), 95% CI")
    ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def render(out: str, names) -> dict[str, list[dict]]:
  """Writes ``OUT/results.md``, ``study.json`` and ``study.png`` from the
  settings' ``OUT/<setting>/results.json`` that are complete."""
  rows_by_setting, commands = {}, {}
  for name in names:
    path = os.path.join(out, name, "results.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      saved = json.load(f)
    if not saved.get("complete"):
      continue
    _, read = _split(SETTINGS[name], saved.get("reuse", False))
    rows_by_setting[name] = _rows(_summary(saved, read))
    commands[name] = saved["command"] + (
        f" (rows {sorted(read)} read from the committed comparison, "
        "same seeds)" if read else "")
    cpu = saved.get("cpu")
  if not rows_by_setting:
    return {}
  md = [
      "# Layer-wise SAM: the study",
      "",
      "Command: `python -m experiments.layerwise_study` (each setting: "
      + "; ".join(f"{n}: `{c}`" for n, c in commands.items()) + ").",
      "",
      f"Rho {RHO} for every sharpness-aware row (alpha 0.8 for GNP and "
      "layer-wise unless the row says otherwise), compare's protocol of "
      "each dataset (digits: 30% label noise, the small CNN, whose two "
      "output-side layers hold 29% of the parameters; MNIST-1D: the "
      "published MLP, whose two output-side layers hold 73%). Test "
      "accuracy after the last epoch, mean ± standard error; Δ: the paired "
      "difference (same seed) against SGD and against GNP in points, with "
      "its 95% t-interval; CPU / SGD: the process's CPU time in training "
      "relative to SGD's (compilation excluded), on a 2-core "
      f"{cpu} shared with other work, where wall-clock ratios moved with "
      "the others' load (they are in each setting's results.md).",
      "",
      table(rows_by_setting),
      "",
      "![paired differences against SGD](study.png)",
      "",
  ]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump({"rows": rows_by_setting, "commands": commands}, f, indent=1)
  figure(rows_by_setting, os.path.join(out, "study.png"))
  return rows_by_setting


def main(argv: Optional[list[str]] = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  config_lib.add_number(p, "seeds", default=None,
                        help="default: each setting's (digits 5, MNIST-1D 10)")
  config_lib.add_number(p, "epochs", default=None,
                        help="default: the compare protocol's (60)")
  p.add_argument("--out", default=DEFAULT_OUT,
                 help="output directory (default runs/layerwise; the "
                 "committed study is experiments/results/layerwise, "
                 "replaced only with --overwrite)")
  outputs.add_arguments(p)
  p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                 help=f"comma-separated, of {list(SETTINGS)}")
  p.add_argument("--no-reuse", action="store_true",
                 help="run every row, none read from the committed "
                 "comparison")
  args, rest = p.parse_known_args(argv)
  names = args.settings.split(",")
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    p.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
  # Before any training: the study writes OUT/<setting>/ and OUT's own
  # files; committed ones are replaced only with --overwrite.
  try:
    outputs.check_output(
        [os.path.join(args.out, n) for n in names]
        + [os.path.join(args.out, f) for f in ("results.md", "study.json",
                                               "study.png")],
        args.overwrite)
  except outputs.OverwriteError as e:
    p.error(str(e))
  if args.overwrite:
    rest = rest + ["--overwrite"]
  # Reading committed rows needs the committed settings: any other flag
  # (epochs, seeds beyond them, ...) runs every row.
  reuse = not (args.no_reuse or args.epochs is not None or rest
               and rest != ["--overwrite"])
  for name in names:
    setting = SETTINGS[name]
    run, _ = _split(setting, reuse)
    seeds = args.seeds or setting["seeds"]
    flags = setting["flags"] + [
        "--methods", ",".join(VARIANTS[i][1] for i in run),
        "--seeds", str(seeds),
        "--out", os.path.join(args.out, name), "--no-progress"]
    if args.epochs is not None:
      flags += ["--epochs", str(args.epochs)]
    compare.main(flags + rest)
    path = os.path.join(args.out, name, "results.json")
    with open(path) as f:
      saved = json.load(f)
    saved["reuse"] = reuse
    with open(path, "w") as f:
      json.dump(saved, f)
  rows_by_setting = render(args.out, list(SETTINGS))
  print(table(rows_by_setting))
  return rows_by_setting


if __name__ == "__main__":
  main()
