"""A guard on the library's memory overhead (compile only, no step runs).

With XLA:CPU's memory-minimizing scheduler
(``--xla_cpu_enable_concurrency_optimized_scheduler=false``; XLA reads its
flags once per process, so the programs are compiled in a subprocess), the
compiled peak bytes of every SAM-family training step on the benchmark's
small conv net (``experiments/bench.py``'s ``peak_bytes``: argument + output
+ temp - alias, the state donated) stay at most 1.15x SGD's. On default
flags XLA:CPU's concurrency-optimized scheduler keeps more buffers alive at
once for SAM's two passes (about 1.7x SGD for every method); that is the
scheduler's choice, not the library's overhead, and the benchmark's
``memory`` column shows it. The steps are the unplanned ones: for LookSAM
and vSAM, whose second gradient sits in a ``lax.cond``, XLA's memory
analysis does not count the branch's temps, so their planned SAM steps
(1.16-1.18x SGD, their stored direction included) are not under this bound;
see experiments/results/bench/cpu_small_cnn_memory.md.

SAM's compiled peak is also at most ``optax.contrib.sam``'s (opaque mode,
the benchmark's anchor; a few scalars of slack) on this model on both flag
settings. The two settings disagreed on it before SAM's finiteness check
was made schedulable (``sam_optax._src.base.step_finite``): equal peaks on
default flags, SAM's 1% above with the flag, where every leaf of the
second gradient was made before any update was applied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
LIMIT = 1.15
# The steps whose whole peak the analysis sees: not the unplanned LookSAM
# and vSAM steps (their second gradient sits in a lax.cond whose temps the
# analysis leaves out, so a bound on them would hold vacuously), and one
# Sparse SAM mask (both masks' refresh steps peak alike: 1.14x in the
# bench).
FAMILY = ["sam", "asam", "gnp", "layerwise_sam", "ssam_fisher", "lightsam"]
ANCHOR = "optax_contrib_sam"
# SAM's peak may exceed the anchor's by a few scalars (its step's
# finiteness check: 12 bytes on default flags when measured), not by a
# buffer of the model's.
SLACK = 1024

WORKER = """
import json, sys
from experiments import bench
args = bench.parse_args(["--methods", sys.argv[1], "--planned", "no",
                         "--batch-size", "64", "--memory-flags", ""])
labels = [bench.methods_lib.label(n, o) for n, o in args.methods]
print(json.dumps(bench.compiled_peaks(args, {l: [None] for l in labels})))
"""


def compiled_peaks(methods, xla_flags):
  """Method -> compiled peak bytes of its unplanned training step on the
  small CNN, batch 64, compiled in a subprocess with ``XLA_FLAGS`` set to
  ``xla_flags``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # XLA's defaults (and the one flag): what a user gets, not the suite's
  # faster-compiling settings (conftest), which change the buffers.
  env["XLA_FLAGS"] = xla_flags
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
      [sys.executable, "-c", WORKER, ",".join(methods)],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  peaks = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(peaks) == {"sgd", *methods}
  return peaks


def test_sam_family_peak_within_1_15x_sgd_with_memory_scheduler():
  peaks = compiled_peaks(["sgd", ANCHOR] + FAMILY, FLAG)
  ratios = {n: peaks[n] / peaks["sgd"] for n in FAMILY}
  assert all(r <= LIMIT for r in ratios.values()), ratios
  # SAM's step against optax.contrib.sam's, with the flag (81.1 MiB
  # against 81.9 MiB when measured; it was 82.7 MiB before the check was
  # made schedulable).
  assert peaks["sam"] <= peaks[ANCHOR] + SLACK, (peaks["sam"], peaks[ANCHOR])


def test_sam_peak_at_most_optax_contrib_sam_on_default_flags():
  # 174.6 MiB both when measured (SAM's 12 bytes more).
  peaks = compiled_peaks([ANCHOR, "sam"], "")
  assert peaks["sam"] <= peaks[ANCHOR] + SLACK, (peaks["sam"], peaks[ANCHOR])
