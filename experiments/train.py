"""Train one model with one method: ``python -m experiments.train``.

Example (the embedded default: the digits, 30% label noise, a small CNN)::

    python -m experiments.train --method sam --rho 0.1 --out /tmp/run

A paper setting on a machine that has CIFAR-10 prepared for TFDS::

    python -m experiments.train --dataset cifar10 --model resnet18 \\
        --method sam --rho 0.05 --epochs 200 --batch-size 128 --lr 0.1 \\
        --weight-decay 5e-4 --out runs/c10_r18_sam

What a run does: SGD with momentum (the base optimizer; a full optimizer such
as LightSAM replaces it), a cosine learning-rate schedule with optional
linear warm-up, decoupled-from-the-loss weight decay (``add_decayed_weights``
on the method's output gradient), optional label smoothing; the method from
the registry (``experiments/methods.py``) with its published defaults, which
``--rho`` and ``--method-arg key=value`` override. It logs per epoch the
training loss and accuracy (on the labels it trains on, noisy ones
included), the test loss and accuracy, images/s and the gradient
evaluations so far (1 per step for the clean gradient plus the method's own,
read with ``sam_optax.stats``); it writes ``OUT/results.json`` after every
epoch and orbax checkpoints under ``OUT/checkpoints`` (``--resume`` continues
from the latest one, bit-exact at epoch boundaries).

Data that fits in memory (the digits) lives on the device and a whole epoch
is one jitted ``lax.scan``; TFDS data is streamed with grain and each step is
one jitted call. Wall-clock times exclude compilation, which is timed
separately (``compile_s``), and evaluation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models as models_lib

PyTree = Any


@dataclasses.dataclass
class Config:
  """Everything that defines a run (what ``results.json`` records).

  Attributes:
    dataset: ``digits`` or a TFDS name of ``data.TFDS_DATASETS``.
    model: a name of ``models.MODELS`` (None: ``digits_cnn`` on the digits,
      ``resnet18`` elsewhere).
    method: a name of ``methods.METHODS``.
    method_args: keyword arguments overriding the method's defaults.
    epochs, batch_size: run length and batch size.
    lr: peak learning rate (cosine decay to 0 over the run).
    warmup_epochs: linear warm-up from 0 (0: none).
    momentum, nesterov: SGD's.
    weight_decay: added to the method's gradient (``add_decayed_weights``).
    label_smoothing: in [0, 1).
    label_noise: share of training labels flipped (None: 0.3 on the digits,
      0 elsewhere).
    seed: parameters, shuffling, label noise and the method's own draws.
    augment: crop/flip for TFDS data (the digits are not augmented: flips
      and crops do not preserve digits' meaning at 8x8).
    padding, cutout: crop padding and cutout size for TFDS data.
    image_size: model input size for TFDS data (None: the dataset's).
    data_dir: TFDS data directory (None: TFDS's default).
    workers: grain worker processes (0: threads only).
    model_args: keyword arguments of the model constructor.
  """

  dataset: str = "digits"
  model: Optional[str] = None
  method: str = "sgd"
  method_args: dict = dataclasses.field(default_factory=dict)
  epochs: int = 60
  batch_size: int = 64
  lr: float = 0.05
  warmup_epochs: int = 0
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  label_smoothing: float = 0.0
  label_noise: Optional[float] = None
  seed: int = 0
  augment: bool = True
  padding: int = 4
  cutout: int = 0
  image_size: Optional[int] = None
  data_dir: Optional[str] = None
  workers: int = 0
  model_args: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.model is None:
      self.model = "digits_cnn" if self.dataset == "digits" else "resnet18"
    if self.dataset not in data_lib.DATASETS:
      raise ValueError(
          f"dataset must be one of {list(data_lib.DATASETS)}, got "
          f"{self.dataset!r}"
      )
    if self.model not in models_lib.MODELS:
      raise ValueError(
          f"model must be one of {sorted(models_lib.MODELS)}, got "
          f"{self.model!r}"
      )
    if self.method not in methods_lib.METHODS:
      raise ValueError(
          f"method must be one of {sorted(methods_lib.METHODS)}, got "
          f"{self.method!r}"
      )
    if self.method not in methods_lib.available():
      raise ValueError(
          f"method {self.method!r} is not in this sam_optax yet; available: "
          f"{methods_lib.available()}"
      )
    for name in ("epochs", "batch_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(
          f"label_smoothing must be in [0, 1), got {self.label_smoothing}"
      )
    if self.label_noise is not None and not 0.0 <= self.label_noise <= 1.0:
      raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
    if self.lr <= 0:
      raise ValueError(f"lr must be in (0, inf), got {self.lr}")
    if self.weight_decay < 0:
      raise ValueError(
          f"weight_decay must be in [0, inf), got {self.weight_decay}"
      )

  @property
  def noise(self) -> float:
    if self.label_noise is not None:
      return float(self.label_noise)
    return 0.3 if self.dataset == "digits" else 0.0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class TrainState(NamedTuple):
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


# --------------------------------------------------------------------------
# Loss, optimizer, steps.
# --------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float
) -> jax.Array:
  """Mean softmax cross-entropy against ``(1 - s) * onehot + s / K``."""
  targets = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def make_forward(model, num_classes: int, smoothing: float, has_bn: bool):
  """``forward(params, batch) -> (loss, (logits, new_batch_stats))``.

  With BatchNorm ``batch["batch_stats"]`` holds the running statistics and
  the model runs in training mode (batch statistics), returning the updated
  running statistics; without, ``new_batch_stats`` is ``{}``.
  """

  def forward(params, batch):
    if has_bn:
      logits, mutated = model.apply(
          {"params": params, "batch_stats": batch["batch_stats"]},
          batch["image"],
          train=True,
          mutable=["batch_stats"],
      )
      new_stats = mutated["batch_stats"]
    else:
      logits = model.apply({"params": params}, batch["image"], train=True)
      new_stats = {}
    loss = cross_entropy(logits, batch["label"], num_classes, smoothing)
    return loss, (logits, new_stats)

  return forward


def method_loss_fn(forward: Callable, has_bn: bool) -> Callable:
  """The ``loss_fn(params, batch)`` given to the method.

  BatchNorm models: ``(loss, new_batch_stats)`` (``has_aux=True``); the
  method discards the aux of its perturbed evaluations, and the statistics
  kept are those of the clean pass in :func:`make_train_step`.
  """
  if has_bn:

    def loss_fn(params, batch):
      loss, (_, new_stats) = forward(params, batch)
      return loss, new_stats

    return loss_fn
  return lambda params, batch: forward(params, batch)[0]


def make_schedule(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
  total = cfg.epochs * steps_per_epoch
  warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
  if warmup > 0:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total)
  return optax.cosine_decay_schedule(cfg.lr, total)


def make_optimizer(
    cfg: Config, loss_fn: Callable, has_aux: bool, steps_per_epoch: int
) -> optax.GradientTransformationExtraArgs:
  """The method from the registry over SGD-momentum with weight decay.

  ``chain(method, add_decayed_weights(wd), sgd(cosine, momentum))``: weight
  decay is added to the method's output gradient, as in the papers' code. A
  full optimizer (LightSAM) gets ``add_decayed_weights`` before it and the
  cosine schedule as its ``learning_rate`` unless its registry entry fixes
  one.
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
  tx = methods_lib.build(
      cfg.method,
      loss_fn,
      base,
      steps_per_epoch=steps_per_epoch,
      total_steps=total,
      has_aux=has_aux,
      overrides=overrides,
  )
  if spec.full_optimizer and cfg.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), tx)
  return tx


def make_train_step(forward: Callable, tx, has_bn: bool):
  """``step(state, batch) -> (state, (loss, correct))`` for one batch.

  The clean pass gives the loss, the accuracy, the gradient the method
  receives and the new BatchNorm statistics.
  """

  def step(state: TrainState, batch: dict):
    b = dict(batch, batch_stats=state.batch_stats) if has_bn else batch
    (loss, (logits, new_stats)), grads = jax.value_and_grad(
        forward, has_aux=True
    )(state.params, b)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, batch=b)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    new_state = TrainState(
        params, new_stats if has_bn else state.batch_stats, opt_state
    )
    return new_state, (loss, correct)

  return step


