"""Resolves references to internal paths (``sam_optax._src.engine.Plan``)
to the public entry of the same name (``sam_optax.Plan``,
``sam_optax.parts.Gate``).

Signatures and docstrings name classes by the module that defines them; the
reference documents each under the path users import. A reference whose last
component is a public name is redirected there; any other unresolved
reference to a ``sam_optax`` name stays a warning (nitpicky mode).
"""

from __future__ import annotations

from sphinx.util import logging

logger = logging.getLogger(__name__)
PUBLIC_MODULES = ("sam_optax", "sam_optax.parts")


def _resolve(app, env, node, contnode):
  if node.get("refdomain") != "py":
    return None
  target = node.get("reftarget", "")
  domain = env.get_domain("py")
  objects = domain.objects
  parts = target.split(".")
  for modname in PUBLIC_MODULES:
    for i in range(len(parts)):  # the longest suffix first
      candidate = ".".join([modname] + parts[i:])
      if candidate in objects and candidate != target:
        return domain.resolve_xref(
            env, node.get("refdoc"), app.builder, node.get("reftype"),
            candidate, node, contnode)
  return None


def setup(app):
  app.connect("missing-reference", _resolve)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
