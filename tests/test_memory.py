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

WORKER = """
import json, sys
from experiments import bench
args = bench.parse_args(["--methods", sys.argv[1], "--planned", "no",
                         "--batch-size", "64", "--memory-flags", ""])
labels = [bench.methods_lib.label(n, o) for n, o in args.methods]
print(json.dumps(bench.compiled_peaks(args, {l: [None] for l in labels})))
"""


def test_sam_family_peak_within_1_15x_sgd_with_memory_scheduler():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # XLA's defaults and the one flag: what a user gets, not the suite's
  # faster-compiling settings (conftest), which change the buffers.
  env["XLA_FLAGS"] = FLAG
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
      [sys.executable, "-c", WORKER, ",".join(["sgd"] + FAMILY)],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  peaks = json.loads(out.stdout.strip().splitlines()[-1])
  ratios = {n: peaks[n] / peaks["sgd"] for n in FAMILY}
  assert set(peaks) == {"sgd", *FAMILY}
  assert all(r <= LIMIT for r in ratios.values()), ratios
