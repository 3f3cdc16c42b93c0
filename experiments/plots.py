"""The comparison's figures: accuracy against cost, the rho grids, and the
paired differences against SGD.

* :func:`accuracy_vs_cost`: the core rows (each method at its defaults), test
  accuracy (mean ± standard error over seeds) against the training cost
  relative to SGD, in two panels: measured CPU time (wall-clock where it is
  missing), and gradient
  evaluations per step (the hardware-independent count: SGD 1, SAM 2). The
  shape of the figures in the SAM-efficiency papers (LookSAM, SSAM, vSAM,
  layer-wise SAM).
* :func:`rho_grids`: one panel per method run at several rhos.
* :func:`paired_forest`: each method's paired difference against SGD with
  its 95% interval, one row per method, one panel per dataset.
* :func:`train_loss_curves`: the training loss per epoch (mean over seeds)
  of SGD, SAM and LookSAM's rows: how fast each fits its training set.

The accuracy axes are set by the rows that trained: a row more than
:data:`OFF_SCALE` points below the median of the drawn rows (a diverged
one) is written at the bottom of its panel, not drawn, so it cannot stretch
the axis over the band where the methods differ.
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np

#: Points below the median of a panel's rows beyond which a row is off scale.
OFF_SCALE = 15.0


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _ok(rows):
  return [r for r in rows if r.get("acc_mean") is not None]


def _on_scale(values: Sequence[float]) -> np.ndarray:
  """Which of ``values`` (points) are within :data:`OFF_SCALE` of their
  median."""
  v = np.asarray(values, np.float64)
  return v >= np.median(v) - OFF_SCALE


def _ylim(ax, lows, highs, pad=0.08):
  lo, hi = float(np.min(lows)), float(np.max(highs))
  span = max(hi - lo, 1.0)
  ax.set_ylim(lo - pad * span, hi + pad * span)


def _spread_labels(ax, xs, ys, labels, colors, min_gap_frac=0.045):
  """Writes each label beside its point; labels of nearby points that would
  overlap are pushed apart (up and down, kept inside the axes), a thin line
  joining a moved label to its point."""
  y0, y1 = ax.get_ylim()
  x0, x1 = ax.get_xlim()
  gap = min_gap_frac * (y1 - y0)
  near = 0.18 * (x1 - x0)
  ys = np.asarray(ys, np.float64)
  xs = np.asarray(xs, np.float64)
  pos = ys.copy()
  for _ in range(200):
    moved = False
    for i in range(len(pos)):
      for j in range(i + 1, len(pos)):
        d = pos[j] - pos[i]
        if abs(xs[i] - xs[j]) < near and abs(d) < gap:
          push = (gap - abs(d)) / 2 + 1e-9
          sign = 1.0 if (d > 0 or (d == 0 and ys[j] >= ys[i])) else -1.0
          pos[j] += sign * push
          pos[i] -= sign * push
          moved = True
    pos = np.clip(pos, y0 + gap / 2, y1 - gap / 2)
    if not moved:
      break
  for i in range(len(pos)):
    ax.annotate(
        labels[i], (xs[i], ys[i]), xytext=(xs[i] + 0.012 * (x1 - x0), pos[i]),
        textcoords="data", fontsize=8, color=colors[i], va="center",
        arrowprops=(dict(arrowstyle="-", lw=0.5, color=colors[i])
                    if abs(pos[i] - ys[i]) > 1e-9 else None),
    )


def accuracy_vs_cost(rows: Sequence[dict], path: str, title: str = ""):
  """Writes the core rows' accuracy against cost to ``path`` (PNG); returns
  the accuracy axis' limits (None when no row is drawn).

  Args:
    rows: :func:`experiments.compare.summarise`'s rows (``label``,
      ``method``, ``acc_mean``, ``acc_se``, ``time_rel``, ``grads_rel``;
      accuracies in [0, 1]). Only the rows at a method's defaults (label ==
      method) are drawn; failed rows (``acc_mean`` None) are skipped.
    path: output file.
    title: figure title.
  """
  plt = _plt()
  rows = [r for r in _ok(rows) if r["label"] == r["method"]]
  if not rows:
    return None
  acc = np.array([100 * r["acc_mean"] for r in rows])
  se = np.array([100 * r.get("acc_se", 0.0) for r in rows])
  keep = _on_scale(acc)
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
  cmap = plt.get_cmap("tab10")
  colors = [cmap(i % 10) for i in range(len(rows))]
  # The process's CPU time where every row has it: on a shared machine the
  # wall-clock ratios move with the others' load.
  cpu = all(r.get("cpu_rel") is not None for r in rows)
  panels = [("cpu_rel", "training CPU time relative to SGD") if cpu else
            ("time_rel", "wall-clock training time relative to SGD"),
            ("grads_rel", "gradient evaluations per step relative to SGD")]
  for ax, (xkey, xlabel) in zip(axes, panels):
    xs = np.array([r[xkey] if r[xkey] is not None else np.nan for r in rows])
    for name, style in (("sgd", ":"), ("sam", "--")):
      ref = next((r for r in rows if r["label"] == name), None)
      if ref is not None:
        ax.axhline(100 * ref["acc_mean"], color="grey", ls=style, lw=1,
                   zorder=0)
    for i, r in enumerate(rows):
      if keep[i] and np.isfinite(xs[i]):
        ax.errorbar(xs[i], acc[i], yerr=se[i], fmt="o", ms=6, capsize=3,
                    color=colors[i])
    _ylim(ax, (acc - se)[keep], (acc + se)[keep])
    fin = np.isfinite(xs)
    lo, hi = float(np.nanmin(xs[fin])), float(np.nanmax(xs[fin]))
    ax.set_xlim(lo - 0.08 * max(hi - lo, 0.5), hi + 0.45 * max(hi - lo, 0.5))
    idx = [i for i in range(len(rows)) if keep[i] and fin[i]]
    _spread_labels(ax, xs[idx], acc[idx], [rows[i]["label"] for i in idx],
                   [colors[i] for i in idx])
    off = [f"{rows[i]['label']} {acc[i]:.1f}%" for i in range(len(rows))
           if not keep[i]]
    if off:
      ax.text(0.01, 0.01, "off scale (diverged): " + ", ".join(off),
              transform=ax.transAxes, fontsize=8, color="darkred")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (%), mean ± SE over seeds\n"
                     "dotted: SGD, dashed: SAM (rho 0.05)")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  ylim = axes[0].get_ylim()
  plt.close(fig)
  return ylim


def _grids(rows) -> dict[str, list[dict]]:
  """Method -> its rows that differ only in rho (two or more)."""
  by: dict[tuple, list[dict]] = {}
  for r in _ok(rows):
    settings = r.get("settings", {})
    if "rho" not in settings:
      continue
    others = tuple(sorted((k, repr(v)) for k, v in settings.items()
                          if k != "rho"))
    by.setdefault((r["method"], others), []).append(r)
  return {m: sorted(rs, key=lambda r: r["settings"]["rho"])
          for (m, _), rs in by.items() if len(rs) > 1}


def rho_grids(rows: Sequence[dict], path: str, title: str = "") -> bool:
  """One panel per method run at several rhos: accuracy (mean ± SE) against
  rho, the registry default circled, SGD as a dotted line. Returns False
  (and writes nothing) when no method has a grid."""
  grids = _grids(rows)
  if not grids:
    return False
  plt = _plt()
  sgd = next((r for r in _ok(rows) if r["label"] == "sgd"), None)
  fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4),
                           squeeze=False)
  for ax, (name, rs) in zip(axes[0], grids.items()):
    rho = np.array([r["settings"]["rho"] for r in rs], np.float64)
    acc = np.array([100 * r["acc_mean"] for r in rs])
    se = np.array([100 * r.get("acc_se", 0.0) for r in rs])
    keep = _on_scale(np.append(acc, 100 * sgd["acc_mean"]) if sgd else acc)
    keep = keep[: len(rs)]
    ax.errorbar(rho[keep], acc[keep], yerr=se[keep], fmt="o-", capsize=3)
    for r, x, y, k in zip(rs, rho, acc, keep):
      if k and r["label"] == r["method"]:
        ax.plot(x, y, "o", ms=13, mfc="none", mec="black")
    # The means set the axis: a row that diverged on some seeds has a bar
    # long enough to flatten the others (it runs off the panel instead).
    lows, highs = list(acc[keep]), list(acc[keep])
    if sgd is not None:
      ax.axhline(100 * sgd["acc_mean"], color="grey", ls=":", lw=1)
      lows.append(100 * sgd["acc_mean"])
      highs.append(100 * sgd["acc_mean"])
    _ylim(ax, lows, highs)
    off = [f"rho {x:g}: {y:.1f}%" for x, y, k in zip(rho, acc, keep) if not k]
    if off:
      ax.text(0.02, 0.02, "off scale (diverged): " + ", ".join(off),
              transform=ax.transAxes, fontsize=8, color="darkred")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(rho)
    ax.set_xticklabels([f"{x:g}" for x in rho])
    ax.set_title(f"{name} (circled: its default)", fontsize=10)
    ax.set_xlabel("rho")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("test accuracy (%), mean ± SE\ndotted: SGD")
  if title:
    fig.suptitle(textwrap.fill(title, 45 * len(grids)), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _forest_rows(rows) -> list[dict]:
  """One row per method (its defaults), each followed by that method's best
  row when that is a grid row (the best SAM row among them): the
  default-vs-best-SGD and the best-vs-best comparisons."""
  ok = [r for r in _ok(rows) if r.get("vs_sgd")
        and r["vs_sgd"].get("mean") is not None]
  out = []
  for r in ok:
    if r["label"] != r["method"]:
      continue
    out.append(r)
    mine = [x for x in _ok(rows) if x["method"] == r["method"]]
    best = max(mine, key=lambda x: x["acc_mean"])
    if best is not r and best in ok:
      out.append(best)
  return out


def paired_forest(rows_by_dataset: dict[str, Sequence[dict]], path: str,
                  title: Optional[str] = None) -> None:
  """Each method's paired difference against SGD (points) with its 95%
  interval, one row per method, one panel per dataset; rows whose
  interval lies above 0 in blue, below in red, else grey."""
  plt = _plt()
  panels = {k: _forest_rows(v) for k, v in rows_by_dataset.items()}
  panels = {k: v for k, v in panels.items() if v}
  if not panels:
    return
  height = 1.2 + 0.38 * max(len(v) for v in panels.values())
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), height),
                           squeeze=False)
  for ax, (name, rows) in zip(axes[0], panels.items()):
    mean = np.array([100 * r["vs_sgd"]["mean"] for r in rows])
    lo = np.array([100 * (r["vs_sgd"]["lo"] if r["vs_sgd"]["lo"] is not None
                          else r["vs_sgd"]["mean"]) for r in rows])
    hi = np.array([100 * (r["vs_sgd"]["hi"] if r["vs_sgd"]["hi"] is not None
                          else r["vs_sgd"]["mean"]) for r in rows])
    keep = _on_scale(mean)
    y = np.arange(len(rows))[::-1]
    for i in range(len(rows)):
      color = ("tab:blue" if lo[i] > 0 else "tab:red" if hi[i] < 0
               else "dimgrey")
      if keep[i]:
        ax.errorbar(mean[i], y[i], xerr=[[mean[i] - lo[i]], [hi[i] - mean[i]]],
                    fmt="o", color=color, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    if keep.any():
      left, right = float(lo[keep].min()), float(hi[keep].max())
      span = max(right - left, 1.0)
      ax.set_xlim(min(left, 0) - 0.08 * span, max(right, 0) + 0.08 * span)
    labels = []
    for r, k, m in zip(rows, keep, mean):
      lab = r["label"]
      labels.append(lab if k else f"{lab} ({m:+.1f}, off scale)")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    n = max(r["vs_sgd"]["n"] for r in rows)
    ax.set_title(f"{name}: {n} paired seeds", fontsize=10)
    ax.set_xlabel("accuracy minus the best SGD row's on the same seed "
                  "(points), 95% CI")
    ax.grid(alpha=0.3, axis="x")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


#: The methods whose training-loss curves :func:`train_loss_curves` draws.
CURVE_METHODS = ("sgd", "sam", "looksam")


def train_loss_curves(rows: Sequence[dict], runs: Sequence[dict], path: str,
                      title: str = "", methods=CURVE_METHODS) -> bool:
  """The training loss per epoch, mean over seeds (log scale), of every row
  of ``methods`` (SGD's and SAM's grids and LookSAM's alpha/k rows
  included). Returns False (nothing drawn) without a LookSAM row or without
  per-epoch histories."""
  chosen = [r for r in _ok(rows) if r["method"] in methods]
  if not any(r["method"] == "looksam" for r in chosen):
    return False
  curves = {}
  for r in chosen:
    hs = [run["history"] for run in runs
          if run["label"] == r["label"] and "history" in run]
    if not hs or min(len(h) for h in hs) < 2:
      continue
    n = min(len(h) for h in hs)
    curves[r["label"]] = np.mean(
        [[h[i]["train_loss"] for i in range(n)] for h in hs], axis=0)
  if not curves:
    return False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 5))
  styles = {"sgd": ":", "sam": "--", "looksam": "-"}
  for lab, y in curves.items():
    method = lab.split(" ")[0]
    ax.plot(np.arange(1, len(y) + 1), y, styles.get(method, "-"),
            label=lab, lw=1.6)
  ax.set_yscale("log")
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("epoch")
  ax.set_ylabel("training loss (mean over the epoch and the seeds)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  if title:
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
