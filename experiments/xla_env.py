"""XLA:CPU settings that keep the experiments' numbers the same across CPUs.

XLA:CPU compiles for the CPU it runs on, and three of its choices change
float rounding, so one command gave different numbers on an Intel Xeon and
an AMD EPYC (29 of 30 quick digits runs, by up to 4.2 points):

* the instruction set of the code it generates: with FMA (AVX2 and later)
  ``a * b + c`` is rounded once, without it twice (XLA always lets LLVM
  fuse them), and AVX-512 widens the vectors. ``--xla_cpu_max_isa=AVX2``
  caps it at AVX2 with FMA and 256-bit vectors: what every x86-64 CPU since
  Intel's Haswell (2013) and AMD's Excavator/Zen (2015/2017) generates, so
  AVX-512 machines and AVX2 machines run the same code. (A CPU with AVX but
  no AVX2/FMA rounds ``a * b + c`` twice and still differs; capping at AVX
  would cover it too, but the committed results were made at AVX2.)
* YNNPACK, the library XLA hands dots, reductions and pooling to
  (``__ynn_fusion``), picks its kernels from the CPU it detects, outside
  that cap: ``--xla_cpu_experimental_ynn_fusion_type=`` routes that work
  back to XLA's own code and Eigen.
* Eigen's multi-threaded matrix products split the work over one thread
  per core: ``--xla_cpu_multi_thread_eigen=false`` makes the split
  independent of the number of cores.

:data:`PINNED` sets all three. The experiments' commands (``compare``,
``train``, ``layerwise_study``, ``digits_planned``, ``bench``) call
:func:`pin_if_command` before they import jax. With them a run gives the
same parameters under every instruction-set cap this project's CPU can
emulate down to AVX2 (:func:`isa_check`; without them, capping the
instruction set changes them).
What may still differ on another CPU: Eigen sizes the blocks of a long
contraction from the L1/L2 cache sizes the CPU reports, so a CPU with other
cache sizes may round a weight gradient summed over more than about 300
positions (the digits CNN's first two layers) differently; and another
jaxlib changes everything.

``EXPERIMENTS_XLA_PIN=0`` in the environment leaves ``XLA_FLAGS`` as it is
(XLA's defaults: not reproducible across CPUs). A flag of :data:`PINNED`
that ``XLA_FLAGS`` sets already keeps the caller's value.
:func:`describe` is what ``results.json`` records: the CPU, its instruction
set, the effective flags and whether they were pinned. :func:`snapshot` and
:func:`adopt` give a worker process (``compare --jobs``) exactly the
settings of the process that starts it.

>>> sorted(flag_names(PINNED))  # doctest: +NORMALIZE_WHITESPACE
['xla_cpu_experimental_ynn_fusion_type', 'xla_cpu_max_isa',
 'xla_cpu_multi_thread_eigen']
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from typing import Mapping, MutableMapping, Optional

#: The flags the commands add to ``XLA_FLAGS`` (see the module docstring).
PINNED: tuple[str, ...] = (
    "--xla_cpu_max_isa=AVX2",
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_multi_thread_eigen=false",
)

#: ``0`` (or ``false``/``no``/``off``) turns the pinning off.
OPT_OUT_VAR = "EXPERIMENTS_XLA_PIN"

# What the last pin() call did, for describe().
_STATE: dict = {"called": False, "added": [], "late": False}


def flag_names(flags_text) -> list[str]:
  """``"--a=1 --b"`` (or a sequence of flags) -> ``["a", "b"]``."""
  items = flags_text.split() if isinstance(flags_text, str) else flags_text
  return [f.lstrip("-").split("=", 1)[0] for f in items if f.startswith("-")]


def enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
  """False when :data:`OPT_OUT_VAR` says ``0``/``false``/``no``/``off``."""
  environ = os.environ if environ is None else environ
  value = environ.get(OPT_OUT_VAR, "1").strip().lower()
  return value not in ("0", "false", "no", "off")


def backend_started() -> bool:
  """Whether jax has created its backends (XLA read its flags then)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # an older or newer jax
    return False


