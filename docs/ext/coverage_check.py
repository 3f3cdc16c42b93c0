"""Fails the build when a public sam_optax name has no API reference entry.

The public names are ``sam_optax.__all__`` and the names of
``sam_optax.parts`` (its ``__all__`` where it has one; otherwise every
name it binds that does not start with an underscore and is not a module).
An entry is what ``autofunction``, ``autoclass``, ``autodata`` or
``automodule`` (and the ``py:`` directives they emit) record in the Python
domain, under the public path (``sam_optax.sam``,
``sam_optax.parts.Geometry``).

After every page is read the check compares the two sets and raises, listing
each missing name; ``python -m sphinx -W --keep-going ...`` then exits
non-zero. :func:`missing` is the check itself, for the tests.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from sphinx import errors

PUBLIC_MODULES = ("sam_optax", "sam_optax.parts")


def module_names(module: Any) -> list[str]:
  """The public names of ``module``: its ``__all__``, else what it binds."""
  names = getattr(module, "__all__", None)
  if names is None:
    names = [
        n for n in vars(module)
        if not n.startswith("_") and not inspect.ismodule(getattr(module, n))
    ]
  return sorted(names)


def public_names() -> set[str]:
  """Every public name, fully qualified by the module that exports it."""
  import importlib  # pylint: disable=g-import-not-at-top

  out = set()
  for modname in PUBLIC_MODULES:
    module = importlib.import_module(modname)
    out.update(f"{modname}.{n}" for n in module_names(module))
  return out


def missing(documented: Iterable[str]) -> list[str]:
  """The public names not among ``documented`` (Python-domain object names)."""
  return sorted(public_names() - set(documented))


def _check(app, env) -> None:
  del app
  absent = missing(env.get_domain("py").objects)
  if absent:
    raise errors.SphinxError(
        "coverage check: these public names have no entry in the API "
        "reference (add each to a page under docs/api/): " + ", ".join(absent))


def setup(app):
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
