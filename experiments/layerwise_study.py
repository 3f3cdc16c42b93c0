"""The layer-wise SAM study: which rule delivers GNP's accuracy at SGD's cost.

    python -m experiments.layerwise_study            # 5 seeds, two settings
    python -m experiments.layerwise_study --seeds 2 --epochs 5 --out /tmp/lw

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
over seeds) and time relative to SGD per variant and setting.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import numpy as np

from experiments import compare
from experiments import methods as methods_lib

RHO = 0.1
OUTPUT_SIDE = "fc,head"

#: (row label, compare's method spec). The runtime rows name every choice
#: (the registry rows carry the library defaults: global norm, second on
#: the selection).
TOP2 = "layerwise_sam_runtime"
SHARP2 = "layerwise_sam_sharpness"
VARIANTS = [
    ("sgd", "sgd"),
    ("sam", f"sam:rho={RHO}"),
    ("gnp", f"gnp:rho={RHO}"),
    ("top2 by gradient, norm over selection, second on selection",
     f"{TOP2}:rho={RHO},normalize=selection,second=selected"),
    ("top2 by gradient, norm over selection, second everywhere",
     f"{TOP2}:rho={RHO},normalize=selection,second=all"),
    ("top2 by gradient, global norm, second on selection",
     f"{TOP2}:rho={RHO},normalize=global,second=selected"),
    ("top2 by gradient, global norm, second everywhere",
     f"{TOP2}:rho={RHO},normalize=global,second=all"),
    ("top2 by gradient every 10 steps, global norm, second everywhere",
     f"{TOP2}:rho={RHO},normalize=global,second=all,select_every=10"),
    ("top2 by sharpness, norm over selection, second on selection",
     f"{SHARP2}:rho={RHO},normalize=selection,second=selected"),
    ("top2 by sharpness, global norm, second on selection",
     f"{SHARP2}:rho={RHO},normalize=global,second=selected"),
    ("top2 by sharpness, global norm, second everywhere",
     f"{SHARP2}:rho={RHO},normalize=global,second=all"),
    ("output side, norm over selection, second on selection",
     f"layerwise_sam_fixed:rho={RHO},normalize=selection"),
    ("output side found from the graph, global norm, second on selection "
     "(the default)", f"layerwise_sam:rho={RHO}"),
    ("output side, global norm, second everywhere",
     f"layerwise_sam_fixed:rho={RHO},normalize=global,second=all"),
]

#: name -> extra compare flags.
SETTINGS = {
    "noise30": [],  # the protocol's default: 30% symmetric label noise
    "clean": ["--label-noise", "0"],
}


def _standard_error(accs: list[float]) -> float:
  a = np.asarray(accs, np.float64)
  return float(np.std(a, ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0


def _rows(result: dict, labels: list[str]) -> list[dict]:
  by_spec = {r["label"]: r for r in result["rows"]}
  out = []
  for (name, _), lab in zip(VARIANTS, labels):
    row = by_spec.get(lab, {})
    accs = [
        r["final_test_acc"] for r in result["runs"]
        if r["label"] == lab and "final_test_acc" in r
    ]
    out.append({
        "variant": name,
        "acc_mean": float(np.mean(accs)) if accs else None,
        "acc_se": _standard_error(accs),
        "time_rel": row.get("time_rel"),
        "seeds": len(accs),
    })
  return out


def table(rows_by_setting: dict[str, list[dict]]) -> str:
  names = list(rows_by_setting)
  head = "| variant | " + " | ".join(
      f"{n}: acc % (± SE) | {n}: time / SGD" for n in names
  ) + " |"
  lines = [head, "|" + "---|" * (1 + 2 * len(names))]
  for i, (variant, _) in enumerate(VARIANTS):
    cells = []
    for n in names:
      r = rows_by_setting[n][i]
      acc = "–" if r["acc_mean"] is None else (
          f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_se']:.2f}"
      )
      t = "–" if r["time_rel"] is None else f"{r['time_rel']:.2f}x"
      cells += [acc, t]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def figure(rows_by_setting: dict[str, list[dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(
      1, len(rows_by_setting), figsize=(7 * len(rows_by_setting), 6),
      squeeze=False,
  )
  for ax, (name, rows) in zip(axes[0], rows_by_setting.items()):
    for i, r in enumerate(rows):
      if r["acc_mean"] is None or r["time_rel"] is None:
        continue
      ax.errorbar(
          r["time_rel"], 100 * r["acc_mean"], yerr=100 * r["acc_se"],
          fmt="o", label=f"{i}: {r['variant']}",
      )
      ax.annotate(str(i), (r["time_rel"], 100 * r["acc_mean"]),
                  textcoords="offset points", xytext=(5, 3))
    ax.set_title(f"digits, {name}")
    ax.set_xlabel("wall-clock time / SGD")
    ax.set_ylabel("test accuracy (%), mean ± SE")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--epochs", type=int, default=None,
                 help="default: the compare protocol's (60)")
  p.add_argument("--out", default="experiments/results/layerwise")
  p.add_argument("--settings", default=",".join(SETTINGS))
  args, rest = p.parse_known_args(argv)
  methods = ",".join(spec for _, spec in VARIANTS)
  labels = [methods_lib.label(*compare.parse_methods(spec)[0])
            for _, spec in VARIANTS]
  rows_by_setting = {}
  for name in args.settings.split(","):
    flags = ["--methods", methods, "--seeds", str(args.seeds),
             "--out", os.path.join(args.out, name), "--no-progress"]
    if args.epochs is not None:
      flags += ["--epochs", str(args.epochs)]
    result = compare.main(flags + SETTINGS[name] + rest)
    rows_by_setting[name] = _rows(result, labels)
  md = [
      "# Layer-wise SAM: the study",
      "",
      "Command: `python -m experiments.layerwise_study"
      + (f" --seeds {args.seeds}" if args.seeds != 5 else "") + "`",
      "",
      f"Digits, small CNN, the compare protocol, rho {RHO} for every "
      "sharpness-aware row (alpha 0.8 for GNP and layer-wise); test accuracy "
      "after the last epoch, mean ± standard error over "
      f"{args.seeds} seeds; time is wall-clock relative to SGD in the same "
      "process (compilation excluded).",
      "",
      table(rows_by_setting),
      "",
      "\"Output side\" rows name the layers (`layers=(\"fc\", \"head\")`); "
      "the default finds the same two from the loss's computation graph. "
      "Steps are planned, so a runtime selection (top 2 by gradient or by "
      "sharpness) differentiates only the selected layers and reads the "
      "device once per re-selection (every step here, unless the row says "
      "every 10). Time is wall-clock on a shared 2-core CPU: the benchmark "
      "(`python -m experiments.bench`) is the cost reference.",
      "",
  ]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(md))
  with open(os.path.join(args.out, "study.json"), "w") as f:
    json.dump({"seeds": args.seeds, "rows": rows_by_setting}, f, indent=1)
  figure(rows_by_setting, os.path.join(args.out, "study.png"))
  print(table(rows_by_setting))
  return rows_by_setting


if __name__ == "__main__":
  main()
