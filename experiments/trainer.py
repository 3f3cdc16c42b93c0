"""The trainer: one configuration's compiled functions, run for any seed.

What a run does: SGD with momentum (the base optimizer; a full optimizer
such as LightSAM replaces it), a cosine learning-rate schedule with optional
linear warm-up, weight decay added to the method's output gradient
(``add_decayed_weights``), optional label smoothing; the method from the
registry (``experiments/methods.py``) with its published defaults, which the
config's ``method_args`` override.

It runs data-parallel over every device it sees (``experiments/parallel.py``):
one global mesh with the batch sharded over its ``data`` axis, parameters and
optimizer state replicated; the step is per-device (m-sharpness, a
``shard_map``) or global (sharded ``jit``) as ``Config.perturbation`` says.

Planned steps (``Config.planned``, the default; ``--no-planned`` turns them
off): before each step the host asks ``sam_optax.planner`` for the step's
plan and calls the program compiled for that plan, which holds only that
step's work and no ``lax.cond`` (what GPUs need: a conditional there costs a
host round trip every step). A method has a handful of plans, each compiled
once (AOT, on its first step) and reused for every seed.

Data that fits in memory (the digits) lives on the devices. Unplanned, a
whole epoch is one jitted ``lax.scan``. Planned, an epoch cannot be one scan:
a plan is static and may change from one step to the next (LookSAM every k
steps; vSAM's next window and a runtime layer selection are only known once
the previous step has run). It is cut into segments of consecutive steps
with the same plan, each one call of that plan's program, a ``fori_loop``
whose bounds are arguments (one program per plan, whatever the segment's
length); the host finds a segment's end by planning ahead without reading
the device and stops where the next plan needs a read (see
``_same_plan_run``). The epoch's permutation is drawn on the device exactly
as the scan draws it and each step gathers its batch on the device, so the
two modes train on the same batches and give the same results to float
rounding; calls are dispatched asynchronously, the host waiting only where
the planner reads device state (``planner.reads``). TFDS data is streamed
with grain and each step is one jitted call in both modes. Wall-clock times
exclude compilation, which is timed separately (``compile_s``), and
evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import sam_optax
from experiments import checkpoints
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models as models_lib
from experiments import parallel
from experiments import steps as steps_lib
from experiments.config import Config
from experiments.steps import TrainState


def make_schedule(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
  total = cfg.epochs * steps_per_epoch
  warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
  if warmup > 0:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total)
  return optax.cosine_decay_schedule(cfg.lr, total)


def make_optimizer(
    cfg: Config,
    loss_fn: Callable,
    has_aux: bool,
    steps_per_epoch: int,
    axis_name: Optional[str] = None,
    with_sam: bool = False,
):
  """The method from the registry over SGD-momentum with weight decay.

  ``chain(method, add_decayed_weights(wd), sgd(cosine, momentum))``: weight
  decay is added to the method's output gradient, as in the papers' code. A
  full optimizer (LightSAM) gets ``add_decayed_weights`` before it and the
  cosine schedule as its ``learning_rate`` unless its registry entry fixes
  one; one that takes the base optimizer (decoupled WSAM) gets this
  chain, weight decay included, and the schedule. ``axis_name`` goes to
  the method (per-device perturbation).
  ``with_sam``: return ``(optimizer, sam_transform)``, the latter for
  ``sam_optax.planner`` (None for SGD).
  """
  schedule = make_schedule(cfg, steps_per_epoch)
  total = cfg.epochs * steps_per_epoch
  spec = methods_lib.METHODS[cfg.method]
  overrides = dict(cfg.method_args)
  base = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
  )
  if spec.full_optimizer:
    if "learning_rate" not in spec.defaults:
      overrides.setdefault("learning_rate", schedule)
  tx, sam_tx = methods_lib.build(
      cfg.method,
      loss_fn,
      base,
      steps_per_epoch=steps_per_epoch,
      total_steps=total,
      has_aux=has_aux,
      axis_name=axis_name,
      overrides=overrides,
      with_sam=True,
  )
  if spec.full_optimizer and not spec.takes_base and cfg.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
  return (tx, sam_tx) if with_sam else tx


@functools.lru_cache(maxsize=None)
def _jitted_init(model, image_shape: tuple[int, ...], mesh):
  """One compiled initialisation per model and mesh (shared by every
  method): ``seed -> (params, batch_stats)``, replicated."""

  def init(seed):
    return models_lib.init(model, _key(seed), image_shape)

  return jax.jit(init, out_shardings=parallel.replicated(mesh))


@functools.lru_cache(maxsize=None)
def _jitted_eval(model, num_classes: int, has_bn: bool, mesh):
  """One compiled evaluation per model and mesh (shared by every Trainer)."""
  return jax.jit(steps_lib.make_eval_step(model, num_classes, has_bn),
                 out_shardings=parallel.replicated(mesh))


def _key(seed) -> jax.Array:
  """The run's PRNG key: parameters and shuffling. ``rbg`` (XLA's
  RngBitGenerator) because XLA:CPU compiles it several times faster than
  threefry; the methods' own draws use their own keys."""
  return jax.random.key(seed, impl="rbg")