def make_eval_step(model, num_classes: int, has_bn: bool):
  """``eval(params, batch_stats, images, labels, weights) -> (loss, correct)``
  sums over the batch (``weights`` masks padding)."""

  def evaluate(params, batch_stats, images, labels, weights):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = batch_stats
    logits = model.apply(variables, images, train=False)
    losses = optax.softmax_cross_entropy(
        logits, jax.nn.one_hot(labels, num_classes)
    )
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights)

  return evaluate


@functools.lru_cache(maxsize=None)
def _jitted_init(model, image_shape: tuple[int, ...]):
  """One compiled initialisation per model (shared by every method)."""
  return jax.jit(functools.partial(models_lib.init, model,
                                   image_shape=image_shape))


@functools.lru_cache(maxsize=None)
def _jitted_eval(model, num_classes: int, has_bn: bool):
  """One compiled evaluation per model (shared by every method's Trainer)."""
  return jax.jit(make_eval_step(model, num_classes, has_bn))


def grad_evals(opt_state: PyTree) -> int:
  """Gradient evaluations the method made (sum over its sam_optax states)."""
  st = sam_optax.stats(opt_state)
  return int(sum(int(np.asarray(v)) for k, v in st.items()
                 if k.endswith("grad_evals")))


def scalar_stats(opt_state: PyTree) -> dict[str, float]:
  out = {}
  for k, v in sam_optax.stats(opt_state).items():
    a = np.asarray(v)
    if a.size == 1 and np.issubdtype(a.dtype, np.number):
      out[k] = float(a.reshape(()))
  return out


