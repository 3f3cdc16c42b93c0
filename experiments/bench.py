"""Step time of every method relative to SGD, on the same model, one process.

    python -m experiments.bench                       # small CNN, CIFAR-shaped batch 64
    python -m experiments.bench --model resnet18      # ResNet-18-sized, for GPUs
    python -m experiments.bench --methods sgd,sam,looksam --rounds 7

Every method is the training code's jitted train step
(``experiments/steps.py``: clean value-and-grad, the method's transform, SGD
with momentum, apply) on one fixed synthetic batch. Rounds are
interleaved (round r runs every method in turn), so drifts of the machine hit
every method alike. Each step is timed alone (dispatch to
``block_until_ready``) and classified from ``sam_optax.stats`` by what it did:

- ``second``: a second gradient was computed (``grad_evals`` grew),
- ``skip``: no second gradient (a reuse step, or a gate that said no),
- ``refresh``: a mask or selection was refreshed (a ``*_refreshes`` stat grew).

The table gives, per method, the median step over all its steps, the mean
step (what a run costs on average), and the median of each kind of step, all
as ratios to SGD's median step; the share of steps with a second gradient;
and the same for ``optax.contrib.sam`` (opaque mode) as an anchor row.
Results are printed as a markdown table and written as JSON (``--json``).

Planned steps (``sam_optax.planner``, ``--planned both``, the default): every
sam_optax method gets a second row ``name+plan`` where the host plans each
step and calls the program compiled for that plan (no ``lax.cond`` in it);
the planning is inside the timed step, and so is any device read the planner
makes (``reads_per_1000`` steps in the JSON). Each planned row then runs
``--queued`` more steps dispatched without waiting (a training loop's
shape), timing the host inside the planner (its planning plus any wait for
the device: ``queued_planner_ms`` per step, ``queued_loop_ms`` per step
for the whole loop) and counting ``blocking_reads`` (reads that waited for
the steps dispatched, see ``docs/planned.md``). SGD and the optax anchor have
nothing to plan and get one row. ``--planned no`` / ``yes``: only unplanned /
planned rows (SGD stays the reference either way). Every program (a row's
one, or one per distinct plan) is compiled ahead of time, outside the timed
steps; a row's ``compile_cpu_s`` is the CPU seconds of ``lower`` +
``compile`` of all its programs (``compile_ratio`` to SGD's,
``compile_ratio_anchor`` to ``optax.contrib.sam``'s). ``--compile-repeats
N`` compiles every row's programs N times in all, the later times from
freshly built rows, the rows in turn (:func:`compile_repeats`), and takes
the minimum: compile CPU time moves with the machine's load, and the
least disturbed compile of each row is what compares. ``--methods`` takes
overrides as ``compare`` does:
``--methods "sgd,layerwise_sam_runtime:select_every=10"``; the default list
adds ``layerwise_sam_runtime (select_every=10)`` beside the registry's
every-step re-selection.

Memory (every row): the compiled peak bytes of the row's step, the largest
over its programs (:func:`peak_bytes`: argument + output + temp - alias of
``jax.jit(step, donate_argnums=0).lower(...).compile().memory_analysis()``;
the state is donated, so its buffers are counted once), as a ratio to SGD's
(``memory``). XLA flags are process-wide, so the same programs (the same
plans) are compiled again in a subprocess with ``--memory-flags`` added to
``XLA_FLAGS`` (default on CPU: the memory-minimizing scheduler,
``--xla_cpu_enable_concurrency_optimized_scheduler=false``), column
``memory (flags)``; ``--memory-flags ""`` skips it. A step under a
``lax.cond`` (unplanned LookSAM, vSAM) reads low: XLA:CPU's memory analysis
does not add the temp buffers of a conditional's branches the way it does
for straight-line code, so the planned row (one program per branch) is the
number to trust. On a GPU the JSON also
holds ``device_peak_bytes``: ``device.memory_stats()["peak_bytes_in_use"]``
after the row's warm-up steps (the rows warm up one after another, SGD
first, so it is the running peak of the process up to that row).

Data-parallel (``--devices N``): one mesh over N devices, the batch sharded,
the state replicated; each method runs with per-device (``shard_map``,
m-sharpness) and global (sharded ``jit``) perturbation, rows
``name@perturbation``, ratios to the first SGD row on the same mesh::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.bench --devices 8 --methods sgd,sam
"""

