"""What defines a run (:class:`Config`) and the command-line flags for it.

Shared by ``python -m experiments.train`` and ``python -m experiments.compare``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any, Optional

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models as models_lib
from experiments import parallel


@dataclasses.dataclass
class Config:
  """Everything that defines a run (what ``results.json`` records).

  Attributes:
    dataset: ``digits``, ``mnist1d`` or a TFDS name of
      ``data.TFDS_DATASETS``.
    model: a name of ``models.MODELS`` (None: ``digits_cnn`` on the digits,
      ``mnist1d_mlp`` on MNIST-1D, ``resnet18`` elsewhere).
    method: a name of ``methods.METHODS``.
    method_args: keyword arguments overriding the method's defaults.
    epochs, batch_size: run length and batch size.
    lr: peak learning rate (cosine decay to 0 over the run).
    warmup_epochs: linear warm-up from 0 (0: none).
    momentum, nesterov: SGD's.
    weight_decay: added to the method's gradient (``add_decayed_weights``).
    label_smoothing: in [0, 1).
    label_noise: share of training labels flipped (None: 0.3 on the digits,
      0 elsewhere, MNIST-1D included).
    seed: parameters, shuffling, label noise and the method's own draws.
    augment: crop/flip for TFDS data (the digits are not augmented: flips
      and crops do not preserve digits' meaning at 8x8).
    padding, cutout: crop padding and cutout size for TFDS data.
    image_size: model input size for TFDS data (None: the dataset's).
    data_dir: TFDS data directory (None: TFDS's default).
    workers: grain worker processes (0: threads only).
    model_args: keyword arguments of the model constructor.
    perturbation: on several devices, ``per-device`` (m-sharpness: each
      device perturbs with its own shard's gradient) or ``global`` (the
      whole batch's SAM step); see ``experiments/parallel.py``.
    planned: planned steps (``sam_optax.planner``): the host plans every
      step and each compiled step holds only that step's work, with no
      ``lax.cond``; in-memory data runs as segments of same-plan steps (see
      ``trainer.py``). False: the ``lax.cond`` path, and in-memory data runs
      a whole epoch as one jitted ``lax.scan``. The same results either way,
      to float rounding.
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
  perturbation: str = parallel.DEFAULT_PERTURBATION
  planned: bool = True

  def __post_init__(self):
    if self.model is None:
      self.model = data_lib.OFFLINE_DEFAULTS.get(
          self.dataset, {"model": "resnet18"})["model"]
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
    if self.perturbation not in parallel.PERTURBATIONS:
      raise ValueError(
          f"perturbation must be one of {list(parallel.PERTURBATIONS)}, got "
          f"{self.perturbation!r}"
      )
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
    return data_lib.OFFLINE_DEFAULTS.get(
        self.dataset, {"label_noise": 0.0})["label_noise"]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# --------------------------------------------------------------------------
# Command-line flags.
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
                 help="default: digits_cnn on the digits, mnist1d_mlp on "
                 "MNIST-1D, resnet18 elsewhere")
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
  p.add_argument("--perturbation", default=d.perturbation,
                 choices=parallel.PERTURBATIONS,
                 help="on several devices: per-device (m-sharpness, each "
                 "device perturbs with its own shard's gradient) or global "
                 "(the whole batch's SAM step); the same on one device")
  p.add_argument("--planned", action=argparse.BooleanOptionalAction,
                 default=d.planned,
                 help="planned steps (sam_optax.planner): each compiled step "
                 "holds only its own work, no lax.cond (what GPUs need). "
                 "--no-planned: the lax.cond path, and in-memory data runs "
                 "each epoch as one jitted lax.scan")


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
      perturbation=args.perturbation,
      planned=args.planned,
      **extra,
  )
