"""The documentation: its code runs, its reference is complete, it works
offline, and the README stays a front page.

* every ```python block of README.md and docs/**/*.md runs: the named
  examples in the tests that check their results (test_readme.py,
  test_robustness.py), every other block here, the blocks of a page in one
  namespace, in order;
* the coverage check of the Sphinx build (docs/ext/coverage_check.py) finds
  every public name documented, and fails on a reference without one;
* every error message the library raises has its entry in
  docs/troubleshooting.md;
* the built site (when built) loads no script or stylesheet over http(s).
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import doc_blocks  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = doc_blocks.ROOT
DOCS = doc_blocks.DOCS

# Blocks that cannot run in the suite, by page: keep this short.
NORUN_ALLOWED = 2


def _runnable_pages():
  out = []
  for page in doc_blocks.pages():
    if any(b.kind == "" for b in doc_blocks.blocks(page)):
      out.append(str(page.relative_to(ROOT)))
  return out


@pytest.mark.parametrize("page", _runnable_pages())
def test_page_code_runs(page):
  """The page's unnamed blocks, in order, in one namespace."""
  scope: dict = {}
  for b in doc_blocks.blocks(ROOT / page):
    if b.kind == "":
      # Padded so a traceback names the line of the page.
      doc_blocks.run("\n" * b.line + b.code, b.page, scope)


def test_every_named_example_is_run_by_a_test():
  names = [b.label for b in doc_blocks.all_blocks() if b.kind == "example"]
  assert len(names) == len(set(names)), "example names must be unique"
  sources = "".join(
      (ROOT / "tests" / f).read_text()
      for f in ("test_readme.py", "test_robustness.py"))
  for name in names:
    assert f'"{name}"' in sources, f"example {name!r} is run by no test"


def test_few_blocks_are_marked_not_runnable():
  norun = [b for b in doc_blocks.all_blocks() if b.kind == "norun"]
  assert len(norun) <= NORUN_ALLOWED, [(b.page, b.line) for b in norun]
  assert all(b.label for b in norun), "say why a block cannot run"


# --------------------------------------------------------------------------
# Troubleshooting: every error message the library raises is on the page.
# --------------------------------------------------------------------------

FRAGMENT_CHARS = 60   # at most this many characters of a message are matched
SHORTEST = 8          # shorter literal text is a prefix wrapper ("NAME: ...")


def _literal_chunks(node: ast.AST) -> list[str]:
  """The literal text of a message expression, split at each formatted value."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return [node.value]
  if isinstance(node, ast.JoinedStr):
    out = [""]
    for v in node.values:
      if isinstance(v, ast.Constant):
        out[-1] += v.value
      else:
        out.append("")
    return out
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    a, b = _literal_chunks(node.left), _literal_chunks(node.right)
    return a[:-1] + [a[-1] + b[0]] + b[1:]
  return [""]


def _normal(text: str) -> str:
  return re.sub(r"\s+", " ", text.replace("`", "")).strip()


def error_fragments() -> list[tuple[str, str]]:
  """``(site, fragment)`` for every ``raise SomeError(message)`` in
  sam_optax/_src: the longest literal piece of the message (up to
  FRAGMENT_CHARS, cut at a word), which stays the same whatever the values
  the message reports."""
  out = []
  for path in sorted((ROOT / "sam_optax" / "_src").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
              and node.exc.args):
        continue
      pieces = [_normal(c).strip(" .;:,") for c in _literal_chunks(node.exc.args[0])]
      best = max(pieces, key=len)
      if len(best) > FRAGMENT_CHARS:
        best = best[:FRAGMENT_CHARS].rsplit(" ", 1)[0]
      out.append((f"{path.name}:{node.lineno}", best))
  return out


def test_every_error_message_is_in_troubleshooting():
  page = _normal((DOCS / "troubleshooting.md").read_text())
  fragments = error_fragments()
  assert len(fragments) > 50  # the walk finds the library's raise sites
  missing = [(site, f) for site, f in fragments
             if len(f) >= SHORTEST and f not in page]
  assert not missing, (
      "error messages without an entry in docs/troubleshooting.md "
      f"(add the message and its fix): {missing}")
  wrappers = [site for site, f in fragments if len(f) < SHORTEST]
  assert len(wrappers) <= 1, wrappers  # base.py's "NAME: <message>" prefix
