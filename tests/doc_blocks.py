"""The code blocks of README.md and docs/**/*.md, for the tests that run them.

A block is a fenced ```python block. Two HTML comments, on the line before
the fence, mark it:

* ``<!-- example: NAME -->``: a named example; a test runs it by name and
  checks its result (``example(NAME)``);
* ``<!-- norun: WHY -->``: a block that cannot run in the suite (a
  multi-host launch); keep these few: ``test_docs`` lists them.

Every other block runs: the blocks of one page in order, in one namespace
(``page_blocks``).
"""

from __future__ import annotations

import pathlib
import re
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_BLOCK = re.compile(
    r"(?:<!--\s*(example|norun):\s*(.*?)\s*-->\s*\n)?```python\n(.*?)```",
    re.S)


class Block(NamedTuple):
  page: str        # path relative to the repository root
  line: int        # 1-based line of the fence
  kind: str        # "", "example" or "norun"
  label: str       # the example's name, or why the block cannot run
  code: str


def pages() -> list[pathlib.Path]:
  """README.md and every Markdown page of the docs (not the build output)."""
  found = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
  return [README] + found


def blocks(path: pathlib.Path) -> list[Block]:
  text = path.read_text()
  out = []
  for m in _BLOCK.finditer(text):
    line = text.count("\n", 0, m.start(3))
    out.append(Block(str(path.relative_to(ROOT)), line, m.group(1) or "",
                     m.group(2) or "", m.group(3)))
  return out


def all_blocks() -> list[Block]:
  return [b for p in pages() for b in blocks(p)]


def example(name: str) -> str:
  """The code of the example block named ``name`` (unique over all pages)."""
  found = [b for b in all_blocks() if b.kind == "example" and b.label == name]
  if len(found) != 1:
    raise KeyError(f"{len(found)} example blocks named {name!r}")
  return found[0].code


def run(code: str, filename: str, scope: dict | None = None) -> dict:
  """Runs ``code`` in ``scope`` (a new namespace by default); returns it.

  The block's first line keeps its line number in tracebacks.
  """
  scope = {} if scope is None else scope
  exec(compile(code, filename, "exec"), scope)  # noqa: S102
  return scope