from __future__ import annotations

from experiments import xla_env  # first: XLA reads its flags when jax starts
xla_env.pin_if_command(__name__)

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import sam_optax
from experiments import config as config_lib
from experiments.config import Range
from experiments import methods as methods_lib
from experiments import models
from experiments import outputs
from experiments import parallel
from experiments import steps as steps_lib

ANCHOR = "optax_contrib_sam"

# The fixed layer set of `layerwise_sam_fixed` per model: the output side.
# SmallCNN: its two output layers. ResNet-18: the last conv with its norm, and
# the head.
FIXED_LAYERS = {
    "small": ("fc", "head"),
    "resnet18": ("stage4_1/Conv_1", "stage4_1/BatchNorm_1", "head"),
    "resnet50": ("stage4_2/Conv_2", "stage4_2/BatchNorm_2", "head"),
    "transformer": ("final_ln", "head"),
    "transformer_deep": ("final_ln", "head"),
}


class Problem(NamedTuple):
  """The benchmark model on one synthetic batch."""

  params: Any
  batch_stats: Any
  batch: dict  # {"image", "label"}
  forward: Callable  # steps.make_forward
  loss_fn: Callable  # the method's loss_fn (steps.method_loss_fn)
  has_bn: bool


#: The benchmark's models: name -> (constructor, image side, what it is).
#: The zoo (``small``, ``resnet50``, ``transformer``, ``transformer_deep``)
#: has the leaf counts of real models at sizes a CPU runs: compile time
#: grows with the number of leaves, not with their size.
MODELS = {
    "small": (lambda: models.SmallCNN(num_classes=10), 32,
              "SmallCNN, 10 leaves"),
    "resnet18": (lambda: models.ResNet(num_classes=10), 32,
                 "ResNet-18 (CIFAR), 62 leaves, 11.2M parameters"),
    "resnet50": (lambda: models.BottleneckResNet(num_classes=10, width=8), 16,
                 "ResNet-50 layout with BatchNorm, width 8: 161 leaves"),
    "transformer": (
        lambda: models.ViT(num_classes=10, dim=32, depth=12, heads=2), 16,
        "ViT encoder, 12 blocks of width 32: 200 leaves"),
    "transformer_deep": (
        lambda: models.ViT(num_classes=10, dim=32, depth=25, heads=2), 16,
        "ViT encoder, 25 blocks of width 32: 408 leaves"),
}


def make_problem(model_name: str, batch_size: int, seed: int = 0) -> Problem:
  """The benchmark model (:data:`MODELS`) and a synthetic batch of its
  image size, with the loss and forward pass of the training code
  (``experiments/steps.py``)."""
  rng = np.random.default_rng(seed)
  if model_name not in MODELS:
    raise ValueError(
        f"--model must be one of {sorted(MODELS)}, got {model_name!r}")
  make, side, _ = MODELS[model_name]
  model = make()
  shape = (batch_size, side, side, 3)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  variables = model.init(jax.random.PRNGKey(seed), x[:2], train=False)
  batch_stats = variables.get("batch_stats", {})
  has_bn = bool(jax.tree.leaves(batch_stats))
  forward = steps_lib.make_forward(model, 10, 0.0, has_bn)
  return Problem(variables["params"], batch_stats, {"image": x, "label": y},
                 forward, steps_lib.method_loss_fn(forward, has_bn), has_bn)


