"""Flax (linen) models for the experiments and the benchmark.

``SmallCNN`` is the benchmark's and the digits' model. The CIFAR models are
the ones the SAM-family papers train: ResNet-18 (CIFAR variant), WideResNet
(WRN-28-10), PyramidNet-110 and a small ViT. Models with BatchNorm keep their
running statistics in the ``batch_stats`` collection; training threads them
through ``loss_fn(params, batch) -> (loss, aux)`` (``has_aux=True``), see
``experiments/train.py``.

All models take ``train: bool``: BatchNorm uses batch statistics (and updates
``batch_stats``) when True, running averages when False.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class SmallCNN(nn.Module):
  """A small CNN: three 3x3 conv blocks, then ``fc`` and the ``head``.

  The benchmark's default model (CIFAR-shaped 32x32x3 input). Layer names are
  fixed so that layer paths are stable: ``conv1``, ``conv2``, ``conv3``,
  ``fc``, ``head`` (the two output-side layers are ``fc`` and ``head``).
  """

  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  hidden: int = 256

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), name=f"conv{i + 1}")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name="fc")(x))
    return nn.Dense(self.num_classes, name="head")(x)


class PatchConv(nn.Module):
  """A stride-1 ``SAME`` convolution computed as one matmul over im2col patches.

  The same function and the same parameters (``kernel`` of shape ``(kh, kw,
  in, out)``, ``bias``) as ``nn.Conv(features, kernel_size)``, but on XLA:CPU
  it runs about ten times faster for small images, whose convolutions (and
  their gradients) XLA:CPU executes poorly. Used by :class:`DigitsCNN` and
  :class:`FashionResNet`. ``strides`` s > 1 keeps the stride-1 output's
  rows and columns 0, s, 2s, ... (computed only there); ``use_bias=False``
  drops the bias (before a BatchNorm).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param(
        "kernel", self.kernel_init, (kh, kw, cin, self.features)
    )
    h, w = x.shape[1:3]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(
        x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0))
    )
    s = self.strides  # stride s: the stride-1 output at rows/cols 0, s, ...
    cols = jnp.concatenate(
        [xp[:, i : i + h : s, j : j + w : s]
         for i in range(kh) for j in range(kw)],
        axis=-1,
    )
    out = cols @ kernel.reshape(kh * kw * cin, self.features)
    if not self.use_bias:
      return out
    return out + self.param("bias", nn.initializers.zeros, (self.features,))


