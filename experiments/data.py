"""Data for the experiments: the embedded digits and TFDS image datasets.

Two sources, one interface (:class:`ArrayDataset` for data that fits in
memory, :class:`TfdsDataset` for streamed data):

* ``digits`` (the default, no download): scikit-learn's handwritten digits,
  1,797 real 8x8 grey images of 10 classes, with a fixed stratified
  train/test split (1,437 / 360, independent of the training seed) and
  optional symmetric label noise, deterministic for a seed. The whole set
  lives on the device, so an epoch is one jitted ``lax.scan``.
* ``cifar10``, ``cifar100``, ``oxford_flowers102`` through
  ``tfds.data_source`` (array_record files, random access, no TensorFlow)
  and a `grain <https://github.com/google/grain>`_ pipeline: per-epoch
  shuffle, decoding and augmentation on host threads (or worker processes),
  batching and prefetch, so the accelerator is kept fed. The standard CIFAR
  augmentation: random crop with 4-pixel zero padding, horizontal flip,
  optional cutout (DeVries & Taylor 2017, 16x16 on CIFAR), then per-channel
  normalisation. The data must already be prepared in ``data_dir`` (``tfds
  build`` or ``tfds.builder(name).download_and_prepare(file_format=
  "array_record")`` on a machine with network access).

Symmetric label noise (as in the SAM paper's noisy-label experiments):
exactly ``round(noise * n)`` training examples, chosen at random, get a label
drawn uniformly from the *other* classes, so the realised noise rate is the
nominal one. Test labels are never corrupted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Optional

import numpy as np

#: Per-channel mean / std of the training images (0..1 scale).
_NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # ImageNet statistics, the usual choice for Flowers102.
    "oxford_flowers102": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

#: name -> (number of classes, training split, test split, image size).
TFDS_DATASETS = {
    "cifar10": (10, "train", "test", 32),
    "cifar100": (100, "train", "test", 32),
    # Flowers102: train (1,020) + validation (1,020) for training, as usual.
    "oxford_flowers102": (102, "train+validation", "test", 224),
}

DATASETS = ("digits",) + tuple(TFDS_DATASETS)


# --------------------------------------------------------------------------
# Label noise.
# --------------------------------------------------------------------------


def symmetric_label_noise(
    labels: np.ndarray, noise: float, num_classes: int, seed: int
) -> np.ndarray:
  """Labels with exactly ``round(noise * n)`` entries flipped to another class.

  Deterministic for ``(labels, noise, num_classes, seed)``. Each flipped entry
  takes a class drawn uniformly from the ``num_classes - 1`` wrong ones.
  """
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f"label_noise must be in [0, 1], got {noise}")
  labels = np.asarray(labels, np.int32)
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11]))
  n = labels.shape[0]
  flip = rng.permutation(n)[: int(round(noise * n))]
  out = labels.copy()
  shift = rng.integers(1, num_classes, size=flip.shape[0])
  out[flip] = (labels[flip] + shift) % num_classes
  return out


# --------------------------------------------------------------------------
# In-memory data (the digits).
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ArrayDataset:
  """A dataset held in memory as arrays (NHWC float32 images, int32 labels).

  Attributes:
    name: dataset name.
    train_images, train_labels: the training set (labels possibly noisy).
    train_clean_labels: the training labels before noise.
    test_images, test_labels: the test set.
    num_classes: number of classes.
    label_noise, seed: the symmetric noise applied to the training labels
      (:meth:`with_seed` draws it again for another seed).
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  train_clean_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  label_noise: float = 0.0
  seed: int = 0

  def with_seed(self, seed: int) -> "ArrayDataset":
    """The same data with the label noise of ``seed`` (the split is fixed)."""
    if seed == self.seed:
      return self
    return dataclasses.replace(
        self,
        seed=seed,
        train_labels=symmetric_label_noise(
            self.train_clean_labels, self.label_noise, self.num_classes, seed
        ),
    )

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return int(self.train_images.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_images.shape[0])


DIGITS_TEST_SIZE = 360  # 20% of 1,797, stratified.
DIGITS_SPLIT_SEED = 0  # the fixed split; never the training seed.