# --------------------------------------------------------------------------
# The trainer: compiled functions for one configuration (any seed).
# --------------------------------------------------------------------------


class Trainer:
  """Builds and compiles a configuration's functions once for every seed.

  ``Trainer(cfg)`` holds the model, the optimizer and the jitted (and, on
  first use, AOT-compiled) epoch/step and evaluation functions. Runs that
  differ only in ``seed`` reuse them: :meth:`run` takes the seed, and the
  compiled executables see only new array values (no retracing). This is
  how ``experiments.compare`` trains 3 seeds per method with one compile.
  """

  def __init__(self, cfg: Config, dataset=None):
    self.cfg = cfg
    self.dataset = dataset if dataset is not None else _load(cfg, cfg.seed)
    ds = self.dataset
    self.in_memory = isinstance(ds, data_lib.ArrayDataset)
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
    self.forward = make_forward(
        self.model, ds.num_classes, cfg.label_smoothing, self.has_bn
    )
    self.tx = make_optimizer(
        cfg,
        method_loss_fn(self.forward, self.has_bn),
        self.has_bn,
        self.steps_per_epoch,
    )
    self.step_fn = make_train_step(self.forward, self.tx, self.has_bn)
    try:
      self.eval_fn = _jitted_eval(self.model, ds.num_classes, self.has_bn)
    except TypeError:  # a model with unhashable fields (lists)
      self.eval_fn = jax.jit(
          make_eval_step(self.model, ds.num_classes, self.has_bn)
      )
    self._compiled: Optional[Callable] = None
    self.compile_s = 0.0
    self.compile_cpu_s = 0.0

  # -- state ----------------------------------------------------------------

  def init_state(self, seed: int) -> TrainState:
    """Fresh parameters and optimizer state for ``seed`` (one compile)."""
    try:
      init = _jitted_init(self.model, self.dataset.image_shape)
    except TypeError:  # a model with unhashable fields (lists)
      init = jax.jit(functools.partial(
          models_lib.init, self.model, image_shape=self.dataset.image_shape
      ))
    params, batch_stats = init(_key(seed))
    return TrainState(params, batch_stats, self.tx.init(params))

  # -- one epoch ------------------------------------------------------------

  def _scan_epoch(self, state, images, labels, key):
    bs, spe = self.cfg.batch_size, self.steps_per_epoch
    perm = jax.random.permutation(key, images.shape[0])[: spe * bs]
    perm = perm.reshape(spe, bs)

    def body(st, idx):
      return self.step_fn(st, {"image": images[idx], "label": labels[idx]})

    state, (losses, correct) = jax.lax.scan(body, state, perm)
    return state, jnp.mean(losses), jnp.sum(correct)

  def _compile(self, *args):
    t, c = time.perf_counter(), time.process_time()
    fn = self._scan_epoch if self.in_memory else self.step_fn
    self._compiled = jax.jit(fn, donate_argnums=0).lower(*args).compile()
    self.compile_s = time.perf_counter() - t
    self.compile_cpu_s = time.process_time() - c

  def train_epoch(self, state, epoch: int, seed: int, arrays=None,
                  progress: bool = False):
    """One epoch; returns (state, metrics) with the epoch's wall time."""
    cfg = self.cfg
    n_images = self.steps_per_epoch * cfg.batch_size
    if self.in_memory:
      images, labels = arrays
      key = jax.random.fold_in(_key(seed), epoch)
      if self._compiled is None:
        self._compile(state, images, labels, key)
      t, c = time.perf_counter(), time.process_time()
      state, loss, correct = self._compiled(state, images, labels, key)
      loss, correct = float(loss), int(correct)  # blocks until done
      elapsed = time.perf_counter() - t
      return state, {
          "train_loss": loss,
          "train_acc": correct / n_images,
          "epoch_s": elapsed,
          "epoch_cpu_s": time.process_time() - c,
          "images_per_s": n_images / elapsed,
      }
    augment = (
        data_lib.Augment(cfg.padding, True, cfg.cutout) if cfg.augment else None
    )
    batches = self.dataset.batches(
        "train", cfg.batch_size, epoch=epoch, seed=seed, augment=augment,
        workers=cfg.workers,
    )
    # Wall time of the whole epoch, input pipeline included (steps are
    # dispatched asynchronously), less the compilation on the first batch.
    losses, correct, compile_s = [], 0, 0.0
    bar = _progress(self.steps_per_epoch, f"epoch {epoch + 1}", progress)
    t, c = time.perf_counter(), time.process_time()
    for i, batch in enumerate(batches):
      if i >= self.steps_per_epoch:
        break
      batch = jax.device_put(batch)
      if self._compiled is None:
        self._compile(state, batch)
        compile_s = self.compile_s
      state, (loss, c) = self._compiled(state, batch)
      losses.append(loss)
      correct += c
      if bar is not None:
        bar.update(1)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t - compile_s
    cpu = time.process_time() - c - self.compile_cpu_s * (compile_s > 0)
    if bar is not None:
      bar.close()
    return state, {
        "train_loss": float(jnp.mean(jnp.stack(losses))),
        "train_acc": int(correct) / n_images,
        "epoch_s": elapsed,
        "epoch_cpu_s": cpu,
        "images_per_s": n_images / elapsed,
    }

  def evaluate(self, state: TrainState, test_arrays=None) -> dict:
    """Test loss and accuracy (padding the last batch to a fixed shape)."""
    bs = max(self.cfg.batch_size, 256)
    if self.in_memory:
      images, labels = test_arrays
      chunks = [
          (images[i : i + bs], labels[i : i + bs])
          for i in range(0, images.shape[0], bs)
      ]
    else:
      chunks = (
          (b["image"], b["label"])
          for b in self.dataset.batches("test", bs, workers=self.cfg.workers)
      )
    total_loss, total_correct, n = 0.0, 0.0, 0
    for x, y in chunks:
      k = x.shape[0]
      w = np.zeros((bs,), np.float32)
      w[:k] = 1.0
      if k < bs:
        x = jnp.concatenate([x, jnp.zeros((bs - k,) + x.shape[1:], x.dtype)])
        y = jnp.concatenate([y, jnp.zeros((bs - k,), y.dtype)])
      loss, correct = self.eval_fn(state.params, state.batch_stats, x, y, w)
      total_loss += float(loss)
      total_correct += float(correct)
      n += k
    return {"test_loss": total_loss / n, "test_acc": total_correct / n}

  # -- a whole run ----------------------------------------------------------

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
    epoch) and checkpoints to ``out/checkpoints`` every ``checkpoint_every``
    epochs; ``resume=True`` restarts from the latest checkpoint there.
    """
    cfg = self.cfg
    seed = cfg.seed if seed is None else seed
    ds = self.dataset
    if self.in_memory and seed != cfg.seed and cfg.noise > 0:
      ds = _load(cfg, seed)  # the noisy labels depend on the seed
    arrays = test_arrays = None
    if self.in_memory:
      arrays = (jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels))
      test_arrays = (jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels))
    elif seed != ds.seed:
      ds.seed, ds._noisy = seed, None  # pylint: disable=protected-access

    state = self.init_state(seed)
    history: list[dict] = []
    start = 0
    manager = None
    if out is not None:
      os.makedirs(out, exist_ok=True)
      manager = _checkpoint_manager(os.path.join(out, "checkpoints"))
      if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        state = _restore(manager, start, state)
        history = _load_history(out)[:start]
        if log:
          log(f"resumed from {out}/checkpoints at epoch {start}")

    result = {
        "config": dict(cfg.to_dict(), seed=seed),
        "num_params": models_lib.num_params(state.params),
        "steps_per_epoch": self.steps_per_epoch,
        "history": history,
    }
    bar = _progress(cfg.epochs, cfg.method, progress and self.in_memory)
    if bar is not None:
      bar.update(start)
    for epoch in range(start, cfg.epochs):
      state, metrics = self.train_epoch(
          state, epoch, seed, arrays, progress=progress
      )
      last = epoch + 1 == cfg.epochs
      if last or (epoch + 1) % eval_every == 0:
        metrics.update(self.evaluate(state, test_arrays))
      evals = grad_evals(state.opt_state)
      steps = (epoch + 1) * self.steps_per_epoch
      metrics.update(
          epoch=epoch + 1,
          steps=steps,
          grad_evals=evals,
          grads_per_step=1.0 + evals / steps,
      )
      history.append(metrics)
      if log and bar is not None:
        bar.write(_format(metrics, cfg.epochs))  # above the progress bar
      elif log:
        log(_format(metrics, cfg.epochs))
      if bar is not None:
        bar.set_postfix(test=f"{metrics.get('test_acc', float('nan')):.3f}")
        bar.update(1)
      if manager is not None and (last or (epoch + 1) % checkpoint_every == 0):
        _save(manager, epoch + 1, state)
      result.update(_summary(history, self, state))
      if out is not None:
        _write_json(os.path.join(out, "results.json"), result)
    if bar is not None:
      bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
    result["state"] = state
    return result


def _key(seed: int) -> jax.Array:
  """The run's PRNG key: parameters and shuffling. ``rbg`` (XLA's
  RngBitGenerator) because XLA:CPU compiles it several times faster than
  threefry; the methods' own draws use their own keys."""
  return jax.random.key(seed, impl="rbg")


