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
* the built site (when built) loads no script or stylesheet over http(s),
  and every API entry links to its source.
"""

from __future__ import annotations

import ast
import html.parser
import re
import sys

import pytest

from tests import doc_blocks

ROOT = doc_blocks.ROOT
DOCS = doc_blocks.DOCS
sys.path.insert(0, str(DOCS / "ext"))

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


GUIDES = ("getting_started", "choosing", "recipes", "examples", "planned",
          "devices", "custom", "migrating", "troubleshooting", "experiments",
          "benchmark")


def test_every_guide_page_exists_and_is_in_the_index():
  index = (DOCS / "index.md").read_text()
  for name in GUIDES:
    assert (DOCS / f"{name}.md").exists(), name
    assert re.search(rf"^{name}$", index, re.M), f"{name} not in the toctree"


def test_every_named_example_is_run_by_a_test():
  names = [b.label for b in doc_blocks.all_blocks() if b.kind == "example"]
  assert len(names) == len(set(names)), "example names must be unique"
  sources = "".join(
      (ROOT / "tests" / f).read_text()
      for f in ("test_readme.py", "test_robustness.py", "test_recipes.py"))
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
    tree = ast.parse(path.read_text())
    # Messages built by a helper (``def ..._message(...)``) and raised
    # elsewhere count as raise sites of their own.
    builders = [
        ret.value for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef) and fn.name.endswith("_message")
        for ret in ast.walk(fn)
        if isinstance(ret, ast.Return) and ret.value is not None
    ]
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
              and node.exc.args):
        continue
      message = node.exc.args[0]
      if isinstance(message, ast.Call) and getattr(
          message.func, "attr", getattr(message.func, "id", "")
      ).endswith("_message"):
        continue  # checked at the builder, below
      pieces = [_normal(c).strip(" .;:,") for c in _literal_chunks(message)]
      best = max(pieces, key=len)
      if len(best) > FRAGMENT_CHARS:
        best = best[:FRAGMENT_CHARS].rsplit(" ", 1)[0]
      out.append((f"{path.name}:{node.lineno}", best))
    for message in builders:
      pieces = [_normal(c).strip(" .;:,") for c in _literal_chunks(message)]
      best = max(pieces, key=len)
      if len(best) > FRAGMENT_CHARS:
        best = best[:FRAGMENT_CHARS].rsplit(" ", 1)[0]
      out.append((f"{path.name}:{message.lineno}", best))
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
  # base.py's "NAME: <message>" prefix, and the planner's _Differs, which
  # raises the message a _message builder made (checked there)
  assert len(wrappers) <= 2, wrappers


# --------------------------------------------------------------------------
# The API reference: every public name has an entry, and the build checks it.
# --------------------------------------------------------------------------

_AUTO = re.compile(
    r"^\.\. (?:auto(?:function|class|data|exception|module)|py:module)::\s+(\S+)",
    re.M)


def reference_names() -> set[str]:
  """The names the pages under docs/api/ document (their auto* directives)."""
  out = set()
  for page in (DOCS / "api").glob("*.md"):
    out.update(_AUTO.findall(page.read_text()))
  return out


def test_reference_documents_every_public_name():
  pytest.importorskip("sphinx")
  import coverage_check  # pylint: disable=g-import-not-at-top

  assert coverage_check.missing(reference_names()) == []
  # The public names: sam_optax.__all__ and sam_optax.parts.
  names = coverage_check.public_names()
  assert {"sam_optax.sam", "sam_optax.parts", "sam_optax.parts.Geometry"} <= names


def _mini_build(tmp_path, names) -> tuple[int, str]:
  """A Sphinx build with the coverage check of a page declaring ``names``."""
  from sphinx.cmd import build  # pylint: disable=g-import-not-at-top

  src = tmp_path / "src"
  src.mkdir()
  (src / "conf.py").write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(DOCS / 'ext')!r})\n"
      "extensions = ['coverage_check']\n")
  (src / "index.rst").write_text("Reference\n=========\n\n" + "".join(
      f".. py:function:: {n}()\n   :no-contents-entry:\n\n" for n in sorted(names)))
  log = tmp_path / "log.txt"
  rc = build.build_main(["-W", "--keep-going", "-q", "-b", "html",
                         "-w", str(log), str(src), str(tmp_path / "out")])
  return rc, log.read_text() if log.exists() else ""


def test_a_name_missing_from_the_reference_fails_the_build(tmp_path):
  pytest.importorskip("sphinx")
  names = reference_names()
  (tmp_path / "all").mkdir()
  rc, log = _mini_build(tmp_path / "all", names)
  assert rc == 0, log
  (tmp_path / "less").mkdir()
  rc, log = _mini_build(tmp_path / "less", names - {"sam_optax.looksam"})
  assert rc != 0
  assert "sam_optax.looksam" in log and "sam_optax.sam," not in log


# --------------------------------------------------------------------------
# The whole site builds with warnings as errors, and works offline.
# --------------------------------------------------------------------------


class _Remote(html.parser.HTMLParser):
  """Collects the scripts and stylesheets a page loads over http(s)."""

  def __init__(self):
    super().__init__()
    self.found = []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    url = ""
    if tag == "script":
      url = a.get("src") or ""
    elif tag == "link" and ("stylesheet" in (a.get("rel") or "")
                            or a.get("as") in ("script", "style", "font")):
      url = a.get("href") or ""
    if re.match(r"\s*(https?:)?//", url):
      self.found.append((tag, url))


def test_docs_build_and_load_nothing_remote(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_parser")
  pytest.importorskip("sphinx_book_theme")
  from sphinx.cmd import build  # pylint: disable=g-import-not-at-top

  out = tmp_path / "html"
  log = tmp_path / "warnings.txt"
  rc = build.build_main(["-W", "--keep-going", "-q", "-b", "html", "-w", str(log),
                         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)])
  assert rc == 0, log.read_text()
  pages = list(out.rglob("*.html"))
  assert len(pages) > 20
  remote = []
  for page in pages:
    parser = _Remote()
    parser.feed(page.read_text())
    remote += [(page.name,) + r for r in parser.found]
  for css in out.rglob("*.css"):
    if re.search(r"@import[^;]*https?:|url\(\s*['\"]?(https?:)?//", css.read_text()):
      remote.append((css.name, "css", "remote import"))
  assert not remote, remote
  # MathJax is local, and the math reached the pages.
  methods = (out / "api" / "methods.html").read_text()
  assert "_static/mathjax/tex-chtml.js" in methods and "\\lVert" in methods
  assert (out / "_static" / "mathjax" / "tex-chtml.js").exists()
  # Every function and class entry links to its source (viewcode), a page
  # of the build itself (a method inherited from an internal base has none).
  entries = 0
  for page in (out / "api").glob("*.html"):
    text = page.read_text()
    for kind, dt in re.findall(
        r'<dl class="py (function|class)">\s*<dt[^>]*>(.*?)</dt>',
        text, re.S):
      entries += 1
      link = re.search(r'href="([^"#]+)[^"]*"><span class="viewcode-link">', dt)
      assert link, f"{page.name}: a {kind} entry without a source link"
      assert (page.parent / link.group(1)).exists(), link.group(1)
  assert entries > 50


# --------------------------------------------------------------------------
# Command lines: every `python -m experiments.{compare,train,bench} ...` the
# docs show parses with that command's own parser (the commands train for
# minutes to days, so the suite checks their flags, not their runs).
# --------------------------------------------------------------------------

_COMMAND = re.compile(r"python -m experiments\.(compare|train|bench)\b([^`\"#\n]*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
  out = []
  for page in doc_blocks.pages():
    text = page.read_text().replace("\\\n", " ")  # shell line continuations
    for m in _COMMAND.finditer(text):
      tokens = [t for t in m.group(2).split() if t != "..."]
      tokens = [t.rstrip(").;,") if not t.startswith("-") else t for t in tokens]
      tokens = ["0" if t.startswith("$") else t for t in tokens if t]
      out.append((page.name, m.group(1), tokens))
  return out


def test_documented_command_lines_parse():
  from experiments import bench, compare, train  # pylint: disable=g-import-not-at-top

  parse = {
      "compare": compare.plans,
      "train": lambda argv: train.parser().parse_args(argv),
      "bench": bench.parse_args,
  }
  commands = documented_commands()
  assert len(commands) > 10
  for page, name, argv in commands:
    try:
      parse[name](argv)
    except SystemExit as e:
      pytest.fail(f"{page}: python -m experiments.{name} {' '.join(argv)}: exit {e}")