def _with_batch(tx: optax.GradientTransformation, loss_fn, has_aux: bool):
  """``optax.contrib.sam`` (opaque mode) reading ``batch=`` like ours: its
  ``grad_fn`` is the gradient of ``loss_fn`` on that batch."""

  def update(updates, state, params=None, *, batch, **extra):
    del extra
    grad = jax.grad(loss_fn, has_aux=has_aux)
    adv = lambda p, _: grad(p, batch)[0] if has_aux else grad(p, batch)  # noqa: E731
    return tx.update(updates, state, params, grad_fn=adv)

  return optax.GradientTransformationExtraArgs(tx.init, update)


class Row(NamedTuple):
  """One row of the table: ``init() -> TrainState``, a fresh state of the
  problem's own (the step donates it); ``step(state,
  batch, plan=None) -> (state, (loss, correct))``, the training code's step
  jitted with ``plan`` static; ``planner``: a factory of the row's
  ``sam_optax.planner`` (None: unplanned)."""

  init: Callable
  step: Callable
  planner: Any


def parse_methods(text):
  """``"sgd,sam,layerwise_sam:select_every=10"`` -> ``[(name, overrides)]``:
  ``compare``'s parser, with the anchor's name accepted too."""
  from experiments import compare  # pylint: disable=g-import-not-at-top

  return compare.parse_methods(text, extra_names=(ANCHOR,))


def build_steps(
    names: list, problem: Problem, lr: float, steps_per_epoch: int,
    total_steps: int, model_name: str = "small", mesh=None,
    perturbation: str = "global", planned: str = "no",
) -> dict[str, Row]:
  """``label -> Row`` for every method of ``names`` (registry names, or
  ``(name, overrides)`` pairs), the training code's step
  (``experiments/steps.py``).

  ``planned``: ``"no"`` (rows ``label``), ``"yes"`` (rows ``label+plan`` for
  every sam_optax method, ``label`` for SGD and the anchor) or ``"both"``.

  With ``mesh`` the step is data-parallel over its ``data`` axis:
  ``perturbation="per-device"`` runs it under ``shard_map`` (each device
  perturbs with its shard's gradient), ``"global"`` under sharded ``jit``;
  the state is replicated, the batch sharded.
  """
  per_device = mesh is not None and perturbation == "per-device"
  axis = parallel.AXIS if per_device else None
  has_aux = problem.has_bn
  out = {}
  base = lambda: optax.sgd(lr, momentum=0.9)  # noqa: E731
  for item in names:
    name, user = (item, {}) if isinstance(item, str) else item
    if name == ANCHOR:
      tx = _with_batch(optax.contrib.sam(
          base(),
          optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
          sync_period=2,
          opaque_mode=True,
          batch_axis_name=axis,
      ), problem.loss_fn, has_aux)
    else:
      overrides = dict(user)
      if name == "layerwise_sam_fixed":
        overrides["layers"] = FIXED_LAYERS[model_name]
      tx, sam_tx = methods_lib.build(
          name, problem.loss_fn, base(), steps_per_epoch=steps_per_epoch,
          total_steps=total_steps, has_aux=has_aux, axis_name=axis,
          overrides=overrides, with_sam=True,
      )
    if name == ANCHOR:
      sam_tx = None

    def step(state, batch, plan=None, tx=tx):
      fn = steps_lib.make_train_step(
          problem.forward, tx, problem.has_bn, axis_name=axis,
          reduce_grads=name == "sgd", plan=plan,
      )
      if per_device:
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(parallel.AXIS)),
                           out_specs=(P(), P()), check_vma=False)
      return fn(state, batch)

    shardings = {}
    if mesh is not None:
      shardings["out_shardings"] = parallel.replicated(mesh)

    def init(tx=tx):
      # The step donates its state: every state gets its own copy of the
      # parameters and running statistics, or the first step would delete
      # the problem's (and the next row's init would read deleted arrays).
      params, stats = jax.tree.map(
          jnp.array, (problem.params, problem.batch_stats))
      state = steps_lib.TrainState(params, stats, tx.init(params))
      if mesh is not None:
        state = jax.device_put(state, parallel.replicated(mesh))
      return state

    jitted = jax.jit(step, donate_argnums=0, static_argnames="plan",
                     **shardings)
    lab = methods_lib.label(name, user)
    plans = planned in ("yes", "both") or (
        planned == "auto" and sam_tx is not None
        and _plans_change_program(sam_tx, problem.params))
    if planned in ("no", "both", "auto") or sam_tx is None:
      out[lab] = Row(init, jitted, None)
    if plans and sam_tx is not None:
      out[lab + "+plan"] = Row(
          init, jitted, lambda sam_tx=sam_tx: sam_optax.planner(sam_tx))
  return out