def _summary(history: list[dict], trainer: Trainer, state: TrainState) -> dict:
  last = history[-1]
  return {
      "final_test_acc": last.get("test_acc"),
      "final_test_loss": last.get("test_loss"),
      "final_train_acc": last["train_acc"],
      "train_s": float(sum(h["epoch_s"] for h in history)),
      "train_cpu_s": float(sum(h.get("epoch_cpu_s", 0.0) for h in history)),
      "compile_s": trainer.compile_s,
      "steps": last["steps"],
      "grad_evals": last["grad_evals"],
      "second_grads_per_step": last["grad_evals"] / last["steps"],
      "grads_per_step": last["grads_per_step"],
      "method_stats": scalar_stats(state.opt_state),
  }


def _load(cfg: Config, seed: int):
  return data_lib.load(
      cfg.dataset,
      label_noise=cfg.noise,
      seed=seed,
      data_dir=cfg.data_dir,
      image_size=cfg.image_size,
  )


def _format(m: dict, epochs: int) -> str:
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


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=_json_default)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if callable(x):
    return repr(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def _load_history(out: str) -> list[dict]:
  path = os.path.join(out, "results.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f).get("history", [])


# --------------------------------------------------------------------------
# Checkpoints (orbax). PRNG key arrays are stored as their raw key data.
# --------------------------------------------------------------------------


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _checkpoint_manager(path: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.CheckpointManager(
      os.path.abspath(path),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
  )


def _save(manager, epoch: int, state: TrainState) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  raw = jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, state
  )
  manager.save(epoch, args=ocp.args.StandardSave(raw))
  manager.wait_until_finished()


def _restore(manager, epoch: int, template: TrainState) -> TrainState:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  raw_template = jax.tree.map(
      lambda x: jax.random.key_data(x) if _is_key(x) else x, template
  )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, raw_template)
  raw = manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
  return jax.tree.map(
      lambda t, r: (
          jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
          if _is_key(t) else r
      ),
      template,
      raw,
  )


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------


def parse_value(text: str) -> Any:
  """A Python literal if ``text`` is one, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_method_args(items: list[str]) -> dict:
  out = {}
  for item in items or []:
    if "=" not in item:
      raise ValueError(f"--method-arg expects key=value, got {item!r}")
    k, v = item.split("=", 1)
    out[k.strip()] = parse_value(v.strip())
  return out


def add_base_arguments(p: argparse.ArgumentParser) -> None:
  """The base settings shared by ``train`` and ``compare``."""
  d = Config()
  p.add_argument("--dataset", default=d.dataset, choices=data_lib.DATASETS)
  p.add_argument("--model", default=None, choices=sorted(models_lib.MODELS),
                 help="default: digits_cnn on the digits, resnet18 elsewhere")
  p.add_argument("--epochs", type=int, default=d.epochs)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--lr", type=float, default=d.lr,
                 help="peak learning rate, cosine decay to 0")
  p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
  p.add_argument("--momentum", type=float, default=d.momentum)
  p.add_argument("--nesterov", action="store_true")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay)
  p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
  p.add_argument("--label-noise", type=float, default=None,
                 help="share of training labels flipped (default: 0.3 on the "
                 "digits, 0 elsewhere)")
  p.add_argument("--no-augment", action="store_true",
                 help="no crop/flip on TFDS data")
  p.add_argument("--padding", type=int, default=d.padding)
  p.add_argument("--cutout", type=int, default=d.cutout,
                 help="cutout square side (0: none; 16 on CIFAR)")
  p.add_argument("--image-size", type=int, default=None)
  p.add_argument("--data-dir", default=None, help="TFDS data directory")
  p.add_argument("--workers", type=int, default=0,
                 help="grain worker processes (0: threads)")
  p.add_argument("--model-arg", action="append", default=[],
                 metavar="KEY=VALUE", help="model constructor argument")


def config_from_args(args, **extra) -> Config:
  return Config(
      dataset=args.dataset,
      model=args.model,
      epochs=args.epochs,
      batch_size=args.batch_size,
      lr=args.lr,
      warmup_epochs=args.warmup_epochs,
      momentum=args.momentum,
      nesterov=args.nesterov,
      weight_decay=args.weight_decay,
      label_smoothing=args.label_smoothing,
      label_noise=args.label_noise,
      augment=not args.no_augment,
      padding=args.padding,
      cutout=args.cutout,
      image_size=args.image_size,
      data_dir=args.data_dir,
      workers=args.workers,
      model_args=parse_method_args(args.model_arg),
      **extra,
  )


def main(argv: Optional[list[str]] = None) -> dict:
  p = argparse.ArgumentParser(
      prog="python -m experiments.train",
      description="Train one model with one sharpness-aware method.",
  )
  add_base_arguments(p)
  p.add_argument("--method", default="sgd", choices=sorted(methods_lib.METHODS))
  p.add_argument("--rho", type=float, default=None,
                 help="the method's rho (default: its registry default)")
  p.add_argument("--method-arg", action="append", default=[],
                 metavar="KEY=VALUE",
                 help="any other method keyword, e.g. --method-arg k=5")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="results/checkpoint directory")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out")
  p.add_argument("--checkpoint-every", type=int, default=1, help="epochs")
  p.add_argument("--eval-every", type=int, default=1, help="epochs")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.resume and args.out is None:
    p.error("--resume needs --out")
  method_args = parse_method_args(args.method_arg)
  if args.rho is not None:
    method_args["rho"] = args.rho
  cfg = config_from_args(
      args, method=args.method, method_args=method_args, seed=args.seed
  )
  trainer = Trainer(cfg)
  print(
      f"{cfg.dataset} ({trainer.dataset.num_train} train / "
      f"{trainer.dataset.num_test} test, label noise {cfg.noise}), "
      f"{cfg.model}, {cfg.method} {method_args or ''}, "
      f"{trainer.steps_per_epoch} steps/epoch",
      flush=True,
  )
  result = trainer.run(
      out=args.out,
      resume=args.resume,
      progress=not args.no_progress,
      checkpoint_every=args.checkpoint_every,
      eval_every=args.eval_every,
      log=lambda s: print(s, flush=True),
  )
  print(
      f"final test accuracy {100 * result['final_test_acc']:.2f}%  "
      f"train {result['train_s']:.1f}s (+{result['compile_s']:.1f}s compile)  "
      f"{result['grads_per_step']:.2f} gradients/step"
  )
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
