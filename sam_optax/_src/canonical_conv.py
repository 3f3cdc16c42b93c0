"""Gradients whose convolutions stay fast inside ``lax.cond`` on XLA:CPU.

XLA's CPU backend runs a convolution with its fast (Eigen) kernel only when
the dimension numbers are canonical: input ``(batch, spatial..., feature)``,
kernel ``(spatial..., in, out)``, output like the input. The pass that puts
other convolutions into that form with explicit transposes
(``xla::cpu::ConvCanonicalization``) walks the entry computation only. The
weight gradient of an ordinary NHWC convolution is not canonical, so inside a
``lax.cond`` branch (where every gated second gradient of this library runs:
LookSAM, vSAM, a rho schedule) it falls back to a naive loop, about 20x slower
on the benchmark CNN than the same gradient outside the branch.

:func:`grad` is ``jax.grad`` with that rewrite done before XLA sees the
program: every convolution of the gradient, including those inside nested
``jit`` calls, is expressed as transposes around a canonical convolution. Only
axes are permuted, so the values are those of ``jax.grad``. The rewrite is
staged with ``lax.platform_dependent``: on other platforms the plain gradient
is compiled. Convolutions inside other higher-order primitives (``scan``,
``remat``, custom derivatives) are left as they are.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax
from jax.extend import core as jex_core


def _canonical_specs(nd: int):
  lhs = (0, nd + 1) + tuple(range(1, nd + 1))  # (batch, feature, spatial...)
  rhs = (nd + 1, nd) + tuple(range(nd))  # (out, in, spatial...)
  return lhs, rhs, lhs


def _conv(lhs, rhs, **params):
  """A convolution rewritten as transposes around a canonical one."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  nd = len(lhs_spec) - 2
  canon = _canonical_specs(nd)
  if (tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)) == canon:
    return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
  lhs_t = lax.transpose(lhs, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
  rhs_t = lax.transpose(rhs, tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))
  new_params = dict(params)
  new_params["dimension_numbers"] = lax.ConvDimensionNumbers(*canon)
  out = lax.conv_general_dilated_p.bind(lhs_t, rhs_t, **new_params)
  perm = [0] * (nd + 2)  # output axis -> axis of the canonical result
  perm[out_spec[0]] = 0
  perm[out_spec[1]] = nd + 1
  for i in range(nd):
    perm[out_spec[2 + i]] = 1 + i
  return lax.transpose(out, tuple(perm))


def _has_conv(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive is lax.conv_general_dilated_p:
      return True
    if eqn.primitive.name in ("jit", "pjit") and _has_conv(
        eqn.params["jaxpr"].jaxpr
    ):
      return True
  return False


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    subfuns, params = params
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is None:
    return eqn.primitive.bind(*subfuns, *invals, **params)
  with ctx:
    return eqn.primitive.bind(*subfuns, *invals, **params)


def _eval(jaxpr, consts, *args) -> list[Any]:
  """Evaluates a jaxpr with every convolution in canonical form."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is lax.conv_general_dilated_p:
      outs = [_conv(*invals, **eqn.params)]
    elif eqn.primitive.name in ("jit", "pjit") and _has_conv(
        eqn.params["jaxpr"].jaxpr
    ):
      sub = eqn.params["jaxpr"]
      outs = _eval(sub.jaxpr, sub.consts, *invals)  # inlined
    else:
      outs = _bind(eqn, invals)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex_core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def canonicalize_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with every convolution it computes in canonical form (any platform)."""

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def grad(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``jax.grad(fn)`` (first argument), with canonical convolutions on CPU."""
  plain = jax.grad(fn)
  canonical = canonicalize_convs(plain)

  def wrapped(*args):
    return lax.platform_dependent(*args, cpu=canonical, default=plain)

  return wrapped
