"""What defines a run (:class:`Config`) and the command-line flags for it.

Shared by ``python -m experiments.train`` and ``python -m experiments.compare``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import numbers
from typing import Any, Optional

from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import models as models_lib
from experiments import parallel


@dataclasses.dataclass(frozen=True)
class Range:
  """The values a numeric setting allows: finite, of ``kind``, between
  ``low`` and ``high`` (None: unbounded; ``open_low``/``open_high``: the
  bound itself excluded).

  One table of them (:data:`RANGES`, :data:`RUN_RANGES`) serves both
  :class:`Config`'s checks (a ``ValueError``) and the command lines' flags
  (:meth:`arg`: an argparse usage error, exit code 2, at parse time).

  >>> Range(float, 0, 1, open_high=True).describe()
  'a finite number in [0, 1)'
  >>> Range(int, 1).contains(0), Range(float, 0).contains(float("nan"))
  (False, False)
  """

  kind: type = float
  low: Optional[float] = None
  high: Optional[float] = None
  open_low: bool = False
  open_high: bool = False

  def contains(self, value: Any) -> bool:
    number = numbers.Integral if self.kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, number):
      return False
    if not math.isfinite(value):
      return False
    if self.low is not None and (
        value < self.low or (self.open_low and value == self.low)):
      return False
    if self.high is not None and (
        value > self.high or (self.open_high and value == self.high)):
      return False
    return True

  def describe(self) -> str:
    """E.g. ``an integer >= 1``, ``a finite number in [0, 1)``."""
    what = "an integer" if self.kind is int else "a finite number"
    if self.low is not None and self.high is not None:
      return (f"{what} in {'(' if self.open_low else '['}{_num(self.low)}, "
              f"{_num(self.high)}{')' if self.open_high else ']'}")
    if self.low is not None:
      return f"{what} {'>' if self.open_low else '>='} {_num(self.low)}"
    if self.high is not None:
      return f"{what} {'<' if self.open_high else '<='} {_num(self.high)}"
    return what

  def arg(self, text: str):
    """The argparse ``type=``: ``text`` as ``kind`` if allowed, else an
    ``ArgumentTypeError`` (argparse prefixes the flag: ``argument --lr:
    must be a finite number > 0, got 'nan'``)."""
    try:
      value = self.kind(text)
    except ValueError:
      value = None
    if value is None or not self.contains(value):
      raise argparse.ArgumentTypeError(
          f"must be {self.describe()}, got {text!r}"
      )
    return value


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f"{x:g}"


_UINT32 = 2**32 - 1

# The numeric settings of a Config and the values each allows.
RANGES = {
    "epochs": Range(int, 1),
    "batch_size": Range(int, 1),
    "lr": Range(float, 0, open_low=True),
    "warmup_epochs": Range(int, 0),
    "momentum": Range(float, 0, 1, open_high=True),
    "weight_decay": Range(float, 0),
    "label_smoothing": Range(float, 0, 1, open_high=True),
    "label_noise": Range(float, 0, 1),
    "seed": Range(int, 0, _UINT32),
    "padding": Range(int, 0),
    "cutout": Range(int, 0),
    "image_size": Range(int, 1),
    "train_size": Range(int, 1),
    "workers": Range(int, 0),
}

# Numeric flags of the command lines that are not Config fields.
RUN_RANGES = {
    "rho": Range(float, 0),
    "checkpoint_every": Range(int, 1),
    "eval_every": Range(int, 1),
    "num_processes": Range(int, 1),
    "process_id": Range(int, 0),
    "seeds": Range(int, 1),
}


def check_range(name: str, value: Any) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is in its range
  (:data:`RANGES` or :data:`RUN_RANGES`)."""
  allowed = RANGES.get(name) or RUN_RANGES[name]
  if not allowed.contains(value):
    raise ValueError(f"{name} must be {allowed.describe()}, got {value!r}")


def add_number(p, name: str, help: str = "",  # pylint: disable=redefined-builtin
               **kwargs) -> None:
  """Adds ``--name`` (dashes for underscores), the numeric setting
  ``name`` checked at parse time against its range (:data:`RANGES`,
  :data:`RUN_RANGES`), which its help states."""
  allowed = RANGES.get(name) or RUN_RANGES[name]
  text = f"{help}; " if help else ""
  p.add_argument("--" + name.replace("_", "-"), type=allowed.arg,
                 help=text + allowed.describe(), **kwargs)


