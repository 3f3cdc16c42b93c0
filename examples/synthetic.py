"""Synthetic data for the examples: learnable, offline, a few kilobytes.

Replace these with your dataset (tensorflow-datasets, grain, ...): the
examples only need batches of arrays of the same shapes.
"""

from __future__ import annotations

import numpy as np


def images(n: int, shape=(28, 28, 1), num_classes: int = 10, seed: int = 0):
  """``n`` images: a fixed random template per class plus noise, and labels
  (``seed`` draws the labels and the noise; the templates are fixed)."""
  templates = np.random.default_rng(1234).normal(
      size=(num_classes,) + shape).astype(np.float32)  # the same for every seed
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=n)
  noise = rng.normal(size=(n,) + shape).astype(np.float32)
  return templates[labels] + noise, labels.astype(np.int32)


def tokens(n: int, length: int, vocab: int, seed: int = 0):
  """``n`` sequences of a noisy counting language: each token is the one
  before plus a per-sequence step, modulo ``vocab``, with 10% noise."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, vocab, size=(n, 1))
  step = rng.integers(1, 4, size=(n, 1))
  seq = (start + step * np.arange(length)) % vocab
  noisy = rng.random((n, length)) < 0.1
  seq = np.where(noisy, rng.integers(0, vocab, size=(n, length)), seq)
  return seq.astype(np.int32)


def batches(arrays, batch_size: int, steps: int, seed: int = 0):
  """``steps`` batches drawn without replacement within each pass."""
  n = len(arrays[0])
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(
      steps * batch_size // n + 1)])
  for i in range(steps):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield tuple(a[idx] for a in arrays)
