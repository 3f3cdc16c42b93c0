"""The method registry shared by the benchmark, training and comparison.

One entry per method: the sam_optax constructor, its defaults (the papers'
or the authors' code values, see each constructor's docstring), the
arguments that depend on the run's length (``steps_per_epoch``,
``total_steps``), and the short-run settings the test suite uses. ``build``
turns an entry into a full optax optimizer over a base optimizer. This is the
one method table: the benchmark, training, the comparison and the tests
(``tests/helpers.py``) all read it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import optax

import sam_optax


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """How to build one method.

  Attributes:
    name: registry key (also the CLI's ``--method``).
    constructor: attribute name in ``sam_optax``.
    defaults: keyword arguments, the method's published defaults.
    run_args: ``(steps_per_epoch, total_steps) -> kwargs`` for arguments that
      depend on the run's length (mask refresh period, warm-up, ...).
    full_optimizer: the constructor returns the whole optimizer (LightSAM),
      so no base optimizer is chained after it.
    takes_base: the constructor takes the base optimizer itself
      (``base_optimizer=``, decoupled WSAM) and returns the whole optimizer
      (``full_optimizer`` too): :func:`build` passes it the base optimizer,
      which keeps its weight decay.
    short_run: the keyword arguments of the test suite's configuration: on
      its tiny MLP (layers ``l1``, ``l2``) and 6-step runs of 32 examples,
      they make every decision of the method happen (mask refreshes, reuse
      steps, sampling windows, re-selections).
  """

  name: str
  constructor: Optional[str]
  defaults: dict = dataclasses.field(default_factory=dict)
  run_args: Callable[[int, int], dict] = lambda spe, total: {}
  full_optimizer: bool = False
  takes_base: bool = False
  short_run: dict = dataclasses.field(default_factory=dict)


def _runtime_layers(name: str, select_by: str) -> MethodSpec:
  """Layer-wise SAM with a runtime selection ranked ``select_by``: the top
  2 layers, re-ranked every step; in the tests 1 of the MLP's 2 layers,
  re-ranked every 2 steps."""
  return MethodSpec(
      name,
      "layerwise_sam",
      {"rho": 0.1, "alpha": 0.8, "num_layers": 2, "select_every": 1,
       "select_by": select_by},
      short_run={"rho": 0.1, "alpha": 0.8, "num_layers": 1,
                 "select_every": 2, "select_by": select_by},
  )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec("sgd", None),
        MethodSpec("sam", "sam", {"rho": 0.05}, short_run={"rho": 0.1}),
        MethodSpec(
            "asam", "asam", {"rho": 0.5, "eta": 0.01},
            short_run={"rho": 0.5, "eta": 0.01},
        ),
        MethodSpec(
            "gnp", "gnp", {"rho": 0.1, "alpha": 0.8},
            short_run={"rho": 0.1, "alpha": 0.8},
        ),
        MethodSpec(
            "gsam", "gsam", {"rho": 0.05, "alpha": 0.4},
            short_run={"rho": 0.1, "alpha": 0.4},
        ),
        # the coupled form (a gradient transform before the base optimizer);
        # the decoupled one needs the base optimizer and its learning rate
        MethodSpec(
            "wsam", "wsam", {"rho": 0.05, "gamma": 0.9},
            short_run={"rho": 0.1, "gamma": 0.8},
        ),
        # the paper's algorithm and the authors' default: the base optimizer
        # follows the clean gradient, the sharpness term is added to its
        # update scaled by the learning rate (outside momentum)
        MethodSpec(
            "wsam_decoupled", "wsam", {"rho": 0.05, "gamma": 0.9},
            full_optimizer=True, takes_base=True,
            short_run={"rho": 0.1, "gamma": 0.8, "learning_rate": 0.05,
                       "base_optimizer": optax.sgd(0.05, momentum=0.9)},
        ),
        MethodSpec(
            "fsam", "fsam", {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9},
            short_run={"rho": 0.1, "sigma": 1.0, "lmbda": 0.6},
        ),
        # late-phase SAM: SGD for the first half of the run, then SAM
        MethodSpec(
            "sam_late", "sam", {},
            run_args=lambda spe, total: {
                "rho": sam_optax.late_phase(0.05, start=total // 2)},
            # SGD steps 0-2, SAM steps 3-5
            short_run={"rho": sam_optax.late_phase(0.1, start=3)},
        ),
        MethodSpec(
            "layerwise_sam",
            "layerwise_sam",
            # the output side, found from the graph (static: the fast path)
            {"rho": 0.1, "alpha": 0.8, "num_layers": 2},
            short_run={"rho": 0.1, "alpha": 0.8, "num_layers": 1},
        ),
        # the runtime selections, by gradient norm and by ‖h_l - g_l‖
        _runtime_layers("layerwise_sam_runtime", "gradient"),
        _runtime_layers("layerwise_sam_sharpness", "sharpness"),
        MethodSpec(  # the fast path: the benchmark CNN's two output layers
            "layerwise_sam_fixed",
            "layerwise_sam",
            {"rho": 0.1, "alpha": 0.8, "layers": ("fc", "head")},
            # the static fast path: only the output layer is differentiated
            short_run={"rho": 0.1, "alpha": 0.8, "layers": ("l2",)},
        ),
        MethodSpec(
            "ssam_fisher",
            "ssam_fisher",
            # One recipe for both Sparse SAM rows: the authors' CIFAR-10
            # ResNet-18 SSAM-F command (rho 0.1, sparsity 0.5, 16 samples,
            # a refresh per epoch); the library's rho default (0.05) is
            # their argparse default.
            {"rho": 0.1, "sparsity": 0.5, "num_samples": 16},
            run_args=lambda spe, total: {"update_every": spe},
            # Fisher of the first 8 examples, refreshed on steps 0, 2, 4
            short_run={"rho": 0.05, "sparsity": 0.5, "num_samples": 8,
                       "update_every": 2, "chunk_size": 4},
        ),
        MethodSpec(
            "ssam_dynamic",
            "ssam_dynamic",
            # the same recipe's rho and sparsity (the SSAM-D command is not
            # in our sources); drop rate 0.5 from the authors' code
            {"rho": 0.1, "sparsity": 0.5, "drop_rate": 0.5},
            run_args=lambda spe, total: {
                "update_every": spe,
                "total_steps": total,
            },
            # random start, drop/grow on steps 2, 4
            short_run={"rho": 0.05, "sparsity": 0.5, "update_every": 2,
                       "total_steps": 6, "seed": 3},
        ),
        MethodSpec(
            "looksam", "looksam", {"rho": 0.1, "k": 5, "alpha": 0.7},
            # SAM steps 0, 2, 4; reuse steps between
            short_run={"rho": 0.1, "k": 2, "alpha": 0.7},
        ),
        MethodSpec(
            "vsam",
            "vsam",
            {"rho": 0.05},
            run_args=lambda spe, total: {"warmup_steps": 3 * spe},
            # 2 warm-up SAM steps, then windows of 4 with sampling and reuse
            short_run={"rho": 0.05, "warmup_steps": 2, "window": 4,
                       "blocks": 2, "max_reuse": 2},
        ),
        # LightSAM is a full optimizer (no base optimizer after it), so its
        # learning rate is part of its defaults; rho is the variant's default.
        MethodSpec(
            "lightsam",
            "lightsam",
            {"variant": "adagrad_norm", "learning_rate": 1.0},
            full_optimizer=True,
            short_run={"learning_rate": 0.05, "variant": "adagrad_norm"},
        ),
        MethodSpec(
            "lightsam_adagrad",
            "lightsam",
            {"variant": "adagrad", "learning_rate": 0.01},
            full_optimizer=True,
            short_run={"learning_rate": 0.05, "variant": "adagrad"},
        ),
        MethodSpec(
            "lightsam_adam",
            "lightsam",
            {"variant": "adam", "learning_rate": 0.001},
            full_optimizer=True,
            short_run={"learning_rate": 0.01, "variant": "adam"},
        ),
    ]
}


def label(name: str, overrides: dict) -> str:
  """A row's name: ``sam``, or ``sam (rho=0.1)`` with overrides (the
  comparison's and the benchmark's tables)."""
  if not overrides:
    return name
  return f"{name} (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"


def available() -> list[str]:
  """Registry names whose constructor exists in this sam_optax."""
  return [
      n for n, s in METHODS.items()
      if s.constructor is None or hasattr(sam_optax, s.constructor)
  ]


#: ``batch_axes`` of the trainer's batch with BatchNorm (``has_aux``): the
#: images and labels are per example, the running statistics are not.
BN_BATCH_AXES = {"image": 0, "label": 0, "batch_stats": None}


def build(
    name: str,
    loss_fn: Callable,
    base_optimizer: optax.GradientTransformation,
    *,
    steps_per_epoch: int = 1,
    total_steps: int = 1,
    has_aux: bool = False,
    axis_name: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    with_sam: bool = False,
):
  """The full optimizer for method ``name``: the SAM transform, then the base.

  Args:
    name: a key of :data:`METHODS`.
    loss_fn: ``loss_fn(params, batch)``.
    base_optimizer: what follows the SAM gradient (ignored for full
      optimizers, except those that take it: ``takes_base``).
    steps_per_epoch, total_steps: the run's length, for ``run_args``.
    has_aux, axis_name: passed to the constructor.
    overrides: keyword arguments replacing the defaults.
    with_sam: also return the sam_optax transform inside the optimizer
      (None for SGD), which ``sam_optax.planner`` takes.

  Returns:
    The optimizer, or ``(optimizer, sam_transform)`` with ``with_sam``.
  """
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
  spec = METHODS[name]
  if spec.constructor is None:
    tx = optax.with_extra_args_support(base_optimizer)
    return (tx, None) if with_sam else tx
  kwargs = dict(spec.defaults)
  kwargs.update(spec.run_args(steps_per_epoch, total_steps))
  kwargs.update(overrides or {})
  if spec.takes_base:
    kwargs.setdefault("base_optimizer", base_optimizer)
  ctor = getattr(sam_optax, spec.constructor)
  if has_aux and "batch_axes" in inspect.signature(ctor).parameters:
    # A BatchNorm model's batch carries its running statistics, which are
    # not per example: Sparse SAM's Fisher and m-sharpness's sub-batches
    # slice the images and labels only.
    kwargs.setdefault("batch_axes", BN_BATCH_AXES)
  sam_tx = ctor(loss_fn, has_aux=has_aux, axis_name=axis_name, **kwargs)
  tx = sam_tx if spec.full_optimizer else optax.chain(sam_tx, base_optimizer)
  return (tx, sam_tx) if with_sam else tx