# Config fields that may differ when a run is resumed: where the data is
# read from and how many processes prepare it (the batches are the same; see
# ``data.Dataset.batches``). Every other field changes what is computed.
RESUME_MAY_CHANGE = ("data_dir", "workers")


@dataclasses.dataclass
class Config:
  """Everything that defines a run (what ``results.json`` records).

  Attributes:
    dataset: ``digits``, ``mnist1d``, ``fashion_mnist`` or a TFDS name of
      ``data.TFDS_DATASETS``.
    model: a name of ``models.MODELS`` (None: ``digits_cnn`` on the digits,
      ``mnist1d_mlp`` on MNIST-1D, ``fashion_resnet`` on Fashion-MNIST,
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
      0 elsewhere, MNIST-1D included).
    seed: parameters, shuffling, label noise and the method's own draws.
    augment: crop/flip for TFDS data (the digits are not augmented: flips
      and crops do not preserve digits' meaning at 8x8).
    padding, cutout: crop padding and cutout size for TFDS data.
    image_size: model input size for TFDS data (None: the dataset's).
    data_dir: TFDS data directory (None: TFDS's default); for
      Fashion-MNIST the directory of its IDX files (None: Debian's
      ``/usr/share/datasets/fashion-mnist``) or of a prepared TFDS copy.
    train_size: Fashion-MNIST only: train on a fixed class-balanced subset
      of this many images (None: all 60,000).
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

  The numeric fields must be in their :data:`RANGES` (finite; a
  ``ValueError`` names the field and the range otherwise). Every field but
  :data:`RESUME_MAY_CHANGE` decides the run's trajectory: ``--resume``
  refuses to continue a run under a different value of any of them.
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
  train_size: Optional[int] = None
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
    if self.perturbation not in parallel.PERTURBATIONS:
      raise ValueError(
          f"perturbation must be one of {list(parallel.PERTURBATIONS)}, got "
          f"{self.perturbation!r}"
      )
    for name in RANGES:
      if getattr(self, name) is not None:
        check_range(name, getattr(self, name))
    if self.train_size is not None and self.dataset != "fashion_mnist":
      raise ValueError(
          f"train_size is for fashion_mnist only, got it for "
          f"{self.dataset!r}")

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
  """A Python literal if ``text`` is one, else a float if ``float`` reads
  it (``nan``, ``inf``, ``-Infinity``: not literals, and left as strings
  they were refused as "not a real number" instead of by the argument's
  range), else the string.

  >>> parse_value("0.1"), parse_value("(1, 2)"), parse_value("sharpness")
  (0.1, (1, 2), 'sharpness')
  >>> parse_value("nan"), parse_value("-inf")
  (nan, -inf)
  """
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    pass
  try:
    return float(text)
  except ValueError:
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
  add_number(p, "epochs", default=d.epochs)
  add_number(p, "batch_size", default=d.batch_size)
  add_number(p, "lr", default=d.lr, help="peak learning rate, cosine decay "
             "to 0")
  add_number(p, "warmup_epochs", default=d.warmup_epochs)
  add_number(p, "momentum", default=d.momentum)
  p.add_argument("--nesterov", action="store_true")
  add_number(p, "weight_decay", default=d.weight_decay)
  add_number(p, "label_smoothing", default=d.label_smoothing)
  add_number(p, "label_noise", default=None,
             help="share of training labels flipped (default: 0.3 on the "
             "digits, 0 elsewhere)")
  p.add_argument("--no-augment", action="store_true",
                 help="no crop/flip on TFDS data")
  add_number(p, "padding", default=d.padding)
  add_number(p, "cutout", default=d.cutout,
             help="cutout square side (0: none; 16 on CIFAR)")
  add_number(p, "image_size", default=None)
  p.add_argument("--data-dir", default=None,
                 help="TFDS data directory; Fashion-MNIST's IDX files "
                 "(default /usr/share/datasets/fashion-mnist, Debian's "
                 "dataset-fashion-mnist) or a prepared TFDS copy")
  add_number(p, "train_size", default=None,
             help="Fashion-MNIST: a fixed class-balanced subset of the "
             "training images (default: all)")
  add_number(p, "workers", default=0,
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
      train_size=args.train_size,
      workers=args.workers,
      model_args=parse_method_args(args.model_arg),
      perturbation=args.perturbation,
      planned=args.planned,
      **extra,
  )
