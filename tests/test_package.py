"""The package as released: metadata, license, changelog, typing marker,
dependencies and the README's links.

`.ci/run` builds the sdist and the wheel (`python -m build`), checks them
(`twine check --strict`) and installs the wheel in a fresh environment; these
tests check, in a second, what that build is made from.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib

import sam_optax
from tests import doc_blocks

ROOT = doc_blocks.ROOT
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirement_name(req: str) -> str:
  name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
  return re.sub(r"[-_.]+", "-", name).lower()


def library_imports() -> tuple[set[str], set[str]]:
  """The top-level packages the library's modules import, less the standard
  library and sam_optax itself: (at module level, inside functions)."""
  top, inner = set(), set()
  for path in (ROOT / "sam_optax").rglob("*.py"):
    tree = ast.parse(path.read_text())
    module_level = set(map(id, tree.body))
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = {node.module.split(".")[0]}
      else:
        continue
      (top if id(node) in module_level else inner).update(names)
  third_party = lambda s: {m for m in s
                           if m not in sys.stdlib_module_names and m != "sam_optax"}
  return third_party(top), third_party(inner)


def test_dependencies_are_exactly_what_the_library_imports():
  top, inner = library_imports()
  imports = {_requirement_name(m) for m in top}
  assert {"jax", "optax", "numpy"} <= imports  # the walk sees the imports
  declared = {_requirement_name(r) for r in PROJECT["dependencies"]}
  assert declared == imports, (
      f"declared but not imported: {sorted(declared - imports)}; "
      f"imported but not declared: {sorted(imports - declared)}")
  # What only the tests import is a test dependency.
  test_deps = {_requirement_name(r)
               for r in PROJECT["optional-dependencies"]["test"]}
  assert "chex" in test_deps
  # An import inside a function is of an optional package (Flax, for an NNX
  # filter the user passed, so already imported), never needed to import
  # or run the library without it.
  optional = {_requirement_name(m) for m in inner} - declared
  assert optional <= test_deps, optional


def test_license_is_apache_2_and_shipped():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text  # the full text
  assert PROJECT["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
  assert PROJECT["license-files"] == ["LICENSE"]
  build_requires = PYPROJECT["build-system"]["requires"]
  # setuptools reads the SPDX form and license-files from 77 on.
  assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\..*)?", r)
             for r in build_requires), build_requires


def test_typed_marker_is_package_data():
  assert (ROOT / "sam_optax" / "py.typed").exists()
  package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
  assert "py.typed" in package_data["sam_optax"]


def test_version_has_its_changelog_section():
  assert PROJECT["version"] == sam_optax.__version__
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert re.search(r"^## Version policy$", changelog, re.M)
  assert re.search(
      rf"^## {re.escape(sam_optax.__version__)}\b", changelog, re.M), (
          f"CHANGELOG.md has no section for {sam_optax.__version__}")



# --------------------------------------------------------------------------
# README links: relative, to files of the repository, so they work on a
# repository page and in a checkout (not into the docs' build output).
# --------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _github_slug(heading: str) -> str:
  text = re.sub(r"[`*_]", "", heading).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def test_api_index_summarizes_every_public_name():
  index = (doc_blocks.DOCS / "api" / "index.md").read_text()
  listed = set(re.findall(r"^   (\w+)$", index, re.M))
  missing = set(sam_optax.__all__) - listed
  assert not missing, f"add these to the summary table of docs/api/index.md: {missing}"


def test_readme_links_resolve_in_the_repository():
  text = doc_blocks.README.read_text()
  links = _LINK.findall(text)
  local = [u for u in links if not re.match(r"[a-z]+:", u)]
  assert len(local) >= 15, local  # the method table and the pages table
  for url in local:
    path, _, anchor = url.partition("#")
    assert "_build" not in path, f"{url}: a link into the build output"
    target = (ROOT / path) if path else doc_blocks.README
    assert target.exists(), f"README links to {url}, which does not exist"
    if anchor:
      headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
      slugs = {_github_slug(h) for h in headings}
      assert anchor in slugs, f"README links to {url}: no heading {anchor!r}"