def add_flags(flags, environ: MutableMapping[str, str]) -> list[str]:
  """Appends to ``environ["XLA_FLAGS"]`` each of ``flags`` whose name it does
  not set yet (a flag it sets keeps its value); returns those added.

  >>> env = {"XLA_FLAGS": "--a=1"}
  >>> add_flags(["--a=2", "--b=3"], env), env["XLA_FLAGS"]
  (['--b=3'], '--a=1 --b=3')
  """
  current = environ.get("XLA_FLAGS", "")
  have = set(flag_names(current))
  added = [f for f in flags if flag_names([f])[0] not in have]
  if added:
    environ["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
  return added


def pin(environ: Optional[MutableMapping[str, str]] = None) -> list[str]:
  """Adds :data:`PINNED` to ``XLA_FLAGS``; returns the flags it added.

  A flag ``XLA_FLAGS`` sets already keeps its value; nothing is added when
  :data:`OPT_OUT_VAR` opts out. XLA reads ``XLA_FLAGS`` once, when jax
  creates its backends: called after that (with the real environment) it
  warns that this process keeps its flags (its subprocesses get the new
  ones).
  """
  real = environ is None
  environ = os.environ if real else environ
  if not enabled(environ):
    if real:
      _STATE.update(called=True, added=[], late=False)
    return []
  added = add_flags(PINNED, environ)
  if real:
    late = bool(added) and backend_started()
    _STATE.update(called=True, added=added, late=late)
    if late:
      warnings.warn(
          "experiments.xla_env.pin(): jax has already started its backends, "
          "so this process keeps its XLA flags; call it before the first "
          "jax computation", RuntimeWarning, stacklevel=2)
  return added


def pin_if_command(module_name: str) -> list[str]:
  """:func:`pin` when ``module_name`` is ``"__main__"`` (the module runs
  as ``python -m ...``), else nothing: importing an entry module from a
  test or a notebook leaves that process's flags alone."""
  return pin() if module_name == "__main__" else []


#: The environment variables :func:`snapshot` carries to a worker.
_CARRIED = ("XLA_FLAGS", OPT_OUT_VAR)


def snapshot() -> dict:
  """This process's XLA settings (``XLA_FLAGS``, the opt-out variable, what
  :func:`pin` did), for :func:`adopt` in a worker process."""
  return {"environ": {k: os.environ.get(k) for k in _CARRIED},
          "state": dict(_STATE)}


def adopt(snap: dict) -> None:
  """Makes this (fresh) process's XLA settings those of :func:`snapshot`'s
  process, so that it compiles what that process compiles and
  :func:`describe` says the same: call it before jax starts its backends
  (``RuntimeError`` after)."""
  if backend_started():
    raise RuntimeError(
        "experiments.xla_env.adopt(): jax has already started its backends "
        "in this process, so it keeps its XLA flags")
  for key, value in snap["environ"].items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  _STATE.clear()
  _STATE.update(snap["state"])


#: The :func:`describe` keys that say what XLA compiles (a worker's must
#: equal its parent's).
COMPILE_KEYS = ("cpu_isa", "xla_flags", "pinned", "pin_opt_out")


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``; else the platform's)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


#: XLA's ``--xla_cpu_max_isa`` levels and the ``/proc/cpuinfo`` flags each
#: needs, highest first.
_ISA_LEVELS = (
    ("AVX512", ("avx512f",)),
    ("AVX2", ("avx2", "fma")),
    ("AVX", ("avx",)),
    ("SSE4_2", ("sse4_2",)),
)


def cpu_isa() -> Optional[str]:
  """The highest of XLA's ISA levels the CPU has (None: unknown, e.g. not
  Linux or not x86)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((set(line.split(":", 1)[1].split()) for line in f
                    if line.startswith("flags")), set())
  except OSError:
    return None
  for name, needs in _ISA_LEVELS:
    if all(n in flags for n in needs):
      return name
  return None


def describe() -> dict:
  """The machine and the XLA settings, for ``results.json``.

  ``xla_flags``: ``XLA_FLAGS`` now (what XLA read, when nothing changed it
  after jax started); ``pinned``: every flag of :data:`PINNED` is in it with
  its pinned value and was there before jax started its backends.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  present = set(flags.split())
  out = {
      "cpu": cpu_model(),
      "cpu_isa": cpu_isa(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "xla_flags": flags,
      "pinned": all(f in present for f in PINNED) and not _STATE["late"],
      "pin_flags": list(PINNED),
      "pin_opt_out": not enabled(),
  }
  jax = sys.modules.get("jax")
  if jax is not None:
    out["jax"] = jax.__version__
    jaxlib = sys.modules.get("jaxlib")
    if jaxlib is not None:
      from jaxlib import version  # pylint: disable=g-import-not-at-top
      out["jaxlib"] = version.__version__
  return out


#: The instruction-set caps :func:`isa_check` emulates, highest first.
CAPS = ("AVX2", "AVX", "SSE4_2")


def digest(dataset: str, method: str, epochs: int, seed: int = 0) -> str:
  """sha256 of the parameters after ``epochs`` epochs of ``method`` on
  ``dataset`` (``experiments.compare``'s base settings), in this process."""
  import hashlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import compare  # pylint: disable=g-import-not-at-top
  from experiments import config as config_lib  # pylint: disable=g-import-not-at-top
  from experiments import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  cfg = config_lib.Config(**dict(compare.OFFLINE_BASE[dataset],
                                 dataset=dataset, method=method,
                                 epochs=epochs))
  state = trainer_lib.Trainer(cfg).run(seed, log=None, progress=False)["state"]
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(state.params):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def isa_check(dataset: str = "digits", method: str = "sgd", epochs: int = 2,
              caps=CAPS) -> dict:
  """The parameters' :func:`digest` under XLA's defaults and pinned, with
  the instruction set uncapped (``"native"``) and capped at each of
  ``caps`` (what a CPU with only that instruction set runs): ``{"default"|
  "pinned": {cap: digest}}``, each run in a fresh process. Caps above this
  CPU's are skipped (they change nothing), and so is a pinned run whose
  effective cap an earlier one had (the same flags: the same program)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  order = [name for name, _ in _ISA_LEVELS]  # highest first
  top = cpu_isa()
  usable = [c for c in caps if top is None or order.index(c) >= order.index(top)]
  pinned_isa = next(f.split("=", 1)[1] for f in PINNED
                    if flag_names([f]) == ["xla_cpu_max_isa"])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out: dict = {}
  lowest = lambda *isas: max(isas, key=order.index)  # order: highest first
  for mode, pin_value in (("default", "0"), ("pinned", "1")):
    out[mode] = {}
    done = {}  # effective cap -> digest
    for label in ("native", *usable):
      env = dict(os.environ, **{OPT_OUT_VAR: pin_value})
      cap = label
      if mode == "pinned":
        # A CPU capped at ``cap`` runs the pin's cap when that is lower.
        cap = lowest(top or pinned_isa if cap == "native" else cap,
                     pinned_isa)
        if cap in done:
          out[mode][label] = done[cap]
          continue
      base = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                      if flag_names([f])[0] not in flag_names(PINNED))
      env["XLA_FLAGS"] = (base + ("" if cap == "native"
                                  else f" --xla_cpu_max_isa={cap}")).strip()
      env["PYTHONPATH"] = os.pathsep.join(
          [root, *filter(None, [env.get("PYTHONPATH")])])
      proc = subprocess.run(
          [sys.executable, "-m", "experiments.xla_env", "--digest", dataset,
           method, str(epochs)], env=env, cwd=root, capture_output=True,
          text=True, check=True)
      out[mode][label] = done[cap] = proc.stdout.split()[-1]
  return out


def _main(argv=None):
  """``python -m experiments.xla_env``: pins as the commands do, compiles a
  dot and a reduction, prints :func:`describe` and how many YNNPACK
  fusions the compiled program holds (0 when pinned) as JSON.
  ``--isa-check [DATASET METHOD EPOCHS]``: :func:`isa_check`'s table."""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(
      prog="python -m experiments.xla_env", description=_main.__doc__)
  p.add_argument("--isa-check", nargs="*", metavar="DATASET METHOD EPOCHS",
                 help="train under XLA's defaults and pinned, at every "
                 "instruction-set cap this CPU can emulate, and compare the "
                 "parameters (default: digits sgd 2)")
  p.add_argument("--digest", nargs=3, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.digest:  # one isa_check run, flags set by the caller
    pin_if_command("__main__")
    dataset, method, epochs = args.digest
    print(digest(dataset, method, int(epochs)))
    return None
  if args.isa_check is not None:
    what = dict(zip(("dataset", "method", "epochs"), args.isa_check))
    if "epochs" in what:
      what["epochs"] = int(what["epochs"])
    table = isa_check(**what)
    for mode, row in table.items():
      print(f"{mode:8s}", "  ".join(f"{cap}: {d}" for cap, d in row.items()))
    return table
  pin_if_command("__main__")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jnp.ones((256, 64), jnp.float32)
  w = jnp.ones((64, 32), jnp.float32)
  text = jax.jit(lambda x, w: (x @ w).sum(0)).lower(x, w).compile().as_text()
  out = dict(describe(), ynn_fusions=text.count('"__ynn_fusion"'))
  print(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  _main()