def _plans_change_program(sam_tx, params) -> bool:
  """Whether ``sam_tx``'s plans ever set a field (its planned program
  differs from the unplanned one): a method whose gate and region take
  every decision statically (SAM, a fixed layer set) plans nothing."""
  state = sam_tx.init(params)
  plan_of = sam_optax.planner(sam_tx)
  gate = getattr(sam_tx.update, "_sam_optax_spec").gate
  if gate.schedule not in ("always", "never"):
    return True
  # A static gate's plan repeats its schedule; what else a plan sets
  # (the radius, the gate's end-of-step work, the region) changes the program.
  return any(
      any(x is not None for x in (p.rho_skip, p.gate_after, p.region))
      for p in (plan_of.peek(c, state) for c in (0, 1)) if p is not None)


def _snapshot(opt_state) -> dict[str, float]:
  out = {}
  for k, v in sam_optax.stats(opt_state).items():
    try:
      out[k] = float(np.asarray(v).reshape(-1)[0])
    except (TypeError, ValueError):
      pass
  return out


def _kind(name: str, before: dict, after: dict) -> str:
  if name.split("@")[0] == ANCHOR:  # optax.contrib.sam computes its second gradient every step
    return "second"
  if any(
      k.endswith("_refreshes") and after.get(k, 0) > before.get(k, 0)
      for k in after
  ):
    return "refresh"
  evals = [k for k in after if k.endswith("grad_evals")]
  if evals and any(after[k] > before.get(k, 0) for k in evals):
    return "second"
  return "skip" if evals else "plain"


CPU_MEMORY_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def peak_bytes(compiled) -> int:
  """The compiled program's peak bytes: ``argument + output + temp -
  alias`` of its ``memory_analysis()``.

  Arguments and outputs are live for the whole call; ``temp`` is XLA's
  buffer assignment for everything else (its size is the peak of the
  intermediate buffers as the schedule orders them); donated arguments
  that an output reuses (``alias``) would otherwise be counted twice.
  """
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _device_peak_bytes():
  """``peak_bytes_in_use`` of the first device, where the backend reports
  it (GPUs, TPUs); None on CPU."""
  if jax.default_backend() == "cpu":
    return None
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _build_all(args, total):
  """(row label -> Row, the batch), as :func:`run` builds them."""
  problem = make_problem(args.model, args.batch_size)
  batch = problem.batch
  if args.devices:
    mesh = parallel.make_mesh(jax.devices()[: args.devices])
    parallel.check_batch_size(args.batch_size, mesh)
    batch = jax.device_put(batch, parallel.sharded(mesh))
    steps = {}
    for pert in args.perturbation:
      built = build_steps(args.methods, problem, args.lr, args.steps_per_epoch,
                          total, args.model, mesh=mesh, perturbation=pert,
                          planned=args.planned)
      steps.update({f"{n}@{pert}": v for n, v in built.items()})
  else:
    steps = build_steps(args.methods, problem, args.lr, args.steps_per_epoch,
                        total, args.model, planned=args.planned)
  return steps, batch


def compiled_peaks(args, plans: dict[str, list]) -> dict[str, int]:
  """Row label -> the largest :func:`peak_bytes` over the programs of
  ``plans[label]``, compiled (not run) in this process."""
  total = args.warmup + args.rounds * args.steps
  steps, batch = _build_all(args, total)
  out = {}
  for name, row_plans in plans.items():
    s = steps[name].init()
    out[name] = max(
        peak_bytes(steps[name].step.lower(s, batch, plan=plan).compile())
        for plan in row_plans)
  return out