def load_digits(label_noise: float = 0.0, seed: int = 0) -> ArrayDataset:
  """scikit-learn's digits: fixed stratified split, optional label noise.

  Images are 8x8x1, scaled to [0, 1] and standardised with the training
  set's mean and std. The split is the same for every ``seed``; ``seed`` only
  picks which training labels are corrupted (``label_noise`` in [0, 1]).

  Example:
    >>> ds = load_digits(label_noise=0.3, seed=0)
    >>> ds.train_images.shape, ds.test_images.shape
    ((1437, 8, 8, 1), (360, 8, 8, 1))
    >>> float((ds.train_labels != ds.train_clean_labels).mean()).__round__(2)
    0.3
  """
  x_train, y_train, x_test, y_test = _digits_split()
  return ArrayDataset(
      name="digits",
      train_images=x_train,
      train_labels=symmetric_label_noise(y_train, label_noise, 10, seed),
      train_clean_labels=y_train,
      test_images=x_test,
      test_labels=y_test,
      num_classes=10,
      label_noise=label_noise,
      seed=seed,
  )


@functools.lru_cache(maxsize=1)
def _digits_split():
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  raw = sk_datasets.load_digits()
  images = (raw.images.astype(np.float32) / 16.0)[..., None]
  labels = raw.target.astype(np.int32)
  idx_train, idx_test = model_selection.train_test_split(
      np.arange(labels.shape[0]),
      test_size=DIGITS_TEST_SIZE,
      stratify=labels,
      random_state=DIGITS_SPLIT_SEED,
  )
  x_train, x_test = images[idx_train], images[idx_test]
  mean, std = float(x_train.mean()), float(x_train.std())
  x_train = (x_train - mean) / std
  x_test = (x_test - mean) / std
  y_train, y_test = labels[idx_train], labels[idx_test]
  for a in (x_train, y_train, x_test, y_test):
    a.setflags(write=False)  # shared by every call
  return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------
# Augmentation (NumPy, per example, on host threads of the grain pipeline).
# --------------------------------------------------------------------------


