"""The comparison's figure: accuracy against relative cost, one point per method.

The shape of the figures in the SAM-efficiency papers (LookSAM, SSAM, vSAM,
layer-wise SAM): test accuracy (mean over seeds, error bars one standard
deviation) against the training cost relative to SGD, here in two panels:
measured wall-clock time, and gradient evaluations per step (the
hardware-independent count: SGD 1, SAM 2).
"""

from __future__ import annotations

from typing import Sequence


def accuracy_vs_cost(rows: Sequence[dict], path: str, title: str = "") -> None:
  """Writes the figure to ``path`` (PNG).

  Args:
    rows: one dict per method with ``label``, ``acc_mean``, ``acc_std``,
      ``time_rel``, ``time_rel_std``, ``grads_rel`` (all accuracies in [0,
      1]); rows with ``acc_mean`` None (failed runs) are skipped.
    path: output file.
    title: figure title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = [r for r in rows if r.get("acc_mean") is not None]
  fig, axes = plt.subplots(1, 2, figsize=(14, 5.6), sharey=True)
  cmap = plt.get_cmap("tab20")
  markers = "osD^vP*Xh<>pd"
  colors = {r["label"]: cmap((2 * i) % 20 + (i // 10) % 2)
            for i, r in enumerate(rows)}
  shapes = {r["label"]: markers[i % len(markers)] for i, r in enumerate(rows)}
  panels = [
      ("time_rel", "time_rel_std", "wall-clock time relative to SGD"),
      ("grads_rel", None, "gradient evaluations per step relative to SGD"),
  ]
  refs = {r["method"]: r for r in rows if r["label"] == r["method"]}
  for ax, (xkey, xerr_key, xlabel) in zip(axes, panels):
    for name, style in (("sgd", ":"), ("sam", "--")):
      if name in refs:
        ax.axhline(100 * refs[name]["acc_mean"], color="grey", ls=style,
                   lw=1, zorder=0)
        ax.annotate(name.upper(), (0.005, 100 * refs[name]["acc_mean"]),
                    xycoords=("axes fraction", "data"), ha="left",
                    va="bottom", fontsize=8, color="grey")
    for r in rows:
      x = r[xkey]
      xerr = r.get(xerr_key) if xerr_key else None
      ax.errorbar(
          x, 100 * r["acc_mean"], yerr=100 * r["acc_std"],
          xerr=xerr if xerr else None, fmt=shapes[r["label"]], ms=7,
          capsize=3, elinewidth=1, alpha=0.9,
          color=colors[r["label"]], label=r["label"],
      )
      ax.annotate(r["label"], (x, 100 * r["acc_mean"]),
                  textcoords="offset points", xytext=(6, 4), fontsize=7,
                  color=colors[r["label"]])
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
  axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8,
                 framealpha=0.9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