def compile_repeats(args, plans: dict[str, list], repeats: int
                    ) -> dict[str, list[float]]:
  """Row label -> CPU seconds of ``lower`` + ``compile`` of all the
  programs of ``plans[label]``, once per repeat.

  Every repeat builds the rows afresh (new step functions, so nothing is
  taken from jax's caches) and compiles each row's programs in turn: the
  rows are interleaved, so a drift of the machine's load hits them alike;
  compare the minima (the least disturbed compile of each row)."""
  out = {name: [] for name in plans}
  total = args.warmup + args.rounds * args.steps
  for _ in range(repeats):
    steps, batch = _build_all(args, total)
    for name, row_plans in plans.items():
      s = steps[name].init()
      c0 = time.process_time()
      for plan in row_plans:
        steps[name].step.lower(s, batch, plan=plan).compile()
      out[name].append(time.process_time() - c0)
  return out


def peaks_with_flags(argv, plans, flags: str) -> dict[str, int]:
  """:func:`compiled_peaks` in a subprocess whose ``XLA_FLAGS`` add
  ``flags`` (XLA reads its flags once per process)."""
  import os  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    plans_file = os.path.join(tmp, "plans.pkl")
    out_file = os.path.join(tmp, "peaks.json")
    with open(plans_file, "wb") as f:
      pickle.dump(plans, f)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    subprocess.run(
        [sys.executable, "-m", "experiments.bench", *argv,
         "--compile-only", plans_file, "--json", out_file],
        env=env, check=True)
    with open(out_file) as f:
      return json.load(f)