def random_crop(
    image: np.ndarray, rng: np.random.Generator, padding: int = 4
) -> np.ndarray:
  """A crop of the original size from the image zero-padded by ``padding``."""
  if padding <= 0:
    return image
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top = rng.integers(0, 2 * padding + 1)
  left = rng.integers(0, 2 * padding + 1)
  return padded[top : top + h, left : left + w]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def cutout(
    image: np.ndarray, rng: np.random.Generator, size: int
) -> np.ndarray:
  """Zeroes a ``size`` x ``size`` square centred uniformly in the image
  (clipped at the borders), DeVries & Taylor 2017. ``size=0``: no-op."""
  if size <= 0:
    return image
  h, w = image.shape[:2]
  cy, cx = rng.integers(0, h), rng.integers(0, w)
  y0, y1 = max(cy - size // 2, 0), min(cy + size - size // 2, h)
  x0, x1 = max(cx - size // 2, 0), min(cx + size - size // 2, w)
  image = image.copy()
  image[y0:y1, x0:x1] = 0
  return image


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a uint8 HWC image to ``size`` x ``size``."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top

  return np.asarray(
      Image.fromarray(image).resize((size, size), Image.BILINEAR)
  )


@dataclasses.dataclass(frozen=True)
class Augment:
  """The training augmentation: crop (with padding), flip, cutout.

  Cutout is applied after normalisation, so the square is set to the mean.
  """

  padding: int = 4
  flip: bool = True
  cutout: int = 0


# --------------------------------------------------------------------------
# TFDS through grain.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TfdsDataset:
  """A TFDS image-classification dataset read with ``tfds.data_source``.

  Attributes:
    name: TFDS name (``cifar10``, ``cifar100``, ``oxford_flowers102``).
    train_source, test_source: random-access ``tfds.data_source`` splits.
    num_classes: number of classes.
    image_size: side of the (square) model input.
    label_noise, seed: symmetric noise on the training labels (a fixed table
      indexed by record, deterministic for the seed).
  """

  name: str
  train_source: Any
  test_source: Any
  num_classes: int
  image_size: int
  label_noise: float = 0.0
  seed: int = 0
  _noisy: Optional[np.ndarray] = dataclasses.field(
      default=None, init=False, repr=False, compare=False
  )

  def with_seed(self, seed: int) -> "TfdsDataset":
    """The same sources with the label noise of ``seed`` (drawn on first
    use); ``self`` is left as it is."""
    if seed == self.seed:
      return self
    return dataclasses.replace(self, seed=seed)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return (self.image_size, self.image_size, 3)

  @property
  def num_train(self) -> int:
    return len(self.train_source)

  @property
  def num_test(self) -> int:
    return len(self.test_source)

  def _noisy_labels(self) -> Optional[np.ndarray]:
    if self.label_noise <= 0:
      return None
    if self._noisy is None:
      clean = np.array(
          [int(self.train_source[i]["label"]) for i in range(self.num_train)],
          np.int32,
      )
      self._noisy = symmetric_label_noise(
          clean, self.label_noise, self.num_classes, self.seed
      )
    return self._noisy

  def _preprocess(self, example: dict, rng, augment: Optional[Augment]):
    image = _resize(np.asarray(example["image"]), self.image_size)
    if augment is not None:
      image = random_crop(image, rng, augment.padding)
      if augment.flip:
        image = random_flip(image, rng)
    mean, std = _NORMALISATION[self.name]
    image = (image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
    image = image / np.asarray(std, np.float32)
    if augment is not None and augment.cutout:
      image = cutout(image, rng, augment.cutout)
    return image

  def batches(
      self,
      split: str,
      batch_size: int,
      *,
      epoch: int = 0,
      seed: int = 0,
      augment: Optional[Augment] = None,
      drop_remainder: bool = True,
      num_threads: int = 8,
      prefetch: int = 64,
      workers: int = 0,
  ) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of batches ``{"image": float32 NHWC, "label": int32}``.

    ``split`` is ``"train"`` (shuffled with a seed derived from ``(seed,
    epoch)``, augmented, noisy labels, remainder dropped) or ``"test"`` (in
    order, no augmentation, the last partial batch kept). The same
    ``(seed, epoch)`` always gives the same batches, which makes ``--resume``
    exact at epoch boundaries. ``workers > 0`` runs the preprocessing in that
    many processes (grain ``mp_prefetch``) rather than threads.
    """
    import grain  # pylint: disable=g-import-not-at-top

    train = split == "train"
    source = self.train_source if train else self.test_source
    noisy = self._noisy_labels() if train else None
    ds = grain.MapDataset.source(source)
    if noisy is not None:
      ds = ds.map_with_index(
          lambda i, ex: {"image": ex["image"], "label": noisy[i]}
      )
    if train:
      ds = ds.shuffle(seed=_epoch_seed(seed, epoch))
    aug = augment if train else None

    def prep(example, rng):
      return {
          "image": self._preprocess(example, rng, aug),
          "label": np.int32(example["label"]),
      }

    ds = ds.random_map(prep, seed=_epoch_seed(seed, epoch) + 1)
    ds = ds.batch(batch_size, drop_remainder=train and drop_remainder)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
    if workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def load_tfds(
    name: str,
    *,
    data_dir: Optional[str] = None,
    image_size: Optional[int] = None,
    label_noise: float = 0.0,
    seed: int = 0,
) -> TfdsDataset:
  """Opens ``name``'s train and test splits with ``tfds.data_source``.

  Needs the dataset prepared as array_record in ``data_dir`` (TFDS's default
  directory when None); under ``tfds.testing.mock_data`` random records of the
  right shapes are served instead (what the tests use).
  """
  if name not in TFDS_DATASETS:
    raise ValueError(
        f"dataset must be one of {sorted(TFDS_DATASETS)}, got {name!r}"
    )
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  num_classes, train_split, test_split, size = TFDS_DATASETS[name]
  return TfdsDataset(
      name=name,
      train_source=tfds.data_source(name, split=train_split, data_dir=data_dir),
      test_source=tfds.data_source(name, split=test_split, data_dir=data_dir),
      num_classes=num_classes,
      image_size=image_size or size,
      label_noise=label_noise,
      seed=seed,
  )


def load(
    name: str,
    *,
    label_noise: float = 0.0,
    seed: int = 0,
    data_dir: Optional[str] = None,
    image_size: Optional[int] = None,
):
  """``load_digits`` for ``"digits"``, else :func:`load_tfds`."""
  if name == "digits":
    return load_digits(label_noise=label_noise, seed=seed)
  return load_tfds(
      name,
      data_dir=data_dir,
      image_size=image_size,
      label_noise=label_noise,
      seed=seed,
  )
