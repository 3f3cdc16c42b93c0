"""Compile time of Sparse SAM's exact top-k against the usual top-k.

    python -m experiments.topk_compile                          # 50, 200, 800 leaves
    python -m experiments.topk_compile --leaves 50,800 --repeats 3 --json out.json

Every measurement is the CPU seconds of ``lower`` + ``compile`` of one
jitted function on ``jax.ShapeDtypeStruct`` scores, in a fresh process (XLA
caches nothing across processes, and a process compiles each program once),
the experiments' pinned XLA flags (:mod:`experiments.xla_env`). The scores
are the leaf shapes of the benchmark's ``transformer`` (``experiments.bench``,
200 leaves) repeated or cut to the asked number of leaves, ``k`` half of
the entries. The variants:

- ``exact``: ``sam_optax.parts.top_k_mask``, leaf by leaf (keeps the
  scores' sharding; what Sparse SAM runs);
- ``lax_top_k``: the usual way, which gathers sharded scores: concatenate
  the flattened scores, ``lax.top_k``, scatter ``True`` at its indices and
  slice the mask back into the leaves (the same masks: ``lax.top_k`` puts
  the lower index first among equal values);
- ``elementwise``: ``x > 0`` per leaf, the cost of producing one boolean
  leaf per score leaf and nothing else (a floor).

The rounds are interleaved (round r runs every size and variant in turn),
and the table gives each one's minimum over the rounds: compile CPU time
moves with the machine's load. ``docs/benchmark.md`` has the results; the subprocesses inherit the
pinned flags through ``XLA_FLAGS``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from experiments import xla_env

xla_env.pin_if_command(__name__)

VARIANTS = ("exact", "lax_top_k", "elementwise")


def leaf_shapes(num_leaves: int) -> list[tuple[int, ...]]:
  """The benchmark transformer's leaf shapes, repeated (or cut) to
  ``num_leaves``."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import bench  # pylint: disable=import-outside-toplevel

  params = jax.eval_shape(lambda: bench.make_problem("transformer", 2).params)
  shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
  reps = math.ceil(num_leaves / len(shapes))
  return (shapes * reps)[:num_leaves]


def lax_top_k_mask(scores: Any, k: int) -> Any:
  """The usual global top-k over a pytree: concatenate, ``lax.top_k``,
  scatter, slice back (a static ``k``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  leaves, treedef = jax.tree.flatten(scores)
  flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
  _, index = jax.lax.top_k(flat, k)
  mask = jnp.zeros(flat.shape, bool).at[index].set(True)
  out, start = [], 0
  for x in leaves:
    size = math.prod(x.shape)
    out.append(jax.lax.slice(mask, (start,), (start + size,)).reshape(x.shape))
    start += size
  return jax.tree.unflatten(treedef, out)


def variant_fn(name: str) -> Callable[[Any, int], Any]:
  """The function measured for a variant: ``(scores, k) -> masks``."""
  import jax  # pylint: disable=import-outside-toplevel
  from sam_optax import parts  # pylint: disable=import-outside-toplevel

  if name == "exact":
    return parts.top_k_mask
  if name == "lax_top_k":
    return lax_top_k_mask
  if name == "elementwise":
    return lambda scores, k: jax.tree.map(lambda x: x > 0, scores)
  raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")


def measure_one(num_leaves: int, variant: str) -> dict[str, Any]:
  """CPU seconds of lower + compile of one variant, in this process, and
  the compiled program's temp bytes."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  shapes = leaf_shapes(num_leaves)
  scores = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  entries = sum(math.prod(s) for s in shapes)
  fn = variant_fn(variant)
  step = jax.jit(lambda s: fn(s, entries // 2))
  t0 = time.process_time()
  lowered = step.lower(scores)
  t1 = time.process_time()
  compiled = lowered.compile()
  t2 = time.process_time()
  memory = compiled.memory_analysis()
  return {
      "leaves": num_leaves,
      "variant": variant,
      "entries": entries,
      "lower_cpu_s": round(t1 - t0, 3),
      "compile_cpu_s": round(t2 - t0, 3),
      "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
  }


def _in_subprocess(num_leaves: int, variant: str) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "experiments.topk_compile", "--one",
         f"{num_leaves}:{variant}"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                       env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(leaves: Sequence[int], variants: Sequence[str],
        repeats: int) -> dict[str, Any]:
  """Every (leaves, variant) ``repeats`` times, rounds interleaved, each in
  a fresh process; the minimum of each."""
  runs = []
  for _ in range(repeats):
    for n in leaves:
      for v in variants:
        runs.append(_in_subprocess(n, v))
  rows = []
  for n in leaves:
    for v in variants:
      mine = [r for r in runs if r["leaves"] == n and r["variant"] == v]
      best = min(mine, key=lambda r: r["compile_cpu_s"])
      rows.append(dict(best, all_compile_cpu_s=[r["compile_cpu_s"]
                                                 for r in mine]))
  return {"rows": rows, "repeats": repeats, "xla": xla_env.describe()}


def table(result: dict[str, Any]) -> str:
  """Markdown: one row per leaf count, the minimum CPU seconds per
  variant, and ``exact`` / ``lax_top_k``."""
  rows = result["rows"]
  variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
  lines = ["| leaves | " + " | ".join(variants) +
           (" | exact / lax_top_k |" if {"exact", "lax_top_k"} <= set(variants)
            else " |"),
           "|---" * (len(variants) + 1 +
                     ({"exact", "lax_top_k"} <= set(variants))) + "|"]
  for n in sorted({r["leaves"] for r in rows}):
    by = {r["variant"]: r["compile_cpu_s"] for r in rows if r["leaves"] == n}
    cells = [f"{by[v]:.2f} s" for v in variants]
    if {"exact", "lax_top_k"} <= set(variants):
      cells.append(f"{by['exact'] / by['lax_top_k']:.2f}x")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _ints(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(
        f"--leaves takes positive integers separated by commas, got {text!r}")
  return values


def _variants(text: str) -> list[str]:
  names = [v for v in text.split(",") if v]
  bad = [v for v in names if v not in VARIANTS]
  if not names or bad:
    raise argparse.ArgumentTypeError(
        f"--variants takes names from {', '.join(VARIANTS)}, got {text!r}")
  return names


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.topk_compile", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--leaves", type=_ints, default=[50, 200, 800])
  parser.add_argument("--variants", type=_variants, default=list(VARIANTS))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default=None, help="write the result here")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    n, variant = args.one.split(":")
    print(json.dumps(measure_one(int(n), variant)))
    return 0
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  result = run(args.leaves, args.variants, args.repeats)
  print(table(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
