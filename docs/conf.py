"""Sphinx configuration of the sam_optax documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Warnings are errors. Every cross-reference to a ``sam_optax`` name must
resolve (nitpicky mode; references to other packages are not checked: the
build is offline, so there is no intersphinx). The coverage check
(``docs/ext/coverage_check.py``) fails the build when a public name has no
entry in the API reference. Math is rendered by MathJax served from the
``sphinx-mathjax-offline`` package, copied into ``_static``: the built site
needs no network.
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "ext"))

import sam_optax  # noqa: E402  (after the path setup)

project = "sam_optax"
author = "sam_optax contributors"
copyright = "sam_optax contributors"  # noqa: A001
release = version = sam_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",  # a [source] link on every API entry, offline
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 from PyPI, copied into _static
    "myst_parser",
    "coverage_check",
    "public_refs",
]

root_doc = "index"
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# -- autodoc / autosummary / napoleon ----------------------------------------
autosummary_generate = False  # the tables only; the entries are on the pages
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False  # the values (eps=1e-12), not the constant names
autodoc_class_signature = "separated"
autodoc_default_options = {"exclude-members": "__init__, __new__"}
maximum_signature_line_length = 88
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
add_module_names = False
python_use_unqualified_type_names = True

# -- source links -------------------------------------------------------------
# The public names are imported into sam_optax from sam_optax._src; viewcode
# follows the import to the module that defines each one and renders that
# module's highlighted source (no network: the pages are part of the build).
viewcode_follow_imported_members = True
viewcode_enable_epub = False

# -- cross-references ---------------------------------------------------------
# Nitpicky for our own names: every reference whose target is a sam_optax
# name must resolve. Names of other packages (jax, optax, numpy, typing, the
# builtins) are not documented here and cannot be looked up offline.
nitpicky = True
_EXTERNAL = (
    r"(jax|jnp|lax|optax|numpy|np|chex|typing|collections|flax|nnx|equinox|eqx"
    r"|dataclasses|builtins|types|enum|functools|abc)(\..*)?"
)
_BUILTIN = (
    r"(int|float|bool|str|bytes|tuple|list|dict|set|frozenset|object|type"
    r"|None|NoneType|callable|Callable|Any|Optional|Union|Sequence|Mapping"
    r"|Iterable|Iterator|Hashable|NamedTuple|Literal|Protocol|PyTree|Array"
    r"|ArrayLike|ArrayTree|Params|Updates|OptState|ScalarOrSchedule|Schedule"
    r"|Self|Ellipsis|\.\.\.)"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    (r"py:.*", _BUILTIN),
    # Internal names that appear in signatures only (a part's base class
    # and the plan key's type); they have no public entry on purpose.
    (r"py:class", r"(sam_optax\._src\.protocols\.)?(Component|PlanKey)"),
]

# -- MyST ---------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- HTML ---------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "sam_optax"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
html_css_files = ["custom.css"]
# The wide tables' pages give the right-hand contents column to the table.
html_theme_options["secondary_sidebar_items"] = {
    "choosing": [], "benchmark": [], "experiments": [], "**": ["page-toc"],
}