def run(args) -> dict[str, Any]:
  total = args.warmup + args.rounds * args.steps
  steps, batch = _build_all(args, total)
  names = list(steps)
  reference = names[0]  # SGD (of the first perturbation on a mesh)

  carry, times, kinds = {}, {n: [] for n in names}, {n: [] for n in names}
  compile_s = {n: 0.0 for n in names}
  compile_cpu = {n: [0.0, 0.0] for n in names}  # lower, compile (CPU s)
  programs = {n: {} for n in names}  # plan -> compiled program
  planners, counts = {}, {n: 0 for n in names}
  device_peak = {}

  def one_step(name, s):
    """One step of row ``name``: (state, seconds spent compiling)."""
    row = steps[name]
    plan = planners[name](counts[name], s.opt_state) if name in planners else None
    spent = 0.0
    if plan not in programs[name]:  # compiled ahead, not timed
      t = time.perf_counter()
      c0 = time.process_time()
      lowered = row.step.lower(s, batch, plan=plan)
      c1 = time.process_time()
      programs[name][plan] = lowered.compile()
      compile_cpu[name][0] += c1 - c0
      compile_cpu[name][1] += time.process_time() - c1
      spent = time.perf_counter() - t
      compile_s[name] += spent
    s, _ = programs[name][plan](s, batch)
    counts[name] += 1
    return s, spent

  for name in names:
    row = steps[name]
    if row.planner is not None:
      planners[name] = row.planner()
    s = row.init()
    t0 = time.perf_counter()
    for _ in range(max(args.warmup, 1)):  # compile, and leave warm-up behind
      s, _ = one_step(name, s)
    jax.block_until_ready(s)
    compile_s[name] = time.perf_counter() - t0  # first programs and warm-up
    carry[name] = s
    device_peak[name] = _device_peak_bytes()

  for _ in range(args.rounds):
    for name in names:
      s = carry[name]
      for _ in range(args.steps):
        before = _snapshot(s.opt_state)
        t0 = time.perf_counter()
        s, spent = one_step(name, s)  # planning included
        jax.block_until_ready(s)
        times[name].append(time.perf_counter() - t0 - spent)
        kinds[name].append(_kind(name, before, _snapshot(s.opt_state)))
      carry[name] = s

  queued = {n: _queued_loop(n, carry, planners, one_step, args.queued)
            for n in planners} if args.queued else {}

  sgd_med = statistics.median(times[reference])
  cpu_all = {n: [sum(compile_cpu[n])] for n in names}
  if args.compile_repeats > 1:
    more = compile_repeats(args, {n: list(programs[n]) for n in names},
                           args.compile_repeats - 1)
    for n in names:
      cpu_all[n] += more[n]
  cpu = {n: min(v) for n, v in cpu_all.items()}
  anchor = next((n for n in names if n.split("@")[0] == ANCHOR), None)
  peaks = {n: max(peak_bytes(c) for c in programs[n].values()) for n in names}
  flagged = {}
  if args.memory_flags:
    flagged = peaks_with_flags(
        args.argv, {n: list(programs[n]) for n in names}, args.memory_flags)
  rows = {}
  for name in names:
    t = np.asarray(times[name])
    k = np.asarray(kinds[name])
    row = {
        "median_ms": 1e3 * float(np.median(t)),
        "ratio_median": float(np.median(t)) / sgd_med,
        "ratio_mean": float(np.mean(t)) / sgd_med,
        "steps": int(t.size),
        "second_share": float(np.mean((k == "second") | (k == "refresh"))),
        "compile_s": compile_s[name],
        "lower_cpu_s": compile_cpu[name][0],
        "compile_cpu_s": cpu[name],
        "compile_cpu_s_repeats": cpu_all[name],
        "compile_ratio": cpu[name] / cpu[reference],
        "compile_ratio_anchor": cpu[name] / cpu[anchor] if anchor else None,
        "final_stats": _snapshot(carry[name].opt_state),
        "planned": name in planners,
        "programs": len(programs[name]),
        "peak_bytes": peaks[name],
        "memory_ratio": peaks[name] / peaks[reference],
        "peak_bytes_flags": flagged.get(name),
        "memory_ratio_flags": (
            flagged[name] / flagged[reference] if flagged else None),
        "device_peak_bytes": device_peak[name],
    }
    if name in planners:
      row["planner_reads"] = planners[name].reads
      row["reads_per_1000"] = 1e3 * planners[name].reads / counts[name]
      row["blocking_reads"] = getattr(planners[name], "blocking_reads", None)
      row.update(queued.get(name, {}))
    for kind in ("second", "skip", "refresh"):
      sel = t[k == kind]
      row[f"ratio_{kind}"] = float(np.median(sel)) / sgd_med if sel.size else None
      row[f"n_{kind}"] = int(sel.size)
    rows[name] = row
  return {
      "config": {
          "model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
          "steps_per_round": args.steps, "warmup": args.warmup,
          "steps_per_epoch": args.steps_per_epoch,
          "devices": args.devices or 1, "reference": reference,
          "planned": args.planned, "memory_flags": args.memory_flags,
          "queued": args.queued, "compile_repeats": args.compile_repeats,
          "device": str(jax.devices()[0]), "backend": jax.default_backend(),
          "machine": platform.machine(), "jax": jax.__version__, "optax": optax.__version__,
          "xla": xla_env.describe(),
      },
      "sgd_median_ms": 1e3 * sgd_med,
      "rows": rows,
  }


def _queued_loop(name, carry, planners, one_step, n) -> dict[str, float]:
  """``n`` steps of planned row ``name`` dispatched without waiting, as a
  training loop runs them: the loop's and the planner's host time per step
  (the planner's includes any wait for the device), in ms. A plan not
  compiled yet is compiled outside both times."""
  plan_of, inside = planners[name], [0.0]

  def timed(count, opt_state):
    t = time.perf_counter()
    plan = plan_of(count, opt_state)
    inside[0] += time.perf_counter() - t
    return plan

  planners[name] = timed
  s, spent = carry[name], 0.0
  jax.block_until_ready(s)
  t0 = time.perf_counter()
  for _ in range(n):
    s, compiled = one_step(name, s)
    spent += compiled
  jax.block_until_ready(s)
  loop = time.perf_counter() - t0 - spent
  planners[name], carry[name] = plan_of, s
  return {"queued_steps": n, "queued_loop_ms": 1e3 * loop / n,
          "queued_planner_ms": 1e3 * inside[0] / n}


