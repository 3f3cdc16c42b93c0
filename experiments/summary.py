"""The committed evidence across datasets and regimes, as tables.

    python -m experiments.summary                 # reads experiments/results

Reads each ``<results>/<dataset>/<regime>/results.json`` that
``python -m experiments.compare --committed`` wrote and prints, per regime,
one markdown table: a row per method row (SGD's grid, each method's default
and grid rows), a column per dataset, each cell the paired difference
against that dataset's best SGD row in points with its 95% interval and a
verdict mark (``↑`` above, ``↓`` below, nothing: the interval holds 0).
Then, for each method, :func:`default_checks`: whether its default row is
never below the best SGD row and reaches the best SAM row wherever SAM
helps, the rule ``docs/choosing.md`` applies to the defaults. Nothing is
trained; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from experiments import compare

DATASETS = ("fashion_mnist", "digits", "mnist1d")
REGIMES = ("short", "long")
NAMES = {"fashion_mnist": "Fashion-MNIST", "digits": "digits",
         "mnist1d": "MNIST-1D"}
#: How far below the best SAM row a default may be and still "reach" it
#: (the comparison's margin, 0.5 points).
REACH_MARGIN = compare.REACH_MARGIN


def load(results: str) -> dict[tuple[str, str], list[dict]]:
  """``(dataset, regime) -> summary rows`` for every committed results.json
  under ``results`` (complete runs only; missing cells are left out)."""
  out = {}
  for d in DATASETS:
    for r in REGIMES:
      path = os.path.join(results, d, r, "results.json")
      if not os.path.exists(path):
        continue
      with open(path) as f:
        saved = json.load(f)
      if saved.get("complete"):
        out[d, r] = saved["summary"]
  return out


def _mark(d: Optional[dict]) -> str:
  v = compare._verdict(d)  # pylint: disable=protected-access
  return {"above": " ↑", "below": " ↓"}.get(v, "")


def cell(row: Optional[dict], rows: list[dict]) -> str:
  """A row's paired difference against the best SGD row, with its mark;
  ``best SGD`` for the reference itself, ``–`` where the row did not run."""
  if row is None or row.get("acc_mean") is None:
    return "–"
  if row is compare.best_sgd(rows):
    return f"best SGD ({100 * row['acc_mean']:.1f}%)"
  d = row.get("vs_sgd")
  return compare._interval(d) + _mark(d)  # pylint: disable=protected-access


def regime_table(loaded: dict, regime: str) -> str:
  """The markdown table of one regime: method rows by dataset columns."""
  cols = [d for d in DATASETS if (d, regime) in loaded]
  labels: list[str] = []
  for d in cols:
    for row in loaded[d, regime]:
      if row["label"] not in labels:
        labels.append(row["label"])
  head = "| row | " + " | ".join(NAMES[d] for d in cols) + " |"
  lines = [head, "|---" * (len(cols) + 1) + "|"]
  for lab in labels:
    cells = []
    for d in cols:
      rows = loaded[d, regime]
      row = next((r for r in rows if r["label"] == lab), None)
      cells.append(cell(row, rows))
    lines.append(f"| {lab} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def sam_helps(rows: list[dict]) -> bool:
  """Whether the best SAM row is above the best SGD row (interval)."""
  best = compare.best_sam(rows)
  return bool(best is not None and compare._verdict(  # pylint: disable=protected-access
      best.get("vs_sgd")) == "above")


def default_checks(loaded: dict, label: str) -> dict:
  """For the row ``label`` (a method's default) in every cell: its verdict
  against the best SGD row, whether SAM helps there, and whether the row
  reaches the best SAM row (its paired mean at most :data:`REACH_MARGIN`
  below it, or it is the best SAM row). ``holds``: never below the best
  SGD row; ``reaches``: reaches the best SAM row wherever SAM helps."""
  cells = {}
  for (d, r), rows in loaded.items():
    row = next((x for x in rows if x["label"] == label), None)
    if row is None or row.get("acc_mean") is None:
      continue
    best = compare.best_sam(rows)
    vs_sam = row.get("vs_best_sam")
    reach = row is best or (vs_sam is not None and vs_sam["mean"]
                            >= -REACH_MARGIN)
    cells[d, r] = {
        "verdict": compare._verdict(row.get("vs_sgd")) or (  # pylint: disable=protected-access
            "reference" if row is compare.best_sgd(rows) else None),
        "sam_helps": sam_helps(rows),
        "reaches_sam": bool(reach),
    }
  return {
      "cells": cells,
      "holds": all(c["verdict"] != "below" for c in cells.values()),
      "reaches": all(c["reaches_sam"] for c in cells.values()
                     if c["sam_helps"]),
  }


def main(argv: Optional[list[str]] = None) -> str:
  p = argparse.ArgumentParser(prog="python -m experiments.summary",
                              description=__doc__.split("\n")[0])
  p.add_argument("--results", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args(argv)
  loaded = load(args.results)
  out = []
  for regime in REGIMES:
    if any(r == regime for _, r in loaded):
      out += [f"## {regime} regime", "", regime_table(loaded, regime), ""]
  labels = []
  for rows in loaded.values():
    for row in rows:
      if row["label"] not in labels:
        labels.append(row["label"])
  out += ["## rows against the rule for a default", ""]
  for lab in labels:
    c = default_checks(loaded, lab)
    out.append(f"- {lab}: never below the best SGD: {c['holds']}; reaches "
               f"the best SAM row where SAM helps: {c['reaches']}")
  text = "\n".join(out)
  print(text)
  return text


if __name__ == "__main__":
  main()
