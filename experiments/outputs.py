"""Where the commands write, and the rule that keeps committed results safe.

Every command of ``experiments`` (``compare`` in all its protocols,
``layerwise_study``, ``train``, ``digits_planned``, ``bench``) writes under
``runs/`` by default. The committed results live in ``experiments/results/``
(tracked by git); a command writes there only when its ``--out`` points
there, and refuses to replace anything that is there unless ``--overwrite``
is given as well:

    python -m experiments.compare --committed --dataset digits \\
        --out experiments/results/digits --overwrite

One function, :func:`check_output`, applies the rule for every command
(called before any training, so a refused command has computed nothing);
:func:`add_arguments` adds the ``--overwrite`` flag the same way everywhere.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterable, Union

#: The committed results (this package's ``results`` directory).
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results")
#: Where the commands write by default (relative to the working directory).
RUNS_DIR = "runs"


class OverwriteError(ValueError):
  """A command would replace a committed result without ``--overwrite``."""


def is_committed_area(path: str) -> bool:
  """Whether ``path`` is ``experiments/results`` or inside it (links and
  ``..`` resolved)."""
  real = os.path.realpath(path)
  root = os.path.realpath(RESULTS_DIR)
  return real == root or real.startswith(root + os.sep)


def _existing_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  out = []
  for folder, _, files in os.walk(path):
    out += [os.path.join(folder, f) for f in files]
  return sorted(out)


def check_output(paths: Union[str, Iterable[str]], overwrite: bool,
                 flag: str = "--overwrite") -> None:
  """Raises :class:`OverwriteError` if any of ``paths`` (files or
  directories a command is about to write) lies in ``experiments/results``
  and already holds a file there, unless ``overwrite``.

  A path outside ``experiments/results`` (``runs/`` and anywhere else) is
  always allowed (a command's own rules, such as ``train``'s refusal to
  start over a run without ``--resume``, still apply), and so is a new
  directory inside it that holds nothing yet.
  """
  if isinstance(paths, str):
    paths = [paths]
  for path in paths:
    real = os.path.realpath(path)
    if overwrite or not is_committed_area(real) or not os.path.exists(real):
      continue
    held = _existing_files(real)
    if not held:
      continue
    shown = ", ".join(os.path.relpath(f) for f in held[:3])
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    raise OverwriteError(
        f"{path} holds committed results ({shown}{more}): this command "
        f"would replace them. Write elsewhere (the default is under "
        f"{RUNS_DIR}/), or pass {flag} to replace them on purpose."
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The ``--overwrite`` flag of every command that writes results."""
  p.add_argument(
      "--overwrite", action="store_true",
      help="allow replacing committed results under experiments/results/ "
      "(without it a command refuses to write over them)")
