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
  fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
  cmap = plt.get_cmap("tab10")
  colors = {r["label"]: cmap(i % 10) for i, r in enumerate(rows)}
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
        ax.annotate(name.upper(), (1.0, 100 * refs[name]["acc_mean"]),
                    xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize=8, color="grey")
    for r in rows:
      x = r[xkey]
      xerr = r.get(xerr_key) if xerr_key else None
      ax.errorbar(
          x, 100 * r["acc_mean"], yerr=100 * r["acc_std"],
          xerr=xerr if xerr else None, fmt="o", ms=7, capsize=4,
          color=colors[r["label"]], label=r["label"],
      )
      ax.annotate(r["label"], (x, 100 * r["acc_mean"]),
                  textcoords="offset points", xytext=(7, 5), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
  axes[1].legend(loc="lower right", fontsize=8, framealpha=0.9)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