class DigitsCNN(nn.Module):
  """:class:`SmallCNN`'s architecture and layer names for 8x8 digits.

  Three 3x3 conv blocks (``conv1``..``conv3``, each conv-ReLU-2x2 max-pool),
  then ``fc`` and ``head``: the same function as ``SmallCNN`` (and the same
  parameter tree), with :class:`PatchConv` convolutions so that the embedded
  comparison fits its CPU time budget. Default widths (16, 32, 64) and hidden
  128: 32,906 parameters on 8x8x1 inputs.
  """

  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    for i, w in enumerate(self.widths):
      x = nn.relu(PatchConv(w, name=f"conv{i + 1}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name="fc")(x))
    return nn.Dense(self.num_classes, name="head")(x)


class MLP(nn.Module):
  """A ReLU multilayer perceptron: ``fc1`` .. ``fc{n}``, then the ``head``.

  The default is MNIST-1D's published MLP (Greydanus & Kobak, arXiv
  2011.14439): two hidden layers of 100 on the length-40 signals, 15,210
  parameters. Its layout is the opposite of :class:`DigitsCNN`'s: the two
  output-side layers (``fc2`` and ``head``) hold 73% of the parameters
  (the CNN's ``fc`` and ``head``: 29%).
  """

  num_classes: int = 10
  hidden: Sequence[int] = (100, 100)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape((x.shape[0], -1))
    for i, h in enumerate(self.hidden):
      x = nn.relu(nn.Dense(h, name=f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def _batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  # momentum 0.9 / epsilon 1e-5: PyTorch's BatchNorm2d defaults, which the
  # papers' (PyTorch) code uses.
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name
  )


_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PatchBlock(nn.Module):
  """:class:`BasicBlock` with :class:`PatchConv` convolutions: conv-BN-ReLU,
  conv-BN, plus the shortcut (a strided 1x1 conv and BN when the shape
  changes), then ReLU."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(PatchConv, use_bias=False, kernel_init=_conv_init)
    y = conv(self.features, strides=self.strides, name="conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = conv(self.features, name="conv2")(y)
    y = _batch_norm(train, "bn2")(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, (1, 1), strides=self.strides,
                      name="proj")(x)
      residual = _batch_norm(train, "proj_bn")(residual)
    return nn.relu(y + residual)


class FashionResNet(nn.Module):
  """A small residual CNN with BatchNorm for 28x28 Fashion-MNIST.

  A stride-2 3x3 stem (28 -> 14) with BatchNorm, then one residual
  :class:`PatchBlock` per entry of ``widths`` (the first at 14x14, each
  later one halving the side: 14 -> 7 -> 4), global average pooling and the
  ``head``. Default ``widths=(8, 16, 32)``, stem 8: 19,810 parameters
  (the ``head`` 330 of them, the last stage 14,528), about 0.9M
  multiply-adds per image, sized so that an SGD epoch of 10,000 images
  takes a few seconds on one CPU core (:class:`PatchConv` convolutions:
  3.4 s of CPU time on an AMD EPYC core, batch 64). Layer names: ``stem``, ``stem_bn``,
  ``stage1`` .. ``stage3`` (each ``conv1``, ``bn1``, ``conv2``, ``bn2``,
  ``proj``, ``proj_bn``), ``head``.
  """

  num_classes: int = 10
  widths: Sequence[int] = (8, 16, 32)
  stem: int = 8

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = PatchConv(self.stem, strides=2, use_bias=False,
                  kernel_init=_conv_init, name="stem")(x)
    x = nn.relu(_batch_norm(train, "stem_bn")(x))
    for i, w in enumerate(self.widths):
      x = PatchBlock(w, 1 if i == 0 else 2, name=f"stage{i + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


# --------------------------------------------------------------------------
# ResNet-18, CIFAR variant (He et al. 2016; the 3x3 stem without max-pool used
# by the SAM/ASAM/SSAM/LookSAM CIFAR experiments): 11.17M parameters.
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
  """Post-activation basic block (two 3x3 convs) with a projection shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = nn.Conv(self.features, (3, 3), self.strides, padding=1,
                use_bias=False, kernel_init=_conv_init)(x)
    y = nn.relu(_batch_norm(train)(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False,
                kernel_init=_conv_init)(y)
    y = _batch_norm(train)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                         kernel_init=_conv_init)(x)
      residual = _batch_norm(train)(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """CIFAR ResNet: 3x3 stem (no max-pool), four stages of basic blocks.

  ``stage_sizes=(2, 2, 2, 2)``, ``width=64`` is ResNet-18. Stage ``i``'s
  blocks (``block``, a class attribute) get ``width * 2**i`` features, the
  first of each stage after the first a stride of 2.
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  block: ClassVar[type[nn.Module]] = BasicBlock

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False,
                kernel_init=_conv_init, name="stem")(x)
    x = nn.relu(_batch_norm(train, "stem_bn")(x))
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        strides = 2 if (i > 0 and j == 0) else 1
        x = self.block(self.width * 2**i, strides, name=f"stage{i + 1}_{j}")(
            x, train
        )
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class Bottleneck(nn.Module):
  """Post-activation bottleneck block (1x1, 3x3, 1x1 convs, each with its
  BatchNorm; the last widens by 4) with a projection shortcut, as in
  ResNet-50 (He et al. 2016, arXiv 1512.03385; stride on the 3x3 conv)."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = nn.Conv(self.features, (1, 1), use_bias=False,
                kernel_init=_conv_init)(x)
    y = nn.relu(_batch_norm(train)(y))
    y = nn.Conv(self.features, (3, 3), self.strides, padding=1,
                use_bias=False, kernel_init=_conv_init)(y)
    y = nn.relu(_batch_norm(train)(y))
    y = nn.Conv(4 * self.features, (1, 1), use_bias=False,
                kernel_init=_conv_init)(y)
    y = _batch_norm(train)(y)
    if self.strides != 1 or x.shape[-1] != 4 * self.features:
      residual = nn.Conv(4 * self.features, (1, 1), self.strides,
                         use_bias=False, kernel_init=_conv_init)(x)
      residual = _batch_norm(train)(residual)
    return nn.relu(y + residual)


class BottleneckResNet(ResNet):
  """ResNet-50's layout (stages of 3, 4, 6, 3 bottleneck blocks, 161
  parameter leaves) with :class:`ResNet`'s CIFAR stem (3x3, no max-pool).

  ``width=64`` is ResNet-50's channel count (23.5M parameters); the
  benchmark's zoo uses a narrow one (``width=8``) so that the same graph,
  the same number of leaves, runs on a CPU.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: ClassVar[type[nn.Module]] = Bottleneck


# --------------------------------------------------------------------------
# WideResNet (Zagoruyko & Komodakis 2016): pre-activation wide blocks.
# WRN-28-10 (36.5M parameters) is the SAM paper's main CIFAR model.
# --------------------------------------------------------------------------


class WideBlock(nn.Module):
  """Pre-activation wide basic block (BN-ReLU-conv twice)."""

  features: int
  strides: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    out = nn.relu(_batch_norm(train)(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                         kernel_init=_conv_init)(out)
    else:
      shortcut = x
    y = nn.Conv(self.features, (3, 3), self.strides, padding=1,
                use_bias=False, kernel_init=_conv_init)(out)
    y = nn.relu(_batch_norm(train)(y))
    if self.dropout > 0:
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False,
                kernel_init=_conv_init)(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-widen: ``(depth - 4) / 6`` blocks in each of three stages."""

  num_classes: int = 10
  depth: int = 28
  widen: int = 10
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    if (self.depth - 4) % 6:
      raise ValueError(f"depth must be 6n+4, got {self.depth}")
    n = (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init,
                name="stem")(x)
    for i, w in enumerate((16, 32, 64)):
      for j in range(n):
        strides = 2 if (i > 0 and j == 0) else 1
        x = WideBlock(w * self.widen, strides, self.dropout,
                      name=f"stage{i + 1}_{j}")(x, train)
    x = nn.relu(_batch_norm(train, "final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


# --------------------------------------------------------------------------
# PyramidNet (Han et al. 2017), basic blocks: widths grow linearly by
# alpha / N per block; zero-padded identity shortcut (average-pooled when the
# block downsamples). PyramidNet-110 with alpha 270: 28.49M parameters here;
# the paper quotes 28.3M. Widths are rounded, not truncated, as in most
# implementations (google-research/sam notes the same ~0.2M difference).
# --------------------------------------------------------------------------


class PyramidBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = _batch_norm(train)(x)
    y = nn.Conv(self.features, (3, 3), self.strides, padding=1,
                use_bias=False, kernel_init=_conv_init)(y)
    y = nn.relu(_batch_norm(train)(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False,
                kernel_init=_conv_init)(y)
    y = _batch_norm(train)(y)
    shortcut = x
    if self.strides != 1:
      shortcut = nn.avg_pool(shortcut, (2, 2), strides=(2, 2))
    pad = self.features - shortcut.shape[-1]
    if pad > 0:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return y + shortcut


class PyramidNet(nn.Module):
  """PyramidNet with basic blocks: ``(depth - 2) / 6`` blocks per stage."""

  num_classes: int = 10
  depth: int = 110
  alpha: int = 270

  @nn.compact
  def __call__(self, x, train: bool = True):
    if (self.depth - 2) % 6:
      raise ValueError(f"depth must be 6n+2, got {self.depth}")
    n = (self.depth - 2) // 6
    add = self.alpha / (3 * n)
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init,
                name="stem")(x)
    x = _batch_norm(train, "stem_bn")(x)
    width = 16.0
    for i in range(3):
      for j in range(n):
        width += add
        strides = 2 if (i > 0 and j == 0) else 1
        x = PyramidBlock(int(round(width)), strides,
                         name=f"stage{i + 1}_{j}")(x, train)
    x = nn.relu(_batch_norm(train, "final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


# --------------------------------------------------------------------------
# A small Vision Transformer (Dosovitskiy et al. 2021) for 32x32 inputs:
# patch 4, width 192, depth 6, 3 heads (about 2.7M parameters).
# --------------------------------------------------------------------------


class EncoderBlock(nn.Module):
  dim: int
  heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.dim * self.mlp_ratio)(y)
    y = nn.Dense(self.dim)(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  """ViT with a class token and learned position embeddings."""

  num_classes: int = 10
  patch_size: int = 4
  dim: int = 192
  depth: int = 6
  heads: int = 3

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), name="patch_embed")(x)
    b, h, w, c = x.shape
    x = x.reshape((b, h * w, c))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)), x], axis=1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, h * w + 1, c))
    x = x + pos
    for i in range(self.depth):
      x = EncoderBlock(self.dim, self.heads, name=f"block{i}")(x)
    x = nn.LayerNorm(name="final_ln")(x[:, 0])
    return nn.Dense(self.num_classes, name="head")(x)


#: name -> constructor(num_classes, **overrides).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "digits_cnn": DigitsCNN,
    "mnist1d_mlp": MLP,
    "fashion_resnet": FashionResNet,
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), width=64),
    "resnet50": BottleneckResNet,
    "wrn28_10": functools.partial(WideResNet, depth=28, widen=10),
    "pyramidnet110": functools.partial(PyramidNet, depth=110, alpha=270),
    "vit_small": ViT,
}


def create(name: str, num_classes: int, **overrides: Any) -> nn.Module:
  """The model ``name`` of :data:`MODELS` with ``num_classes`` outputs."""
  if name not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
  return MODELS[name](num_classes=num_classes, **overrides)


def init(model: nn.Module, key: jax.Array, image_shape: Sequence[int]):
  """(params, batch_stats) for an input of shape ``image_shape`` (no batch).

  ``batch_stats`` is an empty dict for models without BatchNorm. The
  experiments pass an ``rbg`` key (``jax.random.key(seed, impl="rbg")``):
  XLA:CPU compiles its initialisers several times faster than threefry's.
  """
  variables = model.init(
      key, jnp.zeros((1, *image_shape), jnp.float32), train=False
  )
  return variables["params"], variables.get("batch_stats", {})


def num_params(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
