"""The named examples of the README and the docs, run as written and
checked (tests/doc_blocks.py finds them; test_docs.py runs the other blocks)."""


import numpy as np
import pytest

from tests import doc_blocks

README_MAX_LINES = 200


def test_readme_is_a_front_page():
  lines = doc_blocks.README.read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, len(lines)
  text = "\n".join(lines)
  for command in ("python -m experiments.compare", "python -m pytest",
                  "python -m sphinx -W --keep-going -b html docs docs/_build/html"):
    assert command in text, command


@pytest.mark.parametrize("name", ["optax", "linen", "nnx", "parts"])
def test_readme_example_runs(name):
  scope = doc_blocks.run(doc_blocks.example(name), f"example:{name}")
  loss = float(scope["loss"])
  assert np.isfinite(loss)
  stats = scope["sam_optax"].stats(scope["opt_state"])
  if name == "parts":
    # Fisher refreshes on steps 0, 10, 20 (4 per-example gradients each);
    # vSAM samples every warm-up step and fewer than all steps after it.
    assert int(stats["mask_refreshes"]) == 3
    second = int(stats["grad_evals"]) - 3 * 4
    assert 5 <= second < int(stats["count"]) == 30
    assert loss < 0.5  # from 3.2 at w = 0
    return
  assert int(stats["grad_evals"]) == int(stats["count"]) > 0
  if name == "optax":
    assert loss < 1e-2  # the regression is learnt