def _cached(factory, *args):
  try:
    return factory(*args)
  except TypeError:  # a model with unhashable fields (lists)
    return factory.__wrapped__(*args)


class Trainer:
  """Builds and compiles a configuration's functions once for every seed.

  ``Trainer(cfg)`` holds the model, the optimizer, the mesh and the jitted
  (and, on first use, AOT-compiled) epoch/step and evaluation functions.
  Runs that differ only in ``seed`` reuse them: :meth:`run` takes the seed,
  and the compiled executables see only new array values (no retracing).
  This is how ``experiments.compare`` trains 3 seeds per method with one
  compile.

  ``devices`` (default: ``jax.devices()``, every device of every process)
  spans the mesh; ``cfg.batch_size`` must be a multiple of their number.
  """

  def __init__(self, cfg: Config, dataset=None, *, devices=None):
    self.cfg = cfg
    self.dataset = dataset if dataset is not None else _load(cfg, cfg.seed)
    ds = self.dataset
    self.in_memory = isinstance(ds, data_lib.ArrayDataset)
    self.mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(cfg.batch_size, self.mesh)
    self.model = models_lib.create(cfg.model, ds.num_classes, **cfg.model_args)
    abstract = jax.eval_shape(
        lambda k: models_lib.init(self.model, k, ds.image_shape),
        jax.random.key(0),
    )
    self.has_bn = bool(jax.tree.leaves(abstract[1]))
    self.steps_per_epoch = ds.num_train // cfg.batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(
          f"batch_size {cfg.batch_size} is larger than the training set "
          f"({ds.num_train})"
      )
    self.total_steps = self.steps_per_epoch * cfg.epochs
    self.forward = steps_lib.make_forward(
        self.model, ds.num_classes, cfg.label_smoothing, self.has_bn
    )
    self.tx, self.sam_tx = make_optimizer(
        cfg,
        steps_lib.method_loss_fn(self.forward, self.has_bn),
        self.has_bn,
        self.steps_per_epoch,
        axis_name=parallel.AXIS if cfg.perturbation == "per-device" else None,
        with_sam=True,
    )
    # Planned steps need a sam_optax transform to plan (SGD has none: it
    # runs as unplanned, which holds no conditional anyway).
    self.planned = bool(cfg.planned and self.sam_tx is not None)
    self.step_fn = self.step_body()
    self.eval_fn = _cached(
        _jitted_eval, self.model, ds.num_classes, self.has_bn, self.mesh
    )
    self._compiled: Optional[Callable] = None
    self._programs: dict = {}  # plan -> compiled planned step
    self._perm_fn = None
    self._step_ids = None  # replicated step numbers 0..spe-1 (planned)
    self.planner = None  # the current run's sam_optax.Planner
    self._planning_compiled = False  # see _train_planned_epoch
    self.compile_s = 0.0
    self.compile_cpu_s = 0.0

  def step_body(self, plan=None) -> Callable:
    """The train step ``(state, batch) -> (state, (loss, correct))`` for
    ``plan`` (None: the ``lax.cond`` path): per device under ``shard_map``
    or global, as ``cfg.perturbation`` says."""
    per_device = self.cfg.perturbation == "per-device"
    axis = parallel.AXIS if per_device else None
    body = steps_lib.make_train_step(
        self.forward, self.tx, self.has_bn, axis_name=axis,
        reduce_grads=self.sam_tx is None, plan=plan,
    )
    if per_device:
      body = jax.shard_map(
          body, mesh=self.mesh, in_specs=(P(), P(parallel.AXIS)),
          out_specs=(P(), P()), check_vma=False,
      )
    return body

  # -- placement ------------------------------------------------------------

  def replicate(self, tree):
    """Host data (the same in every process) -> replicated global arrays."""
    return parallel.host_to_global(tree, parallel.replicated(self.mesh))

  def shard(self, tree):
    """A global batch (the same in every process) -> sharded over ``data``."""
    return parallel.host_to_global(tree, parallel.sharded(self.mesh))

  # -- state ----------------------------------------------------------------

  def init_state(self, seed: int) -> TrainState:
    """Fresh parameters and optimizer state for ``seed``, replicated."""
    init = _cached(_jitted_init, self.model, self.dataset.image_shape,
                   self.mesh)
    params, batch_stats = init(self.replicate(np.uint32(seed)))
    opt_state = jax.jit(
        self.tx.init, out_shardings=parallel.replicated(self.mesh)
    )(params)
    return TrainState(params, batch_stats, opt_state)

  # -- one epoch ------------------------------------------------------------

  def _scan_epoch(self, state, images, labels, seed, epoch):
    perm = self._epoch_permutation(images, seed, epoch)
    batch_sharding = parallel.sharded(self.mesh)

    def body(st, idx):
      batch = {"image": images[idx], "label": labels[idx]}
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
      return self.step_fn(st, batch)

    state, (losses, correct) = jax.lax.scan(body, state, perm)
    return state, jnp.mean(losses), jnp.sum(correct)

  def _epoch_permutation(self, images, seed, epoch):
    """The epoch's batches as rows of indices, drawn as ``_scan_epoch``
    draws them."""
    bs, spe = self.cfg.batch_size, self.steps_per_epoch
    key = jax.random.fold_in(_key(seed), epoch)
    perm = jax.random.permutation(key, images.shape[0])[: spe * bs]
    return perm.reshape(spe, bs)

  def _planned_segment(self, state, images, labels, perm, start, stop, *,
                       plan):
    """Steps ``start..stop-1`` of an in-memory epoch, all with ``plan``: a
    ``fori_loop`` with bounds known only at run time, so one program per
    plan serves segments of every length. Returns (state, loss sum,
    correct count)."""
    step = self.step_body(plan)
    sharding = parallel.sharded(self.mesh)

    def body(i, carry):
      st, loss_sum, correct = carry
      idx = jax.lax.dynamic_index_in_dim(perm, i, keepdims=False)
      batch = {"image": images[idx], "label": labels[idx]}
      batch = jax.lax.with_sharding_constraint(batch, sharding)
      st, (loss, n_correct) = step(st, batch)
      return st, loss_sum + loss, correct + n_correct.astype(jnp.int32)

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    return jax.lax.fori_loop(start, stop, body, (state,) + zero)

  def _planned_stream_step(self, state, batch, *, plan):
    return self.step_body(plan)(state, batch)

  def _program(self, plan, *args):
    """The compiled planned program for ``plan`` (compiled on first use, its
    compile time added to ``compile_s``): (program, seconds, cpu seconds)."""
    prog = self._programs.get(plan)
    if prog is not None:
      return prog, 0.0, 0.0
    t, c = time.perf_counter(), time.process_time()
    fn = (self._planned_segment if self.in_memory
          else self._planned_stream_step)
    prog = jax.jit(
        functools.partial(fn, plan=plan), donate_argnums=0,
        out_shardings=parallel.replicated(self.mesh),
    ).lower(*args).compile()
    self._programs[plan] = prog
    dt, dc = time.perf_counter() - t, time.process_time() - c
    self.compile_s += dt
    self.compile_cpu_s += dc
    return prog, dt, dc

  def _same_plan_run(self, count: int, stop: int, plan, opt_state) -> int:
    """How many steps from ``count`` (planned ``plan``) up to ``stop`` have
    the same plan, as far as the host knows without reading the device.

    ``Planner.peek`` looks ahead with the state before ``count``; plans
    that depend on the count alone are exact, and the look-ahead stops
    where a plan would read device state (vSAM's next window, a layer
    re-selection): that step starts a new segment, planned from the real
    state. The real planner then walks the segment's steps (no reads, so
    the same plans), keeping its memory as a per-step loop would. A step
    whose plan reads the device is preceded by a segment of one step,
    planned from its own state: the planner starts the read then and takes
    it without waiting for that step (:class:`sam_optax.Planner`).
    """
    n = 1
    while count + n < stop:
      ahead = self.planner.peek(count + n, opt_state)
      if ahead is None and n > 1:  # reads: the step before it alone
        n -= 1
        break
      if ahead != plan:
        break  # another plan, or one that reads the device
      n += 1
    for j in range(1, n):
      self.planner(count + j, opt_state)
    return n

  def _planned_epoch(self, state, arrays, seed, epoch, batches, bar):
    """One planned epoch. In memory: runs of steps with the same plan, each
    one call of that plan's ``fori_loop`` program; streamed: one call per
    step. Returns (state, loss sums, correct counts, compile s, compile cpu
    s)."""
    spe = self.steps_per_epoch
    count0 = epoch * spe
    losses, counts, comp, comp_cpu = [], [], 0.0, 0.0
    if self.in_memory:
      images, labels = arrays
      seed_arr, epoch_arr = self.replicate((np.uint32(seed), np.uint32(epoch)))
      perm = self._perm_fn(images, seed_arr, epoch_arr)
      i = 0
      while i < spe:
        plan = self.planner(count0 + i, state.opt_state)
        n = self._same_plan_run(count0 + i, count0 + spe, plan,
                                state.opt_state)
        args = (images, labels, perm, self._step_ids[i],
                self._step_ids[i + n])
        prog, dt, dc = self._program(plan, state, *args)
        comp, comp_cpu = comp + dt, comp_cpu + dc
        state, loss_sum, n_correct = prog(state, *args)
        losses.append(loss_sum)
        counts.append(n_correct)
        i += n
      return state, losses, counts, comp, comp_cpu
    for i, batch in enumerate(batches):
      if i >= spe:
        break
      batch = self.shard(batch)
      plan = self.planner(count0 + i, state.opt_state)
      prog, dt, dc = self._program(plan, state, batch)
      comp, comp_cpu = comp + dt, comp_cpu + dc
      state, (loss, n_correct) = prog(state, batch)
      losses.append(loss)
      counts.append(n_correct)
      if bar is not None:
        bar.update(1)
    return state, losses, counts, comp, comp_cpu

  def _compile(self, *args):
    t, c = time.perf_counter(), time.process_time()
    fn = self._scan_epoch if self.in_memory else self.step_fn
    self._compiled = jax.jit(
        fn, donate_argnums=0, out_shardings=parallel.replicated(self.mesh)
    ).lower(*args).compile()
    self.compile_s = time.perf_counter() - t
    self.compile_cpu_s = time.process_time() - c

  def train_epoch(self, state, epoch: int, seed: int, arrays=None,
                  progress: bool = False, dataset=None):
    """One epoch; returns (state, metrics) with the epoch's wall time.

    ``arrays``: the in-memory training set as replicated global arrays;
    ``dataset``: the streamed dataset to read (default: ``self.dataset``).
    """
    cfg = self.cfg
    n_images = self.steps_per_epoch * cfg.batch_size
    if self.planned:
      return self._train_planned_epoch(state, epoch, seed, arrays, progress,
                                       dataset)
    if self.in_memory:
      images, labels = arrays
      seed_arr, epoch_arr = self.replicate((np.uint32(seed), np.uint32(epoch)))
      if self._compiled is None:
        self._compile(state, images, labels, seed_arr, epoch_arr)
      t0, cpu0 = time.perf_counter(), time.process_time()
      state, loss, correct = self._compiled(
          state, images, labels, seed_arr, epoch_arr
      )
      loss, correct = float(loss), int(correct)  # blocks until done
      return state, _epoch_metrics(
          loss, correct, n_images, time.perf_counter() - t0,
          time.process_time() - cpu0,
      )
    batches = self._train_batches(epoch, seed, dataset)
    # Wall time of the whole epoch, input pipeline included (steps are
    # dispatched asynchronously), less the compilation on the first batch.
    losses, counts, compile_s, compile_cpu_s = [], [], 0.0, 0.0
    bar = _progress(self.steps_per_epoch, f"epoch {epoch + 1}", progress)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i, batch in enumerate(batches):
      if i >= self.steps_per_epoch:
        break
      batch = self.shard(batch)
      if self._compiled is None:
        self._compile(state, batch)
        compile_s, compile_cpu_s = self.compile_s, self.compile_cpu_s
      state, (loss, n_correct) = self._compiled(state, batch)
      losses.append(loss)
      counts.append(n_correct)
      if bar is not None:
        bar.update(1)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0 - compile_s
    cpu = time.process_time() - cpu0 - compile_cpu_s
    if bar is not None:
      bar.close()
    return state, _epoch_metrics(
        float(np.mean([float(x) for x in losses])),
        sum(int(x) for x in counts), n_images, elapsed, cpu,
    )

  def _train_batches(self, epoch: int, seed: int, dataset=None):
    """The streamed training batches of ``epoch`` (augmented if asked) from
    ``dataset`` (default: ``self.dataset``)."""
    cfg = self.cfg
    augment = (
        data_lib.Augment(cfg.padding, True, cfg.cutout) if cfg.augment else None
    )
    dataset = self.dataset if dataset is None else dataset
    return dataset.batches(
        "train", cfg.batch_size, epoch=epoch, seed=seed, augment=augment,
        workers=cfg.workers,
    )

  def _train_planned_epoch(self, state, epoch, seed, arrays, progress,
                           dataset):
    cfg = self.cfg
    n_images = self.steps_per_epoch * cfg.batch_size
    if self.planner is None:
      self.planner = sam_optax.planner(self.sam_tx)
    batches = (None if self.in_memory
               else self._train_batches(epoch, seed, dataset))
    bar = _progress(self.steps_per_epoch, f"epoch {epoch + 1}",
                    progress and not self.in_memory)
    if self.in_memory and self._perm_fn is None:  # compiled, not timed
      t, c = time.perf_counter(), time.process_time()
      images = arrays[0]
      self._step_ids = [self.replicate(np.int32(i))
                        for i in range(self.steps_per_epoch + 1)]
      self._perm_fn = jax.jit(
          self._epoch_permutation,
          out_shardings=parallel.replicated(self.mesh),
      ).lower(images, *self.replicate((np.uint32(0), np.uint32(0)))).compile()
      self.compile_s += time.perf_counter() - t
      self.compile_cpu_s += time.process_time() - c
    if not self._planning_compiled:  # compiled, not timed
      # What planning compiles (a radius schedule's evaluator, once per
      # schedule: sam_optax.planner), by a look-ahead that changes nothing.
      t, c = time.perf_counter(), time.process_time()
      self.planner.peek(epoch * self.steps_per_epoch, state.opt_state)
      self._planning_compiled = True
      self.compile_s += time.perf_counter() - t
      self.compile_cpu_s += time.process_time() - c
    # Wall time of the whole epoch (planning, and for streamed data the input
    # pipeline, included), less the compilations of new plans.
    t0, cpu0 = time.perf_counter(), time.process_time()
    state, losses, counts, comp, comp_cpu = self._planned_epoch(
        state, arrays, seed, epoch, batches, bar)
    loss = float(np.sum(np.asarray(jax.device_get(losses), np.float64))
                 / self.steps_per_epoch)
    correct = int(sum(int(x) for x in jax.device_get(counts)))
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0 - comp
    cpu = time.process_time() - cpu0 - comp_cpu
    if bar is not None:
      bar.close()
    metrics = _epoch_metrics(loss, correct, n_images, elapsed, cpu)
    return state, dict(metrics, planner_reads=self.planner.reads)

  def evaluate(self, state: TrainState, test_arrays=None) -> dict:
    """Test loss and accuracy (padding the last batch to a fixed shape).

    ``test_arrays``: the in-memory test set as host arrays.
    """
    n_dev = self.mesh.size
    bs = -(-max(self.cfg.batch_size, 256) // n_dev) * n_dev
    if self.in_memory:
      images, labels = test_arrays
      chunks = (
          (images[i : i + bs], labels[i : i + bs])
          for i in range(0, images.shape[0], bs)
      )
    else:
      chunks = (
          (b["image"], b["label"])
          for b in self.dataset.batches("test", bs, workers=self.cfg.workers)
      )
    total_loss, total_correct, n = 0.0, 0.0, 0
    for x, y in chunks:
      x, y = np.asarray(x), np.asarray(y)
      k = x.shape[0]
      w = np.zeros((bs,), np.float32)
      w[:k] = 1.0
      if k < bs:
        x = np.concatenate([x, np.zeros((bs - k,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros((bs - k,), y.dtype)])
      x, y, w = self.shard((x, y, w))
      loss, correct = self.eval_fn(state.params, state.batch_stats, x, y, w)
      total_loss += float(loss)
      total_correct += float(correct)
      n += k
    return {"test_loss": total_loss / n, "test_acc": total_correct / n}

  # -- a whole run ----------------------------------------------------------

  def _settings(self, seed: int) -> dict:
    """What a run's trajectory depends on, as stored in its checkpoints:
    the config with ``seed`` and the label noise it resolves to."""
    cfg = self.cfg
    return checkpoints.to_json(dict(cfg.to_dict(), seed=seed,
                                    label_noise=cfg.noise))

  @staticmethod
  def _open_out(out: str, resume: bool):
    """The checkpoint manager of ``out/checkpoints`` after checking that
    ``resume`` fits what ``out`` holds (:class:`checkpoints.ResumeError`)."""
    ckpt = os.path.join(out, "checkpoints")
    results = os.path.join(out, "results.json")
    if os.path.exists(out) and not os.path.isdir(out):
      raise checkpoints.ResumeError(
          f"--out {out} is a file, not a directory: choose another --out")
    if resume and not os.path.isdir(ckpt):
      raise checkpoints.ResumeError(
          f"--resume: nothing to resume in {out} (no directory {ckpt}): "
          "check --out, or run without --resume to start a new run there"
      )
    os.makedirs(out, exist_ok=True)
    manager = checkpoints.checkpoint_manager(ckpt)
    steps = sorted(manager.all_steps())
    if resume and not steps:
      manager.close()
      raise checkpoints.ResumeError(
          f"--resume: nothing to resume in {out} ({ckpt} holds no "
          "checkpoint): check --out, or run without --resume to start a "
          "new run there"
      )
    if not resume and (steps or os.path.exists(results)):
      manager.close()
      held = (f"checkpoints of epochs {steps} in {ckpt}" if steps
              else results)
      raise checkpoints.ResumeError(
          f"{out} holds a run already ({held}): pass --resume to continue "
          "it, or delete the directory, or choose another --out"
      )
    return manager

  def run(
      self,
      seed: Optional[int] = None,
      *,
      out: Optional[str] = None,
      resume: bool = False,
      log: Optional[Callable[[str], None]] = print,
      progress: bool = True,
      checkpoint_every: int = 1,
      eval_every: int = 1,
  ) -> dict:
    """Trains ``cfg.epochs`` epochs for ``seed``; returns the results dict.

    With ``out`` the results go to ``out/results.json`` (rewritten every
    epoch, by process 0) and checkpoints to ``out/checkpoints`` every
    ``checkpoint_every`` epochs (by every process); each checkpoint holds
    the run's record too (settings, history, planner reads). A fresh run
    refuses an ``out`` that holds a run already; ``resume=True`` continues
    from the latest checkpoint there, and refuses when there is none or
    when the run was trained under other settings (every ``Config`` field
    but ``config.RESUME_MAY_CHANGE``, and the device count under per-device
    perturbation): :class:`checkpoints.ResumeError`, before any training.
    An unreadable checkpoint raises :class:`checkpoints.CheckpointError`.
    ``eval_every`` and ``checkpoint_every`` (epochs, >= 1; the last epoch
    is always evaluated and saved) may differ between a run and its resume.
    Only process 0 logs. The checkpoint manager is closed on every way
    out (an error or an interrupt included), before the caller's handler
    runs.
    """
    with contextlib.ExitStack() as closing:
      return self._run(seed, out, resume, log, progress, checkpoint_every,
                       eval_every, closing)

  def _run(self, seed, out, resume, log, progress, checkpoint_every,
           eval_every, closing: contextlib.ExitStack) -> dict:
    """:meth:`run`; ``closing`` closes what it opens."""
    cfg = self.cfg
    seed = cfg.seed if seed is None else seed
    for name, value in (("seed", seed), ("eval_every", eval_every),
                        ("checkpoint_every", checkpoint_every)):
      config_lib.check_range(name, value)
    lead = jax.process_index() == 0
    log = log if lead else None
    progress = progress and lead
    settings = self._settings(seed)
    history: list[dict] = []
    start, record, manager = 0, None, None
    if out is not None:
      manager = self._open_out(out, resume)
      closing.callback(manager.close)
      if resume:
        start = int(manager.latest_step())
        record = checkpoints.load_record(manager, start)
        _check_resumable(out, record, settings, self.mesh.size)
        history = record.get("history", [])[:start]

    ds = self.dataset
    if seed != ds.seed and (cfg.noise > 0 or not self.in_memory):
      ds = ds.with_seed(seed)  # the noisy labels depend on the seed
    arrays = test_arrays = None
    if self.in_memory:
      arrays = self.replicate((ds.train_images, ds.train_labels))
      test_arrays = (ds.test_images, ds.test_labels)
    state = self.init_state(seed)
    # A fresh planner per run: it remembers what it read of this run's state.
    self.planner = sam_optax.planner(self.sam_tx) if self.planned else None
    if record is not None:
      state = checkpoints.restore(manager, start, state)
      if self.planner is not None:  # reads counted over the whole run
        self.planner.reads = int(record.get("planner_reads") or 0)
      if log:
        log(f"resumed from {out}/checkpoints at epoch {start}"
            + (" (the run is complete)" if start >= cfg.epochs else ""))

    result = {
        "config": dict(cfg.to_dict(), seed=seed),
        "num_params": models_lib.num_params(state.params),
        "steps_per_epoch": self.steps_per_epoch,
        "devices": self.mesh.size,
        "processes": jax.process_count(),
        # Whether steps really ran planned (SGD has nothing to plan).
        "planned": self.planned,
        "history": history,
    }
    if history:  # a resumed run: its summary so far (all of it if complete)
      result.update(_summary(history, self, state))
    bar = _progress(cfg.epochs, cfg.method, progress and self.in_memory)
    if bar is not None:
      bar.update(start)
    for epoch in range(start, cfg.epochs):
      state, metrics = self.train_epoch(
          state, epoch, seed, arrays, progress=progress, dataset=ds
      )
      last = epoch + 1 == cfg.epochs
      if last or (epoch + 1) % eval_every == 0:
        metrics.update(self.evaluate(state, test_arrays))
      evals = steps_lib.grad_evals(state.opt_state)
      steps = (epoch + 1) * self.steps_per_epoch
      metrics.update(
          epoch=epoch + 1,
          steps=steps,
          grad_evals=evals,
          grads_per_step=1.0 + evals / steps,
          devices=self.mesh.size,
      )
      history.append(metrics)
      if log and bar is not None:
        bar.write(format_metrics(metrics, cfg.epochs))  # above the bar
      elif log:
        log(format_metrics(metrics, cfg.epochs))
      if bar is not None:
        bar.set_postfix(test=f"{metrics.get('test_acc', float('nan')):.3f}")
        bar.update(1)
      result.update(_summary(history, self, state))
      if manager is not None and (last or (epoch + 1) % checkpoint_every == 0):
        checkpoints.save(manager, epoch + 1, state, {
            "config": settings,
            "devices": self.mesh.size,
            "history": history,
            "planner_reads": result["planner_reads"],
        })
      if out is not None and lead:
        checkpoints.write_json(os.path.join(out, "results.json"), result)
    if bar is not None:
      bar.close()
    if manager is not None:
      manager.wait_until_finished()
    result["state"] = state
    return result


def _check_resumable(out: str, record: dict, settings: dict,
                     devices: int) -> None:
  """Raises :class:`checkpoints.ResumeError` listing every setting under
  which the run in ``out`` (its checkpoint ``record``) was trained
  differently from ``settings`` (``Trainer._settings``) on ``devices``."""
  stored = record["config"]
  diffs = [
      f"{k}={stored.get(k)!r} (this command: {settings.get(k)!r})"
      for k in sorted(set(stored) | set(settings))
      if k not in config_lib.RESUME_MAY_CHANGE
      and stored.get(k) != settings.get(k)
  ]
  if (settings.get("perturbation") == "per-device"
      and record.get("devices") != devices):
    diffs.append(
        f"the device count {record.get('devices')} (now {devices}; under "
        "per-device perturbation it sets the batch each device perturbs "
        "with)"
    )
  if diffs:
    raise checkpoints.ResumeError(
        f"--resume: the run in {out} was trained with " + "; ".join(diffs)
        + ". Resuming would continue it under other settings: resume with "
        "its settings, or train anew with another --out. (May change on "
        f"resume: {', '.join(config_lib.RESUME_MAY_CHANGE)}, --eval-every, "
        "--checkpoint-every, and the device count under --perturbation "
        "global.)"
    )


def _epoch_metrics(loss: float, correct: int, n_images: int, elapsed: float,
                   cpu: float) -> dict:
  """One epoch's log entry (times exclude compilation)."""
  return {
      "train_loss": loss,
      "train_acc": correct / n_images,
      "epoch_s": elapsed,
      "epoch_cpu_s": cpu,
      "images_per_s": n_images / elapsed,
  }


def _summary(history: list[dict], trainer: Trainer, state: TrainState) -> dict:
  last = history[-1]
  return {
      "final_test_acc": last.get("test_acc"),
      "final_test_loss": last.get("test_loss"),
      "final_train_acc": last["train_acc"],
      "train_s": float(sum(h["epoch_s"] for h in history)),
      "train_cpu_s": float(sum(h.get("epoch_cpu_s", 0.0) for h in history)),
      "compile_s": trainer.compile_s,
      "compile_cpu_s": trainer.compile_cpu_s,
      "steps": last["steps"],
      "grad_evals": last["grad_evals"],
      "second_grads_per_step": last["grad_evals"] / last["steps"],
      "grads_per_step": last["grads_per_step"],
      "method_stats": steps_lib.scalar_stats(state.opt_state),
      "planner_reads": last.get("planner_reads"),
  }


def _load(cfg: Config, seed: int):
  return data_lib.load(
      cfg.dataset,
      label_noise=cfg.noise,
      seed=seed,
      data_dir=cfg.data_dir,
      image_size=cfg.image_size,
      train_size=cfg.train_size,
  )


def format_metrics(m: dict, epochs: int) -> str:
  """One epoch's log line."""
  test = (
      f"  test loss {m['test_loss']:.4f} acc {100 * m['test_acc']:.2f}%"
      if "test_acc" in m else ""
  )
  return (
      f"epoch {m['epoch']:3d}/{epochs}  loss {m['train_loss']:.4f}  "
      f"acc {100 * m['train_acc']:.2f}%{test}  "
      f"{m['images_per_s']:.0f} img/s  grad_evals {m['grad_evals']} "
      f"({m['grads_per_step']:.2f}/step)  {m['epoch_s']:.2f}s"
  )


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
