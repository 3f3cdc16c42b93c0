"""The example scripts of examples/ (docs/examples.md): each runs its
sam_optax port on synthetic data, the port follows the same trajectory as
the script's optax.contrib.sam port, and the gallery's table of changed
lines is what the scripts' sources say."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

import jax
import numpy as np
import pytest

from tests import doc_blocks

EXAMPLES = ("flax_mnist_nnx", "resnet_linen", "transformer_lm", "equinox_mnist")


def changed_lines(name: str, port: str) -> int:
  """Lines of ``train_step_<port>`` that are not in ``train_step_plain``
  (a rewritten line counts once; the ``def`` line, which differs by name
  and the rho argument, is not counted)."""
  module = importlib.import_module(f"examples.{name}")
  source = lambda v: inspect.getsource(getattr(module, f"train_step_{v}")).splitlines()[1:]
  plain, ported = source("plain"), source(port)
  count = 0
  for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
      None, plain, ported, autojunk=False).get_opcodes():
    if tag != "equal":
      count += max(i2 - i1, j2 - j1)
  return count


def run(name, variant, steps=3, lr=None):
  module = importlib.import_module(f"examples.{name}")
  argv = ["--sam", variant, "--steps", str(steps)]
  return module.main(argv + ([] if lr is None else ["--lr", str(lr)]))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_sam_optax_port_runs_and_equals_the_contrib_port(name):
  ours = run(name, "sam_optax")
  assert all(np.isfinite(ours["losses"]))
  theirs = run(name, "contrib")
  # The initial parameters: the plain port at learning rate 0 never moves.
  start = run(name, "plain", steps=1, lr=0)
  # The same SAM step (e = rho g / ||g||, the gradient at w + e, the same
  # dropout key and batch statistics in both passes), computed by two
  # libraries: the same trajectory up to float32 rounding.
  np.testing.assert_allclose(ours["losses"], theirs["losses"], rtol=1e-4)
  # Each leaf's displacement from the start equal to 1% in norm. Not
  # element by element: with BatchNorm, rounding is amplified in a few
  # small entries (a BatchNorm bias differed by 0.9% in one entry on one
  # CPU, 0.25% over its leaf), so an elementwise bound either flakes
  # across CPUs or is too loose for the rest.
  leaves = lambda r: [np.asarray(x, np.float64) for x in jax.tree.leaves(r["params"])]
  for a, b, w0 in zip(leaves(ours), leaves(theirs), leaves(start), strict=True):
    moved = np.linalg.norm(b - w0)
    assert moved > 0 or np.array_equal(a, b)
    assert np.linalg.norm(a - b) <= 1e-2 * moved + 1e-7 * np.sqrt(a.size), (
        np.linalg.norm(a - b), moved)


def test_gallery_table_counts_the_changed_lines():
  page = (doc_blocks.DOCS / "examples.md").read_text()
  rows = dict()
  for m in re.finditer(r"^\| \[`examples/(\w+)\.py`\].*\| (\d+) \| (\d+) \|$", page, re.M):
    rows[m.group(1)] = (int(m.group(2)), int(m.group(3)))
  counts = {name: (changed_lines(name, "sam_optax"), changed_lines(name, "contrib"))
            for name in EXAMPLES}
  print("lines changed (sam_optax, optax.contrib.sam):", counts)
  assert rows == counts