def to_markdown(result: dict[str, Any]) -> str:
  cfg = result["config"]
  fmt = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731
  lines = [
      f"Model `{cfg['model']}`, batch {cfg['batch_size']}, {cfg['backend']} "
      f"({cfg['device']}); SGD median step {result['sgd_median_ms']:.2f} ms; "
      f"{cfg['rounds']} interleaved rounds x {cfg['steps_per_round']} steps.",
      "",
      "| method | median step | mean step | second-grad step | skipped step "
      "| refresh step | steps with 2nd grad | ms (median) | programs "
      "| reads / 1000 steps | memory | memory (flags) | peak MB "
      "| compile | compile / optax | compile CPU s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in result["rows"].items():
    reads = r.get("reads_per_1000")
    peak = r.get("peak_bytes")
    mb = "—" if peak is None else f"{peak / 2**20:.1f}"
    lines.append(
        f"| {name} | {fmt(r['ratio_median'])} | {fmt(r['ratio_mean'])} | "
        f"{fmt(r['ratio_second'])} | {fmt(r['ratio_skip'])} | "
        f"{fmt(r['ratio_refresh'])} | {100 * r['second_share']:.0f}% | "
        f"{r['median_ms']:.2f} | {r.get('programs', 1)} | "
        f"{'—' if reads is None else f'{reads:.0f}'} | "
        f"{fmt(r.get('memory_ratio'))} | {fmt(r.get('memory_ratio_flags'))} | "
        f"{mb} | {fmt(r.get('compile_ratio'))} | "
        f"{fmt(r.get('compile_ratio_anchor'))} | "
        f"{r.get('compile_cpu_s', 0):.1f} |"
    )
  lines += ["", "compile: CPU seconds of lower + compile of the row's "
            "programs (all of its plans), / SGD's and / optax.contrib.sam's."]
  queued = {n: r for n, r in result["rows"].items() if "queued_loop_ms" in r}
  if queued:
    lines += ["", f"Planned rows, {cfg['queued']} steps dispatched without "
              "waiting: host ms per step in the whole loop and inside the "
              "planner (planning and any wait for the device); reads that "
              "waited for the steps dispatched.", "",
              "| row | loop ms / step | planner ms / step | reads | "
              "blocking reads |", "|---|---|---|---|---|"]
    for name, r in queued.items():
      lines.append(
          f"| {name} | {r['queued_loop_ms']:.3f} | "
          f"{r['queued_planner_ms']:.3f} | {r['planner_reads']} | "
          f"{'—' if r['blocking_reads'] is None else r['blocking_reads']} |")
  if cfg.get("memory_flags"):
    lines += ["", "memory: compiled peak bytes (argument + output + temp - "
              "alias) / SGD's; memory (flags): the same programs compiled "
              f"with `{cfg['memory_flags']}`. Rows with a lax.cond (unplanned "
              "LookSAM, vSAM) read low: trust their +plan rows."]
  return "\n".join(lines)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument(
      "--methods", default=None,
      help="comma-separated registry names (default: sgd, the optax anchor "
      "and every method available)",
  )
  ap.add_argument("--model", default="small", choices=sorted(MODELS))
  ap.add_argument("--batch-size", type=Range(int, 1).arg, default=64)
  ap.add_argument("--rounds", type=Range(int, 1).arg, default=5)
  ap.add_argument("--steps", type=Range(int, 1).arg, default=20, help="timed steps per round")
  ap.add_argument("--warmup", type=Range(int, 0).arg, default=3, help="untimed steps first")
  ap.add_argument(
      "--steps-per-epoch", type=Range(int, 1).arg, default=25,
      help="sets mask refresh periods and warm-ups that are given in epochs",
  )
  ap.add_argument("--lr", type=Range(float, 0, open_low=True).arg,
                  default=0.01)
  ap.add_argument(
      "--devices", type=Range(int, 0).arg, default=0,
      help="data-parallel over the first N devices (one mesh, batch sharded, "
      "state replicated); 0: one device, no mesh. For CPU devices set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=N",
  )
  ap.add_argument(
      "--perturbation", default="per-device,global",
      help="with --devices: comma-separated per-device and/or global; each "
      "method gets a row per perturbation (name@perturbation)",
  )
  ap.add_argument(
      "--planned", default="both", choices=["both", "yes", "no", "auto"],
      help="planned steps (sam_optax.planner): rows name (lax.cond path) and "
      "name+plan (both), only planned rows (yes), only unplanned (no), or "
      "both where plans change the program (auto: not SAM, whose plan is "
      "empty)",
  )
  ap.add_argument(
      "--memory-flags", default=None,
      help="XLA flags of the second memory column (compiled in a subprocess);"
      " default on CPU: " + CPU_MEMORY_FLAGS + "; '' to skip",
  )
  ap.add_argument(
      "--queued", type=Range(int, 0).arg, default=200,
      help="steps of each planned row dispatched without waiting, to time "
      "the host inside the planner (0: skip)",
  )
  ap.add_argument(
      "--compile-repeats", type=Range(int, 1).arg, default=1,
      help="compile every row's programs this many times in all (the "
      "repeats after the first from freshly built rows, the rows in turn); "
      "compile_cpu_s and the compile ratios are the minimum")
  ap.add_argument("--compile-only", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--json", default="runs/bench/bench.json")
  outputs.add_arguments(ap)
  import sys  # pylint: disable=g-import-not-at-top

  args = ap.parse_args(argv)
  if args.json and not args.compile_only:
    # Before any compile: a committed result is replaced only on purpose.
    try:
      outputs.check_output(args.json, args.overwrite)
    except outputs.OverwriteError as e:
      ap.error(str(e))
  # What the memory subprocess repeats: this command line, minus its output.
  raw = list(sys.argv[1:] if argv is None else argv)
  args.argv = [a for i, a in enumerate(raw)
               if a != "--json" and (i == 0 or raw[i - 1] != "--json")
               and not a.startswith("--json=")]
  if args.memory_flags is None:
    args.memory_flags = CPU_MEMORY_FLAGS if jax.default_backend() == "cpu" else ""
  if args.methods is None:
    items = [("sgd", {}), (ANCHOR, {})] + [
        (n, {}) for n in methods_lib.available() if n != "sgd"]
    if "layerwise_sam_runtime" in methods_lib.available():
      # Re-selection every 10 steps: the planner reads the selection once
      # per re-selection (every step with the registry's select_every=1).
      items.append(("layerwise_sam_runtime", {"select_every": 10}))
  else:
    try:
      items = parse_methods(args.methods)
    except ValueError as e:
      ap.error(str(e))
    # Plain SGD first: the reference every ratio is taken to.
    items = [("sgd", {})] + [x for x in items if x != ("sgd", {})]
  names = [n for n, _ in items]
  unknown = [n for n in names if n != ANCHOR and n not in methods_lib.METHODS]
  if unknown:
    ap.error(f"unknown methods {unknown}; known: {sorted(methods_lib.METHODS)} and {ANCHOR}")
  missing = [n for n in names if n != ANCHOR and n not in methods_lib.available()]
  if missing:
    ap.error(f"methods not in this sam_optax yet: {missing}")
  args.methods = items
  args.perturbation = [x.strip() for x in args.perturbation.split(",")
                       if x.strip()]
  bad = [x for x in args.perturbation if x not in parallel.PERTURBATIONS]
  if bad:
    ap.error(f"--perturbation: unknown {bad}; known {parallel.PERTURBATIONS}")
  if args.devices > jax.device_count():
    ap.error(f"--devices {args.devices}: only {jax.device_count()} visible")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.compile_only:  # the memory subprocess of `peaks_with_flags`
    import pickle  # pylint: disable=g-import-not-at-top

    with open(args.compile_only, "rb") as f:
      plans = pickle.load(f)
    with open(args.json, "w") as f:
      json.dump(compiled_peaks(args, plans), f)
    return
  result = run(args)
  print(to_markdown(result))
  if args.json:
    import os

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
